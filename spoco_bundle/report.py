"""
Score instance predictions against ground truth and draw a preview: what the demo prints after inference.

    python -m spoco_bundle.report --images DIR --labels DIR --predictions DIR [--out DIR]

Pairs ``<stem><ext>`` in ``images``/``labels`` with ``<stem>_instances<ext'>`` in ``predictions``; prints a
metrics table (per image and mean), writes ``metrics.csv`` and ``preview.png`` (image with predicted instance
outlines next to the ground truth outlines; the middle slice of each volume) to ``out``.
"""

from __future__ import annotations

import csv
import os

import fire
import numpy as np

from spoco_bundle.data import image_files
from spoco_bundle.io import read_image, split_image_suffix
from spoco_bundle.metrics import SCORE_NAMES, segmentation_scores

__all__ = ["score_folder", "draw_preview"]


def _pairs(images: str, labels: str, predictions: str) -> list[tuple[str, str, str]]:
    pred_by_stem = {split_image_suffix(os.path.basename(p))[0]: p for p in image_files(predictions)}
    label_by_stem = {split_image_suffix(os.path.basename(p))[0]: p for p in image_files(labels)}
    pairs = []
    for img in image_files(images):
        stem = split_image_suffix(os.path.basename(img))[0]
        pred = pred_by_stem.get(f"{stem}_instances")
        if pred is None or stem not in label_by_stem:
            raise ValueError(f"No prediction {stem}_instances.* in {predictions} or no label {stem}.* in {labels}.")
        pairs.append((img, label_by_stem[stem], pred))
    return pairs


def _outline(labels: np.ndarray) -> np.ndarray:
    edge = np.zeros(labels.shape, bool)
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edge & (labels > 0)


def draw_preview(rows: list[tuple[str, np.ndarray, np.ndarray | None, np.ndarray]], path: str) -> str:
    """rows: (name, image, ground truth or None, prediction) 2D or 3D arrays; draws the middle slice of each, the
    predicted outlines beside the true ones (prediction only where no row has ground truth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 2 if any(gt is not None for _, _, gt, _ in rows) else 1
    fig, axes = plt.subplots(len(rows), columns, figsize=(4 * columns, 4 * len(rows)), squeeze=False)
    for (name, img, gt, pred), panels in zip(rows, axes):
        if img.ndim == 3:
            z = img.shape[0] // 2
            img, pred = img[z], pred[z]
            gt = None if gt is None else gt[z]
        lo, hi = np.percentile(img, (1, 99.8))
        base = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
        layers = [(pred, "prediction", (1.0, 0.2, 0.2)), (gt, "ground truth", (0.2, 1.0, 0.2))][:columns]
        for ax, (lab, title, color) in zip(panels, layers):
            if lab is None:
                ax.axis("off")
                continue
            rgb = np.repeat(base[..., None], 3, axis=-1)
            rgb[_outline(lab)] = color
            ax.imshow(rgb, interpolation="nearest")
            ax.set_title(f"{name}: {title} ({len(np.unique(lab[lab > 0]))} objects in slice)", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def score_folder(images: str, labels: str, predictions: str, out: str | None = None, preview_count: int = 2) -> dict:
    """Score every prediction, print a table, write metrics.csv and preview.png to ``out``; return the means."""
    out = out or predictions
    os.makedirs(out, exist_ok=True)
    rows, previews = [], []
    for img_path, lab_path, pred_path in _pairs(images, labels, predictions):
        gt, _ = read_image(lab_path)
        pred, _ = read_image(pred_path)
        if gt.shape != pred.shape:
            raise ValueError(f"Prediction {pred_path} has shape {pred.shape}, ground truth {lab_path} {gt.shape}.")
        scores = segmentation_scores(gt.astype(np.int64), pred.astype(np.int64))
        name = split_image_suffix(os.path.basename(img_path))[0]
        rows.append(
            {
                "image": name,
                "gt_objects": int(len(np.unique(gt[gt > 0]))),
                "pred_objects": int(len(np.unique(pred[pred > 0]))),
                **scores,
            }
        )
        if len(previews) < preview_count:
            previews.append((name, read_image(img_path)[0].astype(np.float32), gt, pred))
    mean = {k: float(np.mean([r[k] for r in rows])) for k in SCORE_NAMES}
    header = ["image", "gt_objects", "pred_objects", *SCORE_NAMES]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for r in rows + [{"image": "mean", "gt_objects": "", "pred_objects": "", **mean}]:
        print("| " + " | ".join(f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h]) for h in header) + " |")
    with open(os.path.join(out, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    preview = draw_preview(previews, os.path.join(out, "preview.png"))
    print(f"metrics: {os.path.join(out, 'metrics.csv')}  preview: {preview}")
    return mean


if __name__ == "__main__":
    fire.Fire(score_folder, serialize=lambda _: None)
