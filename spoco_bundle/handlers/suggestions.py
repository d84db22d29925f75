"""What to outline next: the per-object scores of :class:`~spoco_bundle.postprocessing.ObjectScoresd` written per
image as a ranked CSV and a preview, and the images ranked by their objects (``spoco suggest``, configs/suggest.json).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.utils import convert_to_numpy
from scipy import ndimage

from spoco_bundle.io import split_image_suffix
from spoco_bundle.postprocessing.suggestions import AXES, ranked_table

__all__ = ["SuggestionWriter", "object_table", "draw_suggestions", "read_suggestions"]

# a 2D image up to this size is drawn whole in the preview; a larger one (segmented blockwise) object by object
WHOLE_PREVIEW_PIXELS = 4096 * 4096

logger = logging.getLogger("spoco")


def object_table(labels: np.ndarray, scores: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The scored objects that ``labels`` (``S``, the image's grid) holds, most unsure first, each with its rank,
    centroid and bounding box (``<axis>_min`` / ``<axis>_max``, inclusive) in the image's voxels
    (:func:`~spoco_bundle.postprocessing.suggestions.ranked_table`)."""
    boxes = ndimage.find_objects(labels)
    ids = [r["id"] for r in scores if r["id"] <= len(boxes) and boxes[r["id"] - 1] is not None]
    centres = ndimage.center_of_mass(np.ones(labels.shape, np.uint8), labels, ids) if ids else []
    geometry = {
        k: (c, [s.start for s in boxes[k - 1]], [s.stop - 1 for s in boxes[k - 1]]) for k, c in zip(ids, centres)
    }
    return ranked_table(scores, geometry)


def _rgb(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, (1, 99.8))
    return np.repeat(np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)[..., None], 3, axis=-1)


def _outlined(image: np.ndarray, labels: np.ndarray, chosen: Sequence[int]) -> np.ndarray:
    """``image`` as RGB with every object's outline grey and those of ``chosen`` red."""
    from skimage.segmentation import find_boundaries

    rgb = _rgb(image)
    rgb[find_boundaries(labels, mode="inner")] = (0.55, 0.55, 0.55)
    top = np.isin(labels, chosen)
    rgb[find_boundaries(np.where(top, labels, 0), mode="inner") & top] = (1.0, 0.15, 0.15)
    return rgb


