"""``consistency`` clustering of the SPOCO paper: cluster the student embeddings with a base method, keep the
clusters that the second (EMA teacher) embedding reproduces."""

from __future__ import annotations

import numpy as np

from spoco_bundle.clustering._common import (
    _CHUNK_VOXELS,
    _apply_lut,
    _check_background,
    _check_embeddings,
    _check_mask,
    _finalize,
)
from spoco_bundle.clustering.boundary import cluster_boundary
from spoco_bundle.clustering.density import cluster_hdbscan, cluster_meanshift
from spoco_bundle.clustering.fast import cluster_fast
from spoco_bundle.clustering.watershed import cluster_watershed

# the methods consistency clustering can start from (every method but itself; the package's CLUSTERING_METHODS adds it)
BASE_METHODS = {
    "fast": cluster_fast,
    "hdbscan": cluster_hdbscan,
    "meanshift": cluster_meanshift,
    "watershed": cluster_watershed,
    "boundary": cluster_boundary,
}


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
        method: base clustering of f, any name of :data:`BASE_METHODS`.
        min_size: minimum object size, applied before and after the consistency test.
        fg_mask: optional boolean foreground mask.
        background: ``"largest"``, ``"none"`` or ``"auto"``.
        kwargs: passed to the base clustering.
    """
    emb_f = _check_embeddings(emb_f, "emb_f")
    emb_g = _check_embeddings(emb_g, "emb_g")
    if emb_f.shape != emb_g.shape:
        raise ValueError(f"emb_f and emb_g must have the same shape, got {emb_f.shape} and {emb_g.shape}.")
    if method not in BASE_METHODS:
        raise ValueError(f"method must be one of {sorted(BASE_METHODS)}, got {method!r}.")
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}.")
    fg_mask = _check_mask(fg_mask, emb_f.shape[1:])
    background = _check_background(background, fg_mask)
    labels = BASE_METHODS[method](
        emb_f, delta_v=delta_v, min_size=min_size, fg_mask=fg_mask, background=background, **kwargs
    )
    median_iou = _consistency_iou(labels, emb_g.reshape(emb_g.shape[0], -1), fg_mask, delta_v, n_samples, seed)
    keep = median_iou >= iou_threshold
    keep[0] = False
    lut = np.where(keep, np.arange(len(keep)), 0)
    return _finalize(_apply_lut(labels, lut), min_size, "none", None)
