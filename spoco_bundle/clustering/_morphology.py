"""Compiled grey-scale morphology for the default post-processing: reconstruction, h-minima and regional maxima.

scikit-image's ``reconstruction`` sorts every voxel (``argsort``: O(N log N), most of ``watershed`` clustering's and
``split_by_shape``'s time). These kernels give the same results in linear time: reconstruction by Vincent's hybrid
algorithm (a forward and a backward raster scan, then a FIFO propagation; L. Vincent, IEEE TIP 2(2), 1993), with
scikit-image's full connectivity (8 neighbours in 2D, 26 in 3D). They only take minima and maxima of the input
values, so the output equals scikit-image's bit for bit (the tests compare them). Without numba scikit-image runs.
"""

from __future__ import annotations

import itertools

import numba
import numpy as np

__all__ = ["reconstruction", "h_minima", "local_maxima", "dome_maxima", "watershed", "WATERSHED_LEVELS"]


def _padded(image: np.ndarray, value: float) -> np.ndarray:
    """``image`` as 3D (a 2D image gets a leading axis of 1) with a border of ``value``, C order."""
    arr = image if image.ndim == 3 else image[None]
    return np.pad(arr, 1, mode="constant", constant_values=value)


def _padded_signed(image: np.ndarray, sign: float, dtype: type) -> np.ndarray:
    """``sign * image`` as :func:`_padded` with -inf, in one copy."""
    arr = image if image.ndim == 3 else image[None]
    out = np.full(tuple(n + 2 for n in arr.shape), -np.inf, dtype)
    inner = out[1:-1, 1:-1, 1:-1]
    np.multiply(arr, sign, out=inner, casting="unsafe") if sign != 1 else np.copyto(inner, arr, casting="unsafe")
    return out


def _offsets(padded_shape: tuple[int, int, int], ndim: int) -> np.ndarray:
    """Raveled offsets of the full neighbourhood (3^ndim - 1 neighbours), in raster order: negative (already
    visited by a forward scan) first."""
    _, h, w = padded_shape
    steps = [(0,) if ndim == 2 else (-1, 0, 1), (-1, 0, 1), (-1, 0, 1)]
    offs = [dz * h * w + dy * w + dx for dz, dy, dx in itertools.product(*steps) if (dz, dy, dx) != (0, 0, 0)]
    return np.array(sorted(offs), dtype=np.int64)


def _k_dilate(seed: np.ndarray, mask: np.ndarray, offs: np.ndarray) -> None:
    """Reconstruction by dilation of ``seed`` under ``mask`` (flat, padded with -inf), in place in ``seed``."""
    n = seed.size
    half = offs.size // 2  # offs[:half] < 0 (earlier voxels), offs[half:] > 0
    for p in range(n):
        if mask[p] == -np.inf:
            continue
        v = seed[p]
        for k in range(half):
            q = p + offs[k]
            if seed[q] > v:
                v = seed[q]
        seed[p] = min(v, mask[p])
    queue = np.empty(n, np.int64)  # a ring: each voxel is in it at most once at a time
    queued = np.zeros(n, np.bool_)
    head = 0
    size = 0
    for p in range(n - 1, -1, -1):
        if mask[p] == -np.inf:
            continue
        v = seed[p]
        for k in range(half, offs.size):
            q = p + offs[k]
            if seed[q] > v:
                v = seed[q]
        v = min(v, mask[p])
        seed[p] = v
        for k in range(half, offs.size):
            q = p + offs[k]
            if seed[q] < v and seed[q] < mask[q]:
                queue[(head + size) % n] = p
                queued[p] = True
                size += 1
                break
    while size > 0:
        p = queue[head]
        head = (head + 1) % n
        size -= 1
        queued[p] = False
        v = seed[p]
        for k in range(offs.size):
            q = p + offs[k]
            if seed[q] < v and mask[q] != seed[q]:
                seed[q] = min(v, mask[q])
                if not queued[q]:
                    queue[(head + size) % n] = q
                    queued[q] = True
                    size += 1


