"""Measurements of images and instance labels that the model records about its training and inference compares
against (no model, no files: arrays in, numbers out).

- :func:`equivalent_diameters` / :func:`median_diameter`: object sizes, as the diameter of the disc (2D) or ball (3D)
  of the same area or volume, in voxels of the grid they are measured on. Objects cut by the image border look
  smaller than they are, so they are left out whenever at least :data:`MIN_INTERIOR` objects do not touch it.
- :func:`blob_scale`: an image's characteristic blob size (scale-space peak of the normalised Laplacian of
  Gaussian), which moves with the magnification (``image_scale "auto"``).
- :func:`coarse_background`: the slowly varying background of an image (a grey opening), taken off before the blob
  size is measured.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from monai.transforms import Resize
from scipy import ndimage
from skimage.measure import block_reduce

__all__ = [
    "MIN_INTERIOR",
    "BLOB_SIGMAS",
    "ball_volume",
    "equivalent_diameters",
    "median_diameter",
    "blob_scale",
    "coarse_background",
]

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
        flatten: subtract the crop's coarse background first: :func:`coarse_background`
            with a box of a third of its longest side.

    Returns:
        sigma of the peak; the end of the range when the energy peaks there; NaN for a constant image.
    """
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
        img = img - coarse_background(img, max(img.shape) / 3.0)
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


def coarse_background(image: np.ndarray, size: float) -> np.ndarray:
    """
    The slowly varying background of a 2D / 3D image: a grey opening with a box of about ``size`` voxels per side
    (bright structures narrower than the box disappear), smoothed by a Gaussian of a quarter of the box.

    Computed on a block-averaged copy (factor ``k = size // 8``; the image edge-padded to whole blocks) with a box of
    an odd number of blocks (so up to about 12 % wider than ``size``), resampled back linearly. The copy is continued
    past its border by odd reflection (a ramp goes on rising), bounded below by the mirrored opening (objects at the
    border leave no dark copies), so the background follows a rising ramp closer to the border than a plain
    reflection lets an opening do.

    Args:
        image: ``(H, W)`` or ``(D, H, W)``.
        size: box side in voxels.

    Returns:
        float32 array of the image's shape.
    """
    img = np.asarray(image, dtype=np.float32)
    k = max(1, int(size // 8))
    padded = np.pad(img, [(0, -n % k) for n in img.shape], mode="edge")
    small = padded if k == 1 else block_reduce(padded, (k,) * img.ndim, np.mean)
    box = max(3, int(round(size / k)) | 1)
    # continued linearly past the border (odd reflection): an opening cuts the crest a plain reflection makes of a
    # ramp, and the background would then run low along the border it rises towards. The odd reflection turns a
    # bright object at the border into a dark one outside, which an opening keeps: never below the mirrored
    # opening of the copy itself (objects gone). By at most the axis' length less one: no runaway extrapolation.
    pads = [(p, p) for p in (min(box, n - 1) for n in small.shape)]
    mirrored = np.pad(ndimage.grey_opening(small, size=(box,) * img.ndim, mode="reflect"), pads, mode="symmetric")
    ext = np.maximum(np.pad(small, pads, mode="reflect", reflect_type="odd"), mirrored)
    opened = ndimage.grey_opening(ext, size=(box,) * img.ndim, mode="reflect")
    smooth = ndimage.gaussian_filter(opened, sigma=box / 4.0, mode="reflect")
    smooth = smooth[tuple(slice(p, p + n) for (p, _), n in zip(pads, small.shape))]
    if k > 1:  # block centres -> voxel centres: a whole-number factor, corners not aligned
        back = Resize(padded.shape, mode="bilinear" if img.ndim == 2 else "trilinear", align_corners=False)
        smooth = np.asarray(back(torch.from_numpy(smooth)[None])[0], dtype=np.float32)
    return smooth[tuple(slice(0, n) for n in img.shape)]
