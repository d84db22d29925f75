"""``fast`` clustering: spatial, linear-time region growing built on the margins the SPOCO losses train for.

Voxels whose embedding is within ``2 delta_v`` of every face neighbour are "core" voxels; connected components of
core voxels are seeds; the remaining voxels (object borders, outliers) are grown into the adjacent seed with the
nearest mean embedding; touching components with close means are merged (see :func:`cluster_fast`). Its loops are
the numba-compiled ``_k_*`` kernels below.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from scipy import ndimage

from spoco_bundle.clustering._common import (
    _absorb_background,
    _apply_lut,
    _check_background,
    _check_embeddings,
    _check_mask,
    _final_lut,
    _means,
    _merge_adjacent,
    _merge_pairs,
)

# ------------------------------------------------------------------------------------------------- helpers


def _threads(num_threads: int | None) -> int:
    """Worker threads: ``num_threads``, or by default the available cores, at most 4 (``split_by_shape``'s pool)."""
    if num_threads is not None:
        return max(1, int(num_threads))
    try:
        return max(1, min(4, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return max(1, min(4, os.cpu_count() or 1))


def _as_3d(spatial: tuple[int, ...]) -> tuple[int, int, int]:
    """Work shape: 3D stays, 2D (H, W) becomes (H, 1, W) so that the chunked first axis runs over rows."""
    if len(spatial) == 3:
        return tuple(spatial)  # type: ignore[return-value]
    return (spatial[0], 1, spatial[1])


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


# --------------------------------------------------------------------------------- compiled kernels (numba)
# Pure loops, compiled with numba. tests/_fast_oracle.py holds an independent numpy twin of each kernel
# (``_k_adjacent_keys``: the numpy path of ``_merge_adjacent`` in _common.py), which tests/test_clustering.py checks
# the kernels against.


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


_k_core = numba.njit(parallel=True, cache=True)(_k_core)
_k_nearest = numba.njit(cache=True, inline="always")(_k_nearest)
_k_orig = numba.njit(cache=True, inline="always")(_k_orig)
_k_grow = numba.njit(cache=True)(_k_grow)
_k_sweep = numba.njit(cache=True, parallel=True)(_k_sweep)
_k_adjacent_keys = numba.njit(cache=True)(_k_adjacent_keys)


# ------------------------------------------------------------------------------------------ fast clustering


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
    5. Shared post-processing: ``min_size``, background, relabelling (see :mod:`spoco_bundle.clustering`).

    Cost: O(N E) for the core test, then O(N) (labelling, growth of the non-core voxels, merging); no (N, K)
    matrices and no float64 copies of the volume. The loops run compiled by numba (the kernels compile once on
    first use and are cached on disk). Speed and peak memory: ``research/perf/benchmark_clustering.py``.
    The growth within a finite radius starts with raster sweeps (labels travel far in one pass), then finishes
    in breadth-first rounds; where a voxel is within ``assign_radius`` of the means of two touching components
    (means closer than ``2 assign_radius``, rare) the visiting order decides which one it joins.

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

    Returns:
        int32 labels of shape ``S``, 0 = background, 1..n consecutive.
    """
    emb = _check_embeddings(emb)
    spatial = emb.shape[1:]
    fg_mask = _check_mask(fg_mask, spatial)
    background = _check_background(background, fg_mask)
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
    core = _k_core(emb4, tau2)
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
    means = _means(seed_flat, emb_flat, n)
    del seed_flat

    # 3: growth into the non-core voxels
    pgrow = np.zeros(geo.pshape, dtype=bool)
    pgrow[geo.inner] = plab[geo.inner] == 0
    if fg3 is not None:
        pgrow[geo.inner] &= fg3
    for radius in (assign_radius, fill_radius) if fill_radius > assign_radius else (assign_radius,):
        if np.isfinite(radius):
            _k_sweep(plab.reshape(-1), pgrow.reshape(-1), geo.offsets, emb_flat, means, radius**2, geo.kernel_geo)
        cand = _frontier(plab, pgrow, geo)
        _k_grow(plab.reshape(-1), pgrow.reshape(-1), geo.offsets, cand, emb_flat, means, radius**2, geo.kernel_geo)
    del pgrow
    lab = np.ascontiguousarray(plab[geo.inner])
    del plab

    # 4: merging and background pockets
    if merge == "adjacent":
        lut = _merge_adjacent(lab, means, merge_threshold, _k_adjacent_keys(lab, n))
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
