"""Instance segmentation metrics between integer label images.

All functions take a ground truth ``gt`` and a segmentation ``seg`` of the same shape (2D or 3D, any integer
dtype, ids need not be consecutive). Label 0 is background. Negative ids (our ``-1`` = annotated background) are
treated as background too, so a target tensor can be passed as it is.

Everything is computed from one sparse contingency table (pairs of ids counted with ``np.bincount`` or
``np.unique``), so a 100^3 volume with a few hundred objects takes well under a second.

Conventions (the ones of the trusted references, checked in ``tests/test_metrics.py``):

- AP at IoU threshold ``t`` (the DSB 2018 "average precision", also called accuracy):
  ``TP / (TP + FP + FN)``. A pair (gt object, seg object) may match when ``IoU >= t``, exactly as
  ``stardist.matching.matching`` and ``elf.evaluation.matching`` do (the DSB text says "above", which differs
  only for exact ties). The matching is one-to-one and maximises the number of matches, which is what stardist's
  ``linear_sum_assignment`` with costs ``-(IoU >= t) - IoU / (2 n)`` maximises first. For ``t > 0.5`` a match is
  unique anyway (two objects of one image cannot both overlap an object by more than half of the union); for
  lower thresholds we use a maximum bipartite matching (Hopcroft-Karp, ``scipy.sparse.csgraph``) on the sparse
  graph of pairs with ``IoU >= t``, which gives the same TP count without a dense cost matrix.
  When both images have no objects, AP is 1 (nothing to find, nothing false); stardist returns 0 there.
- SBD (CVPPP): ``min(BD(gt, seg), BD(seg, gt))``, ``BD(A, B)`` = mean over objects ``a`` of ``A`` of the best
  Dice of ``a`` with an object of ``B``; label 0 ignored. No smoothing term (the SPOCO reference adds +1 to
  numerator and denominator, which inflates the Dice of small objects). 1 when both are empty, 0 when only one is.
- Adapted Rand error (ARAND) as ``skimage.metrics.adapted_rand_error`` (pairs of distinct voxels,
  ``1 - 2 sum n_ij^2 / (sum a_i^2 + sum b_j^2)`` with each sum reduced by N). python-elf's ``rand_index`` uses the
  same formula without the ``- N`` terms (differs by O(1/N)).
- Variation of information ``(split, merge) = (H(seg | gt), H(gt | seg))`` in bits, as
  ``skimage.metrics.variation_of_information`` and elf's ``variation_of_information`` (log2).
- ARAND / VOI background: by default (``ignore_background=False``) label 0 is one more segment in both images, as
  with elf's defaults, so false detections in the background and missed objects are penalised. With
  ``ignore_background=True`` voxels where ``gt == 0`` are left out (skimage's default for ARAND, the CREMI
  convention for dense neuron labels); seg label 0 then still counts as one segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric
from scipy.sparse.csgraph import maximum_bipartite_matching

__all__ = [
    "DEFAULT_THRESHOLDS",
    "average_precision",
    "ap50",
    "mean_ap",
    "symmetric_best_dice",
    "adapted_rand_error",
    "variation_of_information",
    "segmentation_scores",
    "SCORE_NAMES",
    "InstanceMetric",
    "metric_handlers",
]

SCORE_NAMES = ("ap50", "map", "sbd", "arand", "voi_split", "voi_merge")

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(float(t) for t in np.round(np.arange(0.5, 0.951, 0.05), 2))

# Above this many (gt id, seg id) combinations the pair counts come from np.unique instead of a dense bincount.
_MAX_DENSE_PAIRS = 1 << 25


@dataclass
class _Table:
    """Sparse contingency table of two label images.

    Index 0 of ``gt_sizes`` / ``seg_sizes`` is background (label <= 0); indices 1.. are the objects in the order
    of their ids. ``rows``, ``cols``, ``counts`` list every nonzero cell, background row and column included.
    """

    gt_sizes: np.ndarray
    seg_sizes: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray

    @property
    def n_gt(self) -> int:
        return len(self.gt_sizes) - 1

    @property
    def n_seg(self) -> int:
        return len(self.seg_sizes) - 1

    def object_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cells between two objects (both indices >= 1), background excluded."""
        keep = (self.rows > 0) & (self.cols > 0)
        return self.rows[keep], self.cols[keep], self.counts[keep]


