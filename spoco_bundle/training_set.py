"""What a training run learns from, measured once: the annotated objects its sparse selection keeps and the size of
what it sees, which the model records (so that inference can compare its images with it) and the model card
reports."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spoco_bundle.data import spatial_squeeze_axes
from spoco_bundle.io import read_image, read_spacing, split_image_suffix
from spoco_bundle.labels import select_objects
from spoco_bundle.measure import blob_scale, equivalent_diameters
from spoco_bundle.transforms import check_scale

__all__ = ["TrainingSet"]

logger = logging.getLogger(__name__)


class TrainingSet:
    """
    The training images and labels of a run as the run sees them, measured on first use (each label file and each
    image file is read once, whichever handler asks first):

    - ``object_count``: the annotated objects the run's sparse selection keeps
      (:func:`~spoco_bundle.labels.select_objects` with its ``instance_ratio``, ``seed``, ``background_label``), in
      all files, objects cut by the image border included;
    - ``object_diameter``: their median equivalent diameter (:func:`~spoco_bundle.measure.equivalent_diameters`,
      border objects left out), NaN without objects;
    - ``blob_scales``: the 10th / 50th / 90th percentile of the images' blob size
      (:func:`~spoco_bundle.measure.blob_scale`), NaN without structure;
    - ``voxel_size`` / ``voxel_unit``: the images' voxel size as their headers state it (the median per axis in
      array order, singleton axes dropped as training drops them; None without images) and the most common unit.

    Sizes in voxels are on the network's grid: the training's ``image_scale`` applied (its geometric mean for one
    factor per axis); ``grid_voxel_size`` is the voxel size there.

    Args:
        data: the training datalist (``{"image": ..., "label": ...}`` items) or a dataset holding it as ``data``.
        spatial_dims: 2 or 3.
        instance_ratio, seed, background_label, image_scale: the run's (``configs/train.json``).
        input_channel, input_time_point: the channel / time point of images with several (as loading reads them).
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]] | Any,
        spatial_dims: int,
        instance_ratio: float = 1.0,
        seed: int = 0,
        background_label: int | None = None,
        image_scale: float | Sequence[float] = 1.0,
        input_channel: int | None = None,
        input_time_point: int | None = None,
    ) -> None:
        items = list(getattr(data, "data", data))
        self.image_files = [str(d["image"]) for d in items]
        self.label_files = [str(d["label"]) for d in items]
        self.spatial_dims = int(spatial_dims)
        self.instance_ratio = float(instance_ratio)
        self.seed = int(seed)
        self.background_label = background_label
        self.image_scale = check_scale(image_scale)
        self.choice = {"input_channel": input_channel, "input_time_point": input_time_point}

    @property
    def grid_factor(self) -> float:
        """The length factor of ``image_scale`` (the geometric mean of per-axis factors)."""
        return float(np.exp(np.mean(np.log(self.image_scale))))

    @functools.cached_property
    def _objects(self) -> tuple[int, np.ndarray]:
        """(count, equivalent diameters on the files' grid) of the kept objects of every label file."""
        count, diameters = 0, []
        for path in self.label_files:
            label = np.squeeze(read_image(path)[0])
            if label.ndim not in (2, 3):
                raise ValueError(f"{path}: a label image must be 2D or 3D, got shape {label.shape}.")
            if not np.issubdtype(label.dtype, np.integer):
                label = np.rint(label).astype(np.int64)
            # the name the training's SparseInstanceLabeld derives from the label file: the same objects are kept
            name = split_image_suffix(path)[0]
            kept = select_objects(label, self.instance_ratio, self.background_label, self.seed, name, path)
            count += int(np.count_nonzero(np.bincount(np.where(kept > 0, kept, 0).ravel())[1:]))
            diameters.append(equivalent_diameters(kept))
        return count, np.concatenate(diameters) if diameters else np.zeros(0)

    @property
    def object_count(self) -> int:
        return self._objects[0]

    @property
    def object_diameter(self) -> float:
        diameters = self._objects[1]
        return (float(np.median(diameters)) if diameters.size else float("nan")) * self.grid_factor

    @functools.cached_property
    def blob_scales(self) -> tuple[float, float, float]:
        values = []
        for path in self.image_files:
            image = np.squeeze(read_image(path, **self.choice)[0])
            if image.ndim not in (2, 3):
                raise ValueError(f"{path}: a training image must be 2D or 3D (one channel), got shape {image.shape}.")
            values.append(blob_scale(image))
        found = np.asarray([v for v in values if np.isfinite(v)])
        if not found.size:
            return (float("nan"),) * 3  # type: ignore[return-value]
        q = np.quantile(found, (0.1, 0.5, 0.9)) * self.grid_factor
        return float(q[0]), float(q[1]), float(q[2])

    @functools.cached_property
    def _voxel(self) -> tuple[list[float] | None, str]:
        sizes, units = [], []
        for path in self.image_files:
            shape, spacing, unit = read_spacing(path, **self.choice)
            drop = spatial_squeeze_axes(shape, self.spatial_dims, path)
            sizes.append([s for a, s in enumerate(spacing) if a not in drop])
            units.append(unit)
        if not sizes:
            return None, ""
        median = np.median(np.asarray(sizes, dtype=np.float64), axis=0)
        return [float(v) for v in median], max(set(units), key=units.count)

    @property
    def voxel_size(self) -> list[float] | None:
        return self._voxel[0]

    @property
    def voxel_unit(self) -> str:
        return self._voxel[1]

    def grid_voxel_size(self) -> list[float]:
        """The voxel size on the network's grid (ones where the headers state none or cannot be read)."""
        try:
            voxel = self.voxel_size
        except ValueError as e:  # a header the reader cannot parse: the data checks name it elsewhere
            logger.warning(f"the training images' voxel size is unknown ({e}), taken as isotropic")
            voxel = None
        if not voxel or len(voxel) != self.spatial_dims or not all(math.isfinite(v) and v > 0 for v in voxel):
            voxel = [1.0] * self.spatial_dims
        scale = np.broadcast_to(np.asarray(self.image_scale, np.float64), (self.spatial_dims,))
        return [float(v / f) for v, f in zip(voxel, scale)]

    def settings(self) -> dict[str, Any]:
        """How the run selects its annotations, for the model card."""
        scale = self.image_scale[0] if len(self.image_scale) == 1 else list(self.image_scale)
        return {
            "images": len(self.image_files),
            "instance_ratio": self.instance_ratio,
            "seed": self.seed,
            "background_label": self.background_label,
            "image_scale": scale,
        }
