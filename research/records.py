"""
Run records of the accuracy benchmark: one JSON per (data set, split, method, ratio) at
``<out_dir>/<dataset>/<split>/<method>/ratio_<r>.json`` with the predictions beside it (``.npz``), holding the
run's settings (``settings``, and the cache keys at the top level), data, kept-object digest, machine, commit,
load, scores and timings; how they are found, cached and written.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from research.data import REPO_ROOT, Split
from research.settings import CACHE_KEYS, RunSettings


def run_path(out_dir: str | os.PathLike, dataset: str, split: str, method: str, ratio: float) -> Path:
    """The record of one run: ``<out_dir>/<dataset>/<split>/<method>/ratio_<r>.json``."""
    return Path(out_dir) / dataset / split / method / f"ratio_{ratio:.2f}.json"


def machine_info(reference: bool = False) -> dict[str, Any]:
    """CPU model, core count, memory, torch version and GPU (when one is used) of this machine; with ``reference``
    also its :func:`reference_throughput` (``reference_it_per_cpu_s``, a few CPU-seconds to measure)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "nproc": os.cpu_count(),
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "Model name" in fields:
            info["cpu"] = fields["Model name"]
        # a virtual machine's model name can be as bare as "AMD EPYC": the generation and clock tell machines of
        # different speed apart (a CPU-second budget buys other numbers of iterations on them)
        detail = [f"{k} {fields[k]}" for k in ("CPU family", "Model", "Stepping", "CPU MHz", "BogoMIPS") if k in fields]
        if detail:
            info["cpu_detail"] = ", ".join(detail)
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    if reference:
        info["reference_it_per_cpu_s"] = reference_throughput()
    return info


# the reference workload of :func:`reference_throughput`, stated in reports
REFERENCE_WORKLOAD = (
    "the 2D EmbeddingUNet (features 16-32-64-128), batch 2 x 1 x 128 x 128, forward + backward, 1 thread"
)


def reference_throughput(cpu_s: float = 3.0) -> float | None:
    """Steps per CPU-second of :data:`REFERENCE_WORKLOAD` on this machine, measured for ``cpu_s`` seconds of this
    process's CPU time after one warm-up step (None without torch).

    Recorded with each benchmark run: a CPU-second budget buys different numbers of iterations on machines that an
    ``lscpu`` model name does not tell apart. Under load from other jobs on shared cores it reads lower."""
    try:
        import torch

        from spoco_bundle.networks import EmbeddingUNet
    except ImportError:
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():  # the caller's random state stays as it was
            torch.manual_seed(0)
            net = EmbeddingUNet(spatial_dims=2, in_channels=1, embedding_dim=16, features=(16, 32, 64, 128))
            x = torch.rand((2, 1, 128, 128))

            def step() -> None:
                net.zero_grad(set_to_none=True)
                net(x).square().mean().backward()

            step()
            steps, start = 0, time.process_time()
            while (spent := time.process_time() - start) < cpu_s:
                step()
                steps += 1
            return round(steps / spent, 3)
    finally:
        torch.set_num_threads(threads)


