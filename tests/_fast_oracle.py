"""numpy references (test oracles) for the compiled kernels of ``spoco_bundle.clustering.fast``.

Until issue 22 the library carried these functions as the ``backend="numpy"`` implementation of ``cluster_fast``;
the library now runs the numba kernels only and the numpy twins live here, unchanged apart from imports (and
``_Padded.to_orig`` became the function :func:`_to_orig`), as independent implementations that
tests/test_clustering.py checks the kernels against:

- :func:`_core_mask` -> ``fast._k_core`` (core voxels);
- :func:`_grow` (breadth-first rounds) -> ``fast._k_grow``; with ``fast._k_sweep`` before it the kernels give the
  same labels wherever no voxel is within the growth radius of two adjacent means (where one is, the raster sweep's
  visiting order decides);
- :func:`_to_orig` -> ``fast._k_orig`` (padded to original flat index);
- ``_common._merge_adjacent`` without ``keys`` (its numpy path, which the watershed method uses) ->
  ``fast._k_adjacent_keys``;
- :func:`_means` (``_common._means``' numpy path, its former ``use_numba=False``, which the library dropped when
  numba became required: copied here unchanged but for the switch) -> ``_common._means`` (the kernel
  ``_common._k_means``).

:func:`cluster_fast_reference` is ``cluster_fast`` with every kernel replaced by its numpy twin: the former numpy
backend, end to end.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numpy as np

from spoco_bundle.clustering import fast
from spoco_bundle.clustering._common import _CHUNK_VOXELS, _mean_step
from spoco_bundle.clustering.fast import _frontier, _Padded

# ------------------------------------------------------------------------------------- numpy implementation


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


def _to_orig(geo: _Padded, p: np.ndarray) -> np.ndarray:
    """Original flat indices of the padded flat indices ``p`` (formerly ``_Padded.to_orig``)."""
    _, ph, pw = geo.pshape
    _, h, w = geo.shape
    z = p // (ph * pw) - geo.pad[0]
    rem = p % (ph * pw)
    y = rem // pw - geo.pad[1]
    x = rem % pw - geo.pad[2]
    return (z * h + y) * w + x


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
                diff = emb_flat[:, _to_orig(geo, p[ps])].astype(np.float64) - mu_t[:, hi[ps]]
                far = np.einsum("ij,ij->j", diff, diff) >= radius2
                best_lab[ps[far]] = 0
            if multi.any():
                pm = np.flatnonzero(multi)
                x = emb_flat[:, _to_orig(geo, p[pm])].astype(np.float64)
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


def _means(flat_labels: np.ndarray, emb_flat: np.ndarray, n: int) -> np.ndarray:
    """Mean embedding of every label 1..n (row 0 unused), shape (n + 1, E) float64.

    On large inputs the means come from every ``step``-th voxel (see ``_mean_step``); labels that got fewer
    than 4 samples are computed from all their voxels.
    """
    e = emb_flat.shape[0]
    step = _mean_step(flat_labels.size)
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


# --------------------------------------------------------------------------- the numpy twins in the kernels' place


def _geo_of(n_padded: int, kernel_geo: np.ndarray) -> _Padded:
    """The :class:`_Padded` geometry a kernel call describes (padded size and ``_Padded.kernel_geo``)."""
    ph, pw, pz, _, _, h, w = (int(v) for v in kernel_geo)
    return _Padded((n_padded // (ph * pw) - 2 * pz, h, w))


def core_reference(emb4: np.ndarray, tau2: float) -> np.ndarray:
    """``_k_core``'s signature, computed by :func:`_core_mask` (two threads: chunks in parallel where there are)."""
    return _core_mask(emb4, float(tau2), 2)


def grow_reference(lab, grow, offsets, cand, emb, mu, radius2, kernel_geo) -> None:
    """``_k_grow``'s signature (flat padded arrays, modified in place), computed by :func:`_grow`."""
    geo = _geo_of(lab.size, kernel_geo)
    assert np.array_equal(geo.offsets, offsets)
    _grow(lab.reshape(geo.pshape), grow.reshape(geo.pshape), geo, emb, mu, radius2)


def cluster_fast_reference(emb: np.ndarray, **kwargs) -> np.ndarray:
    """``cluster_fast`` with the numpy twins in place of the kernels: no raster sweep (growth in breadth-first
    rounds only), ``_merge_adjacent``'s numpy path for the touching pairs, :func:`_means` for the seed means."""
    with mock.patch.multiple(
        fast,
        _k_core=core_reference,
        _k_sweep=lambda *args: None,
        _k_grow=grow_reference,
        _k_adjacent_keys=lambda lab, n: None,
        _means=_means,
    ):
        return fast.cluster_fast(emb, **kwargs)
