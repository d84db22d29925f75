"""
Data-loading benchmark: batches per second of ``configs/train.json``'s training loader, driven as the ignite trainer
drives it (a new iterator whenever one runs out), for a training set of few files (one volume by default: the common
3D case), with and without DataLoader worker processes.

Two loader set-ups are compared: the default (one pass of the loader spans at least an epoch, ``train#sampler``, and
the workers persist between passes) and a pass over the file list with workers started anew for each pass (the
loader of bundle 0.35 and earlier, set here with ``train#sampler#num_samples`` = the number of files and
``persistent_workers`` off). Training data: the built-in synthetic 3D nuclei unless ``--data_dir`` holds a
``dataset.json`` (``training`` list; ``--spatial_dims 2`` for 2D images). Each set-up is measured ``--repeats``
times, the set-ups taking turns, and the median is printed.

    .venv/bin/python -m research.perf.benchmark_data_loading [--workers 0,2] [--batches 60] [--repeats 3] [--n_files 1]
        [--data_dir D --spatial_dims 3]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import fire
from monai.bundle import ConfigParser
from monai.utils import set_determinism

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere: this repository's spoco_bundle (and research)
    sys.path.insert(0, str(ROOT))

from spoco_bundle.data import checked_datalist  # noqa: E402
from spoco_bundle.synthetic import write_synthetic_dataset  # noqa: E402

SETUPS = {
    "pass = epoch, persistent workers (default)": {},
    "pass = file list, workers restarted (<= 0.35)": {
        "train#sampler#num_samples": "$len(@train#dataset)",
        "train#dataloader#persistent_workers": False,
    },
}


def _rate(data_dir: str, spatial_dims: int, workers: int, batches: int, overrides: dict) -> float:
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update({"dataset_dir": data_dir, "spatial_dims": spatial_dims, "num_workers": workers})
    parser.update({"train#dataset#progress": False, **overrides})
    set_determinism(seed=0)
    try:
        loader = parser.get_parsed_content("train#dataloader")
        it, stamps = iter(loader), []
        while len(stamps) < batches + 1:
            try:
                next(it)
            except StopIteration:  # what ignite does when the data runs out before the epoch does
                it = iter(loader)
                continue
            stamps.append(time.perf_counter())
    finally:
        set_determinism(seed=None)
    return batches / (stamps[-1] - stamps[0])  # after the first batch (start-up and caching left out)


def main(
    workers: str = "0,2",
    batches: int = 60,
    repeats: int = 3,
    n_files: int = 1,
    data_dir: str | None = None,
    spatial_dims: int = 3,
) -> None:
    counts = [int(w) for w in str(workers).split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if data_dir is None:
            data_dir, spatial_dims = tmp, 3
            write_synthetic_dataset(tmp, n_train=n_files, n_val=0, n_test=0, shape=(64, 128, 128), seed=0)
            source = f"{n_files} synthetic 3D volume(s) of 64x128x128"
        else:
            try:  # a missing folder or bad files: one clear line before any measurement
                checked_datalist(data_dir, "training", spatial_dims)
            except (ValueError, FileNotFoundError) as e:
                raise SystemExit(f"error: {e}") from None
            source = data_dir
        rates: dict = {(name, w): [] for name in SETUPS for w in counts}
        for _ in range(repeats):  # the set-ups take turns, so that a drift in machine load spreads over all of them
            for name, overrides in SETUPS.items():
                for w in counts:
                    rates[name, w].append(_rate(data_dir, spatial_dims, w, batches, overrides))
        print(f"training loader of configs/train.json on {source}; {batches} batches after the first, median of")
        print(f"{repeats} measurements\n")
        print("| loader | " + " | ".join(f"{w} workers: batches/s" for w in counts) + " |")
        print("|---|" + "---|" * len(counts))
        for name in SETUPS:
            print(f"| {name} | " + " | ".join(f"{statistics.median(rates[name, w]):.1f}" for w in counts) + " |")


if __name__ == "__main__":
    fire.Fire(main)