def _k_maxima(image: np.ndarray, offs: np.ndarray, out: np.ndarray, starts: np.ndarray) -> None:
    """Regional maxima of ``image`` (flat, padded with -inf) into ``out``: plateaus (connected sets of one value)
    with no higher neighbour; only plateaus holding a voxel where ``starts`` is True are looked at."""
    n = image.size
    seen = np.zeros(n, np.bool_)
    stack = np.empty(n, np.int64)
    members = np.empty(n, np.int64)
    for start in range(n):
        if not starts[start] or seen[start] or image[start] == -np.inf:
            continue
        v = image[start]
        top = 0
        count = 0
        stack[0] = start
        top = 1
        seen[start] = True
        is_max = True
        while top > 0:
            top -= 1
            p = stack[top]
            members[count] = p
            count += 1
            for k in range(offs.size):
                q = p + offs[k]
                w = image[q]
                if w > v:
                    is_max = False
                elif w == v and not seen[q]:
                    seen[q] = True
                    stack[top] = q
                    top += 1
        if is_max:
            for i in range(count):
                out[members[i]] = True


# nogil: split_by_shape runs them per object in threads
_k_dilate = numba.njit(cache=True, nogil=True)(_k_dilate)
_k_maxima = numba.njit(cache=True, nogil=True)(_k_maxima)


def _k_h_minima(image: np.ndarray, hv: np.ndarray, rv: np.ndarray, offs: np.ndarray) -> np.ndarray:
    """:func:`h_minima` of a 3D image in one compiled call: the erosion as a dilation of the negated images, padded
    here; ``hv``, ``rv``: ``h`` and scikit-image's float tolerance factor as one-element arrays of the image's type
    (so the arithmetic stays in it, as in numpy)."""
    nz, ny, nx = image.shape
    seed = np.full((nz + 2, ny + 2, nx + 2), -np.inf, image.dtype)
    mask = np.full((nz + 2, ny + 2, nx + 2), -np.inf, image.dtype)
    h = hv[0]
    r = rv[0]
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                v = image[z, y, x]
                mask[z + 1, y + 1, x + 1] = -v
                seed[z + 1, y + 1, x + 1] = -((v + h) + r * abs(v))
    _k_dilate(seed.reshape(-1), mask.reshape(-1), offs)
    out = np.zeros((nz, ny, nx), np.uint8)
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                v = image[z, y, x]
                if -seed[z + 1, y + 1, x + 1] - v >= h:
                    out[z, y, x] = 1
    return out


_k_h_minima = numba.njit(cache=True)(_k_h_minima)


def _k_dome_maxima(dist: np.ndarray, depth: float, within: np.ndarray, offs: np.ndarray) -> np.ndarray:
    """Regional maxima inside ``within`` of the h-dome reconstruction of ``dist`` (3D, float64): one compiled call
    per object of :func:`~spoco_bundle.clustering.split_by_shape`, padding included."""
    nz, ny, nx = dist.shape
    seed = np.full((nz + 2, ny + 2, nx + 2), -np.inf)
    mask = np.full((nz + 2, ny + 2, nx + 2), -np.inf)
    starts = np.zeros((nz + 2, ny + 2, nx + 2), np.bool_)
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                mask[z + 1, y + 1, x + 1] = dist[z, y, x]
                seed[z + 1, y + 1, x + 1] = dist[z, y, x] - depth
                starts[z + 1, y + 1, x + 1] = within[z, y, x]
    _k_dilate(seed.reshape(-1), mask.reshape(-1), offs)
    out = np.zeros(seed.shape, np.bool_)
    inner = seed[1:-1, 1:-1, 1:-1]
    if inner.min() < inner.max():  # a flat dome has no maximum (scikit-image's rule, see local_maxima)
        _k_maxima(seed.reshape(-1), offs, out.reshape(-1), starts.reshape(-1))
    return out[1:-1, 1:-1, 1:-1] & within


_k_dome_maxima = numba.njit(cache=True, nogil=True)(_k_dome_maxima)


