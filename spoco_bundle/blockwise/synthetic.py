"""
Synthetic embedding volumes of any size with known instances, generated region by region (a 1-Gvoxel volume of 16
float32 channels is 64 GB; any region of it is computed on demand, the same whatever the blocks): for tests and
research/perf/benchmark_blockwise.py.

The objects: one seed per cell of a regular grid (``cell`` voxels), jittered; a voxel belongs to its nearest seed's
object when it lies within that seed's radius and the seed is present (``present`` of the seeds), else to the
background. Neighbouring objects touch where both radii reach their Voronoi border. Embeddings follow the geometry the
SPOCO losses train for (as research/perf/benchmark_clustering.py, E = 16, delta_v = 0.5, delta_d = 2.0): one centre per
object drawn from N(0, 1.5^2) per dimension (neighbours are then almost always more than 2 delta_d apart in 16-D),
plus noise of standard deviation ``noise`` per voxel and dimension (triangular, cheap to hash); the last channel
is a foreground logit (+6 / -6 plus noise of standard deviation 1), as the network's head gives. All randomness is
a hash of the global coordinates, so overlapping regions agree voxel for voxel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np

__all__ = ["SyntheticEmbeddings"]

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _hash(*keys: np.ndarray) -> np.ndarray:
    """splitmix64 of the combined integer keys: uniform uint64 per element (vectorised, deterministic)."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x9E3779B97F4A7C15)
        for k in keys:
            h = (h ^ np.asarray(k).astype(np.uint64)) * np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(31)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def _uniform(*keys: np.ndarray) -> np.ndarray:
    return (_hash(*keys) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _normal(*keys: np.ndarray) -> np.ndarray:
    """Standard normal per element (Box-Muller of two hashed uniforms)."""
    u1 = np.maximum(_uniform(*keys, np.uint64(1)), 1e-300)
    u2 = _uniform(*keys, np.uint64(2))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)


@numba.njit(cache=True, nogil=True)
def _render(start, shape, cell, lo, pos, radius, present, out):  # pragma: no cover - compiled
    """For each voxel of the region ``start + [0, shape)``: the flat index of its object's seed among the cells
    ``lo + [0, pos.shape[:3])``, or the number of those cells for the background."""
    n = pos.shape[0] * pos.shape[1] * pos.shape[2]
    for z in range(shape[0]):
        gz = start[0] + z
        cz = gz // cell - lo[0]
        for y in range(shape[1]):
            gy = start[1] + y
            cy = gy // cell - lo[1]
            for x in range(shape[2]):
                gx = start[2] + x
                cx = gx // cell - lo[2]
                best, best_d = n, 1e30
                for oz in range(cz - 1, cz + 2):
                    for oy in range(cy - 1, cy + 2):
                        for ox in range(cx - 1, cx + 2):
                            dz = gz - pos[oz, oy, ox, 0]
                            dy = gy - pos[oz, oy, ox, 1]
                            dx = gx - pos[oz, oy, ox, 2]
                            d = dz * dz + dy * dy + dx * dx
                            if d < best_d:
                                best_d = d
                                inside = present[oz, oy, ox] and d < radius[oz, oy, ox] ** 2
                                best = (oz * pos.shape[1] + oy) * pos.shape[2] + ox if inside else n
                out[z, y, x] = best


@numba.njit(cache=True, inline="always")
def _mix(h):  # pragma: no cover - compiled; splitmix64's finaliser
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


@numba.njit(cache=True, nogil=True)
def _fill(start, full, seed, inverse, centres, noise, lab, out):  # pragma: no cover - compiled
    """Embeddings (centre of the voxel's object + noise) and the foreground logit, the noise hashed from the voxel's
    global index: two values per 64-bit hash, each the sum of two of its 16-bit parts (a triangular distribution),
    scaled to variance 1. Releases the GIL: blocks are generated in parallel threads."""
    dim = centres.shape[1]
    m16 = np.uint64(0xFFFF)
    scale = np.sqrt(6.0) / 65536.0
    for z in range(lab.shape[0]):
        for y in range(lab.shape[1]):
            for x in range(lab.shape[2]):
                g = ((start[0] + z) * full[1] + start[1] + y) * full[2] + start[2] + x
                base = _mix(np.uint64(g) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed))
                k = inverse[z, y, x]
                fg = 6.0 if lab[z, y, x] > 0 else -6.0
                for d in range(0, dim + 1, 2):
                    h = _mix(base + np.uint64(d + 1))
                    n1 = (float(h & m16) + float((h >> np.uint64(16)) & m16) - 65535.0) * scale
                    n2 = (float((h >> np.uint64(32)) & m16) + float(h >> np.uint64(48)) - 65535.0) * scale
                    if d < dim:
                        out[d, z, y, x] = centres[k, d] + noise * n1
                    else:
                        out[dim, z, y, x] = fg + n1
                    if d + 1 < dim:
                        out[d + 1, z, y, x] = centres[k, d + 1] + noise * n2
                    elif d + 1 == dim:
                        out[dim, z, y, x] = fg + n2


