"""
Reports of the accuracy benchmark, from run records (:mod:`research.records`): a markdown page per grid
(:func:`write_docs`: set-up, annotation protocols, tables per data set, plots, example figures, missing runs) and
its machine-readable summary beside it (:func:`write_summary`: ``X.json`` for ``X.md``), from which
``scripts/sync_docs.py`` builds the README's results table. The summary's keys are read by other scripts; keep them
stable:

- ``command``: the command line the page prints (the one that wrote it, usually with ``--no_run``);
- ``rows``: one per (dataset, split, method, ratio) of the page's grid that has a record, finished or not, sorted by
  data set, split, method (in the page's order) and ratio, each with (:data:`SUMMARY_FIELDS`, ``machine``,
  :data:`SUMMARY_SCORES`):

  - ``dataset``, ``split``, ``method``, ``ratio`` (a float), ``status`` (``ok``, ``failed`` or ``not_run``);
  - the run's settings ``budget_s``, ``clock``, ``threads``, ``device``;
  - ``iterations``, ``kept_digest`` (the kept objects: equal across methods), ``commit``, ``started`` and
    ``machine`` (CPU, cores and GPU in words); None where a run that did not finish has none;
  - the scores the run measured, unrounded, absent where it has none: ``ap50``, ``map``, ``sbd``,
    ``fg_precision``, ``fg_recall``, and for 3D and EM data ``arand``, ``voi_split``, ``voi_merge``.

The summary is written with sorted keys and indent 1, so that a rewrite with the same records is the same file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from research.data import Split, label_counts, partition_scores
from research.records import json_default, reference_words

METHOD_LABELS = {
    "spoco": "SPOCO (ours, full loss)",
    "spoco_no_consistency": "SPOCO without consistency",
    "spoco_no_unlabeled_push": "SPOCO without unlabeled push",
    "spoco_no_instance": "SPOCO without instance (Dice) term",
    "spoco_scribbles": "SPOCO, objects + background scribbles",
    "spoco_mask": "SPOCO, objects only, foreground mask given",
    "spoco_finetuned": "SPOCO fine-tuned from the shipped nuclei2d",
    "spoco_shipped": "shipped nuclei2d as it is (no training)",
    "stardist": "StarDist (from scratch, sparse labels)",
    "classical": "classical (Gauss + Otsu + watershed)",
    "classical_membrane": "classical for boundaries (seeded watershed on the boundary signal)",
}

EXAMPLE_SPLIT = {
    "dsb2018": None,
    "gonuclear": "1135to1136",
    "usiigaci": None,
    "isbi2012": None,
    "plant3d": None,
    "gonuclear2d": "1135to1136",
}  # None: the data set's only split

DATASET_DESCRIPTIONS = {
    "dsb2018": "DSB2018 (2D nuclei, 256x256, fixed split `split.json`: train on the 268 training images, score on the "
    "66 validation images)",
    "gonuclear": "GoNuclear (3D nuclei, two 100^3 crops with anisotropic spacing: train on 1135, test on 1136, and "
    "the other way round)",
    "usiigaci": "Usiigaci (2D phase contrast, 1022x1024 16-bit, migrating cells with long irregular shapes; 16 "
    "training, 4 validation images)",
    "isbi2012": "ISBI 2012 (2D EM, 512x512, densely packed neurite profiles separated by membranes (label 0); slices "
    "0-15 training, 16-19 validation; ARAND / VOI over the ground truth's cells only, as the challenge scores)",
    "plant3d": "plant3d (3D membrane-stained tissue, 64x200x200, every voxel in one of 76 cells: train on x < 100, "
    "test on x >= 100)",
    "gonuclear2d": "GoNuclear 2D slices (every 4th z slice of each GoNuclear volume, 25 images of 100x100 per volume: "
    "train on the slices of 1135, test on those of 1136, and the other way round)",
}


def _current(records: Sequence[dict[str, Any]], ok: dict, dataset: str) -> list[dict[str, Any]]:
    """The records of ``dataset`` made with the checkpoint of the cached run (one of an older checkpoint is stale)."""
    out = []
    for rec in records:
        if rec.get("dataset") != dataset:
            continue
        run = ok.get((dataset, rec["split"], rec["method"], round(rec["ratio"], 4)))
        ckpt_run = rec.get("checkpoint_run")
        if ckpt_run and run is not None and run.get("info", {}).get("work_dir") == ckpt_run:
            out.append(rec)
    return out


def _scale_lines(scale_records: Sequence[dict[str, Any]], ok: dict, dataset: str) -> list[str]:
    lines = []
    for rec in _current(scale_records, ok, dataset):
        matched = any("matched" in r for r in rec["rows"])
        auto = any("auto" in r for r in rec["rows"])
        columns = []
        if matched:
            columns.append(
                "with the matching `--image_scale 1/factor` (for a user who knows the magnification; the factor in "
                "brackets)"
            )
        if auto:
            source = {"recorded": "recorded in the model", "computed": "computed from the run's training images"}
            columns.append(
                "with `--image_scale auto` (the default: the factor is found per image from its blob size and the "
                f"training images' range, {source.get(rec.get('blob_scales_source'), 'of the training images')}; "
                "median factor found in brackets)"
            )
        lines += [
            f"Scale robustness ({rec['method']}, {rec['ratio']:.0%} labelled, `python -m research.scale`): the "
            f"{rec['n_test']} held-back images and their labels resampled by each factor (image linear, labels "
            "nearest), segmented by the same model with `--image_scale 1`"
            + ("; then " + "; and ".join(columns) if columns else "")
            + ", scored on the same resampled labels:",
            "",
            "| scale | AP50 | mAP | SBD |"
            + (" AP50 with `--image_scale` |" if matched else "")
            + (" AP50 with `--image_scale auto` |" if auto else ""),
            "|---|---|---|---|" + ("---|" if matched else "") + ("---|" if auto else ""),
        ]
        for r in rec["rows"]:
            row = f"| {r['scale']:g} | {r['ap50']:.3f} | {r['map']:.3f} | {r['sbd']:.3f} |"
            if matched:
                m = r.get("matched")
                row += f" {m['ap50']:.3f} ({m['image_scale']:.3g}) |" if m else " (same) |"
            if auto:
                a = r.get("auto")
                found = a.get("found_median") if a else None
                row += f" {a['ap50']:.3f} ({_fmt(found)}) |" if a else " - |"
            lines.append(row)
        autos = [r["auto"] for r in rec["rows"] if "rule" in r.get("auto", {})]
        runs = sorted({(a["rule"], a["commit"]) for a in autos})
        if runs:
            # records from before the flag: as session 48's, whose column was segmented again (--auto_only)
            again = any(a.get("auto_only", True) for a in autos)
            lines += [
                "",
                "`auto` column: "
                + "; ".join(f"rule `{rule}` at commit {commit}" for rule, commit in runs)
                + (
                    " (`python -m research.scale --auto_only`: only that column segmented again, same model)."
                    if again
                    else "."
                ),
            ]
        lines.append("")
    return lines


def _foreground_lines(fg_records: Sequence[dict[str, Any]], ok: dict, dataset: str) -> list[str]:
    lines = []
    for rec in _current(fg_records, ok, dataset):
        px = rec["pixel"]
        lines += [
            f"Error breakdown ({rec['method']}, {rec['split']}, {rec['ratio']:.0%} labelled, "
            f"`python -m research.foreground`): the same model's embeddings clustered (`fast`, no shape split, "
            f"unless a table says otherwise) with other foreground masks on the {rec['n_test']} held-back images. "
            f"The head's pixels against the true foreground: precision {px['precision']:.2f}, "
            f"recall {px['recall']:.2f}, predicted / true area {px['area_ratio']:.2f}.",
            "",
            "| foreground mask | AP50 | mAP | SBD |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['description'].replace(' (default)', '')} | {r['ap50']:.3f} | {r['map']:.3f} | {r['sbd']:.3f} |"
            for r in rec["masks"]
        ]
        if rec.get("objects"):
            lines += [
                "",
                "Where the true objects go (judged by the predicted object that overlaps each most): matched (IoU > "
                "0.5), missed (less than half predicted foreground), merged (that predicted object also holds half "
                "of another true object), other (split, or badly delineated); for the merged pairs, the median "
                "distance between the two objects' embedding means (the push term asks for at least 2 delta_d = 4) "
                "and the share of pairs that touch:",
                "",
                "| foreground mask | true objects | matched | missed | merged | other | merged pairs: distance "
                "| touching |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in rec["objects"]:
                lines.append(
                    f"| {r['description'].replace(' (default)', '')} | {r['n_gt']} | {r['matched']} | {r['missed']} | "
                    f"{r['merged']} | "
                    f"{r['other']} | {_fmt(r['merged_distance_median'], 2)} | {_fmt(r['merged_touching_share'], 2)} |"
                )
        if len(rec.get("clusterings", [])) > 1:
            lines += ["", "| clustering (`--clustering`, head mask) | AP50 | mAP | SBD |", "|---|---|---|---|"]
            lines += [
                f"| {r['method']} | {r['ap50']:.3f} | {r['map']:.3f} | {r['sbd']:.3f} |" for r in rec["clusterings"]
            ]
        if rec.get("shape_split"):
            lines += [
                "",
                "Touching objects split by shape (`--shape_split`, `spoco_bundle.clustering.split_by_shape`) after "
                "each clustering, and, as references without embeddings, the connected components of the mask:",
                "",
                "| foreground mask | clustering | AP50 | mAP | SBD |",
                "|---|---|---|---|---|",
            ]
            names = {"head": "head", "truth": "truth (oracle)"}
            lines += [
                f"| {names.get(r['mask'], r['mask'])} | {r['method'].replace('components', 'connected components')} "
                f"| {r['ap50']:.3f} | {r['map']:.3f} | {r['sbd']:.3f} |"
                for r in rec["shape_split"]
            ]
        lines += ["", "| head threshold | AP50 | mAP |", "|---|---|---|"]
        lines += [f"| {r['threshold']:g} | {r['ap50']:.3f} | {r['map']:.3f} |" for r in rec["thresholds"]]
        lines.append("")
    return lines


# ------------------------------------------------------------------------------------------------ docs


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _train_cpu(rec: dict[str, Any]) -> float | None:
    """Training CPU seconds of a run (the SPOCO runner reports them in ``info.train_cpu_s``)."""
    value = rec.get("train_cpu_seconds")
    return value if value is not None else (rec.get("info") or {}).get("train_cpu_s")


def _budget(rec: dict[str, Any]) -> str:
    return f"{rec.get('budget_s', 0):.0f} s {rec.get('clock', 'wall')}, {rec.get('threads', '?')} thr"


def _short(commit: str | None) -> str:
    if not commit:
        return "-"
    return commit[:7] + ("+dirty" if commit.endswith("+dirty") else "")


def _clustering(rec: dict[str, Any]) -> str:
    """The clustering of a SPOCO run's predictions (runs before it was recorded used ``fast``); '-' for others."""
    if "clustering" in rec:
        return str(rec["clustering"])
    if not str(rec.get("method", "")).startswith("spoco"):
        return "-"
    return str(rec.get("info", {}).get("clustering", "fast"))


