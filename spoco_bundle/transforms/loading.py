"""Loading: images and labels in their files' storage order, checked, with the spatial axes the model takes.

Loading in a config (the entries of :func:`load_transforms`; keep ``LoadVolumed`` a top-level entry so that
MONAI Label can swap it for its own loader)::

    {"_target_": "spoco_bundle.io.LoadVolumed", "keys": ["image", "label"]},
    {"_target_": "EnsureChannelFirstd", "keys": ["image", "label"], "channel_dim": "no_channel"},
    {"_target_": "spoco_bundle.transforms.EnsureSpatialDimsd", "keys": ["image", "label"], "spatial_dims": 3},
    {"_target_": "spoco_bundle.transforms.CheckImageLabeld", "keys": ["image", "label"], "spatial_dims": 3},
    {"_target_": "CastToTyped", "keys": "image", "dtype": "$np.float32"},
    {"_target_": "CastToTyped", "keys": "label", "dtype": "$torch.int64"}

No Orientation or Spacing transform: arrays stay in the file's storage order (see :mod:`spoco_bundle.io`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import CastToTyped, EnsureChannelFirst, EnsureChannelFirstd, MapTransform, Transform
from monai.utils import MetaKeys, convert_to_dst_type, convert_to_numpy, ensure_tuple

from spoco_bundle.data import check_image_array, check_label_array, check_same_shape, spatial_squeeze_axes
from spoco_bundle.io import LoadVolumed, filename_of

logger = logging.getLogger(__name__)

__all__ = [
    "EnsureSpatialDims",
    "EnsureSpatialDimsd",
    "CheckImageLabel",
    "CheckImageLabeld",
    "load_transforms",
    "LoadForegroundMaskd",
]


def _drop_affine_axes(affine: Any, axes: Sequence[int]) -> Any:
    """Remove spatial ``axes`` (descending) from a homogeneous affine, keeping its size (identity fills in)."""
    a = convert_to_numpy(affine, wrap_sequence=True).astype(np.float64)
    rank = a.shape[0] - 1
    r = rank
    for ax in axes:
        if ax < r:  # axes beyond the affine's rank (e.g. NIfTI dim 4) have no geometry
            keep = [i for i in range(r + 1) if i != ax]
            a = a[np.ix_(keep, keep)]
            r -= 1
    if r < rank:
        a = to_affine_nd(rank, a)
    return convert_to_dst_type(a, dst=affine)[0]


class EnsureSpatialDims(Transform):
    """
    Drop singleton axes of a channel-first ``(C, *S)`` array so that it has exactly ``spatial_dims`` spatial axes,
    with the rule of :func:`spoco_bundle.data.spatial_squeeze_axes` (trailing singletons first, then leading).
    E.g. a 2D NIfTI stored as ``(H, W, 1)`` loads as ``(1, H, W, 1)`` and becomes ``(1, H, W)``.

    For a MetaTensor, ``affine``, ``original_affine`` (rows/columns of dropped axes removed, size kept) and
    ``spatial_shape`` are updated, so that writers see a consistent image.

    Args:
        spatial_dims: 2 or 3.

    Raises:
        ValueError: naming ``filename_or_obj`` when the spatial axes cannot be reduced to ``spatial_dims``.
    """

    backend = [np.ndarray, torch.Tensor]

    def __init__(self, spatial_dims: int = 3) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.spatial_dims = spatial_dims

    def __call__(self, img: Any) -> Any:
        axes = spatial_squeeze_axes(img.shape[1:], self.spatial_dims, filename_of(img) or "image")
        if not axes:
            return img
        out = img
        for ax in axes:  # descending, so indices stay valid
            out = out.squeeze(ax + 1) if isinstance(out, torch.Tensor) else np.squeeze(out, axis=ax + 1)
        if isinstance(out, MetaTensor):
            out.affine = _drop_affine_axes(out.affine, axes)
            if MetaKeys.ORIGINAL_AFFINE in out.meta:
                out.meta[MetaKeys.ORIGINAL_AFFINE] = _drop_affine_axes(out.meta[MetaKeys.ORIGINAL_AFFINE], axes)
            out.meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(out.shape[1:])
            if hasattr(type(out), "spatial_ndim"):  # monai >= 1.6 caches it; the affine setter may miscount it
                out.spatial_ndim = out.ndim - 1
        return out


class EnsureSpatialDimsd(MapTransform):
    """Dictionary version of :class:`EnsureSpatialDims`."""

    backend = EnsureSpatialDims.backend

    def __init__(self, keys: KeysCollection, spatial_dims: int = 3, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.squeeze = EnsureSpatialDims(spatial_dims)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.squeeze(d[key])
        return d


class CheckImageLabel(Transform):
    """
    Cheap runtime guard after loading, with the rules of :func:`spoco_bundle.data.validate_datalist`:
    single channel, ``spatial_dims`` spatial axes, finite image values, integer (non-float) and non-negative
    labels, equal image/label spatial shapes. Returns its inputs unchanged.

    Labels must still have their file type here: load with ``dtype=None``
    (:class:`~spoco_bundle.io.LoadVolumed`) and cast after this check.

    Args:
        spatial_dims: 2 or 3.

    Raises:
        ValueError: naming ``filename_or_obj`` of the offending MetaTensor.
    """

    backend = [np.ndarray, torch.Tensor]

    def __init__(self, spatial_dims: int = 3) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.spatial_dims = spatial_dims

    def _channel(self, x: Any, name: str, what: str) -> Any:
        if x.ndim != self.spatial_dims + 1 or x.shape[0] != 1:
            raise ValueError(
                f"{name}: {what} has shape {tuple(x.shape)}, expected (1, *spatial) with {self.spatial_dims} "
                f"spatial dimensions (single channel, spatial_dims={self.spatial_dims})."
            )
        return x[0]

    def __call__(
        self, image: Any, label: Any = None, image_name: str | None = None, label_name: str | None = None
    ) -> tuple[Any, Any]:
        """
        Args:
            image: ``(1, *spatial)``.
            label: ``(1, *spatial)`` or None.
            image_name: name for messages; default ``filename_or_obj`` of the MetaTensor.
            label_name: likewise for the label.
        """
        image_name = image_name or filename_of(image) or "image"
        img = self._channel(image, image_name, "image")
        check_image_array(img, self.spatial_dims, image_name)
        if label is not None:
            label_name = label_name or filename_of(label) or "label"
            lab = self._channel(label, label_name, "label")
            check_label_array(lab, self.spatial_dims, label_name)
            check_same_shape(img.shape, lab.shape, image_name, label_name)
        return image, label


class CheckImageLabeld(MapTransform):
    """
    Dictionary version of :class:`CheckImageLabel`.

    Args:
        keys: the image key first, then any label keys (e.g. ``("image", "label")``; ``"image"`` alone checks the
            image only).
        spatial_dims: 2 or 3.
        allow_missing_keys: don't raise for missing keys (e.g. no label at inference).
    """

    backend = CheckImageLabel.backend

    def __init__(
        self, keys: KeysCollection = ("image", "label"), spatial_dims: int = 3, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.check = CheckImageLabel(spatial_dims)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_key, *label_keys = self.keys
        if image_key not in d:
            if not self.allow_missing_keys:
                raise KeyError(f"Key {image_key!r} not found in the data; available: {list(d)}.")
            return d
        image = d[image_key]
        image_name = filename_of(image, d.get(f"{image_key}_meta_dict"))
        for key in label_keys:
            if key not in d:
                if not self.allow_missing_keys:
                    raise KeyError(f"Key {key!r} not found in the data (image {image_name}).")
                continue
            self.check(image, d[key], image_name, filename_of(d[key], d.get(f"{key}_meta_dict")))
        if not label_keys or all(k not in d for k in label_keys):
            self.check(image, None, image_name)
        return d


def load_transforms(
    keys: KeysCollection = ("image", "label"),
    spatial_dims: int = 3,
    image_dtype: Any = np.float32,
    label_dtype: Any = torch.int64,
    allow_missing_keys: bool = False,
    input_channel: int | None = None,
    input_time_point: int | None = None,
) -> list[Transform]:
    """
    The loading steps, in storage order (no Orientation, no Spacing):
    ``LoadVolumed`` (file dtype) -> ``EnsureChannelFirstd("no_channel")`` -> :class:`EnsureSpatialDimsd` ->
    :class:`CheckImageLabeld` -> cast image to ``image_dtype`` and labels to ``label_dtype``.

    Args:
        keys: the image key first, then label keys; ``"image"`` alone for inference.
        spatial_dims: 2 or 3.
        image_dtype: type of the image after the checks.
        label_dtype: type of the labels after the checks.
        allow_missing_keys: e.g. to let one list serve data with and without labels.
        input_channel, input_time_point: the channel / time point of images with several (labels have one).

    Returns:
        a list of transforms, to be placed first in a ``Compose`` (as separate entries, so that MONAI Label can
        replace the ``LoadImaged``).
    """
    keys = ensure_tuple(keys)
    image_key, label_keys = keys[0], keys[1:]
    if input_channel is None and input_time_point is None:
        loaders = [LoadVolumed(keys, allow_missing_keys=allow_missing_keys)]
    else:  # the choice is the image's; labels are single-channel
        loaders = [
            LoadVolumed(
                image_key,
                allow_missing_keys=allow_missing_keys,
                input_channel=input_channel,
                input_time_point=input_time_point,
            )
        ]
        if label_keys:
            loaders.append(LoadVolumed(label_keys, allow_missing_keys=allow_missing_keys))
    transforms: list[Transform] = [
        *loaders,
        EnsureChannelFirstd(keys, channel_dim="no_channel", allow_missing_keys=allow_missing_keys),
        EnsureSpatialDimsd(keys, spatial_dims, allow_missing_keys=allow_missing_keys),
        CheckImageLabeld(keys, spatial_dims, allow_missing_keys=allow_missing_keys),
        CastToTyped(image_key, dtype=image_dtype, allow_missing_keys=allow_missing_keys),
    ]
    if label_keys:
        transforms.append(CastToTyped(label_keys, dtype=label_dtype, allow_missing_keys=allow_missing_keys))
    return transforms


class LoadForegroundMaskd(MapTransform):
    """
    Loads a given foreground mask for clustering (inference's ``foreground_mask_dir``): the file named under
    ``keys`` (put there by :func:`~spoco_bundle.engines.segment_files`) is read like the images (NIfTI/TIFF in
    storage order, :class:`~spoco_bundle.io.LoadVolumed`), its singleton axes dropped like the image's
    (:class:`EnsureSpatialDims`), checked against the already loaded image ``image_key`` and turned into a bool
    ``(1, *S)`` MetaTensor, nonzero = foreground, which :class:`~spoco_bundle.postprocessing.ForegroundMaskd` and
    :class:`ClusterEmbeddingsd` (``mask_key``) then use in
    place of the foreground head. The mask stays on the image's grid, where clustering runs (also with
    ``image_scale`` != 1: :class:`~spoco_bundle.inferers.ScaledInferer` resamples the network's output back onto it).

    A missing key is skipped by default (no mask given: nothing happens), so the transform can stay in the
    inference preprocessing. Logs a warning for an empty mask, a mask that is foreground everywhere, and a
    non-integer (probability) mask, where every nonzero value counts as foreground.

    Args:
        keys: keys holding the mask file names.
        image_key: the loaded image ``(1, *S)`` the masks must match.
        spatial_dims: 2 or 3.
        allow_missing_keys: skip absent keys (default True).

    Raises:
        ValueError: naming the mask and the image, for an unreadable mask, one whose spatial shape differs from the
            image's or that cannot be reduced to ``spatial_dims`` axes, or NaN values.
    """

    def __init__(
        self,
        keys: KeysCollection = "foreground_mask",
        image_key: str = "image",
        spatial_dims: int = 3,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.squeeze = EnsureSpatialDims(spatial_dims)
        self.channel_first = EnsureChannelFirst(channel_dim="no_channel")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d.get(self.image_key)
        image_name = filename_of(image, d.get(f"{self.image_key}_meta_dict")) or self.image_key
        for key in self.key_iterator(d):
            path = d[key]
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"'{key}' must name a mask file for image {image_name}, got {type(path).__name__}.")
            path = os.fspath(path)
            if image is None:
                raise KeyError(f"load the image '{self.image_key}' before its foreground mask {path}.")
            try:
                mask = LoadVolumed(key)({key: path})[key]
            except Exception as e:
                cause = e.__cause__ if isinstance(e, RuntimeError) and e.__cause__ is not None else e
                raise ValueError(f"Cannot read foreground mask {path} (for image {image_name}): {cause}") from e
            try:
                mask = self.squeeze(self.channel_first(mask))
            except ValueError as e:
                raise ValueError(f"foreground mask for image {image_name}: {e}") from None
            if tuple(mask.shape[1:]) != tuple(image.shape[1:]):
                raise ValueError(
                    f"foreground mask {path} has spatial shape {tuple(mask.shape[1:])}, but image {image_name} has "
                    f"{tuple(image.shape[1:])}: a mask must have its image's shape (in the files' storage order)."
                )
            if mask.is_floating_point():
                if bool(torch.isnan(mask).any()):
                    raise ValueError(f"foreground mask {path} (for image {image_name}) contains NaN values.")
                if not bool(torch.equal(mask, torch.round(mask))):
                    logger.warning(
                        f"foreground mask {path} holds non-integer values (a probability map?): every nonzero value "
                        "counts as foreground; threshold it first."
                    )
            mask = mask != 0
            n = int(mask.sum())
            if n == 0:
                logger.warning(f"foreground mask {path} is empty: no objects in {image_name}.")
            elif n == mask.numel():
                logger.warning(f"foreground mask {path} is nonzero everywhere: all of {image_name} is foreground.")
            d[key] = mask
        return d
