"""
Foreground threshold of a positive-unlabeled (or ring-trained) head, chosen after training (issue 24 item 2): the
models of a learning-speed screen (:mod:`research.learning_speed`) segmented with their own calibration (the head's
0.5), at the threshold of the best pixel F1 on the scored images (chosen with their dense labels: a reference, not a
method), at the threshold of Lee & Liu's criterion ``recall^2 / P(predicted foreground)`` (:func:`spoco_bundle.handlers.
lee_liu_threshold`) computed on the run's own *training* images with the annotated objects it trained on, which a
user has too: no dense label enters the choice. (Otsu's threshold of each scored image's head probabilities, the
retired inference option ``--foreground_threshold otsu``, was a fourth column up to commit 7c97b4b: ``git show
7c97b4b:benchmarks/pu_threshold.py``; cached rows that have it still show it.)

    .venv/bin/python -m research.pu_threshold --out_dir eval/s19_ls --recipes default,self0.5 [--ratio 0.1]
        [--budget_s 900] [--n_train 60] [--threads 2] [--docs research/pages/pu_threshold.md]
        [--dataset gonuclear --split 1135to1136 --tune 1]   # a learning_speed --split screen

Scored on the learning-speed split's held-back training images (dense labels). 'pixel AP': average precision of
the head's probability against the true foreground over those images' pixels (threshold-free: how well the head
ranks); thresholds are on the calibrated probability the network outputs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve

from research.chain import ClusterEmbeddings
from research.data import REPO_ROOT, score, sparsify
from research.foreground import network_outputs
from research.learning_speed import data_words, other_split, record_path, screen_split
from research.methods.spoco import SETTINGS
from research.records import machine_info
from spoco_bundle.handlers import lee_liu_threshold
from spoco_bundle.losses import LOGIT_BINS, LOGIT_RANGE

INFERENCE = json.loads((REPO_ROOT / "configs" / "inference.json").read_text())


def _segment(outputs: list[np.ndarray], threshold: float, min_size: int) -> list[np.ndarray]:
    """The inference default's post-processing (clustering, shape split) with the head at ``threshold``."""
    cluster = ClusterEmbeddings(
        INFERENCE["clustering"],
        outputs[0].shape[0] - 1,
        "head",
        min_size,
        foreground_threshold=float(np.clip(threshold, 1e-3, 0.999)),
        shape_split=float(INFERENCE.get("shape_split", 0) or 0),
    )
    return [np.asarray(cluster(out))[0] for out in outputs]


def _hist(logits: np.ndarray) -> np.ndarray:
    return np.histogram(np.clip(logits, -LOGIT_RANGE, LOGIT_RANGE), LOGIT_BINS, (-LOGIT_RANGE, LOGIT_RANGE))[0]


def study(run_dir: Path, record: dict, split, n_train: int, min_size: int) -> dict:
    ckpt = run_dir / "models" / "model.pt"
    # the learning-speed runs' inference settings (patch, scale): the benchmark's for the data's dimensionality
    ids = {k: v for k, v in SETTINGS[split.spatial_dims].items() if k in ("patch_size", "image_scale")}
    test = network_outputs(ckpt, split, split.test, "cpu", ids)
    truth = [it.labels for it in split.test]
    e = test[0].shape[0] - 1
    prob = np.concatenate([(1 / (1 + np.exp(-o[e].astype(np.float64)))).ravel() for o in test])
    fg = np.concatenate([(lab > 0).ravel() for lab in truth])
    precision, recall, thresholds = precision_recall_curve(fg, prob)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = float(thresholds[int(np.argmax(f1[:-1]))])
    # Lee & Liu on the training images: the annotated objects of the run's sparse labels against every pixel
    train_items = split.train[:n_train]
    train = network_outputs(ckpt, split, train_items, "cpu", ids)
    annotated = [sparsify(it, record["ratio"], record.get("seed", 0)) > 0 for it in train_items]
    h_ann = sum(_hist(o[e][a]) for o, a in zip(train, annotated))
    h_all = sum(_hist(o[e].ravel()) for o in train)
    lee_liu = lee_liu_threshold(h_ann, h_all)
    row = {
        "recipe": record["recipe"],
        "seed": record.get("seed", 0),
        "iterations": record.get("iterations"),
        "pixel_ap": average_precision_score(fg, prob),
    }
    for name, t in (("calibrated", 0.5), ("best", best), ("lee_liu", lee_liu)):
        s = score(_segment(test, t, min_size), truth, split.spatial_dims, split.dataset)
        row[name] = {"threshold": t, "ap50": s["ap50"], "fg_precision": s["fg_precision"], "fg_recall": s["fg_recall"]}
    return row


def _otsu_cell(o: dict | None) -> str:
    if o is None:  # a row cached before the Otsu column, or after it was retired
        return "-"
    ts = o["threshold"]
    t = f"{ts[0]:.2f}" if len(ts) == 1 else f"{min(ts):.2f}-{max(ts):.2f}"
    return f"{t}: {o['ap50']:.3f} ({o['fg_precision']:.2f} / {o['fg_recall']:.2f})"


