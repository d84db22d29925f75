"""
Accuracy benchmark: SPOCO (and its ablations) against StarDist and a classical baseline, trained on the same sparse
labels of real microscopy data, scored on held-back images; regenerates ``research/pages/benchmarks.md``, its plots
(``research/figures/``) and its summary ``research/pages/benchmarks.json`` (:mod:`research.report`).

    .venv/bin/python -m research.accuracy [--data_dir ../shared/data]
        [--datasets dsb2018,gonuclear,usiigaci,isbi2012,plant3d]
        [--ratios 0.1,0.4,1.0] [--methods spoco,...,stardist,classical,classical_membrane]
        [--budget_s 600] [--clock wall|cpu] [--threads 2] [--seed 0] [--device cpu|cuda]
        [--out_dir eval/benchmark] [--docs research/pages/benchmarks.md]
        [--splits 1135to1136] [--force] [--no_run] [--max_train N --max_test N]
        [--overrides '{"learning_rate": 0.005}'] [--cache_dir eval/data_cache] [--stardist_python PATH]

- Every (data set, split, method, ratio) is one run in its own subprocess (thread settings, memory, TensorFlow
  kept apart from torch). Its result is cached as ``<out_dir>/<dataset>/<split>/<method>/ratio_<r>.json`` with the
  predictions beside it (``.npz``); a run whose JSON exists with the same settings is skipped (``--force`` reruns);
  one that finished with other settings (another ``--seed``, budget or ``--overrides``) is not replaced: the run
  is refused with what differs (``--force`` replaces it), so give each seed or study arm its own ``--out_dir``.
  So the grid (hours on 2 cores) can be run in pieces, e.g. one ``--methods``/``--ratios`` at a time.
- Methods that cannot run here (SPOCO runner not written, ``.venv-bench`` missing) are recorded as "not run";
  failing runs as "failed" with the error; neither is cached. A data set missing under ``--data_dir`` is skipped.
- ``--budget_s``: the training budget of every run, on ``--clock`` (``wall``: training wall time, ``cpu``: process
  CPU time, for a machine shared with other jobs), with ``--threads`` threads. Prediction / clustering / StarDist's
  threshold optimisation are outside the budget and reported separately.
- Every setting is a flag (:class:`~research.settings.RunSettings`): the run's own process gets them as flags and
  its record keeps them (``settings``); ``--overrides``: further ``configs/train.json`` ids of the SPOCO runs (a
  study; part of their cache identity).
- ``--no_run``: only rebuild the docs from the cached results. ``--docs ''``: do not write docs.
- ``--repredict``: no training; segment the test images again with the checkpoints of finished SPOCO runs (while
  their work folders exist) and today's ``configs/inference.json`` plus ``--inference_overrides`` (JSON, e.g.
  ``'{"clustering": "fast"}'``), rescore and update the records; the earlier scores stay in the record
  (``earlier_predictions``), the record names the commit and clustering of the new predictions.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from research.data import (
    DATASETS,
    DEFAULT_DATASETS,
    REPO_ROOT,
    Split,
    dataset_available,
    default_data_dir,
    device_error,
    load_benchmark,
)
from research.records import (
    collect,
    collect_foreground,
    collect_scale,
    is_cached,
    load_record,
    run_path,
    settings_difference,
    write_record,
)
from research.report import write_docs
from research.runner import (
    METHODS,
    STARDIST3D_SKIPPED,
    log,
    method_unavailable_reason,
    repredict_one,
    rescore_one,
    run_one,
)
from research.settings import RunSettings, run_timeout, thread_env

DEFAULT_OUT_DIR = (REPO_ROOT / "eval" / "benchmark").resolve()
DEFAULT_RATIOS = (0.1, 0.4, 1.0)


def _csv(text: str) -> list[str]:
    """The items of a comma-separated flag."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _json_object(p: argparse.ArgumentParser, flag: str, config: str, text: str) -> dict[str, Any]:
    """The JSON object of config ids a flag gives ({} for none); a parser error for anything else."""
    try:
        value = json.loads(text) if text else {}
    except ValueError as e:
        p.error(f"{flag} must be a JSON object of {config} ids: {e}")
    if not isinstance(value, dict):
        p.error(f"{flag} must be a JSON object of {config} ids, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags, checked (names, ratios, JSON objects, device) so that a bad one stops here, not in every run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data_dir", default=str(default_data_dir()), help="folder with the data sets (dsb2018/, gonuclear/, ...)"
    )
    p.add_argument("--datasets", default=",".join(DEFAULT_DATASETS))
    p.add_argument("--ratios", default=",".join(str(r) for r in DEFAULT_RATIOS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budget_s", type=float, default=600.0, help="training budget per run (seconds)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="clock of the budget")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per run (torch, OpenMP, TensorFlow)")
    p.add_argument(
        "--timeout_s",
        type=float,
        default=None,
        help="wall-clock limit of one run, 0 = none (default: 3 * budget + 1800 on the wall clock, none on cpu)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", default="", help="run only these splits, e.g. 1135to1136 (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (SPOCO; StarDist and classical run on CPU)")
    p.add_argument("--out_dir", default=str(DEFAULT_OUT_DIR))
    p.add_argument(
        "--docs", default=str(REPO_ROOT / "research" / "pages" / "benchmarks.md"), help="markdown to write ('' = none)"
    )
    p.add_argument("--force", action="store_true", help="rerun runs that are cached")
    p.add_argument("--no_run", action="store_true", help="only rebuild the docs from cached results")
    p.add_argument("--max_train", type=int, default=None, help="use only the first N training images (checks)")
    p.add_argument("--max_test", type=int, default=None, help="use only the first N test images (checks)")
    p.add_argument("--stardist3d", action="store_true", help="also train StarDist3D (far too slow for CPU budgets)")
    p.add_argument(
        "--repredict", action="store_true", help="no training: segment again with the cached SPOCO runs' checkpoints"
    )
    p.add_argument(
        "--inference_overrides", default="", help="with --repredict: JSON of inference.json ids, e.g. clustering"
    )
    p.add_argument(
        "--rescore",
        action="store_true",
        help="no training: score the cached predictions (.npz) again with today's metrics and update the records",
    )
    p.add_argument("--overrides", default="", help="SPOCO runs: JSON object of further train.json ids (a study)")
    p.add_argument("--cache_dir", default=None, help="where derived data files go (default: eval/data_cache)")
    p.add_argument("--stardist_python", default=None, help="StarDist's interpreter (default: .venv-bench/bin/python)")
    p.add_argument("--_one", nargs=4, metavar=("DATASET", "SPLIT", "METHOD", "RATIO"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.datasets = _csv(args.datasets)
    args.methods = _csv(args.methods)
    args.splits = _csv(args.splits)
    args.ratios = [float(r) for r in _csv(args.ratios)]
    for d in args.datasets:
        if d not in DATASETS:
            p.error(f"unknown data set {d!r}; valid: {','.join(DATASETS)}")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; valid: {','.join(METHODS)}")
    args.inference_overrides = _json_object(p, "--inference_overrides", "inference.json", args.inference_overrides)
    args.overrides = _json_object(p, "--overrides", "train.json", args.overrides)
    for r in args.ratios:
        if not 0.0 < r <= 1.0:
            p.error(f"ratios must be in (0, 1], got {r}")
    if (error := device_error(args.device)) is not None:
        p.error(error)
    return args


def _child(args: argparse.Namespace) -> int:
    """One run, in this process (started by :func:`main` with ``--_one``)."""
    dataset, split_name, method, ratio = args._one
    settings = RunSettings.from_args(args)
    try:
        import torch

        torch.set_num_threads(settings.threads)
    except ImportError:
        pass
    splits = {s.name: s for s in _load(dataset, settings)}
    rec = run_one(splits[split_name], method, float(ratio), settings)
    return 0 if rec["status"] in ("ok", "not_run") else 1


def _unfinished(
    dataset: str, split: str, method: str, ratio: float, status: str, reason: str, settings: RunSettings
) -> dict[str, Any]:
    """The record of a run that did not finish (not cached: the next invocation tries again)."""
    return {
        "dataset": dataset,
        "split": split,
        "method": method,
        "ratio": ratio,
        "status": status,
        "reason": reason,
        **settings.cache_fields(),
        "settings": settings.as_record(),
    }


def _load(dataset: str, settings: RunSettings) -> list[Split]:
    """The splits of ``dataset`` with the data folder, subset and cache folder of ``settings``."""
    return load_benchmark(dataset, settings.data_dir, settings.max_train, settings.max_test, settings.cache_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the grid (or repredict / rescore), then write the report; exit code 1 when a run failed."""
    args = parse_args(argv)
    if args._one:
        return _child(args)
    settings = RunSettings.from_args(args)
    splits: dict[str, list[Split]] = {}
    skipped: dict[str, str] = {}
    for dataset in args.datasets:
        if not dataset_available(dataset, args.data_dir):
            skipped[dataset] = f"not found under {args.data_dir}"
            log(f"[benchmark] {dataset}: not found under {args.data_dir}, skipped")
            continue
        splits[dataset] = _load(dataset, settings)
    failures = 0
    if args.rescore:
        for dataset, dsplits in splits.items():
            for split in dsplits:
                for method in args.methods:
                    for ratio in args.ratios:
                        if rescore_one(run_path(args.out_dir, dataset, split.name, method, ratio), split):
                            log(f"[benchmark] {dataset} {split.name} {method} ratio {ratio:g}: rescored")
    elif args.repredict and not args.no_run:
        overrides = args.inference_overrides
        for dataset, dsplits in splits.items():
            for split in dsplits:
                if args.splits and split.name not in args.splits:
                    continue
                for method in args.methods:
                    if not method.startswith("spoco"):
                        continue
                    for ratio in args.ratios:
                        path = run_path(args.out_dir, dataset, split.name, method, ratio)
                        rec = repredict_one(path, split, args.device, args.threads, overrides)
                        if rec is not None:
                            m, before = rec["metrics"], rec["earlier_predictions"][-1]["metrics"]
                            log(
                                f"[benchmark] {dataset} {split.name} {method} ratio {ratio:g} repredicted "
                                f"({rec['clustering']}): AP50 {before['ap50']:.3f} -> {m['ap50']:.3f}, "
                                f"mAP {before['map']:.3f} -> {m['map']:.3f}, {rec['repredict_seconds']:.0f} s"
                            )
    elif not args.no_run:
        unavailable = {m: method_unavailable_reason(m, settings) for m in args.methods}
        # the run's own process: thread limits, and this repository importable (it runs `-m research.accuracy`)
        path_env = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, **thread_env(settings.threads), "PYTHONPATH": path_env}
        for dataset, dsplits in splits.items():
            for split in dsplits:
                if args.splits and split.name not in args.splits:
                    continue
                for method in args.methods:
                    for ratio in args.ratios:
                        path = run_path(args.out_dir, dataset, split.name, method, ratio)
                        tag = f"{dataset} {split.name} {method} ratio {ratio:g}"
                        old = load_record(path)
                        if not args.force and is_cached(old, settings):
                            log(f"[benchmark] {tag}: cached ({path})")
                            continue
                        if not args.force and old and old.get("status") == "ok":
                            # record paths do not carry the settings: another seed or study would overwrite it
                            log(
                                f"[benchmark] {tag}: not run: {path} holds a finished run with other settings "
                                f"({settings_difference(old, settings)}); give this run its own --out_dir, or "
                                "--force to replace that run"
                            )
                            failures += 1
                            continue
                        reason = unavailable[method]
                        if method == "stardist" and split.spatial_dims == 3 and not args.stardist3d:
                            reason = STARDIST3D_SKIPPED
                        if reason:
                            log(f"[benchmark] {tag}: not run ({reason})")
                            write_record(
                                path, _unfinished(dataset, split.name, method, ratio, "not_run", reason, settings)
                            )
                            continue
                        log(
                            f"[benchmark] {tag}: running (budget {args.budget_s:g} s {args.clock}, "
                            f"{args.threads} threads)"
                        )
                        cmd = [
                            sys.executable,
                            "-m",
                            "research.accuracy",
                            *settings.to_args(),
                            "--docs",
                            "",
                            "--_one",
                            dataset,
                            split.name,
                            method,
                            str(ratio),
                        ]
                        t0 = time.perf_counter()
                        try:
                            proc = subprocess.run(
                                cmd, env=env, timeout=run_timeout(settings.budget_s, settings.clock, settings.timeout_s)
                            )
                            code = proc.returncode
                        except subprocess.TimeoutExpired:
                            code = -1
                        rec = load_record(path) or {}
                        if code != 0 and rec.get("status") == "ok":
                            rec = {}
                        if rec.get("status") == "ok":
                            m = rec["metrics"]
                            log(
                                f"[benchmark] {tag}: AP50 {m['ap50']:.3f} mAP {m['map']:.3f} SBD {m['sbd']:.3f}, "
                                f"train {rec['train_seconds']:.0f} s, {rec['iterations']} it, "
                                f"total {time.perf_counter() - t0:.0f} s"
                            )
                        else:
                            failures += rec.get("status") != "not_run"
                            reason = rec.get("reason", f"exit code {code}")
                            log(f"[benchmark] {tag}: {rec.get('status', 'failed')} ({reason.splitlines()[0][:300]})")
                            if not rec:
                                write_record(
                                    path, _unfinished(dataset, split.name, method, ratio, "failed", reason, settings)
                                )
    if args.docs:
        command = " ".join(
            [".venv/bin/python -m research.accuracy"]
            + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]
        )
        path = write_docs(
            collect(args.out_dir),
            args.docs,
            splits,
            args.methods,
            args.ratios,
            command,
            os.path.relpath(args.data_dir, REPO_ROOT),
            skipped,
            collect_scale(args.out_dir),
            collect_foreground(args.out_dir),
            out_dir=(
                None if Path(args.out_dir).resolve() == DEFAULT_OUT_DIR else os.path.relpath(args.out_dir, REPO_ROOT)
            ),
        )
        log(f"[benchmark] wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
