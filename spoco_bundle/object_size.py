"""
Object size: what a model was trained on, recorded in the model, so that inference can resample an image taken at
another magnification to one the model knows (``image_scale="auto"``, :class:`~spoco_bundle.inferers.ScaledInferer`).

- :func:`blob_scale`: an image's characteristic blob size (scale-space peak of the normalised Laplacian of
  Gaussian). It needs no model, and it moves with the magnification; inference compares it with the training
  images' (:func:`training_blob_scales`).
- :func:`training_object_diameter`: the median diameter of the annotated training objects, recorded for users
  (model card, logs) and for inference's size filter (``min_diameter_ratio``,
  :class:`~spoco_bundle.postprocessing.RemoveSmallInstances`).
- :func:`training_voxel_size`: the training images' voxel size as their files state it (model card), to turn the
  diameter into a physical size.

The diameter of an object is its *equivalent diameter*: that of the disc (2D) or ball (3D) of the same area or
volume, in voxels of the grid it is measured on. Objects cut by the image border look smaller than they are, so
they are left out whenever at least ``MIN_INTERIOR`` objects do not touch it. The median keeps a few merged or
fragmented objects from moving the estimate.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "MIN_INTERIOR",
    "ball_volume",
    "equivalent_diameters",
    "median_diameter",
    "training_object_diameter",
    "recorded_object_diameter",
    "RecordedObjectDiameter",
    "NetworkObjectDiameter",
    "training_object_count",
    "blob_scale",
    "training_blob_scales",
    "training_voxel_size",
    "BLOB_SIGMAS",
]

logger = logging.getLogger(__name__)

MIN_INTERIOR = 5
# Gaussian scales (voxels) at which blob_scale looks for the image's characteristic blob size
BLOB_SIGMAS = tuple(float(v) for v in np.exp(np.linspace(np.log(0.8), np.log(40.0), 24)))


def ball_volume(diameter: float, spatial_dims: int) -> float:
    """Area (2D) or volume (3D) in voxels of the disc or ball of ``diameter`` voxels: the inverse of
    :func:`equivalent_diameters`."""
    if spatial_dims == 2:
        return math.pi * diameter**2 / 4.0
    if spatial_dims == 3:
        return math.pi * diameter**3 / 6.0
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")


def equivalent_diameters(labels: np.ndarray, exclude_border: bool = True) -> np.ndarray:
    """
    Equivalent diameters of the objects of an instance label map.

    Args:
        labels: ``(H, W)`` or ``(D, H, W)`` integer labels (0 and negative ids = not an object).
        exclude_border: leave out objects that touch the array's border, if at least ``MIN_INTERIOR`` do not.

    Returns:
        float64 array, one diameter per object (in voxels), empty without objects.
    """
    lab = np.asarray(labels)
    if lab.ndim not in (2, 3):
        raise ValueError(f"labels must be 2D or 3D, got shape {lab.shape}.")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}.")
    flat = lab.reshape(-1)
    flat = np.where(flat > 0, flat, 0).astype(np.int64)
    sizes = np.bincount(flat)
    ids = np.flatnonzero(sizes)
    ids = ids[ids > 0]
    if ids.size == 0:
        return np.zeros(0)
    if exclude_border:
        border = np.zeros(sizes.size, bool)
        for axis in range(lab.ndim):
            for index in (0, -1):
                face = np.take(lab, index, axis=axis)
                border[face[face > 0].astype(np.int64)] = True
        interior = ids[~border[ids]]
        if interior.size >= MIN_INTERIOR:
            ids = interior
    volume = sizes[ids].astype(np.float64)
    if lab.ndim == 2:
        return 2.0 * np.sqrt(volume / math.pi)
    return np.cbrt(6.0 * volume / math.pi)


def median_diameter(label_maps: Iterable[np.ndarray], exclude_border: bool = True) -> float:
    """Median equivalent diameter over the objects of all ``label_maps`` (pooled); NaN without objects."""
    parts = [equivalent_diameters(lab, exclude_border) for lab in label_maps]
    pooled = np.concatenate(parts) if parts else np.zeros(0)
    return float(np.median(pooled)) if pooled.size else float("nan")


def training_object_diameter(
    label_files: Sequence[str | os.PathLike],
    instance_ratio: float = 1.0,
    seed: int = 0,
    image_scale: float | Sequence[float] = 1.0,
    background_label: int | None = None,
) -> float:
    """
    Median equivalent diameter of the objects a training run sees, on the network's grid.

    The label files are read with the bundle's reader (:func:`~spoco_bundle.io.read_image`), the objects kept by
    :class:`~spoco_bundle.transforms.SparseInstanceLabel` with the run's ``instance_ratio``, ``seed`` and
    ``background_label`` (only annotated objects count: the unlabelled ones are unknown, as in training), and the
    diameters multiplied by the training's ``image_scale`` (its geometric mean for one factor per axis).

    Returns:
        the diameter in voxels of the training grid; NaN when no file holds an annotated object.
    """
    diameters = _annotated(_file_keys(label_files), instance_ratio, seed, background_label)[1]
    return (float(np.median(diameters)) if diameters.size else float("nan")) * _grid_factor(image_scale)


def recorded_object_diameter(ckpt_path: str | os.PathLike) -> float:
    """
    The median diameter of the annotated training objects that a checkpoint's network records (its
    ``object_diameter`` buffer, set by :class:`~spoco_bundle.handlers.ObjectSizeHandler` when training starts), in
    voxels of the training grid, read from the file without building the network.

    Returns:
        the diameter; 0 when unknown: a model trained before bundle 0.9, or a file that is missing or unreadable
        (loading the weights reports those).
    """
    from spoco_bundle.networks import read_state_dict

    if not os.path.isfile(ckpt_path):
        return 0.0
    try:
        value = read_state_dict(str(ckpt_path)).get("object_diameter")
    except ValueError:  # not a checkpoint: load_weights says so with the file's name
        return 0.0
    try:
        diameter = float(value) if value is not None else 0.0
    except (TypeError, ValueError, RuntimeError):
        return 0.0
    return diameter if math.isfinite(diameter) and diameter > 0 else 0.0


class RecordedObjectDiameter:
    """
    :func:`recorded_object_diameter` of ``ckpt_path`` as a number (``float(...)``), read again whenever the file
    changes: a MONAI Label server retrains the model it segments with, and the new weights record the size of the new
    annotations.
    """

    def __init__(self, ckpt_path: str | os.PathLike) -> None:
        self.ckpt_path = ckpt_path
        self._key: tuple[int, int] | None = None
        self._value = 0.0

    def __float__(self) -> float:
        try:
            stat = os.stat(self.ckpt_path)
        except OSError:
            return 0.0
        key = (stat.st_mtime_ns, stat.st_size)
        if key != self._key:
            self._value, self._key = recorded_object_diameter(self.ckpt_path), key
        return self._value

    def __repr__(self) -> str:
        return f"RecordedObjectDiameter({str(self.ckpt_path)!r})"


class NetworkObjectDiameter:
    """
    The ``object_diameter`` buffer of a network as a number (``float(...)``), read at every call: training's
    validation filters its segmentations by the size that :class:`~spoco_bundle.handlers.ObjectSizeHandler` records
    in the student when the run starts, as inference will with the saved model (0 until recorded: only ``min_size``
    applies). A DDP wrapper is unwrapped.
    """

    def __init__(self, network) -> None:
        self.network = network

    def __float__(self) -> float:
        from spoco_bundle.distributed import unwrap

        value = getattr(unwrap(self.network), "object_diameter", None)
        return 0.0 if value is None else float(value)

    def __repr__(self) -> str:
        return f"NetworkObjectDiameter({type(self.network).__name__})"


def training_object_count(
    label_files: Sequence[str | os.PathLike],
    instance_ratio: float = 1.0,
    seed: int = 0,
    background_label: int | None = None,
) -> int:
    """
    How many objects a training run has annotated, in all its label files: the objects
    :func:`training_object_diameter` measures (the same files, selection and reader; the files are read once for
    both).
    """
    return _annotated(_file_keys(label_files), instance_ratio, seed, background_label)[0]


def _file_keys(label_files: Sequence[str | os.PathLike]) -> tuple[tuple[str, int, int], ...]:
    """(path, modification time, size) per file: a cache key that changes when a label file is rewritten (MONAI
    Label trains again in the same process after an annotator saved new labels under the same name)."""
    keys = []
    for f in label_files:
        try:
            st = os.stat(f)
            keys.append((str(f), st.st_mtime_ns, st.st_size))
        except OSError:  # the reader names the file in its error
            keys.append((str(f), -1, -1))
    return tuple(keys)


@functools.lru_cache(maxsize=4)
def _annotated(
    label_files: tuple[tuple[str, int, int], ...], instance_ratio: float, seed: int, background_label: int | None
) -> tuple[int, np.ndarray]:
    """(count, equivalent diameters) of the kept objects of the ``(path, mtime, size)`` files: the objects' number
    over all files, the diameters pooled (:func:`equivalent_diameters`, border objects left out). Cached: the
    handlers that start a training each ask."""
    from spoco_bundle.io import read_image, split_image_suffix
    from spoco_bundle.transforms import SparseInstanceLabel

    select = SparseInstanceLabel(instance_ratio=instance_ratio, background_label=background_label, seed=seed)
    count, diameters = 0, []
    for path, _, _ in label_files:
        lab = np.squeeze(read_image(path)[0])
        if lab.ndim not in (2, 3):
            raise ValueError(f"{path}: a label image must be 2D or 3D, got shape {lab.shape}.")
        if not np.issubdtype(lab.dtype, np.integer):
            lab = np.rint(lab).astype(np.int64)
        # the name SparseInstanceLabeld derives from the label file, so the same objects are kept as in training
        kept = np.asarray(select(lab, name=split_image_suffix(path)[0]))
        count += int(np.count_nonzero(np.bincount(np.where(kept > 0, kept, 0).astype(np.int64).ravel())[1:]))
        diameters.append(equivalent_diameters(kept))
    return count, np.concatenate(diameters) if diameters else np.zeros(0)


def _grid_factor(image_scale: float | Sequence[float]) -> float:
    """The length factor of the training's ``image_scale`` (the geometric mean of per-axis factors)."""
    from spoco_bundle.transforms import check_scale

    return float(np.exp(np.mean(np.log(check_scale(image_scale)))))


