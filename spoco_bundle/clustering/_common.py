"""Shared parts of the clustering methods: input checks, the shared post-processing, region merging by mean
embedding and the mean / nearest-mean helpers.

Shared post-processing (every method, in this order; see :mod:`spoco_bundle.clustering`): ``fg_mask``, minimum
object size, background removal, consecutive relabelling.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# the parallel kernels' threads: OpenMP first, as where TBB is missing. Numba would otherwise take TBB whenever the
# process has loaded it (OpenVINO ships it), and TBB's worker pool is not safe across a fork from a non-main thread
# (dask and MONAI Label start processes from threads). NUMBA_THREADING_LAYER(_PRIORITY) in the environment still rules.
if not {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ):
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

BACKGROUND_MODES = ("largest", "none", "auto")

# Voxels per work chunk: small enough that per-channel float32 temporaries stay in cache (measured fastest).
_CHUNK_VOXELS = 1 << 18

# ----------------------------------------------------------------------------------------------- validation


def _check_embeddings(emb: np.ndarray, name: str = "emb") -> np.ndarray:
    """Validate ``(E, *S)`` embeddings and return them as float32 (no copy when already float32)."""
    emb = np.asarray(emb)
    if emb.ndim not in (3, 4):
        raise ValueError(
            f"{name} must have shape (E, H, W) or (E, D, H, W), got {emb.ndim} dims with shape {emb.shape}."
        )
    if emb.dtype.kind != "f":
        raise ValueError(f"{name} must be a floating point array, got {emb.dtype}.")
    if min(emb.shape) == 0:
        raise ValueError(f"{name} must not be empty, got shape {emb.shape}.")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    # min/max propagate NaN and catch inf without a full boolean temporary
    lo, hi = float(emb.min()), float(emb.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return emb


def _check_mask(fg_mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if fg_mask is None:
        return None
    fg_mask = np.asarray(fg_mask)
    if fg_mask.shape != tuple(shape):
        raise ValueError(f"fg_mask must have the spatial shape {tuple(shape)}, got {fg_mask.shape}.")
    return fg_mask.astype(bool, copy=False)


def _check_background(background: str, fg_mask: np.ndarray | None) -> str:
    if background not in BACKGROUND_MODES:
        raise ValueError(f"background must be one of {BACKGROUND_MODES}, got {background!r}.")
    if background == "auto":
        return "none" if fg_mask is not None else "largest"
    return background


# ----------------------------------------------------------------------------------- shared post-processing


def relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    """Map the positive ids of ``labels`` to 1..n (in increasing id order); everything <= 0 becomes 0 (int32)."""
    labels = np.asarray(labels)
    out_shape = labels.shape
    flat = labels.reshape(-1)
    if flat.size == 0:
        return np.zeros(out_shape, dtype=np.int32)
    top = int(flat.max())
    if top <= 0:
        return np.zeros(out_shape, dtype=np.int32)
    if top <= 4 * flat.size + 1024:
        present = np.zeros(top + 1, dtype=bool)
        present[flat[flat > 0]] = True
        lut = np.cumsum(present, dtype=np.int64).astype(np.int32)
        lut[~present] = 0
        return lut[np.maximum(flat, 0)].reshape(out_shape)
    uniq, inv = np.unique(np.maximum(flat, 0), return_inverse=True)
    inv = inv.astype(np.int32)
    if uniq[0] != 0:
        inv += 1
    return inv.reshape(out_shape)


def _label_unseeded(labels: np.ndarray, region: np.ndarray, n: int) -> int:
    """Give each connected part of ``region`` that a seeded watershed left at 0 (it held no seed: a small or uniform
    object) an id of its own after ``n``, in place; returns the new number of ids."""
    rest = region & (labels == 0)
    if rest.any():
        extra, k = ndimage.label(rest)
        labels[rest] = extra[rest] + n
        n += k
    return n


def _apply_lut(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    return lut.astype(np.int32, copy=False)[labels]


def filter_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set objects with fewer than ``min_size`` voxels to 0 (labels stay as they are otherwise).

    Args:
        labels: non-negative integer label array, 0 = background.
        min_size: minimum object size in voxels; 0 or 1 keeps everything.
    """
    labels = np.asarray(labels)
    if min_size <= 1 or labels.size == 0 or labels.max() <= 0:
        return labels
    sizes = np.bincount(labels.reshape(-1))
    lut = np.arange(len(sizes), dtype=np.int64)
    lut[sizes < min_size] = 0
    return lut[labels].astype(labels.dtype, copy=False)


