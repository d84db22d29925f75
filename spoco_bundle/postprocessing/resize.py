"""Labels back onto the image's grid after clustering on the grid the network saw (``image_scale``)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy

from spoco_bundle.postprocessing._common import _given_mask, _mask_from

__all__ = ["ResizeToMatch", "ResizeToMatchd"]


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
            _mask_from(d, key)  # a mask file name that was never loaded: a clear error, not numpy's
            d[key] = self.resize(d[key], shape)
            if inside is not None:
                d[key] = d[key] * convert_to_dst_type(inside, d[key], dtype=d[key].dtype)[0]
        return d
