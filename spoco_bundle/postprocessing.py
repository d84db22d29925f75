"""Post-processing of the network output into instance labels, one step per transform (array and dictionary
versions, MONAI style); the plain functions behind them are in :mod:`spoco_bundle.clustering`.

``configs/inference.json`` chains them after the inferer, on ``pred`` (the network output ``(C, *S)``: ``E``
embedding channels, ``E`` more of the teacher for ``consistency``, then the foreground logit when the network has
the head)::

    ForegroundMaskd        the foreground: a given mask file, else the head's probability > foreground_threshold
                           (background "head"), else none                      -> foreground_mask (1, *S) bool
    ClusterInstancesd      cluster the embeddings (clustering) inside foreground_mask; without one, background
                           "largest" drops the largest cluster                  -> pred = labels (1, *S) int32
    SplitByShaped          split objects shaped like joined round objects (shape_split; 0: off)
    RemoveSmallInstancesd  remove objects under min_size voxels or min_diameter_ratio of the training objects'
                           diameter (recorded in the model; min_size alone inside a given mask), ids 1..n
    WarnFewInstancesd      warn (naming the file) when far fewer objects are found than the segmented area holds
                           of the training objects' size: most of them merged
    GrowInstancesd         draw objects out into the voxels near them where the head's probability is above
                           foreground_grow (below the mask's threshold; head masks only)
    ResizeToMatchd         the labels onto the image's grid (nearest neighbour), when the network ran on a
                           resampled grid (image_scale; ScaledInferer output_grid "network": clustering and
                           min_size there, where objects have their training size); 0 outside a given mask

A given foreground mask is kept as it is (``given_foreground_mask``, MONAI's ``CopyItemsd``) and resized onto the
output's grid the same way (``ResizeToMatchd`` on ``foreground_mask``) before ``ForegroundMaskd``.

:class:`~spoco_bundle.transforms.ClusterEmbeddings` is the same chain in one transform.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type, convert_to_numpy
from scipy.special import expit

from spoco_bundle.clustering import (
    CLUSTERING_METHODS,
    check_boundary_threshold,
    check_foreground_threshold,
    cluster_embeddings,
    filter_small,
    grow_into_foreground,
    head_threshold,
    relabel_consecutive,
    split_by_shape,
)

logger = logging.getLogger(__name__)

# what WarnFewInstances says a collapsed segmentation means (tests look for it)
FEW_INSTANCES = "most objects are probably merged."

__all__ = [
    "BACKGROUND_CHOICES",
    "FEW_INSTANCES",
    "check_grow_threshold",
    "check_network_output",
    "embedding_channels",
    "ForegroundMask",
    "ForegroundMaskd",
    "ClusterInstances",
    "ClusterInstancesd",
    "SplitByShape",
    "SplitByShaped",
    "RemoveSmallInstances",
    "RemoveSmallInstancesd",
    "WarnFewInstances",
    "WarnFewInstancesd",
    "GrowInstances",
    "GrowInstancesd",
    "ResizeToMatch",
    "ResizeToMatchd",
]

# the ``background`` id of configs/inference.json: where the foreground comes from when no mask file is given
BACKGROUND_CHOICES = ("head", "largest", "none")

# methods whose clustering itself depends on the minimum size (not only a filter of their result)
_SIZE_AWARE_METHODS = ("hdbscan", "consistency")


def _check_background(background: str) -> str:
    if background not in BACKGROUND_CHOICES:
        raise ValueError(f"background must be 'largest', 'head' or 'none', got {background!r}.")
    return background


def _check_method(method: str) -> str:
    if method not in CLUSTERING_METHODS:
        raise ValueError(f"Unknown clustering method {method!r}; valid methods: {sorted(CLUSTERING_METHODS)}.")
    return method


def embedding_channels(embedding_dim: int, method: str) -> int:
    """Channels of the network output before the foreground logit: ``E``, or ``2 E`` for ``consistency`` (student and
    teacher embeddings, see :class:`~spoco_bundle.inferers.StudentTeacherNet`)."""
    if int(embedding_dim) < 1:
        raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim!r}.")
    return 2 * int(embedding_dim) if method == "consistency" else int(embedding_dim)


def check_network_output(pred: Any, embedding_dim: int, method: str, name: str) -> tuple[int, ...]:
    """Check that ``pred`` is a network output ``(C, *S)`` for ``method``: C = the embedding channels (+1 with the
    foreground head), 2 or 3 spatial axes. Returns its shape.

    Raises:
        ValueError: naming ``name``, the expected channels and the shape got.
    """
    n_emb = embedding_channels(embedding_dim, method)
    shape = tuple(pred.shape)
    if len(shape) not in (3, 4) or shape[0] not in (n_emb, n_emb + 1):
        raise ValueError(
            f"{name} expects ({n_emb} or {n_emb + 1}, *spatial) for method {method!r} "
            f"and embedding_dim {embedding_dim}, got shape {shape}."
        )
    return shape


def _given_mask(mask: Any, spatial: tuple[int, ...]) -> np.ndarray:
    """A given foreground mask ``S`` or ``(1, *S)`` as a bool array ``S`` (nonzero = foreground)."""
    if isinstance(mask, (str, os.PathLike)):
        raise TypeError(
            f"the foreground mask is still a file name ({os.fspath(mask)}): load it first "
            "(spoco_bundle.transforms.LoadForegroundMaskd in the preprocessing)."
        )
    mask = np.asarray(convert_to_numpy(mask))
    if mask.ndim == len(spatial) + 1 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.shape != tuple(spatial):
        raise ValueError(
            f"the foreground mask has shape {mask.shape}, the network output the spatial shape {tuple(spatial)}; "
            "they must match."
        )
    return mask != 0


def _check_labels(labels: Any, name: str) -> np.ndarray:
    """Instance labels ``(1, *S)`` (S of 2 or 3 axes), non-negative integers, as a numpy array."""
    arr = np.asarray(convert_to_numpy(labels))
    if arr.ndim not in (3, 4) or arr.shape[0] != 1:
        raise ValueError(f"{name} expects instance labels (1, *spatial) with 2 or 3 spatial axes, got {arr.shape}.")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise ValueError(f"{name} expects integer instance labels, got {arr.dtype}.")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} expects instance labels >= 0 (0 = background), got min {arr.min()}.")
    return arr.astype(np.int32) if arr.dtype == bool else arr


def _mask_from(data: Mapping[Hashable, Any], mask_key: str | None) -> Any:
    mask = data.get(mask_key) if mask_key is not None else None
    if isinstance(mask, (str, os.PathLike)):
        raise TypeError(
            f"'{mask_key}' is still a file name ({os.fspath(mask)}): load it first "
            "(spoco_bundle.transforms.LoadForegroundMaskd in the preprocessing)."
        )
    return mask


# ------------------------------------------------------------------------------------------------- foreground


class ForegroundMask(Transform):
    """
    The foreground to cluster in: a given mask, else the foreground head's probability above a threshold
    (``background="head"``), else none (``"largest"`` / ``"none"``: every voxel is clustered).

    Args:
        background: ``"head"``: voxels whose foreground probability (sigmoid of the last channel) is above
            ``threshold`` (models trained with ``background_label``); ``"largest"`` or ``"none"``: no mask (the
            clustering then decides, see :class:`ClusterInstances`). A mask given to the call (a foreground mask
            file, :class:`~spoco_bundle.transforms.LoadForegroundMaskd`) replaces all of them.
        threshold: probability threshold of the head in (0, 1), or ``"otsu"``: per image, from the head's own
            probability map (:func:`~spoco_bundle.clustering.head_threshold`).
        embedding_dim: E, the embedding channels of the network.
        method: the clustering method the output is for; ``"consistency"`` outputs hold ``2 E`` embedding channels
            (student, teacher) before the head.

    Input: the network output ``(C, *S)``, C = the embedding channels (+1 with the head); S of 2 or 3 axes.

    Output: a bool mask ``(1, *S)`` of the input's kind (tensor / MetaTensor / numpy, same device), or None (no
    mask).

    Raises:
        ValueError: a bad option; an input of the wrong shape; ``"head"`` without a head channel; a given mask
            whose spatial shape differs from the output's.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self,
        background: str = "head",
        threshold: float | str = 0.5,
        embedding_dim: int = 16,
        method: str = "fast",
    ) -> None:
        self.background = _check_background(background)
        self.threshold = check_foreground_threshold(threshold)  # an error now, not per image
        self.method = _check_method(method)
        self.n_emb = embedding_channels(embedding_dim, method)
        self.embedding_dim = int(embedding_dim)

    def __call__(self, pred: NdarrayOrTensor, mask: Any = None) -> NdarrayOrTensor | None:
        """
        Args:
            pred: network output ``(C, *S)``.
            mask: a given foreground mask ``S`` or ``(1, *S)`` (nonzero = foreground), used as it is (the head is
                then not needed); None: ``background`` decides.
        """
        shape = check_network_output(pred, self.embedding_dim, self.method, "ForegroundMask")
        if mask is not None:
            fg = _given_mask(mask, shape[1:])
        elif self.background == "head":
            logit = self._head_logit(pred, shape, "background='head'")
            t = head_threshold(logit, self.threshold)
            fg = logit > np.log(t / (1.0 - t))  # sigmoid(x) > t  <=>  x > logit(t)
        else:
            return None
        return convert_to_dst_type(fg[None], pred, dtype=torch.bool)[0]

    def probability(self, pred: NdarrayOrTensor) -> NdarrayOrTensor:
        """The head's foreground probability ``(1, *S)`` (float32, the input's kind) of a network output ``(C, *S)``.

        Raises:
            ValueError: an input of the wrong shape, or a network without a foreground head.
        """
        shape = check_network_output(pred, self.embedding_dim, self.method, "ForegroundMask")
        logit = self._head_logit(pred, shape, "the head's probability")
        return convert_to_dst_type(expit(logit)[None], pred, dtype=torch.float32)[0]

    def _head_logit(self, pred: NdarrayOrTensor, shape: tuple[int, ...], what: str) -> np.ndarray:
        """The foreground logit ``S`` (float32 numpy) of an output of (checked) ``shape``; ``what`` needs it."""
        if shape[0] != self.n_emb + 1:
            raise ValueError(f"{what} needs a network with a foreground head (one extra channel).")
        return np.asarray(convert_data_type(pred[-1], np.ndarray, dtype=np.float32)[0])


