"""What runs on one block of a blockwise segmentation (the ``segment_block`` of
:func:`~spoco_bundle.blockwise.segment.segment_blockwise`): the network and the post-processing chain of
configs/inference.json, or the chain alone on embeddings computed elsewhere. Both pickle, for dask.distributed."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from spoco_bundle.postprocessing import ObjectScores, ResizeToMatch

__all__ = ["ClusterBlock", "NetworkBlock"]


def _labels(data: Mapping, key: str) -> np.ndarray:
    labels = data[key]
    labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return labels[0]  # (1, *S) -> S


class ClusterBlock:
    """
    The post-processing chain (foreground, clustering, shape split, size filter: ``postprocessing`` of
    configs/inference.json, :mod:`spoco_bundle.postprocessing`) on a block of network output ``(C, *S)``.

    Args:
        postprocessing: a dictionary transform from ``{"pred": (C, *S)}`` to instance labels ``(1, *S)`` under
            ``"pred"``.
        spacing: voxel size per spatial axis of the block, for the shape split (None: isotropic).
        scores: score the block's objects too (``spoco suggest``): the per-voxel maps of
            :meth:`~spoco_bundle.postprocessing.ObjectScores.maps`, which the stitching sums per object.

    Returns (call): int32 labels ``S``; with ``shape`` (the block's own, when ``pred`` lies on the resampled grid of
    :class:`~spoco_bundle.inferers.ScaledInferer` ``output_grid="network"``): clustered on ``pred``'s grid (voxel
    size scaled alike), then resized onto ``shape`` (:class:`~spoco_bundle.postprocessing.ResizeToMatch`). With
    ``scores``: ``(labels, maps)``, the maps on the labels' grid.
    """

    def __init__(
        self,
        postprocessing: Callable[[dict], Mapping],
        spacing: Sequence[float] | None = None,
        scores: ObjectScores | None = None,
    ) -> None:
        self.postprocessing = postprocessing
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.scores = scores

    def _image(self, spatial: tuple[int, ...]) -> Any:
        """A MetaTensor of the block's ``spatial`` size carrying the voxel size for
        :class:`~spoco_bundle.postprocessing.SplitByShaped`, which scales it onto a resampled ``pred``'s grid (one
        zero, expanded: no memory)."""
        affine = np.eye(4)
        if self.spacing is not None:
            affine[range(len(self.spacing)), range(len(self.spacing))] = self.spacing
        return MetaTensor(torch.zeros((1,) * (len(spatial) + 1)).expand(1, *spatial), affine=torch.as_tensor(affine))

    def __call__(
        self, pred: np.ndarray, shape: Sequence[int] | None = None
    ) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
        pred = np.asarray(pred, dtype=np.float32)
        own = pred.shape[1:] if shape is None else tuple(int(n) for n in shape)
        data = self.postprocessing({"pred": pred, "image": self._image(own)})
        labels = np.asarray(_labels(data, "pred"), dtype=np.int32)
        labels = ResizeToMatch()(labels[None], own)[0]
        if self.scores is None:
            return labels
        return labels, self.scores.maps(pred, labels[None])  # on the block's grid, as the whole image's


# one block in the network at a time per process: two would hold two sliding-window batches of activations (the
# memory budget counts one) and share the same cores; the other blocks' threads read and cluster meanwhile
_NETWORK_LOCK = threading.Lock()


class NetworkBlock(ClusterBlock):
    """
    The network and post-processing of configs/inference.json on one block of raw image intensities ``S``:
    intensities scaled by the whole volume's percentiles (``intensity_range``, so every block is normalised alike),
    ``inferer`` (a sliding window inside the block, resampling by a fixed image scale) on ``network``, then the chain.

    Args:
        network: the inference network (eval mode is set on the first call).
        inferer: e.g. ``ScaledInferer(SlidingWindowInferer(...), scale)`` with a fixed scale.
        postprocessing: as for :class:`ClusterBlock`.
        intensity_range: ``(lo, hi)`` intensities mapped to 0 and 1 (the volume's percentiles).
        spacing: voxel size per spatial axis.
        device: where the network runs.
        scores: as for :class:`ClusterBlock`.

    ``read_margin`` (per axis, None by default): when set, blocks are read with that many more voxels on each side
    (less at the volume's border) and called with ``margin`` (the voxels before / after that are only context for
    the inferer's resampling, :meth:`~spoco_bundle.inferers.ScaledInferer.infer_inner`).

    Returns (call): int32 labels ``S`` (without the margin), with ``scores`` ``(labels, maps)``; a constant block
    (empty space around a sample) gives zeros (and no maps), no network pass.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        inferer: Callable,
        postprocessing: Callable[[dict], Mapping],
        intensity_range: tuple[float, float],
        spacing: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        scores: ObjectScores | None = None,
    ) -> None:
        super().__init__(postprocessing, spacing, scores)
        self.network = network
        self.inferer = inferer
        self.lo, self.hi = float(intensity_range[0]), float(intensity_range[1])
        self.device = str(device)
        self.read_margin: tuple[int, ...] | None = None

    def __call__(  # type: ignore[override]
        self, block: np.ndarray, margin: tuple[Sequence[int], Sequence[int]] | None = None
    ) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
        block = np.asarray(block)
        if margin is not None and not any(map(any, margin)):
            margin = None
        inner = block
        if margin is not None:
            inner = block[tuple(slice(a, n - b) for a, b, n in zip(*margin, block.shape))]
        if inner.size == 0 or inner.max() == inner.min():
            empty = np.zeros(inner.shape, dtype=np.int32)
            return empty if self.scores is None else (empty, {})
        x = torch.from_numpy((block.astype(np.float32) - self.lo) / max(self.hi - self.lo, 1e-12))
        x = x[None, None].to(self.device)
        self.network.eval()
        with _NETWORK_LOCK, torch.inference_mode():
            if margin is None:
                pred = self.inferer(x, self.network)[0]
            else:  # context for the resampling only (ScaledInferer.infer_inner)
                pred = self.inferer.infer_inner(x, self.network, margin)[0]
        return super().__call__(pred.detach().cpu().numpy(), inner.shape)
