"""
Foreground threshold study of a trained benchmark model: the head's fixed threshold (0.5 on the calibrated
probability, the bundle's default) against thresholds found per image from the head's own probability map, scored
on the *training* images (dense labels; where a setting may be chosen) and, beside them, on the test images.

    .venv/bin/python -m research.threshold [--dataset dsb2018] [--split NAME] [--method spoco]
        [--ratio 0.1] [--out_dir eval/benchmark] [--max_train 40] [--threads 2] [--rules 0.2,0.35,0.5,otsu]

Each image's raw output (embeddings + calibrated foreground logit) comes from the bundle's inference pieces
(:func:`research.foreground.network_outputs`) once; every rule then clusters it with the inference
default (``ClusterEmbeddings`` with ``configs/inference.json``'s clustering and shape split). Rules: fixed
thresholds, and ``otsu``: Otsu's threshold of the image's head probabilities (no label frequency needed). Prints a
markdown table and writes ``threshold_ratio_<r>.json`` beside the run's record.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from research.data import REPO_ROOT, cached_checkpoint, default_data_dir, score
from research.foreground import network_outputs
from research.methods.spoco import SETTINGS, run_ids
from spoco_bundle.clustering import head_threshold
from spoco_bundle.transforms import ClusterEmbeddings

RULES = ("0.2", "0.35", "0.5", "otsu")


INFERENCE = json.loads((REPO_ROOT / "configs" / "inference.json").read_text())


def _clusterer(threshold: float | str, min_size: int, embedding_dim: int) -> ClusterEmbeddings:
    """The inference default's post-processing (clustering, shape split) with ``threshold``, for a model's E."""
    config = INFERENCE
    return ClusterEmbeddings(
        config["clustering"],
        embedding_dim,
        "head",
        min_size,
        foreground_threshold=threshold,
        shape_split=float(config.get("shape_split", 0) or 0),
    )


def study(outputs, items, spatial_dims: int, min_size: int, rules=RULES) -> list[dict]:
    """Scores of every rule on ``items`` (their dense labels), with the foreground pixel precision / recall and,
    for ``otsu``, the thresholds it chose."""
    rows = []
    labels = [it.labels for it in items]
    for rule in rules:
        value: float | str = rule if rule == "otsu" else float(rule)
        cluster = _clusterer(value, min_size, outputs[0].shape[0] - 1)  # E embeddings + the head's logit
        preds = [np.asarray(cluster(out, spacing=list(it.spacing)))[0] for out, it in zip(outputs, items)]
        row = {"rule": rule, **{k: v for k, v in score(preds, labels, spatial_dims).items() if k != "per_image"}}
        if rule == "otsu":
            row["chosen"] = [float(head_threshold(out[-1], "otsu")) for out in outputs]
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=str(default_data_dir()))
    p.add_argument("--dataset", default="dsb2018", choices=("dsb2018", "gonuclear"))
    p.add_argument("--split", default=None)
    p.add_argument("--method", default="spoco")
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--out_dir", default=str(REPO_ROOT / "eval" / "benchmark"))
    p.add_argument("--max_train", type=int, default=40, help="training images scored (2D; the first N)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rules", default=",".join(RULES), help="probabilities and/or otsu, comma separated")
    args = p.parse_args(argv)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    split, run_dir, run, ckpt = cached_checkpoint(
        args.dataset, args.split, args.method, args.ratio, args.out_dir, args.data_dir
    )
    torch.set_num_threads(args.threads)
    min_size = SETTINGS[split.spatial_dims]["min_size"]
    t0 = time.perf_counter()
    result = {"dataset": args.dataset, "split": split.name, "method": args.method, "ratio": args.ratio}
    for part, items in (("train", split.train[: args.max_train]), ("test", split.test)):
        outputs = network_outputs(ckpt, split, items, "cpu", run_ids(run))
        result[part] = study(outputs, items, split.spatial_dims, min_size, rules)
    result["checkpoint_run"] = run.get("info", {}).get("work_dir")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (run_dir / f"threshold_ratio_{args.ratio:.2f}.json").write_text(json.dumps(result, indent=1, default=float))
    print(f"{args.dataset} {split.name} {args.method} {args.ratio:.0%}: training images (choose here) | test images")
    print("| rule | train AP50 | train fg P / R | test AP50 | test fg P / R |")
    print("|---|---|---|---|---|")
    for tr, te in zip(result["train"], result["test"]):
        print(
            f"| {tr['rule']} | {tr['ap50']:.3f} | {tr['fg_precision']:.2f} / {tr['fg_recall']:.2f} | "
            f"{te['ap50']:.3f} | {te['fg_precision']:.2f} / {te['fg_recall']:.2f} |"
        )
    for part in ("train", "test"):
        for row in result[part]:
            if row["rule"] == "otsu":
                print(f"otsu thresholds on the {part} images: median {np.median(row['chosen']):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