def dome_maxima(image: np.ndarray, h: float, within: np.ndarray | None = None) -> np.ndarray:
    """Regional maxima (bool mask) of the h-dome reconstruction of ``image`` inside ``within`` (default: everywhere):
    ``local_maxima(reconstruction(image - h, image)) & within``, the markers of
    :func:`~spoco_bundle.clustering.split_by_shape`, in one compiled call."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim not in (2, 3):
        raise ValueError(f"dome_maxima expects a 2D or 3D image, got shape {image.shape}.")
    within = np.ones(image.shape, bool) if within is None else np.asarray(within, bool)
    if within.shape != image.shape:
        raise ValueError(f"within has shape {within.shape}, the image {image.shape}; they must match.")
    if image.size == 0:
        return np.zeros(image.shape, bool)
    img3 = image if image.ndim == 3 else image[None]
    win3 = within if within.ndim == 3 else within[None]
    padded_shape = tuple(n + 2 for n in img3.shape)
    out = _k_dome_maxima(
        np.ascontiguousarray(img3), float(h), np.ascontiguousarray(win3), _offsets(padded_shape, image.ndim)
    )
    return out if image.ndim == 3 else out[0]


def reconstruction(seed: np.ndarray, mask: np.ndarray, method: str = "dilation") -> np.ndarray:
    """Grey-scale reconstruction of ``seed`` under (``"dilation"``) or over (``"erosion"``) ``mask``, full
    connectivity: scikit-image's ``reconstruction`` with its default footprint, in linear time.

    Args:
        seed, mask: 2D or 3D float arrays of one shape; ``seed <= mask`` for dilation, ``>=`` for erosion.
        method: ``"dilation"`` or ``"erosion"``.

    Returns:
        the reconstruction, in scikit-image's float type of ``mask`` (float32 stays float32).
    """
    if seed.shape != mask.shape or seed.ndim not in (2, 3):
        raise ValueError(f"seed and mask must be 2D or 3D arrays of one shape, got {seed.shape} and {mask.shape}.")
    if method not in ("dilation", "erosion"):
        raise ValueError(f"method must be 'dilation' or 'erosion', got {method!r}.")
    dtype = np.float32 if mask.dtype in (np.float16, np.float32) else np.float64
    sign = 1.0 if method == "dilation" else -1.0
    s = _padded_signed(seed, sign, dtype)
    m = _padded_signed(mask, sign, dtype)
    if np.any(s > m):
        raise ValueError(f"reconstruction by {method} needs seed {'<=' if sign > 0 else '>='} mask everywhere.")
    _k_dilate(s.reshape(-1), m.reshape(-1), _offsets(s.shape, seed.ndim))
    out = s[1:-1, 1:-1, 1:-1]
    return sign * (out if seed.ndim == 3 else out[0])


def h_minima(image: np.ndarray, h: float) -> np.ndarray:
    """Regional minima of ``image`` deeper than ``h`` (uint8 mask): scikit-image's ``h_minima`` for float images
    (same float tolerance, full connectivity), in linear time."""
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"h_minima expects a float image, got {image.dtype}.")
    if h > np.ptp(image):
        return np.zeros(image.shape, dtype=np.uint8)
    if h == 0:
        raise ValueError("h = 0 is ambiguous: every regional minimum.")
    resolution = 2 * np.finfo(image.dtype).resolution  # scikit-image's tolerance: shifted by h + this x |image|
    img3 = np.ascontiguousarray(image if image.ndim == 3 else image[None])
    hv, rv = np.array([h], image.dtype), np.array([resolution], image.dtype)
    out = _k_h_minima(img3, hv, rv, _offsets(tuple(n + 2 for n in img3.shape), image.ndim))
    return out if image.ndim == 3 else out[0]


def local_maxima(image: np.ndarray) -> np.ndarray:
    """Regional maxima of ``image`` (bool mask), full connectivity, plateaus at the border allowed: scikit-image's
    ``local_maxima(image, allow_borders=True)``."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"local_maxima expects a 2D or 3D image, got shape {image.shape}.")
    if image.size == 0 or image.min() == image.max():  # scikit-image: a flat image has no maximum
        return np.zeros(image.shape, dtype=bool)
    padded = _padded(image.astype(np.float64), -np.inf)
    out = np.zeros(padded.shape, dtype=bool)
    starts = np.ones(padded.size, dtype=bool)
    _k_maxima(padded.reshape(-1), _offsets(padded.shape, image.ndim), out.reshape(-1), starts)
    out = out[1:-1, 1:-1, 1:-1]
    return out if image.ndim == 3 else out[0]