def remove_background(labels: np.ndarray, mode: str = "largest", fg_mask: np.ndarray | None = None) -> np.ndarray:
    """Remove the background from a clustering result.

    Args:
        labels: non-negative integer label array, 0 = background.
        mode: ``"largest"`` sets the largest cluster (by voxel count, among ids > 0) to 0, the SPOCO reference's
            rule for networks without a foreground output; ``"none"`` keeps every cluster.
        fg_mask: optional boolean foreground mask of the same shape; voxels outside it are set to 0 first, so
            "largest" then refers to the largest cluster inside the mask.

    Returns:
        a new label array (same dtype), ids not relabelled.
    """
    if mode not in ("largest", "none"):
        raise ValueError(f"mode must be 'largest' or 'none', got {mode!r}.")
    labels = np.array(labels, copy=True)
    fg_mask = _check_mask(fg_mask, labels.shape)
    if fg_mask is not None:
        labels[~fg_mask] = 0
    if mode == "largest" and labels.size and labels.max() > 0:
        sizes = np.bincount(labels.reshape(-1))
        sizes[0] = 0
        labels[labels == int(np.argmax(sizes))] = 0
    return labels


def _finalize(labels: np.ndarray, min_size: int, background: str, fg_mask: np.ndarray | None) -> np.ndarray:
    """fg mask, size filter, background removal and consecutive relabelling with a single lookup pass."""
    labels = np.asarray(labels)
    if fg_mask is not None:
        labels = np.where(fg_mask, labels, 0)
    if labels.size == 0 or labels.max() <= 0:
        return np.zeros(labels.shape, dtype=np.int32)
    sizes = np.bincount(labels.reshape(-1))
    return _apply_lut(labels, _final_lut(np.arange(len(sizes)), sizes, min_size, background))


def _final_lut(lut: np.ndarray, lab_sizes: np.ndarray, min_size: int, background: str) -> np.ndarray:
    """Compose ``lut`` (label -> component) with size filter, background removal and consecutive ids."""
    m = int(lut.max()) + 1
    w = lab_sizes.astype(np.float64)
    w[0] = 0.0
    comp_sizes = np.bincount(lut, weights=w, minlength=m)
    keep = comp_sizes >= max(int(min_size), 1)
    keep[0] = False
    if background == "largest" and keep.any():
        keep[int(np.argmax(np.where(keep, comp_sizes, -1)))] = False
    new_id = np.cumsum(keep, dtype=np.int64).astype(np.int32)
    new_id[~keep] = 0
    return new_id[lut]


# ------------------------------------------------------------------------------------------- region merging


def _merge_adjacent(lab: np.ndarray, means: np.ndarray, threshold: float, keys: np.ndarray | None = None) -> np.ndarray:
    """Lookup table merging touching labels whose mean embeddings are closer than ``threshold``.

    ``keys``: precomputed ``min * (n + 1) + max`` codes of the touching label pairs (compiled kernel), if any;
    default: :func:`_adjacent_keys`.
    """
    n = len(means) - 1
    keys = _adjacent_keys(lab, n) if keys is None else np.unique(keys)
    return _merge_pairs(keys // (n + 1), keys % (n + 1), means, threshold)


def _adjacent_keys(lab: np.ndarray, n: int) -> np.ndarray:
    """Sorted unique codes ``min * (n + 1) + max`` of touching label pairs (face neighbours, both > 0), int64."""
    keys = []
    for axis in range(lab.ndim):
        if lab.shape[axis] < 2:
            continue
        a = lab[(slice(None),) * axis + (slice(1, None),)]
        b = lab[(slice(None),) * axis + (slice(None, -1),)]
        m = (a != b) & (a > 0) & (b > 0)
        lo = np.minimum(a[m], b[m]).astype(np.int64)
        hi = np.maximum(a[m], b[m]).astype(np.int64)
        keys.append(np.unique(lo * (n + 1) + hi))
    return np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)


def _merge_pairs(i: np.ndarray, j: np.ndarray, means: np.ndarray, threshold: float) -> np.ndarray:
    n = len(means) - 1
    close = np.linalg.norm(means[i] - means[j], axis=1) < threshold
    i, j = i[close], j[close]
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n + 1, n + 1))
    _, comp = connected_components(graph, directed=False)
    # node 0 (unassigned) has no edges, so its component is its own; map it back to 0
    lut = comp.astype(np.int64) + 1
    lut[lut == lut[0]] = 0
    return lut


