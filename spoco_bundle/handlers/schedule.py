"""The length of a run: a time budget with the learning rate annealed over it, and a last validation when the
budget ends the run mid-epoch."""

from __future__ import annotations

import logging
import math
import time

import torch
from ignite.engine import Engine, Events

__all__ = ["UNLIMITED_EPOCHS", "TrainingTimeLimit", "ValidateOnTerminate"]

# max_epochs of a run that only its time budget ends (train.json sets it when time_limit_s is given)
UNLIMITED_EPOCHS = 10**9


class TrainingTimeLimit:
    """
    Stop training after a time budget, annealing the learning rate over that budget.

    With a budget, the progress of training is the larger of the elapsed fraction of the budget and of
    ``max_epochs``; when ``optimizer`` is given, every iteration sets each group's learning rate to
    ``base_lr * (1 + cos(pi * progress)) / 2`` (the cosine schedule of the reference, on a time axis), and
    training stops once the budget is spent. Use it instead of an epoch-based scheduler: ``train.json`` disables its
    ``LrScheduleHandler`` when ``time_limit_s`` is set. Attached with a budget, it sets the trainer's ``max_epochs`` to
    :data:`UNLIMITED_EPOCHS`, so that the budget alone ends the run (the by-epoch fraction is then about 0). Without
    a budget (``None``) the handler does nothing. The time spent is the handler's ``state_dict()``, kept in the
    resume checkpoint, so that a resumed run continues the budget and the schedule where it stopped rather than
    starting both again.

    Args:
        max_seconds: the budget, or None.
        clock: ``"wall"`` (elapsed time) or ``"cpu"`` (CPU time of this process, all threads; stable on a machine
            shared with other jobs).
        optimizer: optimizer whose learning rate follows the schedule, or None.
    """

    state_key = "time_limit"  # its name in the resume checkpoint

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
        self._before = 0.0  # time spent by the run before it was resumed
        self._base: list[float] = []

    def _now(self) -> float:
        return time.process_time() if self.clock == "cpu" else time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self._before + (0.0 if self._start is None else self._now() - self._start)

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed}

    def load_state_dict(self, state: dict) -> None:
        # the time since this process started is not counted twice: restart this process's clock here
        self._before = float(state["elapsed"])
        self._start = None if self._start is None else self._now()

    def attach(self, engine: Engine) -> None:
        if self.max_seconds is None:
            return
        engine.state.max_epochs = UNLIMITED_EPOCHS  # the budget alone ends the run
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


class ValidateOnTerminate:
    """
    Runs the validator once more when training is terminated (by :class:`TrainingTimeLimit`): the run then ends in
    the middle of an epoch, where the epoch-level validation does not run, so without this the weights of the last
    iterations (the lowest learning rates of the schedule) would never be scored, and a budget that ends before the
    first validation would leave no best-model checkpoint at all.

    Nothing is attached without a validator or without a time budget.

    Args:
        validator: the evaluator (``validate#evaluator``), or None (no validation); its checkpoint saver keeps the best
            model as usual.
        time_limit_s: the run's time budget (:class:`TrainingTimeLimit`), or None.
    """

    def __init__(self, validator: Engine | None, time_limit_s: float | None = None) -> None:
        self.validator = validator
        self.time_limit_s = time_limit_s

    def attach(self, engine: Engine) -> None:
        if self.validator is not None and self.time_limit_s is not None:
            engine.add_event_handler(Events.TERMINATE, self)

    def __call__(self, engine: Engine) -> None:
        self.validator.run(engine.state.epoch)
