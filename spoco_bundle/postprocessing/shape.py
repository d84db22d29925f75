"""Splitting objects shaped like two joined round ones (touching nuclei the embeddings did not separate)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type

from spoco_bundle.clustering import split_by_shape
from spoco_bundle.postprocessing._common import _check_labels, _grid_spacing

__all__ = ["SplitByShape", "SplitByShaped"]


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
