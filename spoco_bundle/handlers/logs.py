"""What a training run tells: its length, a progress bar, the loss terms per epoch, a preview of the instances in
TensorBoard, and the log file."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import defaultdict

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.handlers.tensorboard_handlers import TensorBoardHandler

from spoco_bundle.distributed import is_main_process
from spoco_bundle.handlers.schedule import UNLIMITED_EPOCHS

__all__ = [
    "TrainingLengthLogger",
    "TrainingProgressBar",
    "LossTermsLogger",
    "TensorBoardInstancePreview",
    "instance_preview",
    "add_log_file",
    "remove_log_file",
]


def _duration(seconds: float) -> str:
    """``seconds`` as the most readable of s / min / h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class TrainingLengthLogger:
    """
    Says how long a run will take. Before the first iteration it trains (after a resumed run's state is loaded): its
    length, ``epochs x epoch_length = N iterations``, or, with a time budget, that the budget ends it. After
    ``measure`` more iterations (or ``measure_s`` seconds, whichever comes first; the first iteration, which warms up,
    is not counted): the speed measured and what it means, the time the iterations take and the clock time they end
    (validation not counted), or how many iterations the budget holds. Rank 0 only.

    Args:
        time_limit_s: the budget of :class:`~spoco_bundle.handlers.TrainingTimeLimit`, or None.
        clock: its clock, ``"wall"`` or ``"cpu"``.
        measure, measure_s: how many iterations, at most how many seconds, the speed is measured over.
        name: logger name.
    """

    def __init__(
        self,
        time_limit_s: float | None = None,
        clock: str = "wall",
        measure: int = 10,
        measure_s: float = 60.0,
        name: str = "spoco",
    ) -> None:
        self.time_limit_s = time_limit_s
        self.clock = clock
        self.measure = max(1, int(measure))
        self.measure_s = float(measure_s)
        self.logger = logging.getLogger(name)
        self._start: tuple[int, float] | None = None  # (iteration, time) the measurement starts at

    def attach(self, engine: Engine) -> None:
        if not is_main_process():
            return
        engine.add_event_handler(Events.ITERATION_STARTED, self)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._speed)

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

    def _speed(self, engine: Engine) -> None:
        now, iteration = time.perf_counter(), engine.state.iteration
        if self._start is None:  # the first iteration warms up (allocations, compilation): measured from its end
            self._start = (iteration, now)
            return
        n, seconds = iteration - self._start[0], now - self._start[1]
        if n < self.measure and seconds < self.measure_s:
            return
        engine.remove_event_handler(self._speed, Events.ITERATION_COMPLETED)
        per = seconds / n
        if self.time_limit_s is not None:
            what = f"the budget of {_duration(self.time_limit_s)} holds about {int(self.time_limit_s / per)} iterations"
            left = self.time_limit_s - seconds  # an estimate on the wall clock (the budget may count CPU time)
        else:
            remaining = engine.state.epoch_length * engine.state.max_epochs - iteration
            left = remaining * per
            what = f"{remaining} more iterations take about {_duration(left)}"
        end = time.strftime("%H:%M", time.localtime(time.time() + max(left, 0.0)))
        self.logger.info(f"{per:.2f} s per iteration: {what}, done about {end} (validation not counted)")


class TrainingProgressBar:
    """
    tqdm progress bar over the iterations of each epoch, showing the running loss (rank 0 only), when standard
    error is a terminal: in a log file or a pipe its carriage-return updates are megabytes of noise, and the
    epoch's loss line (:class:`LossTermsLogger`) says the same.

    Args:
        persist: keep each epoch's finished bar on screen.
        terminal_only: attach only when ``sys.stderr`` is a terminal (False: always).
    """

    def __init__(self, persist: bool = False, terminal_only: bool = True) -> None:
        self.persist = persist
        self.terminal_only = terminal_only

    def attach(self, engine: Engine) -> None:
        if not is_main_process():
            return
        if self.terminal_only and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
            return
        ProgressBar(persist=self.persist).attach(engine, output_transform=lambda out: {"loss": _loss_of(out)})


class LossTermsLogger:
    """
    Logs the epoch mean of every SPOCO loss term (pull, push, instance, unlabeled, consistency, ...) at the end
    of each epoch, read from the loss's ``statistics`` (:class:`~spoco_bundle.losses.LossStatistics`) after each
    iteration, the learning rate of the epoch's last iteration and, for a run of a fixed number of epochs, about how
    long the remaining ones take at the pace so far (validation included): what a progress bar would tell, in the log.

    The same values are put into ``engine.state.metrics`` (``loss_<term>`` and ``lr``), where MONAI's epoch-level
    trackers read them: ``TensorBoardStatsHandler`` attached after this handler plots them per epoch.

    Args:
        loss: the ``SpocoLoss`` instance used by the trainer.
        optimizer: the trainer's optimizer, for the learning rate (its first parameter group); None: not logged.
        name: logger name.
    """

    def __init__(self, loss: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, name: str = "spoco"):
        self.loss = loss
        self.optimizer = optimizer
        self.logger = logging.getLogger(name)
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self._lr: float | None = None
        self._started: tuple[int, float] | None = None  # (epoch, time) at the run's start

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)
        engine.add_event_handler(Events.STARTED, self._start)

    def _left(self, engine: Engine) -> str:
        """``; about T left``: the run's remaining epochs at the pace of its epochs so far (validation included);
        empty for a run that a time budget ends."""
        state = engine.state
        if state.max_epochs >= UNLIMITED_EPOCHS or self._started is None or state.epoch >= state.max_epochs:
            return ""
        epochs = state.epoch - self._started[0]
        if epochs < 1:
            return ""
        per_epoch = (time.perf_counter() - self._started[1]) / epochs
        return f"; about {_duration(per_epoch * (state.max_epochs - state.epoch))} left"

    def _start(self, engine: Engine) -> None:
        self._started = (engine.state.epoch, time.perf_counter())

    def _accumulate(self, engine: Engine) -> None:
        for k, v in self.loss.statistics.terms.items():
            self._sums[k] += float(v)
        self._count += 1
        if self.optimizer is not None:  # before the epoch's scheduler step: the rate this epoch trained with
            self._lr = float(self.optimizer.param_groups[0]["lr"])

    def _report(self, engine: Engine) -> None:
        if self._count:
            means = {k: v / self._count for k, v in self._sums.items()}
            terms = "  ".join(f"{k} {v:.4f}" for k, v in means.items())
            lr = "" if self._lr is None else f"  (lr {self._lr:.3g})"
            of = "" if engine.state.max_epochs >= UNLIMITED_EPOCHS else f"/{engine.state.max_epochs}"
            self.logger.info(f"Epoch {engine.state.epoch}{of} loss terms: {terms}{lr}{self._left(engine)}")
            engine.state.metrics.update({f"loss_{k}": v for k, v in means.items()})
            if self._lr is not None:
                engine.state.metrics["lr"] = self._lr
        self._sums.clear()
        self._count = 0