def table(rows: list[dict]) -> list[str]:
    otsu = any(r.get("otsu") for r in rows)  # cached rows from before Otsu's threshold was retired
    lines = [
        "| recipe | iterations | pixel AP | AP50 at 0.5 (P / R) | best-F1 threshold: AP50 (P / R) "
        "| Lee & Liu on training images: threshold, AP50 (P / R) |"
        + (" Otsu per image: thresholds, AP50 (P / R) |" if otsu else ""),
        "|---|---|---|---|---|---|" + ("---|" if otsu else ""),
    ]
    for r in sorted(rows, key=lambda r: -r["lee_liu"]["ap50"]):
        c, b, ll = r["calibrated"], r["best"], r["lee_liu"]
        name = r["recipe"] + (f" (seed {r['seed']})" if r.get("seed") else "")
        lines.append(
            f"| {name} | {r['iterations']} | {r['pixel_ap']:.3f} | {c['ap50']:.3f} ({c['fg_precision']:.2f} / "
            f"{c['fg_recall']:.2f}) | {b['threshold']:.2f}: {b['ap50']:.3f} ({b['fg_precision']:.2f} / "
            f"{b['fg_recall']:.2f}) | {ll['threshold']:.2f}: **{ll['ap50']:.3f}** ({ll['fg_precision']:.2f} / "
            f"{ll['fg_recall']:.2f}) |" + (f" {_otsu_cell(r.get('otsu'))} |" if otsu else "")
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="dsb2018")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--split", default="", help="the data set's split (default: its first), as learning_speed --split")
    p.add_argument("--tune", type=int, default=40)
    p.add_argument("--out_dir", default=str(REPO_ROOT / "eval" / "learning_speed"))
    p.add_argument("--recipes", required=True)
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--budget_s", type=float, default=900.0)
    p.add_argument("--seeds", default="0", help="the runs' seeds (learning_speed --seed), comma separated")
    p.add_argument("--n_train", type=int, default=60, help="training images the Lee & Liu threshold is chosen on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--docs", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        split = screen_split(args.dataset, args.data_dir, args.split, args.tune)
    except ValueError as e:
        p.error(str(e))
    min_size = SETTINGS[split.spatial_dims]["min_size"]
    rows = []
    seeds = [int(v) for v in args.seeds.split(",")]
    for recipe, seed in [(r, s) for s in seeds for r in args.recipes.split(",")]:
        path = record_path(Path(args.out_dir), split.dataset, recipe, args.ratio, args.budget_s, seed)
        if not path.is_file():
            if seed == seeds[0]:
                raise SystemExit(f"{path} not found: run python -m research.learning_speed --recipes {recipe} first.")
            continue  # further seeds: only the recipes that were rerun
        record = json.loads(path.read_text())
        if wrong := other_split(record, split):
            raise SystemExit(f"{path} {wrong}")
        record.setdefault("recipe", recipe)
        cache = path.with_name(path.stem + "_pu_threshold.json")
        if cache.is_file():
            rows.append(json.loads(cache.read_text()))
            continue
        row = study(path.with_suffix(""), record, split, args.n_train, min_size)
        cache.write_text(json.dumps(row, indent=1, default=float))
        rows.append(row)
        print(table([row])[-1], flush=True)
    m = machine_info()
    its = [r["iterations"] for r in rows]
    data_flags = f"--dataset {args.dataset} --tune {args.tune} " + (f"--split {args.split} " if args.split else "")
    text = [
        "# Foreground threshold after training: Lee & Liu's criterion (issue 24)",
        "",
        "Generated by `python -m research.pu_threshold` from the cached learning-speed runs; do not edit by hand.",
        "",
        "```bash",
        f".venv/bin/python -m research.learning_speed {data_flags}--recipes {args.recipes} --ratios {args.ratio:g} "
        f"--budget_s {args.budget_s:g} --jobs 2 --out_dir {args.out_dir} [--seed S]",
        f".venv/bin/python -m research.pu_threshold {data_flags}--recipes {args.recipes} --ratio {args.ratio:g} "
        f"--budget_s {args.budget_s:g} --n_train {args.n_train} --seeds {args.seeds} --out_dir {args.out_dir}",
        "```",
        "",
        f"- **Data**: {split.dataset}, training split only ({split.name}), {args.ratio:.0%} of the objects kept "
        f"(S: the run's seed): {data_words(split)} (dense labels, never trained on).",
        "- **Thresholds** on the network's calibrated head probability: 0.5 (the network's own threshold, as "
        "shipped: calibrated by the label frequency for a positive-unlabeled head, the plain 0.5 of a supervised "
        "one); the best pixel F1 on the scored images (chosen with their dense labels: a reference, not a method); "
        f"Lee & Liu's `recall^2 / P(g > t)` on the first {args.n_train} *training* images, recall over "
        f"the annotated objects the run trained on (what a user has)"
        + (
            "; Otsu's threshold of each scored image's own head probabilities (`--foreground_threshold otsu`, "
            "retired: cached rows only)."
            if any(r.get("otsu") for r in rows)
            else "."
        ),
        f"- **Machine**: {m.get('cpu')}, {m.get('nproc')} cores, torch {m.get('torch')}, no GPU; training runs 1 "
        f"thread each, two side by side ({min(its)}-{max(its)} iterations in the budget: pairs ran at different "
        f"speeds); this study {args.threads} threads, nothing else running.",
        "",
        *table(rows),
        "",
    ]
    print("\n".join(text))
    if args.docs:
        Path(args.docs).write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
