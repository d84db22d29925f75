"""``watershed`` clustering (the bundle's default, ``clustering`` in configs/inference.json): seeded watershed on
the embedding-edge map, then touching regions with close means merged (scikit-image)."""

from __future__ import annotations

from collections.abc import Sequence

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
    _label_unseeded,
    _means,
    _merge_adjacent,
)
from spoco_bundle.clustering._morphology import h_minima, watershed


def _edge_strength(emb: np.ndarray) -> np.ndarray:
    """Per voxel the largest embedding distance to a face neighbour, float32."""
    emb4 = emb if emb.ndim == 4 else emb[:, None]
    return _k_edges(np.ascontiguousarray(emb4, dtype=np.float32)).reshape(emb.shape[1:])


def _k_edges(emb: np.ndarray) -> np.ndarray:
    """:func:`_edge_strength` compiled, a slab of the first axis per thread, channels in the outer loop (the
    embeddings are channel-first: rows stay contiguous)."""
    e, nz, ny, nx = emb.shape
    out = np.empty((nz, ny, nx), np.float32)
    for z in numba.prange(nz):
        up = np.zeros((ny, nx), np.float32)  # squared distance to (z + 1, y, x)
        down = np.zeros((ny, nx), np.float32)  # to (z - 1, y, x)
        south = np.zeros((ny, nx), np.float32)  # to (z, y + 1, x)
        east = np.zeros((ny, nx), np.float32)  # to (z, y, x + 1)
        for c in range(e):
            for y in range(ny):
                for x in range(nx):
                    v = emb[c, z, y, x]
                    if z + 1 < nz:
                        t = emb[c, z + 1, y, x] - v
                        up[y, x] += t * t
                    if z > 0:
                        t = emb[c, z - 1, y, x] - v
                        down[y, x] += t * t
                    if y + 1 < ny:
                        t = emb[c, z, y + 1, x] - v
                        south[y, x] += t * t
                    if x + 1 < nx:
                        t = emb[c, z, y, x + 1] - v
                        east[y, x] += t * t
        for y in range(ny):
            for x in range(nx):
                best = max(up[y, x], down[y, x], south[y, x], east[y, x])
                if y > 0:
                    best = max(best, south[y - 1, x])
                if x > 0:
                    best = max(best, east[y, x - 1])
                out[z, y, x] = np.sqrt(best)
    return out


_k_edges = numba.njit(cache=True, parallel=True)(_k_edges)


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
    2. Seeds: the edge map's regional minima deeper than ``h`` (``delta_v``: a basin at least as deep as the pull
       margin, so texture inside an object seeds no second region; scikit-image ``h_minima``) inside ``fg_mask``;
       connected seeds are one marker.
    3. Watershed from the markers over the edge map, inside ``fg_mask`` (scikit-image ``watershed``): every voxel
       goes to the basin it drains into, so two touching objects are cut at the ridge between them even when the
       embedding changes in steps smaller than ``2 delta_v`` across their border (where :func:`cluster_fast`'s
       core test links them), as long as the smoothed ridge rises more than ``h`` above both basins: steps between
       about ``delta_v`` and ``2 delta_v`` by default; a gentler ramp stays one object unless ``h`` is lowered.
    4. Touching regions whose mean embeddings are closer than ``merge_threshold`` (``2 delta_v``) are merged
       (over-split objects); with ``background="largest"`` regions with a mean that close to the largest region's
       join it (enclosed background pockets), then the shared post-processing (see :mod:`spoco_bundle.clustering`).

    Measured on DSB2018 validation images (``python -m research.foreground``, same models and masks as ``fast``):
    research/README.md. ``delta_d`` is accepted for a uniform call signature and not used.

    Args:
        emb: embeddings ``(E, H, W)`` or ``(E, D, H, W)``.
        delta_v: pull margin of training; sets the defaults of ``h`` and ``merge_threshold``.
        min_size, fg_mask, background: shared post-processing, see :mod:`spoco_bundle.clustering`.
        sigma: smoothing of the edge map in voxels (0: none).
        h: minimum depth of a seed's basin, in embedding distance (default ``delta_v``; shallower basins split
            textured objects: research/pages/seed_depth.md).
        merge_threshold: touching regions with mean embeddings closer than this are merged (0: no merging).
    """
    emb = _check_embeddings(emb)
    fg_mask = _check_mask(fg_mask, emb.shape[1:])
    background = _check_background(background, fg_mask)
    h = delta_v if h is None else float(h)
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
    n = _label_unseeded(labels, region, n)
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