def draw_suggestions(image: Any, labels: Any, rows: list[dict[str, Any]], top: int, path: str) -> str:
    """The first ``top`` of ``rows`` drawn for an annotator, written to ``path`` (PNG): a 2D image whole, every
    object outlined in grey and those in red, numbered by rank; a volume (or a 2D image above
    :data:`WHOLE_PREVIEW_PIXELS`) as one panel per object: its crop (a margin of half its size; in 3D the slice
    through its centroid), titled with its rank, id, centroid and score. ``image`` and ``labels`` may be lazy
    arrays (dask, Zarr): only the crops are read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = rows[:top]
    if labels.ndim == 2 and labels.size <= WHOLE_PREVIEW_PIXELS:
        image, labels = np.asarray(image), np.asarray(labels)
        h, w = labels.shape
        fig, ax = plt.subplots(figsize=(min(12, 4 + w / 100), min(12, 4 + h / 100)))
        ax.imshow(_outlined(image, labels, [r["id"] for r in chosen]), interpolation="nearest")
        for r in chosen:
            ax.text(r["centroid_x"], r["centroid_y"], str(r["rank"]), color="yellow", fontsize=9, ha="center")
        ax.set_title(f"{len(rows)} objects; the {len(chosen)} most unsure in red, numbered by rank", fontsize=9)
        ax.axis("off")
        axes = [ax]
    else:
        columns = min(5, max(1, len(chosen)))
        n_rows = max(1, -(-len(chosen) // columns))
        fig, axes_grid = plt.subplots(n_rows, columns, figsize=(3 * columns, 3.2 * n_rows), squeeze=False)
        axes = list(axes_grid.ravel())
        for ax, r in zip(axes, chosen):
            my, mx = (r["y_max"] - r["y_min"]) // 2 + 4, (r["x_max"] - r["x_min"]) // 2 + 4
            crop = (
                slice(max(0, r["y_min"] - my), r["y_max"] + my + 1),
                slice(max(0, r["x_min"] - mx), r["x_max"] + mx + 1),
            )
            where = f"y {r['centroid_y']:.0f}, x {r['centroid_x']:.0f}"
            if labels.ndim == 3:
                z = int(round(r["centroid_z"]))
                crop, where = (z, *crop), f"z {z}, {where}"
            ax.imshow(_outlined(np.asarray(image[crop]), np.asarray(labels[crop]), [r["id"]]), interpolation="nearest")
            ax.set_title(f"#{r['rank']}: id {r['id']}, score {r['score']:.2f}\n{where}", fontsize=8)
        for ax in axes:
            ax.axis("off")
    fig.tight_layout()
    tmp = f"{path}.part.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _write_csv(path: str, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    tmp = f"{path}.part"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)  # never a half-written table


def read_suggestions(path: str | os.PathLike) -> list[dict[str, int | float]]:
    """The rows of a ``<stem>_suggestions.csv`` (:class:`SuggestionWriter`), most unsure first: ``rank``, ``id`` and
    ``voxels`` as int, the scores, centroid and bounding box as float."""
    with open(path, newline="") as f:
        return [
            {k: int(float(v)) if k in ("rank", "id", "voxels") else float(v) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


class SuggestionWriter:
    """
    Writes the object scores of each segmented image (under ``scores_key`` in the evaluator's output, from
    :class:`~spoco_bundle.postprocessing.ObjectScoresd`) beside its labels: ``<stem>_suggestions.csv`` (every
    object, most unsure first: rank, id, score and its parts, voxels, centroid, bounding box in the image's voxels)
    and ``<stem>_suggestions.png`` (the ``top`` objects outlined and numbered); when the run completes,
    ``suggestions.csv`` in the output folder ranks the images by the mean score of their ``top`` most unsure objects
    (the image to annotate next first). For a volume segmented blockwise the evaluator hands over the finished
    table instead (each object scored over all the blocks it spans) with the image and labels as lazy arrays
    (``image_volume``, ``labels_volume``), of which the preview reads only the crops it draws.

    Args:
        top: objects per image in the preview and in the image's rank.
        scores_key: where the chain put the scores.
        table_key: where the evaluator puts a blockwise run's table.
    """

    def __init__(self, top: int = 10, scores_key: str = "object_scores", table_key: str = "object_table") -> None:
        if int(top) < 1:
            raise ValueError(f"top must be a positive number of objects, got {top!r}.")
        self.top = int(top)
        self.scores_key, self.table_key = scores_key, table_key
        self.images: list[dict[str, Any]] = []
        self.folder: str | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._write_ranking)

    def _reset(self, engine: Any) -> None:
        self.images, self.folder = [], None

    def __call__(self, engine: Any) -> None:
        # MONAI's evaluators decollate the batch (one item per image; the bundle's inference has one per batch)
        batch, output = engine.state.batch, engine.state.output
        batch = batch[0] if isinstance(batch, list) else {k: v[0] for k, v in batch.items()}
        path, out_path = str(batch["path"]), str(batch["output"])
        item = output[0] if isinstance(output, list) and output else {}
        if self.table_key in item:  # segmented blockwise: the table made from the blocks, the volumes read lazily
            rows, image, labels = item[self.table_key], item["image_volume"], item["labels_volume"]
        elif self.scores_key in item:
            labels = np.asarray(convert_to_numpy(item["pred"]))[0].astype(np.int32)
            image = np.asarray(convert_to_numpy(batch["image"]))[0].astype(np.float32)
            rows = object_table(labels, item[self.scores_key])
        else:  # a failed or constant image
            return
        folder = os.path.dirname(out_path)
        stem = split_image_suffix(os.path.basename(out_path))[0]
        stem = stem[: -len("_instances")] if stem.endswith("_instances") else stem
        axes = AXES[labels.ndim]
        columns = ["rank", "id", "score", "head_uncertainty", "embedding_spread", "voxels"]
        columns += [f"centroid_{a}" for a in axes] + [f"{a}_{end}" for a in axes for end in ("min", "max")]
        _write_csv(os.path.join(folder, f"{stem}_suggestions.csv"), rows, columns)
        if image.shape == labels.shape:
            draw_suggestions(image, labels, rows, self.top, os.path.join(folder, f"{stem}_suggestions.png"))
        top = rows[: self.top]
        self.folder = folder
        self.images.append(
            {
                "image": path,
                "objects": len(rows),
                "image_score": round(float(np.mean([r["score"] for r in top])), 4) if top else 0.0,
                "most_unsure_id": top[0]["id"] if top else "",
                "most_unsure_score": round(top[0]["score"], 4) if top else "",
            }
        )
        if top:
            logger.info(f"{path}: most unsure object {top[0]['id']} (score {top[0]['score']:.2f})")

    def _write_ranking(self, engine: Any) -> None:
        if not self.images or not self.folder:
            return
        ranked = sorted(self.images, key=lambda r: -r["image_score"])
        for i, r in enumerate(ranked, start=1):
            r["rank"] = i
        path = os.path.join(self.folder, "suggestions.csv")
        _write_csv(path, ranked, ["rank", "image", "image_score", "objects", "most_unsure_id", "most_unsure_score"])
        logger.info(f"suggestions: {path} (images, the one to annotate next first)")