class SyntheticEmbeddings:
    """
    A synthetic 3D embedding volume with known instances, computed per region (see the module's docstring).

    Args:
        shape: the volume's spatial shape (3 axes).
        cell: seed spacing in voxels (objects are about ``cell`` wide; about ``cell^3 / 2`` voxels each).
        present: fraction of seeds that are objects (the others leave background).
        dim: embedding dimension E.
        noise: per-voxel embedding noise (standard deviation per dimension).
        seed: the volume's random seed.

    Indexing ``emb[region]`` (``region``: a tuple of slices over the spatial axes, optionally after an Ellipsis or a
    leading ``slice(None)``) gives ``(dim + 1, *region)`` float32; :meth:`labels` the ground truth of a region.
    """

    def __init__(
        self,
        shape: Sequence[int],
        cell: int = 12,
        present: float = 0.7,
        dim: int = 16,
        noise: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.spatial_shape = tuple(int(s) for s in shape)
        if len(self.spatial_shape) != 3:
            raise ValueError(f"SyntheticEmbeddings makes 3D volumes, got shape {shape}.")
        self.cell, self.present, self.dim, self.noise, self.seed = int(cell), float(present), int(dim), noise, seed
        self.shape = (self.dim + 1,) + self.spatial_shape
        self.ndim = 4
        self.dtype = np.dtype(np.float32)
        self.grid = tuple(-(-s // self.cell) for s in self.spatial_shape)

    def __dask_tokenize__(self) -> tuple:
        return (type(self).__name__, self.spatial_shape, self.cell, self.present, self.dim, self.noise, self.seed)

    def _region(self, key: tuple) -> tuple[slice, ...]:
        key = key if isinstance(key, tuple) else (key,)
        if key and key[0] is Ellipsis:
            key = key[1:]
        elif len(key) == 4:
            key = key[1:]
        if len(key) != 3 or not all(isinstance(k, slice) and k.step in (None, 1) for k in key):
            raise IndexError(f"SyntheticEmbeddings reads regions of 3 contiguous slices, got {key!r}.")
        return tuple(slice(*k.indices(s)[:2]) for k, s in zip(key, self.spatial_shape))

    def _seeds(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Seed position (3), radius and id (0: absent) of each cell index ``(..., 3)``."""
        c = [cells[..., a].astype(np.int64) + 4 for a in range(3)]  # + 4: non-negative keys for the hash
        pos = np.stack(
            [(cells[..., a] + 0.2 + 0.6 * _uniform(self.seed, *c, 10 + a)) * self.cell for a in range(3)], -1
        )
        radius = (0.5 + 0.35 * _uniform(self.seed, *c, 20)) * self.cell
        inside = np.all((cells >= 0) & (cells < np.asarray(self.grid)), axis=-1)
        flat = (cells[..., 0] * self.grid[1] + cells[..., 1]) * self.grid[2] + cells[..., 2] + 1
        ids = np.where(inside & (_uniform(self.seed, *c, 30) < self.present), flat, 0).astype(np.int64)
        return pos, radius, ids

    def _seed_index(self, region: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Per voxel the index of its object among the seeds near the region (background: the last index), and the
        ids of those seeds (with 0 appended for the background)."""
        start = np.array([r.start for r in region], dtype=np.int64)
        stop = np.array([r.stop for r in region], dtype=np.int64)
        lo = start // self.cell - 1
        hi = np.maximum(stop - 1, start) // self.cell + 2
        axes = [np.arange(a, b) for a, b in zip(lo, hi)]
        cells = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
        pos, radius, ids = self._seeds(cells)
        index = np.empty(tuple(stop - start), dtype=np.int64)
        _render(start, index.shape, self.cell, lo, pos, radius, ids > 0, index)
        return index, np.append(ids.reshape(-1), 0)

    def labels(self, region: tuple) -> np.ndarray:
        """Ground-truth instance ids of ``region`` (int64, unique over the volume, 0 = background)."""
        index, ids = self._seed_index(self._region(region))
        return ids[index]

    def __getitem__(self, key: tuple) -> np.ndarray:
        region = self._region(key)
        index, ids = self._seed_index(region)
        keys = np.asarray(ids, dtype=np.uint64)
        centres = np.stack([1.5 * _normal(self.seed, keys, 100 + d) for d in range(self.dim)], 1).astype(np.float32)
        centres[ids == 0] = 0.0
        out = np.empty((self.dim + 1,) + index.shape, dtype=np.float32)
        start = np.array([r.start for r in region], dtype=np.int64)
        full = np.array(self.spatial_shape, dtype=np.int64)
        _fill(start, full, int(self.seed), index, centres, float(self.noise), ids[index], out)
        return out
