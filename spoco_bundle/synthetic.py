"""Synthetic fluorescence "nuclei" volumes with dense instance labels, for the demo and the tests.

The generator packs ellipsoidal, slightly irregular blobs densely (many touch), assigns every voxel of the union
of blobs to exactly one object with a power-diagram rule (so the labels are a clean partition), then renders a
plausible fluorescence image: per-object brightness, chromatin-like texture, dimmer rims and contact seams, a low
blurred background with out-of-focus haze, an anisotropic PSF and Poisson + Gaussian noise.

Arrays use storage order (z, y, x) in 3D and (y, x) in 2D; ``spacing`` is given in the same order and in
physical units (um), so objects are round physically and flattened along z in voxels when z is coarser.

Command line::

    python -m spoco_bundle.synthetic --out_dir DIR [--spatial_dims 2|3] [--n_train 6] [--ext .tif] ...
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["generate_nuclei", "write_synthetic_dataset", "DEFAULT_SHAPE", "DEFAULT_SPACING"]

# bump when the generator's output changes, so cached datasets are regenerated
GENERATOR_VERSION = 1

DEFAULT_SHAPE = {3: (48, 96, 96), 2: (192, 192)}
DEFAULT_SPACING = {3: (2.0, 1.0, 1.0), 2: (1.0, 1.0)}
# PSF sigma in physical units per axis: coarser along z, like a widefield/confocal axial PSF
DEFAULT_PSF_SIGMA = {3: (1.5, 0.6, 0.6), 2: (0.6, 0.6)}
# fraction of the physical volume/area filled by objects when n_objects is not given
_AUTO_FILL = {3: 0.27, 2: 0.40}

SeedLike = int | np.random.SeedSequence | np.random.Generator | None


def _as_tuple(value: Any, n: int, name: str, cast: type = float) -> tuple:
    """Broadcast a scalar or sequence to a tuple of length ``n`` (fire may pass tuples, lists or scalars)."""
    if np.isscalar(value):
        return (cast(value),) * n
    value = tuple(cast(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} must have {n} entries, got {len(value)}: {value}.")
    return value


def _random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """Uniformly distributed rotation matrix (QR of a Gaussian matrix with the sign fix)."""
    q, r = np.linalg.qr(rng.normal(size=(ndim, ndim)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _gaussian(x: np.ndarray, sigma_vox: Sequence[float]) -> np.ndarray:
    """Gaussian filter; wide kernels run on a block-averaged grid and are upsampled linearly (much faster)."""
    sigma = np.asarray(sigma_vox, dtype=float)
    factors = np.maximum(1, np.floor(sigma / 2.0)).astype(int)  # keep >= 2 voxels of sigma on the coarse grid
    if np.all(factors == 1):
        return ndimage.gaussian_filter(x, sigma, mode="reflect")
    shape = np.asarray(x.shape)
    small_shape = -(-shape // factors)
    padded = np.pad(x, [(0, int(p)) for p in small_shape * factors - shape], mode="edge")
    blocks = padded.reshape([v for pair in zip(small_shape, factors) for v in pair])
    small = blocks.mean(axis=tuple(range(1, 2 * x.ndim, 2)))
    small = ndimage.gaussian_filter(small, sigma / factors, mode="reflect")
    # separable linear upsampling (pixel-centre aligned), cheaper than ndimage.zoom
    for axis, (n_out, f) in enumerate(zip(shape, factors)):
        if f == 1:
            continue
        pos = np.clip((np.arange(n_out) + 0.5) / f - 0.5, 0, small.shape[axis] - 1)
        i0 = np.floor(pos).astype(int)
        i1 = np.minimum(i0 + 1, small.shape[axis] - 1)
        w = (pos - i0).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        small = np.take(small, i0, axis=axis) * (1 - w) + np.take(small, i1, axis=axis) * w
    return small


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: Sequence[float]) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit standard deviation."""
    field = _gaussian(rng.standard_normal(shape, dtype=np.float32), sigma_vox)
    field -= field.mean()
    std = field.std()
    return field / std if std > 0 else field


