"""The resume checkpoint of a running training (``--resume True``) and the memory of the best-model saver."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from spoco_bundle.distributed import is_main_process
from spoco_bundle.errors import check_flag
from spoco_bundle.networks import unwrap

__all__ = ["ResumeCheckpointSaver", "ResumeCheckpointLoader", "BestCheckpointState", "resume_state"]


class BestCheckpointState:
    """
    The memory of a MONAI ``CheckpointSaver`` that keeps the checkpoint of the best key metric (validation's
    ``model.pt``): the score and file it holds, as a ``state_dict`` for the resume checkpoint. Without it a resumed
    run forgets the best score so far, and its first validation replaces ``model.pt`` whatever it scores.

    Args:
        saver: the ``CheckpointSaver`` with ``save_key_metric=True``; with none (no key metric) the state is empty.
    """

    def __init__(self, saver) -> None:
        self.saver = saver

    def _checkpoint(self):
        return getattr(self.saver, "_key_metric_checkpoint", None)

    def state_dict(self) -> dict:
        checkpoint = self._checkpoint()
        saved = [] if checkpoint is None else checkpoint.state_dict()["_saved"]
        return {"saved": [(float(p), str(f)) for p, f in saved]}

    def load_state_dict(self, state: dict) -> None:
        checkpoint = self._checkpoint()
        if checkpoint is None:
            return
        # a file that is gone (deleted, or a kill between the removal of the old best and the write of the new) is
        # forgotten: the saver would fail removing it, and any score beats no file
        folder = Path(self.saver.save_dir)
        fixed = getattr(checkpoint.save_handler, "filename", None)  # MONAI's saver writes this name whatever `f`
        saved = [(p, f) for p, f in state["saved"] if (folder / (fixed or f)).is_file()]
        checkpoint.load_state_dict({"_saved": saved})


class ResumeCheckpointSaver:
    """
    Keeps one resume checkpoint of the running training, for ``--resume True``: the state dicts of ``save_dict``
    (student, teacher, optimizer, trainer, scheduler, stateful handlers) written to ``save_path`` whenever
    ``interval_s`` seconds have passed since the last write (checked after each iteration), when the run ends (its
    epochs done or its time budget spent), and when the process is asked to stop (SIGTERM, a job scheduler's kill, or
    SIGINT, Ctrl-C): then after the iteration in progress, and the process then ends by that signal (exit status
    ``128 + signal`` in a shell). A kill that
    cannot be caught (SIGKILL) loses at most ``interval_s`` seconds and the iteration in progress. Each write goes to a
    temporary file next to it (``.<name>.partial``), is flushed to disk and then renamed over ``save_path``, so a run
    killed at any moment leaves the previous complete state, never a truncated file, and only ever one file.

    The file belongs to the run in progress: a run started without ``resume`` removes a ``save_path`` left by an
    earlier run when it starts, so ``--resume True`` can only continue the latest run. Rank 0 alone writes.

    Attach it after the trainer's other handlers: a save due on an epoch's last iteration is made when the epoch is
    complete, after the epoch's handlers (learning-rate step, validation), so that a run resumed from it starts the
    next epoch with the state a continuous run would have.

    Args:
        save_path: the checkpoint file (``ckpt_dir/resume.pt``).
        save_dict: name -> object with ``state_dict()``; a ``DistributedDataParallel`` network is unwrapped. The
            trainer the handler is attached to is added as ``"trainer"``.
        interval_s: seconds (wall clock) between writes; 0 writes only at the end and on a stop signal.
        resume: whether this run continues from ``save_path`` (then the file is kept at the start).
        name: logger name.
    """

    STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(
        self, save_path: str, save_dict: dict, interval_s: float = 60.0, resume: bool = False, name: str = "spoco"
    ) -> None:
        if not float(interval_s) >= 0:
            raise ValueError(f"resume_interval_s must be >= 0 seconds, got {interval_s!r}.")
        self.save_path = Path(save_path)
        self.save_dict = save_dict
        self.interval_s = float(interval_s)
        self.resume = check_flag(resume, "resume")
        self.logger = logging.getLogger(name)
        self._last: int | None = None  # the iteration last saved
        self._last_time = time.monotonic()
        self._stop: int | None = None  # the stop signal received
        self._previous: dict = {}  # signal -> the handler before ours

    @property
    def partial_path(self) -> Path:
        return self.save_path.with_name(f".{self.save_path.name}.partial")

    def attach(self, engine: Engine) -> None:
        if not is_main_process():
            return
        self.save_dict = {"trainer": engine, **self.save_dict}
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._restore_signals)

    def _due(self) -> bool:
        return self._stop is not None or (self.interval_s > 0 and time.monotonic() - self._last_time >= self.interval_s)

    def _iteration_completed(self, engine: Engine) -> None:
        # an epoch's last iteration is saved once the epoch's handlers (the scheduler's step) have run
        length = engine.state.epoch_length
        if self._due() and (not length or engine.state.iteration % length):
            self._save_or_stop(engine)

    def _epoch_completed(self, engine: Engine) -> None:
        if self._due():
            self._save_or_stop(engine)

    def _save_or_stop(self, engine: Engine) -> None:
        self(engine)
        if self._stop is not None:  # end as the signal ends a process (exit status 128 + signal), its state saved
            name = signal.Signals(self._stop).name
            self.logger.warning(f"{name}: stopped after iteration {engine.state.iteration}; --resume True continues")
            self._restore_signals()
            signal.signal(self._stop, signal.SIG_DFL)
            signal.raise_signal(self._stop)

    def _completed(self, engine: Engine) -> None:
        self._restore_signals()
        if self._last != engine.state.iteration:
            self(engine)

    def _on_signal(self, signum: int, frame) -> None:
        if self._stop is not None:  # asked twice: do what was asked before this handler was installed
            self._restore_signals()
            signal.raise_signal(signum)
            return
        self._stop = signum
        name = signal.Signals(signum).name
        self.logger.warning(f"{name}: saving the run's state after this iteration, then stopping")

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            return
        for sig in self.STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self, *args) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _started(self, engine: Engine) -> None:
        self._last_time = time.monotonic()
        self._install_signals()
        if self.partial_path.exists():
            self.partial_path.unlink()  # a write cut short by a kill; the file itself is intact
        if not self.resume and self.save_path.exists():
            self.save_path.unlink()
            self.logger.info(f"removed {self.save_path} of an earlier run: this run keeps its own state there")

    def __call__(self, engine: Engine) -> None:
        state = {k: unwrap(obj).state_dict() for k, obj in self.save_dict.items()}
        self.save_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.partial_path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.partial_path, self.save_path)
        self._last, self._last_time = engine.state.iteration, time.monotonic()
        self.logger.info(f"resume state saved: {self.save_path} (iteration {engine.state.iteration})")


class ResumeCheckpointLoader:
    """
    ``--resume True``: continue the run whose state :class:`ResumeCheckpointSaver` keeps in ``load_path``.

    The file is read and checked when the handler is attached, before training starts, so that a missing file, a
    file that is not a resume checkpoint, or a run that has nothing left to train (its iterations all done, or its
    time budget spent) fails with a message saying so, and no other handler writes anything. The state is restored
    when the trainer starts, with a log line naming the file, the iteration and the epoch.

    A finished run can be extended by resuming it with a larger ``--epochs`` (or ``--time_limit_s``); the trainer
    then continues with the new length (as MONAI's ``CheckpointLoader``).

    Args:
        load_path: the checkpoint file (``ckpt_dir/resume.pt``).
        load_dict: name -> object with ``load_state_dict()``; the trainer the handler is attached to is added as
            ``"trainer"``.
        map_location: ``torch.load``'s ``map_location``.
        optional: names that may be missing from the file (state that earlier versions of the bundle did not save);
            their objects then start fresh, with a warning.
        resume: whether this run resumes (``--resume``); False: the handler does nothing.
        name: logger name.
    """

    def __init__(
        self,
        load_path: str,
        load_dict: dict,
        map_location=None,
        optional: tuple[str, ...] | list[str] = ("fg_calibration", "time_limit", "best_model", "foreground_regime"),
        resume: bool = True,
        name: str = "spoco",
    ) -> None:
        self.load_path = Path(load_path)
        self.load_dict = load_dict
        self.map_location = map_location
        self.optional = tuple(optional)
        self.resume = check_flag(resume, "resume")
        self.logger = logging.getLogger(name)
        self._checkpoint: dict | None = None

    def attach(self, engine: Engine) -> None:
        if not self.resume:
            return
        self.load_dict = {"trainer": engine, **self.load_dict}
        self._checkpoint = self._read(engine)
        engine.add_event_handler(Events.STARTED, self)

    def _read(self, engine: Engine) -> dict:
        path = self.load_path
        if not path.is_file():
            raise FileNotFoundError(
                f"--resume True: nothing to resume in {path.parent}: {path.name} does not exist (a run writes it every "
                "resume_interval_s seconds, on a stop signal and at its end). Start the run without --resume, or pass "
                "the --ckpt_dir of the run to continue."
            )
        try:
            ckpt = torch.load(path, map_location=self.map_location, weights_only=True)
        except Exception as e:
            raise ValueError(f"--resume True: cannot read {path}: {type(e).__name__}: {e}") from e
        missing = [k for k in self.load_dict if k not in self.optional and k not in (ckpt or {})]
        if not isinstance(ckpt, dict) or missing:
            raise ValueError(f"--resume True: {path} is not a resume checkpoint of this bundle (missing {missing}).")
        trainer = ckpt["trainer"]
        done = int(trainer.get("iteration", trainer.get("epoch", 0) * trainer["epoch_length"]))
        total = int(engine.state.max_epochs or 0) * int(trainer["epoch_length"])
        if done >= total:
            raise ValueError(
                f"--resume True: the run in {path} is finished ({done} of {total} iterations, "
                f"{engine.state.max_epochs} epochs of {trainer['epoch_length']}); nothing to resume. Pass a larger "
                "--epochs to train it on, or start a new run without --resume."
            )
        limit = self.load_dict.get("time_limit")
        budget = getattr(limit, "max_seconds", None)
        spent = float((ckpt.get("time_limit") or {}).get("elapsed", 0.0))
        if budget is not None and spent >= budget:
            raise ValueError(
                f"--resume True: the run in {path} has spent its time budget ({spent:.0f} s of {budget:g} s); "
                "nothing to resume. Pass a larger --time_limit_s to train it on, or start a new run without --resume."
            )
        return ckpt

    def __call__(self, engine: Engine) -> None:
        ckpt = self._checkpoint
        if ckpt is None:
            raise RuntimeError("ResumeCheckpointLoader was not attached.")
        prior_max_epochs = engine.state.max_epochs  # the length of this run, not the saved one's (as MONAI's loader)
        for k, obj in self.load_dict.items():
            if k in ckpt:
                unwrap(obj).load_state_dict(ckpt[k])
            else:
                self.logger.warning(f"{self.load_path} holds no {k!r} state (an earlier version): it starts afresh")
        self._checkpoint = None  # free the memory
        engine.state.max_epochs = prior_max_epochs
        state = engine.state
        length = state.epoch_length
        into = state.iteration - state.epoch * length
        where = f", {into} of {length} iterations into epoch {state.epoch + 1}" if into else ""
        self.logger.info(
            f"resuming from {self.load_path}: iteration {state.iteration}, epoch {state.epoch} of {state.max_epochs} "
            f"complete{where}"
        )


def resume_state(state: dict, handlers: Sequence = (), best_saver=None) -> dict:
    """
    What the resume checkpoint holds, by name: ``state`` (network, teacher, optimizer, scheduler, ...), every
    handler of ``handlers`` (the trainer's) that keeps state of its own (a ``state_key`` with ``state_dict`` /
    ``load_state_dict``: the foreground regime and calibration, the time budget), under that key, and the memory of
    the best-model saver (:class:`BestCheckpointState`) as ``"best_model"``. The trainer itself is added by the resume
    handlers when they are attached.

    Raises:
        ValueError: two handlers with one ``state_key``.
    """
    state = dict(state)
    for handler in handlers or ():
        key = getattr(handler, "state_key", None)
        if key is None:
            continue
        if key in state:
            raise ValueError(f"two objects of the resume state are named {key!r}.")
        state[key] = handler
    if best_saver is not None:
        state["best_model"] = BestCheckpointState(best_saver)
    return state
