"""Sparse annotation from dense labels: the reproducible choice of annotated objects (:mod:`spoco_bundle.labels`) as a
MONAI transform, the first step of training's label pipeline."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_numpy

from spoco_bundle.io import filename_of, split_image_suffix, stem_of
from spoco_bundle.labels import kept_ids, num_kept, select_objects

__all__ = ["SparseInstanceLabel", "SparseInstanceLabeld"]


class SparseInstanceLabel(Transform):
    """
    Keep a reproducible subset of the objects of a dense instance label map and relabel them ``1..K``; every other
    object becomes 0 (unlabeled), ``background_label`` voxels -1 (:func:`spoco_bundle.labels.select_objects`).

    Which objects are kept depends only on ``seed``, the file name (``filename_or_obj`` of a MetaTensor, folder and
    suffix stripped, or ``name``) and the ids, never on call order: the transform is deterministic on purpose (not
    ``Randomizable``) and can be cached.

    Args:
        instance_ratio: fraction of objects to keep, in [0, 1]; 1.0 keeps all (labels as given, relabelled).
        background_label: id of annotated background (becomes -1), or None. 0 is for dense ground truth whose 0 is
            true background: 0 becomes -1 and the dropped objects become 0.
        seed: selection seed.

    Input: integer label map of any shape, typically ``(1, *spatial)``; numpy array, tensor or MetaTensor. Floating
    input is accepted only when every value is a whole number; negative ids raise ValueError.

    Output: int64 of the same kind (numpy array / tensor / MetaTensor with its meta), same shape and device.
    """

    backend = [np.ndarray, torch.Tensor]

    def __init__(self, instance_ratio: float = 1.0, background_label: int | None = None, seed: int = 0) -> None:
        if not 0.0 <= float(instance_ratio) <= 1.0:
            raise ValueError(f"instance_ratio must be in [0, 1], got {instance_ratio}.")
        self.instance_ratio = float(instance_ratio)
        self.background_label = None if background_label is None else int(background_label)
        self.seed = int(seed)

    def num_kept(self, num_objects: int) -> int:
        """Number of objects kept out of ``num_objects``."""
        return num_kept(num_objects, self.instance_ratio)

    def kept_ids(self, ids, name: str = "") -> np.ndarray:
        """The sorted object ids kept from ``ids`` (object ids only: no 0, no background) for image ``name``."""
        return kept_ids(ids, self.instance_ratio, self.seed, name)

    def __call__(self, label: Any, name: str | None = None) -> Any:
        """
        Args:
            label: dense integer instance labels.
            name: image name for the selection; default: the MetaTensor's ``filename_or_obj`` stem, else "".
        """
        filename = filename_of(label)
        if name is None:
            name = split_image_suffix(filename)[0] if filename else ""
        out = select_objects(
            convert_to_numpy(label), self.instance_ratio, self.background_label, self.seed, name, filename
        )
        dtype = torch.int64 if isinstance(label, torch.Tensor) else np.int64
        return convert_to_dst_type(out, dst=label, dtype=dtype)[0]


class SparseInstanceLabeld(MapTransform):
    """
    Dictionary version of :class:`SparseInstanceLabel`.

    Args:
        keys: label keys.
        instance_ratio, background_label, seed: see :class:`SparseInstanceLabel`.
        name_key: key whose file name drives the selection (e.g. ``"image"``); default: each label's own file name
            (``filename_or_obj`` of the MetaTensor or of ``{key}_meta_dict``).
        allow_missing_keys: don't raise for missing keys.
    """

    backend = SparseInstanceLabel.backend

    def __init__(
        self,
        keys: KeysCollection,
        instance_ratio: float = 1.0,
        background_label: int | None = None,
        seed: int = 0,
        name_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.sparsify = SparseInstanceLabel(instance_ratio, background_label, seed)
        self.name_key = name_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.sparsify(d[key], name=stem_of(d, self.name_key if self.name_key is not None else key))
        return d
