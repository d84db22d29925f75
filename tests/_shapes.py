"""Instance-label shapes the measurement tests draw (test_measure.py, test_training_set.py)."""

from __future__ import annotations

import numpy as np


def discs(shape: tuple[int, ...], centres: list[tuple[int, ...]], radius: float) -> np.ndarray:
    """Instance labels: one disc / ball of ``radius`` per centre, ids 1..n."""
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    lab = np.zeros(shape, np.int32)
    for k, c in enumerate(centres, 1):
        lab[sum((g - ci) ** 2 for g, ci in zip(grid, c)) <= radius**2] = k
    return lab


def grid_centres(shape: tuple[int, int], step: int, offset: int) -> list[tuple[int, int]]:
    """Centres on a square grid of ``step``, ``offset`` from the borders."""
    return [
        (y, x) for y in range(offset, shape[0] - offset + 1, step) for x in range(offset, shape[1] - offset + 1, step)
    ]
