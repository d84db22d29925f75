"""MONAI transforms of the bundle before the network (array and dictionary versions): loading with checks
(:mod:`.loading`), the sparse selection of annotated objects (:mod:`.sparse`) and resampling to the training's image
scale (:mod:`.spatial`). What comes after the network is :mod:`spoco_bundle.postprocessing`."""

from spoco_bundle.transforms.loading import (
    CheckImageLabel,
    CheckImageLabeld,
    EnsureSpatialDims,
    EnsureSpatialDimsd,
    LoadForegroundMaskd,
    load_transforms,
)
from spoco_bundle.transforms.sparse import SparseInstanceLabel, SparseInstanceLabeld
from spoco_bundle.transforms.spatial import Rescale, Rescaled, check_scale

__all__ = [
    "CheckImageLabel",
    "CheckImageLabeld",
    "EnsureSpatialDims",
    "EnsureSpatialDimsd",
    "LoadForegroundMaskd",
    "load_transforms",
    "SparseInstanceLabel",
    "SparseInstanceLabeld",
    "Rescale",
    "Rescaled",
    "check_scale",
]
