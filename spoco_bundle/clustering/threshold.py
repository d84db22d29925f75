"""The probability threshold of the foreground head, per image (a fixed probability or Otsu's)."""

from __future__ import annotations

import numpy as np


def check_foreground_threshold(rule: float | str) -> float | str:
    """``rule`` of :func:`head_threshold` checked: a probability in (0, 1) as a float, or ``"otsu"``."""
    if isinstance(rule, str) and rule == "otsu":
        return rule
    t = float("nan") if isinstance(rule, str) else float(rule)
    if not 0.0 < t < 1.0:
        raise ValueError(f"foreground threshold must be a probability in (0, 1) or 'otsu', got {rule!r}.")
    return t


def head_threshold(logits: np.ndarray, rule: float | str = 0.5, max_samples: int = 1_000_000) -> float:
    """
    The probability threshold of the foreground head for one image.

    Args:
        logits: the (calibrated) foreground logits of the image, any shape.
        rule: a probability in (0, 1), returned as it is; or ``"otsu"``: Otsu's threshold of the image's head
            probabilities, which separates the two modes of the map without relying on the calibration (the label
            frequency ``c`` of positive-unlabeled training, biased when the head memorises the few annotated
            objects). Large images are subsampled on a regular grid (``max_samples`` values). A map with a single
            value gives 0.5.
    """
    rule = check_foreground_threshold(rule)
    if rule != "otsu":
        return float(rule)
    from skimage.filters import threshold_otsu

    x = np.asarray(logits, dtype=np.float32).ravel()
    x = x[:: max(1, x.size // max_samples)]
    p = 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))
    if p.size == 0 or float(p.max() - p.min()) < 1e-6:
        return 0.5
    return float(threshold_otsu(p))
