"""Inferers: two views for training, resampling to the training object size, student+teacher for consistency."""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer
from monai.transforms import Resize

from spoco_bundle.backends import BACKENDS, OpenVINONet
from spoco_bundle.errors import check_flag
from spoco_bundle.measure import blob_scale
from spoco_bundle.networks import NetworkWrapper, downsampling, load_weights, unwrap
from spoco_bundle.transforms import Rescale, check_scale

__all__ = [
    "TwoViewInferer",
    "ScaledInferer",
    "StudentTeacherNet",
    "FlippedHeadNet",
    "ReducedPrecisionNet",
    "PRECISIONS",
    "native_bfloat16",
    "inference_window",
    "window_scale",
    "check_window",
    "network_for_clustering",
]

logger = logging.getLogger(__name__)


class TwoViewInferer(Inferer):
    """
    Runs the student on the first view with gradients and the momentum teacher on the second view without.

    Used with ``monai.engines.SupervisedTrainer`` and ``PrepareBatchExtraInput(extra_keys="image_g")``, so the
    trainer calls ``inferer(image, network, image_g)``. The returned pair is what ``SpocoLoss`` expects; keeping the
    trainer's ``network`` the plain student means ``model.pt`` holds only the student's weights.

    Args:
        teacher: the momentum teacher network (same architecture as the student).

    Shapes:
        ``inputs`` and ``second_view``: ``(B, C, *S)``; returns ``(student(inputs), teacher(second_view))``, each
        ``(B, C_out, *S)``. Without a second view (e.g. a plain supervised call) only the student output is returned.
    """

    def __init__(self, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: torch.nn.Module, second_view: torch.Tensor | None = None, *args: Any
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # plain tensors: a MetaTensor's per-operation dispatch cost 5-12 % of a CPU training step
        # (research/perf/benchmark_training_step.py --metatensor), and nothing downstream reads the batch's metadata
        student_out = network(_plain(inputs))
        if second_view is None:
            return student_out
        if second_view.shape != inputs.shape:
            raise ValueError(f"second view shape {tuple(second_view.shape)} != first view {tuple(inputs.shape)}.")
        with torch.no_grad():
            teacher_out = self.teacher(_plain(second_view))
        return student_out, teacher_out.detach()


class ScaledInferer(Inferer):
    """
    Runs ``inferer`` on the input resampled by ``scale``, so that a model trained on objects of one size can segment
    images taken at another magnification, and returns the output on the input's grid (resampled back) or, with
    ``output_grid="network"``, on the grid the network saw. The bundle's inference clusters there (where objects
    have their training size, so the clustering's voxel-based settings and ``min_size`` mean what they meant in
    training) and resizes the labels onto the image's grid at the end
    (:class:`~spoco_bundle.postprocessing.ResizeToMatchd`): clustering an output interpolated onto a grid 2-3x
    finer or coarser than the network's loses touching objects' borders.

    A number: (object size in the training images) / (object size in these images): nuclei twice as large as in
    training -> 0.5. Resampling is linear (bilinear / trilinear), with Gaussian anti-aliasing where it shrinks
    (MONAI's ``Resize``); the output (embeddings and foreground logit) is resampled back the same way. ``scale`` 1
    runs ``inferer`` unchanged. Around a ``SlidingWindowInferer`` the factor is moved (by at most half a voxel per
    window stride) to make a stride a whole number ``k`` of image voxels, and the image is padded (reflected) to a
    length that resamples without rounding: then a block of a large image that starts at a multiple of ``k`` gets
    the whole image's network output (:func:`window_scale`).

    ``"auto"``: the factor is found per image, without a model pass: the image's characteristic blob size
    (:func:`~spoco_bundle.measure.blob_scale`) is compared with the same measure on the training images
    (``blob_scales``: their 10th, 50th and 90th percentiles, by default the network's ``image_blob_scale`` buffer
    recorded by :class:`~spoco_bundle.handlers.TrainingSetRecorder`). An image within the training images' range
    (widened to at least the median / ``min_band`` to the median x ``min_band``) is segmented as it is (1); one
    outside it is resampled (factor limited to ``limits``) to halfway (geometrically) between the range's
    nearer end and the training median, enlarged or shrunk alike. A
    model that recorded no training images' blob size is run at 1, with a warning. The factor used for the last
    input is ``last_scale``.

    Args:
        inferer: the inferer to wrap, e.g. ``SlidingWindowInferer``.
        scale: one factor for every spatial axis, one per axis (``(D, H, W)`` order for 3D), or ``"auto"``.
        blob_scales: for ``"auto"``: low, middle and high blob size of the training images (voxels of the
            network's grid); None: the network's record.
        limits: for ``"auto"``: smallest and largest factor.
        min_band: for ``"auto"``: the range in which images are left alone spans at least this factor either side
            of the training median.
        output_grid: ``"input"``: the output resampled back onto the input's grid (linear); ``"network"``: the
            network's output as it is, on the resampled grid, cut to the input's extent (a reflected padding
            removed): ``round(n * s)`` voxels along an axis of ``n`` input voxels resampled by ``s``.

    Shapes:
        ``inputs``: ``(B, C, *S)``; returns ``(B, C_out, *S)``, the wrapped inferer's output at the input's size
        (``output_grid="network"``: ``(B, C_out, *S')``, S' the resampled size).

    Raises:
        ValueError: a non-positive or non-finite scale, or one per axis that does not match the input's axes;
            ``blob_scales`` that are not three increasing positive numbers.
    """

    def __init__(
        self,
        inferer: Inferer,
        scale: float | Sequence[float] | str = 1.0,
        blob_scales: Sequence[float] | None = None,
        limits: tuple[float, float] = (0.2, 5.0),
        min_band: float = 1.25,
        output_grid: str = "input",
    ) -> None:
        super().__init__()
        self.inferer = inferer
        self.auto = isinstance(scale, str) and scale.strip().lower() == "auto"
        self.scale = (1.0,) if self.auto else check_scale(scale)
        self.blob_scales = None if blob_scales is None else _check_blob_scales(blob_scales)
        if not 0 < limits[0] <= 1 <= limits[1]:
            raise ValueError(f"limits must be (lo, hi) with 0 < lo <= 1 <= hi, got {limits}.")
        self.limits = (float(limits[0]), float(limits[1]))
        if not min_band >= 1:
            raise ValueError(f"min_band must be >= 1, got {min_band}.")
        self.min_band = float(min_band)
        if output_grid not in ("input", "network"):
            raise ValueError(f"output_grid must be 'input' or 'network', got {output_grid!r}.")
        self.output_grid = output_grid
        self.last_scale: tuple[float, ...] = self.scale
        self._warned = False

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.auto:
            outs = [self._auto(item[None], network, *args, **kwargs) for item in inputs]
            return torch.cat(outs)
        self.last_scale = self.scale
        return self._run(inputs, network, self.scale, *args, **kwargs)

    def _run(
        self,
        inputs: torch.Tensor,
        network: Callable,
        scale: tuple[float, ...],
        *args: Any,
        margin: tuple[Sequence[int], Sequence[int]] | None = None,
        **kw: Any,
    ) -> torch.Tensor:
        """The wrapped inferer on ``inputs`` resampled by ``scale``, its output back on the input grid (without
        ``margin``: voxels before / after per axis that are resampled as context and then cut off)."""
        spatial = tuple(int(n) for n in inputs.shape[2:])
        lo_m, hi_m = margin if margin is not None else ((0,) * len(spatial), (0,) * len(spatial))
        inner = (..., *(slice(a, n - b) for a, b, n in zip(lo_m, hi_m, spatial)))
        if all(s == 1.0 for s in scale):
            return self.inferer(inputs[inner], network, *args, **kw)
        scale = scale * len(spatial) if len(scale) == 1 else scale
        if len(scale) != len(spatial):
            raise ValueError(
                f"image_scale has {len(scale)} factors but the input has {len(spatial)} spatial axes {spatial}."
            )
        x = _plain(inputs)
        cut, pad = None, [0] * len(spatial)
        grid = _window_grid(self.inferer, scale)
        if grid is not None:
            # a scale of whole sliding-window strides (stride / k), the image padded to resample without rounding:
            # onto a grid that any part of the image starting at a multiple of k shares (blockwise)
            scale, ks, strides = grid
            if all(v == 1.0 for v in scale):
                self.last_scale = scale
                return self.inferer(inputs[inner], network, *args, **kw)
            # image voxels that resample to whole voxels
            units = [k // math.gcd(k, t) for k, t in zip(ks, strides)]
            pad = [(-n) % u for n, u in zip(spatial, units)]
            if any(pad):
                flat = [v for p in reversed(pad) for v in (0, p)]
                mode = "reflect" if all(p < n for p, n in zip(pad, spatial)) else "replicate"
                x = torch.nn.functional.pad(x, flat, mode=mode)
            if margin is not None:
                # margins of whole k / gcd(k, t) voxels are whole resampled voxels: cut off before the network; a
                # margin cut short by the image's end stays (the part then ends where the whole image does)
                hi_cut = [b if b % u == 0 else 0 for b, u in zip(hi_m, units)]
                if any(a % u for a, u in zip(lo_m, units)):
                    raise ValueError(f"margin before {tuple(lo_m)} is not whole {tuple(units)} voxels.")
                cut = [(a * t // k, b * t // k) for a, b, k, t in zip(lo_m, hi_cut, ks, strides)]
        elif margin is not None:
            raise ValueError("a margin needs a SlidingWindowInferer inside the ScaledInferer.")
        self.last_scale = scale
        # the training-side resampling (Rescale) in, the same interpolation back onto the input's grid
        to_scaled = Rescale(scale, mode="linear")
        x = torch.stack([_plain(to_scaled(item)) for item in x])
        if cut is not None:
            x = x[(..., *(slice(a, n - b) for (a, b), n in zip(cut, x.shape[2:])))]
        kept = [(0, 0)] * len(spatial) if cut is None else [(a, b) for a, b in zip(lo_m, hi_cut)]
        padded = tuple(n + p - a - b for n, p, (a, b) in zip(spatial, pad, kept))
        out = _plain(self.inferer(x, network, *args, **kw))
        if self.output_grid == "network":
            # the output starts where the inner part does (margins before are cut whole); cut off the padding and
            # what is left of the margins after: the inner part's extent on the resampled grid
            ends = [
                int(round((n - a - b) * m / q)) for n, a, b, m, q in zip(spatial, lo_m, hi_m, out.shape[2:], padded)
            ]
            return out[(..., *(slice(0, max(e, 1)) for e in ends))]
        out = _resize_to(out, padded)
        return out[(..., *(slice(0, n - a - b) for n, a, b in zip(spatial, lo_m, hi_m)))]

    def infer_inner(
        self, inputs: torch.Tensor, network: Callable, margin: tuple[Sequence[int], Sequence[int]]
    ) -> torch.Tensor:
        """The output for ``inputs`` without ``margin`` (voxels before / after per spatial axis), which are only
        resampled as context, at the fixed scale: a block of a large image read with a margin gets the whole
        image's resampled input up to its edge. Margins are whole ``k / gcd(k, stride)`` voxels (see
        :func:`window_scale`), 0 where the block ends at the image's end."""
        if self.auto:
            raise ValueError("infer_inner needs a fixed scale, not 'auto'.")
        self.last_scale = self.scale
        return self._run(inputs, network, self.scale, margin=margin)

    def _training_blob_scales(self, network: Callable) -> tuple[float, float, float] | None:
        if self.blob_scales is not None:
            return self.blob_scales
        net = network
        while isinstance(net, NetworkWrapper):
            net = net.network
        net = unwrap(net.student if isinstance(net, StudentTeacherNet) else net)
        buf = getattr(net, "image_blob_scale", None)
        if buf is None or not bool((buf > 0).all()):
            return None
        return _check_blob_scales(buf.tolist())

    def find_scale(self, image: np.ndarray, network: Callable) -> float:
        """The factor ``"auto"`` uses for ``image`` ``(C, *S)`` (1 when the model has no record)."""
        trained = self._training_blob_scales(network)
        if trained is None:
            if not self._warned:
                logger.warning(
                    "image_scale 'auto': the model records no blob size of its training images; images are segmented "
                    "at scale 1. Give a number as --image_scale to resample them."
                )
                self._warned = True
            return 1.0
        lo, mid, hi = trained
        # at least the zoom range a model tolerates anyway (about 0.8-1.25x), also when the training images all
        # had one blob size (a single training volume)
        lo, hi = min(lo, mid / self.min_band), max(hi, mid * self.min_band)
        found = blob_scale(image[0])
        if not np.isfinite(found):
            logger.warning("image_scale 'auto': the image has no structure to measure (constant?); scale 1.")
            return 1.0
        if lo <= found <= hi:
            return 1.0  # within what the model was trained on: leave the image as it is
        # all the way to the median moves images whose objects were small or large at their own magnification too
        # far; only to the range's end leaves enlarged (blurred) images at the size the model segments worst
        # (measured on DSB2018 training images: research/pages/scale_rules_enlarge.md)
        edge = lo if found < lo else hi
        return float(np.clip(math.sqrt(edge * mid) / found, *self.limits))

    def _auto(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        scale = self.find_scale(_plain(inputs[0]).detach().cpu().numpy(), network)
        self.last_scale = (scale,)
        return self._run(inputs, network, (scale,), *args, **kwargs)


def _check_blob_scales(values: Sequence[float]) -> tuple[float, float, float]:
    v = tuple(float(x) for x in values)
    if len(v) != 3 or not all(np.isfinite(x) and x > 0 for x in v) or not v[0] <= v[1] <= v[2]:
        raise ValueError(f"blob_scales must be three increasing positive numbers (low, middle, high), got {values!r}.")
    return v  # type: ignore[return-value]


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: resampled copies must not carry (and later be written with) a rescaled affine."""
    return t.as_tensor() if isinstance(t, MetaTensor) else t


def sliding_window(inferer: Any, ndim: int) -> tuple[tuple[int, ...], Any] | None:
    """``(roi, overlap)`` of a ``SlidingWindowInferer`` (alone or inside a ``ScaledInferer``) with a fixed window of
    ``ndim`` axes: the grid its windows lie on; None for other inferers or a window of the image's own size."""
    sw = inferer.inferer if isinstance(inferer, ScaledInferer) else inferer
    if not isinstance(sw, SlidingWindowInferer):
        return None
    roi = sw.roi_size
    roi = (int(roi),) * ndim if np.isscalar(roi) else tuple(int(r) for r in roi)
    if len(roi) != ndim or min(roi) < 1:  # non-positive: the image's own size, no fixed grid
        return None
    return roi, sw.overlap


def inference_window(
    patch_size: Sequence[int], factor: float = 5 / 3, multiple: int = 16, features: Sequence[int] | None = None
) -> list[int]:
    """
    The sliding window of inference: the training ``patch_size`` enlarged by ``factor`` per axis and rounded up to a
    multiple of ``multiple``, or of the down-sampling of a U-Net with ``features`` where that is larger (a size the
    network accepts), e.g. 192 -> 320.

    Why larger than the patch: group norm normalises every window on its own statistics, and a window's border sees
    less context than its centre; in windows of the training patch's size both show, as seams in the foreground and
    as weaker objects where windows meet (measured in research/pages/inference_window.md). ``factor`` 1 gives the
    patch itself.

    Raises:
        ValueError: a non-positive patch axis, ``factor`` or ``multiple``.
    """
    if factor <= 0 or multiple < 1 or not len(patch_size) or min(int(p) for p in patch_size) < 1:
        raise ValueError(
            f"inference_window needs a positive patch size, factor and multiple, got {list(patch_size)}, {factor}, "
            f"{multiple}."
        )
    multiple = max(multiple, downsampling(features)) if features else multiple
    return [int(math.ceil(int(p) * factor / multiple) * multiple) for p in patch_size]


def check_window(window: Sequence[int] | int, features: Sequence[int]) -> list[int] | int:
    """``window`` checked against the network: each size a positive multiple of the U-Net's down-sampling
    (:func:`~spoco_bundle.networks.downsampling`), so that a bad ``--window_size`` is an error naming it rather than a
    shape mismatch inside the network.

    Raises:
        ValueError: a size that is not a positive multiple of the down-sampling.
    """
    sizes = [int(window)] if np.isscalar(window) else [int(v) for v in window]  # type: ignore[union-attr]
    step = downsampling(features)
    if not sizes or any(v < step or v % step for v in sizes):
        raise ValueError(
            f"window_size {window!r} must be positive multiples of {step} (the U-Net with features {list(features)} "
            f"down-samples by {step})."
        )
    return sizes[0] if np.isscalar(window) else sizes


def window_scale(
    scale: Sequence[float], roi: Sequence[int], overlap: float | Sequence[float]
) -> tuple[tuple[float, ...], tuple[int, ...], tuple[int, ...]]:
    """
    An image scale moved (by about half a voxel per sliding-window stride) to ``stride / k`` with a whole number ``k``
    per axis, so that a window stride of the resampled image is exactly ``k`` voxels of the image: a length of
    ``k / gcd(k, stride)`` voxels (an image padded to it) is resampled without rounding, a block that starts at a
    multiple of ``k`` resamples onto the whole image's resampled grid and its sliding windows onto the whole image's
    windows, and ``k`` is a multiple of ``stride / gcd(roi - stride, stride)``, so that the halo after a block
    (:func:`~spoco_bundle.blockwise.grid.window_halo`: ``roi - stride`` resampled voxels) is whole image voxels.

    Args:
        scale: the factor per spatial axis (or one for all).
        roi, overlap: the ``SlidingWindowInferer``'s window and overlap.

    Returns:
        ``(scale, k, stride)`` per axis: the moved factors, the image voxels per stride and the stride in the
        resampled image's voxels.
    """
    n = len(roi)
    scales = [float(scale[0])] * n if len(scale) == 1 else [float(s) for s in scale]
    overlaps = [float(overlap)] * n if np.isscalar(overlap) else [float(o) for o in overlap]  # type: ignore[arg-type]
    if len(scales) != n or len(overlaps) != n:
        raise ValueError(f"need one scale and overlap per window axis ({n}), got {scale!r} and {overlap!r}.")
    strides = tuple(max(1, int(int(r) * (1 - o))) for r, o in zip(roi, overlaps))
    ks = []
    for r, t, s in zip(roi, strides, scales):
        m = t // math.gcd(int(r) - t, t)
        ks.append(max(1, round(t / s / m)) * m)
    return tuple(t / k for t, k in zip(strides, ks)), tuple(ks), strides


def _window_grid(inferer: Any, scale: Sequence[float]) -> tuple[tuple[float, ...], ...] | None:
    """``(scale, k, stride)`` of :func:`window_scale` for a ``SlidingWindowInferer`` whose window has one size per
    scaled axis; None for other inferers."""
    windows = sliding_window(inferer, len(scale))
    return None if windows is None else window_scale(scale, *windows)


def _resize_to(out: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """``(B, C, *S')`` resampled (linear, anti-aliased) to ``(B, C, *spatial)``."""
    if tuple(out.shape[2:]) == tuple(spatial):
        return out
    to_input = Resize(spatial, mode="bilinear" if len(spatial) == 2 else "trilinear", anti_aliasing=True)
    return torch.stack([_plain(to_input(item)) for item in out]).to(out.dtype)


class StudentTeacherNet(torch.nn.Module):
    """
    Student and teacher side by side, for consistency clustering: output channels are the student's E embeddings,
    the teacher's E embeddings, then the student's foreground logit (if any).

    Args:
        student: trained network ``f``.
        teacher: its momentum teacher ``g`` (same architecture).
        embedding_dim: E.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, embedding_dim: int = 16) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.embedding_dim = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.student(x)
        g = self.teacher(x)
        e = self.embedding_dim
        return torch.cat([f[:, :e], g[:, :e], f[:, e:]], dim=1)


class FlippedHeadNet(NetworkWrapper):
    """
    Test-time flips for the foreground head: the network runs on the input and on its mirror images along every
    combination of spatial axes (4 views in 2D, 8 in 3D); the head's probability is the mean over the views (each
    flipped back), the embeddings are the unflipped view's. Embeddings are not averaged: they are equivariant only
    per object (an object's embedding in one view is arbitrary relative to another view's), so a mean could pull two
    neighbours together.

    The output has the wrapped network's layout (channels ``[..., foreground logit]``); attributes the inferers and
    the blockwise path read (recorded object size, strides, kernel sizes) are the wrapped network's.

    Args:
        network: a network whose last output channel is a foreground logit (e.g.
            :class:`~spoco_bundle.networks.EmbeddingUNet`, :class:`StudentTeacherNet`).
        spatial_dims: 2 or 3.
        head_network: what the mirror images run through, with the same last channel as ``network`` (the student
            of a :class:`StudentTeacherNet`, so that its teacher runs once); default ``network``.
    """

    def __init__(
        self, network: torch.nn.Module, spatial_dims: int, head_network: torch.nn.Module | None = None
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        self.network = network
        self.head_network = network if head_network is None else head_network
        axes = [2 + a for a in range(spatial_dims)]
        # every subset of the spatial axes, the empty one (no flip) first
        self.flips = [tuple(a for i, a in enumerate(axes) if k >> i & 1) for k in range(2**spatial_dims)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        prob = torch.sigmoid(out[:, -1:].float())
        for dims in self.flips[1:]:
            prob += torch.sigmoid(self.head_network(torch.flip(x, dims))[:, -1:].float()).flip(dims)
        prob = (prob / len(self.flips)).clamp(1e-6, 1 - 1e-6)
        return torch.cat([out[:, :-1], torch.logit(prob).to(out.dtype)], dim=1)


# the values of inference's ``precision``
PRECISIONS = ("auto", "float32", "bfloat16")


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 convolutions natively: a CPU with AVX512-BF16 or AMX (oneDNN's bfloat16
    kernels; elsewhere bfloat16 would be emulated, slower than float32). False for other devices: their reduced
    precision is not measured here."""
    if torch.device(device).type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch.cpu; absent -> False
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


# per thread: how deep in ReducedPrecisionNet.forward, and the autocast states the float32 modules suspended
_REDUCED = threading.local()


def _float32_enter(module: torch.nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a module kept in float32: inside :class:`ReducedPrecisionNet` only, autocast suspended and
    the inputs made float32."""
    if not getattr(_REDUCED, "depth", 0):
        return None
    device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    _REDUCED.__dict__.setdefault("saved", []).append((device, torch.is_autocast_enabled(device)))
    torch.set_autocast_enabled(device, False)
    return tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)


def _float32_leave(module: torch.nn.Module, args: tuple, output: Any) -> None:
    if getattr(_REDUCED, "depth", 0) and getattr(_REDUCED, "saved", None):
        device, enabled = _REDUCED.saved.pop()
        torch.set_autocast_enabled(device, enabled)


class ReducedPrecisionNet(NetworkWrapper):
    """
    ``network`` computed in bfloat16 (``torch.autocast``: convolutions and matrix products in bfloat16, reductions
    such as group norm in float32), its output returned as float32. The weights stay float32. Modules named
    ``float32_modules`` (the U-Net's 1x1 output head) run in float32: their outputs are the embeddings, whose
    distances the clustering compares, and bfloat16 would round them to steps of 1/16 between 8 and 16. (Their
    hooks act only inside this wrapper's forward, per thread: the network run on its own stays float32.)

    Attributes the inferers and the blockwise path read are the wrapped network's.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        dtype: torch.dtype = torch.bfloat16,
        float32_modules: Sequence[str] = ("output_block",),
    ) -> None:
        super().__init__()
        self.network = network
        self.dtype = dtype
        keep = tuple(float32_modules)
        for name, module in network.named_modules():
            hooked = _float32_enter in module._forward_pre_hooks.values()
            if name.rsplit(".", 1)[-1] in keep and not hooked:
                module.register_forward_pre_hook(_float32_enter)
                module.register_forward_hook(_float32_leave)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _REDUCED.depth = getattr(_REDUCED, "depth", 0) + 1
        try:
            with torch.autocast(device_type=x.device.type, dtype=self.dtype):
                out = self.network(x)
        finally:
            _REDUCED.depth -= 1
        return out.float()


def network_for_clustering(
    network: torch.nn.Module,
    clustering: str,
    ckpt_path: str | os.PathLike,
    embedding_dim: int = 16,
    test_time_flips: bool = False,
    precision: str = "float32",
    backend: str = "torch",
) -> torch.nn.Module:
    """
    The network inference runs: the student alone, or, for ``clustering="consistency"``, the student beside its
    teacher, loaded (strictly) from ``teacher.pt`` beside the student's checkpoint ``ckpt_path`` (training writes
    both); with ``test_time_flips``, inside :class:`FlippedHeadNet` (the head averaged over mirror images; a network
    without a foreground head is returned as it is); with ``precision`` ``"bfloat16"`` inside
    :class:`ReducedPrecisionNet` (``"auto"``: where the network's device computes it natively,
    :func:`native_bfloat16`). With ``backend`` ``"openvino"`` the networks (student, teacher) run in
    :class:`~spoco_bundle.backends.OpenVINONet` instead, in the same precision.

    Raises:
        ValueError: a ``precision`` not in :data:`PRECISIONS` or a ``backend`` not in
            :data:`~spoco_bundle.backends.BACKENDS`; ``"openvino"`` for a network that is not on the CPU.
        ImportError: ``"openvino"`` without the openvino package.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    test_time_flips = check_flag(test_time_flips, "test_time_flips")  # the text "false" would count as on
    device = next(network.parameters()).device
    if clustering == "consistency":
        teacher_path = os.path.join(os.path.dirname(os.fspath(ckpt_path)), "teacher.pt")
        teacher = load_weights(copy.deepcopy(network), teacher_path, map_location=device)
        network = StudentTeacherNet(network, teacher, embedding_dim)
    reduced = precision == "bfloat16" or (precision == "auto" and native_bfloat16(device))
    if backend == "openvino":
        hint = "bf16" if reduced else "f32"
        if isinstance(network, StudentTeacherNet):
            network.student = OpenVINONet(network.student, hint)
            network.teacher = OpenVINONet(network.teacher, hint)
        else:
            network = OpenVINONet(network, hint)
    base = network.student if isinstance(network, StudentTeacherNet) else network
    if test_time_flips and getattr(base, "foreground_head", True):
        network = FlippedHeadNet(network, int(base.spatial_dims), head_network=base)
    if reduced and backend == "torch":
        network = ReducedPrecisionNet(network)
    return network
