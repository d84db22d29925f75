"""
What a benchmark run's behaviour depends on beyond its data, method and labelled fraction: one
:class:`RunSettings`, given on the command line (``python -m research.accuracy --budget_s ... --clock ...``),
handed to every method explicitly (no environment variables), passed to a run's own process as flags, and written
into its record (``settings``; the cache keys also at the record's top level, as records always had them).
Also the training-time budget (:class:`Budget`) and the guard against hanging runs (:func:`run_timeout`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BUDGET_CLOCKS", "CACHE_KEYS", "RunSettings", "Stopwatch", "Budget", "run_timeout", "thread_env"]

BUDGET_CLOCKS = ("wall", "cpu")
# settings that make a cached run reusable (plus ``overrides`` for SPOCO runs)
CACHE_KEYS = ("budget_s", "clock", "threads", "seed", "device", "max_train", "max_test")


@dataclass(frozen=True)
class RunSettings:
    """
    Everything a run's behaviour depends on besides its data, method and ratio: the flags of
    ``python -m research.accuracy`` (:meth:`from_args`, :meth:`to_args`), recorded in every run record
    (:meth:`as_record`).

    Args:
        budget_s: training budget of every run (seconds on ``clock``).
        clock: ``"wall"`` (training wall time with ``threads`` threads: what a user waits for on an idle machine) or
            ``"cpu"`` (process CPU time, all threads summed: for a machine shared with other jobs).
        threads: CPU threads per run (torch, OpenMP, TensorFlow).
        seed: sparse-label selection seed (and the methods' seed).
        device: ``"cpu"`` or ``"cuda"`` (SPOCO; the peers run on CPU).
        timeout_s: wall-clock limit of a run (training and prediction), 0 = none; None: see :func:`run_timeout`.
        overrides: further ``configs/train.json`` ids of SPOCO runs (a study: part of such a run's identity).
        max_train, max_test: use only the first N training / test images of each split (checks).
        data_dir: folder with the data sets.
        out_dir: the results folder (the ``spoco_mask`` protocol reuses the ``spoco`` run's checkpoint from it).
        cache_dir: where derived data files are written (``plant3d``'s halves); None: ``eval/data_cache``.
        stardist_python: interpreter of the StarDist environment; None: ``.venv-bench/bin/python``.
    """

    budget_s: float = 600.0
    clock: str = "wall"
    threads: int = 2
    seed: int = 0
    device: str = "cpu"
    timeout_s: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    max_train: int | None = None
    max_test: int | None = None
    data_dir: str | None = None
    out_dir: str | None = None
    cache_dir: str | None = None
    stardist_python: str | None = None

    def __post_init__(self) -> None:
        if self.clock not in BUDGET_CLOCKS:
            raise ValueError(f"clock must be one of {BUDGET_CLOCKS}, got {self.clock!r}.")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"overrides must be a JSON object of train.json ids, got {self.overrides!r}.")

    def overrides_text(self) -> str | None:
        """``overrides`` as the records keep them: JSON text, None when there are none."""
        return json.dumps(self.overrides) if self.overrides else None

    def as_record(self) -> dict[str, Any]:
        """Every field, for a run's record (``settings``); JSON-ready."""
        return asdict(self)

    def cache_fields(self) -> dict[str, Any]:
        """The fields a cached record is matched on (:data:`CACHE_KEYS` and ``overrides`` as text)."""
        return {**{k: getattr(self, k) for k in CACHE_KEYS}, "overrides": self.overrides_text()}

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunSettings:
        """
        The settings that the parsed flags of ``python -m research.accuracy`` give; the inverse of :meth:`to_args`.

        Args:
            args: from :func:`research.accuracy.parse_args` (``overrides`` already a dict). Paths are made absolute:
                a run's own process and the bundle's subprocesses use them from other folders.
        """

        def absolute(path: str | None) -> str | None:
            return None if path is None else str(Path(path).resolve())

        return cls(
            budget_s=float(args.budget_s),
            clock=args.clock,
            threads=int(args.threads),
            seed=int(args.seed),
            device=args.device,
            timeout_s=args.timeout_s,
            overrides=args.overrides,
            max_train=args.max_train,
            max_test=args.max_test,
            data_dir=absolute(args.data_dir),
            out_dir=absolute(args.out_dir),
            cache_dir=absolute(args.cache_dir),
            stardist_python=args.stardist_python,
        )

    def to_args(self) -> list[str]:
        """The flags of ``python -m research.accuracy`` that give these settings to a run's own process."""
        out = ["--budget_s", str(self.budget_s), "--clock", self.clock, "--threads", str(self.threads)]
        out += ["--seed", str(self.seed), "--device", self.device]
        for flag, value in (
            ("--timeout_s", self.timeout_s),
            ("--max_train", self.max_train),
            ("--max_test", self.max_test),
            ("--data_dir", self.data_dir),
            ("--out_dir", self.out_dir),
            ("--cache_dir", self.cache_dir),
            ("--stardist_python", self.stardist_python),
            ("--overrides", self.overrides_text()),
        ):
            if value is not None:
                out += [flag, str(value)]
        return out


def thread_env(threads: int) -> dict[str, str]:
    """Environment of a run's child processes that limits their thread pools to ``threads``."""
    n = str(int(threads))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "NUMBA_NUM_THREADS": n}


class Stopwatch:
    """Wall and process CPU time since construction (CPU time sums all threads of this process)."""

    def __init__(self) -> None:
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    @property
    def cpu(self) -> float:
        return time.process_time() - self.cpu0


def run_timeout(budget_s: float, clock: str, timeout_s: float | None = None) -> float | None:
    """Wall-clock limit of one run (training, then prediction), a guard against hangs.

    ``timeout_s`` when given, ``0`` meaning none. Otherwise ``3 * budget_s + 1800`` on the ``wall`` clock and none on
    the ``cpu`` clock: there the budget bounds the run's CPU time and its wall time grows with whatever else shares
    the machine (9 runs on 2 cores took 4.8x their budget), so a fixed limit killed runs that had finished training.
    """
    if timeout_s is not None:
        return float(timeout_s) if timeout_s > 0 else None
    return 3 * float(budget_s) + 1800 if clock == "wall" else None


class Budget:
    """
    A training-time budget for a method's training loop.

    Args:
        seconds: the budget.
        clock: ``"wall"`` or ``"cpu"`` (see :class:`RunSettings`).
    """

    def __init__(self, seconds: float, clock: str) -> None:
        if clock not in BUDGET_CLOCKS:
            raise ValueError(f"clock must be one of {BUDGET_CLOCKS}, got {clock!r}.")
        self.seconds = float(seconds)
        self.clock = clock
        self.watch = Stopwatch()

    @property
    def used(self) -> float:
        return self.watch.cpu if self.clock == "cpu" else self.watch.wall

    def exhausted(self) -> bool:
        return self.used >= self.seconds