def _loss_of(output) -> float:
    if isinstance(output, list):  # decollated batch: every item carries the same loss
        output = output[0]
    return float(output["loss"]) if isinstance(output, dict) else float(output)


def _instance_colours(ids: np.ndarray) -> np.ndarray:
    """A fixed, well-spread RGB colour per instance id (uint8, shape ``ids.shape + (3,)``); 0 is black."""
    ids = ids.astype(np.uint64)
    rgb = np.stack([(ids * np.uint64(m)) % np.uint64(191) + np.uint64(64) for m in (2654435761, 40503, 9973)], -1)
    return np.where(ids[..., None] > 0, rgb, 0).astype(np.uint8)


def instance_preview(image, label, pred, max_size: int = 512) -> np.ndarray:
    """
    One RGB picture of a segmentation: the image (grey, 1-99.8 percentiles), the annotation and the prediction (each
    object in its own colour over the image) side by side; 3D data show their middle slice along the first axis.

    Args:
        image: ``(C, *S)`` (channel 0 is shown).
        label: ``(1, *S)`` instance ids, or None (then that panel is the image alone).
        pred: ``(1, *S)`` instance ids.
        max_size: the panels' longest side in pixels (larger data are subsampled).

    Returns:
        ``(H, 3 * W, 3)`` uint8.
    """

    def plane(x) -> np.ndarray:
        a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)[0]
        a = a[a.shape[0] // 2] if a.ndim == 3 else a
        step = max(1, int(math.ceil(max(a.shape) / max_size)))
        return a[::step, ::step]

    img = plane(image).astype(np.float64)
    lo, hi = np.percentile(img, (1, 99.8)) if img.size else (0.0, 1.0)
    grey = np.clip((img - lo) / (hi - lo) if hi > lo else img * 0, 0, 1)
    grey = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1)
    panels = [grey]
    for ids in (label, pred):
        if ids is None:
            panels.append(grey)
            continue
        ids = np.clip(plane(ids), 0, None)
        panels.append(np.where(ids[..., None] > 0, _instance_colours(ids), grey // 2))
    return np.concatenate(panels, axis=1)


class TensorBoardInstancePreview(TensorBoardHandler):
    """
    After each validation, a preview in TensorBoard (``IMAGES`` tab, one step per epoch): the first validation
    image, its annotation and the predicted instances (:func:`instance_preview`). MONAI's ``TensorBoardImageHandler``
    would show instance ids as grey levels and 3D volumes as GIFs of every slice; this shows one slice in colours.

    Args:
        summary_writer: a ``SummaryWriter`` to share; None: one of its own in ``log_dir``.
        log_dir: the TensorBoard folder (``output_dir``).
        tag: the image's tag.
        max_size: the panels' longest side in pixels.
    """

    def __init__(
        self, summary_writer=None, log_dir: str = "./runs", tag: str = "validation/instances", max_size: int = 512
    ) -> None:
        super().__init__(summary_writer=summary_writer, log_dir=log_dir)
        self.tag = tag
        self.max_size = int(max_size)
        self._first: np.ndarray | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep_first)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._first = None

    def _keep_first(self, engine: Engine) -> None:
        if self._first is not None:
            return
        out = engine.state.output
        item = out[0] if isinstance(out, list) and out else out
        if isinstance(item, dict) and "pred" in item and "image" in item:
            self._first = instance_preview(item["image"], item.get("label"), item["pred"], self.max_size)

    def __call__(self, engine: Engine) -> None:
        if self._first is None:
            return
        self._writer.add_image(self.tag, self._first, engine.state.epoch, dataformats="HWC")
        self._writer.flush()


def add_log_file(path: str | None) -> str | None:
    """
    Also write the log to the file ``path`` (appending; its folder is made): a ``FileHandler`` on the root logger,
    with the console's format (``configs/logging.conf``) and level. Once per path; nothing for None, and nothing on
    the ranks other than 0 of a ``torchrun`` launch (``RANK`` > 0). Returns the path written to, or None.
    """
    if not path or not is_main_process():
        return None
    path = os.path.abspath(str(path))
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in root.handlers):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    formatter = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    handler.setFormatter(formatter or logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    root.addHandler(handler)
    logging.getLogger(__name__).info(f"log also written to {path}")
    return path


def remove_log_file(path: str | None) -> None:
    """Stop writing the log to ``path`` (:func:`add_log_file`) and close the file."""
    if not path:
        return
    path = os.path.abspath(str(path))
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler) and h.baseFilename == path]:
        root.removeHandler(h)
        h.close()
