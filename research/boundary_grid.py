"""
Post-processing grid of the ``boundary`` clustering (membrane-separated objects, ISBI 2012): the seeds' interior
threshold, their dome height ``h``, the boundary map's smoothing ``sigma`` and the merging of weak contacts
``merge``, scored on the held-back *training* images of learning-speed runs (:mod:`research.learning_speed`,
``--tune``), where a setting may be chosen.

    .venv/bin/python -m research.boundary_grid --dataset isbi2012 --tune 4 --out_dir eval/s41/ls,eval/s42/ls \
        --runs surface1:0,surface1:1,default:0:1800 [--ratio 0.1] [--budget_s 900] [--thresholds 0.3,0.5,0.7]
        [--hs 1,2,3,5] [--sigmas 0,1] [--merges 0,0.5] [--threads 2] [--json eval/s42/boundary_grid.json]

The threshold ``merge`` below which neighbouring regions merge (``boundary_merge`` of the configs) was chosen with
it: ``--merges`` 0-0.8 on eight 10 % runs and one 100 % run (research/findings.md, "Weak contacts").

Each run's checkpoint segments the held-back images once (the bundle's inference pieces,
:func:`research.foreground.network_outputs`); every setting then cuts the same outputs with
:func:`spoco_bundle.clustering.cluster_boundary`. Prints a markdown table (mean over runs, ARAND first) and, with
``--json``, writes every run's scores.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit

from research.data import load_benchmark, score
from research.foreground import network_outputs
from research.learning_speed import RECIPES, record_path, tune_split
from research.methods import spoco as spoco_runner
from spoco_bundle.clustering import cluster_boundary

KEYS = ("arand", "voi_split", "voi_merge", "ap50")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def grid(
    outputs: list[np.ndarray],
    truth: list[np.ndarray],
    dataset: str,
    spatial_dims: int,
    embedding_dim: int,
    min_size: int,
    settings: list[tuple[float, float, float, float]],
) -> dict[tuple[float, float, float, float], dict]:
    """Scores (:data:`KEYS`) of every ``(threshold, h, sigma, merge)`` in ``settings`` on one run's ``outputs``."""
    result = {}
    for threshold, h, sigma, merge in settings:
        predictions = [
            cluster_boundary(
                out[:embedding_dim],
                expit(out[embedding_dim]),
                min_size=min_size,
                threshold=threshold,
                h=h,
                sigma=sigma,
                merge=merge,
            )
            for out in outputs
        ]
        scores = score(predictions, truth, spatial_dims, dataset)
        result[(threshold, h, sigma, merge)] = {k: float(scores[k]) for k in KEYS if k in scores}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="isbi2012")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--tune", type=int, default=4)
    p.add_argument("--out_dir", required=True, help="the learning-speed runs' folder(s), comma-separated")
    p.add_argument("--runs", required=True, help="recipe:seed[:budget_s],... of finished learning-speed runs")
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--budget_s", type=float, default=900.0)
    p.add_argument("--thresholds", default="0.3,0.5,0.7")
    p.add_argument("--hs", default="1,2,3,5")
    p.add_argument("--sigmas", default="0,1")
    p.add_argument("--merges", default="0", help="boundary values below which neighbours merge (0: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    split = tune_split(load_benchmark(args.dataset, args.data_dir)[0], args.tune)
    settings = list(
        itertools.product(_floats(args.thresholds), _floats(args.hs), _floats(args.sigmas), _floats(args.merges))
    )
    truth = [item.labels for item in split.test]
    embedding_dim = int(json.loads((spoco_runner.REPO_ROOT / "configs" / "train.json").read_text())["embedding_dim"])
    min_size = spoco_runner.settings_for(split)["min_size"]
    per_run = {}
    for run in args.runs.split(","):
        recipe, seed, *budget = run.split(":")
        budget_s = float(budget[0]) if budget else args.budget_s
        ckpts = [
            record_path(Path(d), split.dataset, recipe, args.ratio, budget_s, int(seed)).with_suffix("")
            / "models"
            / "model.pt"
            for d in args.out_dir.split(",")
        ]
        ckpt = next((c for c in ckpts if c.is_file()), None)
        if ckpt is None:
            raise SystemExit(f"no finished run {run} in {args.out_dir} (train it with research.learning_speed)")
        ids = spoco_runner._inference_ids({**spoco_runner.settings_for(split), **RECIPES[recipe]})
        outputs = network_outputs(ckpt, split, split.test, ids=ids)
        per_run[run] = grid(outputs, truth, split.dataset, split.spatial_dims, embedding_dim, min_size, settings)
        print(f"scored {run}: {len(settings)} settings", flush=True)
    mean = {s: {k: float(np.mean([per_run[r][s][k] for r in per_run])) for k in KEYS} for s in settings}
    print(f"\n| threshold | h | sigma | merge | {' | '.join(KEYS)} |\n|---|---|---|---|" + "---|" * len(KEYS))
    for s in sorted(settings, key=lambda s: mean[s]["arand"]):
        print(f"| {s[0]:g} | {s[1]:g} | {s[2]:g} | {s[3]:g} | " + " | ".join(f"{mean[s][k]:.3f}" for k in KEYS) + " |")
    if args.json:
        rows = [
            {"run": r, "threshold": s[0], "h": s[1], "sigma": s[2], "merge": s[3], **v}
            for r in per_run
            for s, v in per_run[r].items()
        ]
        Path(args.json).write_text(json.dumps({"split": split.name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
