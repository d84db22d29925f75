"""The foreground to cluster in: a given mask, or the foreground head's probability above a threshold."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type

from spoco_bundle.postprocessing._common import (
    _check_background,
    _check_method,
    _given_mask,
    _mask_from,
    check_network_output,
    embedding_channels,
)

__all__ = ["check_foreground_threshold", "ForegroundMask", "ForegroundMaskd"]


def check_foreground_threshold(threshold: Any) -> float:
    """The head's probability threshold as a float in (0, 1); else a ValueError naming the option."""
    try:
        t = float("nan") if isinstance(threshold, (str, bool)) else float(threshold)
    except (TypeError, ValueError):
        t = float("nan")
    if not 0.0 < t < 1.0:
        raise ValueError(f"foreground_threshold must be a probability in (0, 1), got {threshold!r}.")
    return t


class ForegroundMask(Transform):
    """
    The foreground to cluster in: a given mask, else the foreground head's probability above a threshold
    (``background="head"``), else none (``"largest"`` / ``"none"``: every voxel is clustered).

    Args:
        background: ``"head"``: voxels whose foreground probability (sigmoid of the last channel) is above
            ``threshold`` (models trained with ``background_label``); ``"largest"`` or ``"none"``: no mask (the
            clustering then decides, see :class:`ClusterInstances`). A mask given to the call (a foreground mask
            file, :class:`~spoco_bundle.transforms.LoadForegroundMaskd`) replaces all of them.
        threshold: probability threshold of the head in (0, 1).
        embedding_dim: E, the embedding channels of the network.
        method: the clustering method the output is for; ``"consistency"`` outputs hold ``2 E`` embedding channels
            (student, teacher) before the head.

    Input: the network output ``(C, *S)``, C = the embedding channels (+1 with the head); S of 2 or 3 axes.

    Output: a bool mask ``(1, *S)`` of the input's kind (tensor / MetaTensor / numpy, same device), or None (no
    mask).

    Raises:
        ValueError: a bad option; an input of the wrong shape; ``"head"`` without a head channel; a given mask
            whose spatial shape differs from the output's.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self,
        background: str = "head",
        threshold: float | str = 0.5,
        embedding_dim: int = 16,
        method: str = "fast",
    ) -> None:
        self.background = _check_background(background)
        self.threshold = check_foreground_threshold(threshold)
        self.method = _check_method(method)
        self.n_emb = embedding_channels(embedding_dim, method)
        self.embedding_dim = int(embedding_dim)

    def __call__(self, pred: NdarrayOrTensor, mask: Any = None) -> NdarrayOrTensor | None:
        """
        Args:
            pred: network output ``(C, *S)``.
            mask: a given foreground mask ``S`` or ``(1, *S)`` (nonzero = foreground), used as it is (the head is
                then not needed); None: ``background`` decides.
        """
        shape = check_network_output(pred, self.embedding_dim, self.method, "ForegroundMask")
        if mask is not None:
            fg = _given_mask(mask, shape[1:])
        elif self.background == "head":
            logit = self._head_logit(pred, shape, "background='head'")
            fg = logit > np.log(self.threshold / (1.0 - self.threshold))  # sigmoid(x) > t  <=>  x > logit(t)
        else:
            return None
        return convert_to_dst_type(fg[None], pred, dtype=torch.bool)[0]

    def _head_logit(self, pred: NdarrayOrTensor, shape: tuple[int, ...], what: str) -> np.ndarray:
        """The foreground logit ``S`` (float32 numpy) of an output of (checked) ``shape``; ``what`` needs it."""
        if shape[0] != self.n_emb + 1:
            raise ValueError(f"{what} needs a network with a foreground head (one extra channel).")
        return np.asarray(convert_data_type(pred[-1], np.ndarray, dtype=np.float32)[0])


class ForegroundMaskd(MapTransform):
    """
    Dictionary version of :class:`ForegroundMask`: puts the foreground of the network output ``keys`` under
    ``mask_key``. A mask already there (a loaded mask file) is kept (checked against the output's shape); without
    one, ``background="head"`` writes the head's mask there and ``"largest"`` / ``"none"`` leave the key absent.

    Args:
        keys: the network output (one key).
        mask_key: where a given mask is and the foreground goes (``"foreground_mask"``, as
            :class:`~spoco_bundle.transforms.LoadForegroundMaskd` and :class:`ClusterInstancesd`).
        allow_missing_keys: don't raise for a missing output.
        kwargs: arguments of :class:`ForegroundMask` (``background``, ``threshold``, ``embedding_dim``,
            ``method``).

    Raises:
        ValueError: for more than one key (one mask per item).
        TypeError: when ``mask_key`` still holds a file name (not loaded).
    """

    backend = ForegroundMask.backend

    def __init__(
        self,
        keys: KeysCollection = "pred",
        mask_key: str = "foreground_mask",
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"ForegroundMaskd makes one mask ('{mask_key}') from one output; got keys {self.keys}.")
        self.mask_key = mask_key
        self.foreground = ForegroundMask(**kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            given = _mask_from(d, self.mask_key)
            mask = self.foreground(d[key], given)
            if mask is not None:
                d[self.mask_key] = mask
        return d
