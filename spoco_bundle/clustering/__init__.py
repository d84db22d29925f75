"""Clustering of pixel embeddings into instance labels.

Every function takes embeddings ``emb`` of shape ``(E, *S)`` (``S`` = ``(H, W)`` or ``(D, H, W)``, any float
dtype, used as float32) and returns an int32 label array of shape ``S``: 0 = background / unassigned,
1..n = instances, consecutive.

Methods, one module per family (:data:`CLUSTERING_METHODS` names them; :func:`cluster_embeddings` dispatches):

- :func:`cluster_watershed` (``watershed.py``; the bundle's default, ``clustering`` in configs/inference.json):
  seeded watershed on the embedding-edge map (largest embedding distance to a face neighbour, smoothed), seeds at
  its h-minima at least ``delta_v`` deep, then touching regions with close means merged (scikit-image). Cuts
  touching objects whose embeddings change across the border in steps ``fast`` links (under ``2 delta_v``) but
  not gentler than the seed depth.
- :func:`cluster_fast` (``fast.py``; the default ``method`` of :func:`cluster_embeddings` and the base clustering of
  ``consistency``): spatial, linear-time clustering built on the geometry the SPOCO losses train for (an object's
  voxels within ``delta_v`` of its mean, object means at least ``2 delta_d`` apart). Voxels whose embedding is
  within ``2 delta_v`` of every face neighbour are "core" voxels; connected components of core voxels are seeds;
  the remaining voxels (object borders, outliers) are grown into the adjacent seed with the nearest mean
  embedding; touching components with close means are merged. See its docstring for why and for the measured
  speed. Its loops are numba-compiled kernels.
- :func:`cluster_hdbscan`, :func:`cluster_meanshift` (``density.py``): the reference's methods (hdbscan package,
  ``sklearn.cluster.MeanShift``), on a random subsample of at most ``max_points`` voxels; the other voxels are
  assigned to the nearest cluster mean (see :func:`assign_to_means`).
- :func:`cluster_consistency` (``consistency.py``): the paper's consistency clustering with a second (EMA teacher)
  embedding.
- :func:`cluster_boundary` (``boundary.py``): for objects separated by membranes (EM, epithelia): seeded watershed
  on the foreground head's boundary map (takes the head's probability as ``foreground``), seeds at the maxima of
  the foreground's distance transform.

Shared post-processing (``_common.py``), in this order: ``fg_mask`` (voxels outside are never clustered: set to 0
*before* clustering, which also makes clustering faster), minimum object size (``min_size`` voxels), background
removal (``background="largest"`` drops the largest remaining cluster, the reference's choice; ``"auto"`` does that
only when no ``fg_mask`` is given), consecutive relabelling.

After clustering: :func:`split_by_shape` (``shape.py``) splits objects shaped like joined round objects.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from spoco_bundle.clustering._common import (
    BACKGROUND_MODES,
    assign_to_means,
    filter_small,
    relabel_consecutive,
    remove_background,
)
from spoco_bundle.clustering.boundary import check_boundary_threshold, cluster_boundary
from spoco_bundle.clustering.consistency import BASE_METHODS, cluster_consistency
from spoco_bundle.clustering.density import cluster_hdbscan, cluster_meanshift
from spoco_bundle.clustering.fast import cluster_fast
from spoco_bundle.clustering.shape import split_by_shape
from spoco_bundle.clustering.watershed import cluster_watershed

__all__ = [
    "CLUSTERING_METHODS",
    "BACKGROUND_MODES",
    "cluster_embeddings",
    "cluster_fast",
    "cluster_hdbscan",
    "cluster_meanshift",
    "cluster_watershed",
    "cluster_consistency",
    "check_boundary_threshold",
    "cluster_boundary",
    "split_by_shape",
    "assign_to_means",
    "remove_background",
    "filter_small",
    "relabel_consecutive",
]


CLUSTERING_METHODS: dict[str, Callable[..., np.ndarray]] = {**BASE_METHODS, "consistency": cluster_consistency}


def cluster_embeddings(emb: np.ndarray, method: str = "fast", **kwargs) -> np.ndarray:
    """Cluster embeddings ``(E, *S)`` into int32 instance labels ``S`` with the named method.

    Args:
        emb: embeddings ``(E, H, W)`` or ``(E, D, H, W)``; for ``"consistency"`` the student's (pass the
            teacher's as ``emb_g``); for ``"boundary"`` pass the head's probability as ``foreground``.
        method: one of ``"fast"``, ``"watershed"``, ``"hdbscan"``, ``"meanshift"``, ``"consistency"``,
            ``"boundary"``.
        kwargs: keyword arguments of the method's function.
    """
    if method not in CLUSTERING_METHODS:
        raise ValueError(f"Unknown clustering method {method!r}; valid methods: {sorted(CLUSTERING_METHODS)}.")
    if method == "consistency":
        if "emb_g" not in kwargs:
            raise ValueError("method 'consistency' needs the teacher embeddings as keyword argument emb_g.")
        return cluster_consistency(emb, kwargs.pop("emb_g"), **kwargs)
    if method == "boundary" and "foreground" not in kwargs:
        raise ValueError("method 'boundary' needs the foreground head's probability as keyword argument foreground.")
    return CLUSTERING_METHODS[method](emb, **kwargs)