class ForegroundMaskd(MapTransform):
    """
    Dictionary version of :class:`ForegroundMask`: puts the foreground of the network output ``keys`` under
    ``mask_key``. A mask already there (a loaded mask file) is kept (checked against the output's shape); without
    one, ``background="head"`` writes the head's mask there and ``"largest"`` / ``"none"`` leave the key absent.

    Args:
        keys: the network output (one key).
        mask_key: where a given mask is and the foreground goes (``"foreground_mask"``, as
            :class:`~spoco_bundle.transforms.LoadForegroundMaskd` and :class:`ClusterInstancesd`).
        probability_key: where to put the head's foreground probability ``(1, *S)`` (float32) when the mask is the
            head's (for :class:`GrowInstancesd`); None: nowhere. Nothing is put there for a given mask.
        allow_missing_keys: don't raise for a missing output.
        kwargs: arguments of :class:`ForegroundMask` (``background``, ``threshold``, ``embedding_dim``,
            ``method``).

    Raises:
        ValueError: for more than one key (one mask per item).
        TypeError: when ``mask_key`` still holds a file name (not loaded).
    """

    backend = ForegroundMask.backend

    def __init__(
        self,
        keys: KeysCollection = "pred",
        mask_key: str = "foreground_mask",
        probability_key: str | None = None,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"ForegroundMaskd makes one mask ('{mask_key}') from one output; got keys {self.keys}.")
        self.mask_key = mask_key
        self.probability_key = probability_key
        self.foreground = ForegroundMask(**kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            given = _mask_from(d, self.mask_key)
            mask = self.foreground(d[key], given)
            if mask is not None:
                d[self.mask_key] = mask
                if self.probability_key is not None and given is None:
                    d[self.probability_key] = self.foreground.probability(d[key])
        return d


# ------------------------------------------------------------------------------------------------- clustering


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


# ---------------------------------------------------------------------------------------------- shape split


class SplitByShape(Transform):
    """
    Split objects shaped like two (or more) joined round objects (touching nuclei the embeddings did not separate),
    with :func:`spoco_bundle.clustering.split_by_shape`; 0 turns it off.

    Args:
        h: relative depth of the distance transform's maxima that become parts, in [0, 1) (smaller splits more;
            0: off, the labels pass unchanged).
        min_size: a split that would leave a part smaller than this many voxels is not made.
        sigma: smoothing of the distance transform in voxels of the finest axis.

    Input: instance labels ``(1, *S)`` (non-negative integers, 0 = background), S of 2 or 3 axes.

    Output: int32 labels of the input's kind: unsplit objects keep their id, new parts get ids after the largest.

    Raises:
        ValueError: a bad option; labels of the wrong shape or type.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, h: float = 0.1, min_size: int = 1, sigma: float = 1.0) -> None:
        if not 0 <= float(h) < 1:
            raise ValueError(f"h (shape_split) must be in [0, 1) (0: off), got {h!r}.")
        if not float(sigma) >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma!r}.")
        self.h = float(h)
        self.min_size = max(1, int(min_size))
        self.sigma = float(sigma)

    def __call__(self, labels: NdarrayOrTensor, spacing: Sequence[float] | None = None) -> NdarrayOrTensor:
        """
        Args:
            labels: instance labels ``(1, *S)``.
            spacing: voxel size per spatial axis (default: the MetaTensor's, else isotropic).
        """
        arr = _check_labels(labels, "SplitByShape")
        if self.h == 0:
            return labels
        if spacing is None and isinstance(labels, MetaTensor):
            spacing = [float(v) for v in labels.pixdim]
        if spacing is not None:  # a 2D image's affine may be 4x4 (a third, unused axis)
            spacing = list(spacing)[: arr.ndim - 1] if len(spacing) >= arr.ndim - 1 else None
        out = split_by_shape(arr[0], h=self.h, sigma=self.sigma, spacing=spacing, min_size=self.min_size)
        return convert_to_dst_type(out[None], labels, dtype=torch.int32)[0]


class SplitByShaped(MapTransform):
    """
    Dictionary version of :class:`SplitByShape`.

    Args:
        keys: the instance labels.
        image_key: the input image, a MetaTensor whose voxel size the split uses (the output of a
            :class:`~spoco_bundle.inferers.ScaledInferer` is a plain tensor on the image's grid); None, or no
            MetaTensor there: the labels' own.
        allow_missing_keys: don't raise for missing keys.
        kwargs: arguments of :class:`SplitByShape` (``h``, ``min_size``, ``sigma``).
    """

    backend = SplitByShape.backend

    def __init__(
        self,
        keys: KeysCollection = "pred",
        image_key: str | None = "image",
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.split = SplitByShape(**kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d.get(self.image_key) if self.image_key is not None else None
        for key in self.key_iterator(d):
            d[key] = self.split(d[key], spacing=_grid_spacing(image, d[key]))
        return d


def _grid_spacing(image: Any, labels: Any) -> list[float] | None:
    """The voxel size of ``labels`` ``(1, *S)``: the image's (a MetaTensor ``(C, *S_image)``), scaled by
    ``S_image / S`` when the labels lie on a resampled grid; None without a MetaTensor image."""
    if not isinstance(image, MetaTensor):
        return None
    spacing = [float(v) for v in image.pixdim]
    spatial, own = tuple(image.shape[1:]), tuple(labels.shape[1:])
    if len(spatial) != len(own) or spatial == own or len(spacing) < len(own):
        return spacing
    return [v * n / m for v, n, m in zip(spacing, spatial, own)]


# ------------------------------------------------------------------------------------------ minimum size


def _number(value: Any) -> float:
    """``value`` as a float; NaN for what is not a number (a command-line text, a bool, None)."""
    try:
        return float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _non_negative(value: Any, name: str, zero: str) -> float:
    """``value`` as a float >= 0, else a ValueError naming the option (a command-line text, a bool, NaN)."""
    number = _number(value)
    if not number >= 0:
        raise ValueError(f"{name} must be a number >= 0 ({zero}), got {value!r}.")
    return number


class RemoveSmallInstances(Transform):
    """
    Remove objects smaller than ``min_size`` voxels, or than a share of the model's training object size, and
    number the others 1..n in the order of their ids (:func:`~spoco_bundle.clustering.filter_small`,
    :func:`~spoco_bundle.clustering.relabel_consecutive`).

    An object is an id, whatever its connectivity: one nucleus in two pieces is one object of their total size.
    (MONAI's ``RemoveSmallObjects`` differs on instance labels: a map holding only id 1 is treated as a binary mask,
    whose connected pieces are measured apart, and the ids are not renumbered.)

    With ``min_diameter_ratio`` r > 0 and a known ``object_diameter`` d (the median equivalent diameter of the
    annotated training objects, recorded in the model, :mod:`spoco_bundle.object_size`), objects smaller than a ball
    (a disk in 2D) of diameter r * d are removed too: the fragments a clustering leaves in bright background are
    small next to the objects the model learned, while a fixed voxel count means a different size at every
    magnification. The labels must lie on the grid the model was trained on (the bundle's inference clusters
    there, :class:`~spoco_bundle.inferers.ScaledInferer` ``output_grid="network"``).

    Args:
        min_size: smallest kept object in voxels; 0 or 1 keeps every object.
        min_diameter_ratio: smallest kept equivalent diameter as a share of ``object_diameter``; 0 = off.
        object_diameter: the training objects' median diameter in voxels, as the model records it; 0 = unknown (only
            ``min_size`` applies). Read at every call (``float()``), so a
            :class:`~spoco_bundle.object_size.RecordedObjectDiameter` follows a checkpoint that is retrained.

    Input: instance labels ``(1, *S)`` (non-negative integers, 0 = background), S of 2 or 3 axes.

    Output: int32 labels of the input's kind.

    Raises:
        ValueError: a negative ``min_size``, ``min_diameter_ratio`` or ``object_diameter``; labels of the wrong shape
            or type.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self,
        min_size: int = 16,
        min_diameter_ratio: float = 0.0,
        object_diameter: float = 0.0,
    ) -> None:
        if int(min_size) < 0:
            raise ValueError(f"min_size must be >= 0, got {min_size!r}.")
        self.min_size = int(min_size)
        self.min_diameter_ratio = _non_negative(min_diameter_ratio, "min_diameter_ratio", "0: off")
        _non_negative(object_diameter, "object_diameter", "0: unknown")
        self.object_diameter = object_diameter  # read at every call: a RecordedObjectDiameter follows its file

    def smallest(self, spatial_dims: int) -> int:
        """The smallest kept object in voxels for labels of ``spatial_dims`` axes (the larger of both limits)."""
        from spoco_bundle.object_size import ball_volume

        diameter = _non_negative(self.object_diameter, "object_diameter", "0: unknown") * self.min_diameter_ratio
        if not math.isfinite(diameter) or diameter <= 0:
            return self.min_size
        return max(self.min_size, math.ceil(ball_volume(diameter, spatial_dims)))

    def __call__(self, labels: NdarrayOrTensor) -> NdarrayOrTensor:
        arr = _check_labels(labels, "RemoveSmallInstances")
        out = relabel_consecutive(filter_small(arr, self.smallest(arr.ndim - 1)))
        return convert_to_dst_type(out, labels, dtype=torch.int32)[0]


class RemoveSmallInstancesd(MapTransform):
    """
    Dictionary version of :class:`RemoveSmallInstances`.

    Args:
        keys: the instance labels.
        min_size: smallest kept object in voxels.
        min_diameter_ratio, object_diameter: the limit relative to the training objects' size (see
            :class:`RemoveSmallInstances`).
        mask_key: where a given foreground mask is kept (``"given_foreground_mask"`` in configs/inference.json); when
            the item has one, only ``min_size`` applies. The relative limit removes the fragments a foreground head
            leaves in bright background; inside a mask the user gives there are none, and it would only remove real
            objects smaller than the training objects. None: the relative limit always applies.
        allow_missing_keys: don't raise for missing keys.
    """

    backend = RemoveSmallInstances.backend

    def __init__(
        self,
        keys: KeysCollection = "pred",
        min_size: int = 16,
        min_diameter_ratio: float = 0.0,
        object_diameter: Any = 0.0,
        mask_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.remove = RemoveSmallInstances(min_size, min_diameter_ratio, object_diameter)
        self.absolute = RemoveSmallInstances(min_size)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        given = self.mask_key is not None and d.get(self.mask_key) is not None
        for key in self.key_iterator(d):
            d[key] = (self.absolute if given else self.remove)(d[key])
        return d


# ------------------------------------------------------------------------------------------ a check on the result


class WarnFewInstances(Transform):
    """
    Warn when the objects found are far fewer than the labelled voxels hold objects of the model's training size:
    the sign of a segmentation that collapsed into a few regions (e.g. a boundary head that calls nearly the whole of
    an image of tissue membrane, so that ``--clustering boundary --background none`` finds a few regions that tile
    it). The labels pass unchanged; the warning names the image and the expected and found counts. A head that calls
    nearly everything *background* leaves little labelled area and is not caught.

    The expected count is the number of labelled voxels over the volume of a ball (a disk in 2D) of the training
    objects' median diameter (recorded in the model, :mod:`spoco_bundle.object_size`). It overstates the count of a
    good segmentation several times (the largest objects hold most of the area; measured in
    docs/benchmark_findings.md, session 54), hence the small default ``min_fraction``: only a collapse into a few
    regions warns. As at least one object is found in any labelled area, nothing warns below an expected
    ``max(min_expected, 1 / min_fraction)`` objects.

    Args:
        object_diameter: the training objects' median diameter in voxels of the labels' grid; 0 = unknown (no
            check). Read at every call, like :class:`RemoveSmallInstances`'s.
        min_fraction: warn when fewer than this share of the expected count is found, in (0, 1].
        min_expected: the smallest expected count that is checked.

    Input: instance labels ``(1, *S)`` (integers), S of 2 or 3 axes; ``name`` (optional) the image's file for the
    message.

    Output: the labels, unchanged (the same object).

    Raises:
        ValueError: a negative ``object_diameter`` or ``min_expected``, a ``min_fraction`` outside (0, 1]; labels of
            the wrong shape or type.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, object_diameter: Any = 0.0, min_fraction: float = 0.03, min_expected: float = 10.0) -> None:
        _non_negative(object_diameter, "object_diameter", "0: unknown")
        self.object_diameter = object_diameter
        fraction = _number(min_fraction)
        if not 0 < fraction <= 1:
            raise ValueError(f"min_fraction must be a number in (0, 1], got {min_fraction!r}.")
        self.min_fraction = fraction
        self.min_expected = _non_negative(min_expected, "min_expected", "0: check every image")

    def counts(self, labels: NdarrayOrTensor) -> tuple[int, float, float]:
        """``(found, expected, diameter)`` for ``labels`` ``(1, *S)``: objects found, objects of the diameter the
        labelled area holds (NaN when the diameter is unknown), and the diameter read for it."""
        from spoco_bundle.object_size import ball_volume

        arr = _check_labels(labels, "WarnFewInstances")
        sizes = np.bincount(arr.ravel().astype(np.int64, copy=False))[1:]  # voxels per id, one pass
        found = int(np.count_nonzero(sizes))
        diameter = _non_negative(self.object_diameter, "object_diameter", "0: unknown")
        if not math.isfinite(diameter) or diameter <= 0:
            return found, float("nan"), diameter
        return found, float(sizes.sum()) / ball_volume(diameter, arr.ndim - 1), diameter

    def __call__(self, labels: NdarrayOrTensor, name: str | None = None) -> NdarrayOrTensor:
        found, expected, diameter = self.counts(labels)
        if expected >= self.min_expected and found < self.min_fraction * expected:
            logger.warning(
                f"{name or 'image'}: {found} object(s) found where the segmented area holds about {expected:.0f} "
                f"of the training objects' size (median diameter {diameter:.1f} voxels): {FEW_INSTANCES} Check the "
                "foreground head's map (with the boundary clustering, a head that calls nearly everything membrane: "
                "try boundary_threshold 'median', --boundary_threshold median) or the image scale."
            )
        return labels


class WarnFewInstancesd(MapTransform):
    """
    Dictionary version of :class:`WarnFewInstances`.

    Args:
        keys: the instance labels.
        image_key: an image (MetaTensor, or with a ``{image_key}_meta_dict``) whose ``filename_or_obj`` names it in
            the warning; None, or an image without one: "image".
        object_diameter, min_fraction, min_expected: see :class:`WarnFewInstances`.
        allow_missing_keys: don't raise for missing keys.
    """

    backend = WarnFewInstances.backend

    def __init__(
        self,
        keys: KeysCollection = "pred",
        image_key: str | None = "image",
        object_diameter: Any = 0.0,
        min_fraction: float = 0.03,
        min_expected: float = 10.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.check = WarnFewInstances(object_diameter, min_fraction, min_expected)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from spoco_bundle.transforms import _filename

        d = dict(data)
        name = None
        if self.image_key is not None:
            name = _filename(d.get(self.image_key), d.get(f"{self.image_key}_meta_dict"))
        for key in self.key_iterator(d):
            self.check(d[key], name=name)
        return d


# ------------------------------------------------------------------------------------------ growth to the head's edge


def check_grow_threshold(value: Any) -> float:
    """``foreground_grow`` as a float: 0 (off) or a probability in (0, 1); else a ValueError naming the option."""
    number = _number(value)
    if not 0 <= number < 1:
        raise ValueError(f"foreground_grow must be 0 (off) or a probability in (0, 1), got {value!r}.")
    return number


class GrowInstances(Transform):
    """
    Draw objects out into the background voxels near them where the foreground head's probability is still above
    ``threshold`` (:func:`~spoco_bundle.clustering.grow_into_foreground`): the head's mask at 0.5 decides which
    objects there are, a lower threshold only how far each reaches. Objects are neither created, merged nor
    removed; a voxel within ``distance`` of two objects joins the nearer.

    Args:
        threshold: probability a voxel needs to join an object, in (0, 1); 0 = off (the labels pass unchanged).
        distance: how far an object may grow, in voxels of the finest axis (physical length along the others when
            the call is given a spacing).

    Input: instance labels ``(1, *S)`` and the head's probability ``S`` or ``(1, *S)`` (:class:`ForegroundMaskd`'s
    ``probability_key``), S of 2 or 3 axes.

    Output: int32 labels of the input's kind, same ids.

    Raises:
        ValueError: a threshold outside [0, 1) or a negative distance; labels of the wrong shape or type; a
            probability of another shape.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, threshold: float = 0.0, distance: float = 2.0) -> None:
        self.threshold = check_grow_threshold(threshold)
        self.distance = _non_negative(distance, "foreground_grow_distance", "0: no growth")
        if not math.isfinite(self.distance):
            raise ValueError(f"foreground_grow_distance must be a finite number >= 0 (0: no growth), got {distance!r}.")

    def __call__(
        self, labels: NdarrayOrTensor, probability: Any, spacing: Sequence[float] | None = None
    ) -> NdarrayOrTensor:
        """
        Args:
            labels: instance labels ``(1, *S)``.
            probability: the head's foreground probability ``S`` or ``(1, *S)``.
            spacing: the labels' voxel size per axis (default: isotropic); ``distance`` is in units of its
                smallest value.
        """
        arr = _check_labels(labels, "GrowInstances")
        if self.threshold == 0 or self.distance == 0:
            return labels
        prob = np.asarray(convert_to_numpy(probability), dtype=np.float32)
        if prob.ndim == arr.ndim:
            prob = prob[0] if prob.shape[0] == 1 else prob
        out = grow_into_foreground(arr[0], prob, self.threshold, self.distance, spacing)
        return convert_to_dst_type(out[None], labels, dtype=torch.int32)[0]


