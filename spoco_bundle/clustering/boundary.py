"""``boundary`` clustering: objects separated by membranes, cut along the foreground head's boundary map.

For images where objects touch on all sides and a thin membrane (EM neurites, epithelia) or a dark gap separates
them. The network's foreground head, trained on the annotated objects (label 0 between them is unlabeled or painted
background), is low on the membranes: a seeded watershed on its background probability separates the objects
where the embeddings of two *unannotated* neighbours are still too alike to cut (nothing in the sparse loss pushes
them apart; see docs/data.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from spoco_bundle.clustering._common import (
    _apply_lut,
    _check_background,
    _check_embeddings,
    _check_mask,
    _final_lut,
    _label_unseeded,
    relabel_consecutive,
)
from spoco_bundle.clustering._morphology import h_minima, watershed


def _check_foreground(foreground: np.ndarray, spatial: tuple[int, ...]) -> np.ndarray:
    fg = np.asarray(foreground, dtype=np.float32)
    if fg.shape != spatial:
        raise ValueError(f"foreground probability has shape {fg.shape}, the embeddings' spatial shape is {spatial}.")
    if not np.all(np.isfinite(fg)) or fg.min(initial=0.0) < 0 or fg.max(initial=0.0) > 1:
        raise ValueError("foreground must be a probability map with finite values in [0, 1].")
    return fg


def check_boundary_threshold(threshold: float | str) -> float | str:
    """``threshold`` of :func:`cluster_boundary` checked: a number in (0, 1) (returned as float) or ``"median"``;
    ValueError naming the option otherwise."""
    if threshold == "median":
        return threshold
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value < 1:
        raise ValueError(f"boundary_threshold must be a number in (0, 1) or 'median', got {threshold!r}.")
    return value


def _contact_weight(graph, src: int, dst: int, n: int) -> dict:
    """The merged region's contact with ``n``: the pixel-weighted mean of its two parts' contacts."""
    default = {"weight": 0.0, "count": 0}
    a, b = graph[src].get(n, default), graph[dst].get(n, default)
    count = a["count"] + b["count"]
    return {"count": count, "weight": (a["count"] * a["weight"] + b["count"] * b["weight"]) / count}


def _merge_nothing(graph, src: int, dst: int) -> None:
    """Node data needs no update: the contacts (edges) carry everything :func:`_contact_weight` uses."""


def _merge_weak_contacts(labels: np.ndarray, elevation: np.ndarray, merge: float) -> tuple[np.ndarray, int]:
    """Step 4 of :func:`cluster_boundary`: ``labels`` (0 outside the region) with weakly separated neighbours merged;
    returns the new labels (ids 1..n, 0 kept) and n."""
    from skimage import graph as skgraph

    rag = skgraph.rag_boundary(labels, elevation.astype(np.float64), connectivity=1)
    if rag.has_node(0):
        rag.remove_node(0)  # outside the region (a given mask): never merged into
    merged = skgraph.merge_hierarchical(
        labels,
        rag,
        thresh=merge,
        rag_copy=False,
        in_place_merge=True,
        merge_func=_merge_nothing,
        weight_func=_contact_weight,
    )
    # merge_hierarchical numbers from 0 in the order it meets ids; keep 0 for the outside
    merged = relabel_consecutive(np.where(labels > 0, merged + 1, 0))
    return merged, int(merged.max())


def cluster_boundary(
    emb: np.ndarray,
    foreground: np.ndarray,
    delta_v: float = 0.5,
    delta_d: float = 2.0,
    min_size: int = 16,
    fg_mask: np.ndarray | None = None,
    background: str = "none",
    threshold: float | str = 0.5,
    h: float = 3.0,
    sigma: float = 0.0,
    spacing: Sequence[float] | None = None,
    merge: float = 0.0,
) -> np.ndarray:
    """Seeded watershed on the foreground head's boundary map.

    1. Seeds: the distance transform of the object interiors (``foreground > threshold``, inside ``fg_mask``;
       ``threshold`` ``"median"``: the median of ``foreground`` over the region, so that the upper half of the map is
       interior whatever the head's calibration; under blockwise inference, the block's),
       in physical units when ``spacing`` is given, smoothed by one voxel; its h-maxima (maxima at least ``h``
       above every path to a higher one: one seed per object interior, as in the classical membrane pipelines);
       connected seeds are one marker.
    2. Watershed from the markers over ``1 - foreground`` (Gaussian-smoothed by ``sigma`` voxels), inside
       ``fg_mask`` when given, else over every voxel: a partition of the image into objects, membranes included,
       as EM segmentations are scored (ARAND, VOI).
    3. A connected part of the region without a seed is one object of its own.
    4. With ``merge`` > 0, neighbouring regions merge, the weakest contact first, while the mean boundary value
       (``1 - foreground``, smoothed as above) along their contact stays below ``merge``: a seed too many (an
       object cut by an inner structure the head calls membrane) costs no split where the cut is faint
       (hierarchical merging of the region adjacency graph, :func:`skimage.graph.merge_hierarchical`).
    Then the shared post-processing (``min_size``, ``background``, consecutive ids; see
    :mod:`spoco_bundle.clustering`).

    The embeddings are checked for shape only: the cut follows the head. Measured on ISBI 2012 (EM neurites,
    ``python -m research.accuracy``): see docs/results.md. ``delta_v`` and ``delta_d`` are
    accepted for a uniform call signature and not used.

    Args:
        emb: embeddings ``(E, H, W)`` or ``(E, D, H, W)``.
        foreground: the head's (calibrated) foreground probability, the embeddings' spatial shape, values in [0, 1].
        min_size, fg_mask, background: shared post-processing, see :mod:`spoco_bundle.clustering`; ``background``
            ``"auto"`` means ``"none"`` here (a partition keeps every region).
        threshold: foreground probability above which a voxel is object interior for the seeds, or ``"median"``
            (per image: the median over the clustered region; for tissue that cells tile, where a head trained on a
            few cells can sit far above or below 0.5 on another volume).
        h: minimum height of a seed's dome in the distance transform, in voxels (or in ``spacing``'s unit):
            larger merges more, smaller splits more.
        sigma: smoothing of the boundary map in voxels (0: none).
        spacing: voxel size per spatial axis for the distance transform (default isotropic).
        merge: boundary value in [0, 1) below which neighbouring regions merge (0: no merging).

    Returns:
        int32 labels of the spatial shape, 0 = background (outside ``fg_mask``, or removed small regions).
    """
    emb = _check_embeddings(emb)
    spatial = emb.shape[1:]
    fg = _check_foreground(foreground, spatial)
    fg_mask = _check_mask(fg_mask, spatial)
    background = "none" if background == "auto" else _check_background(background, fg_mask)
    median = check_boundary_threshold(threshold) == "median"
    if not h > 0 or not sigma >= 0 or not 0 <= merge < 1:
        raise ValueError(f"need h > 0, sigma >= 0 and 0 <= merge < 1; got {h}, {sigma}, {merge}.")
    if spacing is not None and (len(spacing) != len(spatial) or not all(float(s) > 0 for s in spacing)):
        raise ValueError(f"spacing needs one positive value per spatial axis {spatial}, got {spacing}.")
    region = np.ones(spatial, bool) if fg_mask is None else fg_mask
    if not region.any():
        return np.zeros(spatial, np.int32)
    if median:
        threshold = float(np.median(fg[region]))
    interior = region & (fg > threshold)  # the head's, also inside a given mask (which may span membranes)
    if median and not interior.any():  # more than half of the map at one value (a saturated or constant head)
        interior = region & (fg >= threshold)
    # smoothed by one voxel along every axis: a ragged mask edge makes spurious maxima
    dist = ndimage.gaussian_filter(ndimage.distance_transform_edt(interior, sampling=spacing), 1.0)
    seeds = h_minima(-dist, float(h)).astype(bool) & interior  # the h-maxima of the distance
    markers, n = ndimage.label(seeds)
    elevation = 1.0 - (ndimage.gaussian_filter(fg, sigma) if sigma > 0 else fg)
    labels = watershed(elevation, markers, mask=region)
    n = _label_unseeded(labels, region, n)  # no seed: no interior deeper than h, or no interior at all
    if merge > 0 and n > 1:
        labels, n = _merge_weak_contacts(labels, elevation, merge)
    sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
    return _apply_lut(labels, _final_lut(np.arange(n + 1), sizes, min_size, background))