def _resolve_count(
    n_objects: int | Sequence[int] | None, extent: np.ndarray, radius_range: tuple[float, float]
) -> tuple[int, int]:
    """Inclusive (low, high) range of object counts; ``None`` derives it from the volume and the radii."""
    if n_objects is None:
        r0, r1 = radius_range
        ndim = len(extent)
        if ndim == 3:  # E[r^3] for r ~ U(r0, r1)
            mean_size = 4.0 / 3.0 * math.pi * (r1**4 - r0**4) / (4 * (r1 - r0)) if r1 > r0 else 4 / 3 * math.pi * r0**3
        else:
            mean_size = math.pi * (r1**3 - r0**3) / (3 * (r1 - r0)) if r1 > r0 else math.pi * r0**2
        n_est = _AUTO_FILL[ndim] * float(np.prod(extent)) / mean_size
        return max(1, round(0.85 * n_est)), max(1, round(1.15 * n_est))
    if np.isscalar(n_objects):
        low = high = int(n_objects)
    else:
        low, high = (int(v) for v in n_objects)
    if low < 1 or high < low:
        raise ValueError(
            f"n_objects must be a positive int or a (low, high) range with 1 <= low <= high, got {n_objects}."
        )
    return low, high


def _place_centres(
    rng: np.random.Generator,
    n: int,
    extent: np.ndarray,
    radius_range: tuple[float, float],
    min_dist_factor: float,
    cluster_prob: float,
    max_attempts: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Dart throwing in physical coordinates; most proposals sit just inside touching distance of a placed object.

    Two centres must be at least ``min_dist_factor * (r_i + r_j)`` apart; with ``min_dist_factor < 1`` neighbours
    overlap and end up touching after the partition, while every object keeps the region around its own centre.
    """
    ndim = len(extent)
    centres = np.empty((n, ndim))
    radii = np.empty(n)
    count = 0
    for _ in range(max_attempts):
        if count == n:
            break
        r = rng.uniform(*radius_range)
        if count and rng.random() < cluster_prob:
            j = rng.integers(count)
            direction = rng.normal(size=ndim)
            direction /= np.linalg.norm(direction) + 1e-12
            c = centres[j] + direction * rng.uniform(min_dist_factor, 1.0) * (r + radii[j])
            if np.any(c < 0) or np.any(c > extent):
                continue
        else:
            c = rng.uniform(0.0, 1.0, size=ndim) * extent
        if count:
            dist = np.linalg.norm(centres[:count] - c, axis=1)
            if np.any(dist < min_dist_factor * (radii[:count] + r)):
                continue
        centres[count], radii[count] = c, r
        count += 1
    return centres[:count], radii[:count]


def _partition(
    shape: tuple[int, ...],
    spacing: np.ndarray,
    centres: np.ndarray,
    axes: np.ndarray,
    rotations: np.ndarray,
    radii: np.ndarray,
    warp: np.ndarray,
    irregularity: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Assign every voxel of the union of blobs to the object of lowest power-like score.

    Score of object k at x: ``r_k^2 (d_k(x)^2 - 1)`` with ``d_k`` the normalised ellipsoid distance (warped by a
    smooth field for irregular outlines). For spheres this is the power distance, whose cells are convex, so
    overlaps split along flat interfaces. Work is done in each object's bounding box only.

    Returns:
        labels (int32, 0 = background, k + 1 = object k) and the winner's normalised distance (float32, in [0, 1]).
    """
    ndim = len(shape)
    labels = np.zeros(shape, dtype=np.int32)
    best = np.zeros(shape, dtype=np.float32)  # only negative scores (inside a blob) can win
    dnorm = np.ones(shape, dtype=np.float32)
    # the warp shrinks d by at most this factor, so the blob never reaches beyond axes * margin
    margin = 1.0 / max(0.1, 1.0 + irregularity * float(warp.min()))
    for k in range(len(centres)):
        half = axes[k].max() * margin
        lo = np.maximum(np.floor((centres[k] - half) / spacing).astype(int), 0)
        hi = np.minimum(np.ceil((centres[k] + half) / spacing).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        # physical offsets from the centre along each axis, broadcastable over the box
        offsets = [
            (np.arange(lo[a], hi[a]) * spacing[a] - centres[k][a]).reshape([-1 if b == a else 1 for b in range(ndim)])
            for a in range(ndim)
        ]
        # coordinates in the object's frame: u_i = sum_a R[a, i] * offset_a / axis_i
        d2 = 0.0
        for i in range(ndim):
            u = sum(rotations[k][a, i] * offsets[a] for a in range(ndim)) / axes[k][i]
            d2 = d2 + u * u
        d = np.sqrt(d2) * (1.0 + irregularity * warp[box])
        score = (radii[k] ** 2) * (d * d - 1.0)
        win = score < best[box]
        best[box][win] = score[win]
        labels[box][win] = k + 1
        dnorm[box][win] = d[win]
    return labels, np.clip(dnorm, 0.0, 1.0)


def _clean_partition(labels: np.ndarray) -> np.ndarray:
    """Keep the largest face-connected component of each object (stray fragments -> background); relabel 1..n."""
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = labels[sl] == k
        comps, n_comps = ndimage.label(mask)
        if n_comps > 1:
            sizes = np.bincount(comps.ravel())
            sizes[0] = 0
            labels[sl][mask & (comps != sizes.argmax())] = 0
    present = np.unique(labels)
    present = present[present > 0]
    lut = np.zeros(labels.max() + 1, dtype=np.uint16)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.uint16)
    return lut[labels]


def generate_nuclei(
    shape: Sequence[int] = (48, 96, 96),
    n_objects: int | Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    seed: SeedLike = 0,
    radius_range: Sequence[float] = (9.0, 14.0),
    elongation: float = 0.2,
    irregularity: float = 0.06,
    min_dist_factor: float = 0.75,
    cluster_prob: float = 0.7,
    brightness_range: Sequence[float] = (0.35, 1.0),
    texture: float = 0.25,
    rim_dimming: float = 0.35,
    seam_dimming: float = 0.3,
    background: float = 0.06,
    haze: float = 0.1,
    psf_sigma: Sequence[float] | float | None = None,
    photons: float | None = 80.0,
    read_noise: float = 0.02,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one synthetic fluorescence image of densely packed nuclei and its dense instance labels.

    Args:
        shape: array shape in storage order, (z, y, x) for 3D or (y, x) for 2D.
        n_objects: number of nuclei, an int or an inclusive (low, high) range sampled uniformly. ``None`` picks a
            range giving a dense packing for the volume and radii (about 30-40 for the 3D defaults). If the
            packing cannot fit the drawn number, fewer objects are returned.
        spacing: voxel size in physical units per axis, same order as ``shape``. ``None``: (2, 1, 1) in 3D,
            (1, 1) in 2D.
        seed: int, ``np.random.SeedSequence``, ``np.random.Generator`` or ``None`` (fresh entropy).
        radius_range: (min, max) nucleus radius in physical units.
        elongation: relative random scaling of the ellipsoid axes, each axis in ``r * [1 - e, 1 + e]``.
        irregularity: amplitude of the smooth warp of the outlines (0 = exact ellipsoids).
        min_dist_factor: centres are at least ``min_dist_factor * (r_i + r_j)`` apart; < 1 makes neighbours touch.
        cluster_prob: probability that a centre is proposed just within touching distance of a placed nucleus.
        brightness_range: (min, max) of the per-nucleus brightness, sampled uniformly.
        texture: relative amplitude of the chromatin-like intensity texture inside nuclei.
        rim_dimming: relative intensity drop from a nucleus' centre to its rim.
        seam_dimming: relative intensity drop on voxels where two nuclei touch (keeps them separable by eye).
        background: mean background level (spatially varying, low-frequency).
        haze: weight of the out-of-focus glow around nuclei.
        psf_sigma: Gaussian PSF sigma in physical units per axis (or a scalar); ``None`` uses a slight, z-elongated
            default ((1.5, 0.6, 0.6) in 3D, (0.6, 0.6) in 2D); 0 disables the blur.
        photons: expected photon count at intensity 1 for Poisson noise; ``None`` or 0 disables it.
        read_noise: standard deviation of the additive Gaussian noise.

    Returns:
        ``(image, labels)``: image float32 of ``shape`` (background about ``background``, nuclei about
        ``brightness``), labels uint16 of ``shape`` with 0 = background and 1..n = nuclei, consecutive, each
        nucleus a single face-connected component.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if ndim not in (2, 3):
        raise ValueError(f"shape must have 2 or 3 entries (2D or 3D), got {shape}.")
    if min(shape) < 1:
        raise ValueError(f"shape entries must be positive, got {shape}.")
    spacing_arr = np.asarray(_as_tuple(DEFAULT_SPACING[ndim] if spacing is None else spacing, ndim, "spacing"))
    if np.any(spacing_arr <= 0):
        raise ValueError(f"spacing entries must be positive, got {tuple(spacing_arr)}.")
    r_lo, r_hi = _as_tuple(radius_range, 2, "radius_range")
    if not 0 < r_lo <= r_hi:
        raise ValueError(f"radius_range must satisfy 0 < min <= max, got {(r_lo, r_hi)}.")
    b_lo, b_hi = _as_tuple(brightness_range, 2, "brightness_range")
    if not 0 <= b_lo <= b_hi:
        raise ValueError(f"brightness_range must satisfy 0 <= min <= max, got {(b_lo, b_hi)}.")
    if not 0 < min_dist_factor:
        raise ValueError(f"min_dist_factor must be positive, got {min_dist_factor}.")
    if not 0 <= elongation < 1:
        raise ValueError(f"elongation must be in [0, 1), got {elongation}.")
    psf = _as_tuple(DEFAULT_PSF_SIGMA[ndim] if psf_sigma is None else psf_sigma, ndim, "psf_sigma")

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    extent = (np.asarray(shape) - 1) * spacing_arr
    low, high = _resolve_count(n_objects, np.maximum(extent, spacing_arr), (r_lo, r_hi))
    n = int(rng.integers(low, high + 1))

    centres, radii = _place_centres(rng, n, extent, (r_lo, r_hi), min_dist_factor, cluster_prob, 500 * n)
    if len(centres) < n:
        warnings.warn(
            f"generate_nuclei: only {len(centres)} of {n} nuclei fit into shape {shape} with spacing "
            f"{tuple(spacing_arr)} and radius_range {(r_lo, r_hi)}; lower n_objects or the radii.",
            stacklevel=2,
        )
    n = len(centres)
    axes = radii[:, None] * rng.uniform(1 - elongation, 1 + elongation, size=(n, ndim))
    rotations = np.stack([_random_rotation(rng, ndim) for _ in range(n)]) if n else np.zeros((0, ndim, ndim))

    def vox(sigma_phys: Sequence[float] | float) -> np.ndarray:
        return np.asarray(_as_tuple(sigma_phys, ndim, "sigma")) / spacing_arr

    # smooth fields: outline warp (a few um), chromatin texture (fine), background (coarse)
    warp = _smooth_noise(rng, shape, vox(0.3 * r_lo))
    labels32, dnorm = _partition(shape, spacing_arr, centres, axes, rotations, radii, warp, irregularity)
    labels = _clean_partition(labels32)
    n_final = int(labels.max())

    fg = labels > 0
    brightness = np.zeros(n_final + 1, dtype=np.float32)
    brightness[1:] = rng.uniform(b_lo, b_hi, size=n_final)
    tex = _smooth_noise(rng, shape, vox(0.12 * r_lo))
    signal = brightness[labels] * (1.0 - rim_dimming * dnorm**2) * np.clip(1.0 + texture * tex, 0.0, None)
    if seam_dimming > 0 and n_final > 1:
        # contact voxels: a face neighbour belongs to another nucleus (background does not count)
        hi_nb = ndimage.maximum_filter(labels, size=3, mode="nearest")
        lo_nb = ndimage.minimum_filter(np.where(fg, labels, np.uint16(65535)), size=3, mode="nearest")
        seam = fg & ((hi_nb != labels) | (lo_nb != labels))
        signal[seam] *= 1.0 - seam_dimming
    signal[~fg] = 0.0

    bg = background * np.clip(1.0 + 0.5 * _smooth_noise(rng, shape, vox(4.0 * r_hi)), 0.2, None)
    image = signal + bg
    if haze > 0:
        image += haze * _gaussian(signal, vox(0.5 * r_hi))
    if any(s > 0 for s in psf):
        image = _gaussian(image, vox(psf))
    image = np.clip(image, 0.0, None)
    if photons:
        image = rng.poisson(image * photons).astype(np.float32) / np.float32(photons)
    if read_noise > 0:
        image += rng.normal(0.0, read_noise, size=shape).astype(np.float32)
    # detectors give non-negative counts
    return np.clip(image, 0.0, None).astype(np.float32, copy=False), labels


# ---------------------------------------------------------------------------------------------------------------------
# dataset writer


def _normalise_ext(ext: str) -> str:
    ext = ext if ext.startswith(".") else "." + ext
    if ext not in (".nii.gz", ".nii", ".tif", ".tiff"):
        raise ValueError(f"ext must be one of '.nii.gz', '.nii', '.tif', '.tiff', got {ext!r}.")
    return ext


def _write_array(path: Path, array: np.ndarray, spacing: Sequence[float], ext: str) -> None:
    """Write in storage order (z, y, x) / (y, x): NIfTI with affine diag(spacing), or an ImageJ TIFF."""
    if ext in (".nii.gz", ".nii"):
        import nibabel as nib

        affine = np.eye(4)
        affine[range(array.ndim), range(array.ndim)] = spacing
        img = nib.Nifti1Image(array, affine)
        img.header.set_xyzt_units("micron")
        img.header.set_qform(affine, code=1)  # qform too, so readers that ignore the sform see the spacing
        nib.save(img, str(path))
    else:
        import tifffile

        sy, sx = spacing[-2], spacing[-1]
        metadata: dict[str, Any] = {"unit": "um", "axes": "ZYX" if array.ndim == 3 else "YX"}
        if array.ndim == 3:
            metadata["spacing"] = float(spacing[0])
        tifffile.imwrite(path, array, imagej=True, resolution=(1.0 / sx, 1.0 / sy), metadata=metadata)


def _to_uint16(image: np.ndarray) -> np.ndarray:
    """Scale a non-negative float image to the uint16 range (per volume; intensities are normalised later)."""
    top = float(image.max())
    scaled = np.clip(image, 0.0, None) * (65535.0 / top if top > 0 else 1.0)
    return np.round(scaled).astype(np.uint16)


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    n_train: int = 6,
    n_val: int = 2,
    n_test: int = 2,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    ext: str = ".nii.gz",
    spatial_dims: int = 3,
    n_objects: int | Sequence[int] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic nuclei dataset in the Medical Segmentation Decathlon layout and return its datalist.

    Layout: ``imagesTr/``, ``labelsTr/`` (training + validation), ``imagesTs/``, ``labelsTs/`` (held-back test
    set, dense labels) and ``dataset.json`` with "training", "validation" (a subset of the Tr files kept aside,
    not in "training") and "test" lists of ``{"image": relpath, "label": relpath}``. The generation parameters are
    stored under the "synthetic" key; when an existing ``dataset.json`` has the same parameters and all its files
    exist, nothing is regenerated (idempotent demo).

    Args:
        out_dir: output folder (created if needed).
        n_train: number of training volumes.
        n_val: number of validation volumes (written to ``imagesTr``/``labelsTr`` but listed only in "validation").
        n_test: number of held-back test volumes (``imagesTs``/``labelsTs``).
        shape: array shape in storage order; ``None``: (48, 96, 96) in 3D, (192, 192) in 2D.
        spacing: voxel size per axis in storage order; ``None``: (2, 1, 1) in 3D, (1, 1) in 2D.
        seed: base seed; every volume gets an independent stream spawned from it.
        ext: ".nii.gz"/".nii" (float32 image, uint16 labels, affine diag(spacing)) or ".tif"/".tiff" (ImageJ
            stacks, image scaled to uint16, spacing in the resolution tags and the ImageJ "spacing" entry).
        spatial_dims: 2 or 3.
        n_objects: objects per image, as in :func:`generate_nuclei` (``None`` = automatic dense packing).
        overwrite: regenerate even if an identical dataset exists.

    Returns:
        The content of ``dataset.json`` (paths relative to ``out_dir``).
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
    n_train, n_val, n_test = int(n_train), int(n_val), int(n_test)
    shape = _as_tuple(DEFAULT_SHAPE[spatial_dims] if shape is None else shape, spatial_dims, "shape", int)
    spacing = _as_tuple(DEFAULT_SPACING[spatial_dims] if spacing is None else spacing, spatial_dims, "spacing")
    ext = _normalise_ext(str(ext))
    if n_objects is not None and not np.isscalar(n_objects):
        n_objects = [int(v) for v in n_objects]

    out = Path(out_dir)
    params = {
        "generator_version": GENERATOR_VERSION,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "shape": list(shape),
        "spacing": list(spacing),
        "seed": int(seed),
        "ext": ext,
        "spatial_dims": spatial_dims,
        "n_objects": n_objects,
    }
    json_path = out / "dataset.json"
    if json_path.is_file() and not overwrite:
        try:
            existing = json.loads(json_path.read_text())
        except (OSError, ValueError):
            existing = {}
        if existing.get("synthetic") == params:
            entries = existing.get("training", []) + existing.get("validation", []) + existing.get("test", [])
            if all((out / e[k]).is_file() for e in entries for k in ("image", "label")):
                return existing

    dirs = {d: out / d for d in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    # dataset.json is written last: remove the old one first so an interrupted run is never taken as complete
    json_path.unlink(missing_ok=True)
    # drop files of an earlier run with other parameters, so folder listings match dataset.json
    pattern = re.compile(r"^nuclei_\d{3,}\.(nii\.gz|nii|tif|tiff)$")
    for d in dirs.values():
        for f in d.iterdir():
            if f.is_file() and pattern.match(f.name):
                f.unlink()

    n_tr = n_train + n_val
    seeds = np.random.SeedSequence(int(seed)).spawn(n_tr + n_test)
    tr_entries, ts_entries, n_objects_total = [], [], 0
    for i, ss in enumerate(seeds):
        image, labels = generate_nuclei(shape=shape, n_objects=n_objects, spacing=spacing, seed=ss)
        n_objects_total += int(labels.max())
        split = "Tr" if i < n_tr else "Ts"
        name = f"nuclei_{i:03d}{ext}"
        _write_array(
            dirs[f"images{split}"] / name, image if ext.startswith(".nii") else _to_uint16(image), spacing, ext
        )
        _write_array(dirs[f"labels{split}"] / name, labels, spacing, ext)
        entry = {"image": f"images{split}/{name}", "label": f"labels{split}/{name}"}
        (tr_entries if split == "Tr" else ts_entries).append(entry)

    dataset = {
        "name": "SyntheticNuclei",
        "description": "Synthetic fluorescence nuclei with dense instance labels (spoco_bundle.synthetic)",
        "tensorImageSize": f"{spatial_dims}D",
        "modality": {"0": "fluorescence"},
        "labels": {"0": "background", "1": "nucleus (instance ids 1..n)"},
        "numTraining": n_tr,
        "numTest": n_test,
        "numObjects": n_objects_total,
        "training": tr_entries[:n_train],
        "validation": tr_entries[n_train:],
        "test": ts_entries,
        "synthetic": params,
    }
    json_path.write_text(json.dumps(dataset, indent=2))
    return dataset


@functools.wraps(write_synthetic_dataset)
def _main(*args: Any, **kwargs: Any) -> None:
    """CLI wrapper: write the dataset and print a one-line summary instead of the whole datalist."""
    ds = write_synthetic_dataset(*args, **kwargs)
    out_dir = kwargs.get("out_dir", args[0] if args else None)
    p = ds["synthetic"]
    print(
        f"synthetic nuclei ({p['spatial_dims']}D, shape {tuple(p['shape'])}, spacing {tuple(p['spacing'])}): "
        f"{len(ds['training'])} train / {len(ds['validation'])} val / {len(ds['test'])} test volumes, "
        f"{ds['numObjects']} objects, in {out_dir}/dataset.json"
    )


if __name__ == "__main__":
    import fire

    fire.Fire(_main)
