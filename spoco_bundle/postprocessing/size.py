"""Objects by size: remove the small ones (fragments), warn when far too few were found (a collapse)."""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type

from spoco_bundle.clustering import filter_small, relabel_consecutive
from spoco_bundle.io import filename_of
from spoco_bundle.measure import ball_volume
from spoco_bundle.postprocessing._common import _check_labels, _non_negative, _number

__all__ = ["FEW_INSTANCES", "RemoveSmallInstances", "RemoveSmallInstancesd", "WarnFewInstances", "WarnFewInstancesd"]

logger = logging.getLogger(__name__)

# what WarnFewInstances says a collapsed segmentation means (tests look for it)
FEW_INSTANCES = "most objects are probably merged."


class RemoveSmallInstances(Transform):
    """
    Remove objects smaller than ``min_size`` voxels, or than a share of the model's training object size, and
    number the others 1..n in the order of their ids (:func:`~spoco_bundle.clustering.filter_small`,
    :func:`~spoco_bundle.clustering.relabel_consecutive`).

    An object is an id, whatever its connectivity: one nucleus in two pieces is one object of their total size.
    (MONAI's ``RemoveSmallObjects`` differs on instance labels: a map holding only id 1 is treated as a binary mask,
    whose connected pieces are measured apart, and the ids are not renumbered.)

    With ``min_diameter_ratio`` r > 0 and a known ``object_diameter`` d (the median equivalent diameter of the
    annotated training objects, recorded in the model, :mod:`spoco_bundle.measure`), objects smaller than a ball
    (a disk in 2D) of diameter r * d are removed too: the fragments a clustering leaves in bright background are
    small next to the objects the model learned, while a fixed voxel count means a different size at every
    magnification. The labels must lie on the grid the model was trained on (the bundle's inference clusters
    there, :class:`~spoco_bundle.inferers.ScaledInferer` ``output_grid="network"``).

    Args:
        min_size: smallest kept object in voxels; 0 or 1 keeps every object.
        min_diameter_ratio: smallest kept equivalent diameter as a share of ``object_diameter``; 0 = off.
        object_diameter: the training objects' median diameter in voxels, as the model records it; 0 = unknown (only
            ``min_size`` applies). Read at every call (``float()``), so a
            :class:`~spoco_bundle.networks.RecordedObjectDiameter` follows a checkpoint that is retrained.

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
    objects' median diameter (recorded in the model, :mod:`spoco_bundle.measure`). It overstates the count of a
    good segmentation several times (the largest objects hold most of the area; measured in research/findings.md),
    hence the small default ``min_fraction``: only a collapse into a few
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
        d = dict(data)
        name = None
        if self.image_key is not None:
            name = filename_of(d.get(self.image_key), d.get(f"{self.image_key}_meta_dict"))
        for key in self.key_iterator(d):
            self.check(d[key], name=name)
        return d