def _k_watershed(levels: np.ndarray, n_levels: int, labels: np.ndarray, offs: np.ndarray, nxt: np.ndarray) -> None:
    """Seeded watershed by a hierarchical queue (one FIFO per grey level) of the quantised image ``levels`` from
    ``labels`` > 0 into the voxels where ``labels`` is 0, in place; -1 (outside the mask, the padding) stays.
    ``nxt``: work array of the queues' links, one per voxel."""
    n = levels.size
    head = np.full(n_levels, -1, np.int64)
    tail = np.full(n_levels, -1, np.int64)
    for p in range(n):
        if labels[p] <= 0:
            continue
        free = False  # a seed voxel with no free neighbour floods nothing: keep it out of the queue
        for k in range(offs.size):
            if labels[p + offs[k]] == 0:
                free = True
                break
        if not free:
            continue
        lv = levels[p]
        nxt[p] = -1
        if tail[lv] == -1:
            head[lv] = p
        else:
            nxt[tail[lv]] = p
        tail[lv] = p
    cur = 0
    while True:
        while cur < n_levels and head[cur] == -1:
            cur += 1
        if cur == n_levels:
            break
        p = head[cur]
        head[cur] = nxt[p]
        if head[cur] == -1:
            tail[cur] = -1
        lab = labels[p]
        for k in range(offs.size):
            q = p + offs[k]
            if labels[q] != 0:
                continue
            labels[q] = lab
            lv = max(levels[q], cur)  # below the water level: flooded now, at the current level
            nxt[q] = -1
            if tail[lv] == -1:
                head[lv] = q
            else:
                nxt[tail[lv]] = q
            tail[lv] = q


_k_watershed = numba.njit(cache=True)(_k_watershed)

# grey levels of the hierarchical queue: voxels within 1/4096 of the image's range of each other are flooded in the
# order they were reached
WATERSHED_LEVELS = 4096


def watershed(image: np.ndarray, markers: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Seeded watershed of ``image`` from ``markers`` (> 0) inside ``mask``, face connectivity, in linear time:
    Meyer's flooding with a hierarchical queue of :data:`WATERSHED_LEVELS` grey levels. scikit-image's
    ``watershed(image, markers, mask=mask)`` (a heap, O(N log N)) floods in the exact order of the values; here
    values closer than 1/4096 of the image's range count as equal (flooded in the order they were reached) and a
    voxel below the water level is flooded at the current level, so the two can differ in a few voxels where basins
    meet (the tests bound it).

    Returns:
        int32 labels of ``image``'s shape; voxels outside ``mask`` or not reached from a marker are 0.
    """
    image = np.asarray(image)
    if image.shape != markers.shape or (mask is not None and mask.shape != image.shape) or image.ndim not in (2, 3):
        raise ValueError(
            f"image, markers and mask must be 2D or 3D arrays of one shape, got {image.shape}, "
            f"{markers.shape}, {None if mask is None else mask.shape}."
        )
    region = np.ones(image.shape, bool) if mask is None else np.asarray(mask, bool)
    lab = _padded(np.where(region, markers, -1).astype(np.int32), -1)
    if not region.any():
        return np.zeros(image.shape, np.int32)
    lo = float(np.min(image, where=region, initial=np.inf))
    hi = float(np.max(image, where=region, initial=-np.inf))
    scale = (WATERSHED_LEVELS - 1) / (hi - lo) if hi > lo else 0.0
    # in [0, WATERSHED_LEVELS) inside the mask; outside it the level is never read (the labels there are -1)
    with np.errstate(invalid="ignore", over="ignore"):
        levels = _padded(((image - lo) * scale).astype(np.uint16), 0)
    face = np.array([o for o in _offsets(lab.shape, image.ndim) if o in _face_offsets(lab.shape, image.ndim)], np.int64)
    nxt = np.empty(lab.size, np.int32 if lab.size < 2**31 else np.int64)  # int32: less memory traffic
    _k_watershed(levels.reshape(-1), WATERSHED_LEVELS, lab.reshape(-1), face, nxt)
    out = np.maximum(lab[1:-1, 1:-1, 1:-1], 0)
    return out if image.ndim == 3 else out[0]


def _face_offsets(padded_shape: tuple[int, int, int], ndim: int) -> set[int]:
    _, h, w = padded_shape
    return {-1, 1, -w, w} | (set() if ndim == 2 else {-h * w, h * w})