def _to_index(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Map label ids to 0..n (0 = background, objects in id order) without sorting when ids are small."""
    flat = labels.reshape(-1)
    if flat.dtype.kind not in "iub":
        raise ValueError(f"label images must have an integer dtype, got {labels.dtype}.")
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64), 0
    if flat.dtype.kind == "i" and flat.min() < 0:
        flat = np.where(flat < 0, 0, flat)
    top = int(flat.max())
    if top < 2**62 and flat.dtype.kind != "i":
        flat = flat.astype(np.int64)  # bincount refuses uint64
    if top <= 4 * flat.size + 1024:
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = True
        lut = (np.cumsum(present) - 1).astype(np.int64)
        return lut[flat], int(present.sum()) - 1
    # huge ids (e.g. uint64 hashes): sort-based relabelling
    uniq, inv = np.unique(flat, return_inverse=True)
    if uniq[0] != 0:
        inv = inv + 1
        return inv.astype(np.int64), len(uniq)
    return inv.astype(np.int64), len(uniq) - 1


def _contingency(gt: np.ndarray, seg: np.ndarray) -> _Table:
    gt = np.asarray(gt)
    seg = np.asarray(seg)
    if gt.shape != seg.shape:
        raise ValueError(f"gt and seg must have the same shape, got {gt.shape} and {seg.shape}.")
    g, ng = _to_index(gt)
    s, ns = _to_index(seg)
    gt_sizes = np.bincount(g, minlength=ng + 1)
    seg_sizes = np.bincount(s, minlength=ns + 1)
    width = ns + 1
    key = g * width + s
    if (ng + 1) * width <= max(_MAX_DENSE_PAIRS, 4 * key.size):
        dense = np.bincount(key, minlength=(ng + 1) * width)
        cells = np.flatnonzero(dense)
        counts = dense[cells]
    else:
        cells, counts = np.unique(key, return_counts=True)
    return _Table(gt_sizes, seg_sizes, cells // width, cells % width, counts.astype(np.int64))


def _true_positives(table: _Table, thresholds: Sequence[float]) -> np.ndarray:
    rows, cols, inter = table.object_pairs()
    union = table.gt_sizes[rows] + table.seg_sizes[cols] - inter
    iou = inter / union.astype(np.float64)
    tps = np.zeros(len(thresholds), dtype=np.int64)
    for k, t in enumerate(thresholds):
        ok = iou >= t
        if not ok.any():
            continue
        if t > 0.5:
            # IoU > 0.5 can hold for at most one partner on each side, so every such pair is a match.
            tps[k] = int(ok.sum())
            continue
        graph = sp.csr_matrix(
            (np.ones(int(ok.sum()), dtype=np.int8), (rows[ok] - 1, cols[ok] - 1)), shape=(table.n_gt, table.n_seg)
        )
        tps[k] = int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())
    return tps


def _ap_from_table(table: _Table, thresholds: Sequence[float]) -> np.ndarray:
    thresholds = [float(t) for t in thresholds]
    for t in thresholds:
        if not 0.0 < t <= 1.0:
            raise ValueError(f"IoU thresholds must lie in (0, 1], got {t}.")
    if table.n_gt == 0 and table.n_seg == 0:
        return np.ones(len(thresholds), dtype=np.float64)
    tp = _true_positives(table, thresholds)
    fp = table.n_seg - tp
    fn = table.n_gt - tp
    return tp / (tp + fp + fn).astype(np.float64)


def average_precision(
    gt: np.ndarray, seg: np.ndarray, thresholds: Sequence[float] | float = DEFAULT_THRESHOLDS
) -> np.ndarray:
    """DSB-style average precision ``TP / (TP + FP + FN)`` at each IoU threshold.

    Args:
        gt: ground truth label image (2D or 3D integer array), 0 = background.
        seg: predicted label image of the same shape, 0 = background.
        thresholds: IoU threshold(s) in (0, 1]; a pair matches when ``IoU >= t`` (one-to-one, maximum matching).

    Returns:
        float64 array with one AP per threshold.
    """
    if np.isscalar(thresholds):
        thresholds = [float(thresholds)]  # type: ignore[list-item]
    return _ap_from_table(_contingency(gt, seg), thresholds)  # type: ignore[arg-type]


def ap50(gt: np.ndarray, seg: np.ndarray) -> float:
    """AP at IoU 0.5 (see :func:`average_precision`)."""
    return float(average_precision(gt, seg, [0.5])[0])


def mean_ap(gt: np.ndarray, seg: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> float:
    """Mean AP over the IoU thresholds 0.50, 0.55, ..., 0.95 (the DSB 2018 score)."""
    return float(np.mean(average_precision(gt, seg, thresholds)))


def _best_dice(table: _Table) -> tuple[float, float]:
    """(BD(gt, seg), BD(seg, gt))."""
    rows, cols, inter = table.object_pairs()
    dice = 2.0 * inter / (table.gt_sizes[rows] + table.seg_sizes[cols]).astype(np.float64)
    best_gt = np.zeros(table.n_gt + 1)
    best_seg = np.zeros(table.n_seg + 1)
    np.maximum.at(best_gt, rows, dice)
    np.maximum.at(best_seg, cols, dice)
    bd_gt = float(best_gt[1:].mean()) if table.n_gt else 0.0
    bd_seg = float(best_seg[1:].mean()) if table.n_seg else 0.0
    return bd_gt, bd_seg


def _sbd_from_table(table: _Table) -> float:
    if table.n_gt == 0 and table.n_seg == 0:
        return 1.0
    if table.n_gt == 0 or table.n_seg == 0:
        return 0.0
    return min(_best_dice(table))


def symmetric_best_dice(gt: np.ndarray, seg: np.ndarray) -> float:
    """Symmetric best Dice (CVPPP SBD): ``min(BD(gt, seg), BD(seg, gt))``, label 0 ignored.

    Args:
        gt: ground truth label image, 0 = background.
        seg: predicted label image of the same shape, 0 = background.
    """
    return _sbd_from_table(_contingency(gt, seg))


def _restrict(table: _Table, ignore_background: bool) -> tuple[np.ndarray, ...]:
    """Cells (counts, row, col) and marginals (a: gt, b: seg), without the gt background row when asked."""
    counts, rows, cols = table.counts, table.rows, table.cols
    if ignore_background:
        keep = rows > 0
        counts, rows, cols = counts[keep], rows[keep], cols[keep]
    counts = counts.astype(np.float64)
    a = np.bincount(rows, weights=counts, minlength=table.n_gt + 1)
    b = np.bincount(cols, weights=counts, minlength=table.n_seg + 1)
    return counts, rows, cols, a, b


def _arand_from_table(table: _Table, ignore_background: bool) -> float:
    counts, _, _, a, b = _restrict(table, ignore_background)
    n = counts.sum()
    if n <= 1:
        return 0.0
    # pairs of distinct voxels that share a label in both / in gt / in seg (times 2)
    sum_ab = counts @ counts - n
    sum_a = a @ a - n
    sum_b = b @ b - n
    if sum_a + sum_b == 0:
        # every voxel is its own segment in both images: identical partitions
        return 0.0
    return float(1.0 - 2.0 * sum_ab / (sum_a + sum_b))


def _voi_from_table(table: _Table, ignore_background: bool) -> tuple[float, float]:
    counts, rows, cols, a, b = _restrict(table, ignore_background)
    n = counts.sum()
    if n == 0:
        return 0.0, 0.0
    p = counts / n
    # H(seg | gt) = -sum p_ij log(p_ij / p_i), H(gt | seg) = -sum p_ij log(p_ij / p_j)
    split = float(-(p * np.log2(counts / a[rows])).sum())
    merge = float(-(p * np.log2(counts / b[cols])).sum())
    return max(split, 0.0), max(merge, 0.0)


def adapted_rand_error(gt: np.ndarray, seg: np.ndarray, ignore_background: bool = False) -> float:
    """Adapted Rand error, ``1 - F-score`` of same-segment voxel pairs (0 = identical partitions).

    Args:
        gt: ground truth label image.
        seg: predicted label image of the same shape.
        ignore_background: leave out voxels where ``gt == 0`` (skimage's default); by default label 0 is one
            more segment in both images (python-elf's default).
    """
    return _arand_from_table(_contingency(gt, seg), ignore_background)


def variation_of_information(gt: np.ndarray, seg: np.ndarray, ignore_background: bool = False) -> tuple[float, float]:
    """Variation of information split and merge parts in bits: ``(H(seg | gt), H(gt | seg))``.

    Args:
        gt: ground truth label image.
        seg: predicted label image of the same shape.
        ignore_background: leave out voxels where ``gt == 0``; by default label 0 is one more segment.

    Returns:
        ``(split, merge)``: over-segmentation and under-segmentation entropies; their sum is the VOI.
    """
    return _voi_from_table(_contingency(gt, seg), ignore_background)


def segmentation_scores(
    gt: np.ndarray,
    seg: np.ndarray,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    ignore_background: bool = False,
) -> dict[str, float]:
    """All metrics from one contingency table.

    Args:
        gt: ground truth label image (2D or 3D), 0 = background.
        seg: predicted label image of the same shape.
        thresholds: IoU thresholds of the mean AP (must include 0.5 for ``ap50`` to be taken from them).
        ignore_background: passed to ARAND and VOI.

    Returns:
        dict with ``ap50``, ``map`` (mean AP over ``thresholds``), ``sbd``, ``arand``, ``voi_split``, ``voi_merge``.
    """
    table = _contingency(gt, seg)
    thresholds = [float(t) for t in thresholds]
    aps = _ap_from_table(table, thresholds + [0.5])
    split, merge = _voi_from_table(table, ignore_background)
    return {
        "ap50": float(aps[-1]),
        "map": float(np.mean(aps[:-1])),
        "sbd": _sbd_from_table(table),
        "arand": _arand_from_table(table, ignore_background),
        "voi_split": split,
        "voi_merge": merge,
    }


class InstanceMetric(CumulativeIterationMetric):
    """
    One instance-segmentation score per image, as a MONAI metric (use with ``monai.handlers.IgniteMetricHandler``
    so that ``MetricsSaver`` can write per-image values).

    Args:
        name: one of ``"ap50"``, ``"map"``, ``"sbd"``, ``"arand"``, ``"voi_split"``, ``"voi_merge"``.
        ignore_background: passed to ARAND and VOI.

    Shapes:
        ``y_pred``: instance labels ``(B, 1, *S)`` (after clustering); ``y``: ground truth ``(B, 1, *S)`` where
        values <= 0 (unlabeled, annotated background) count as background.
    """

    def __init__(self, name: str = "ap50", ignore_background: bool = False) -> None:
        super().__init__()
        if name not in SCORE_NAMES:
            raise ValueError(f"Unknown metric {name!r}; valid names: {SCORE_NAMES}.")
        self.name = name
        self.ignore_background = ignore_background

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore
        if y is None:
            raise ValueError("InstanceMetric needs ground truth labels.")
        if y_pred.shape != y.shape:
            raise ValueError(f"prediction shape {tuple(y_pred.shape)} != label shape {tuple(y.shape)}.")
        values = []
        for seg, gt in zip(y_pred, y):  # per image: a contingency table each
            seg_np = np.asarray(seg.detach().cpu(), dtype=np.int64)[0]
            gt_np = np.clip(np.asarray(gt.detach().cpu(), dtype=np.int64)[0], 0, None)
            values.append(segmentation_scores(gt_np, seg_np, ignore_background=self.ignore_background)[self.name])
        return torch.tensor(values, dtype=torch.float32).reshape(-1, 1)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError("InstanceMetric: no values to aggregate.")
        return data.float().mean()


def metric_handlers(names: Sequence[str], prefix: str = "val_") -> dict[str, IgniteMetricHandler]:
    """The validation metrics of an evaluator (``key_val_metric`` / ``additional_metrics``): one
    ``IgniteMetricHandler`` of :class:`InstanceMetric` per name, on ``pred`` against ``label``, keeping per-image
    values (``MetricsSaver``), named ``<prefix><name>``."""
    return {
        f"{prefix}{name}": IgniteMetricHandler(
            InstanceMetric(name), output_transform=from_engine(["pred", "label"]), save_details=True
        )
        for name in names
    }
