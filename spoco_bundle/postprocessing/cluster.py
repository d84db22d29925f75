"""Clustering the embeddings into instances (:mod:`spoco_bundle.clustering` as a transform)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type
from scipy.special import expit

from spoco_bundle.clustering import check_boundary_threshold, cluster_embeddings
from spoco_bundle.postprocessing._common import (
    _check_background,
    _check_method,
    _given_mask,
    _mask_from,
    check_network_output,
    embedding_channels,
)

__all__ = ["ClusterInstances", "ClusterInstancesd"]

# methods whose clustering itself depends on the minimum size (not only a filter of their result)
_SIZE_AWARE_METHODS = ("hdbscan", "consistency")


class ClusterInstances(Transform):
    """
    Cluster the embeddings of a network output ``(C, *S)`` into instance labels ``(1, *S)`` (int32, 0 = background,
    1..n consecutive) with :func:`spoco_bundle.clustering.cluster_embeddings`, inside a foreground mask when one is
    given.

    Args:
        method: ``"fast"`` (default), ``"watershed"``, ``"hdbscan"``, ``"meanshift"``, ``"consistency"`` (then
            the input holds ``2 * embedding_dim`` (+1) channels: student embeddings, teacher embeddings, see
            :class:`~spoco_bundle.inferers.StudentTeacherNet`) or ``"boundary"`` (cuts along the foreground head's
            map, which it then needs: :func:`~spoco_bundle.clustering.cluster_boundary`).
        embedding_dim: E; the first E channels are the embeddings (a further channel, the foreground logit, is not
            used here: :class:`ForegroundMask`).
        background: what is background when no mask is given: ``"largest"`` drops the largest cluster (models
            trained without annotated background, the reference's rule), ``"none"`` keeps every cluster;
            ``"head"`` needs the mask (:class:`ForegroundMask`). With a mask, only voxels inside it are clustered
            and every cluster is kept.
        delta_v, delta_d: the training margins, passed to every method, which derive their distance scales from
            them. ``delta_d`` sets ``fast``'s first growth radius (``assign_radius``) and, for ``hdbscan`` and
            ``meanshift``, the radius within which the voxels outside the random subsample (``max_points``) join
            the nearest cluster mean; ``consistency`` passes it on to its base clustering (``fast``); ``watershed``
            does not use it (its seed depth and merge threshold come from ``delta_v``).
        min_size: the minimum size of the methods whose clustering depends on it: ``hdbscan`` (HDBSCAN's minimum
            cluster size) and ``consistency`` (smaller clusters are dropped before its test). The other methods keep
            clusters of every size: removing small objects is :class:`RemoveSmallInstances`'s step (after the shape
            split; the result is the same as removing them while clustering).
        boundary_merge: ``"boundary"`` only (the other methods have no such step): neighbouring regions whose mean
            boundary value along their contact stays below it merge (:func:`~spoco_bundle.clustering.cluster_boundary`'s
            ``merge``; 0: none; configs/inference.json's ``boundary_merge``).
        boundary_threshold: ``"boundary"`` only: the head's probability above which a voxel is an object interior
            for the seeds, a number in (0, 1) or ``"median"`` (per image, the upper half of the head's map;
            :func:`~spoco_bundle.clustering.cluster_boundary`'s ``threshold``; configs' ``boundary_threshold``).
        kwargs: further arguments of the clustering function.

    Input: the network output ``(C, *S)``, C = the embedding channels (+1 with the head); S of 2 or 3 axes.

    Output: int32 labels ``(1, *S)`` of the input's kind (tensor / MetaTensor with its meta / numpy, same device).

    Raises:
        ValueError: a bad option; an input of the wrong shape; ``"head"`` without a mask; a mask of another shape.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self,
        method: str = "fast",
        embedding_dim: int = 16,
        background: str = "largest",
        delta_v: float = 0.5,
        delta_d: float = 2.0,
        min_size: int = 1,
        boundary_merge: float = 0.0,
        boundary_threshold: float | str = 0.5,
        **kwargs: Any,
    ) -> None:
        self.method = _check_method(method)
        if not 0 <= float(boundary_merge) < 1:
            raise ValueError(f"boundary_merge must be in [0, 1), got {boundary_merge!r}.")
        self.boundary_merge = float(boundary_merge)
        self.boundary_threshold = check_boundary_threshold(boundary_threshold)
        if method == "boundary" and {"threshold", "merge"} & set(kwargs):
            raise ValueError(
                "for clustering 'boundary' give boundary_threshold / boundary_merge, not threshold / merge."
            )
        embedding_channels(embedding_dim, method)
        self.embedding_dim = int(embedding_dim)
        self.background = _check_background(background)
        self.delta_v = delta_v
        self.delta_d = delta_d
        if int(min_size) < 0:
            raise ValueError(f"min_size must be >= 0, got {min_size!r}.")
        self.min_size = int(min_size)
        self.kwargs = kwargs

    def __call__(self, pred: NdarrayOrTensor, fg_mask: Any = None) -> NdarrayOrTensor:
        """
        Args:
            pred: network output ``(C, *S)``.
            fg_mask: foreground mask ``S`` or ``(1, *S)`` (nonzero = foreground, e.g. from :class:`ForegroundMask`),
                or None.
        """
        check_network_output(pred, self.embedding_dim, self.method, "ClusterInstances")
        arr = np.asarray(convert_data_type(pred, np.ndarray, dtype=np.float32)[0])
        e = self.embedding_dim
        if fg_mask is not None:
            fg_mask = _given_mask(fg_mask, arr.shape[1:])
            background = "none"
        elif self.background == "head":
            raise ValueError(
                "background='head' clusters inside the head's foreground mask, and none was given "
                "(spoco_bundle.postprocessing.ForegroundMask makes it)."
            )
        else:
            background = self.background
        kwargs = dict(
            self.kwargs,
            delta_v=self.delta_v,
            delta_d=self.delta_d,  # every method takes it (consistency passes it on to its base clustering)
            min_size=self.min_size if self.method in _SIZE_AWARE_METHODS else 1,
            fg_mask=fg_mask,
            background=background,
        )
        if self.method == "consistency":
            kwargs["emb_g"] = arr[e : 2 * e]
        if self.method == "boundary":
            if arr.shape[0] != e + 1:
                raise ValueError(
                    "clustering 'boundary' cuts along the foreground head's map: it needs a network with a foreground "
                    f"head ({e + 1} channels), got {arr.shape[0]}."
                )
            kwargs["foreground"] = expit(arr[e])  # the calibrated probability, without exp overflow
            kwargs["merge"] = self.boundary_merge
            kwargs["threshold"] = self.boundary_threshold
        labels = cluster_embeddings(arr[:e], method=self.method, **kwargs).astype(np.int32)
        return convert_to_dst_type(labels[None], pred, dtype=torch.int32)[0]


class ClusterInstancesd(MapTransform):
    """
    Dictionary version of :class:`ClusterInstances`: replaces the network outputs ``keys`` by their instance labels,
    clustered inside the mask under ``mask_key`` when the data holds one (from :class:`ForegroundMaskd`).

    Args:
        keys: the network outputs.
        mask_key: key of the foreground mask ``(1, *S)``; None: never look for one.
        allow_missing_keys: don't raise for missing keys.
        kwargs: arguments of :class:`ClusterInstances`.

    Raises:
        TypeError: when ``mask_key`` still holds a file name (not loaded).
    """

    backend = ClusterInstances.backend

    def __init__(
        self,
        keys: KeysCollection = "pred",
        mask_key: str | None = "foreground_mask",
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.cluster = ClusterInstances(**kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        fg_mask = _mask_from(d, self.mask_key)
        for key in self.key_iterator(d):
            d[key] = self.cluster(d[key], fg_mask)
        return d
