"""Splitting clustered objects by their shape alone (touching round objects joined by a neck)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from spoco_bundle.clustering._morphology import dome_maxima
from spoco_bundle.clustering.fast import _threads


def split_by_shape(
    labels: np.ndarray,
    h: float = 0.1,
    sigma: float = 1.0,
    spacing: Sequence[float] | None = None,
    min_size: int = 1,
    num_threads: int | None = None,
) -> np.ndarray:
    """Split objects that are two (or more) round objects joined by a neck, by their shape alone.

    Touching nuclei whose embeddings the network has not (yet) separated come out of every clustering as one
    object shaped like an 8. Per object: the Euclidean distance transform (in physical units when ``spacing`` is
    given, so anisotropic voxels are measured correctly), Gaussian-smoothed by ``sigma`` voxels of the finest axis;
    its maxima that rise more than ``h`` times the object's largest distance above the saddle to any higher one
    (h-maxima: regional maxima of the h-dome reconstruction, scikit-image) are markers; an object with two or more
    is divided by a watershed on the negative distance transform (the classical nucleus split, here applied only
    inside the clustered objects). ``h`` relative to the object's size makes the
    rule independent of magnification. A split that would leave a part smaller than ``min_size`` voxels is not made.

    Measured on DSB2018 validation images (``python -m research.foreground``, ``shape_split`` rows): see
    research/README.md.

    Args:
        labels: instance labels ``(H, W)`` or ``(D, H, W)``, 0 = background.
        h: relative depth of the distance transform's maxima that become parts (0 < h < 1; smaller splits more).
        sigma: smoothing of the distance transform in voxels of the finest axis (0: none).
        spacing: voxel size per axis (default: isotropic).
        min_size: smallest allowed part in voxels.
        num_threads: objects are split in this many threads (default: the CPUs available, at most 4).

    Returns:
        int32 labels of the same shape: unsplit objects keep their id, new parts get ids after the largest one.
    """
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2D or 3D integer array, got {labels.dtype} of shape {labels.shape}.")
    if not 0 < h < 1 or not sigma >= 0:
        raise ValueError(f"need 0 < h < 1 and sigma >= 0, got h={h}, sigma={sigma}.")
    spacing = np.ones(labels.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (labels.ndim,) or not np.all(spacing > 0):
        raise ValueError(f"spacing needs {labels.ndim} positive values, got {spacing}.")
    sigmas = sigma * spacing.min() / spacing
    out = labels.astype(np.int32, copy=True)
    boxes = [(i, box) for i, box in enumerate(ndimage.find_objects(out), start=1) if box is not None]

    def split_some(items: list) -> list:
        found = ((i, _split_object(out, i, box, h, spacing, sigmas, min_size)) for i, box in items)
        return [(i, *parts) for i, parts in found if parts is not None]

    # objects are independent and scipy / numba release the GIL: a thread per core; new ids in object order
    workers = min(_threads(num_threads), max(1, len(boxes) // 64))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            chunks = pool.map(split_some, [boxes[k::workers] for k in range(workers)])
            found = sorted((r for chunk in chunks for r in chunk), key=lambda r: r[0])
    else:
        found = split_some(boxes)
    next_id = int(out.max()) + 1
    for _, box, parts in found:
        view = out[box]
        for j in range(2, int(parts.max()) + 1):
            view[parts == j] = next_id
            next_id += 1
    return out


def _split_object(
    labels: np.ndarray,
    i: int,
    box: tuple[slice, ...],
    h: float,
    spacing: np.ndarray,
    sigmas: np.ndarray,
    min_size: int,
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """``(box, parts)``: the parts of object ``i`` of ``labels`` (1..n inside ``box``, 0 elsewhere), or None when it
    stays whole."""
    from skimage.segmentation import watershed  # per object, small: its exact heap costs little here

    box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)  # a background rim for the transform
    obj = labels[box] == i
    dist = ndimage.distance_transform_edt(obj, sampling=spacing)
    if np.any(sigmas > 0):
        dist = ndimage.gaussian_filter(dist, sigmas)
    top = float(dist[obj].max())
    if top <= 0:
        return None
    # h-maxima as the regional maxima of the h-dome reconstruction: unlike skimage's h_maxima residue test,
    # this keeps two equally high peaks one marker when the saddle between them is shallower than h
    markers, n = ndimage.label(dome_maxima(dist, h * top, within=obj))
    if n < 2:
        return None
    parts = watershed(-dist, markers, mask=obj)
    sizes = np.bincount(parts[obj], minlength=n + 1)[1:]
    if sizes.min() < min_size:
        return None
    return box, parts
