"""
Runs of the accuracy benchmark: the methods by name (:data:`METHODS`, each a ``fit_predict(split, ratio, settings)``
in :mod:`research.methods`), one run in this process (:func:`run_one`), and the two ways to redo a finished run's
predictions or scores without training (:func:`repredict_one`, :func:`rescore_one`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from research.data import MethodUnavailable, Result, Split, kept_digest, label_counts, score
from research.records import (
    git_commit,
    load_record,
    loadavg,
    machine_info,
    run_path,
    save_predictions,
    write_record,
)
from research.settings import RunSettings

# method name -> (module with fit_predict, variant or None)
METHODS: dict[str, tuple[str, str | None]] = {
    "spoco": ("research.methods.spoco", "full"),
    "spoco_no_consistency": ("research.methods.spoco", "no_consistency"),
    "spoco_no_unlabeled_push": ("research.methods.spoco", "no_unlabeled_push"),
    "spoco_no_instance": ("research.methods.spoco", "no_instance"),
    "spoco_scribbles": ("research.methods.spoco", "scribbles"),
    "spoco_mask": ("research.methods.spoco", "mask"),
    "spoco_finetuned": ("research.methods.spoco", "finetuned"),
    "spoco_shipped": ("research.methods.spoco", "shipped"),
    "stardist": ("research.methods.stardist_peer", None),
    "classical": ("research.methods.classical", None),
    "classical_membrane": ("research.methods.membrane", None),
}

STARDIST3D_SKIPPED = (
    "StarDist3D does not train within a CPU budget (measured here: fewer than 7 steps of 2 patches 48x96x96 in 600 s "
    "wall on 1 thread of the shared 2-core machine); --stardist3d runs it anyway"
)


def resolve_method(name: str, settings: RunSettings) -> Callable[..., Result]:
    """
    ``fit_predict(split, ratio, settings)`` of a method.

    Args:
        name: a key of :data:`METHODS`.
        settings: the run's settings; a method module's ``available(settings)`` (where it has one) checks them
            (e.g. the StarDist interpreter).

    Raises:
        MethodUnavailable: when the method cannot run here.
    """
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid: {list(METHODS)}.")
    module_name, variant = METHODS[name]
    if importlib.util.find_spec(module_name) is None:
        path = module_name.replace(".", "/") + ".py"
        raise MethodUnavailable(f"{path} does not exist (yet)")
    module = importlib.import_module(module_name)
    if hasattr(module, "available"):
        ok, reason = module.available(settings)
        if not ok:
            raise MethodUnavailable(reason)
    fn = getattr(module, "fit_predict", None)
    if fn is None:
        raise MethodUnavailable(f"{module_name} has no fit_predict")
    return partial(fn, variant=variant) if variant is not None else fn


def method_unavailable_reason(name: str, settings: RunSettings) -> str | None:
    """Cheap check in the parent (no training): the reason a method cannot run with ``settings``, or None."""
    try:
        resolve_method(name, settings)
    except MethodUnavailable as e:
        return str(e)
    except Exception:  # a runner that exists but fails to import is a failure: the run records the error
        return None
    return None


def run_one(split: Split, method: str, ratio: float, settings: RunSettings) -> dict[str, Any]:
    """
    Run one method on one split and ratio in this process; write ``<run>.json`` (and ``<run>.npz`` with the
    predictions, keyed by test image name) under ``settings.out_dir`` and return the record.

    Args:
        split: the data.
        method: a key of :data:`METHODS`.
        ratio: fraction of objects kept per training image.
        settings: budget, clock, threads, seed, results folder, ... of the run; recorded in full (``settings``)
            and, as records always had them, the cache keys at the top level.
    """
    if not settings.out_dir:
        raise ValueError("run_one needs the results folder (RunSettings.out_dir).")
    path = run_path(settings.out_dir, split.dataset, split.name, method, ratio)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept, total = label_counts(split, ratio, settings.seed)
    record: dict[str, Any] = {
        "dataset": split.dataset,
        "split": split.name,
        "method": method,
        "ratio": float(ratio),
        **settings.cache_fields(),
        "settings": settings.as_record(),
        "n_train": len(split.train),
        "n_test": len(split.test),
        "train_names": [it.name for it in split.train][:3] + (["..."] if len(split.train) > 3 else []),
        "test_names": [it.name for it in split.test],
        "kept_objects": kept,
        "total_objects": total,
        "kept_digest": kept_digest(split, ratio, settings.seed),
        "machine": machine_info(reference=True),
        "commit": git_commit(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": loadavg(),
    }
    t0 = time.perf_counter()
    try:
        fit_predict = resolve_method(method, settings)
        result = fit_predict(split, ratio, settings)
        if len(result.predictions) != len(split.test):
            raise ValueError(f"{method} returned {len(result.predictions)} predictions for {len(split.test)} images.")
        for pred, item in zip(result.predictions, split.test):
            if np.asarray(pred).shape != item.labels.shape:
                raise ValueError(f"{method}: prediction shape {np.shape(pred)} != {item.labels.shape} ({item.name}).")
        metrics = score(result.predictions, [it.labels for it in split.test], split.spatial_dims, split.dataset)
        save_predictions(path, split, result.predictions)
        record.update(
            status="ok",
            metrics=metrics,
            train_seconds=float(result.train_seconds),
            iterations=int(result.iterations),
            train_cpu_seconds=result.info.get("train_cpu_seconds", result.info.get("train_cpu_s")),
            info=result.info,
        )
    except MethodUnavailable as e:
        record.update(status="not_run", reason=str(e))
    except Exception as e:  # recorded, not cached: the next invocation retries
        record.update(status="failed", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
    record["total_seconds"] = time.perf_counter() - t0
    record["loadavg_end"] = loadavg()
    write_record(path, record)
    return record


def repredict_one(
    path: str | os.PathLike,
    split: Split,
    device: str = "cpu",
    threads: int = 2,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """
    Redo the predictions of the cached SPOCO run at ``path`` with its checkpoint (see ``--repredict``); returns the
    updated record, or None (with a message) when there is no finished SPOCO run or its checkpoint is gone.
    """
    from research.methods import spoco as spoco_runner

    rec = load_record(path)
    if not rec or rec.get("status") != "ok" or not str(rec.get("method", "")).startswith("spoco"):
        log(f"[benchmark] {path}: no finished SPOCO run to repredict")
        return None
    t0 = time.perf_counter()
    try:
        predictions = spoco_runner.repredict(rec, split, device, threads, overrides)
    except FileNotFoundError as e:
        log(f"[benchmark] {path}: {e}")
        return None
    earlier = {k: rec.get(k) for k in ("metrics", "predicted_commit", "clustering") if rec.get(k) is not None}
    earlier.setdefault("predicted_commit", rec.get("commit"))
    earlier.setdefault("clustering", rec.get("info", {}).get("clustering", "fast"))  # the default before 0.7.0
    rec.setdefault("earlier_predictions", []).append(earlier)
    rec.update(
        metrics=score(predictions, [it.labels for it in split.test], split.spatial_dims, split.dataset),
        predicted_commit=git_commit(),
        predicted=time.strftime("%Y-%m-%d %H:%M:%S"),
        # as predict() merges them: the data set's settings, the run's own inference ids, the overrides
        clustering=spoco_runner.inference_clustering(
            {**spoco_runner.bundle_ids(split, "cpu"), **spoco_runner.run_ids(rec), **(overrides or {})}
        ),
        inference_overrides=overrides or {},
        repredict_seconds=round(time.perf_counter() - t0, 1),
    )
    path = Path(path)
    save_predictions(path, split, predictions)
    write_record(path, rec)
    return rec


def rescore_one(path: str | os.PathLike, split: Split) -> dict[str, Any] | None:
    """Score the cached predictions of the finished run at ``path`` again (``--rescore``: metrics added since the
    run, e.g. the foreground pixel precision / recall); returns the updated record, or None when there is none."""
    path = Path(path)
    rec = load_record(path)
    npz = path.with_suffix(".npz")
    if not rec or rec.get("status") != "ok" or not npz.is_file():
        return None
    with np.load(npz) as saved:
        missing = [it.name for it in split.test if it.name not in saved]
        if missing:
            log(f"[benchmark] {path}: predictions for {missing[:3]} not in {npz}, not rescored")
            return None
        predictions = [saved[it.name].astype(np.int32) for it in split.test]
    rec["metrics"] = score(predictions, [it.labels for it in split.test], split.spatial_dims, split.dataset)
    rec["rescored"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_record(path, rec)
    return rec


def log(msg: str) -> None:
    """Progress lines of the benchmark (stderr, unbuffered)."""
    print(msg, file=sys.stderr, flush=True)
