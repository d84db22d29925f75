"""The block grid of a blockwise run: core blocks that tile the volume, each read with a halo around it, and the
faces shared by neighbouring blocks, where their labels are matched (:mod:`spoco_bundle.blockwise.stitch`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["BlockGrid", "receptive_field", "choose_block_shape", "window_halo", "window_tail"]


def _per_axis(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    values = (int(value),) * ndim if np.isscalar(value) else tuple(int(v) for v in value)  # type: ignore[arg-type]
    if len(values) != ndim:
        raise ValueError(f"{name} needs one value per spatial axis ({ndim}), got {value!r}.")
    return values


@dataclass(frozen=True)
class BlockGrid:
    """
    Core blocks of ``block_shape`` tiling ``shape`` (the last block of an axis may be smaller), each read with
    ``halo`` voxels of context before it and ``halo_hi`` after it along every axis (clipped at the volume's border).

    Two neighbours along axis ``k`` share a face at ``f``; both see the slab ``[f - halo, f + halo_hi)`` (their
    overlap), which :meth:`face_slab` cuts out of a block's labels, padded to the same fixed shape for both.

    Args:
        shape: the volume's spatial shape.
        block_shape: core block shape (one value, or one per axis).
        halo: context before a block (one value, or one per axis); at most the block size.
        halo_hi: context after a block (default: ``halo``): an asymmetric halo keeps a sliding window's positions
            those of the whole volume (:func:`window_halo`).
        tail: per axis, None or ``(t, a)``: the whole volume's last sliding window starts at ``t`` (moved back to
            end at the border, off the stride grid); a block whose core reaches past ``t`` is extended to the
            volume's end and back to at least ``a`` (the grid position before ``t``), so that it has that window
            and no window the whole volume lacks (:func:`window_tail`).

    Raises:
        ValueError: a non-positive block, a negative halo, no overlap or a halo above the block size along an axis
            that is split.
    """

    shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    halo: tuple[int, ...]
    halo_hi: tuple[int, ...]
    tail: tuple[tuple[int, int] | None, ...]

    def __init__(
        self,
        shape: Sequence[int],
        block_shape: int | Sequence[int],
        halo: int | Sequence[int],
        halo_hi: int | Sequence[int] | None = None,
        tail: Sequence[tuple[int, int] | None] | None = None,
    ) -> None:
        shape = tuple(int(s) for s in shape)
        block = _per_axis(block_shape, len(shape), "block_shape")
        lo = _per_axis(halo, len(shape), "halo")
        hi = lo if halo_hi is None else _per_axis(halo_hi, len(shape), "halo_hi")
        if min(block) < 1 or min(lo + hi) < 0:
            raise ValueError(f"block_shape must be positive and halo >= 0, got {block} and {lo}, {hi}.")
        block = tuple(min(b, s) for b, s in zip(block, shape))  # a block larger than the volume is the volume
        for ax, (s, b, h0, h1) in enumerate(zip(shape, block, lo, hi)):
            if s > b and not (0 < h0 + h1 and h0 <= b and h1 <= b):
                raise ValueError(
                    f"halo along axis {ax} must be in [1, block size {b}] when that axis is split into blocks "
                    f"(blocks are matched in their overlap), got {h0} before and {h1} after."
                )
        split = [s > b for s, b in zip(shape, block)]
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "block_shape", block)
        object.__setattr__(self, "halo", tuple(h if sp else 0 for h, sp in zip(lo, split)))
        object.__setattr__(self, "halo_hi", tuple(h if sp else 0 for h, sp in zip(hi, split)))
        tail = [None] * len(shape) if tail is None else [None if t is None else (int(t[0]), int(t[1])) for t in tail]
        object.__setattr__(self, "tail", tuple(t if sp else None for t, sp in zip(tail, split)))

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Number of blocks per axis."""
        return tuple(math.ceil(s / b) for s, b in zip(self.shape, self.block_shape))

    @property
    def n_blocks(self) -> int:
        return int(np.prod(self.grid_shape))

    def blocks(self) -> Iterator[tuple[int, ...]]:
        """Block indices in C order."""
        return itertools.product(*(range(n) for n in self.grid_shape))

    def core(self, index: Sequence[int]) -> tuple[slice, ...]:
        """The block's core in volume coordinates."""
        return tuple(slice(i * b, min(s, (i + 1) * b)) for i, b, s in zip(index, self.block_shape, self.shape))

    def extended(self, index: Sequence[int]) -> tuple[slice, ...]:
        """The core with its halo, clipped to the volume: what the block's segmentation sees."""
        ext = []
        for c, h0, h1, s, t in zip(self.core(index), self.halo, self.halo_hi, self.shape, self.tail):
            if t is not None and c.stop > t[0]:  # the whole volume's last window touches the core
                ext.append(slice(max(0, min(c.start - h0, t[1])), s))
            else:
                ext.append(slice(max(0, c.start - h0), min(s, c.stop + h1)))
        return tuple(ext)

    def core_in_extended(self, index: Sequence[int]) -> tuple[slice, ...]:
        """The core in the coordinates of the extended block."""
        return tuple(slice(c.start - e.start, c.stop - e.start) for c, e in zip(self.core(index), self.extended(index)))

    def faces(self) -> Iterator[tuple[int, tuple[int, ...], tuple[int, ...]]]:
        """``(axis, lower block, upper block)`` for every pair of face neighbours."""
        for index in self.blocks():
            for ax, n in enumerate(self.grid_shape):
                if index[ax] + 1 < n:
                    upper = tuple(i + (1 if a == ax else 0) for a, i in enumerate(index))
                    yield ax, tuple(index), upper

    def slab_shape(self, axis: int) -> tuple[int, ...]:
        """The fixed shape of a face slab along ``axis``: ``halo + halo_hi`` thick, the padded extended block across."""
        return tuple(
            h0 + h1 if a == axis else b + h0 + h1
            for a, (b, h0, h1) in enumerate(zip(self.block_shape, self.halo, self.halo_hi))
        )

    def face_slab(self, labels: np.ndarray, index: Sequence[int], axis: int, upper_face: bool) -> np.ndarray:
        """
        The block's extended labels in its overlap with the neighbour across its upper (``upper_face``) or lower face
        along ``axis``, zero-padded to :meth:`slab_shape` so that both neighbours' slabs line up voxel for voxel.

        Args:
            labels: the block's labels over :meth:`extended`.
        """
        ext, core = self.extended(index), self.core(index)
        h0, h1 = self.halo[axis], self.halo_hi[axis]
        face = core[axis].stop if upper_face else core[axis].start
        out = np.zeros(self.slab_shape(axis), dtype=labels.dtype)
        src, dst = [], []
        for a, e in enumerate(ext):
            if a == axis:  # [face - halo, face + halo_hi), clipped to what the block sees
                lo, hi = max(face - h0, e.start), min(face + h1, e.stop)
                src.append(slice(lo - e.start, hi - e.start))
                dst.append(slice(lo - (face - h0), hi - (face - h0)))
            else:  # across: where the extended block lies in the unclipped [core - halo, core + halo_hi)
                origin = core[a].start - self.halo[a]
                # (a block extended for the last window: only that nominal part, as its neighbour has it)
                start, stop = max(e.start, origin), min(e.stop, core[a].stop + self.halo_hi[a])
                src.append(slice(start - e.start, stop - e.start))
                dst.append(slice(start - origin, stop - origin))
        out[tuple(dst)] = labels[tuple(src)]
        return out


