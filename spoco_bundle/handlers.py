"""Ignite handlers for SPOCO training: momentum teacher update, foreground calibration, progress bar, loss logging,
time budget, the run's length."""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

# max_epochs of a run that only its time budget ends (train.json sets it when time_limit_s is given)
UNLIMITED_EPOCHS = 10**9

__all__ = [
    "MomentumTeacherHandler",
    "TrainingProgressBar",
    "LossTermsLogger",
    "ForegroundCalibrationHandler",
    "TrainingTimeLimit",
    "TrainingLengthLogger",
    "ValidateOnTerminate",
    "UNLIMITED_EPOCHS",
    "LossWeightWarmup",
    "pred_label_batch",
]


class MomentumTeacherHandler:
    """
    Exponential-moving-average update of the teacher after every iteration: ``g <- m * g + (1 - m) * f``.

    Only parameters are averaged (as in SPOCO); buffers, if any, are copied from the student. On a fresh start
    (iteration 0) the teacher is first set equal to the student, so its random initialisation never matters; when
    resuming, the teacher loaded from the checkpoint is kept. A student wrapped in ``DistributedDataParallel`` is
    unwrapped; as DDP keeps the student identical on all ranks (rank 0's weights are broadcast when it is wrapped,
    the all-reduced gradients are identical), every rank's teacher stays identical too.

    Args:
        teacher: the momentum teacher network ``g`` (its parameters should not require grad).
        student: the trained network ``f``; defaults to the engine's ``network`` at attach time.
        momentum: ``m``, 0.999 in the paper.
    """

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module | None = None, momentum: float = 0.999):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}.")
        self.teacher = teacher
        self.student = student
        self.momentum = momentum

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._sync_if_fresh)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _sync_if_fresh(self, engine: Engine) -> None:
        if self.student is None:  # MONAI workflows attach handlers before they set `network`, so look it up here
            self.student = engine.network  # type: ignore[attr-defined]
        if isinstance(self.student, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            self.student = self.student.module  # same parameter names as the teacher (no "module." prefix)
        if engine.state.iteration == 0:
            self.teacher.load_state_dict(self.student.state_dict())  # type: ignore[union-attr]

    @torch.no_grad()
    def __call__(self, engine: Engine | None = None) -> None:
        student_params = dict(self.student.named_parameters())  # type: ignore[union-attr]
        teacher_params = [p for _, p in self.teacher.named_parameters()]
        source = [student_params[n] for n, _ in self.teacher.named_parameters()]
        # one fused op over all tensors: g = m g + (1 - m) f
        torch._foreach_lerp_(teacher_params, [s.detach() for s in source], 1.0 - self.momentum)
        for (_, tb), (_, sb) in zip(self.teacher.named_buffers(), self.student.named_buffers()):  # type: ignore
            tb.copy_(sb)


class TrainingProgressBar:
    """tqdm progress bar over the iterations of each epoch, showing the running loss (rank 0 only)."""

    def __init__(self, persist: bool = False) -> None:
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() != 0:
                return
        ProgressBar(persist=self.persist).attach(engine, output_transform=lambda out: {"loss": _loss_of(out)})


class LossTermsLogger:
    """
    Logs the epoch mean of every SPOCO loss term (pull, push, instance, unlabeled, consistency, ...) at the end
    of each epoch, read from the loss function's ``last_terms`` dict after each iteration.

    Args:
        loss: the ``SpocoLoss`` instance used by the trainer.
        name: logger name.
    """

    def __init__(self, loss: torch.nn.Module, name: str = "spoco") -> None:
        self.loss = loss
        self.logger = logging.getLogger(name)
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    def _accumulate(self, engine: Engine) -> None:
        for k, v in getattr(self.loss, "last_terms", {}).items():
            self._sums[k] += float(v)
        self._count += 1

    def _report(self, engine: Engine) -> None:
        if self._count:
            terms = "  ".join(f"{k} {v / self._count:.4f}" for k, v in self._sums.items())
            of = "" if engine.state.max_epochs >= UNLIMITED_EPOCHS else f"/{engine.state.max_epochs}"
            self.logger.info(f"Epoch {engine.state.epoch}{of} loss terms: {terms}")
        self._sums.clear()
        self._count = 0


def _loss_of(output) -> float:
    if isinstance(output, list):  # decollated batch: every item carries the same loss
        output = output[0]
    return float(output["loss"]) if isinstance(output, dict) else float(output)


def pred_label_batch(output) -> tuple[torch.Tensor, torch.Tensor]:
    """
    ``output_transform`` for ignite metrics on an evaluator: stack the decollated ``pred`` and ``label`` items back
    into ``(B, C, *S)`` batches (every validation volume is its own batch, so sizes match).
    """
    items = output if isinstance(output, list) else [output]
    return torch.stack([i["pred"] for i in items]), torch.stack([i["label"] for i in items])


class ForegroundCalibrationHandler:
    """
    Estimate the label frequency ``c`` of a positive-unlabeled foreground head during training (Elkan & Noto, KDD
    2008) and store it in the network's ``fg_label_frequency`` buffer, with the loss's
    ``foreground_positive_weight`` in ``fg_positive_weight``; they calibrate the head at inference (see
    :class:`~spoco_bundle.networks.EmbeddingUNet` and :class:`~spoco_bundle.losses.ForegroundLoss`).

    After every iteration, the loss's ``last_label_frequency`` (mean foreground probability of the student over
    annotated-object voxels of images without annotated background, see :class:`~spoco_bundle.losses.SpocoLoss`)
    enters an exponential moving average (bias-corrected, so the first iterations count fully). Images with
    annotated background do not take part; if no image ever lacks it, ``c`` stays 1. Under DDP the estimate pools
    every rank's voxels.

    Args:
        loss: the :class:`~spoco_bundle.losses.SpocoLoss` of the trainer (looked up as ``engine.loss_function``
            when None).
        network: the student (looked up as ``engine.network`` when None); a DDP wrapper is unwrapped.
        momentum: weight of the old estimate in the moving average.
    """

    def __init__(
        self, loss: torch.nn.Module | None = None, network: torch.nn.Module | None = None, momentum: float = 0.98
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        self.loss = loss
        self.network = network
        self.momentum = float(momentum)
        self._sum = 0.0
        self._weight = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        net = self.network if self.network is not None else engine.network  # type: ignore[attr-defined]
        loss = self.loss if self.loss is not None else getattr(engine, "loss_function", None)
        if isinstance(net, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            net = net.module
        buf = getattr(net, "fg_label_frequency", None)
        stats = getattr(loss, "last_label_frequency", None)
        if buf is None or stats is None:
            return
        mean, count = stats
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank's voxels count (DDP would otherwise broadcast rank 0's buffer alone)
            t = torch.tensor([mean * count if count else 0.0, float(count)], dtype=torch.float64, device=buf.device)
            torch.distributed.all_reduce(t)
            count = int(t[1].item())
            mean = float(t[0].item()) / count if count else mean
        if count == 0:
            return
        self._sum = self.momentum * self._sum + (1.0 - self.momentum) * mean
        self._weight = self.momentum * self._weight + (1.0 - self.momentum)
        buf.fill_(self._sum / self._weight)
        weight = getattr(net, "fg_positive_weight", None)
        if weight is not None:
            weight.fill_(float(getattr(loss, "foreground_positive_weight", 1.0)))


class TrainingTimeLimit:
    """
    Stop training after a time budget, annealing the learning rate over that budget.

    With a budget, the progress of training is the larger of the elapsed fraction of the budget and of
    ``max_epochs``; when ``optimizer`` is given, every iteration sets each group's learning rate to
    ``base_lr * (1 + cos(pi * progress)) / 2`` (the cosine schedule of the reference, on a time axis), and
    training stops once the budget is spent. Use it instead of an epoch-based scheduler: ``train.json`` disables its
    ``LrScheduleHandler`` when ``time_limit_s`` is set, and sets ``max_epochs`` to :data:`UNLIMITED_EPOCHS` so that
    the budget alone ends the run (the by-epoch fraction is then about 0). Without a budget (``None``) the handler
    does nothing.

    Args:
        max_seconds: the budget, or None.
        clock: ``"wall"`` (elapsed time) or ``"cpu"`` (CPU time of this process, all threads; stable on a machine
            shared with other jobs).
        optimizer: optimizer whose learning rate follows the schedule, or None.
    """

    def __init__(
        self, max_seconds: float | None = None, clock: str = "wall", optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        if clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}.")
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive or None, got {max_seconds}.")
        self.max_seconds = None if max_seconds is None else float(max_seconds)
        self.clock = clock
        self.optimizer = optimizer
        self._start: float | None = None
        self._base: list[float] = []

    def _now(self) -> float:
        return time.process_time() if self.clock == "cpu" else time.perf_counter()

    @property
    def elapsed(self) -> float:
        return 0.0 if self._start is None else self._now() - self._start

    def attach(self, engine: Engine) -> None:
        if self.max_seconds is None:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._schedule)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    def _started(self, engine: Engine) -> None:
        self._start = self._now()
        if self.optimizer is not None:
            self._base = [g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups]

    def progress(self, engine: Engine) -> float:
        state = engine.state
        # at ITERATION_STARTED the counter already includes the iteration about to run
        done = max(state.iteration - 1, 0)
        by_epoch = done / (state.epoch_length * state.max_epochs) if state.epoch_length else 0.0
        return min(1.0, max(self.elapsed / self.max_seconds, by_epoch))  # type: ignore[operator]

    def _schedule(self, engine: Engine) -> None:
        if self.optimizer is None:
            return
        factor = 0.5 * (1.0 + math.cos(math.pi * self.progress(engine)))
        for group, base in zip(self.optimizer.param_groups, self._base):
            group["lr"] = base * factor

    def _check(self, engine: Engine) -> None:
        if self.elapsed >= self.max_seconds:  # type: ignore[operator]
            logging.getLogger(__name__).info(
                f"time limit of {self.max_seconds:.0f} s ({self.clock}) reached after {engine.state.iteration} "
                f"iterations, epoch {engine.state.epoch}: stopping"
            )
            engine.terminate()


class TrainingLengthLogger:
    """
    Logs once, before the first iteration a run trains (after a resumed run's state is loaded), how long the run will
    be: ``epochs x epoch_length = N iterations``, or, with a time budget, that the budget ends it. Rank 0 only.

    Args:
        time_limit_s: the budget of :class:`TrainingTimeLimit`, or None.
        clock: its clock, ``"wall"`` or ``"cpu"``.
        name: logger name.
    """

    def __init__(self, time_limit_s: float | None = None, clock: str = "wall", name: str = "spoco") -> None:
        self.time_limit_s = time_limit_s
        self.clock = clock
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() != 0:
                return
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        engine.remove_event_handler(self, Events.ITERATION_STARTED)
        state = engine.state
        done = state.iteration - 1
        resumed = f", resuming after iteration {done}" if done > 0 else ""
        if self.time_limit_s is not None:
            self.logger.info(
                f"training until the time limit of {self.time_limit_s:g} s ({self.clock}) is spent (epochs of "
                f"{state.epoch_length} iterations; `epochs` does not apply){resumed}"
            )
        else:
            total = state.epoch_length * state.max_epochs
            self.logger.info(
                f"training {state.max_epochs} epochs x {state.epoch_length} iterations = {total} iterations{resumed}"
            )


class ValidateOnTerminate:
    """
    Runs the validator once more when training is terminated (by :class:`TrainingTimeLimit`): the run then ends in
    the middle of an epoch, where the epoch-level validation does not run, so without this the weights of the last
    iterations (the lowest learning rates of the schedule) would never be scored, and a budget that ends before the
    first validation would leave no best-model checkpoint at all.

    Args:
        validator: the evaluator (``validate#evaluator``); its checkpoint saver keeps the best model as usual.
    """

    def __init__(self, validator) -> None:
        self.validator = validator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.TERMINATE, self)

    def __call__(self, engine: Engine) -> None:
        self.validator.run(engine.state.epoch)


