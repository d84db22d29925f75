"""Clustering of pixel embeddings into instance labels.

Every function takes embeddings ``emb`` of shape ``(E, *S)`` (``S`` = ``(H, W)`` or ``(D, H, W)``, any float
dtype, used as float32) and returns an int32 label array of shape ``S``: 0 = background / unassigned,
1..n = instances, consecutive.

Methods:

- :func:`cluster_fast` (default): spatial, linear-time clustering built on the geometry the SPOCO losses train
  for (an object's voxels within ``delta_v`` of its mean, object means at least ``2 delta_d`` apart). Voxels whose
  embedding is within ``2 delta_v`` of every face neighbour are "core" voxels; connected components of core
  voxels are seeds; the remaining voxels (object borders, outliers) are grown into the adjacent seed with the
  nearest mean embedding; touching components with close means are merged. See its docstring for why and for
  the measured speed. Its loops run compiled when numba is installed (optional; a numpy fallback gives the
  same labels, about 2-3 times slower).
- :func:`cluster_watershed`: seeded watershed on the embedding-edge map (largest embedding distance to a face
  neighbour, smoothed), seeds at its h-minima, then touching regions with close means merged (scikit-image). Cuts
  touching objects whose embeddings change smoothly across the border, which ``fast`` links into one.
- :func:`cluster_hdbscan`, :func:`cluster_meanshift`: the reference's methods (hdbscan package,
  ``sklearn.cluster.MeanShift``), on a random subsample of at most ``max_points`` voxels; the other voxels are
  assigned to the nearest cluster mean (see :func:`assign_to_means`).
- :func:`cluster_consistency`: the paper's consistency clustering with a second (EMA teacher) embedding.

Shared post-processing, in this order: ``fg_mask`` (voxels outside are never clustered: set to 0 *before*
clustering, which also makes clustering faster), minimum object size (``min_size`` voxels), background removal
(``background="largest"`` drops the largest remaining cluster, the reference's choice; ``"auto"`` does that only
when no ``fg_mask`` is given), consecutive relabelling.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "CLUSTERING_METHODS",
    "head_threshold",
    "check_foreground_threshold",
    "BACKGROUND_MODES",
    "cluster_embeddings",
    "cluster_fast",
    "cluster_hdbscan",
    "cluster_meanshift",
    "cluster_watershed",
    "cluster_consistency",
    "split_by_shape",
    "assign_to_means",
    "remove_background",
    "filter_small",
    "relabel_consecutive",
]

BACKGROUND_MODES = ("largest", "none", "auto")

# Voxels per work chunk: small enough that per-channel float32 temporaries stay in cache (measured fastest).
_CHUNK_VOXELS = 1 << 18

try:  # optional: compiled kernels for cluster_fast (same results as the numpy code, faster)
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - depends on the environment
    numba = None
    HAVE_NUMBA = False


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


def _threads(num_threads: int | None) -> int:
    if num_threads is not None:
        return max(1, int(num_threads))
    try:
        return max(1, min(4, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return max(1, min(4, os.cpu_count() or 1))


# ------------------------------------------------------------------------------------- shared post-processing


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


# --------------------------------------------------------------------------------------- embedding helpers


def _mean_step(n_vox: int, max_samples: int = 1 << 20) -> int:
    """Sampling step for the seed means: 1 up to ``max_samples`` voxels, else a prime (no alignment with rows)."""
    if n_vox <= max_samples:
        return 1
    step = int(n_vox // max_samples) | 1
    while any(step % p == 0 for p in range(3, int(step**0.5) + 1, 2)):
        step += 2
    return step


def _means(flat_labels: np.ndarray, emb_flat: np.ndarray, n: int, use_numba: bool = False) -> np.ndarray:
    """Mean embedding of every label 1..n (row 0 unused), shape (n + 1, E) float64.

    On large inputs the means come from every ``step``-th voxel (see ``_mean_step``); labels that got fewer
    than 4 samples are computed from all their voxels.
    """
    e = emb_flat.shape[0]
    step = _mean_step(flat_labels.size)
    if use_numba:
        sums, counts = _k_means(flat_labels, emb_flat, n, step)
    else:
        lab_s = flat_labels[::step]
        counts = np.bincount(lab_s, minlength=n + 1).astype(np.float64)
        sums = np.stack([np.bincount(lab_s, weights=emb_flat[c, ::step], minlength=n + 1) for c in range(e)], 1)
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


def _subsample(n_fg: int, max_points: int | None, seed: int) -> np.ndarray | None:
    if max_points is None or n_fg <= max_points:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_fg, size=int(max_points), replace=False))


def _cluster_points(
    emb: np.ndarray,
    fg_mask: np.ndarray | None,
    fit_predict: Callable[[np.ndarray, float], np.ndarray],
    max_points: int | None,
    assign_radius: float | None,
    seed: int,
) -> np.ndarray:
    """Run a point clustering on (a subsample of) the foreground voxels; returns raw labels of shape S.

    ``fit_predict(points (M, E) float32, fraction M / N) -> labels (M,)`` with -1 = noise. When subsampled, the
    voxels that were not in the sample get the nearest cluster mean (computed from the sample) within
    ``assign_radius``; sampled voxels keep the clustering's own label.
    """
    spatial = emb.shape[1:]
    e = emb.shape[0]
    emb_flat = emb.reshape(e, -1)
    fg_idx = np.flatnonzero(fg_mask) if fg_mask is not None else None
    n_fg = emb_flat.shape[1] if fg_idx is None else len(fg_idx)
    out = np.zeros(int(np.prod(spatial)), dtype=np.int32)
    if n_fg == 0:
        return out.reshape(spatial)
    sample = _subsample(n_fg, max_points, seed)
    pos = np.arange(n_fg) if sample is None else sample  # positions within the foreground list
    vox = pos if fg_idx is None else fg_idx[pos]
    points = np.ascontiguousarray(emb_flat[:, vox].T)
    raw = np.asarray(fit_predict(points, len(vox) / n_fg)).astype(np.int64) + 1  # noise -1 -> 0
    if sample is None:
        out[vox] = raw
        return out.reshape(spatial)
    n = int(raw.max())
    if n > 0:
        counts = np.bincount(raw, minlength=n + 1)
        sums = np.stack([np.bincount(raw, weights=points[:, c], minlength=n + 1) for c in range(e)], 1)
        means = sums[1:] / np.maximum(counts[1:], 1)[:, None]
        rest = np.ones(n_fg, dtype=bool)
        rest[sample] = False
        rest_vox = np.flatnonzero(rest) if fg_idx is None else fg_idx[rest]
        for s in range(0, len(rest_vox), _CHUNK_VOXELS):
            v = rest_vox[s : s + _CHUNK_VOXELS]
            out[v] = assign_to_means(emb_flat[:, v], means, assign_radius)
    out[vox] = raw
    return out.reshape(spatial)


# ------------------------------------------------------------------------------------------ fast clustering


def _as_3d(spatial: tuple[int, ...]) -> tuple[int, int, int]:
    """Work shape: 3D stays, 2D (H, W) becomes (H, 1, W) so that the chunked first axis runs over rows."""
    if len(spatial) == 3:
        return tuple(spatial)  # type: ignore[return-value]
    return (spatial[0], 1, spatial[1])


def _core_mask(emb4: np.ndarray, tau2: float, num_threads: int) -> np.ndarray:
    """Voxels whose squared embedding distance to every existing face neighbour is below ``tau2``.

    Chunks of whole slices along the first axis (with a one-slice halo), per-channel float32 accumulation
    (no (E, N) temporaries), chunks in a thread pool (numpy releases the GIL in these loops).
    """
    e, d, h, w = emb4.shape
    out = np.empty((d, h, w), dtype=bool)
    step = max(1, _CHUNK_VOXELS // max(h * w, 1))

    def pair_ok(blk: np.ndarray, axis: int) -> np.ndarray:
        n = blk.shape[axis + 1]
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(1, n), slice(0, n - 1)
        a, b = tuple(a), tuple(b)
        acc = None
        tmp = None
        for c in range(e):
            if acc is None:
                acc = np.subtract(blk[c][a], blk[c][b])
                np.multiply(acc, acc, out=acc)
                tmp = np.empty_like(acc)
            else:
                np.subtract(blk[c][a], blk[c][b], out=tmp)
                np.multiply(tmp, tmp, out=tmp)
                acc += tmp
        return acc < tau2

    def work(z0: int) -> None:
        z1 = min(z0 + step, d)
        lo, hi = max(z0 - 1, 0), min(z1 + 1, d)
        blk = emb4[:, lo:hi]
        ok = np.ones((hi - lo, h, w), dtype=bool)
        for axis, size in enumerate(ok.shape):
            if size < 2:
                continue
            edge = pair_ok(blk, axis)
            a = [slice(None)] * 3
            b = [slice(None)] * 3
            a[axis], b[axis] = slice(1, size), slice(0, size - 1)
            ok[tuple(a)] &= edge
            ok[tuple(b)] &= edge
        out[z0:z1] = ok[z0 - lo : z0 - lo + (z1 - z0)]

    starts = range(0, d, step)
    if num_threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(num_threads) as pool:
            list(pool.map(work, starts))
    else:
        for z0 in starts:
            work(z0)
    return out


class _Padded:
    """Flat-index arithmetic on a label volume padded by one zero voxel along every non-singleton axis."""

    def __init__(self, shape3: tuple[int, int, int]):
        self.shape = shape3
        self.pad = tuple(1 if s > 1 else 0 for s in shape3)
        self.pshape = tuple(s + 2 * p for s, p in zip(shape3, self.pad))
        self.inner = tuple(slice(p, p + s) for s, p in zip(shape3, self.pad))
        pst = (self.pshape[1] * self.pshape[2], self.pshape[2], 1)
        self.offsets = np.array([sgn * pst[a] for a in range(3) if shape3[a] > 1 for sgn in (-1, 1)], dtype=np.int64)
        # what the compiled growth kernel needs to map padded to original flat indices
        self.kernel_geo = np.array(self.pshape[1:] + self.pad + shape3[1:], dtype=np.int64)

    def to_orig(self, p: np.ndarray) -> np.ndarray:
        _, ph, pw = self.pshape
        _, h, w = self.shape
        z = p // (ph * pw) - self.pad[0]
        rem = p % (ph * pw)
        y = rem // pw - self.pad[1]
        x = rem % pw - self.pad[2]
        return (z * h + y) * w + x


def _frontier(plab: np.ndarray, pgrow: np.ndarray, geo: _Padded) -> np.ndarray:
    """Flat padded indices of growable voxels with a labelled face neighbour."""
    labelled = plab.reshape(-1) > 0
    frontier = np.zeros_like(labelled)
    for off in geo.offsets:
        # voxel p is on the frontier if p + off is labelled
        if off > 0:
            frontier[:-off] |= labelled[off:]
        else:
            frontier[-off:] |= labelled[:off]
    frontier &= pgrow.reshape(-1)
    return np.flatnonzero(frontier)


def _grow(
    plab: np.ndarray,
    pgrow: np.ndarray,
    geo: _Padded,
    emb_flat: np.ndarray,
    means: np.ndarray,
    radius2: float,
) -> None:
    """Breadth-first growth of the labels in ``plab`` (padded, modified in place) into ``pgrow`` voxels.

    A growable voxel next to labelled voxels takes the label whose mean embedding is nearest among its
    neighbours' labels, if that distance is below ``sqrt(radius2)`` (``inf``: no limit, and a voxel whose
    neighbours all carry the same label takes it without any embedding arithmetic). Rounds are synchronous and
    only neighbours of voxels labelled in the previous round are examined, so the total work is proportional
    to the number of grown voxels.
    """
    lab_flat = plab.reshape(-1)
    grow_flat = pgrow.reshape(-1)
    mu_t = np.ascontiguousarray(means.T, dtype=np.float64)  # (E, K + 1); float64 like the numba kernel
    offsets = geo.offsets
    limited = bool(np.isfinite(radius2))
    cand = _frontier(plab, pgrow, geo)
    big = np.iinfo(np.int32).max
    while cand.size:
        done_p, done_l = [], []
        for s in range(0, cand.size, _CHUNK_VOXELS):
            p = cand[s : s + _CHUNK_VOXELS]
            nl = lab_flat[p[None, :] + offsets[:, None]]  # (n_dir, m) neighbour labels
            hi = nl.max(0)
            lo = np.where(nl > 0, nl, big).min(0)
            single = (hi > 0) & (lo == hi)
            multi = (hi > 0) & (lo != hi)
            best_lab = np.where(single, hi, 0)
            if limited and single.any():
                ps = np.flatnonzero(single)
                diff = emb_flat[:, geo.to_orig(p[ps])].astype(np.float64) - mu_t[:, hi[ps]]
                far = np.einsum("ij,ij->j", diff, diff) >= radius2
                best_lab[ps[far]] = 0
            if multi.any():
                pm = np.flatnonzero(multi)
                x = emb_flat[:, geo.to_orig(p[pm])].astype(np.float64)
                best_d2 = np.full(pm.size, np.inf)
                lab_m = np.zeros(pm.size, dtype=np.int32)
                for row in nl[:, pm]:
                    has = np.flatnonzero(row > 0)
                    diff = x[:, has] - mu_t[:, row[has]]
                    d2 = np.einsum("ij,ij->j", diff, diff)
                    better = d2 < best_d2[has]
                    best_d2[has[better]] = d2[better]
                    lab_m[has[better]] = row[has[better]]
                lab_m[best_d2 >= radius2] = 0
                best_lab[pm] = lab_m
            ok = best_lab > 0
            done_p.append(p[ok])
            done_l.append(best_lab[ok])
        # synchronous update: labels of this round become visible in the next one
        done = np.concatenate(done_p)
        if done.size == 0:
            break
        lab_flat[done] = np.concatenate(done_l)
        grow_flat[done] = False
        nb = (done[None, :] + offsets[:, None]).reshape(-1)
        nb = nb[grow_flat[nb]]
        cand = np.unique(nb)


def _merge_adjacent(lab: np.ndarray, means: np.ndarray, threshold: float, keys: np.ndarray | None = None) -> np.ndarray:
    """Lookup table merging touching labels whose mean embeddings are closer than ``threshold``.

    ``keys``: precomputed ``min * (n + 1) + max`` codes of the touching label pairs (compiled kernel), if any.
    """
    n = len(means) - 1
    if keys is not None:
        keys = np.unique(keys)
        return _merge_pairs(keys // (n + 1), keys % (n + 1), means, threshold)
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
    keys = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    return _merge_pairs(keys // (n + 1), keys % (n + 1), means, threshold)


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


# ------------------------------------------------------------------------------ compiled kernels (numba)
# Pure loops, compiled only when numba is installed. Each mirrors a numpy function above and gives the same
# result (tests/test_clustering.py checks that), so numba is an accelerator, not a dependency.


def _k_core(emb4, tau2):  # pragma: no cover - runs compiled
    e, d, h, w = emb4.shape
    out = np.ones((d, h, w), dtype=np.bool_)
    for z in numba.prange(d):
        acc = np.empty(w, dtype=np.float32)
        for y in range(h):
            if w > 1:
                acc[:] = 0.0
                for c in range(e):
                    for x in range(w - 1):
                        t = emb4[c, z, y, x + 1] - emb4[c, z, y, x]
                        acc[x] += t * t
                for x in range(w - 1):
                    if acc[x] >= tau2:
                        out[z, y, x] = False
                        out[z, y, x + 1] = False
            if y + 1 < h:
                acc[:] = 0.0
                for c in range(e):
                    for x in range(w):
                        t = emb4[c, z, y + 1, x] - emb4[c, z, y, x]
                        acc[x] += t * t
                for x in range(w):
                    if acc[x] >= tau2:
                        out[z, y, x] = False
                        out[z, y + 1, x] = False
            if z + 1 < d:
                # only stores of False cross into slice z + 1, so concurrent iterations cannot lose an update
                acc[:] = 0.0
                for c in range(e):
                    for x in range(w):
                        t = emb4[c, z + 1, y, x] - emb4[c, z, y, x]
                        acc[x] += t * t
                for x in range(w):
                    if acc[x] >= tau2:
                        out[z, y, x] = False
                        out[z + 1, y, x] = False
    return out


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


def _k_grow(lab, grow, offsets, cand, emb, mu, radius2, geo):  # pragma: no cover - runs compiled
    nd = offsets.size
    limited = radius2 < np.inf
    queued = np.zeros(lab.size, dtype=np.bool_)
    cur = cand
    while cur.size > 0:
        m = cur.size
        res = np.zeros(m, dtype=np.int32)
        for k in range(m):
            p = cur[k]
            first = 0
            single = True
            for j in range(nd):
                lj = lab[p + offsets[j]]
                if lj > 0:
                    if first == 0:
                        first = lj
                    elif lj != first:
                        single = False
            if first == 0:
                continue
            if single and not limited:
                res[k] = first
                continue
            res[k] = _k_nearest(lab, lab, 0, lab.size, p, offsets, emb, _k_orig(p, geo), mu, radius2)
        n_done = 0
        for k in range(m):
            if res[k] > 0:
                lab[cur[k]] = res[k]
                grow[cur[k]] = False
                n_done += 1
        if n_done == 0:
            break
        nxt = np.empty(n_done * nd, dtype=np.int64)
        cnt = 0
        for k in range(m):
            if res[k] > 0:
                for j in range(nd):
                    q = cur[k] + offsets[j]
                    if grow[q] and not queued[q]:
                        queued[q] = True
                        nxt[cnt] = q
                        cnt += 1
        for k in range(cnt):
            queued[nxt[k]] = False
        cur = nxt[:cnt]


def _k_orig(p, geo):  # pragma: no cover - runs compiled
    """Original flat index of padded flat index p."""
    ph, pw, pz, py, px, h, w = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6]
    z = p // (ph * pw) - pz
    rem = p % (ph * pw)
    return ((z * h) + (rem // pw - py)) * w + (rem % pw - px)


def _k_nearest(lab, lab0, lo, hi, p, offsets, emb, o, mu, radius2):  # pragma: no cover - runs compiled
    """Label of p's neighbours whose mean is nearest to emb[:, o] (first neighbour wins ties), 0 if too far.

    Neighbours with flat index in ``[lo, hi)`` are read from ``lab``, the others from ``lab0`` (a sweep block reads
    other blocks from a snapshot; callers without blocks pass ``lab0 = lab``).
    """
    e = emb.shape[0]
    best = np.inf
    best_lab = 0
    for j in range(offsets.size):
        q = p + offsets[j]
        lj = lab[q] if lo <= q < hi else lab0[q]
        # a repeat of the current best cannot be strictly better; other repeats lose again
        if lj <= 0 or lj == best_lab:
            continue
        d2 = 0.0
        for c in range(e):
            t = np.float64(emb[c, o]) - mu[lj, c]
            d2 += t * t
        if d2 < best:
            best = d2
            best_lab = lj
    return best_lab if best < radius2 else 0


def _k_sweep(lab, grow, offsets, emb, mu, radius2, geo):  # pragma: no cover - runs compiled
    """One forward and one backward raster sweep of growth within a finite radius.

    A voxel joins the nearest neighbouring label whose mean is within the radius, immediately, so labels travel
    far in one sweep with sequential memory access. Breadth-first rounds (``_k_grow``) then finish to the
    fixpoint. Blocks of the flat index range run in parallel; a block reads its own voxels live and every other
    voxel from a snapshot taken before the sweep, so the result does not depend on thread timing (where the
    embeddings are ambiguous, i.e. a voxel is within the radius of several neighbouring means, the visiting order
    matters, and this order is fixed).
    """
    n_pad = lab.size
    n_blocks = 64
    lab0 = lab.copy()
    for b in numba.prange(n_blocks):
        lo = n_pad * b // n_blocks
        hi = n_pad * (b + 1) // n_blocks
        for forward in (True, False):
            for k in range(lo, hi):
                p = k if forward else hi - 1 - (k - lo)
                if not grow[p]:
                    continue
                best_lab = _k_nearest(lab, lab0, lo, hi, p, offsets, emb, _k_orig(p, geo), mu, radius2)
                if best_lab > 0:
                    lab[p] = best_lab
                    grow[p] = False


def _k_adjacent_keys(lab, n):  # pragma: no cover - runs compiled
    """Codes ``min * (n + 1) + max`` of touching label pairs (face neighbours, both > 0), with repeats."""
    d, h, w = lab.shape
    keys = np.empty(4096, dtype=np.int64)
    cnt = 0
    last = np.int64(-1)
    for z in range(d):
        for y in range(h):
            for axis in range(3):
                if (axis == 0 and z + 1 >= d) or (axis == 1 and y + 1 >= h) or (axis == 2 and w < 2):
                    continue
                for x in range(w - 1 if axis == 2 else w):
                    a = lab[z, y, x]
                    if axis == 0:
                        b = lab[z + 1, y, x]
                    elif axis == 1:
                        b = lab[z, y + 1, x]
                    else:
                        b = lab[z, y, x + 1]
                    if a == b or a <= 0 or b <= 0:
                        continue
                    key = np.int64(min(a, b)) * (n + 1) + max(a, b)
                    if key == last:
                        continue
                    last = key
                    if cnt == keys.size:
                        bigger = np.empty(2 * keys.size, dtype=np.int64)
                        bigger[:cnt] = keys
                        keys = bigger
                    keys[cnt] = key
                    cnt += 1
    return keys[:cnt]


if HAVE_NUMBA:
    _k_core = numba.njit(parallel=True, cache=True)(_k_core)
    _k_means = numba.njit(cache=True)(_k_means)
    _k_nearest = numba.njit(cache=True, inline="always")(_k_nearest)
    _k_orig = numba.njit(cache=True, inline="always")(_k_orig)
    _k_grow = numba.njit(cache=True)(_k_grow)
    _k_sweep = numba.njit(cache=True, parallel=True)(_k_sweep)
    _k_adjacent_keys = numba.njit(cache=True)(_k_adjacent_keys)


def _use_numba(backend: str) -> bool:
    if backend not in ("auto", "numba", "numpy"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'numpy', got {backend!r}.")
    if backend == "numba" and not HAVE_NUMBA:
        raise ValueError("backend='numba' needs the numba package; install it or use backend='numpy'.")
    return HAVE_NUMBA and backend != "numpy"


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


def cluster_fast(
    emb: np.ndarray,
    delta_v: float = 0.5,
    delta_d: float = 2.0,
    min_size: int = 16,
    fg_mask: np.ndarray | None = None,
    background: str = "auto",
    edge_threshold: float | None = None,
    assign_radius: float | None = None,
    fill_radius: float | None = None,
    merge: str = "adjacent",
    merge_threshold: float | None = None,
    min_seed_size: int = 1,
    backend: str = "auto",
    num_threads: int | None = None,
) -> np.ndarray:
    """Fast spatial clustering of embeddings, linear in the number of voxels.

    Steps, with the SPOCO margins in mind (pull hinge ``delta_v``, push margin ``2 delta_d`` between means):

    1. Core voxels: embedding distance to every face neighbour below ``edge_threshold`` (``2 delta_v``: two
       voxels of one object are both within ``delta_v`` of its mean, so within ``2 delta_v`` of each other, and
       voxels of two objects are at least ``2 delta_d - 2 delta_v`` apart). Requiring *all* neighbours to agree
       keeps thin chains of in-between embeddings at object borders from linking two objects, and a smooth
       (blurred) border still breaks, as long as its steepest step exceeds ``2 delta_v``.
    2. Seeds: 6-/4-connected components of core voxels (``scipy.ndimage.label``). Every component is a seed by
       default (``min_seed_size=1``): small objects may have only a few core voxels, while a spurious seed made
       of background noise is merged back (same mean) or dropped by ``min_size``.
    3. Growth, two breadth-first passes over the remaining (border, outlier) voxels; a voxel joins the
       adjacent component with the nearest mean embedding. First only within ``assign_radius`` of that mean
       (``delta_d``: such a voxel is nearer to that mean than to any other, as means are ``2 delta_d`` apart),
       so confident voxels claim borders first; then within ``fill_radius`` (default: no limit, every voxel
       connected to a seed gets the nearest adjacent label, like a seeded watershed).
    4. Merge (``merge="adjacent"``): touching components whose means are closer than ``merge_threshold``
       (``2 delta_v``) are one object split by noise. ``"global"`` merges any two components with close means,
       like a non-spatial clustering does; that also merges distant objects that happen to share an embedding,
       which the losses allow (they only push apart objects seen in the same training patch), so the default is
       adjacency. ``"none"`` skips merging. With ``background="largest"``, components whose mean is within
       ``merge_threshold`` of the largest component's mean join it first (background pockets enclosed by
       objects are not connected to the main background).
    5. Shared post-processing: ``min_size``, background, relabelling (see the module docstring).

    Cost: O(N E) for the core test, then O(N) (labelling, growth of the non-core voxels, merging); no (N, K)
    matrices and no float64 copies of the volume. With numba installed the loops run compiled
    (``backend="auto"``; the kernels compile once on first use and are cached on disk). Speed and peak memory of
    both backends: ``scripts/benchmark_clustering.py``.
    The backends give the same labels, except that the numba one grows in raster sweeps, which can differ for
    the rare voxel within ``assign_radius`` of the means of two touching components (means closer than
    ``2 assign_radius``).

    Args:
        emb: embeddings ``(E, H, W)`` or ``(E, D, H, W)``.
        delta_v: pull margin of the training loss.
        delta_d: push margin of the training loss.
        min_size: objects with fewer voxels are set to 0.
        fg_mask: optional boolean foreground mask ``S``; voxels outside are never assigned.
        background: ``"largest"``, ``"none"`` or ``"auto"`` (``"largest"`` unless ``fg_mask`` is given).
        edge_threshold: neighbour distance for core voxels, default ``2 delta_v``.
        assign_radius: radius of the first growth pass, default ``delta_d``.
        fill_radius: radius of the second growth pass, default None = unlimited; ``<= assign_radius`` skips it.
        merge: ``"adjacent"``, ``"global"`` or ``"none"``.
        merge_threshold: maximum distance between the means of merged components, default ``2 delta_v``.
        min_seed_size: smaller core components are not seeds (their voxels are grown into like border voxels).
        backend: ``"auto"`` (numba when installed), ``"numba"`` or ``"numpy"``.
        num_threads: threads for the core test of the numpy backend; default ``min(4, available cores)``.

    Returns:
        int32 labels of shape ``S``, 0 = background, 1..n consecutive.
    """
    emb = _check_embeddings(emb)
    spatial = emb.shape[1:]
    fg_mask = _check_mask(fg_mask, spatial)
    background = _check_background(background, fg_mask)
    use_nb = _use_numba(backend)
    if merge not in ("adjacent", "global", "none"):
        raise ValueError(f"merge must be 'adjacent', 'global' or 'none', got {merge!r}.")
    edge_threshold = 2.0 * delta_v if edge_threshold is None else float(edge_threshold)
    assign_radius = float(delta_d) if assign_radius is None else float(assign_radius)
    fill_radius = np.inf if fill_radius is None else float(fill_radius)
    merge_threshold = 2.0 * delta_v if merge_threshold is None else float(merge_threshold)

    e = emb.shape[0]
    shape3 = _as_3d(spatial)
    emb4 = emb.reshape((e,) + shape3)
    emb_flat = emb.reshape(e, -1)
    fg3 = None if fg_mask is None else fg_mask.reshape(shape3)

    # 1-2: core voxels and seeds
    tau2 = np.float32(edge_threshold**2)
    core = _k_core(emb4, tau2) if use_nb else _core_mask(emb4, float(tau2), _threads(num_threads))
    if fg3 is not None:
        core &= fg3
    seeds, n = ndimage.label(core, structure=ndimage.generate_binary_structure(3, 1), output=np.int32)
    del core
    if n == 0:
        return np.zeros(spatial, dtype=np.int32)
    sizes = np.bincount(seeds.reshape(-1), minlength=n + 1)
    big = sizes >= max(int(min_seed_size), 1)
    big[0] = False
    lut = np.cumsum(big, dtype=np.int64).astype(np.int32)
    lut[~big] = 0
    n = int(big.sum())
    if n == 0:
        return np.zeros(spatial, dtype=np.int32)
    geo = _Padded(shape3)
    plab = np.zeros(geo.pshape, dtype=np.int32)
    plab[geo.inner] = lut[seeds]
    del seeds
    seed_flat = np.ascontiguousarray(plab[geo.inner]).reshape(-1)
    means = _means(seed_flat, emb_flat, n, use_nb)
    del seed_flat

    # 3: growth into the non-core voxels
    pgrow = np.zeros(geo.pshape, dtype=bool)
    pgrow[geo.inner] = plab[geo.inner] == 0
    if fg3 is not None:
        pgrow[geo.inner] &= fg3
    for radius in (assign_radius, fill_radius) if fill_radius > assign_radius else (assign_radius,):
        if use_nb:
            if np.isfinite(radius):
                _k_sweep(plab.reshape(-1), pgrow.reshape(-1), geo.offsets, emb_flat, means, radius**2, geo.kernel_geo)
            cand = _frontier(plab, pgrow, geo)
            _k_grow(plab.reshape(-1), pgrow.reshape(-1), geo.offsets, cand, emb_flat, means, radius**2, geo.kernel_geo)
        else:
            _grow(plab, pgrow, geo, emb_flat, means, radius**2)
    del pgrow
    lab = np.ascontiguousarray(plab[geo.inner])
    del plab

    # 4: merging and background pockets
    if merge == "adjacent":
        keys = _k_adjacent_keys(lab, n) if use_nb else None
        lut = _merge_adjacent(lab, means, merge_threshold, keys)
    elif merge == "global" and n > 1:
        from scipy.spatial import cKDTree

        pairs = cKDTree(means[1:]).query_pairs(merge_threshold, output_type="ndarray") + 1
        lut = _merge_pairs(pairs[:, 0], pairs[:, 1], means, merge_threshold)
    else:
        lut = np.arange(n + 1)
    lab_sizes = np.bincount(lab.reshape(-1), minlength=n + 1)
    if background == "largest":
        lut = _absorb_background(lut, lab_sizes, means, merge_threshold)
    return _apply_lut(lab, _final_lut(lut, lab_sizes, min_size, background)).reshape(spatial)


# ------------------------------------------------------------------------------------ reference clusterings


def _edge_strength(emb: np.ndarray) -> np.ndarray:
    """Per voxel the largest embedding distance to a face neighbour, float32 (one channel at a time: no (E, *S)
    temporaries)."""
    spatial = emb.shape[1:]
    out = np.zeros(spatial, np.float32)
    for axis, n in enumerate(spatial):
        if n < 2:
            continue
        lo = (slice(None),) * axis + (slice(None, -1),)
        hi = (slice(None),) * axis + (slice(1, None),)
        d2 = np.zeros(out[lo].shape, np.float32)
        for channel in emb:
            diff = channel[hi] - channel[lo]
            d2 += diff * diff
        d = np.sqrt(d2)
        np.maximum(out[lo], d, out=out[lo])
        np.maximum(out[hi], d, out=out[hi])
    return out


def cluster_watershed(
    emb: np.ndarray,
    delta_v: float = 0.5,
    delta_d: float = 2.0,
    min_size: int = 16,
    fg_mask: np.ndarray | None = None,
    background: str = "auto",
    sigma: float | Sequence[float] = 1.0,
    h: float | None = None,
    merge_threshold: float | None = None,
) -> np.ndarray:
    """Seeded watershed on the embedding-edge map.

    1. Edge map: per voxel the largest embedding distance to a face neighbour, Gaussian-smoothed by ``sigma``
       voxels (per axis if a sequence).
    2. Seeds: the edge map's regional minima deeper than ``h`` (``0.4 delta_v``; scikit-image ``h_minima``) inside
       ``fg_mask``; connected seeds are one marker.
    3. Watershed from the markers over the edge map, inside ``fg_mask`` (scikit-image ``watershed``): every voxel
       goes to the basin it drains into, so two touching objects are cut at the ridge between them even when the
       embedding changes in steps smaller than ``2 delta_v`` across their border (where :func:`cluster_fast`'s
       core test links them).
    4. Touching regions whose mean embeddings are closer than ``merge_threshold`` (``2 delta_v``) are merged
       (over-split objects); with ``background="largest"`` regions with a mean that close to the largest region's
       join it (enclosed background pockets), then the shared post-processing (see the module docstring).

    Measured on DSB2018 validation images (``python -m benchmarks.foreground``, same models and masks as ``fast``):
    see docs/benchmarks.md. ``delta_d`` is accepted for a uniform call signature and not used.

    Args:
        emb: embeddings ``(E, H, W)`` or ``(E, D, H, W)``.
        delta_v: pull margin of training; sets the defaults of ``h`` and ``merge_threshold``.
        min_size, fg_mask, background: shared post-processing, see the module docstring.
        sigma: smoothing of the edge map in voxels (0: none).
        h: minimum depth of a seed's basin, in embedding distance.
        merge_threshold: touching regions with mean embeddings closer than this are merged (0: no merging).
    """
    from skimage.morphology import h_minima
    from skimage.segmentation import watershed

    emb = _check_embeddings(emb)
    fg_mask = _check_mask(fg_mask, emb.shape[1:])
    background = _check_background(background, fg_mask)
    h = 0.4 * delta_v if h is None else float(h)
    merge_threshold = 2.0 * delta_v if merge_threshold is None else float(merge_threshold)
    sigmas = np.atleast_1d(np.asarray(sigma, dtype=np.float64))
    if not h > 0 or not merge_threshold >= 0 or not np.all(sigmas >= 0):
        raise ValueError(f"need h > 0, merge_threshold >= 0, sigma >= 0; got {h}, {merge_threshold}, {sigma}.")
    spatial = emb.shape[1:]
    if sigmas.size not in (1, len(spatial)):
        raise ValueError(f"sigma needs one value or one per spatial axis {spatial}, got {sigma}.")
    region = np.ones(spatial, bool) if fg_mask is None else fg_mask
    if not region.any():
        return np.zeros(spatial, np.int32)
    edges = _edge_strength(emb)
    if np.any(sigmas > 0):
        edges = ndimage.gaussian_filter(edges, sigma=sigma)
    seeds = h_minima(np.where(region, edges, edges.max()), h).astype(bool) & region
    markers, n = ndimage.label(seeds)
    labels = watershed(edges, markers, mask=region)
    # a connected part of the mask without a basin deeper than h (a small or perfectly uniform object) has no seed
    # and would be dropped by the watershed: it is one region of its own
    rest = region & (labels == 0)
    if rest.any():
        extra, k = ndimage.label(rest)
        labels[rest] = extra[rest] + n
        n += k
    lut = np.arange(n + 1)
    sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
    merging = n > 1 and merge_threshold > 0
    if merging or background == "largest":
        means = _means(labels.reshape(-1), emb.reshape(emb.shape[0], -1), n)
        if merging:
            lut = _merge_adjacent(labels, means, merge_threshold)
        if background == "largest":  # enclosed background pockets join the background, as in cluster_fast
            lut = _absorb_background(lut, sizes, means, merge_threshold)
    return _apply_lut(labels, _final_lut(lut, sizes, min_size, background))


def cluster_hdbscan(
    emb: np.ndarray,
    min_size: int = 50,
    delta_v: float = 0.5,
    delta_d: float = 2.0,
    fg_mask: np.ndarray | None = None,
    background: str = "auto",
    max_points: int | None = 20000,
    min_samples: int | None = None,
    assign_radius: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """HDBSCAN clustering (hdbscan package) with ``cluster_selection_epsilon = delta_v``, as in the reference.

    Above ``max_points`` foreground voxels (HDBSCAN's cost grows faster than linearly), HDBSCAN runs on a uniform
    random subsample of ``max_points`` voxels with ``min_cluster_size`` scaled by the sampling fraction; every other
    voxel gets the nearest cluster mean within ``assign_radius`` (default ``delta_d``) or 0. HDBSCAN noise is 0.

    Args:
        emb: embeddings ``(E, H, W)`` or ``(E, D, H, W)``.
        min_size: HDBSCAN ``min_cluster_size`` (before scaling) and the final minimum object size.
        delta_v: ``cluster_selection_epsilon``.
        delta_d: push margin, the default assignment radius.
        fg_mask: optional boolean foreground mask; only voxels inside are clustered.
        background: ``"largest"``, ``"none"`` or ``"auto"``.
        max_points: subsample size; None clusters all voxels.
        min_samples: HDBSCAN ``min_samples`` (None: HDBSCAN's default, equal to ``min_cluster_size``).
        assign_radius: radius for the voxels outside the subsample.
        seed: subsampling seed.
    """
    import hdbscan

    emb = _check_embeddings(emb)
    fg_mask = _check_mask(fg_mask, emb.shape[1:])
    background = _check_background(background, fg_mask)

    def fit(points: np.ndarray, fraction: float) -> np.ndarray:
        if len(points) < 2:
            return np.full(len(points), -1)
        mcs = int(min(max(2, round(min_size * fraction)), len(points)))
        ms = None if min_samples is None else int(max(1, min(min_samples, len(points))))
        model = hdbscan.HDBSCAN(min_cluster_size=mcs, min_samples=ms, cluster_selection_epsilon=float(delta_v))
        return model.fit_predict(points)

    radius = delta_d if assign_radius is None else assign_radius
    labels = _cluster_points(emb, fg_mask, fit, max_points, radius, seed)
    return _finalize(labels, min_size, background, fg_mask)


def _bin_seeds(points: np.ndarray, bin_size: float, min_bin_freq: int = 1) -> np.ndarray:
    """Bin seeding for mean-shift with the mean of each occupied bin as seed.

    sklearn's ``bin_seeding=True`` seeds at the bin's grid point, which in 16-D can lie up to
    ``sqrt(E) * bin_size / 2`` (= 1.0 for E = 16, bin 0.5) from every point of the bin; seeds with no point
    within the bandwidth are dropped and their cluster silently merges into another one.
    """
    keys = np.round(points / bin_size).astype(np.int64)
    _, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    sums = np.stack([np.bincount(inv, weights=points[:, c], minlength=len(counts)) for c in range(points.shape[1])], 1)
    seeds = sums / counts[:, None]
    return seeds[counts >= min_bin_freq]


def cluster_meanshift(
    emb: np.ndarray,
    delta_v: float = 0.5,
    delta_d: float = 2.0,
    min_size: int = 16,
    fg_mask: np.ndarray | None = None,
    background: str = "auto",
    max_points: int | None = 10000,
    assign_radius: float | None = None,
    n_jobs: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Mean-shift clustering (``sklearn.cluster.MeanShift``, bandwidth ``delta_v``, bin seeding), as the reference.

    Bin seeding uses bin means as seeds instead of sklearn's bin grid points (see ``_bin_seeds``: in 16-D the
    grid point can be farther than the bandwidth from all data and the cluster is lost). Slow in 16-D (the
    reference needed minutes for 20k points), hence the default subsample of ``max_points`` voxels; the rest get
    the nearest cluster mean within ``assign_radius`` (default ``delta_d``) or 0.

    Args:
        emb: embeddings ``(E, H, W)`` or ``(E, D, H, W)``.
        delta_v: bandwidth.
        delta_d: push margin, the default assignment radius.
        min_size: final minimum object size in voxels.
        fg_mask: optional boolean foreground mask; only voxels inside are clustered.
        background: ``"largest"``, ``"none"`` or ``"auto"``.
        max_points: subsample size; None clusters all voxels.
        assign_radius: radius for the voxels outside the subsample.
        n_jobs: passed to MeanShift.
        seed: subsampling seed.
    """
    from sklearn.cluster import MeanShift
    from threadpoolctl import threadpool_limits

    emb = _check_embeddings(emb)
    fg_mask = _check_mask(fg_mask, emb.shape[1:])
    background = _check_background(background, fg_mask)

    def fit(points: np.ndarray, fraction: float) -> np.ndarray:
        if len(points) < 2:
            return np.zeros(len(points), dtype=np.int64)
        model = MeanShift(bandwidth=float(delta_v), seeds=_bin_seeds(points, float(delta_v)), n_jobs=n_jobs)
        # one radius query per seed and iteration: OpenMP start-up per query costs more than it saves (6x here)
        with threadpool_limits(limits=1):
            return model.fit_predict(points)

    radius = delta_d if assign_radius is None else assign_radius
    labels = _cluster_points(emb, fg_mask, fit, max_points, radius, seed)
    return _finalize(labels, min_size, background, fg_mask)


# -------------------------------------------------------------------------------------------- consistency


def _consistency_iou(
    labels: np.ndarray,
    emb_g_flat: np.ndarray,
    universe: np.ndarray | None,
    delta_v: float,
    n_samples: int,
    seed: int,
) -> np.ndarray:
    """Median over anchors of IoU(cluster, {i : ||g_i - g_anchor|| < delta_v}) for every label 1..n.

    Exact and chunked over voxels. A voxel can only be within ``delta_v`` of an anchor of cluster c if it is
    within ``delta_v + R_c`` of the centre ``m_c`` of c's anchors (``R_c`` = largest anchor distance to
    ``m_c``), so distances to the anchors are computed only for those candidates: the cost is about
    N x K (centres) plus (candidates x n_samples) instead of N x K x n_samples.
    """
    flat = labels.reshape(-1)
    n = int(flat.max())
    if n == 0:
        return np.zeros(1)
    rng = np.random.default_rng(seed)
    order = np.argsort(flat, kind="stable")
    sizes = np.bincount(flat, minlength=n + 1)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    # anchors: n_samples random voxels of each cluster (with replacement, as the reference)
    pick = starts[1:-1, None] + (rng.random((n, n_samples)) * sizes[1:, None]).astype(np.int64)
    anchors = emb_g_flat[:, order[pick]].transpose(1, 2, 0).astype(np.float32)  # (n, S, E)
    del order
    centre = anchors.mean(1)
    rad = np.linalg.norm(anchors - centre[:, None], axis=2).max(1)
    bound2 = ((delta_v + rad) ** 2).astype(np.float32)
    a_sq = (anchors.astype(np.float64) ** 2).sum(2).astype(np.float32)  # (n, S)
    c_sq = (centre.astype(np.float64) ** 2).sum(1).astype(np.float32)
    dv2 = np.float32(delta_v**2)
    in_mask = np.zeros((n, n_samples), dtype=np.int64)  # |M_a|
    inter = np.zeros((n, n_samples), dtype=np.int64)  # |M_a & C|
    n_vox = flat.size
    vox_all = np.arange(n_vox) if universe is None else np.flatnonzero(universe.reshape(-1))
    chunk = max(1024, _CHUNK_VOXELS // 4)
    for s in range(0, len(vox_all), chunk):
        v = vox_all[s : s + chunk]
        x = np.ascontiguousarray(emb_g_flat[:, v].T)  # (m, E)
        x_sq = (x * x).sum(1)
        dc2 = x_sq[:, None] + c_sq[None, :] - 2.0 * (x @ centre.T)  # (m, n)
        vi, ci = np.nonzero(dc2 < bound2[None, :])
        if vi.size == 0:
            continue
        srt = np.argsort(ci, kind="stable")
        vi, ci = vi[srt], ci[srt]
        cut = np.flatnonzero(np.diff(ci)) + 1
        lab_v = flat[v]
        for grp_v, c in zip(np.split(vi, cut), ci[np.concatenate([[0], cut])]):
            xs = x[grp_v]
            d2 = x_sq[grp_v, None] + a_sq[c][None, :] - 2.0 * (xs @ anchors[c].T)  # (g, S)
            hit = d2 < dv2
            in_mask[c] += hit.sum(0)
            inter[c] += hit[lab_v[grp_v] == c + 1].sum(0)
    iou = inter / np.maximum(sizes[1:, None] + in_mask - inter, 1)
    return np.concatenate([[0.0], np.median(iou, axis=1)])


def cluster_consistency(
    emb_f: np.ndarray,
    emb_g: np.ndarray,
    delta_v: float = 0.5,
    iou_threshold: float = 0.6,
    n_samples: int = 100,
    seed: int = 0,
    method: str = "fast",
    min_size: int = 16,
    fg_mask: np.ndarray | None = None,
    background: str = "auto",
    **kwargs,
) -> np.ndarray:
    """Consistency clustering of the SPOCO paper: keep the clusters of f that g reproduces.

    The student embeddings ``emb_f`` are clustered with ``method`` (``"fast"`` by default; the reference used
    mean-shift, which is too slow for volumes, and the rule below does not depend on the base clustering).
    Background is removed on that result first, so that dropping an inconsistent cluster can never make
    ``"largest"`` remove a real object. Then, for each remaining cluster C, ``n_samples`` random voxels of C
    (with replacement) give anchors ``a = g_i``; ``M_a = {i : ||g_i - a|| < delta_v}`` over the whole image
    (inside ``fg_mask`` when given); C is dropped when the median over anchors of ``IoU(C, M_a)`` is below
    ``iou_threshold``. Exact, vectorised over voxels and chunked (see ``_consistency_iou``).

    The anchors are single voxels, so the rule assumes compact clusters: when the typical distance between two
    voxels of one object exceeds ``delta_v`` (per-voxel spread above ~``delta_v / sqrt(2)``), even consistent
    objects get a low IoU and are dropped.

    Args:
        emb_f: student embeddings ``(E, *S)``.
        emb_g: teacher (EMA) embeddings of the same shape, usually of a second view of the image.
        delta_v: kernel radius of the anchor masks.
        iou_threshold: minimum median IoU of a kept cluster.
        n_samples: anchors per cluster.
        seed: anchor sampling seed.
        method: base clustering of f, any name of :data:`CLUSTERING_METHODS` except ``"consistency"``.
        min_size: minimum object size, applied before and after the consistency test.
        fg_mask: optional boolean foreground mask.
        background: ``"largest"``, ``"none"`` or ``"auto"``.
        kwargs: passed to the base clustering.
    """
    emb_f = _check_embeddings(emb_f, "emb_f")
    emb_g = _check_embeddings(emb_g, "emb_g")
    if emb_f.shape != emb_g.shape:
        raise ValueError(f"emb_f and emb_g must have the same shape, got {emb_f.shape} and {emb_g.shape}.")
    if method == "consistency" or method not in CLUSTERING_METHODS:
        valid = sorted(k for k in CLUSTERING_METHODS if k != "consistency")
        raise ValueError(f"method must be one of {valid}, got {method!r}.")
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}.")
    fg_mask = _check_mask(fg_mask, emb_f.shape[1:])
    background = _check_background(background, fg_mask)
    labels = CLUSTERING_METHODS[method](
        emb_f, delta_v=delta_v, min_size=min_size, fg_mask=fg_mask, background=background, **kwargs
    )
    median_iou = _consistency_iou(labels, emb_g.reshape(emb_g.shape[0], -1), fg_mask, delta_v, n_samples, seed)
    keep = median_iou >= iou_threshold
    keep[0] = False
    lut = np.where(keep, np.arange(len(keep)), 0)
    return _finalize(_apply_lut(labels, lut), min_size, "none", None)


# --------------------------------------------------------------------------------------------- dispatcher


def split_by_shape(
    labels: np.ndarray,
    h: float = 0.1,
    sigma: float = 1.0,
    spacing: Sequence[float] | None = None,
    min_size: int = 1,
) -> np.ndarray:
    """Split objects that are two (or more) round objects joined by a neck, by their shape alone.

    Touching nuclei whose embeddings the network has not (yet) separated come out of every clustering as one
    object shaped like an 8. Per object: the Euclidean distance transform (in physical units when ``spacing`` is
    given, so anisotropic voxels are measured correctly), Gaussian-smoothed by ``sigma`` voxels of the finest axis;
    its maxima that rise more than ``h`` times the object's largest distance above the saddle to any higher one
    (h-maxima: regional maxima of the h-dome reconstruction, scikit-image) are markers; an object with two or more
    is divided by a watershed on the negative distance transform (the classical nucleus split, here applied only
    inside the clustered objects). ``h`` relative to the object's size makes the
    rule independent of magnification. A split that would leave a part smaller than ``min_size`` voxels is not made.

    Measured on DSB2018 validation images (``python -m benchmarks.foreground``, ``shape_split`` rows): see
    docs/benchmarks.md.

    Args:
        labels: instance labels ``(H, W)`` or ``(D, H, W)``, 0 = background.
        h: relative depth of the distance transform's maxima that become parts (0 < h < 1; smaller splits more).
        sigma: smoothing of the distance transform in voxels of the finest axis (0: none).
        spacing: voxel size per axis (default: isotropic).
        min_size: smallest allowed part in voxels.

    Returns:
        int32 labels of the same shape: unsplit objects keep their id, new parts get ids after the largest one.
    """
    from skimage.morphology import local_maxima, reconstruction
    from skimage.segmentation import watershed

    labels = np.asarray(labels)
    if labels.ndim not in (2, 3) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2D or 3D integer array, got {labels.dtype} of shape {labels.shape}.")
    if not 0 < h < 1 or not sigma >= 0:
        raise ValueError(f"need 0 < h < 1 and sigma >= 0, got h={h}, sigma={sigma}.")
    spacing = np.ones(labels.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (labels.ndim,) or not np.all(spacing > 0):
        raise ValueError(f"spacing needs {labels.ndim} positive values, got {spacing}.")
    sigmas = sigma * spacing.min() / spacing
    out = labels.astype(np.int32, copy=True)
    next_id = int(out.max()) + 1
    for i, box in enumerate(ndimage.find_objects(out), start=1):
        if box is None:
            continue
        box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)  # a background rim for the transform
        obj = out[box] == i
        dist = ndimage.distance_transform_edt(obj, sampling=spacing)
        if sigma > 0:
            dist = ndimage.gaussian_filter(dist, sigmas)
        top = float(dist[obj].max())
        if top <= 0:
            continue
        # h-maxima as the regional maxima of the h-dome reconstruction: unlike skimage's h_maxima residue test,
        # this keeps two equally high peaks one marker when the saddle between them is shallower than h
        dome = reconstruction(dist - h * top, dist, method="dilation")
        markers, n = ndimage.label(local_maxima(dome, allow_borders=True) & obj)
        if n < 2:
            continue
        parts = watershed(-dist, markers, mask=obj)
        sizes = np.bincount(parts[obj], minlength=n + 1)[1:]
        if sizes.min() < min_size:
            continue
        view = out[box]
        for j in range(2, n + 1):
            view[parts == j] = next_id
            next_id += 1
    return out


CLUSTERING_METHODS: dict[str, Callable[..., np.ndarray]] = {
    "fast": cluster_fast,
    "hdbscan": cluster_hdbscan,
    "meanshift": cluster_meanshift,
    "watershed": cluster_watershed,
    "consistency": cluster_consistency,
}


def cluster_embeddings(emb: np.ndarray, method: str = "fast", **kwargs) -> np.ndarray:
    """Cluster embeddings ``(E, *S)`` into int32 instance labels ``S`` with the named method.

    Args:
        emb: embeddings ``(E, H, W)`` or ``(E, D, H, W)``; for ``"consistency"`` the student's (pass the
            teacher's as ``emb_g``).
        method: one of ``"fast"``, ``"watershed"``, ``"hdbscan"``, ``"meanshift"``, ``"consistency"``.
        kwargs: keyword arguments of the method's function.
    """
    if method not in CLUSTERING_METHODS:
        raise ValueError(f"Unknown clustering method {method!r}; valid methods: {sorted(CLUSTERING_METHODS)}.")
    if method == "consistency":
        if "emb_g" not in kwargs:
            raise ValueError("method 'consistency' needs the teacher embeddings as keyword argument emb_g.")
        return cluster_consistency(emb, kwargs.pop("emb_g"), **kwargs)
    return CLUSTERING_METHODS[method](emb, **kwargs)


def check_foreground_threshold(rule: float | str) -> float | str:
    """``rule`` of :func:`head_threshold` checked: a probability in (0, 1) as a float, or ``"otsu"``."""
    if isinstance(rule, str) and rule == "otsu":
        return rule
    t = float("nan") if isinstance(rule, str) else float(rule)
    if not 0.0 < t < 1.0:
        raise ValueError(f"foreground threshold must be a probability in (0, 1) or 'otsu', got {rule!r}.")
    return t


def head_threshold(logits: np.ndarray, rule: float | str = 0.5, max_samples: int = 1_000_000) -> float:
    """
    The probability threshold of the foreground head for one image.

    Args:
        logits: the (calibrated) foreground logits of the image, any shape.
        rule: a probability in (0, 1), returned as it is; or ``"otsu"``: Otsu's threshold of the image's head
            probabilities, which separates the two modes of the map without relying on the calibration (the label
            frequency ``c`` of positive-unlabeled training, biased when the head memorises the few annotated
            objects). Large images are subsampled on a regular grid (``max_samples`` values). A map with a single
            value gives 0.5.
    """
    rule = check_foreground_threshold(rule)
    if rule != "otsu":
        return float(rule)
    from skimage.filters import threshold_otsu

    x = np.asarray(logits, dtype=np.float32).ravel()
    x = x[:: max(1, x.size // max_samples)]
    p = 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))
    if p.size == 0 or float(p.max() - p.min()) < 1e-6:
        return 0.5
    return float(threshold_otsu(p))