def _commit_cell(rec: dict[str, Any]) -> str:
    """The commit that trained; after ``--repredict`` also the one that predicted."""
    cell = _short(rec.get("commit"))
    if rec.get("predicted_commit"):
        cell += f", predicted {_short(rec['predicted_commit'])}"
    return cell


def _mean_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over the splits of a data set (3D: both directions) of metrics and times."""
    keys = ("ap50", "map", "sbd", "arand", "voi_split", "voi_merge", "ap50_per_image", "fg_precision", "fg_recall")
    metrics = {
        k: float(np.mean([r["metrics"][k] for r in records])) for k in keys if all(k in r["metrics"] for r in records)
    }
    cpu = [_train_cpu(r) for r in records]
    budgets = {_budget(r) for r in records}
    commits = {_commit_cell(r) for r in records}
    clusterings = {_clustering(r) for r in records}
    return {
        "commit": commits.pop() if len(commits) == 1 else "mixed",
        "clustering": clusterings.pop() if len(clusterings) == 1 else "mixed",
        "metrics": metrics,
        "budget": budgets.pop() if len(budgets) == 1 else "mixed",
        "train_seconds": float(np.mean([r["train_seconds"] for r in records])),
        "train_cpu_seconds": float(np.mean(cpu)) if all(c is not None for c in cpu) else None,
        "iterations": float(np.mean([r["iterations"] for r in records])),
    }


def _table(rows: list[tuple[str, float, dict[str, Any]]], partition: bool) -> list[str]:
    """``partition``: ARAND / VOI columns instead of the per-image AP50 (:func:`partition_scores`)."""
    head = ["method", "labelled", "AP50", "mAP 0.5:0.95", "SBD"]
    if partition:
        head += ["ARAND", "VOI split", "VOI merge"]
    else:
        head += ["AP50 (mean per image)"]
    head += ["fg precision / recall"]
    head += ["budget", "train s (wall)", "train s (CPU)", "iterations", "clustering", "commit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, ratio, rec in rows:
        m = rec["metrics"]
        cells = [METHOD_LABELS.get(method, method), f"{ratio:.0%}", _fmt(m["ap50"]), _fmt(m["map"]), _fmt(m["sbd"])]
        if partition:
            cells += [_fmt(m.get("arand")), _fmt(m.get("voi_split")), _fmt(m.get("voi_merge"))]
        else:
            cells += [_fmt(m.get("ap50_per_image"))]
        cells += [f"{_fmt(m.get('fg_precision'), 2)} / {_fmt(m.get('fg_recall'), 2)}"]
        cpu = rec["train_cpu_seconds"] if "budget" in rec else _train_cpu(rec)
        budget = rec["budget"] if "budget" in rec else _budget(rec)
        cells += [
            budget,
            f"{rec['train_seconds']:.0f}",
            "-" if cpu is None else f"{cpu:.0f}",
            f"{rec['iterations']:.0f}",
            rec["clustering"] if "budget" in rec else _clustering(rec),
            # defaults change between versions: which code ran
            rec["commit"] if "budget" in rec else _commit_cell(rec),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# the annotation protocols of issue 24: (row, method, ratio, targets for dsb2018 and the gonuclear mean)
PROTOCOLS = (
    ("objects only", "spoco", 0.1, {"dsb2018": 0.80, "gonuclear": 0.60}),
    ("objects + background scribbles", "spoco_scribbles", 0.1, {"dsb2018": 0.85, "gonuclear": 0.75}),
    ("objects only, foreground mask given", "spoco_mask", 0.1, {"dsb2018": 0.90, "gonuclear": 0.85}),
    ("all objects labelled", "spoco", 1.0, {"dsb2018": 0.80, "gonuclear": 0.75}),
)


FINETUNE_GAIN_TARGET = 0.10  # issue 19: fine-tuned above the same recipe from scratch by at least this AP50


def _finetune_lines(
    ok: dict, splits: dict[str, list[Split]], methods: Sequence[str], ratios: Sequence[float]
) -> list[str]:
    """The fine-tuning summary: per data set and labelled fraction, AP50 of the shipped model as it is, of the
    bundle trained from scratch and fine-tuned from the shipped model at the same budget (means over a data set's
    splits); empty unless both trainings ran somewhere."""
    if "spoco_finetuned" not in methods or "spoco" not in methods:
        return []
    rows = []
    for d, d_splits in splits.items():
        for ratio in ratios:

            def ap50(method: str, ratio: float = ratio) -> float | None:
                recs = [ok.get((d, s.name, method, round(ratio, 4))) for s in d_splits]
                return None if not recs or None in recs else float(np.mean([r["metrics"]["ap50"] for r in recs]))

            shipped, scratch, tuned = ap50("spoco_shipped"), ap50("spoco"), ap50("spoco_finetuned")
            if scratch is None or tuned is None:
                continue
            gain = tuned - scratch
            met = "met" if gain >= FINETUNE_GAIN_TARGET else "not met"
            rows.append(
                f"| {d} | {ratio:.0%} | {_fmt(shipped)} | {scratch:.3f} | {tuned:.3f} | {gain:+.3f} "
                f"(>= +{FINETUNE_GAIN_TARGET:.2f}: {met}) |"
            )
    if not rows:
        return []
    return [
        "## Fine-tuning from the shipped model",
        "",
        "AP50 on the held-back images of domains the shipped `nuclei2d` (DSB2018 fluorescence nuclei) never saw: the "
        "shipped model as it is (no training, `inference.json` defaults, `--image_scale auto`); the bundle's training "
        "from scratch; the same training started from the shipped weights (`--pretrained nuclei2d`), both with the "
        "same kept objects and budget. A data set with two splits: the mean of both directions.",
        "",
        "| data | labelled | shipped as it is | from scratch | fine-tuned | fine-tuned - scratch (target) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _protocol_lines(ok: dict, splits: dict[str, list[Split]], methods: Sequence[str]) -> list[str]:
    """The summary table of the annotation protocols: AP50 (and the predicted foreground's pixel precision /
    recall) per data set, mean over a data set's splits, next to the targets; empty when no protocol ran."""
    rows = [p for p in PROTOCOLS if p[1] in methods]
    if not any(m != "spoco" for _, m, _, _ in rows):
        return []
    datasets = [d for d in splits if splits[d]]
    head = ["protocol", "labelled"] + [
        c for d in datasets for c in (f"{d} AP50 (target)", f"{d} fg precision / recall")
    ]
    lines = [
        "## Annotation protocols",
        "",
        "What a user gives, each protocol with the bundle's defaults and the same kept objects: *objects only* (some "
        "objects outlined, background unlabeled; the head is trained positive-unlabeled); *objects + background "
        "scribbles* (a few thin strokes on background per image, simulated by `research/recipes/scribbles.py` in the "
        "true background: 4 strokes per image, in 3D on 3 slices, at most 2 % of the background; the overlay "
        "`research/configs/scribbles.json` after `configs/train.json`, `--background_label 65535`; the head stays "
        "positive-unlabeled and the strokes' mean loss is added, "
        "`loss#foreground_strokes`); *foreground mask given* (the objects-only model, its embeddings clustered "
        "inside the true foreground, passed per image with `--foreground_mask_dir`). AP50 of a data set with two "
        "splits is the mean of both directions; 'fg precision / recall': pixels of the predicted objects against "
        "the true foreground, pooled over the test images (the mean of the splits' values).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for label, method, ratio, targets in rows:
        cells = [label, f"{ratio:.0%}"]
        for d in datasets:
            recs = [ok.get((d, s.name, method, round(ratio, 4))) for s in splits[d]]
            target = targets.get(d)
            if any(r is None for r in recs):
                cells += [f"not run (>= {target:.2f})" if target is not None else "not run", "-"]
                continue
            m = [r["metrics"] for r in recs]  # type: ignore[index]
            ap50 = float(np.mean([x["ap50"] for x in m]))
            prec = [x.get("fg_precision") for x in m]
            rec = [x.get("fg_recall") for x in m]
            pr = f"{np.mean(prec):.2f} / {np.mean(rec):.2f}" if all(v is not None for v in prec + rec) else "- / -"
            per_split = " (" + ", ".join(f"{x['ap50']:.3f}" for x in m) + ")" if len(m) > 1 else ""
            goal = f" (>= {target:.2f}{', met' if ap50 >= target else ''})" if target is not None else ""
            cells += [f"{ap50:.3f}{per_split}{goal}", pr]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _colorize(labels: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Image in gray with each object in a pseudo-random colour (id-hashed, so the same id keeps its colour)."""
    rgb = np.repeat(base[..., None], 3, axis=-1).astype(np.float32)
    ids = labels.astype(np.int64)
    if ids.max() > 0:
        rng = np.random.default_rng(12345)
        palette = rng.uniform(0.25, 1.0, size=(int(ids.max()) + 1, 3)).astype(np.float32)
        fg = ids > 0
        rgb[fg] = 0.35 * rgb[fg] + 0.65 * palette[ids[fg]]
    return rgb


def _plot_curves(dataset: str, by_method: dict[str, dict[float, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in zip(axes, ("ap50", "map"), ("AP50", "mean AP (IoU 0.50:0.95)")):
        for method, per_ratio in by_method.items():
            ratios = sorted(per_ratio)
            ax.plot(
                [100 * r for r in ratios],
                [per_ratio[r]["metrics"][key] for r in ratios],
                marker="o",
                label=METHOD_LABELS.get(method, method),
                linestyle="--" if method.startswith("spoco_") else "-",
            )
        ax.set_xlabel("labelled objects per training image (%)")
        ax.set_ylabel(title)
        ax.set_ylim(0, 1)
        ax.set_xlim(0, 105)
        ax.grid(alpha=0.3)
        ax.set_title(
            f"{dataset}: {title}" + (" (mean, both directions)" if dataset in ("gonuclear", "gonuclear2d") else ""),
            fontsize=10,
        )
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _example_item(split: Split) -> int:
    """Test image shown in the example figure: the one with the median object count (deterministic)."""
    counts = [len(np.unique(it.labels)) - 1 for it in split.test]
    return int(np.argsort(counts, kind="stable")[len(counts) // 2])


def _plot_examples(split: Split, runs: dict[str, dict[str, Any]], path: Path) -> str | None:
    """Image, ground truth and each method's prediction (ratio 0.1 runs) for one test image (3D: central z)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = _example_item(split)
    item = split.test[idx]
    preds = {}
    for method, rec in runs.items():
        npz = Path(rec["_path"]).with_suffix(".npz")
        if not npz.exists():
            continue
        with np.load(npz) as data:
            if item.name in data:
                preds[method] = (data[item.name], rec["metrics"]["per_image"][idx]["ap50"])
    if not preds:
        return None
    z = item.image.shape[0] // 2 if item.image.ndim == 3 else None
    cut = (lambda a: a[z]) if z is not None else (lambda a: a)
    img = cut(item.image)
    lo, hi = np.percentile(img, (1, 99.8))
    base = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    panels = [("image", np.repeat(base[..., None], 3, -1)), ("ground truth", _colorize(cut(item.labels), base))]
    panels += [
        (f"{METHOD_LABELS.get(m, m)}\nAP50 {ap:.2f} (this image)", _colorize(cut(p), base))
        for m, (p, ap) in preds.items()
    ]
    cols = min(4, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, rgb) in zip(axes.ravel(), panels):
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    where = f"{item.name}" + (f", z = {z} of {item.image.shape[0]}" if z is not None else "")
    fig.suptitle(f"{split.dataset} {split.name}, held-back image {where}; 10 % labelled", fontsize=9)
    fig.tight_layout(h_pad=1.5)  # two-line panel titles must not run into the row above
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return item.name


def _grid_budget(budgets: Sequence[tuple]) -> str:
    """Budget flags of the runs shown (budget, clock, threads, device); the benchmark's defaults when they differ."""
    if len({b[:3] for b in budgets}) == 1:
        budget_s, clock, threads = budgets[0][:3]
        flags = f"--budget_s {budget_s:g} --clock {clock or 'wall'} --threads {threads or 1}"
        devices = {b[3] for b in budgets}
        device = devices.pop() if len(devices) == 1 else None
        return flags + (f" --device {device}" if device not in (None, "cpu") else "")
    return "--budget_s 900 --clock cpu --threads 1"


def _study_overrides(records: Sequence[dict[str, Any]]) -> tuple[str | None, str | None]:
    """The extra ``train.json`` ids (JSON) when every SPOCO run shown set the same ones (else None), and a note
    when they differ between runs (else None)."""
    from research.methods.spoco import study_overrides

    extra = {json.dumps(study_overrides(r), sort_keys=True) for r in records if r["method"].startswith("spoco")}
    if len(extra) > 1:
        return None, "SPOCO runs shown set different extra `train.json` ids (`info.overrides` of their records)."
    only = extra.pop() if extra else "{}"
    return (only if only != "{}" else None), None


def figures_dir(docs_path: str | os.PathLike) -> Path:
    """Where a report's PNGs go: ``research/figures/`` for a page in ``research/pages/`` (``<pages>/../figures``),
    else an ``images/`` folder beside the page."""
    docs_path = Path(docs_path)
    if docs_path.parent.name == "pages":
        return docs_path.parent.parent / "figures"
    return docs_path.parent / "images"


def write_docs(
    records: list[dict[str, Any]],
    docs_path: str | os.PathLike,
    splits: dict[str, list[Split]],
    methods: Sequence[str],
    ratios: Sequence[float],
    command: str,
    data_dir: str,
    skipped_datasets: dict[str, str] | None = None,
    scale_records: Sequence[dict[str, Any]] = (),
    foreground_records: Sequence[dict[str, Any]] = (),
    out_dir: str | None = None,
) -> Path:
    """
    Write the markdown report and its PNGs (in :func:`figures_dir`: ``benchmark_<dataset>*.png`` for
    ``benchmarks.md``, ``<docs stem>_<dataset>*.png`` for any other name, so that two reports do not share plots) from
    run records.

    Args:
        records: from :func:`collect`.
        docs_path: markdown file to write.
        splits: loaded splits per data set (example figures, expected runs).
        methods: methods of the grid (order of the tables).
        ratios: ratios of the grid.
        command: the command line to state.
        data_dir: data folder to state.
        skipped_datasets: data set -> reason, for data sets that were not available.
        scale_records: from :func:`collect_scale`.
        foreground_records: from :func:`collect_foreground`.
        out_dir: results folder to state in the command that runs the grid (None: the default).
    """
    docs_path = Path(docs_path)
    img_dir = figures_dir(docs_path)
    img_prefix = "benchmark" if docs_path.stem == "benchmarks" else docs_path.stem
    ok = {(r["dataset"], r["split"], r["method"], round(r["ratio"], 4)): r for r in records if r.get("status") == "ok"}
    bad = {(r["dataset"], r["split"], r["method"], round(r["ratio"], 4)): r for r in records if r.get("status") != "ok"}
    machines = {
        json.dumps({k: r["machine"].get(k) for k in ("cpu", "nproc", "mem_gib", "torch", "cuda")}, sort_keys=True)
        for r in ok.values()
    }
    budgets = sorted({(r["budget_s"], r.get("clock"), r.get("threads"), r.get("device")) for r in ok.values()})
    study, study_note = _study_overrides(list(ok.values()))
    study_flag = f" --overrides '{study}'" if study else ""
    lines = [
        "# Accuracy benchmark: sparse labels on real microscopy data",
        "",
        "Generated by `python -m research.accuracy` from the cached run results; do not edit by hand.",
        "",
        "```bash",
        command,
        "```",
        "",
        "The grid of this report, every method at every ratio (each run is cached; the command skips finished runs, so "
        "it can be run in pieces):",
        "",
        "```bash",
        "bash research/setup_benchmark.sh   # .venv (project) + .venv-bench (StarDist, TensorFlow CPU)",
        f".venv/bin/python -m research.accuracy --datasets {','.join(splits)} "
        f"--ratios {','.join(f'{r:g}' for r in ratios)} \\",
        f"    --methods {','.join(methods)} {_grid_budget(budgets)}{study_flag}"
        + (f" --out_dir {out_dir}" if out_dir else ""),
        "```",
        "",
        "## Set-up",
        "",
        f"- **Data** (`{data_dir}`, third-party, not in the repository): "
        + "; ".join(DATASET_DESCRIPTIONS[d] for d in splits)
        + ".",
        "- **Sparse labels**: per training image, `spoco_bundle.transforms.SparseInstanceLabel(instance_ratio=r, "
        "background_label=None, seed=0)` keeps `round(r * n)` objects chosen by a hash of (seed, label file name, "
        "object id); every method gets exactly these objects (the kept-object digest is recorded per run and checked "
        "equal across methods below). Unkept objects are 0: *unlabeled* for SPOCO, *background* for StarDist.",
    ]
    for dataset in splits:
        for split in splits[dataset]:
            counts = ", ".join(
                f"{r:.0%}: {label_counts(split, r, 0)[0]} of {label_counts(split, r, 0)[1]}" for r in ratios
            )
            lines.append(f"  - {dataset} {split.name}: kept objects over the training images ({counts}).")
    lines += [
        "- **Scores** on the held-back images with dense labels (`spoco_bundle.metrics`): AP at IoU t = "
        "TP / (TP + FP + FN), TP/FP/FN *pooled over all test images* before dividing (as "
        "`stardist.matching.matching_dataset`); **AP50** at t = 0.5, **mAP** = mean over t = 0.50, 0.55, ..., 0.95; "
        "**SBD** (symmetric best Dice), and for 3D and EM **ARAND** and **VOI** split/merge (label 0 one more "
        "segment), means over test images. For DSB2018 the per-image mean of AP50 is given too.",
        "- **Budget**: every run trains for the same budget on the same machine; prediction, clustering and "
        "StarDist's threshold optimisation are outside the budget. 'train s (wall)' is the training loop's wall "
        "time, 'train s (CPU)' its process CPU time (all threads), 'iterations' optimisation steps (classical: "
        "parameter sets tried).",
    ]
    for b, clock, threads, device in budgets:
        lines.append(
            f"  - budget {b:.0f} s of {'process CPU' if clock == 'cpu' else 'wall'} time, {threads} "
            f"thread(s), device {device}."
        )
    if study:
        lines.append(f"  - SPOCO runs set extra `train.json` ids (`--overrides`): `{study}`.")
    elif study_note:
        lines.append(f"  - {study_note}")
    subsets = sorted({(r.get("max_train"), r.get("max_test")) for r in ok.values()} - {(None, None)})
    for mt, ms in subsets:
        lines.append(
            f"  - **check runs on a subset**: only the first {mt or 'all'} training and {ms or 'all'} test "
            "images of each split (`--max_train` / `--max_test`); not comparable to full runs."
        )
    lines += ["- **Machine**:"]
    for m in sorted(machines):
        d = json.loads(m)
        gpu = d.get("cuda") or "no GPU"
        lines.append(
            f"  - {d.get('cpu')}, {d.get('nproc')} cores, {d.get('mem_gib')} GiB, torch {d.get('torch')}, " f"{gpu}."
        )
    loads = [r.get("loadavg_start") for r in ok.values() if r.get("loadavg_start") is not None]
    cores = "/".join(sorted({str(r["machine"].get("nproc")) for r in ok.values()}))
    if loads:
        lines.append(
            f"  - 1-minute load average at the start of the runs: {min(loads):.1f} to {max(loads):.1f} "
            f"(on {cores} cores, above {cores} means other jobs shared the CPU and wall times are inflated)."
        )
    if speed := reference_words(list(ok.values())):
        lines.append(f"  - {speed}")
    lines += [
        "- **Methods**:",
        "  - SPOCO: `research/methods/spoco.py`: `monai.bundle run training` with `configs/train.json` "
        "(bundle defaults; background not annotated, so the foreground head is trained positive-unlabeled, or, since "
        "0.24, against a ring of background around the annotated objects where they are at most 80: "
        "research/pages/foreground_ring.md), then "
        "`configs/inference.json` with `--background head` (variants: full loss; without the consistency term; "
        "without the unlabeled push; without the instance (Dice) term; the annotation protocols: with simulated "
        "background scribbles, with the true foreground mask given at inference). The git commit and settings of "
        "each run are in its cached JSON; column 'commit' is the code that ran ('+dirty': with uncommitted changes to "
        "configs/, spoco_bundle/ or research/ (benchmarks/ before the lab moved to research/, scripts/ before "
        "that); the record's commit_note, "
        "where set, says which). 'predicted C': the run's checkpoint segmented the test images again at commit C "
        "(`--repredict`, same trained model, that "
        "commit's inference); 'clustering': the `--clustering` of its predictions.",
        "  - StarDist: `research/methods/stardist_peer.py`, stardist 0.9.2 on TensorFlow 2.15 CPU in `.venv-bench`, "
        "trained from scratch on the sparse labels (2D: 32 rays, grid 2, patch 128, batch 4; 3D: 96 rays, "
        "anisotropic, patch 48x96x96, batch 2), the weights with the lowest validation loss kept (StarDist's default; "
        "validation on held-out training images; runs before 00a8c13 used the last weights), probability/NMS "
        "thresholds optimised on training images only.",
        "  - classical: `research/methods/classical.py`, Gaussian smoothing + Otsu + seeded watershed on the "
        "distance transform, all lengths relative to a per-image object radius estimate; its 3 parameters are chosen "
        "by grid search on the training images scored *only on the kept objects* (the same sparse labels as the "
        "learners).",
        "  - classical for boundaries: `research/methods/membrane.py`, smoothing + seeded watershed on the boundary "
        "signal (seeds: maxima of the distance to the thresholded boundaries; polarity bright/dark, smoothing, "
        "threshold, seed distance and whether boundary pixels stay background chosen by the same kept-object grid "
        "search), the established pipeline for membrane stains and EM.",
        "  - Data sets beyond nuclei use the settings of `research/methods/spoco.py:DATASET_SETTINGS` (the "
        "documented settings for their kind of data, chosen on training images); StarDist gets the same image scale.",
        "",
    ]
    lines += _protocol_lines(ok, splits, methods)
    lines += _finetune_lines(ok, splits, methods, ratios)
    missing: dict[tuple[str, str, str], list[str]] = {}  # (data set, method, reason) -> runs
    for dataset, dsplits in splits.items():
        if not dsplits:
            continue
        dims = dsplits[0].spatial_dims
        lines += [f"## {dataset}", ""]
        by_method: dict[str, dict[float, dict[str, Any]]] = {}
        rows = []
        for method in methods:
            for ratio in ratios:
                recs = [ok.get((dataset, s.name, method, round(ratio, 4))) for s in dsplits]
                for s, rec in zip(dsplits, recs):
                    if rec is None:
                        b = bad.get((dataset, s.name, method, round(ratio, 4)))
                        why = "never run" if b is None else f"{b['status'].replace('_', ' ')}: {b.get('reason', '')}"
                        missing.setdefault((dataset, method, why.splitlines()[0][:200]), []).append(
                            f"{s.name} {ratio:.0%}" if len(dsplits) > 1 else f"{ratio:.0%}"
                        )
                if all(r is not None for r in recs):
                    mean = _mean_record(recs)  # type: ignore[arg-type]
                    rows.append((method, ratio, mean))
                    by_method.setdefault(method, {})[ratio] = mean
        if len(dsplits) > 1:
            lines += ["Mean of both directions:", ""]
        partition = partition_scores(dataset, dims)
        lines += _table(rows, partition) if rows else ["No finished runs yet."]
        lines.append("")
        if len(dsplits) > 1:
            for s in dsplits:
                srows = [
                    (m, r, ok[(dataset, s.name, m, round(r, 4))])
                    for m in methods
                    for r in ratios
                    if (dataset, s.name, m, round(r, 4)) in ok
                ]
                if srows:
                    lines += (
                        [
                            f"{s.name.replace('to', ' -> ')} (train on {s.train[0].name}, test on "
                            f"{s.test[0].name}):",
                            "",
                        ]
                        + _table(srows, partition)
                        + [""]
                    )
        digests = {}
        for (d, sname, m, r), rec in ok.items():
            if d == dataset:
                digests.setdefault((sname, r), set()).add(rec.get("kept_digest"))
        inconsistent = [k for k, v in digests.items() if len(v) > 1]
        lines += _scale_lines(scale_records, ok, dataset)
        lines += _foreground_lines(foreground_records, ok, dataset)
        lines.append(
            "Kept objects identical across methods (digest per split and ratio): "
            + ("yes." if not inconsistent else f"**no** for {inconsistent}.")
        )
        lines.append("")
        if by_method:
            png = img_dir / f"{img_prefix}_{dataset}.png"
            _plot_curves(dataset, by_method, png)
            lines += [f"![{dataset}: AP50 and mAP vs labelled fraction]({os.path.relpath(png, docs_path.parent)})", ""]
        ex_name = EXAMPLE_SPLIT.get(dataset)
        ex_split = next((s for s in dsplits if ex_name is None or s.name == ex_name), None)
        if ex_split is not None:
            runs = {
                m: ok[(dataset, ex_split.name, m, round(0.1, 4))]
                for m in methods
                if (dataset, ex_split.name, m, round(0.1, 4)) in ok
            }
            png = img_dir / f"{img_prefix}_{dataset}_examples.png"
            shown = _plot_examples(ex_split, runs, png) if runs else None
            if shown:
                lines += [
                    f"Example predictions with 10 % of the objects labelled ({ex_split.name}, held-back image "
                    f"`{shown}`{', central z slice' if dims == 3 else ''}; colours are arbitrary per object):",
                    "",
                    f"![{dataset} examples]({os.path.relpath(png, docs_path.parent)})",
                    "",
                ]
    lines += ["## Missing runs", ""]
    lines += [f"- {d} {m} ({', '.join(runs)}): {why}" for (d, m, why), runs in missing.items()]
    lines += [f"- {d}: data set skipped ({reason})" for d, reason in (skipped_datasets or {}).items()]
    if not missing and not skipped_datasets:
        lines.append("None: every run of the grid finished.")
    lines.append("")
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    docs_path.write_text("\n".join(lines))
    write_summary(
        list(ok.values()) + list(bad.values()), docs_path.with_suffix(".json"), command, splits, methods, ratios
    )
    return docs_path


# per run in a report's summary: the record's fields, then its scores (where measured)
SUMMARY_FIELDS = ("dataset", "split", "method", "ratio", "status", "budget_s", "clock", "threads", "device")
SUMMARY_FIELDS += ("iterations", "kept_digest", "commit", "started")
SUMMARY_SCORES = ("ap50", "map", "sbd", "arand", "voi_split", "voi_merge", "fg_precision", "fg_recall")


def write_summary(
    records: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    command: str,
    splits: dict[str, list[Split]],
    methods: Sequence[str],
    ratios: Sequence[float],
) -> Path:
    """
    The machine-readable summary of a report (the keys: see the module docstring). ``scripts/sync_docs.py`` builds
    the README's results table from it, so the front pages copy their numbers from the benchmark.

    Args:
        records: the runs (from :func:`~research.records.collect`); those outside the report's grid are left out.
        path: the JSON file to write (the page's path with ``.json``).
        command: the command line the page prints.
        splits, methods, ratios: the report's grid.
    """
    names = {(d, s.name) for d, ss in splits.items() for s in ss}
    grid_ratios = {round(r, 4) for r in ratios}
    inside = [
        r
        for r in records
        if (r["dataset"], r["split"]) in names and r["method"] in methods and round(r["ratio"], 4) in grid_ratios
    ]
    rows = []
    for r in sorted(inside, key=lambda r: (r["dataset"], r["split"], methods.index(r["method"]), r["ratio"])):
        row = {k: r.get(k) for k in SUMMARY_FIELDS}
        m = r.get("machine") or {}
        row["machine"] = f"{m.get('cpu')}, {m.get('nproc')} cores" + (f", {m['cuda']}" if m.get("cuda") else ", no GPU")
        row.update({k: r["metrics"][k] for k in SUMMARY_SCORES if k in (r.get("metrics") or {})})
        rows.append(row)
    path = Path(path)
    path.write_text(
        json.dumps({"command": command, "rows": rows}, indent=1, sort_keys=True, default=json_default) + "\n"
    )
    return path