def _absorb_background(lut: np.ndarray, lab_sizes: np.ndarray, means: np.ndarray, threshold: float) -> np.ndarray:
    """Send components whose mean is close to the largest component's mean into that component.

    Background pockets enclosed by objects are not connected to the main background, so adjacency merging
    cannot join them; they share its embedding though, and would survive "largest" removal as false objects.

    Args:
        lut: label -> component id (0 stays 0).
        lab_sizes: voxel count of every label.
        means: mean embedding of every label (from its seed).
        threshold: maximum distance of a component mean to the background mean.
    """
    m = int(lut.max()) + 1
    w = lab_sizes.astype(np.float64)
    w[0] = 0.0
    comp_sizes = np.bincount(lut, weights=w, minlength=m)
    if m < 3:
        return lut
    bg = int(np.argmax(comp_sizes))
    comp_means = np.stack([np.bincount(lut, weights=w * means[:, c], minlength=m) for c in range(means.shape[1])], 1)
    comp_means /= np.maximum(comp_sizes, 1e-12)[:, None]
    near = np.linalg.norm(comp_means - comp_means[bg], axis=1) < threshold
    near[0] = False
    return np.where(near[lut], bg, lut)


# ---------------------------------------------------------------------------------------- embedding helpers


def _mean_step(n_vox: int, max_samples: int = 1 << 20) -> int:
    """Sampling step for the seed means: 1 up to ``max_samples`` voxels, else a prime (no alignment with rows)."""
    if n_vox <= max_samples:
        return 1
    step = int(n_vox // max_samples) | 1
    while any(step % p == 0 for p in range(3, int(step**0.5) + 1, 2)):
        step += 2
    return step


def _means(flat_labels: np.ndarray, emb_flat: np.ndarray, n: int) -> np.ndarray:
    """Mean embedding of every label 1..n (row 0 unused), shape (n + 1, E) float64.

    On large inputs the means come from every ``step``-th voxel (see ``_mean_step``); labels that got fewer
    than 4 samples are computed from all their voxels.
    """
    e = emb_flat.shape[0]
    step = _mean_step(flat_labels.size)
    sums, counts = _k_means(flat_labels, emb_flat, n, step)
    few = counts < 4
    few[0] = False
    if step > 1 and few.any():
        idx = np.flatnonzero(few[flat_labels])
        lab_f = flat_labels[idx]
        counts[few] = np.bincount(lab_f, minlength=n + 1)[few]
        for c in range(e):
            sums[few, c] = np.bincount(lab_f, weights=emb_flat[c, idx], minlength=n + 1)[few]
    return sums / np.maximum(counts, 1)[:, None]


def assign_to_means(
    emb_flat: np.ndarray, means: np.ndarray, radius: float | None, chunk: int = _CHUNK_VOXELS
) -> np.ndarray:
    """Label each voxel with the index (1-based) of the nearest mean, or 0 if farther than ``radius``.

    Args:
        emb_flat: embeddings ``(E, N)`` float32.
        means: cluster means ``(K, E)``.
        radius: maximum embedding distance to a mean; None assigns every voxel.
        chunk: voxels per matrix product, bounds the ``(chunk, K)`` distance block.

    Returns:
        int32 array ``(N,)`` with values in 0..K.
    """
    n_vox = emb_flat.shape[1]
    out = np.zeros(n_vox, dtype=np.int32)
    if len(means) == 0 or n_vox == 0:
        return out
    mu = np.asarray(means, dtype=np.float32)
    mu_sq = (mu.astype(np.float64) ** 2).sum(1).astype(np.float32)
    r2 = np.inf if radius is None else float(radius) ** 2
    for s in range(0, n_vox, chunk):
        x = np.ascontiguousarray(emb_flat[:, s : s + chunk].T)
        d2 = (x * x).sum(1, keepdims=True) + mu_sq[None, :] - 2.0 * (x @ mu.T)
        best = np.argmin(d2, axis=1)
        ok = d2[np.arange(len(best)), best] < r2
        out[s : s + chunk] = np.where(ok, best + 1, 0)
    return out


# ---------------------------------------------------------------------------------- compiled kernel (numba)
# The loop of ``_means``; tests/_fast_oracle.py holds the numpy reference tests/test_clustering.py checks it against.


def _k_means(lab, emb, n, step):  # pragma: no cover - runs compiled
    e, n_vox = emb.shape
    sums = np.zeros((n + 1, e), dtype=np.float64)
    counts = np.zeros(n + 1, dtype=np.float64)
    for i in range(0, n_vox, step):
        k = lab[i]
        counts[k] += 1.0
        for c in range(e):
            sums[k, c] += emb[c, i]
    return sums, counts


_k_means = numba.njit(cache=True)(_k_means)