def loadavg() -> float | None:
    """The 1-minute load average (recorded at a run's start and end: other jobs inflate wall times)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def git_commit() -> str | None:
    """Short HEAD commit, with ``+dirty`` when the code or configs differ from it (a run then used other code)."""
    git = ["git", "-C", str(REPO_ROOT)]
    try:
        out = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or None
        dirty = subprocess.run(
            git + ["status", "--porcelain", "--untracked-files=no", "--", "configs", "spoco_bundle", "research"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{commit}+dirty" if commit and dirty else commit
    except (OSError, subprocess.SubprocessError):
        return None


def save_predictions(path: Path, split: Split, predictions: Sequence[np.ndarray]) -> None:
    """``<run>.npz`` beside the record: the predictions keyed by test image name (uint16, or uint32 if needed)."""
    np.savez_compressed(
        path.with_suffix(".npz"),
        **{
            it.name: np.asarray(p).astype(np.uint16 if np.max(p) < 65536 else np.uint32)
            for it, p in zip(split.test, predictions)
        },
    )


def json_default(obj: Any) -> Any:
    """``json.dump``'s fallback for numpy scalars and arrays (anything else as text)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def load_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record at ``path``; None when it is missing or not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _overrides(value: Any) -> Any:
    """A record's ``overrides`` as an object: JSON text (records made before the ``--overrides`` flag kept the text of
    the environment variable verbatim, whatever its spacing) parsed; none and ``{}`` both None."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    return value or None


def is_cached(record: dict[str, Any] | None, settings: RunSettings | dict[str, Any]) -> bool:
    """
    Whether ``record`` is an ``ok`` run made with the same settings (:data:`~research.settings.CACHE_KEYS`, for
    SPOCO also the same ``overrides``), so that it need not run again.

    Matched on the record's top-level fields, which records of every version have: those written before the settings
    were recorded in full (no ``settings`` key) stay cache hits.

    Args:
        record: from :func:`load_record` (None: no record).
        settings: the settings of the run that would be made, or their :meth:`~RunSettings.cache_fields`.
    """
    if not record or record.get("status") != "ok":
        return False
    fields = settings.cache_fields() if isinstance(settings, RunSettings) else settings
    if any(record.get(k) != fields.get(k) for k in CACHE_KEYS):
        return False
    spoco = str(record.get("method", "")).startswith("spoco")
    return not spoco or _overrides(record.get("overrides")) == _overrides(fields.get("overrides"))


def settings_difference(record: dict[str, Any], settings: RunSettings | dict[str, Any]) -> str:
    """What differs between a finished run's record and the settings of a run that would replace it (the fields
    :func:`is_cached` matches on), e.g. ``seed 0 -> 1``; '' when nothing does."""
    fields = settings.cache_fields() if isinstance(settings, RunSettings) else settings
    diffs = [f"{k} {record.get(k)} -> {fields.get(k)}" for k in CACHE_KEYS if record.get(k) != fields.get(k)]
    if str(record.get("method", "")).startswith("spoco"):
        old, new = _overrides(record.get("overrides")), _overrides(fields.get("overrides"))
        if old != new:
            diffs.append(f"overrides {old or {}} -> {new or {}}")
    return ", ".join(diffs)


def write_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write a run record atomically (a temporary file renamed over it): a reader never sees half a record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(record, indent=1, default=json_default))
    os.replace(tmp, path)


def collect(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every run record under ``out_dir``."""
    records = []
    for path in sorted(Path(out_dir).glob("*/*/*/ratio_*.json")):
        rec = load_record(path)
        if rec is not None:
            rec["_path"] = str(path)
            records.append(rec)
    return records


def collect_scale(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Scale-robustness records (``python -m research.scale``) under ``out_dir``."""
    return [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("*/*/*/scale_ratio_*.json"))]


def collect_foreground(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Error-breakdown records (``python -m research.foreground``) under ``out_dir``."""
    return [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("*/*/*/foreground_ratio_*.json"))]


def reference_words(records: Sequence[dict]) -> str:
    """A sentence on the :func:`reference_throughput` the runs' records carry ('' when none does): the figure that
    says whether runs of one CPU-second budget ran on equally fast machines."""
    values = [(r.get("machine") or {}).get("reference_it_per_cpu_s") for r in records]
    found = [v for v in values if v]
    if not found:
        return ""
    spread = f"{min(found):.2f}" if min(found) == max(found) else f"{min(found):.2f} to {max(found):.2f}"
    n = len(values) - len(found)
    missing = f"; not recorded by {n} run{'s' if n > 1 else ''} (older, or rescored)" if n else ""
    return f"reference throughput at the runs' start ({REFERENCE_WORKLOAD}): {spread} steps per CPU-second{missing}."