def receptive_field(network: object) -> tuple[int, ...] | None:
    """
    The receptive field per spatial axis of a U-Net with MONAI ``DynUNet``'s layout (two convolutions per level,
    ``kernel_size`` / ``strides`` attributes, transposed convolutions of kernel = stride): the span of input voxels
    that one output voxel depends on through its deepest path. None for another network (no check is then made).

    (Group normalisation makes every output depend a little on the whole window; the receptive field is what the
    convolutions see, the context a block's halo must give.)
    """
    kernels, strides = getattr(network, "kernel_size", None), getattr(network, "strides", None)
    ndim = getattr(network, "spatial_dims", None)
    if kernels is None or strides is None or ndim is None:
        return None
    kernels = [_per_axis(k, ndim, "kernel_size") for k in kernels]
    strides = [_per_axis(s, ndim, "strides") for s in strides]
    rf = np.ones(ndim, dtype=np.int64)
    jump = np.ones(ndim, dtype=np.int64)
    for k, s in zip(kernels, strides):  # encoder: a (strided) convolution, then one more at the new scale
        rf += (np.asarray(k) - 1) * jump
        jump *= np.asarray(s)
        rf += (np.asarray(k) - 1) * jump
    for k, s in zip(kernels[-2::-1], strides[:0:-1]):  # decoder: back up one scale, two convolutions there
        jump //= np.asarray(s)
        rf += 2 * (np.asarray(k) - 1) * jump
    return tuple(int(v) for v in rf)


