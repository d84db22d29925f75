"""The label convention of SPOCO and the reproducible choice of annotated objects.

Label files hold instance ids: 0 = *unlabeled* (background and every object nobody annotated; never treated as
background), 1..n = annotated objects (gaps allowed). Optionally one id, ``background_label``, marks voxels that an
annotator painted as background (strokes), or, with ``background_label`` 0, dense ground truth whose 0 is true
background.

After :func:`select_objects` (and so in the losses), labels are int64 with

- ``0`` (:data:`UNLABELED`): say nothing;
- ``1..K``: the kept objects of that image, consecutive;
- ``-1`` (:data:`ANNOTATED_BACKGROUND`): annotated background, only when a ``background_label`` is given.

Which objects are kept depends only on the seed, the image's file name stem and the ids (:func:`object_priority`),
never on call order: the same objects in every epoch, worker, process and method, and a smaller ratio keeps a subset
of what a larger one keeps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "UNLABELED",
    "ANNOTATED_BACKGROUND",
    "object_priority",
    "num_kept",
    "kept_ids",
    "select_objects",
    "count_objects",
]

UNLABELED = 0
ANNOTATED_BACKGROUND = -1

_M64 = np.uint64


def object_priority(ids: np.ndarray, seed: int, name: str = "") -> np.ndarray:
    """
    A pseudo-random uint64 key per object id that depends only on ``(seed, name, id)``: the objects with the smallest
    keys are kept. ``name`` is the image's file name without folder and suffix. The hash is splitmix64 over the id xor
    a SHA-256 salt (Python's ``hash`` is salted per process, so it would not be reproducible).
    """
    salt = int.from_bytes(hashlib.sha256(f"{int(seed)}|{name}".encode()).digest()[:8], "little")
    z = np.asarray(ids).astype(np.int64).astype(_M64) ^ _M64(salt)
    with np.errstate(over="ignore"):
        z = z + _M64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _M64(30))) * _M64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _M64(27))) * _M64(0x94D049BB133111EB)
    return z ^ (z >> _M64(31))


def num_kept(num_objects: int, instance_ratio: float) -> int:
    """Objects kept out of ``num_objects``: ``floor(ratio * n + 0.5)``, at least 1 when there are objects and the
    ratio is positive."""
    if num_objects == 0 or instance_ratio == 0.0:
        return 0
    return min(num_objects, max(1, int(np.floor(instance_ratio * num_objects + 0.5))))


def kept_ids(ids: Sequence[int] | np.ndarray, instance_ratio: float, seed: int = 0, name: str = "") -> np.ndarray:
    """The sorted object ids kept from ``ids`` (object ids only: no 0, no background) for image ``name``."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    order = np.argsort(object_priority(ids, seed, name), kind="stable")
    return np.sort(ids[order[: num_kept(len(ids), instance_ratio)]])


def _check_ids(label: Any, where: str) -> np.ndarray:
    arr = np.asarray(label)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{where}: labels must be integer ids, got non-integer float values.")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{where}: labels contain negative values (min {arr.min()}); expected dense ids >= 0.")
    return arr


def select_objects(
    label: Any,
    instance_ratio: float = 1.0,
    background_label: int | None = None,
    seed: int = 0,
    name: str = "",
    where: str | None = None,
) -> np.ndarray:
    """
    Keep a reproducible subset of the objects of an instance label map and number them ``1..K`` (in increasing order
    of their original ids); every other object becomes 0 (unlabeled), ``background_label`` voxels become -1.

    Args:
        label: integer ids >= 0 of any shape (whole-number floats are accepted).
        instance_ratio: fraction of objects to keep, in [0, 1]; 1 keeps every object (relabelled).
        background_label: id of annotated background, or None. With 0 (dense ground truth), 0 becomes -1 and the
            dropped objects become 0, the only unlabeled region.
        seed: selection seed.
        name: the image's file name stem (:func:`object_priority`).
        where: the file for error messages (default ``name``).

    Returns:
        int64 array of ``label``'s shape.

    Raises:
        ValueError: a ratio outside [0, 1], non-integer or negative ids (naming ``where``).
    """
    if not 0.0 <= float(instance_ratio) <= 1.0:
        raise ValueError(f"instance_ratio must be in [0, 1], got {instance_ratio}.")
    arr = _check_ids(label, where or name or "label")
    max_id = int(arr.max()) if arr.size else 0
    if max_id < max(2**20, 4 * arr.size):  # small ids: bincount + lookup table, O(N)
        present = np.flatnonzero(np.bincount(arr.ravel(), minlength=max_id + 1))
        inverse = None
    else:  # huge ids (e.g. uint32 hashes): sort-based
        present, inverse = np.unique(arr, return_inverse=True)
    is_object = present != 0
    if background_label is not None:
        is_object &= present != background_label
    kept = kept_ids(present[is_object], float(instance_ratio), seed, name)
    new_values = np.zeros(len(present), dtype=np.int64)
    new_values[np.searchsorted(present, kept)] = np.arange(1, len(kept) + 1)
    if background_label is not None:
        new_values[present == background_label] = ANNOTATED_BACKGROUND
    if inverse is None:
        lut = np.zeros(max_id + 1, dtype=np.int64)
        lut[present] = new_values
        return lut[arr]
    return new_values[inverse.reshape(arr.shape)]


def count_objects(label: Any, background_label: int | None = None) -> int:
    """Number of distinct nonzero ids in ``label``, not counting ``background_label``."""
    ids = np.unique(np.asarray(label))
    return int(sum(1 for i in ids.tolist() if int(i) != 0 and (background_label is None or int(i) != background_label)))
