"""
Classical baseline without learning: Gaussian smoothing + Otsu threshold + seeded watershed (2D and 3D).

Per image (intensities normalised to the 1-99.8 percentiles; bright objects on a dark background):

1. object radius ``r``: median (weighted by component size) over the connected components of a lightly smoothed
   (sigma 1 px) Otsu mask of the largest distance to the component's border. Every other length below is a
   multiple of ``r``, so the same parameters work at other magnifications (held-out images come at other scales);
2. smoothing with ``sigma = sigma_rel * r``, foreground = smoothed ``> thr_factor * Otsu(smoothed)``, holes filled;
3. seeds: local maxima of the (slightly smoothed) Euclidean distance transform of the foreground within a box of
   half-width ``seed_rel * r`` (in physical units per axis: 3D spacing is anisotropic);
4. watershed of the negated distance transform from the seeds inside the foreground; objects smaller than
   ``0.15 * (area or volume of a sphere of radius r)`` are removed.

Lengths are in units of the finest voxel axis, and the distance transform, smoothing and footprint use the voxel
spacing (``Item.spacing``), so the anisotropic GoNuclear volumes (z spacing ~2.2x the in-plane one) are handled.

Parameter choice (``sigma_rel``, ``thr_factor``, ``seed_rel``; a 3 x 4 x 3 grid) uses the training images with
the *same sparse labels the learners get*: only kept objects count. The criterion is the mean over IoU thresholds
0.50, 0.55, ..., 0.95 of the fraction of kept objects whose best-overlapping predicted object reaches the
threshold (a recall-type mean AP on the kept objects: unlabeled objects and background are unknown, so false
positives cannot be counted; merges and splits still lower the IoU of kept objects). For DSB2018 a fixed random
subset of 48 training images is used (time); the 3D split uses its one training volume.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from research.data import Item, Result, Split, normalize_image, sparsify
from research.settings import Budget, RunSettings, Stopwatch

__all__ = ["GRID", "segment", "estimate_radius", "kept_object_recall_map", "fit_predict", "grid_search_result"]

GRID: dict[str, tuple[float, ...]] = {
    "sigma_rel": (0.05, 0.15, 0.3),
    "thr_factor": (0.7, 0.85, 1.0, 1.2),
    "seed_rel": (0.4, 0.7, 1.0),
}
MIN_SIZE_REL = 0.15
TUNE_IMAGES = 48
THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)


def _relative_spacing(image: np.ndarray, spacing: tuple[float, ...] | None) -> np.ndarray:
    """Spacing in units of the finest axis (ones when unknown)."""
    if spacing is None or len(spacing) != image.ndim:
        return np.ones(image.ndim)
    sp = np.asarray(spacing, dtype=np.float64)
    return sp / sp.min()


def _otsu(image: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(image)) if np.ptp(image) > 0 else float(image.max())


def estimate_radius(image: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """Typical object radius in units of the finest voxel axis (see the module docstring); 4.0 if none is found."""
    sp = _relative_spacing(image, spacing)
    img = ndi.gaussian_filter(normalize_image(image), sigma=1.0 / sp)
    fg = ndi.binary_fill_holes(img > _otsu(img))
    comps, n = ndi.label(fg)
    if n == 0:
        return 4.0
    dt = ndi.distance_transform_edt(fg, sampling=sp)
    index = np.arange(1, n + 1)
    radii = np.asarray(ndi.maximum(dt, comps, index=index))
    sizes = np.bincount(comps.ravel(), minlength=n + 1)[1:].astype(np.float64)
    # size-weighted median: noisy images (the 3D volumes) give hundreds of specks beside the real objects
    order = np.argsort(radii)
    cum = np.cumsum(sizes[order])
    return float(max(radii[order][np.searchsorted(cum, 0.5 * cum[-1])], 1.0))


def _peaks(dt: np.ndarray, fg: np.ndarray, distance: float, sp: np.ndarray) -> np.ndarray:
    """Markers at the local maxima of ``dt`` within a box of half-width ``distance`` (physical units) per axis.

    A separable box maximum filter instead of skimage's ``peak_local_max`` with an ellipsoid footprint: the latter
    takes seconds per call on a 100^3 volume. Touching maximum voxels (plateaus) form one marker.
    """
    size = [2 * max(1, int(round(distance / s))) + 1 for s in sp]
    peak = (dt == ndi.maximum_filter(dt, size=size, mode="nearest")) & fg & (dt > 0)
    markers, _ = ndi.label(peak)
    return markers


class _Prepared:
    """Per-image quantities that do not depend on the parameters (normalised image, radius, relative spacing)."""

    def __init__(self, image: np.ndarray, spacing: tuple[float, ...] | None) -> None:
        self.image = normalize_image(image)
        self.sp = _relative_spacing(image, spacing)
        self.radius = estimate_radius(image, spacing)
        self._cache: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}

    def foreground(self, sigma_rel: float, thr_factor: float) -> tuple[np.ndarray, np.ndarray]:
        """(foreground mask, smoothed distance transform), cached per (sigma_rel, thr_factor)."""
        key = (sigma_rel, thr_factor)
        if key not in self._cache:
            sm = ndi.gaussian_filter(self.image, sigma=sigma_rel * self.radius / self.sp)
            fg = ndi.binary_fill_holes(sm > thr_factor * _otsu(sm))
            dt = ndi.distance_transform_edt(fg, sampling=self.sp)
            dt = ndi.gaussian_filter(dt, sigma=0.5 / self.sp)  # break plateaus / ridge noise into single maxima
            self._cache = {key: (fg, dt)}  # one entry: the grid loops over seed_rel innermost
        return self._cache[key]

    def segment(self, sigma_rel: float, thr_factor: float, seed_rel: float) -> np.ndarray:
        from skimage.segmentation import watershed

        fg, dt = self.foreground(sigma_rel, thr_factor)
        if not fg.any():
            return np.zeros(fg.shape, dtype=np.int32)
        seg = watershed(-dt, _peaks(dt, fg, seed_rel * self.radius, self.sp), mask=fg)
        # components without a peak (tiny or flat ones) keep their own id so that they are not lost
        orphan = fg & (seg == 0)
        if orphan.any():
            extra, n_extra = ndi.label(orphan)
            seg = np.where(orphan, extra + seg.max(), seg)
        sphere = np.pi * self.radius**2 if fg.ndim == 2 else 4.0 / 3.0 * np.pi * self.radius**3
        min_size = MIN_SIZE_REL * sphere / float(np.prod(self.sp))
        sizes = np.bincount(seg.ravel())
        small = sizes < min_size
        small[0] = False
        seg[small[seg]] = 0
        return _relabel(seg)


def _relabel(seg: np.ndarray) -> np.ndarray:
    ids = np.unique(seg)
    ids = ids[ids != 0]
    lut = np.zeros(int(seg.max()) + 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[seg]


def segment(image: np.ndarray, spacing: tuple[float, ...] | None = None, **params: float) -> np.ndarray:
    """
    Segment one 2D or 3D image with the given parameters (defaults: the middle of :data:`GRID`).

    Returns:
        int32 instance labels 1..n, 0 = background.
    """
    p = {k: v[len(v) // 2] for k, v in GRID.items()}
    unknown = set(params) - set(p)
    if unknown:
        raise ValueError(f"Unknown classical parameters {sorted(unknown)}; valid: {sorted(p)}.")
    p.update(params)
    return _Prepared(image, spacing).segment(p["sigma_rel"], p["thr_factor"], p["seed_rel"])


def kept_object_recall_map(sparse: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, int]:
    """
    Per IoU threshold (0.50..0.95), the number of kept objects (ids > 0 of ``sparse``) whose best-overlapping
    object of ``seg`` reaches it; and the number of kept objects.
    """
    s = np.asarray(sparse).ravel().astype(np.int64)
    p = np.asarray(seg).ravel().astype(np.int64)
    n_kept = int(s.max()) if s.size else 0
    if n_kept == 0:
        return np.zeros(len(THRESHOLDS), dtype=np.int64), 0
    size_s = np.bincount(s, minlength=n_kept + 1)
    size_p = np.bincount(p)
    both = (s > 0) & (p > 0)
    pairs, inter = np.unique(s[both] * (len(size_p)) + p[both], return_counts=True)
    ks, ps = pairs // len(size_p), pairs % len(size_p)
    iou = inter / (size_s[ks] + size_p[ps] - inter).astype(np.float64)
    best = np.zeros(n_kept + 1)
    np.maximum.at(best, ks, iou)
    present = size_s[1:] > 0
    best = best[1:][present]
    return np.array([(best >= t).sum() for t in THRESHOLDS], dtype=np.int64), int(present.sum())


def tuning_images(split: Split, seed: int, count: int = TUNE_IMAGES) -> list[Item]:
    """The training images the parameters are chosen on: all, or a fixed random ``count`` of them."""
    train: list[Item] = list(split.train)
    if len(train) > count:
        rng = np.random.default_rng(seed)
        train = [train[i] for i in sorted(rng.choice(len(train), count, replace=False))]
    return train


def fit_predict(split: Split, ratio: float, run: RunSettings) -> Result:
    """
    Choose the parameters on the training images (sparse labels, see the module docstring) within ``run.budget_s``
    seconds of grid search, then segment the test images.

    Args:
        split: benchmark split.
        ratio: fraction of objects kept per training image.
        run: ``seed`` (selection seed of the kept objects and of the tuning subset), ``budget_s`` on ``clock`` (time
            limit of the grid search; the best parameters so far are used when it runs out); CPU only.
    """
    seed = run.seed
    budget = Budget(run.budget_s, run.clock)
    train = tuning_images(split, seed)
    tune = [(_Prepared(it.image, it.spacing), sparsify(it, ratio, seed)) for it in train]
    tune = [(prep, sp) for prep, sp in tune if sp.max() > 0]
    best_params: dict[str, float] | None = None
    best_score = -1.0
    tried: list[dict[str, Any]] = []
    out_of_time = False
    for sigma_rel, thr_factor in itertools.product(GRID["sigma_rel"], GRID["thr_factor"]):
        hits = {s: np.zeros(len(THRESHOLDS), dtype=np.int64) for s in GRID["seed_rel"]}
        n_kept = 0
        for prep, sparse in tune:  # image-outer so that each image's foreground is computed once per pair
            for seed_rel in GRID["seed_rel"]:
                h, n = kept_object_recall_map(sparse, prep.segment(sigma_rel, thr_factor, seed_rel))
                hits[seed_rel] += h
            n_kept += n
            if budget.exhausted():
                out_of_time = True
                break
        if out_of_time:
            break
        for seed_rel in GRID["seed_rel"]:
            value = float((hits[seed_rel] / max(n_kept, 1)).mean())
            params = {"sigma_rel": sigma_rel, "thr_factor": thr_factor, "seed_rel": seed_rel}
            tried.append({**params, "kept_recall_map": value})
            if value > best_score:
                best_score, best_params = value, params
    if best_params is None:  # not even one full pass within the budget: the grid's middle
        best_params = {k: v[len(v) // 2] for k, v in GRID.items()}
    result = grid_search_result(split, segment, best_params, best_score, tried, len(tune), GRID, out_of_time, budget)
    result.info["test_radius"] = [float(estimate_radius(it.image, it.spacing)) for it in split.test]
    return result


def grid_search_result(
    split: Split,
    segment_fn: Any,
    params: dict[str, Any],
    kept_recall_map: float,
    tried: list[dict[str, Any]],
    tuning_images: int,
    grid: dict[str, tuple[Any, ...]],
    out_of_time: bool,
    budget: Budget,
) -> Result:
    """The :class:`Result` of a grid-searched baseline: its test images segmented with ``params`` by
    ``segment_fn(image, spacing, **params)``, training time = the search so far (``budget``'s stopwatch)."""
    train_seconds, train_cpu = budget.watch.wall, budget.watch.cpu
    predict = Stopwatch()
    predictions = [segment_fn(it.image, it.spacing, **params) for it in split.test]
    return Result(
        predictions=predictions,
        train_seconds=train_seconds,
        iterations=len(tried),
        info={
            "params": params,
            "kept_recall_map": kept_recall_map,
            "tuning_images": tuning_images,
            "grid": {k: list(v) for k, v in grid.items()},
            "grid_complete": not out_of_time,
            "budget_clock": budget.clock,
            "train_cpu_seconds": train_cpu,
            "predict_seconds": predict.wall,
            "tried": tried,
        },
    )