def choose_block_shape(
    shape: Sequence[int], budget_voxels: int, halo: Sequence[int], minimum: Sequence[int] | None = None
) -> tuple[int, ...]:
    """
    The largest block (core) whose extended size (core + 2 halo along every split axis) holds at most
    ``budget_voxels`` voxels: the volume itself when it fits, else the longest axis shortened first (by a fifth at a
    time), so that blocks are as cube-like as the volume allows and thin axes stay whole.

    Args:
        shape: the volume's spatial shape.
        budget_voxels: voxels one block with its halo may have.
        halo: context per side and axis.
        minimum: smallest core per axis (the network's field of view); the result is never below it, even when that
            exceeds the budget.
    """
    shape = [int(s) for s in shape]
    minimum = [min(int(m), s) for m, s in zip(minimum or [1] * len(shape), shape)]
    block = list(shape)

    def extended() -> int:
        return math.prod(b + 2 * h if b < s else b for b, h, s in zip(block, halo, shape))

    while extended() > budget_voxels:
        candidates = [a for a in range(len(block)) if block[a] > max(minimum[a], 1)]
        if not candidates:
            break
        ax = max(candidates, key=lambda a: block[a])
        block[ax] = max(minimum[ax], 1, int(block[ax] * 0.8))
    return tuple(block)


def window_halo(
    roi: Sequence[int], overlap: float | Sequence[float], context: Sequence[int] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """
    Halos and block step for which a block's sliding windows are exactly the whole volume's (MONAI's
    ``SlidingWindowInferer`` places windows at multiples of its stride ``int(roi * (1 - overlap))`` from the start,
    the last one moved back to end at the border): with blocks of a multiple of the stride, a halo of
    ``stride * floor((roi - 1) / stride)`` before and ``roi - stride`` after a block (plus whole strides for more
    ``context``), every window that touches the block's core lies inside the block and on the volume's grid, and
    the block adds none of its own there. The network output in the core is then the whole-volume output.

    Args:
        roi: the window per spatial axis.
        overlap: the inferer's overlap (one value or one per axis).
        context: at least this many voxels of halo on both sides (e.g. for the clustering).

    Returns:
        ``(halo before, halo after, stride)`` per axis (and see :class:`BlockGrid`'s ``tail`` for the last window).
    """
    n = len(roi)
    overlaps = [float(overlap)] * n if np.isscalar(overlap) else [float(o) for o in overlap]  # type: ignore[arg-type]
    context = [0] * n if context is None else [int(c) for c in context]
    lo, hi, step = [], [], []
    for r, o, c in zip(roi, overlaps, context):
        stride = max(1, int(int(r) * (1 - o)))
        need_lo, need_hi = stride * ((int(r) - 1) // stride), max(0, int(r) - stride)
        lo.append(need_lo + stride * math.ceil(max(0, c - need_lo) / stride))
        hi.append(need_hi + stride * math.ceil(max(0, c - need_hi) / stride))
        step.append(stride)
    return tuple(lo), tuple(hi), tuple(step)


def window_tail(shape: Sequence[int], roi: Sequence[int], stride: Sequence[int]) -> tuple[tuple[int, int] | None, ...]:
    """Per axis, where the whole volume's last sliding window starts when it is off the stride grid (moved back to
    end at the border) and the grid position before it, else None: :class:`BlockGrid`'s ``tail``."""
    return tuple((s - r, (s - r) // t * t) if s > r and (s - r) % t else None for s, r, t in zip(shape, roi, stride))
