"""The post-processing chain in one call on a network output, for the lab's analyses: the product's steps
(:mod:`spoco_bundle.postprocessing`, in ``configs/inference.json``'s order) on one array, without what only whole-file
inference needs (a mask file, the collapse warning, the resize back onto the image's grid). Settings are arguments,
so that a sweep (thresholds, clusterings) builds one per setting; the product's own chain is
``spoco_bundle.bundle.inference_postprocessing``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from spoco_bundle.postprocessing import ClusterInstances, ForegroundMask, RemoveSmallInstances, SplitByShape

__all__ = ["ClusterEmbeddings"]


class ClusterEmbeddings:
    """
    Network output ``(C, *S)`` -> instance labels ``(1, *S)`` (int32): :class:`ForegroundMask` ->
    :class:`ClusterInstances` -> :class:`SplitByShape` -> :class:`RemoveSmallInstances`.

    Args:
        method, embedding_dim, background, min_size, delta_v, delta_d: of the clustering (``ClusterInstances``).
        foreground_threshold: the head's probability threshold (``ForegroundMask``).
        shape_split: ``SplitByShape``'s ``h``; 0: off.
        kwargs: further arguments of the clustering function.
    """

    def __init__(
        self,
        method: str = "fast",
        embedding_dim: int = 16,
        background: str = "largest",
        min_size: int = 16,
        delta_v: float = 0.5,
        delta_d: float = 2.0,
        foreground_threshold: float = 0.5,
        shape_split: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.foreground = ForegroundMask(background, foreground_threshold, embedding_dim, method)
        self.cluster = ClusterInstances(method, embedding_dim, background, delta_v, delta_d, min_size, **kwargs)
        self.split = SplitByShape(shape_split, min_size=min_size)
        self.remove_small = RemoveSmallInstances(min_size)

    def __call__(self, pred: Any, spacing: Sequence[float] | None = None, fg_mask: Any = None) -> Any:
        """``pred`` ``(C, *S)``; ``spacing`` for the shape split; ``fg_mask`` a given foreground in place of the
        head's."""
        labels = self.cluster(pred, self.foreground(pred, fg_mask))
        return self.remove_small(self.split(labels, spacing))
