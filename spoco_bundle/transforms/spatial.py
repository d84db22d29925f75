"""Resampling images and labels to another grid: the training's ``image_scale``, undone at inference."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Resize, Transform
from monai.utils import TransformBackends, convert_to_dst_type, ensure_tuple

from spoco_bundle.io import filename_of

__all__ = ["check_scale", "Rescale", "Rescaled"]


def check_scale(scale: float | Sequence[float]) -> tuple[float, ...]:
    """``scale`` as a tuple of positive finite floats (one, or one per spatial axis); ValueError otherwise."""
    message = f"image_scale must be a positive number (or one per spatial axis), got {scale!r}."
    try:  # a string is a Sequence too: convert it whole, not per character
        values = tuple(
            float(s) for s in (scale if isinstance(scale, Sequence) and not isinstance(scale, str) else (scale,))
        )
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not values or not all(np.isfinite(s) and s > 0 for s in values):
        raise ValueError(message)
    return values


class Rescale(Transform):
    """
    Resamples a channel-first image by ``scale`` along each spatial axis (new size ``round(n * s)``, at least 1), so
    that training sees the objects at another size than the files have them: e.g. ``(1, 0.5, 0.5)`` turns voxels
    of 0.28 x 0.127 x 0.127 um into nearly isotropic ones of 0.28 x 0.25 x 0.25 um and the volume 4x smaller, so a
    training step covers 4x the tissue. Segment with the same factor (``image_scale`` in ``inference.json``,
    :class:`~spoco_bundle.inferers.ScaledInferer`), which writes the labels back on the input's grid.

    Images are resampled linearly (bilinear / trilinear) with Gaussian anti-aliasing where they shrink, labels with
    nearest neighbour ("nearest-exact", the same grid alignment as the linear mode), keeping their ids and dtype;
    objects smaller than a voxel of the new grid can disappear. MetaTensor affines are updated (MONAI ``Resize``).

    Args:
        scale: one factor for every spatial axis, or one per axis (``(D, H, W)`` order for 3D); 1 returns the input.
        mode: ``"linear"`` (images) or ``"nearest"`` (labels).

    Shapes:
        ``(C, *S)`` -> ``(C, *round(S * scale))``.

    Raises:
        ValueError: a non-positive or non-finite scale, an unknown mode, or one factor per axis that does not match
            the input's spatial axes (naming the file when the input is a MetaTensor).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, scale: float | Sequence[float] = 1.0, mode: str = "linear") -> None:
        if mode not in ("linear", "nearest"):
            raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}.")
        self.scale = check_scale(scale)
        self.mode = mode

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        spatial = tuple(int(n) for n in img.shape[1:])
        scale = self.scale * len(spatial) if len(self.scale) == 1 else self.scale
        if len(scale) != len(spatial):
            raise ValueError(
                f"{filename_of(img) or 'image'}: image_scale has {len(scale)} factors but the image has "
                f"{len(spatial)} spatial axes {spatial}."
            )
        if all(s == 1.0 for s in scale):
            return img
        size = [max(1, round(n * s)) for n, s in zip(spatial, scale)]
        if self.mode == "nearest":
            resize = Resize(size, mode="nearest-exact", anti_aliasing=False)
        else:
            resize = Resize(size, mode="bilinear" if len(spatial) == 2 else "trilinear", anti_aliasing=True)
        out = resize(img)
        # Resize computes in float; labels get their integer type back (nearest values are exact ids)
        out, *_ = convert_to_dst_type(out, img, dtype=img.dtype)
        return out


class Rescaled(MapTransform):
    """
    Dictionary version of :class:`Rescale`.

    Args:
        keys: keys to resample.
        scale: one factor for every spatial axis, or one per axis.
        mode: one mode per key (``"linear"`` for images, ``"nearest"`` for labels), or one for all.
        allow_missing_keys: don't raise for missing keys.
    """

    backend = Rescale.backend

    def __init__(
        self,
        keys: KeysCollection,
        scale: float | Sequence[float] = 1.0,
        mode: str | Sequence[str] = "linear",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        modes = ensure_tuple(mode)
        if len(modes) == 1:
            modes = modes * len(self.keys)
        if len(modes) != len(self.keys):
            raise ValueError(f"{len(modes)} modes given for {len(self.keys)} keys {self.keys}.")
        self.rescalers = {key: Rescale(scale, m) for key, m in zip(self.keys, modes)}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.rescalers[key](d[key])
        return d
