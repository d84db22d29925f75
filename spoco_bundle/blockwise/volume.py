"""One image end to end, blockwise: what :func:`~spoco_bundle.engines.segment_files` runs for a Zarr store or for
a file whose segmentation would not fit the memory budget, and the settings that decide it (``blockwise`` in
configs/inference.json)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, CopyItemsd

from spoco_bundle.blockwise.blocks import NetworkBlock
from spoco_bundle.blockwise.grid import choose_block_shape, receptive_field, window_halo, window_tail
from spoco_bundle.blockwise.segment import check_output, segment_blockwise
from spoco_bundle.blockwise.store import open_volume
from spoco_bundle.inferers import ScaledInferer, sliding_window, window_scale
from spoco_bundle.io import is_zarr, read_spacing
from spoco_bundle.postprocessing import ObjectScores, ObjectScoresd, WarnFewInstancesd
from spoco_bundle.postprocessing.suggestions import ranked_table, score_rows

__all__ = ["BlockwiseSettings", "BYTES_PER_VOXEL", "segment_volume"]

logger = logging.getLogger(__name__)

# peak memory of the whole-volume path per voxel beyond one sliding-window batch (the network output of 17 float32
# channels, the sliding window's sums and weights, the clustering's copies): research/perf/benchmark_inference.py
# measures (peak - resident memory before) / voxels = 141 for a 32-Mvoxel volume (shipped nuclei3d, window batch
# included; 138 between 16 and 32 Mvoxel), so 160 overestimates by about 15 % plus the batch
BYTES_PER_VOXEL = 160
# network activations of one sliding-window batch, per voxel of its windows (default network, no gradients): 1.13 GB
# for 4 windows of 64 x 112 x 112 measured on CPU (peak RSS); counted beside the volume's voxels
WINDOW_BYTES_PER_VOXEL = 360
# share of the free memory a run may take by default (the rest: the OS, other programs, estimate errors)
FREE_MEMORY_SHARE = 0.5
# voxels of the subsample the intensity percentiles are taken from
PERCENTILE_SAMPLE = 1 << 23
# image voxels at a cut image's edge whose resampling differs from the whole image's (linear interpolation,
# anti-aliasing): a block is read with at least this margin
RESAMPLED_EDGE = 8
# voxels of the central crop "auto" image_scale measures the blob size on (128^3 in 3D, 1448^2 in 2D)
SCALE_CROP_VOXELS = 128**3


def free_memory_gb() -> float:
    """The memory available to new allocations now (psutil's ``available``), in GB."""
    import psutil

    return psutil.virtual_memory().available / 1e9


def resident_bytes() -> int:
    """This process's resident memory now (interpreter, libraries, the model): part of any budget."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def _sw_batch(inferer: Any) -> int:
    """Windows per batch of a ``SlidingWindowInferer``, alone or inside a ``ScaledInferer``."""
    return int(getattr(getattr(inferer, "inferer", inferer), "sw_batch_size", 1))


def window_batch_bytes(inferer: Any, ndim: int) -> float:
    """The network's activations for one sliding-window batch of ``inferer`` (0 when it is not a sliding window)."""
    windows = sliding_window(inferer, ndim) if inferer is not None else None
    if windows is None:
        return 0.0
    return WINDOW_BYTES_PER_VOXEL * _sw_batch(inferer) * math.prod(windows[0])


class BlockwiseSettings:
    """
    When and how an image is segmented blockwise (the ``blockwise`` object of configs/inference.json).

    An image is segmented blockwise when it is a Zarr store or when its whole-volume segmentation would need more
    than ``max_memory_gb``: :data:`BYTES_PER_VOXEL` per voxel, one sliding-window batch of ``inferer`` and what the
    process holds already. The blocks are then sized so that the blocks in flight at once fit that budget too.

    Args:
        max_memory_gb: the memory budget; None: :data:`FREE_MEMORY_SHARE` of the free memory at the start.
        scheduler: None: the local threaded scheduler; ``"tcp://host:port"``: the dask.distributed scheduler there
            (its workers need this package and the input and output folders at the same paths).
        block_shape: core block per spatial axis (one number or a list); None: the largest that fits the budget.
        halo: more context on both sides of a block (for the clustering of large objects); None: the halos that keep
            the sliding window's positions those of the whole volume (``grid.window_halo``; for a resampled image
            on the resampled grid), or, for another inferer, half of what the network sees around a voxel.
        workers: blocks segmented at once on local threads; None: as many as the budget and the cores allow.
        input_channel, input_time_point: the channel / time point of an OME-Zarr with several.
        intensity_percentiles: the normalisation's percentiles, taken over the whole volume (a subsample).
        min_size: objects under this many voxels after stitching are removed.
        iou_threshold: objects of neighbouring blocks overlapping with IoU above it are one object.
        inferer: the sliding-window inferer inference uses (its batch of windows counts against the budget).

    Raises:
        ValueError: a non-positive memory budget.
    """

    def __init__(
        self,
        max_memory_gb: float | None = None,
        scheduler: str | None = None,
        block_shape: int | Sequence[int] | None = None,
        halo: int | Sequence[int] | None = None,
        workers: int | None = None,
        input_channel: int | None = None,
        input_time_point: int | None = None,
        intensity_percentiles: Sequence[float] = (1.0, 99.8),
        min_size: int = 16,
        iou_threshold: float = 0.5,
        inferer: Any = None,
    ) -> None:
        if max_memory_gb is not None and not float(max_memory_gb) > 0:
            raise ValueError(f"max_memory_gb must be positive (or null: half the free memory), got {max_memory_gb!r}.")
        self.max_memory_gb = None if max_memory_gb is None else float(max_memory_gb)
        self.scheduler = scheduler or None
        self.block_shape = block_shape
        self.halo = halo
        self.workers = None if workers is None else max(1, int(workers))
        self.input_channel = input_channel
        self.input_time_point = input_time_point
        self.intensity_percentiles = (float(intensity_percentiles[0]), float(intensity_percentiles[1]))
        self.min_size = int(min_size)
        self.iou_threshold = float(iou_threshold)
        self.inferer = inferer

    def budget_gb(self) -> float:
        return self.max_memory_gb if self.max_memory_gb is not None else FREE_MEMORY_SHARE * free_memory_gb()

    def whole_volume_gb(self, shape: Sequence[int]) -> float:
        """The estimated peak memory of segmenting a volume of ``shape`` whole, in GB."""
        need = math.prod(shape) * BYTES_PER_VOXEL + window_batch_bytes(self.inferer, len(shape)) + resident_bytes()
        return need / 1e9

    def wanted(self, path: str) -> bool:
        """Whether ``path`` is segmented blockwise: a Zarr store, or whole-volume memory above the budget."""
        if is_zarr(path):
            return True
        try:
            shape = read_spacing(path, self.input_channel, self.input_time_point)[0]
        except ValueError:
            return False  # the whole-volume path reports it, as before
        return self.whole_volume_gb(shape) > self.budget_gb()


def _blocks(
    path: str,
    shape: Sequence[int],
    settings: BlockwiseSettings,
    budget: float,
    voxel_bytes: float,
    view: Sequence[int] | None,
    halo_lo: Sequence[int],
    halo_hi: Sequence[int],
    step: Sequence[int],
) -> tuple[tuple[int, ...], int]:
    """The core block shape (``settings.block_shape``, else the largest the memory ``budget`` allows, in whole strides
    ``step`` of the sliding window) and how many blocks run at once.

    Raises:
        ValueError: naming ``path``, a block smaller than the network's receptive field ``view``.
    """
    ndim = len(shape)
    cores = os.cpu_count() or 1
    block = settings.block_shape
    if block is None:
        # one block when the volume fits the budget; else blocks for two at once (one in the network, which uses
        # every core, one in the single-threaded clustering), as large as that allows: less halo to recompute
        fits = math.prod(shape) * voxel_bytes <= budget
        per_block = budget / (1 if fits else (settings.workers or min(2, cores))) / voxel_bytes
        mean_halo = tuple(math.ceil((a + b) / 2) for a, b in zip(halo_lo, halo_hi))
        block = choose_block_shape(shape, int(per_block), mean_halo, minimum=view)
    block = (int(block),) * ndim if np.isscalar(block) else tuple(int(b) for b in block)  # type: ignore[arg-type]
    block = tuple(min(b, s) for b, s in zip(block, shape))
    if view is not None:
        small = [ax for ax, (b, v, s) in enumerate(zip(block, view, shape)) if b < min(v, s)]
        if small:
            raise ValueError(
                f"{path}: block_shape {list(block)} is smaller than the network's receptive field {list(view)} "
                f"(voxels of this image; at most its sliding-window patch) along axis {small[0]}: give larger blocks "
                "(--block_shape) or more memory (--max_memory_gb)."
            )
    # whole strides of the sliding window (not below the field of view), unless the block is the whole axis
    # a halo reaches no further than a block
    least = tuple(max(v, a, b) for v, a, b in zip(view or (1,) * ndim, halo_lo, halo_hi))
    aligned = tuple(
        b if b >= s else min(s, max(b // t, math.ceil(v / t)) * t) for b, s, t, v in zip(block, shape, step, least)
    )
    if settings.block_shape is not None and aligned != block:
        logger.info(f"block_shape {list(block)} -> {list(aligned)}: whole strides {list(step)} of the sliding window")
    block = aligned
    ext = math.prod(min(s, b + h0 + h1) for b, h0, h1, s in zip(block, halo_lo, halo_hi, shape))
    if settings.block_shape is None and ext * voxel_bytes > budget:
        # the network's field of view (and the halos that keep the whole volume's windows) set a smallest block
        logger.warning(
            f"{path}: the smallest blocks this network allows, {list(block)} + halos, need about "
            f"{ext * voxel_bytes / 1e9:.1f} GB, more than the memory budget leaves for blocks ({budget / 1e9:.1f} GB): "
            "segmenting with them, above the budget. Raise --max_memory_gb to the memory you have."
        )
    workers = settings.workers
    if workers is None:  # as many blocks at once as the budget holds
        workers = int(max(1, min(cores, budget // (ext * voxel_bytes))))
    return block, workers


def _percentiles(image: Any, percentiles: tuple[float, float]) -> tuple[float, float]:
    """The intensity percentiles of the whole volume from a regular subsample of at most PERCENTILE_SAMPLE voxels."""
    step = max(1, math.ceil((image.size / PERCENTILE_SAMPLE) ** (1 / image.ndim)))
    sample = np.asarray(image[(slice(None, None, step),) * image.ndim].compute(), dtype=np.float64)
    lo, hi = np.percentile(sample, percentiles)
    return float(lo), float(hi)


def _fixed_scale_inferer(inferer: Any, network: Any, image: Any, lo: float, hi: float) -> tuple[Any, float]:
    """For ``image_scale "auto"``: the factor measured once on a central crop, and an inferer with it fixed (every
    block resampled alike). Returns ``(inferer, factor)``."""
    if not getattr(inferer, "auto", False):
        scale = getattr(inferer, "scale", (1.0,))
        return inferer, float(np.prod(scale)) ** (1 / len(scale))
    # a central crop of the same number of voxels in 2D and 3D (128^3, 1448^2): enough objects for a stable measure
    side = int(round(SCALE_CROP_VOXELS ** (1 / image.ndim)))
    crop = tuple(slice(max(0, (s - side) // 2), max(0, (s - side) // 2) + side) for s in image.shape)
    x = (np.asarray(image[crop].compute(), dtype=np.float32) - lo) / max(hi - lo, 1e-12)
    scale = inferer.find_scale(x[None], network)
    shape = "x".join(str(c.stop - c.start) for c in crop)
    logger.info(f"image_scale auto: {scale:.3g}, measured on the central {shape} crop")
    return ScaledInferer(inferer.inferer, scale, output_grid=inferer.output_grid), scale


def segment_volume(
    path: str,
    out_path: str,
    network: torch.nn.Module,
    inferer: Any,
    postprocessing: Callable,
    settings: BlockwiseSettings,
    spatial_dims: int,
    device: str | torch.device = "cpu",
) -> dict:
    """
    Segment one image (Zarr store, TIFF or NIfTI file) blockwise into ``out_path`` (``.zarr``: OME-Zarr; TIFF, NIfTI:
    written slab by slab): the whole volume's intensity percentiles and image scale, blocks of at most the budget
    (:class:`BlockwiseSettings`), :class:`~spoco_bundle.blockwise.blocks.NetworkBlock` on each, stitched.

    Returns:
        what :func:`~spoco_bundle.blockwise.segment.segment_blockwise` reports (``objects``, ``blocks``, ...); for
        a chain with :class:`~spoco_bundle.postprocessing.ObjectScoresd` (``spoco suggest``) also ``object_table``:
        the suggestions rows (most unsure first), each object scored over all the blocks it spans.

    Raises:
        ValueError: naming the path: unreadable input, wrong dimensionality, a block smaller than the network's
            receptive field, an existing output store.
    """
    check_output(out_path)  # before any work
    scores = _object_scores(postprocessing)
    postprocessing = _without_whole_image_checks(postprocessing)
    image, meta = open_volume(path, settings.input_channel, settings.input_time_point)
    if image.ndim != spatial_dims:
        raise ValueError(f"{path} has {image.ndim} spatial axes {tuple(image.shape)}; the model is {spatial_dims}D.")
    lo, hi = _percentiles(image, settings.intensity_percentiles)
    if hi <= lo:
        logger.warning(f"{path}: the image is constant (no contrast); 0 instances.")
    inferer, scale = _fixed_scale_inferer(inferer, network, image, lo, hi)
    view = _field_of_view(network, inferer, scale)
    ndim = image.ndim
    context = settings.halo
    context = None if context is None else ((int(context),) * ndim if np.isscalar(context) else tuple(context))
    windows = sliding_window(inferer, ndim)
    scales = tuple(getattr(inferer, "scale", (1.0,)))
    tail, read_margin = None, None
    if windows is not None and all(s == 1.0 for s in scales):
        # blocks on the sliding window's grid: the whole volume's network output in every core
        halo_lo, halo_hi, step = window_halo(*windows, context=context)
        tail = window_tail(image.shape, windows[0], step)
    elif windows is not None:  # resampled: the same on the resampled grid (see ScaledInferer)
        halo_lo, halo_hi, step, tail, read_margin = _resampled_window_halo(image.shape, *windows, scales, context)
        scale = float(np.prod(window_scale(scales, *windows)[0])) ** (1 / ndim)
    else:  # another inferer: half the field of view, about the same output
        halo_lo = halo_hi = context or (tuple(math.ceil(v / 2) for v in view) if view else (32,) * ndim)
        step = (1,) * ndim
    total = settings.budget_gb() * 1e9
    # what the process holds already (libraries, the model) is not free for blocks
    available = max(total - resident_bytes(), 0.25 * total)
    inferer = fit_window_batch(inferer, windows, 0.5 * available)
    budget = block_budget(available, inferer, windows)
    voxel_bytes = BYTES_PER_VOXEL * max(1.0, scale) ** ndim
    block, workers = _blocks(path, image.shape, settings, budget, voxel_bytes, view, halo_lo, halo_hi, step)
    segmenter = NetworkBlock(network, inferer, postprocessing, (lo, hi), meta.get("spacing"), device, scores)
    segmenter.read_margin = read_margin
    info: dict = {}
    segment_blockwise(
        image,
        segmenter,
        out_path,
        block,
        halo_lo,
        halo_hi=halo_hi,
        tail=tail,
        min_size=settings.min_size,
        iou_threshold=settings.iou_threshold,
        scheduler=settings.scheduler,
        workers=workers,
        meta=meta,
        identity=_identity(path, network, postprocessing, (lo, hi, scale)),
        info=info,
    )
    if "object_sums" in info:
        info["object_table"] = _object_table(info.pop("object_sums"))
    return info


def _object_scores(postprocessing: Callable) -> ObjectScores | None:
    """The chain's object scoring (``spoco suggest``), which a blockwise run does per block and merges."""
    for t in getattr(postprocessing, "transforms", ()):
        if isinstance(t, ObjectScoresd):
            return t.scores
    return None


def _object_table(sums: dict) -> list[dict]:
    """The merged per-object sums of a blockwise run as the suggestions table (most unsure first, with rank, voxels,
    centroid and box): the rows the whole-volume path gives, each object's scores its means over all its blocks."""
    voxels = sums["voxels"]
    geometry = {
        int(k): (sums["centroid"][k], sums["first"][k], sums["last"][k]) for k in np.flatnonzero(voxels[1:] > 0) + 1
    }
    return ranked_table(score_rows(voxels, sums["maps"]), geometry)


def _resampled_window_halo(
    shape: Sequence[int],
    roi: tuple[int, ...],
    overlap: Any,
    scales: tuple[float, ...],
    context: Sequence[int] | None,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[tuple[int, int] | None, ...], tuple[int, ...]]:
    """:func:`~spoco_bundle.blockwise.grid.window_halo` and ``window_tail`` on the resampled grid, in image voxels.

    With the scale of :func:`~spoco_bundle.inferers.window_scale` (``k`` image voxels per stride ``t``), blocks
    of whole ``k``, these halos and blocks read with a margin of whole ``k / gcd(k, t)`` voxels (resampled, then cut
    off: :meth:`~spoco_bundle.inferers.ScaledInferer.infer_inner`), a block's resampled image is the whole image's
    and its sliding windows are the whole image's wherever they reach the core or the resampled voxel beyond it
    that the core's output is interpolated from; hence a halo after the block of a whole window.

    Returns:
        ``(halo before, halo after, k, tail, margin)`` per axis.
    """
    moved, ks, strides = window_scale(scales, roi, overlap)
    lo, hi, tail, margin = [], [], [], []
    for ax, (n, r, k, t, s) in enumerate(zip(shape, roi, ks, strides, moved)):
        c = 0 if context is None else math.ceil(context[ax] * s)
        a, b = t * (r // t), r  # first windows that touch the voxel before the core / after it
        a += t * math.ceil(max(0, c - a) / t)
        b += t * math.ceil(max(0, c - b) / t)
        lo.append(a * k // t)
        hi.append(b * k // t)  # whole: k is a multiple of t / gcd(r - t, t)
        unit = k // math.gcd(k, t)
        margin.append(unit * math.ceil(RESAMPLED_EDGE / unit))
        # the whole (padded) image's last window, moved back to end at its end; see window_tail
        m = math.ceil(n / unit) * (t // math.gcd(k, t))
        if m > r and (m - r) % t:
            tail.append((max(0, (m - r - 1) * k // t), (m - r) // t * k))
        else:
            tail.append(None)
    return tuple(lo), tuple(hi), ks, tuple(tail), tuple(margin)


def fit_window_batch(inferer: Any, windows: tuple | None, limit: float) -> Any:
    """``inferer`` with its sliding window's batch cut to what ``limit`` bytes hold (at least one window): windows
    are independent, so fewer at a time give the same output with less memory, leaving more of a small budget for
    blocks (larger blocks, less halo to compute)."""
    if windows is None:
        return inferer
    batch = _sw_batch(inferer)
    fit = max(1, min(batch, int(limit // (window_batch_bytes(inferer, len(windows[0])) / batch))))
    if fit == batch:
        return inferer
    logger.info(f"sliding-window batch of {batch} -> {fit} windows, to leave memory for blocks")
    sw = copy.copy(getattr(inferer, "inferer", inferer))
    sw.sw_batch_size = fit
    if not isinstance(inferer, ScaledInferer):
        return sw
    inferer = copy.copy(inferer)
    inferer.inferer = sw
    return inferer


def block_budget(budget: float, inferer: Any, windows: tuple | None) -> float:
    """Bytes left for blocks of ``budget``: one sliding-window batch (``sw_batch_size`` windows of ``windows[0]``) is
    in the network at a time, whatever the block size, so its activations come off first (at least a quarter of the
    budget stays: a window batch larger than the budget then shows as blocks too small for the network)."""
    if windows is None:
        return budget
    return max(budget - window_batch_bytes(inferer, len(windows[0])), 0.25 * budget)


def _field_of_view(network: torch.nn.Module, inferer: Any, scale: float) -> tuple[int, ...] | None:
    """What the network sees of the image around a voxel, per axis in the image's voxels: its receptive field, but no
    more than the sliding window's patch (the whole-volume path never gives it more), divided by the image scale.
    None when neither is known."""
    rf = receptive_field(getattr(network, "student", network))
    roi = getattr(getattr(inferer, "inferer", inferer), "roi_size", None)
    if rf is None and roi is None:
        return None
    n = len(rf if rf is not None else roi)
    rf = rf or (10**9,) * n
    roi = tuple(int(r) for r in roi) if roi is not None else (10**9,) * n
    return tuple(math.ceil(min(a, b) / scale) for a, b in zip(rf, roi))


def _whole_image_step(transform: Any) -> bool:
    """A step of the chain that only means something on a whole image: the object count check, the object scores
    and the copy of the network output they read."""
    if isinstance(transform, (WarnFewInstancesd, ObjectScoresd)):
        return True
    return isinstance(transform, CopyItemsd) and "network_output" in getattr(transform, "names", ())


def _without_whole_image_checks(postprocessing: Callable) -> Callable:
    """The chain without the steps of :func:`_whole_image_step`: a block is not an image (its object count says
    nothing about the volume, its objects' scores are not the volume's, and the block has no file name), and the
    resume identity stays that of the chain without them."""
    if not isinstance(postprocessing, Compose):
        return postprocessing
    kept = [t for t in postprocessing.transforms if not _whole_image_step(t)]
    if len(kept) == len(postprocessing.transforms):
        return postprocessing
    chain = copy.copy(postprocessing)  # every other setting of the Compose as it was
    chain.transforms = kept
    return chain


def _describe(obj: Any, depth: int = 4) -> Any:
    """The settings of a (nested) transform as plain values, for comparing two runs' post-processing."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [_describe(v, depth - 1) for v in obj] if depth > 0 else "..."
    if depth > 0 and hasattr(obj, "__dict__"):
        attrs = {k: _describe(v, depth - 1) for k, v in sorted(vars(obj).items()) if not k.startswith("_")}
        return {type(obj).__name__: attrs}
    return type(obj).__name__


def _identity(path: str, network: torch.nn.Module, postprocessing: Any, numbers: Sequence[float]) -> str:
    """What a resumed run must share with the interrupted one: the input (path, modification time), the network's
    weights, the post-processing's settings and the normalisation / scale found for the image."""
    digest = hashlib.sha1()
    for name, value in network.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().numpy().tobytes())
    digest.update(json.dumps(_describe(postprocessing), sort_keys=True, default=str).encode())
    return f"{os.path.abspath(path)}@{os.path.getmtime(path)}|{digest.hexdigest()}|{list(numbers)}"
