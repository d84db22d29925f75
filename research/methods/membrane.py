"""
Classical baseline for boundary / membrane stains (2D and 3D): smoothing + seeded watershed on the boundary signal,
as the established pipelines for EM and membrane-stained tissue do before a network (a distance-transform
watershed on a thresholded boundary map).

Per image (intensities normalised to the 1-99.8 percentiles):

1. boundary signal ``b``: the image (``polarity`` bright: stained membranes, light cell outlines) or its negation
   (dark: EM membranes), with ``ridge`` less its Gaussian blur of :data:`BACKGROUND_SIGMA`; cell
   radius ``r`` from the distance to the brightest 20 % of ``b``; every length below is a multiple of ``r``;
2. smoothing with ``sigma = sigma_rel * r``; boundary = the ``wall_fraction`` brightest voxels of the result;
3. seeds: local maxima of the (slightly smoothed) distance transform of the non-boundary region within a box of
   half-width ``seed_rel * r``;
4. watershed of the smoothed boundary signal from the seeds over the whole image (cells tile it); with
   ``drop_boundary`` the boundary pixels are set to 0 afterwards (data whose labels stop at the membrane);
   objects smaller than ``0.15`` of a disc / ball of radius ``r`` removed.

Parameters (a 2 x 2 x 3 x 3 x 3 x 2 grid) are chosen on the training images with the sparse labels the learners get,
by the criterion of :mod:`research.methods.classical` (recall-type mean AP of the kept objects); at most
:data:`TUNE_IMAGES` training images (a fixed random subset) and the time budget.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from research.data import Result, Split, normalize_image, sparsify
from research.methods.classical import (
    MIN_SIZE_REL,
    THRESHOLDS,
    _peaks,
    _relabel,
    _relative_spacing,
    grid_search_result,
    kept_object_recall_map,
    tuning_images,
)
from research.settings import Budget, RunSettings

__all__ = ["GRID", "segment", "fit_predict"]

GRID: dict[str, tuple[Any, ...]] = {
    "polarity": ("bright", "dark"),
    "ridge": (False, True),
    "sigma_rel": (0.03, 0.08, 0.15),
    "wall_fraction": (0.1, 0.2, 0.3),
    "seed_rel": (0.3, 0.6, 1.0),
    "drop_boundary": (False, True),
}
TUNE_IMAGES = 8
# segment()'s defaults and the fallback of an unfinished search: the first polarity / ridge / drop_boundary value,
# the middle of the other ranges
DEFAULTS = {k: v[0] if k in ("polarity", "ridge", "drop_boundary") else v[len(v) // 2] for k, v in GRID.items()}
BACKGROUND_SIGMA = 8.0  # px (finest axis): slower intensity changes than this are not boundaries


class _Prepared:
    """Per-image quantities independent of the parameters but the polarity and ridge choice."""

    def __init__(self, image: np.ndarray, spacing: tuple[float, ...] | None, polarity: str, ridge: bool) -> None:
        if polarity not in ("bright", "dark"):
            raise ValueError(f"polarity must be 'bright' or 'dark', got {polarity!r}.")
        norm = normalize_image(image)
        signal = norm if polarity == "bright" else 1.0 - norm
        self.sp = _relative_spacing(image, spacing)
        # ridge: uneven illumination and bright cell bodies would otherwise decide the threshold (tissue); thick
        # EM membranes are better kept whole
        self.boundary = signal - ndi.gaussian_filter(signal, sigma=BACKGROUND_SIGMA / self.sp) if ridge else signal
        self.radius = self._radius()
        self._cache: dict[tuple[float, float], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _radius(self) -> float:
        """Cell radius: a high percentile of the distance-transform maxima between the brightest 20 % of the
        lightly smoothed boundary signal (Otsu's interior components fail here: in tissue they are all one)."""
        sm = ndi.gaussian_filter(self.boundary, sigma=1.0 / self.sp)
        wall = sm > np.quantile(sm, 0.8)
        dt = ndi.distance_transform_edt(~wall, sampling=self.sp)
        peak = (dt == ndi.maximum_filter(dt, size=7)) & (dt >= 2)
        return float(np.percentile(dt[peak], 90)) if peak.any() else 4.0

    def _maps(self, sigma_rel: float, wall_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = (sigma_rel, wall_fraction)
        if key not in self._cache:
            sm = ndi.gaussian_filter(self.boundary, sigma=max(sigma_rel * self.radius, 0.5) / self.sp)
            wall = sm > np.quantile(sm, 1.0 - wall_fraction)
            dt = ndi.distance_transform_edt(~wall, sampling=self.sp)
            dt = ndi.gaussian_filter(dt, sigma=0.5 / self.sp)
            self._cache = {key: (sm, wall, dt)}
        return self._cache[key]

    def segment(self, sigma_rel: float, wall_fraction: float, seed_rel: float, drop_boundary: bool) -> np.ndarray:
        from skimage.segmentation import watershed

        sm, wall, dt = self._maps(sigma_rel, wall_fraction)
        markers = _peaks(dt, ~wall, seed_rel * self.radius, self.sp)
        if markers.max() == 0:
            return np.zeros(sm.shape, dtype=np.int32)
        seg = watershed(sm, markers)
        if drop_boundary:
            seg[wall] = 0
        ball = np.pi * self.radius**2 if sm.ndim == 2 else 4.0 / 3.0 * np.pi * self.radius**3
        sizes = np.bincount(seg.ravel())
        small = sizes < MIN_SIZE_REL * ball / float(np.prod(self.sp))
        small[0] = False
        seg[small[seg]] = 0
        return _relabel(seg)


def segment(image: np.ndarray, spacing: tuple[float, ...] | None = None, **params: Any) -> np.ndarray:
    """Segment one image with the given parameters (defaults: :data:`DEFAULTS`); int32 labels 1..n,
    0 = background / boundary."""
    p = dict(DEFAULTS)
    unknown = set(params) - set(p)
    if unknown:
        raise ValueError(f"Unknown membrane-baseline parameters {sorted(unknown)}; valid: {sorted(p)}.")
    p.update(params)
    prep = _Prepared(image, spacing, p.pop("polarity"), p.pop("ridge"))
    return prep.segment(**p)


def fit_predict(split: Split, ratio: float, run: RunSettings) -> Result:
    """Choose the parameters on the training images (sparse labels, selection seed ``run.seed``) within
    ``run.budget_s`` seconds of grid search on ``run.clock`` (the best so far when it runs out), then segment the
    test images (CPU only)."""
    seed = run.seed
    budget = Budget(run.budget_s, run.clock)
    train = tuning_images(split, seed, TUNE_IMAGES)
    sparse = [sparsify(it, ratio, seed) for it in train]
    kept = [(it, sp) for it, sp in zip(train, sparse) if sp.max() > 0]
    best: dict[str, Any] | None = None
    best_score = -1.0
    tried: list[dict[str, Any]] = []
    out_of_time = False
    inner = list(itertools.product(GRID["seed_rel"], GRID["drop_boundary"]))
    for polarity, ridge in itertools.product(GRID["polarity"], GRID["ridge"]):
        preps = [(_Prepared(it.image, it.spacing, polarity, ridge), sp) for it, sp in kept]
        for sigma_rel, wall_fraction in itertools.product(GRID["sigma_rel"], GRID["wall_fraction"]):
            hits = {k: np.zeros(len(THRESHOLDS), dtype=np.int64) for k in inner}
            n_kept = 0
            for prep, sp in preps:
                for seed_rel, drop in inner:
                    hits[(seed_rel, drop)] += kept_object_recall_map(
                        sp, prep.segment(sigma_rel, wall_fraction, seed_rel, drop)
                    )[0]
                n_kept += int(sp.max())
                if budget.exhausted():
                    out_of_time = True
                    break
            if out_of_time:
                break
            for (seed_rel, drop), h in hits.items():
                value = float((h / max(n_kept, 1)).mean())
                params = {
                    "polarity": polarity,
                    "ridge": ridge,
                    "sigma_rel": sigma_rel,
                    "wall_fraction": wall_fraction,
                    "seed_rel": seed_rel,
                    "drop_boundary": drop,
                }
                tried.append({**params, "kept_recall_map": value})
                if value > best_score:
                    best_score, best = value, params
        if out_of_time:
            break
    if best is None:
        best = dict(DEFAULTS)
    return grid_search_result(split, segment, best, best_score, tried, len(kept), GRID, out_of_time, budget)
