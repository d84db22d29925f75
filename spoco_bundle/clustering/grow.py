"""Objects drawn out to the head's softer edge (``foreground_grow`` in configs/inference.json)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from skimage.segmentation import expand_labels


def grow_into_foreground(
    labels: np.ndarray,
    probability: np.ndarray,
    threshold: float = 0.4,
    distance: float = 2.0,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Add to each object the background voxels near it that the foreground head still calls likely foreground.

    The head's mask at its threshold decides which objects exist and the clustering separates them, but an
    object's outer layer is where the head is least sure (a nucleus's rim is dimmer than its inside), so a head
    whose mask is tighter than the annotations draws every object too small. A lower threshold for the whole mask
    would also add new fragments and bridges between neighbours; here only voxels within ``distance`` of an
    existing object can join, each the nearest one (scikit-image's ``expand_labels``, which splits a gap between
    two objects down the middle), and only where the head's probability exceeds ``threshold``. No object is
    created, merged or removed. When it helps and when it costs: docs/benchmark_findings.md, "Objects drawn to the
    head's softer edge".

    Args:
        labels: instance labels ``(H, W)`` or ``(D, H, W)``, 0 = background.
        probability: the head's foreground probability, same shape.
        threshold: probability a background voxel needs to join an object, in (0, 1).
        distance: how far an object may grow, in voxels of the finest axis (physical length along coarser axes when
            ``spacing`` is given); 0 = no growth.
        spacing: voxel size per axis (default: isotropic).

    Returns:
        int32 labels of the same shape, the same ids.
    """
    labels = np.asarray(labels)
    probability = np.asarray(probability)
    if labels.ndim not in (2, 3) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2D or 3D integer array, got {labels.dtype} of shape {labels.shape}.")
    if probability.shape != labels.shape:
        raise ValueError(f"probability has shape {probability.shape}, labels {labels.shape}; they must match.")
    if not 0 < threshold < 1:
        raise ValueError(f"the growth threshold must be a probability in (0, 1), got {threshold!r}.")
    if not (math.isfinite(distance) and distance >= 0):
        raise ValueError(f"the growth distance must be a number >= 0, got {distance!r}.")
    spacing_arr = np.ones(labels.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if spacing_arr.shape != (labels.ndim,) or not np.all(spacing_arr > 0):
        raise ValueError(f"spacing needs {labels.ndim} positive values, got {spacing}.")
    out = labels.astype(np.int32, copy=True)
    if distance == 0 or not out.any():
        return out
    grown = expand_labels(out, distance=distance, spacing=spacing_arr / spacing_arr.min())
    join = (out == 0) & (probability > threshold)
    out[join] = grown[join]
    return out
