"""Stitching of per-block instance labels: objects of neighbouring blocks that cover the same voxels of their shared
overlap (IoU) become one object, and every object gets one id, unique and consecutive over the whole volume."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

__all__ = ["match_overlap", "merge_ids", "offsets"]


def match_overlap(a: np.ndarray, b: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """
    The pairs of objects that are the same object seen by two blocks: ``a`` and ``b`` are the two blocks' labels over
    the same voxels (their overlap); object ``i`` of ``a`` and ``j`` of ``b`` match when their IoU within the overlap
    is above ``iou_threshold``. Above 0.5 an object matches at most one other (no chains through the overlap).

    Args:
        a, b: non-negative integer labels of the same shape (0 = background, never matched).
        iou_threshold: in [0, 1).

    Returns:
        ``(n, 2)`` int64 array of ``(label in a, label in b)``.
    """
    if a.shape != b.shape:
        raise ValueError(f"the two blocks' overlaps differ in shape: {a.shape} and {b.shape}.")
    if not 0 <= iou_threshold < 1:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold!r}.")
    a, b = a.reshape(-1).astype(np.int64), b.reshape(-1).astype(np.int64)
    if a.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if min(a.min(), b.min()) < 0:
        raise ValueError("labels must be non-negative (0 = background).")
    # compact ids (a block's own ids are small already): object sizes by bincount, one int64 key per (a, b) pair
    # (a 1-D unique, sorted by a then b; np.unique(axis=0) on pairs is several times slower)
    ids_a, a = np.unique(a, return_inverse=True) if a.max() > (1 << 24) else (None, a)
    ids_b, b = np.unique(b, return_inverse=True) if b.max() > (1 << 24) else (None, b)
    a, b = a.reshape(-1), b.reshape(-1)
    zero_a = 0 if ids_a is None else int(np.searchsorted(ids_a, 0)) if ids_a[0] == 0 else -1
    zero_b = 0 if ids_b is None else int(np.searchsorted(ids_b, 0)) if ids_b[0] == 0 else -1
    both = (a != zero_a) & (b != zero_b)
    if not both.any():
        return np.zeros((0, 2), dtype=np.int64)
    size_a, size_b = np.bincount(a), np.bincount(b)
    base = len(size_b)
    keys, n = np.unique(a[both] * base + b[both], return_counts=True)
    pairs = np.stack([keys // base, keys % base], axis=1)
    union = size_a[pairs[:, 0]] + size_b[pairs[:, 1]] - n
    if ids_a is not None:
        pairs[:, 0] = ids_a[pairs[:, 0]]
    if ids_b is not None:
        pairs[:, 1] = ids_b[pairs[:, 1]]
    keep = n / union > iou_threshold  # IoU within the overlap
    return pairs[keep].reshape(-1, 2)


def merge_ids(n_ids: int, pairs: np.ndarray, sizes: np.ndarray, min_size: int = 0) -> tuple[np.ndarray, int]:
    """
    One id per group of matched objects: ``pairs`` (global ids 1..n_ids of matched objects) join groups (union-find
    as connected components of the match graph); groups of no voxels (ids seen only in a halo) or smaller than
    ``min_size`` voxels (``sizes``: voxels per global id in the blocks' cores, index 0 unused) are dropped; the
    others are numbered 1..m in the order of their smallest id (block order: the ids read like a raster scan of the
    blocks).

    Returns:
        ``(lut, m)``: ``lut[global id]`` -> final id (``lut[0] = 0``, dropped groups -> 0), int64 of length
        ``n_ids + 1``; ``m`` the number of objects.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    graph = sparse.coo_matrix(
        (np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n_ids + 1, n_ids + 1)
    )
    _, group = connected_components(graph, directed=False)
    # group numbers in order of each group's smallest member (connected_components numbers by first visit, which is
    # that order too, but say it rather than rely on it)
    first = np.full(group.max() + 1, n_ids + 1, dtype=np.int64)
    np.minimum.at(first, group, np.arange(n_ids + 1))
    keep = np.ones(len(first), dtype=bool)
    keep[group[0]] = False  # background
    total = np.bincount(group, weights=np.asarray(sizes, dtype=np.float64), minlength=len(first))
    keep &= total >= max(1, min_size)
    order = np.argsort(first, kind="stable")
    final = np.zeros(len(first), dtype=np.int64)
    kept = order[keep[order]]
    final[kept] = np.arange(1, len(kept) + 1)
    return final[group], int(len(kept))


def offsets(counts: Sequence[int]) -> np.ndarray:
    """Where each block's local ids start in the global numbering: block ``b``'s id ``i`` is ``offsets[b] + i``."""
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))[:-1]])