def blob_scale(
    image: np.ndarray,
    sigmas: Sequence[float] = BLOB_SIGMAS,
    max_voxels: int = 1 << 21,
    noise: bool = True,
    flatten: bool = True,
) -> float:
    """
    The characteristic blob size of an image: the Gaussian scale ``sigma`` (voxels) at which the energy of the
    scale-normalised Laplacian of Gaussian, ``mean((sigma^2 LoG_sigma * I)^2)``, peaks (Lindeberg's scale selection,
    refined between grid scales by a parabola in log sigma).

    It needs no model and no segmentation, and it moves with the magnification: the same specimen imaged twice as
    large peaks at twice the sigma. What it means in absolute terms depends on the stain (nuclei, membranes,
    texture), so it is only compared with the same measure on the training images (``image_scale "auto"``).

    The image is normalised to its 1-99.8 percentiles; a central crop of at most ``max_voxels`` is used, and large
    scales are computed on a block-averaged copy (factor ``sigma / 2``), which leaves the normalised energy nearly
    unchanged and keeps the cost low for large volumes. A slowly varying background (uneven illumination, a brighter
    side of a volume) is taken off the crop first (``flatten``): a steep ramp otherwise puts the peak at the end of
    the range, whatever the blobs' size.

    Args:
        image: ``(H, W)`` or ``(D, H, W)`` (a leading channel of size 1 is dropped).
        sigmas: increasing Gaussian scales in voxels.
        max_voxels: size of the central crop.
        noise: subtract the energy of white noise at the image's noise level (from neighbouring voxels' differences).
        flatten: subtract the crop's coarse background first: :func:`~spoco_bundle.transforms.tophat_background`
            with a box of a third of its longest side.

    Returns:
        sigma of the peak; the end of the range when the energy peaks there; NaN for a constant image.
    """
    from scipy import ndimage
    from skimage.measure import block_reduce

    img = np.asarray(image, dtype=np.float32)
    if img.ndim in (3, 4) and img.shape[0] == 1:
        img = img[0]
    if img.ndim not in (2, 3):
        raise ValueError(f"image must be 2D or 3D (optionally with one channel), got shape {np.shape(image)}.")
    side = int(max_voxels ** (1.0 / img.ndim))
    img = img[tuple(slice(max(0, (n - side) // 2), max(0, (n - side) // 2) + side) for n in img.shape)]
    if not img.size or not float(img.max() - img.min()) > 0:
        return float("nan")  # constant: nothing to measure (flattening would leave rounding noise to measure)
    if flatten:
        from spoco_bundle.transforms import tophat_background

        img = img - tophat_background(img, max(img.shape) / 3.0)
    lo, hi = np.percentile(img, (1.0, 99.8))
    if not hi > lo:
        return float("nan")
    img = (img - lo) / (hi - lo)
    sig = np.asarray(sigmas, dtype=np.float64)

    def spectrum(x: np.ndarray) -> np.ndarray:
        energy = np.empty(sig.size)
        reduced: dict[int, np.ndarray] = {}
        for i, s in enumerate(sig):
            k = max(1, int(s / 2.0))
            k = min(k, max(1, min(x.shape) // 8))  # keep at least a few voxels per axis
            if k not in reduced:
                reduced[k] = x if k == 1 else block_reduce(x, (k,) * x.ndim, np.mean)
            sk = s / k
            energy[i] = np.mean((sk**2 * ndimage.gaussian_laplace(reduced[k], sk, mode="reflect")) ** 2)
        return energy

    energy = spectrum(img)
    if noise:
        # pixel noise puts energy at the finest scales (for white noise it falls as sigma^-d) and can hide the blobs'
        # peak in noisy volumes: subtract the spectrum of white noise at the image's noise level, estimated robustly
        # from neighbour differences along the last axis (sqrt(2) sigma for white noise; the few edges barely move
        # their median)
        level = float(np.median(np.abs(np.diff(img, axis=-1)))) / (0.6745 * np.sqrt(2.0))
        if level > 0:
            white = np.random.default_rng(0).standard_normal(img.shape).astype(np.float32) * level
            energy = energy - spectrum(white)
    j = int(np.argmax(energy))
    if not np.isfinite(energy[j]) or energy[j] <= 0:
        return float("nan")
    if 0 < j < sig.size - 1 and bool(np.all(energy[j - 1 : j + 2] > 0)):
        y0, y1, y2 = np.log(energy[j - 1 : j + 2])
        x0, x1, x2 = np.log(sig[j - 1 : j + 2])
        curv = y0 - 2 * y1 + y2
        if curv < 0:  # a proper maximum: the vertex of the parabola through the three points (even log spacing)
            return float(np.exp(x1 + 0.5 * (y0 - y2) / curv * (x2 - x1)))
    return float(sig[j])


def training_blob_scales(
    image_files: Sequence[str | os.PathLike], image_scale: float | Sequence[float] = 1.0, tophat: float = 0.0
) -> tuple[float, float, float]:
    """
    The 10th, 50th and 90th percentile of :func:`blob_scale` over the training images (read with
    :func:`~spoco_bundle.io.read_image`), times the training's ``image_scale`` (geometric mean): on the network's grid.
    With ``tophat`` (the training's :class:`~spoco_bundle.transforms.TopHat`) each image is measured after it, as
    inference measures the images it is given.

    Returns:
        three floats; NaN for each when no image has structure (or there is none).
    """
    from spoco_bundle.io import read_image

    factor = _grid_factor(image_scale)
    values = []
    for path in image_files:
        image = np.squeeze(read_image(path)[0])
        if image.ndim not in (2, 3):
            raise ValueError(f"{path}: a training image must be 2D or 3D (one channel), got shape {image.shape}.")
        if tophat:
            from spoco_bundle.transforms import TopHat

            image = TopHat(tophat)(image[None])[0]
        values.append(blob_scale(image))
    found = np.asarray([v for v in values if np.isfinite(v)])
    if not found.size:
        return (float("nan"),) * 3  # type: ignore[return-value]
    q = np.quantile(found, (0.1, 0.5, 0.9)) * factor
    return float(q[0]), float(q[1]), float(q[2])


def training_voxel_size(image_files: Sequence[str | os.PathLike], spatial_dims: int) -> tuple[list[float] | None, str]:
    """
    The training images' voxel size, per axis in array order (the median over the images; singleton axes dropped as
    the training drops them), and its unit (the most common one; ``""`` when the files state none). Read from the
    headers alone (:func:`~spoco_bundle.io.read_spacing`).

    Returns:
        ``(voxel_size, unit)``; ``(None, "")`` without images.
    """
    from spoco_bundle.data import spatial_squeeze_axes
    from spoco_bundle.io import read_spacing

    sizes, units = [], []
    for path in image_files:
        shape, spacing, unit = read_spacing(path)
        drop = spatial_squeeze_axes(shape, spatial_dims, path)
        sizes.append([s for a, s in enumerate(spacing) if a not in drop])
        units.append(unit)
    if not sizes:
        return None, ""
    median = np.median(np.asarray(sizes, dtype=np.float64), axis=0)
    unit = max(set(units), key=units.count)
    return [float(v) for v in median], unit
