"""The reference's point clusterings, ``hdbscan`` (hdbscan package) and ``meanshift`` (``sklearn.cluster.MeanShift``),
on a random subsample of at most ``max_points`` foreground voxels; the other voxels are assigned to the nearest
cluster mean within ``assign_radius`` (default ``delta_d``, see :func:`~spoco_bundle.clustering.assign_to_means`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from spoco_bundle.clustering._common import (
    _CHUNK_VOXELS,
    _check_background,
    _check_embeddings,
    _check_mask,
    _finalize,
    assign_to_means,
)

# ------------------------------------------------------------------------------ subsampled point clustering


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


# -------------------------------------------------------------------------------------------------- hdbscan


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


# ----------------------------------------------------------------------------------------------- mean-shift


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