class GrowInstancesd(MapTransform):
    """
    Dictionary version of :class:`GrowInstances`; the labels pass unchanged when ``probability_key`` is absent
    (a given foreground mask, or no head: nothing to grow by).

    Args:
        keys: the instance labels.
        probability_key: the head's probability (:class:`ForegroundMaskd`'s ``probability_key``).
        image_key: a MetaTensor image whose voxel size (scaled onto the labels' grid) measures ``distance``; none:
            voxels.
        threshold, distance: see :class:`GrowInstances`.
        allow_missing_keys: don't raise for missing keys.
    """

    backend = GrowInstances.backend

    def __init__(
        self,
        keys: KeysCollection = "pred",
        probability_key: str = "foreground_probability",
        image_key: str | None = "image",
        threshold: float = 0.0,
        distance: float = 2.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.probability_key = probability_key
        self.image_key = image_key
        self.grow = GrowInstances(threshold, distance)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        probability = d.get(self.probability_key)
        if probability is None:
            return d
        image = d.get(self.image_key) if self.image_key is not None else None
        for key in self.key_iterator(d):
            d[key] = self.grow(d[key], probability, spacing=_grid_spacing(image, d[key]))
        return d


# ------------------------------------------------------------------------------------------ back onto the image's grid


class ResizeToMatch(Transform):
    """
    Resize instance labels or a mask ``(C, *S)`` to another spatial shape by nearest neighbour (``nearest-exact``:
    voxel centres map onto voxel centres), keeping ids and dtype: the labels clustered on the grid the network saw
    (:class:`~spoco_bundle.inferers.ScaledInferer` ``output_grid="network"``) onto the image's grid, or a given
    foreground mask onto the network's. The input passes unchanged when the shapes already match.

    Input: ``(C, *S)`` array or tensor; the call's ``spatial_shape``: the target ``S'`` (same number of axes).

    Output: ``(C, *S')`` of the input's kind and dtype.

    Raises:
        ValueError: a target with another number of axes, or a non-positive size.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __call__(self, img: NdarrayOrTensor, spatial_shape: Sequence[int]) -> NdarrayOrTensor:
        target = tuple(int(n) for n in spatial_shape)
        own = tuple(img.shape[1:])
        if len(target) != len(own) or min(target, default=0) < 1:
            raise ValueError(f"ResizeToMatch: cannot resize an input of spatial shape {own} to {target}.")
        if own == target:
            return img
        # an index per axis: exact for every id (interpolation routines compute in float32, which rounds ids
        # above 2**24), and no float copy of a large volume
        index = [np.minimum(((np.arange(m) + 0.5) * n / m).astype(np.int64), n - 1) for n, m in zip(own, target)]
        out = np.asarray(convert_to_numpy(img))[np.ix_(range(img.shape[0]), *index)]
        return convert_to_dst_type(out, img, dtype=img.dtype)[0]


class ResizeToMatchd(MapTransform):
    """
    Dictionary version of :class:`ResizeToMatch`: ``keys`` take the spatial shape of ``reference_key``
    (``data[reference_key].shape[1:]``).

    Args:
        keys: the labels or masks to resize.
        reference_key: the array whose spatial shape they take (the image, or the network output ``pred``).
        mask_key: labels outside the mask there (nonzero = inside; on the reference's grid), when the data holds
            one, are set to 0 after resizing: a given foreground mask holds exactly, voxel for voxel, whatever grid
            the clustering ran on. None: no mask.
        allow_missing_keys: don't raise for missing keys (an optional foreground mask).
    """

    backend = ResizeToMatch.backend

    def __init__(
        self,
        keys: KeysCollection = "pred",
        reference_key: str = "image",
        mask_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key
        self.mask_key = mask_key
        self.resize = ResizeToMatch()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.reference_key not in d:
            raise KeyError(f"ResizeToMatchd: no {self.reference_key!r} to take the spatial shape from.")
        shape = tuple(d[self.reference_key].shape[1:])
        mask = d.get(self.mask_key) if self.mask_key is not None else None
        inside = _given_mask(mask, shape)[None] if mask is not None else None
        for key in self.key_iterator(d):
            if d[key] is None:
                continue
            d[key] = self.resize(d[key], shape)
            if inside is not None:
                d[key] = d[key] * convert_to_dst_type(inside, d[key], dtype=d[key].dtype)[0]
        return d
