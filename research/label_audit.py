"""
Audit of a data set's ground truth: objects of one repeated size and objects with no contrast, and what a model's
predictions make of them.

A hand-drawn object's area varies; a size that recurs far more often than its neighbours is a stamp (a tool's fixed
brush or disc, a placeholder). Per split this prints the most frequent object areas, and for the modal area and for
all objects the *local contrast*: the object's mean intensity minus the mean of the unlabelled ring 2-4 pixels
around it, in units of that ring's standard deviation (z < 1: not visible above the local noise). With a
benchmark record's predictions (``--predictions``, the ``.npz`` beside an accuracy record) it also counts how many of
those objects a prediction matches (IoU >= 0.5), and the AP50 the predictions score with and without the
modal-size objects in the ground truth (and the predictions that match or cover them). That second figure is
information about the labels, never a score to report instead of AP50.

    .venv/bin/python -m research.label_audit --dataset dsb2018 \
        [--predictions "SPOCO 10 %=eval/s52/protocols/dsb2018/train268_val66/spoco/ratio_0.10.npz,..."] \
        [--docs research/pages/label_audit_dsb2018.md] [--figure research/figures/label_audit_dsb2018.png]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.csgraph import maximum_bipartite_matching

from research.data import default_data_dir, load_benchmark

RING = (2, 4)  # the ring around an object whose intensities are its local background, in pixels


def local_contrast(image: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Per object id: (object mean - ring mean) / ring std, the ring ``RING`` pixels out and unlabelled (nan when the
    ring has under 6 pixels)."""
    out = {}
    pad = RING[1] + 1
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        wide = tuple(slice(max(s.start - pad, 0), s.stop + pad) for s in box)
        mask = labels[wide] == i
        ring = ndimage.binary_dilation(mask, iterations=RING[1]) & ~ndimage.binary_dilation(
            mask, iterations=RING[0] - 1
        )
        ring &= labels[wide] == 0
        values = image[wide]
        out[i] = (
            float((values[mask].mean() - values[ring].mean()) / (values[ring].std() + 1e-6))
            if ring.sum() >= 6
            else np.nan
        )
    return out