class LossWeightWarmup:
    """
    Linear warm-up of one term's weight in :class:`~spoco_bundle.losses.SpocoLoss`: from ``min(start, target)`` at
    the first iteration to ``target`` (the weight the loss was built with) after ``iterations`` iterations, then
    constant; set before every iteration.

    Why: a large foreground weight helps long runs (the head decides what is an object), but from random weights
    the foreground BCE then dominates the first Adam steps and a run of a few iterations finds no objects. Warming
    the weight up keeps short runs as they are with the small weight. The schedule follows ``engine.state.iteration``,
    so a resumed run continues where it stopped; a target of 0 (term skipped) stays 0.

    Args:
        loss: the loss whose ``weights[term]`` is scheduled; its value at construction is the target.
        term: one of the loss's weights, e.g. ``"foreground"``.
        start: weight at the first iteration (capped at the target).
        iterations: length of the warm-up; 0 disables it.
    """

    def __init__(self, loss: torch.nn.Module, term: str = "foreground", start: float = 20.0, iterations: int = 0):
        weights = getattr(loss, "weights", None)
        if not isinstance(weights, dict) or term not in weights:
            raise ValueError(f"the loss has no weight named {term!r} (its weights: {sorted(weights or {})}).")
        if not math.isfinite(start) or start < 0:
            raise ValueError(f"start must be a finite number >= 0, got {start}.")
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}.")
        self.loss = loss
        self.term = term
        self.target = float(weights[term])
        self.start = min(float(start), self.target)
        self.iterations = int(iterations)

    def value(self, iteration: int) -> float:
        """The weight used by the ``iteration``-th iteration (1-based, as ``engine.state.iteration`` counts)."""
        if self.iterations == 0:
            return self.target
        t = min(max(iteration - 1, 0) / self.iterations, 1.0)
        return self.start + t * (self.target - self.start)

    def attach(self, engine: Engine) -> None:
        if self.iterations > 0:
            engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.loss.weights[self.term] = self.value(engine.state.iteration)  # type: ignore[index, union-attr]
