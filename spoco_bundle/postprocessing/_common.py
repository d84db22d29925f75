"""Checks and helpers shared by the post-processing steps."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.data import MetaTensor
from monai.utils import convert_to_numpy

from spoco_bundle.clustering import CLUSTERING_METHODS

__all__ = ["BACKGROUND_CHOICES", "embedding_channels", "check_network_output"]

# the ``background`` id of configs/inference.json: where the foreground comes from when no mask file is given
BACKGROUND_CHOICES = ("head", "largest", "none")

# methods whose clustering itself depends on the minimum size (not only a filter of their result)
_SIZE_AWARE_METHODS = ("hdbscan", "consistency")


def _check_background(background: str) -> str:
    if background not in BACKGROUND_CHOICES:
        raise ValueError(f"background must be 'largest', 'head' or 'none', got {background!r}.")
    return background


def _check_method(method: str) -> str:
    if method not in CLUSTERING_METHODS:
        raise ValueError(f"Unknown clustering method {method!r}; valid methods: {sorted(CLUSTERING_METHODS)}.")
    return method


def embedding_channels(embedding_dim: int, method: str) -> int:
    """Channels of the network output before the foreground logit: ``E``, or ``2 E`` for ``consistency`` (student and
    teacher embeddings, see :class:`~spoco_bundle.inferers.StudentTeacherNet`)."""
    if int(embedding_dim) < 1:
        raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim!r}.")
    return 2 * int(embedding_dim) if method == "consistency" else int(embedding_dim)


def check_network_output(pred: Any, embedding_dim: int, method: str, name: str) -> tuple[int, ...]:
    """Check that ``pred`` is a network output ``(C, *S)`` for ``method``: C = the embedding channels (+1 with the
    foreground head), 2 or 3 spatial axes. Returns its shape.

    Raises:
        ValueError: naming ``name``, the expected channels and the shape got.
    """
    n_emb = embedding_channels(embedding_dim, method)
    shape = tuple(pred.shape)
    if len(shape) not in (3, 4) or shape[0] not in (n_emb, n_emb + 1):
        raise ValueError(
            f"{name} expects ({n_emb} or {n_emb + 1}, *spatial) for method {method!r} "
            f"and embedding_dim {embedding_dim}, got shape {shape}."
        )
    return shape


def _given_mask(mask: Any, spatial: tuple[int, ...]) -> np.ndarray:
    """A given foreground mask ``S`` or ``(1, *S)`` as a bool array ``S`` (nonzero = foreground)."""
    if isinstance(mask, (str, os.PathLike)):
        raise TypeError(
            f"the foreground mask is still a file name ({os.fspath(mask)}): load it first "
            "(spoco_bundle.transforms.LoadForegroundMaskd in the preprocessing)."
        )
    mask = np.asarray(convert_to_numpy(mask))
    if mask.ndim == len(spatial) + 1 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.shape != tuple(spatial):
        raise ValueError(
            f"the foreground mask has shape {mask.shape}, the network output the spatial shape {tuple(spatial)}; "
            "they must match."
        )
    return mask != 0


def _check_labels(labels: Any, name: str) -> np.ndarray:
    """Instance labels ``(1, *S)`` (S of 2 or 3 axes), non-negative integers, as a numpy array."""
    arr = np.asarray(convert_to_numpy(labels))
    if arr.ndim not in (3, 4) or arr.shape[0] != 1:
        raise ValueError(f"{name} expects instance labels (1, *spatial) with 2 or 3 spatial axes, got {arr.shape}.")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise ValueError(f"{name} expects integer instance labels, got {arr.dtype}.")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} expects instance labels >= 0 (0 = background), got min {arr.min()}.")
    return arr.astype(np.int32) if arr.dtype == bool else arr


def _mask_from(data: Mapping[Hashable, Any], mask_key: str | None) -> Any:
    mask = data.get(mask_key) if mask_key is not None else None
    if isinstance(mask, (str, os.PathLike)):
        raise TypeError(
            f"'{mask_key}' is still a file name ({os.fspath(mask)}): load it first "
            "(spoco_bundle.transforms.LoadForegroundMaskd in the preprocessing)."
        )
    return mask


def _grid_spacing(image: Any, labels: Any) -> list[float] | None:
    """The voxel size of ``labels`` ``(1, *S)``: the image's (a MetaTensor ``(C, *S_image)``), scaled by
    ``S_image / S`` when the labels lie on a resampled grid; None without a MetaTensor image."""
    if not isinstance(image, MetaTensor):
        return None
    spacing = [float(v) for v in image.pixdim]
    spatial, own = tuple(image.shape[1:]), tuple(labels.shape[1:])
    if len(spatial) != len(own) or spatial == own or len(spacing) < len(own):
        return spacing
    return [v * n / m for v, n, m in zip(spacing, spatial, own)]


def _number(value: Any) -> float:
    """``value`` as a float; NaN for what is not a number (a command-line text, a bool, None)."""
    try:
        return float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _non_negative(value: Any, name: str, zero: str) -> float:
    """``value`` as a float >= 0, else a ValueError naming the option (a command-line text, a bool, NaN)."""
    number = _number(value)
    if not number >= 0:
        raise ValueError(f"{name} must be a number >= 0 ({zero}), got {value!r}.")
    return number