def _matches(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matches at IoU >= 0.5, one-to-one (maximum matching, as :func:`spoco_bundle.metrics.average_precision`):
    (matched gt ids, their pred ids, the overlap table gt x pred)."""
    n_g, n_p = int(gt.max()) + 1, int(pred.max()) + 1
    table = np.bincount(gt.ravel().astype(np.int64) * n_p + pred.ravel(), minlength=n_g * n_p).reshape(n_g, n_p)
    area_g, area_p = table.sum(1), table.sum(0)
    iou = table / np.maximum(area_g[:, None] + area_p[None, :] - table, 1)
    iou[0, :] = iou[:, 0] = 0
    match = maximum_bipartite_matching(sparse.csr_matrix(iou >= 0.5), perm_type="column")
    g = np.nonzero(match >= 0)[0]
    return g, match[g], table


def _prediction_row(split, path: str, stamp_area: int) -> str:
    """Matched modal-area / dim objects, AP50, AP50 without the modal-area objects, for one predictions file."""
    with np.load(path) as saved:
        preds = {k: saved[k] for k in saved.files}
    tp = g_n = p_n = tp_x = g_x = p_x = 0
    modal_hit = modal_n = dim_hit = dim_n = 0
    for item in split.test:
        if item.name not in preds:
            raise SystemExit(f"{path} has no prediction for test image {item.name}")
        gt = item.labels.astype(np.int64)
        pred = preds[item.name].astype(np.int64)
        g, p, table = _matches(gt, pred)
        area = np.bincount(gt.ravel(), minlength=table.shape[0])
        ids = np.flatnonzero(area[1:]) + 1
        c = local_contrast(item.image.astype(np.float64), gt)
        stamps = {int(i) for i in ids if area[i] == stamp_area}
        dim = {int(i) for i in ids if c.get(int(i), np.nan) < 1}
        matched = set(g.tolist())
        modal_n, modal_hit = modal_n + len(stamps), modal_hit + len(stamps & matched)
        dim_n, dim_hit = dim_n + len(dim), dim_hit + len(dim & matched)
        present = [j for j in range(1, table.shape[1]) if table[:, j].sum()]
        tp, g_n, p_n = tp + len(g), g_n + len(ids), p_n + len(present)
        # without the stamps: drop them from the ground truth, and the predictions that match one or lie mostly in one
        stamp_pred = {int(pj) for gi, pj in zip(g, p) if gi in stamps}
        stamp_pred |= {j for j in present if max((table[s, j] for s in stamps), default=0) > 0.5 * table[:, j].sum()}
        tp_x += sum(1 for gi in g if gi not in stamps)
        g_x += len(ids) - len(stamps)
        p_x += len(present) - len(stamp_pred)
    return (
        f"{modal_hit} / {modal_n} | {dim_hit} / {dim_n} | {tp / max(g_n + p_n - tp, 1):.3f} | "
        f"{tp_x / max(g_x + p_x - tp_x, 1):.3f}"
    )


def audit(
    dataset: str, data_dir: str | None, predictions: list[tuple[str, str]] | None = None, command: str = ""
) -> str:
    split = load_benchmark(dataset, data_dir)[0]
    lines = [
        f"# Ground-truth audit: {dataset}",
        "",
        "Generated by `python -m research.label_audit` (see its docstring); do not edit by hand.",
        "",
    ]
    if command:
        lines += ["```bash", command, "```", ""]
    stamp_area = modal_area(split)
    rows = []
    for part, items in (("training", split.train), ("test", split.test)):
        areas, z = [], []
        for item in items:
            lab = item.labels.astype(np.int64)
            a = np.bincount(lab.ravel())[1:]
            c = local_contrast(item.image.astype(np.float64), lab)
            areas += [int(a[i - 1]) for i in c]
            z += list(c.values())
        areas, z = np.array(areas), np.array(z)
        top = Counter(areas.tolist()).most_common(3)
        modal = areas == stamp_area
        rows.append(
            f"| {part} ({len(items)} images) | {len(areas)} | {', '.join(f'{a} px: {n}' for a, n in top)} | "
            f"{int(modal.sum())} ({modal.mean():.1%}) | "
            f"{int((modal & (z < 1)).sum())} / {int((modal & (z < 2)).sum())} | "
            f"{int((z < 1).sum())} / {int((z < 2).sum())} |"
        )
    lines += [
        f"Objects of the training split's most frequent area ({stamp_area} px, 'modal') against all objects; local "
        f"contrast z = (object mean - mean of the unlabelled ring {RING[0]}-{RING[1]} px out) / the ring's std.",
        "",
        "| split | objects | most frequent areas | modal-area objects | modal, z < 1 / z < 2 | all, z < 1 / z < 2 |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if predictions:
        lines += [
            "Predictions on the test split (benchmark records' `.npz`):",
            "",
            f"| predictions | modal-area ({stamp_area} px) matched (IoU >= 0.5) | z < 1 matched | AP50 (pooled) | "
            "AP50 without the modal-area objects* |",
            "|---|---|---|---|---|",
        ]
        for name, path in predictions:
            lines.append(f"| {name} (`{path}`) | " + _prediction_row(split, path, stamp_area) + " |")
        lines += [
            "",
            "\\* the modal-area objects left out of the ground truth, and the predictions that match one or lie mostly "
            "(> 50 %) inside one left out too: information about the labels, not a score to report instead of AP50.",
            "",
        ]
    return "\n".join(lines)


def modal_area(split) -> int:
    """The most frequent object area (pixels) of the split's training labels."""
    areas = Counter(int(a) for item in split.train for a in np.bincount(item.labels.ravel().astype(np.int64))[1:] if a)
    return areas.most_common(1)[0][0]


def stamp_figure(dataset: str, data_dir: str | None, path: str, count: int = 24, half: int = 20) -> None:
    """A grid of ``count`` crops (2 ``half`` px wide, each crop's own 1-99.5 % contrast) around the test split's
    objects of the training split's most frequent area, outlined, evenly spread over their local contrast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    split = load_benchmark(dataset, data_dir)[0]
    stamp_area = modal_area(split)
    found = []
    for item in split.test:
        lab = item.labels.astype(np.int64)
        c = local_contrast(item.image.astype(np.float64), lab)
        area = np.bincount(lab.ravel())
        found += [(z, item, i) for i, z in c.items() if area[i] == stamp_area]
    found.sort(key=lambda f: -np.nan_to_num(f[0], nan=-np.inf))
    picks = [found[k] for k in np.linspace(0, len(found) - 1, min(count, len(found))).round().astype(int)]
    cols = 8
    fig, axes = plt.subplots(
        -(-len(picks) // cols), cols, figsize=(2 * cols, 2.1 * -(-len(picks) // cols)), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (z, item, i) in zip(axes.ravel(), picks):
        centre = np.round(ndimage.center_of_mass(item.labels == i)).astype(int)
        box = tuple(slice(max(c - half, 0), c + half) for c in centre)
        crop = item.image[box].astype(np.float64)
        lo, hi = np.percentile(crop, [1, 99.5])
        grey = np.clip((crop - lo) / max(hi - lo, 1e-9), 0, 1)
        rgb = np.dstack([grey] * 3)
        rgb[find_boundaries(item.labels[box] == i)] = (0.1, 1.0, 0.1)
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(f"{item.name[:8]} z={z:.1f}", fontsize=8)
    fig.suptitle(f"{dataset} test objects of {stamp_area} px (green outline), each crop at its own contrast")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def _relative(target: str, docs: str) -> str:
    import os

    return os.path.relpath(target, Path(docs).parent)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="dsb2018")
    p.add_argument("--data_dir", default=str(default_data_dir()))
    p.add_argument(
        "--predictions",
        default="",
        help="comma-separated NAME=PATH of benchmark records' .npz test predictions (a row each)",
    )
    p.add_argument("--docs", default=None, help="also write the report to this markdown file")
    p.add_argument("--figure", default=None, help="also draw crops of the test split's modal-area objects (PNG)")
    args = p.parse_args(argv)
    pairs = [tuple(x.split("=", 1)) for x in args.predictions.split(",") if x]
    if any(len(x) != 2 for x in pairs):
        p.error(f"--predictions wants NAME=PATH pairs, got {args.predictions!r}")
    missing = [path for _, path in pairs if not Path(path).is_file()]
    if missing:
        p.error(f"--predictions: no such file {missing[0]} (a benchmark record's .npz beside its .json)")
    command = ".venv/bin/python -m research.label_audit " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = audit(args.dataset, args.data_dir, pairs, command)
    print(text)
    if args.figure:
        stamp_figure(args.dataset, args.data_dir, args.figure)
        link = Path(args.figure).name if args.docs is None else _relative(args.figure, args.docs)
        text += f"\n![modal-area objects]({link})\n"
    if args.docs:
        Path(args.docs).write_text(text + ("" if text.endswith("\n") else "\n"))


if __name__ == "__main__":
    main()
