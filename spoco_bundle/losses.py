"""Loss functions of SPOCO (Wolny et al., CVPR 2022): sparse object-level supervision with pixel embeddings.

Label convention of every loss here: an integer target where ``0`` is *unlabeled* (background plus every object
nobody annotated; never treated as background), ``1..K`` are the annotated objects of that image (gaps in the ids
are allowed) and negative values (``-1``) are annotated background.

Implementation notes (speed matters: the loss runs on every training step, on CPUs too):

- No Python loop over objects. Object sums are one scatter / index add; every anchor-to-voxel term (instance Dice and
  unlabeled push anchored at the object means, random-voxel instance anchors, consistency anchors) goes through
  :class:`_AnchorVoxelSums`, which gets the squared distances of all anchors to a block of voxels from one batched
  matmul (``|x - a|^2 = |x|^2 - 2 a.x + |a|^2`` on prepared columns ``[x, |x|^2, 1]``, see :class:`_Voxels`),
  reduces over the voxels on the fly and computes its own backward from per-element terms (kept, or recomputed
  block by block when they would not fit in ``_STORE_ELEMENTS``). Voxel blocks are cache-sized on CPUs.
- The consistency anchor search (sequential by definition) evaluates blocks of candidate anchors with one matmul
  and resolves the sequence on boolean masks, batched over images; the loss sums are taken during the search.
- Embeddings are centred (per image, detached mean) before the expansion above: distances are unchanged and the
  expansion stays accurate when the embeddings drift away from the origin. Half precision inputs are promoted to
  float32.
- Kernel values are floored at ``exp(-40)`` (~4e-18): far voxels would otherwise produce denormal numbers, which
  make ``exp`` and products on CPUs an order of magnitude slower; the effect on any loss value is < 1e-12.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.utils import LossReduction, look_up_option
from torch.autograd.function import once_differentiable
from torch.nn.modules.loss import _Loss

__all__ = [
    "AUTO_RING_MAX_OBJECTS",
    "auto_foreground_ring",
    "foreground_histograms",
    "object_contacts",
    "object_means",
    "object_rings",
    "object_surfaces",
    "kernel_scale",
    "sample_object_voxels",
    "select_consistency_anchors",
    "PullLoss",
    "PushLoss",
    "MeanNormRegularizer",
    "InstanceDiceLoss",
    "UnlabeledPushLoss",
    "EmbeddingConsistencyLoss",
    "ForegroundLoss",
    "SpocoLoss",
]

# log of the smallest kernel value used (see module docstring)
_LOG_FLOOR = -40.0
# foreground_ring "auto": a training with at most this many annotated objects gets the ring (docs/foreground_ring.md)
AUTO_RING_MAX_OBJECTS = 80
# elements of one (B, K, voxels) block of anchor-to-voxel work: cache-sized on CPUs (per thread), large on GPUs
_BLOCK_ELEMENTS_CPU = 2**19
_BLOCK_ELEMENTS_GPU = 2**25
# candidate anchors evaluated together by the consistency anchor search
_MAX_CANDIDATES = 32
# number of anchors the voxel blocks are sized for
_NOMINAL_ANCHORS = 32
# below this fraction of annotated voxels, object sums gather the annotated voxels instead of scattering all
_SPARSE_FRACTION = 0.15
# largest number of elements the anchor-to-voxel terms keep from the forward for the backward pass (else: recompute)
_STORE_ELEMENTS = 2**25


def _sqrt_eps(dtype: torch.dtype) -> float:
    """Lower clamp of squared distances before sqrt: keeps gradients finite at d = 0 and above rounding noise."""
    return float(torch.finfo(dtype).eps)


# ---------------------------------------------------------------------------------------------------------------------
# input handling
# ---------------------------------------------------------------------------------------------------------------------


def _plain(x: torch.Tensor) -> torch.Tensor:
    """Drop tensor subclasses such as ``MetaTensor`` (their per-op dispatch is slow, the metadata is not needed);
    ``as_subclass`` keeps the autograd graph."""
    return x if type(x) is torch.Tensor else x.as_subclass(torch.Tensor)


def _check_embeddings(embeddings: torch.Tensor, name: str = "embeddings") -> torch.Tensor:
    if not isinstance(embeddings, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(embeddings).__name__}.")
    if embeddings.ndim not in (4, 5):
        raise ValueError(f"{name} must have shape (B, C, H, W) or (B, C, D, H, W), got {tuple(embeddings.shape)}.")
    if not embeddings.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got {embeddings.dtype}.")
    embeddings = _plain(embeddings)
    # half precision (autocast) is too coarse for the distance expansion: compute in float32
    return embeddings.float() if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings


def _flatten_target(target: torch.Tensor, batch: int, spatial: Sequence[int], device: torch.device) -> torch.Tensor:
    """Validate ``target`` ((B, 1, *S) or (B, *S), integer) and return it as (B, N) int64 on ``device``."""
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"target must be a torch.Tensor, got {type(target).__name__}.")
    target = _plain(target)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(
            "target must be an integer label tensor (0 = unlabeled, 1..K = objects, -1 = annotated background), "
            f"got dtype {target.dtype}; cast it, e.g. with monai.transforms.CastToTyped(dtype=torch.int64)."
        )
    spatial = tuple(spatial)
    if target.ndim == len(spatial) + 2:
        if target.shape[1] != 1:
            raise ValueError(f"target with a channel dimension must have 1 channel, got shape {tuple(target.shape)}.")
        target = target[:, 0]
    if tuple(target.shape) != (batch, *spatial):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match the prediction: expected "
            f"{(batch, 1, *spatial)} or {(batch, *spatial)}."
        )
    return target.reshape(batch, -1).to(device=device, dtype=torch.long)


def _flatten(embeddings: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, E, *S) embeddings and labels -> (B, E, N) and (B, N) int64."""
    embeddings = _check_embeddings(embeddings)
    b, e = embeddings.shape[:2]
    labels = _flatten_target(target, b, embeddings.shape[2:], embeddings.device)
    return embeddings.reshape(b, e, -1), labels


def _compact_labels(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map the positive ids of every image to 1..K_b (keeping their order); non-positive labels become 0 / -1.

    Returns the relabelled (B, N) tensor and K = max_b K_b, so that the per-object work is proportional to the
    number of objects present whatever the raw ids are.
    """
    b, n = labels.shape
    kmax = int(labels.max()) if labels.numel() > 0 else 0
    negative = labels.clamp(min=-1, max=0)
    if kmax <= 0:
        return negative, 0
    positive = labels.clamp(min=0)
    if kmax < 4 * max(n, 1024):
        # one bincount over (image, id) rows; the running count of present ids is the compact id
        offsets = torch.arange(b, device=labels.device).unsqueeze(1) * (kmax + 1)
        counts = torch.bincount((positive + offsets).reshape(-1), minlength=b * (kmax + 1)).view(b, kmax + 1)
        present = counts > 0
        present[:, 0] = False
        new_ids = present.cumsum(1)
        num = int(new_ids[:, -1].max())
        compact = new_ids.gather(1, positive)
    else:  # huge raw ids: sort per image rather than bincount over all ids
        compact = torch.empty_like(labels)
        num = 0
        for i in range(b):
            values, inverse = torch.unique(positive[i], return_inverse=True)
            has_zero = int(values[0] == 0)
            compact[i] = inverse + (1 - has_zero)
            num = max(num, values.numel() - has_zero)
    return torch.where(labels > 0, compact, negative), num


def kernel_scale(delta_v: float, kernel_threshold: float) -> float:
    """``2 sigma^2`` of the Gaussian kernel ``phi(d) = exp(-d^2 / (2 sigma^2))``, chosen so that
    ``phi(delta_v) = kernel_threshold``."""
    if delta_v <= 0:
        raise ValueError(f"delta_v must be positive, got {delta_v}.")
    if not 0.0 < kernel_threshold < 1.0:
        raise ValueError(f"kernel_threshold must lie in (0, 1), got {kernel_threshold}.")
    return delta_v**2 / -math.log(kernel_threshold)


def _kernel_(neg_scaled_sq: torch.Tensor) -> torch.Tensor:
    """In place: ``exp(max(-d^2 / (2 sigma^2), _LOG_FLOOR))`` from ``-d^2 / (2 sigma^2)``."""
    return neg_scaled_sq.clamp_(min=_LOG_FLOOR).exp_()


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float64 draws in [0, 1); with a generator they are drawn on the generator's device and moved."""
    if generator is None:
        return torch.rand(shape, dtype=torch.float64, device=device)
    return torch.rand(shape, dtype=torch.float64, generator=generator, device=generator.device).to(device)


# ---------------------------------------------------------------------------------------------------------------------
# per-object statistics
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _ObjectStats:
    """Flattened embeddings with compacted labels (slot k-1 holds object k) and per-object statistics."""

    emb: torch.Tensor  # (B, E, N)
    labels: torch.Tensor  # (B, N) int64: 1..K objects, 0 unlabeled, -1 annotated background
    num: int  # K, largest number of objects of one image
    means: torch.Tensor  # (B, K, E), zero rows for absent slots
    counts: torch.Tensor  # (B, K) voxels per object (embedding dtype)
    present: torch.Tensor  # (B, K) bool
    n_obj: torch.Tensor  # (B,) objects per image (embedding dtype)


def _object_stats(emb: torch.Tensor, labels: torch.Tensor, num: int) -> _ObjectStats:
    b, e, n = emb.shape
    index = labels.clamp(min=0)
    counts = torch.zeros(b, num + 1, dtype=emb.dtype, device=emb.device)
    counts = counts.scatter_add_(1, index, torch.ones_like(labels, dtype=emb.dtype))[:, 1:]
    if counts.sum() < _SPARSE_FRACTION * b * n:
        # sparse labels: gather the annotated voxels (L, E) and add them up by (image, object)
        bi, vi = torch.nonzero(index, as_tuple=True)
        keys = bi * num + index[bi, vi] - 1
        sums = emb.new_zeros(b * num, e).index_add_(0, keys, emb[bi, :, vi]).view(b, num, e)
    else:
        # scatter along the voxel axis of (B, E, N): no transposed copy of the embeddings
        sums = emb.new_zeros(b, e, num + 1).scatter_add_(2, index.unsqueeze(1).expand(b, e, n), emb)
        sums = sums[:, :, 1:].transpose(1, 2)
    present = counts > 0
    means = sums / counts.clamp(min=1).unsqueeze(-1)
    return _ObjectStats(emb, labels, num, means, counts, present, present.sum(1).to(emb.dtype))


def object_means(embeddings: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Mean embedding of every annotated object, computed with one scatter / index add (no loop over objects).

    Args:
        embeddings: (B, E, H, W) or (B, E, D, H, W) float tensor.
        target: (B, 1, *S) or (B, *S) integer labels; ids > 0 are objects, 0 and negative ids are ignored.

    Returns:
        ``(means, counts, present)``: means (B, Kmax, E) where slot ``k - 1`` holds the mean of label ``k`` and
        Kmax is the largest id in the batch (zero rows for ids absent from an image), counts (B, Kmax) voxel counts
        (embedding dtype) and present (B, Kmax) bool.
    """
    emb, labels = _flatten(embeddings, target)
    num = max(int(labels.max()), 0) if labels.numel() > 0 else 0
    stats = _object_stats(emb, labels, num)
    return stats.means, stats.counts, stats.present


def _per_object_mean(values: torch.Tensor, stats: _ObjectStats) -> torch.Tensor:
    """Mean of (B, K) values over the present objects of every image; 0 for an image without objects."""
    return torch.where(stats.present, values, torch.zeros_like(values)).sum(1) / stats.n_obj.clamp(min=1)


def _scatter_objects(values: torch.Tensor, stats: _ObjectStats) -> torch.Tensor:
    """Sum (B, N) per-voxel values over the voxels of each object -> (B, K); other voxels are ignored."""
    index = stats.labels.clamp(min=0)
    values = torch.where(index > 0, values, torch.zeros_like(values))
    return values.new_zeros(index.shape[0], stats.num + 1).scatter_add_(1, index, values)[:, 1:]


# ---------------------------------------------------------------------------------------------------------------------
# fused anchor-to-voxel reductions
# ---------------------------------------------------------------------------------------------------------------------


def _block_size(b: int, k: int, n: int, device: torch.device) -> int:
    """Voxels per block so that a (b, k, block) tensor holds about the element budget (per CPU thread)."""
    if device.type == "cpu":
        budget = _BLOCK_ELEMENTS_CPU * max(1, torch.get_num_threads())
    else:
        budget = _BLOCK_ELEMENTS_GPU
    return max(1, min(n, budget // max(b * k, 1)))


def _bounds(n: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(s + step, n)) for s in range(0, n, step)]


@dataclass
class _Voxels:
    """Embeddings prepared for distance evaluations, computed once per forward and shared by all terms.

    The voxels are split into blocks ``bounds``; ``blocks[j]`` (B, E + 2, n_j) holds the detached, contiguous
    columns ``[x - c, |x - c|^2, 1]`` of block j, c (``center``, (B, E, 1)) being the detached mean over voxels, so
    that ``bmm(_augment_anchors(a - c), blocks[j])`` gives the squared distances ``|x_i - a_k|^2`` of the block in
    one matmul (centring keeps this expansion accurate far from the origin). The block width is sized for
    ``_NOMINAL_ANCHORS`` anchors: a (B, K, n_j) block of distances stays cache-sized on CPUs.
    """

    x: torch.Tensor  # (B, E, N), the tensor gradients are returned for
    center: torch.Tensor
    bounds: list[tuple[int, int]]
    blocks: list[torch.Tensor]

    def anchor_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Augmented anchor rows (B, K, E + 2) of the voxels ``idx`` (B, K) (detached)."""
        return _augment_anchors(_gather_columns(self.x.detach(), idx) - self.center.transpose(1, 2))


def _prepare(x: torch.Tensor) -> _Voxels:
    b, e, n = x.shape
    center = x.detach().mean(-1, keepdim=True)
    bounds = _bounds(n, _block_size(b, _NOMINAL_ANCHORS, n, x.device))
    blocks = []
    for s, t in bounds:
        blk = x.new_empty(b, e + 2, t - s)
        torch.sub(x.detach()[:, :, s:t], center, out=blk[:, :e])
        torch.sum(blk[:, :e].square(), 1, keepdim=True, out=blk[:, e : e + 1])
        blk[:, e + 1].fill_(1.0)
        blocks.append(blk)
    return _Voxels(x, center, bounds, blocks)


def _augment_anchors(a: torch.Tensor) -> torch.Tensor:
    """Centred anchors (B, K, E) -> rows (B, K, E + 2) ``[-2 a, 1, |a|^2]``."""
    return torch.cat([-2.0 * a, torch.ones_like(a[..., :1]), a.square().sum(-1, keepdim=True)], -1)


def _block_terms(
    d2: torch.Tensor, weights: torch.Tensor | None, scale: float | None, delta: float | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Sums over the voxels of one (B, K, n) block of squared distances (``d2`` is overwritten) and the per-element
    terms that make up dL/dD2: ``sq`` = phi^2 (sum: ``sq``) and ``ratio`` = w [delta - d]_+ / d (sum: ``hinge`` =
    sum w [delta - d]_+^2; -ratio is its derivative with respect to D2)."""
    sums, terms = {}, {}
    if scale is not None:
        terms["sq"] = _kernel_(d2 * (-2.0 / scale))  # phi^2 = exp(-2 D2 / scale)
        sums["sq"] = terms["sq"].sum(-1)
    if delta is not None:
        d = d2.clamp_(min=_sqrt_eps(d2.dtype)).sqrt_()
        h = torch.rsub(d, delta).clamp_(min=0)
        if weights is not None:
            h.mul_(weights)
        sums["hinge"] = torch.linalg.vector_norm(h, dim=-1).square()
        terms["ratio"] = h.div_(d)
    return sums, terms


class _AnchorVoxelSums(torch.autograd.Function):
    """
    Reductions over voxels of functions of the squared distances ``D2[b, k, i] = |x_i - a_k|^2`` between anchors
    and voxels, evaluated in blocks of voxels. The anchors come as centred rows ``_augment_anchors(a - c)``
    (B, K, E + 2) and the voxels as the blocks of a :class:`_Voxels`, so that a block of D2 is one matmul; ``x``
    (B, E, N) is the tensor whose gradient is returned. Outputs, in this order and only when enabled:

    - ``sq`` (B, K) = sum_i phi_ki^2 with ``phi = exp(-D2 / scale)``  (if ``scale``)
    - ``hinge`` (B, K) = sum_i w_i [delta - sqrt(D2)]_+^2 with a 0/1 voxel mask ``weights`` (B, N)  (if ``delta``)
    - ``own`` (B, N) = D2[b, own_index[b, i], i], 0 where own_index < 0  (if ``own_index`` is given)

    dL/dD2 is a per-anchor combination of per-element terms (phi^2, [delta - d]_+ / d). These are kept from the
    forward pass when they fit in ``_STORE_ELEMENTS``; otherwise the backward pass recomputes them block by block,
    so that memory stays O(B (K + E) N) for any number of anchors. With ``precomputed`` = (sums, terms) the
    caller has already evaluated the sums and the per-block terms (``terms[name][j]`` for the voxels of block j);
    ``sq`` and ``cross`` (= sum_i phi_ki r_ki for a fixed r, term phi r) are supported there.
    With ``anchor_index`` (B, K) the anchors are voxels of x and their gradient is added to those voxels;
    otherwise it is returned for ``rows`` (the anchors' own gradient path, e.g. through the object means).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        rows: torch.Tensor,
        x: torch.Tensor,
        vox: _Voxels,
        weights: torch.Tensor | None,
        own_index: torch.Tensor | None,
        scale: float | None,
        delta: float | None,
        precomputed: tuple[dict, dict] | None = None,
        anchor_index: torch.Tensor | None = None,
    ):
        b, k, _ = rows.shape
        n = x.shape[-1]
        if precomputed is not None:
            outs, stored = precomputed
        else:
            outs = {}
            if scale is not None:
                outs["sq"] = rows.new_zeros(b, k)
            if delta is not None:
                outs["hinge"] = rows.new_zeros(b, k)
            if own_index is not None:
                outs["own"] = rows.new_zeros(b, n)
            store = b * k * n * (int(scale is not None) + int(delta is not None)) <= _STORE_ELEMENTS
            stored = {}
            for (s, e), blk in zip(vox.bounds, vox.blocks):
                d2 = torch.bmm(rows, blk)
                if own_index is not None:
                    idx = own_index[:, s:e]
                    own = d2.gather(1, idx.clamp(min=0).unsqueeze(1)).squeeze(1)
                    outs["own"][:, s:e] = torch.where(idx >= 0, own, torch.zeros_like(own))
                sums, terms = _block_terms(d2, None if weights is None else weights[:, None, s:e], scale, delta)
                for name, value in sums.items():
                    outs[name] += value
                if store:
                    for name, value in terms.items():
                        stored.setdefault(name, []).append(value)
        flat = [t for name in stored for t in stored[name]]
        ctx.save_for_backward(rows, weights, own_index, anchor_index, *vox.blocks, *flat)
        ctx.scale, ctx.delta, ctx.names, ctx.stored, ctx.bounds = scale, delta, list(outs), list(stored), vox.bounds
        ctx.x_shape = x.shape
        return tuple(outs.values())

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        rows, weights, own_index, anchor_index, *flat = ctx.saved_tensors
        nb = len(ctx.bounds)
        blocks, flat = flat[:nb], flat[nb:]
        stored = {name: flat[i * nb : (i + 1) * nb] for i, name in enumerate(ctx.stored)}
        scale, delta = ctx.scale, ctx.delta
        g = dict(zip(ctx.names, grads))
        b, k, m = rows.shape
        e_dim = m - 2
        # dL/dD2 = sum over the terms of a per-anchor coefficient (B, K, 1) times the term (B, K, n)
        coef = {}
        if "sq" in g:
            coef["sq"] = (g["sq"] * (-2.0 / scale)).unsqueeze(-1)  # d(phi^2)/dD2 = -2 phi^2 / scale
        if "cross" in g:
            coef["cross"] = (g["cross"] * (-1.0 / scale)).unsqueeze(-1)  # d(phi r)/dD2 = -phi r / scale
        if "hinge" in g:
            coef["ratio"] = (-g["hinge"]).unsqueeze(-1)  # d([delta - d]_+^2)/dD2 = -[delta - d]_+ / d
        # D2 = rows . aug with aug = [xs, |xs|^2, 1], xs = x - c (c detached): dL/dx = T[:E] + 2 xs T[E] where
        # T = rows^T G is dL/daug
        acc = rows.new_zeros(b, k, m)  # sum over blocks of G aug^T
        grad_x = rows.new_empty(ctx.x_shape)
        rows_t = rows.transpose(1, 2)
        for j, (s, e) in enumerate(ctx.bounds):
            xa = blocks[j]
            if stored:
                terms = {name: parts[j] for name, parts in stored.items()}
            else:
                w = None if weights is None else weights[:, None, s:e]
                terms = _block_terms(torch.bmm(rows, xa), w, scale, delta)[1]
            grad = None
            for name, c in coef.items():
                grad = terms[name] * c if grad is None else grad.addcmul_(terms[name], c)
            if own_index is not None:
                idx = own_index[:, s:e]
                g_own = g["own"][:, s:e]
                src = torch.where(idx >= 0, g_own, torch.zeros_like(g_own))
                if grad is None:
                    grad = xa.new_zeros(b, k, e - s)
                grad.scatter_add_(1, idx.clamp(min=0).unsqueeze(1), src.unsqueeze(1))
            acc.baddbmm_(grad, xa.transpose(1, 2))
            t = torch.bmm(rows_t, grad)
            torch.addcmul(t[:, :e_dim], xa[:, :e_dim], t[:, e_dim : e_dim + 1], value=2.0, out=grad_x[:, :, s:e])
        if anchor_index is not None:
            # anchors are voxels of x: dL/da = -2 G xs^T + 2 a rowsum(G) with rows[..., :E] = -2 a and
            # acc[..., E + 1] = rowsum(G); add it to those voxels (cheaper than a dense gather backward)
            grad_a = acc[..., :e_dim].mul(-2.0).addcmul_(rows[..., :e_dim], acc[..., e_dim + 1 :], value=-1.0)
            idx = anchor_index.unsqueeze(1).expand(b, e_dim, anchor_index.shape[1])
            grad_x.scatter_add_(2, idx, grad_a.transpose(1, 2))
            return None, grad_x, None, None, None, None, None, None, None
        # D2 is linear in the rows: dL/drows = sum_i G aug^T; autograd takes it through _augment_anchors
        return acc, grad_x, None, None, None, None, None, None, None


def _anchor_voxel_sums(
    anchors: torch.Tensor | None,
    vox: _Voxels,
    weights: torch.Tensor | None = None,
    own_index: torch.Tensor | None = None,
    scale: float | None = None,
    delta: float | None = None,
    anchor_index: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Named outputs of :class:`_AnchorVoxelSums` for anchors (B, K, E) (not centred) or, with ``anchor_index``
    (B, K), for the voxels ``vox.x[b, :, anchor_index[b, k]]``."""
    names = (["ksq"] if scale is not None else []) + (["hinge"] if delta is not None else [])
    names += ["own"] if own_index is not None else []
    if anchor_index is not None:
        rows = vox.anchor_rows(anchor_index)
    else:
        rows = _augment_anchors(anchors - vox.center.transpose(1, 2))
    outs = _AnchorVoxelSums.apply(rows, vox.x, vox, weights, own_index, scale, delta, None, anchor_index)
    return dict(zip(names, outs))


# ---------------------------------------------------------------------------------------------------------------------
# per-image terms
# ---------------------------------------------------------------------------------------------------------------------


def _pull(stats: _ObjectStats, own_sq: torch.Tensor, delta_v: float) -> torch.Tensor:
    hinge = F.relu(own_sq.clamp(min=_sqrt_eps(own_sq.dtype)).sqrt() - delta_v).square()
    return _per_object_mean(_scatter_objects(hinge, stats) / stats.counts.clamp(min=1), stats)


def _push(stats: _ObjectStats, delta_d: float) -> torch.Tensor:
    means = stats.means
    pair = stats.present.unsqueeze(2) & stats.present.unsqueeze(1)
    pair &= ~torch.eye(stats.num, dtype=torch.bool, device=means.device)
    sq = (means.unsqueeze(2) - means.unsqueeze(1)).square().sum(-1)
    dist = torch.where(pair, sq, torch.ones_like(sq)).clamp(min=_sqrt_eps(sq.dtype)).sqrt()
    hinge = torch.where(pair, F.relu(2 * delta_d - dist).square(), torch.zeros_like(sq))
    return hinge.sum((1, 2)) / (stats.n_obj * (stats.n_obj - 1)).clamp(min=1)


def _mean_norm(stats: _ObjectStats) -> torch.Tensor:
    norms = stats.means.square().sum(-1).clamp(min=_sqrt_eps(stats.means.dtype)).sqrt()
    return _per_object_mean(norms, stats)


def _instance_dice(
    stats: _ObjectStats, ksq: torch.Tensor, own_sq: torch.Tensor, scale: float, eps: float
) -> torch.Tensor:
    """Per-image mean over objects of 1 - 2 sum(p y) / (sum p^2 + sum y^2 + eps); sum(p y) from own distances."""
    inter = _scatter_objects(torch.exp((own_sq * (-1.0 / scale)).clamp(min=_LOG_FLOOR)), stats)
    return _per_object_mean(1.0 - 2.0 * inter / (ksq + stats.counts + eps), stats)


def _random_object_voxels(labels: torch.Tensor, num: int, generator: torch.Generator | None) -> torch.Tensor:
    """(B, K) flat index of one uniformly drawn voxel of every object of compacted labels (0 for absent slots).

    Rule (reproducible with a generator): ``u = torch.rand(B, N, dtype=torch.float64)`` and every object takes its
    voxel with the largest ``u`` (scatter-max, no loop over objects).
    """
    b, n = labels.shape
    u = _uniform((b, n), generator, labels.device)
    index = labels.clamp(min=0)
    u = torch.where(index > 0, u, torch.full_like(u, -1.0))
    best = u.new_full((b, num + 1), -1.0).scatter_reduce_(1, index, u, "amax")
    winner = (u == best.gather(1, index)) & (index > 0)
    pos = torch.arange(n, device=labels.device).expand(b, n)
    pos = torch.where(winner, pos, torch.zeros_like(pos))
    return torch.zeros(b, num + 1, dtype=torch.long, device=labels.device).scatter_reduce_(1, index, pos, "amax")[:, 1:]


def sample_object_voxels(
    target: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Draw one voxel uniformly from every annotated object, vectorised (the anchors of ``InstanceDiceLoss`` with
    ``anchor="random"``): ``u = torch.rand(B, N, dtype=torch.float64, generator=generator)`` over the flattened
    spatial positions, and every object takes its voxel with the largest ``u``.

    Args:
        target: (B, 1, *S) or (B, *S) integer labels.
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        ``(index, present)``, both (B, K), K the largest number of objects of one image, slot ``j`` of image ``b``
        being its ``j``-th smallest positive id: flat voxel indices into ``S`` (0 where absent) and a bool mask.
    """
    target = _plain(target)
    spatial = target.shape[2:] if target.ndim in (4, 5) and target.shape[1] == 1 else target.shape[1:]
    labels, num = _compact_labels(_flatten_target(target, target.shape[0], spatial, target.device))
    present = torch.zeros(labels.shape[0], num + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, labels.clamp(min=0), True)
    return _random_object_voxels(labels, num, generator), present[:, 1:]


def _gather_columns(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, C, N), idx (B, K) -> (B, K, C)."""
    return x.gather(2, idx.unsqueeze(1).expand(x.shape[0], x.shape[1], idx.shape[1])).transpose(1, 2)


def _embedding_terms(
    emb: torch.Tensor,
    labels: torch.Tensor,
    delta_v: float | None = None,
    delta_d: float | None = None,
    reg: bool = False,
    scale: float | None = None,
    anchor: str = "mean",
    unlabeled_delta: float | None = None,
    eps: float = 1e-6,
    generator: torch.Generator | None = None,
    vox: _Voxels | None = None,
) -> dict[str, torch.Tensor]:
    """Per-image (B,) values of the requested per-object terms, sharing object means and distance evaluations.

    ``delta_v`` -> "pull", ``delta_d`` -> "push", ``reg`` -> "reg", ``scale`` -> "instance" (kernel 2 sigma^2, with
    ``anchor`` and Dice ``eps``), ``unlabeled_delta`` -> "unlabeled". ``emb`` (B, E, N), ``labels`` (B, N) raw ids;
    ``vox``: ``_prepare(emb)`` if already computed.
    """
    labels, num = _compact_labels(labels)
    if num > 0 and (scale is not None or unlabeled_delta is not None):
        vox = _prepare(emb) if vox is None else vox
    else:
        vox = None
    stats = _object_stats(emb, labels, num)
    b = emb.shape[0]
    out: dict[str, torch.Tensor] = {}
    if delta_d is not None:
        out["push"] = _push(stats, delta_d)
    if reg:
        out["reg"] = _mean_norm(stats)
    if delta_v is None and scale is None and unlabeled_delta is None:
        return out
    if num == 0:  # nothing to pull, select or push from; keep the graph so that backward() works
        zero = emb.new_zeros(b) + emb.sum() * 0
        for name, on in (("pull", delta_v), ("instance", scale), ("unlabeled", unlabeled_delta)):
            if on is not None:
                out[name] = zero
        return out

    own_index = labels - 1  # object slot of every voxel, -1 outside objects
    unlabeled = (labels <= 0).to(emb.dtype)

    mean_scale = scale if anchor == "mean" else None
    own_sq = None
    if mean_scale is not None or unlabeled_delta is not None:
        # one pass over the voxels for every term anchored at the object means
        sums = _anchor_voxel_sums(
            stats.means,
            vox,
            weights=unlabeled if unlabeled_delta is not None else None,
            own_index=own_index if (delta_v is not None or mean_scale is not None) else None,
            scale=mean_scale,
            delta=unlabeled_delta,
        )
        own_sq = sums.get("own")
        if mean_scale is not None:
            out["instance"] = _instance_dice(stats, sums["ksq"], own_sq, mean_scale, eps)
        if unlabeled_delta is not None:
            n_unl = unlabeled.sum(1)
            per_obj = sums["hinge"] / n_unl.clamp(min=1).unsqueeze(1)
            out["unlabeled"] = torch.where(n_unl > 0, _per_object_mean(per_obj, stats), torch.zeros_like(n_unl))
    if delta_v is not None:
        if own_sq is None:  # exact per-voxel difference to the own mean (no distance matrix needed)
            own_mean = stats.means.transpose(1, 2).gather(2, (labels - 1).clamp(min=0).unsqueeze(1).expand_as(emb))
            own_sq = (emb - own_mean).square().sum(1)
        out["pull"] = _pull(stats, own_sq, delta_v)
    if scale is not None and anchor == "random":
        idx = _random_object_voxels(labels, num, generator)  # the anchors are the embeddings of these voxels
        sums = _anchor_voxel_sums(None, vox, own_index=own_index, scale=scale, anchor_index=idx)
        out["instance"] = _instance_dice(stats, sums["ksq"], sums["own"], scale, eps)
    return out


def _reduce(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == LossReduction.MEAN.value:
        return per_image.mean()
    if reduction == LossReduction.SUM.value:
        return per_image.sum()
    return per_image


# ---------------------------------------------------------------------------------------------------------------------
# consistency
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _select_anchors(
    f: _Voxels,
    g: _Voxels,
    labels: torch.Tensor,
    delta_v: float,
    max_anchors: int,
    min_pool_fraction: float,
    generator: torch.Generator | None,
    scale: float | None = None,
    keep_terms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Anchor search of the consistency loss on prepared student / teacher embeddings; see
    :func:`select_consistency_anchors`. Returns (B, A) indices and validity (valid anchors first in every row) and,
    if ``scale`` is given, what the loss needs, evaluated during the search where the distances are at hand:
    ``sums`` (B, A) ``sq`` = sum_i q_i^2, ``cross`` = sum_i q_i r_i, ``tsq`` = sum_i r_i^2 and, if ``keep_terms``,
    the per-voxel-block terms q^2 and q r (``terms``) for the backward pass.

    Equivalent to taking, step by step, the highest-score voxel of the remaining pool, but the distances of a block
    of candidates (the highest scores of the current pool) are evaluated together with one matmul and the sequence
    is then resolved on boolean masks; a new block is drawn only when all candidates of a block have left the pool.
    """
    b, _, n = f.x.shape
    device = f.x.device
    pool = labels <= 0
    scores = _uniform((b, n), generator, device).masked_fill_(~pool, -1.0)
    size = pool.sum(1)
    count = torch.zeros(b, dtype=torch.long, device=device)
    min_size = min_pool_fraction * n
    factor = -1.0 / (1.0 if scale is None else scale)
    threshold = delta_v**2 * factor
    rows = torch.arange(b, device=device)
    chosen, accepted, blocks = [], [], []
    while True:
        active = (size >= min_size) & (size > 0) & (count < max_anchors)
        if not bool(active.any()):
            break
        c = min(int((max_anchors - count).max()), _MAX_CANDIDATES, n)
        cand = scores.topk(c, dim=1).indices  # (B, c), highest score first
        near = torch.empty(b, c, n, dtype=torch.bool, device=device)
        # rows scaled by -1 / scale give -D2 / scale directly: "within delta_v" is then arg > -delta_v^2 / scale
        f_rows, g_rows = f.anchor_rows(cand).mul_(factor), g.anchor_rows(cand).mul_(factor)
        if scale is not None:
            block = {"sums": {name: f_rows.new_zeros(b, c) for name in ("sq", "cross", "tsq")}, "sq": [], "cross": []}
            blocks.append(block)
        for (s, e), f_blk, g_blk in zip(f.bounds, f.blocks, g.blocks):
            arg_f = torch.bmm(f_rows, f_blk)
            arg_g = torch.bmm(g_rows, g_blk)
            torch.gt(torch.maximum(arg_f, arg_g), threshold, out=near[:, :, s:e])
            if scale is not None:
                q = _kernel_(arg_f)
                r = _kernel_(arg_g)
                qr = q * r
                block["sums"]["cross"] += qr.sum(-1)
                block["sums"]["tsq"] += torch.linalg.vector_norm(r, dim=-1).square()
                q = q.square_()
                block["sums"]["sq"] += q.sum(-1)
                if keep_terms:
                    block["sq"].append(q)
                    block["cross"].append(qr)
        near[rows.unsqueeze(1), torch.arange(c, device=device).unsqueeze(0), cand] = True  # the anchor itself
        near_u8 = near.view(torch.uint8)  # uint8 arithmetic: broadcasting boolean ops are slow on CPUs
        for j in range(c):
            take = active & pool.gather(1, cand[:, j : j + 1]).squeeze(1)
            removed = near_u8[:, j] * take.view(torch.uint8).unsqueeze(1)
            pool.logical_and_(removed.view(torch.bool).logical_not_())
            size = pool.view(torch.uint8).sum(1, dtype=torch.int32)
            count += take
            chosen.append(cand[:, j])
            accepted.append(take)
            active = active & (size >= min_size) & (size > 0) & (count < max_anchors)
        scores.masked_fill_(~pool, -1.0)
    if not chosen:
        empty = torch.zeros(b, 0, dtype=torch.long, device=device)
        return empty, empty.bool(), {}
    idx, valid = torch.stack(chosen, 1), torch.stack(accepted, 1)
    num = int(count.max())
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :num]
    extras: dict = {}
    if blocks:
        # rows of the accepted candidates; usually the first ``num`` candidates of the first block (views, no copy)
        in_order = bool((order == torch.arange(num, device=device)).all())

        def pick(parts: list[torch.Tensor]) -> torch.Tensor:
            value = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            return value[:, :num] if in_order else value[rows.unsqueeze(1), order]

        extras["sums"] = {name: pick([blk["sums"][name] for blk in blocks]) for name in ("sq", "cross", "tsq")}
        if keep_terms:
            extras["terms"] = {
                name: [pick([blk[name][j] for blk in blocks]) for j in range(len(f.bounds))] for name in ("sq", "cross")
            }
    return idx.gather(1, order), valid.gather(1, order), extras


def select_consistency_anchors(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    delta_v: float = 0.5,
    max_anchors: int = 20,
    min_pool_fraction: float = 0.05,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The anchors ``EmbeddingConsistencyLoss`` uses for the same arguments and generator state.

    Rule, independent per image: draw ``u = torch.rand(B, N, dtype=torch.float64, generator=generator)`` once
    (flattened spatial order). The pool starts as the voxels with label <= 0. While fewer than ``max_anchors``
    anchors were taken and the pool holds at least ``max(min_pool_fraction * N, 1)`` voxels, the pool voxel j with
    the largest ``u`` becomes the next anchor (a uniform draw from the pool), and j plus every voxel within
    ``delta_v`` of j in the student or in the teacher embeddings (``|x_i - x_j| < delta_v``) leave the pool.

    Args:
        student: (B, E, *S) student embeddings f.
        teacher: (B, E, *S) teacher embeddings g.
        target: (B, 1, *S) or (B, *S) integer labels.

    Returns:
        ``(index, valid)``: (B, A) flat voxel indices in drawing order and a (B, A) bool mask (valid entries first),
        A the largest number of anchors of one image.
    """
    f, labels = _flatten(student, target)
    g = _check_embeddings(teacher, "teacher").reshape(f.shape)
    f, g = _prepare(f.detach()), _prepare(g.detach())
    return _select_anchors(f, g, labels, delta_v, max_anchors, min_pool_fraction, generator)[:2]


def _consistency(
    f: torch.Tensor,
    g: torch.Tensor,
    labels: torch.Tensor,
    delta_v: float,
    scale: float,
    max_anchors: int,
    min_pool_fraction: float,
    generator: torch.Generator | None,
    eps: float,
    f_vox: _Voxels | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    f_vox = _prepare(f) if f_vox is None else f_vox
    g_vox = _prepare(g.detach())
    keep = torch.is_grad_enabled() and f.requires_grad
    idx, valid, ex = _select_anchors(
        f_vox, g_vox, labels, delta_v, max_anchors, min_pool_fraction, generator, scale, keep
    )
    if not bool(valid.any()):
        return f.sum() * 0, idx, valid
    sums = ex["sums"]
    if keep:
        # the sums were evaluated during the search; the autograd function only adds their backward pass, the
        # anchors being student voxels (gradient through ``idx``)
        pre = ({"sq": sums["sq"], "cross": sums["cross"]}, ex["terms"])
        ksq, cross = _AnchorVoxelSums.apply(f_vox.anchor_rows(idx), f, f_vox, None, None, scale, None, pre, idx)
    else:
        ksq, cross = sums["sq"], sums["cross"]
    loss = 1.0 - 2.0 * cross / (ksq + sums["tsq"] + eps)
    loss = torch.where(valid, loss, torch.zeros_like(loss)).sum() / valid.sum()
    return loss, idx, valid


# ---------------------------------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------------------------------


class PullLoss(_Loss):
    """
    Pull (variance) term of the discriminative loss: draws the voxels of every annotated object towards the object's
    mean embedding ``mu_k``, with a hinge at ``delta_v``. Per image::

        (1 / K) sum_k (1 / |S_k|) sum_{i in S_k} [ ||e_i - mu_k|| - delta_v ]_+^2

    and 0 for an image without annotated objects. Unlabeled (0) and background (< 0) voxels are ignored.

    Args:
        delta_v: pull margin.
        reduction: ``"mean"`` (batch mean, default), ``"sum"`` or ``"none"`` (one value per image, shape (B,)).

    Inputs:
        embeddings: (B, E, H, W) or (B, E, D, H, W) float; target: (B, 1, *S) or (B, *S) integer labels.
    """

    def __init__(self, delta_v: float = 0.5, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.delta_v = float(delta_v)

    def forward(self, embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _reduce(_embedding_terms(*_flatten(embeddings, target), delta_v=self.delta_v)["pull"], self.reduction)


class PushLoss(_Loss):
    """
    Push (distance) term of the discriminative loss between the means of the annotated objects of an image::

        1 / (K (K - 1)) sum_{k != l} [ 2 delta_d - ||mu_k - mu_l|| ]_+^2

    0 when an image has at most one object. Unlabeled (0) and background (< 0) voxels form no cluster here.

    Args:
        delta_d: push margin (means are pushed ``2 * delta_d`` apart).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (shape (B,)).

    Inputs:
        embeddings: (B, E, *S) float; target: (B, 1, *S) or (B, *S) integer labels.
    """

    def __init__(self, delta_d: float = 2.0, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.delta_d = float(delta_d)

    def forward(self, embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _reduce(_embedding_terms(*_flatten(embeddings, target), delta_d=self.delta_d)["push"], self.reduction)


class MeanNormRegularizer(_Loss):
    """
    Mean over the annotated objects of an image of ``||mu_k||`` (keeps the embeddings near the origin); 0 for an
    image without objects.

    Note: the reference implementation also counts label 0 (the unlabeled region, a mixture of background and
    unannotated objects) as a cluster here; this implementation uses annotated objects only.

    Args:
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (shape (B,)).

    Inputs:
        embeddings: (B, E, *S) float; target: (B, 1, *S) or (B, *S) integer labels.
    """

    def __init__(self, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)

    def forward(self, embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _reduce(_embedding_terms(*_flatten(embeddings, target), reg=True)["reg"], self.reduction)


class InstanceDiceLoss(_Loss):
    """
    Differentiable instance selection term of SPOCO. For every annotated object k an anchor ``a_k`` is taken, the
    soft mask ``p_k(i) = phi(||e_i - a_k||)`` is evaluated over the whole image (unlabeled and background voxels
    included; the object indicator y is 0 there) with the Gaussian kernel ``phi(d) = exp(-d^2 / (2 sigma^2))``,
    ``2 sigma^2 = delta_v^2 / (-ln t)`` so that ``phi(delta_v) = t``, and compared with the object mask::

        loss_k = 1 - 2 sum_i p_k(i) y_k(i) / (sum_i p_k(i)^2 + sum_i y_k(i)^2 + eps)

    The per-image loss is the mean of ``loss_k`` over the objects (the reference pools all objects into one Dice,
    which lets large objects dominate); 0 for an image without objects.

    Args:
        delta_v: pull margin, sets the kernel width.
        kernel_threshold: kernel value t at distance ``delta_v``, in (0, 1).
        anchor: ``"mean"`` (anchor = object mean, as the later reference code) or ``"random"`` (the embedding of one
            uniformly drawn voxel of the object, as in the paper; see :func:`sample_object_voxels`).
        eps: added to the Dice denominator.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (shape (B,)).
        generator: optional ``torch.Generator`` for the random anchors.

    Inputs:
        embeddings: (B, E, *S) float; target: (B, 1, *S) or (B, *S) integer labels.
    """

    def __init__(
        self,
        delta_v: float = 0.5,
        kernel_threshold: float = 0.5,
        anchor: str = "mean",
        eps: float = 1e-6,
        reduction: LossReduction | str = LossReduction.MEAN,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.delta_v = float(delta_v)
        self.kernel_threshold = float(kernel_threshold)
        self.scale = kernel_scale(self.delta_v, self.kernel_threshold)
        self.anchor = look_up_option(anchor, ("mean", "random"))
        self.eps = float(eps)
        self.generator = generator

    def forward(self, embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = _embedding_terms(
            *_flatten(embeddings, target), scale=self.scale, anchor=self.anchor, eps=self.eps, generator=self.generator
        )
        return _reduce(terms["instance"], self.reduction)


class UnlabeledPushLoss(_Loss):
    """
    Pushes the voxels that belong to no annotated object (label 0 and annotated background < 0) away from every
    object mean; valid under sparse labels because such a voxel never belongs to an annotated object. Per image::

        (1 / K) sum_k (1 / |U|) sum_{i in U} [ delta_d - ||e_i - mu_k|| ]_+^2

    with margin ``delta_d`` (not ``2 delta_d``); 0 when the image has no object or no such voxel.

    Args:
        delta_d: push margin.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (shape (B,)).

    Inputs:
        embeddings: (B, E, *S) float; target: (B, 1, *S) or (B, *S) integer labels.
    """

    def __init__(self, delta_d: float = 2.0, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.delta_d = float(delta_d)

    def forward(self, embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = _embedding_terms(*_flatten(embeddings, target), unlabeled_delta=self.delta_d)
        return _reduce(terms["unlabeled"], self.reduction)


class EmbeddingConsistencyLoss(nn.Module):
    """
    Self-supervised consistency between the student embeddings f and the (momentum) teacher embeddings g of a
    second view, anchored in the region outside the annotated objects (label <= 0).

    Up to ``max_anchors`` times per image, while the remaining pool is >= ``min_pool_fraction`` of the image, a
    random pool voxel j is drawn, ``q = phi(||f_i - f_j||)`` and ``r = phi(||g_i - g_j||)`` are evaluated over the
    whole image (kernel as in :class:`InstanceDiceLoss`) and every voxel within ``delta_v`` of j in f or in g leaves
    the pool. The loss is the mean over all anchors of all images of ``1 - 2 sum(q r) / (sum q^2 + sum r^2 + eps)``;
    r (and the teacher input) is detached, so the teacher never receives gradients. The draws follow
    :func:`select_consistency_anchors`; the anchors of the last call are kept in ``last_anchors`` ((B, A) indices,
    (B, A) validity).

    Returns ``0`` (attached to the student's graph) when no anchor can be drawn. Memory: two per-anchor, per-voxel
    terms are kept for the backward pass, 2 * B * max_anchors * N floats.

    Args:
        delta_v: kernel width and pool exclusion radius.
        kernel_threshold: kernel value at distance ``delta_v``, in (0, 1).
        max_anchors: maximal number of anchors per image.
        min_pool_fraction: stop drawing once the pool is smaller than this fraction of the image.
        eps: added to the Dice denominator.
        generator: optional ``torch.Generator`` for reproducible draws (any device; draws are moved).

    Inputs:
        student: (B, E, *S), teacher: (B, E, *S), target: (B, 1, *S) or (B, *S) integer labels.
    """

    def __init__(
        self,
        delta_v: float = 0.5,
        kernel_threshold: float = 0.5,
        max_anchors: int = 20,
        min_pool_fraction: float = 0.05,
        eps: float = 1e-6,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if max_anchors < 0:
            raise ValueError(f"max_anchors must be >= 0, got {max_anchors}.")
        if not 0.0 <= min_pool_fraction <= 1.0:
            raise ValueError(f"min_pool_fraction must lie in [0, 1], got {min_pool_fraction}.")
        self.delta_v = float(delta_v)
        self.scale = kernel_scale(self.delta_v, kernel_threshold)
        self.max_anchors = int(max_anchors)
        self.min_pool_fraction = float(min_pool_fraction)
        self.eps = float(eps)
        self.generator = generator
        self.last_anchors: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        f, labels = _flatten(student, target)
        teacher = _check_embeddings(teacher, "teacher")
        if teacher.shape != student.shape:
            raise ValueError(f"teacher shape {tuple(teacher.shape)} differs from student {tuple(student.shape)}.")
        return self._flat_forward(f, teacher.reshape(f.shape), labels)

    def _flat_forward(
        self, f: torch.Tensor, g: torch.Tensor, labels: torch.Tensor, f_vox: _Voxels | None = None
    ) -> torch.Tensor:
        loss, idx, valid = _consistency(
            f,
            g,
            labels,
            self.delta_v,
            self.scale,
            self.max_anchors,
            self.min_pool_fraction,
            self.generator,
            self.eps,
            f_vox,
        )
        self.last_anchors = (idx, valid)
        return loss


def held_out_objects(labels: torch.Tensor, holdout: bool) -> torch.Tensor | None:
    """Voxels of the calibration objects (ids above :data:`~spoco_bundle.transforms.CALIBRATION_ID_OFFSET` up to
    :data:`~spoco_bundle.transforms.PASTED_ID_OFFSET`, marked by :class:`~spoco_bundle.transforms.SparseInstanceLabel`
    ``calibration_holdout``); None when ``holdout`` is off."""
    if not holdout:
        return None
    from spoco_bundle.transforms import CALIBRATION_ID_OFFSET, PASTED_ID_OFFSET

    return (labels > CALIBRATION_ID_OFFSET) & (labels <= PASTED_ID_OFFSET)


def pasted_objects(labels: torch.Tensor) -> torch.Tensor | None:
    """Voxels of the copies :class:`~spoco_bundle.copy_paste.RandPasteObjects` pasted (ids above
    :data:`~spoco_bundle.transforms.PASTED_ID_OFFSET`); None when there are none."""
    from spoco_bundle.transforms import PASTED_ID_OFFSET

    pasted = labels > PASTED_ID_OFFSET
    return pasted if bool(pasted.any()) else None


def _label_windows(labels: torch.Tensor, spatial: Sequence[int], name: str):
    """``(B, 1, *S)`` ids of ``(B, N)`` labels, their object mask and ``window_max(x, r)``: the maximum of ``x`` over
    each voxel's ``(2r + 1)^d`` window (the patch border pads with -inf, so it never counts)."""
    spatial = tuple(int(s) for s in spatial)
    if len(spatial) not in (2, 3):
        raise ValueError(f"{name} needs 2 or 3 spatial dims, got {spatial}.")
    pool = F.max_pool2d if len(spatial) == 2 else F.max_pool3d
    ids = labels.reshape(labels.shape[0], 1, *spatial)

    def window_max(x: torch.Tensor, r: int) -> torch.Tensor:
        return pool(x, 2 * r + 1, stride=1, padding=r)

    return ids, ids > 0, window_max


def object_contacts(labels: torch.Tensor, spatial: Sequence[int], radius: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Where annotated objects meet, for the foreground head (the border weights of Ronneberger et al., 2015).

    Returns ``(contact, gap)``, boolean ``(B, N)``: ``contact`` are annotated-object voxels with a voxel of another
    annotated object in their ``3^d`` neighbourhood (where two objects touch directly), ``gap`` are the other
    voxels (unlabeled or annotated background) whose ``(2 radius + 1)^d`` neighbourhood holds two or more annotated
    objects (the narrow background between neighbours). A head that calls either foreground merges the two objects
    in its mask.

    Inputs: labels ``(B, N)`` integer (objects > 0), ``spatial`` the ``S`` with ``prod(S) = N`` (2 or 3 dims).
    """
    b = labels.shape[0]
    ids, pos, window_max = _label_windows(labels, spatial, "object_contacts")
    # float32 holds the ids exactly (calibration ids stay below 2^24)
    hi = torch.where(pos, ids, torch.zeros_like(ids)).float()
    lo = torch.where(pos, -ids, torch.full_like(ids, -(1 << 24))).float()

    def distinct(r: int) -> torch.Tensor:  # two or more object ids within the (2r + 1)^d window
        top, bottom = window_max(hi, r), -window_max(lo, r)
        return (top > 0) & (bottom < top)

    contact = pos & distinct(1)
    gap = ~pos & distinct(max(int(radius), 1))
    return contact.reshape(b, -1), gap.reshape(b, -1)


def object_surfaces(labels: torch.Tensor, spatial: Sequence[int], radius: int = 1) -> torch.Tensor:
    """Annotated-object voxels within ``radius`` voxels (Chebyshev) of a voxel with another label (another object,
    unlabeled or background; the patch border does not count): an object's outer layer, ``(B, N)`` boolean. Where
    objects tile the image (tissue), that layer is the membrane between cells.

    Inputs: labels ``(B, N)`` integer (objects > 0), ``spatial`` the ``S`` with ``prod(S) = N`` (2 or 3 dims).
    """
    ids, pos, window_max = _label_windows(labels, spatial, "object_surfaces")
    a = torch.where(pos, ids, torch.full_like(ids, -1)).float()  # float32 holds the ids exactly (< 2^24)
    top, bottom = window_max(a, int(radius)), -window_max(-a, int(radius))
    return (pos & ((top > a) | (bottom < a))).reshape(labels.shape[0], -1)


def auto_foreground_ring(count: int, voxel_size: Sequence[float]) -> int | tuple[int, ...]:
    """The ``foreground_ring`` that ``"auto"`` chooses for a training with ``count`` annotated objects on a grid of
    ``voxel_size`` (per spatial axis, any unit; ones where the files state none).

    At most :data:`AUTO_RING_MAX_OBJECTS` objects: a positive-unlabeled head memorises a few annotated objects and
    its calibrated threshold then misses most others, so the head trains on them against a ring of background
    instead: 2 voxels along the finest axis and as thick in physical length along the others, at least 1 voxel
    ([1, 2, 2] on GoNuclear's 0.28 x 0.13 x 0.13 um grid, the ring that was measured). More objects: 0 (off), the
    positive-unlabeled head (docs/foreground_ring.md).
    """
    v = [float(x) for x in voxel_size]
    if count < 1 or count > AUTO_RING_MAX_OBJECTS or not v or not all(math.isfinite(x) and x > 0 for x in v):
        return 0
    r = [max(1, int(round(2.0 * min(v) / x))) for x in v]
    return r[0] if len(set(r)) == 1 else tuple(r)


def object_rings(labels: torch.Tensor, spatial: Sequence[int], radius: int | Sequence[int] = 2) -> torch.Tensor:
    """Unlabeled voxels within ``radius`` voxels (Chebyshev, per axis when a sequence) of an annotated object: the
    ring of background around each object, ``(B, N)`` boolean. Where objects lie on a background (nuclei, cells on a
    dish) that ring is background next to an object except where an unannotated object touches it.

    Inputs: labels ``(B, N)`` integer (objects > 0, 0 unlabeled), ``spatial`` the ``S`` with ``prod(S) = N`` (2 or 3
    dims).
    """
    ids, pos, _ = _label_windows(labels, spatial, "object_rings")
    r = (int(radius),) * len(spatial) if isinstance(radius, (int, float)) else tuple(int(v) for v in radius)
    if len(r) != len(spatial) or min(r) < 0:
        raise ValueError(
            f"the ring radius (foreground_ring) must be one number or one per spatial axis ({len(spatial)}), whole "
            f"and >= 0, got {radius}."
        )
    pool = F.max_pool2d if len(spatial) == 2 else F.max_pool3d
    near = pool(pos.float(), tuple(2 * v + 1 for v in r), stride=1, padding=r) > 0
    return (near & (ids == 0)).reshape(labels.shape[0], -1)


def _foreground(
    x: torch.Tensor,
    labels: torch.Tensor,
    positive_weight: float = 1.0,
    strokes: bool = False,
    held: torch.Tensor | None = None,
    voxel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """BCE on (B, N) foreground logits; see :class:`ForegroundLoss` for which voxels count as what; ``held``: voxels
    left out (the objects that calibrate the head); ``voxel_weight``: (B, N) factors on each voxel's BCE (the
    averages still divide by the number of voxels that count)."""
    pos = labels > 0
    if strokes:  # positive-unlabeled on every voxel, plus the painted strokes as certain negatives of their own
        bce = F.binary_cross_entropy_with_logits(x, pos.to(x.dtype), reduction="none")
        bce = torch.where(pos, bce * positive_weight, bce)
        if voxel_weight is not None:
            bce = bce * voxel_weight
        if held is None:
            loss = bce.mean()
        else:
            loss = torch.where(held, torch.zeros_like(bce), bce).sum() / (~held).sum().clamp(min=1)
        neg = labels < 0
        if bool(neg.any()):
            loss = loss + torch.where(neg, bce, torch.zeros_like(bce)).sum() / neg.sum()
        return loss
    has_bg = (labels < 0).any(1, keepdim=True)
    # annotated background: supervised on labelled voxels; none: positive-unlabeled, every voxel counts
    mask = torch.where(has_bg, labels != 0, torch.ones_like(labels, dtype=torch.bool))
    if held is not None:
        mask = mask & ~held
    count = mask.sum()
    if not bool(count > 0):
        return x.sum() * 0
    bce = F.binary_cross_entropy_with_logits(x, pos.to(x.dtype), reduction="none")
    if positive_weight != 1.0:  # only the positive-unlabeled images' positives are up-weighted
        bce = torch.where(pos & ~has_bg, bce * positive_weight, bce)
    if voxel_weight is not None:
        bce = bce * voxel_weight
    return torch.where(mask, bce, torch.zeros_like(bce)).sum() / count


def labelled_foreground_probability(
    logits: torch.Tensor,
    target: torch.Tensor,
    positive_weight: float = 1.0,
    strokes: bool = False,
    holdout: bool = False,
) -> tuple[float, int]:
    """Mean foreground probability over the annotated-object voxels of images *without* annotated background (of
    every image with ``strokes=True``: painted strokes leave the head positive-unlabeled, see :class:`ForegroundLoss`).

    For a head trained positive-unlabeled (see :class:`ForegroundLoss`) this estimates the label frequency ``c``
    of Elkan & Noto (2008); the logits of a head trained with ``positive_weight`` w are first shifted by
    ``-log(w)``, which undoes the weighting. With ``holdout`` only the voxels of the calibration objects
    (:func:`held_out_objects`, which the head is not trained on) count: on the objects it fits, a head's mean
    overstates ``c``. Returns ``(mean, count)``; ``(nan, 0)`` when no such voxel exists.

    Inputs: logits ``(B, 1, *S)`` or ``(B, *S)``; target ``(B, 1, *S)`` or ``(B, *S)``.
    """
    x, sel, _ = _calibration_voxels(logits, target, positive_weight, strokes, holdout)
    count = int(sel.sum())
    if count == 0:
        return float("nan"), 0
    return float(torch.sigmoid(x[sel]).mean()), count


def _calibration_voxels(
    logits: torch.Tensor, target: torch.Tensor, positive_weight: float, strokes: bool, holdout: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, annotated, images)``: the head's ``(B, N)`` logits with the weighting undone (``- log w``), the
    annotated voxels that calibrate it (calibration objects only with ``holdout``) and, ``(B, 1)``, the images
    that take part (:func:`_positive_unlabeled_images`)."""
    b = logits.shape[0]
    x = logits.detach().reshape(b, -1).float() - math.log(positive_weight)
    labels = target.reshape(b, -1).to(x.device)
    if labels.shape != x.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match.")
    held = held_out_objects(labels, holdout)
    images = _positive_unlabeled_images(labels, strokes)
    return x, (labels > 0 if held is None else held) & images, images


def _positive_unlabeled_images(labels: torch.Tensor, strokes: bool) -> torch.Tensor:
    """``(B, 1)``: the images of ``(B, N)`` labels whose head trains positive-unlabeled (painted strokes keep an image
    positive-unlabeled; dense annotated background does not)."""
    if strokes:
        return torch.ones_like(labels[:, :1], dtype=torch.bool)
    return ~(labels < 0).any(1, keepdim=True)


# bins of the head's uncalibrated logit log(g / (1 - g)) for the Lee & Liu threshold: 0.1 wide, values beyond the
# ends count in the end bins
LOGIT_BINS = 240
LOGIT_RANGE = 12.0


def foreground_histograms(
    logits: torch.Tensor,
    target: torch.Tensor,
    positive_weight: float = 1.0,
    strokes: bool = False,
    holdout: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Histograms (:data:`LOGIT_BINS` bins over +-:data:`LOGIT_RANGE`) of the head's logit ``log(g / (1 - g))``
    (weighting undone as in :func:`labelled_foreground_probability`) over the annotated-object voxels that estimate
    the label frequency there (the same selection: calibration objects only with ``holdout``) and over every voxel
    of the same images, float64 counts. They choose the Lee & Liu threshold, see
    :func:`spoco_bundle.handlers.lee_liu_threshold`.

    Inputs: logits ``(B, 1, *S)`` or ``(B, *S)``; target ``(B, 1, *S)`` or ``(B, *S)``.
    """
    x, annotated, images = _calibration_voxels(logits, target, positive_weight, strokes, holdout)

    def hist(v: torch.Tensor) -> torch.Tensor:
        v = v.clamp(-LOGIT_RANGE, LOGIT_RANGE)
        return torch.histc(v, LOGIT_BINS, -LOGIT_RANGE, LOGIT_RANGE).double()

    return hist(x[annotated]), hist(x[images.expand_as(x)])


class ForegroundLoss(nn.Module):
    """
    Binary cross-entropy (with logits) of the optional foreground head. Two regimes, chosen per image:

    - Images with annotated background (target < 0 somewhere): supervised. Annotated objects (target > 0) are
      foreground, annotated background is background, unlabeled voxels (0) are ignored.
    - Images without annotated background: positive-unlabeled. Annotated objects are positives and every unlabeled
      voxel counts as a negative. Unlabeled voxels are *not* assumed to be background: when the annotated objects
      are a random subset of all objects, such a head learns ``g(x) = c * P(foreground | x)``, where ``c`` is the
      fraction of foreground that was annotated (Elkan & Noto, KDD 2008). ``c`` is estimated in training as the
      mean of ``g`` over annotated voxels (:func:`labelled_foreground_probability`,
      :class:`~spoco_bundle.handlers.ForegroundCalibrationHandler`) and the network shifts its foreground logit
      by ``logit(c / 2)`` at inference, so that a probability above 0.5 means ``P(foreground | x) > 0.5``.
      Annotated voxels are a small minority here (a few % of a patch with 10 % of the objects labelled), and with
      plain BCE the head stays nearly flat for thousands of iterations; ``positive_weight`` w multiplies their BCE,
      which multiplies the head's odds by w (logit + log w) without changing what it ranks, and the shift by
      ``log w`` is undone exactly at inference (the network's ``fg_positive_weight`` buffer).

    - With ``strokes=True`` (the annotator painted a few strokes of background, e.g. scribbles): every image is
      trained positive-unlabeled as above (unlabeled voxels are the negatives that put the object boundaries where
      they are: strokes lie far from objects, and a head trained on objects against strokes alone calls the whole
      neighbourhood of an object foreground), and the mean BCE over the stroke voxels is added as a term of its own,
      so the few painted voxels count as much as all the rest. ``c`` is estimated on every image.

    The loss is the weighted mean over all voxels that count, 0 (attached to the graph) if there are none.

    Args:
        positive_weight: weight of annotated-object voxels in positive-unlabeled images (>= 1).
        strokes: annotated background is a few painted strokes (see above).

    Inputs:
        logits: (B, 1, *S) foreground logits; target: (B, 1, *S) or (B, *S) integer labels.
    """

    def __init__(self, positive_weight: float = 10.0, strokes: bool = False) -> None:
        super().__init__()
        self.positive_weight = _check_positive_weight(positive_weight)
        self.strokes = bool(strokes)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = _check_embeddings(logits, "logits")
        if logits.shape[1] != 1:
            raise ValueError(f"logits must have 1 channel, got shape {tuple(logits.shape)}.")
        x, labels = _flatten(logits, target)
        return _foreground(x[:, 0], labels, self.positive_weight, self.strokes)


def _check_positive_weight(w: float) -> float:
    if not math.isfinite(w) or w < 1.0:
        raise ValueError(f"foreground positive_weight must be a finite number >= 1, got {w}.")
    return float(w)


class SpocoLoss(nn.Module):
    """
    Full SPOCO training loss::

        mean_b( alpha pull + beta push + gamma reg + instance_weight inst + unlabeled_weight unlabeled_push )
            + consistency_weight consistency + foreground_weight foreground

    (see :class:`PullLoss`, :class:`PushLoss`, :class:`MeanNormRegularizer`, :class:`InstanceDiceLoss`,
    :class:`UnlabeledPushLoss`, :class:`EmbeddingConsistencyLoss`, :class:`ForegroundLoss`). Object means and the
    voxel-to-mean distances are computed once and shared by the terms; a weight of 0 skips its term entirely.
    The detached values of the last call are kept in ``last_terms`` (floats; ``pull``, ``push``, ``reg``,
    ``instance``, ``unlabeled``, ``consistency``, ``foreground`` unweighted (0.0 when skipped) and ``total``).

    Args:
        embedding_dim: E, the number of embedding channels.
        delta_v: pull margin and kernel width.
        delta_d: push margin.
        alpha: weight of the pull term.
        beta: weight of the push term.
        gamma: weight of the mean-norm regulariser.
        instance_weight: weight of the instance Dice term.
        unlabeled_weight: weight of the unlabeled push term.
        consistency_weight: weight of the student/teacher consistency term.
        foreground_weight: weight of the foreground BCE (only with a foreground channel), see :class:`ForegroundLoss`.
        foreground_positive_weight: weight of annotated voxels in the positive-unlabeled foreground BCE, see
            :class:`ForegroundLoss`.
        foreground_strokes: annotated background is a few painted strokes (``background_label`` other than 0):
            positive-unlabeled foreground BCE plus a stroke term, see :class:`ForegroundLoss` (with
            ``foreground_ring``: supervised, the strokes join the ring).
        foreground_self_training: rho > 0: unlabeled voxels that the momentum teacher calls foreground with
            confidence (its foreground probability at least rho times its mean over the annotated objects of the same
            batch, i.e. a calibrated probability >= rho, see :class:`ForegroundLoss`) are left out of the foreground
            BCE's negatives: the head stops being taught that the unannotated objects it already recognises are
            background. 0 (default): off. Needs the teacher's foreground channel; positive-unlabeled images only.
        foreground_calibration: how the head's threshold is found in training (see
            :class:`~spoco_bundle.handlers.ForegroundCalibrationHandler`): ``"label_frequency"``, the mean of the
            head over annotated voxels (Elkan & Noto's ``c``, ``last_label_frequency``), or ``"lee_liu"``, the
            threshold that maximises recall^2 / P(predicted foreground) on the annotated voxels (Lee & Liu, ICML
            2003), from the histograms ``last_foreground_histograms`` (:func:`foreground_histograms`), or
            ``"lee_liu_images"``: ``c`` as ``"label_frequency"`` during training, replaced by the Lee & Liu threshold
            of whole training images before validation and at the end
            (:class:`~spoco_bundle.handlers.ForegroundThresholdPass`, which the config attaches), or ``"auto"``:
            ``"lee_liu_images"`` for a ring head (``foreground_ring``), ``"label_frequency"`` otherwise, decided
            again whenever :meth:`set_foreground_ring` sets the ring.
        foreground_contact_weight: w >= 1 turns on the head's contact weighting (:func:`object_contacts`, the border
            weights of the U-Net paper): annotated-object voxels that touch another annotated object become the
            head's negatives (its mask then keeps touching objects apart) and their BCE, and that of the unlabeled or
            background voxels between two annotated objects, is multiplied by w. 0 (default): off.
        foreground_contact_radius: how far (voxels) the background between two objects reaches, see
            :func:`object_contacts`.
        foreground_surface: r >= 1: the outer ``r`` voxels of every annotated object (:func:`object_surfaces`) are
            the head's annotated background, so it trains supervised on the annotated objects alone (unlabeled voxels
            say nothing): object *interiors* against the layer around them, the map that ``--clustering boundary``
            cuts along. For tissue where cells tile the image and that layer is the membrane between them (with
            ``background_label`` strokes the images stay positive-unlabeled, the layer joining the strokes).
            0 (default): off.
        foreground_ring: r >= 1 (or one value per spatial axis): the unlabeled voxels within ``r`` voxels of an
            annotated object (:func:`object_rings`) are the head's annotated background, so it trains supervised on
            the annotated objects against the background right around them (unlabeled voxels further out say
            nothing; patches with nothing annotated are left out of the head's loss; no label frequency is
            estimated). For objects on a real background when only a few objects are annotated, where a
            positive-unlabeled head memorises them. With ``foreground_strokes`` the strokes join the ring as the
            head's annotated background (supervised: the ring puts the boundaries where the unlabeled voxels
            otherwise would, see :class:`ForegroundLoss`). 0: off. ``"auto"``: off until :meth:`set_foreground_ring`
            sets it when training starts (:class:`~spoco_bundle.handlers.ForegroundRegimeHandler`, with the value of
            :func:`auto_foreground_ring` for the run's annotated objects).
        foreground_calibration_holdout: the calibration objects (ids marked by
            :class:`~spoco_bundle.transforms.SparseInstanceLabel` ``calibration_holdout``) are left out of the
            foreground BCE and the label frequency ``c`` is estimated on them alone (``last_label_frequency``);
            False: every object trains the head and ``c`` is its mean over them.
        kernel_threshold: kernel value at distance ``delta_v``.
        instance_anchor: ``"mean"`` or ``"random"``, see :class:`InstanceDiceLoss`.
        max_anchors: consistency anchors per image, see :class:`EmbeddingConsistencyLoss`.
        min_pool_fraction: see :class:`EmbeddingConsistencyLoss`.
        generator: optional ``torch.Generator`` for the random draws (consistency and random instance anchors).

    Inputs:
        pred: student output (B, C, *S), or a tuple/list ``(student, teacher)`` as returned by the two-view inferer
            (the teacher may be ``None``; without a teacher the consistency term is skipped). C is ``embedding_dim``
            or ``embedding_dim + 1`` (last channel = foreground logit, used by the foreground term only; the
            teacher's foreground channel is ignored).
        target: (B, 1, *S) or (B, *S) integer labels: 0 unlabeled, 1..K objects, -1 annotated background.
    """

    terms = ("pull", "push", "reg", "instance", "unlabeled", "consistency", "foreground")

    def __init__(
        self,
        embedding_dim: int = 16,
        delta_v: float = 0.5,
        delta_d: float = 2.0,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 0.001,
        instance_weight: float = 1.0,
        unlabeled_weight: float = 1.0,
        consistency_weight: float = 1.0,
        foreground_weight: float = 1.0,
        foreground_positive_weight: float = 10.0,
        foreground_strokes: bool = False,
        foreground_calibration_holdout: bool = False,
        foreground_self_training: float = 0.0,
        foreground_calibration: str = "label_frequency",
        foreground_contact_weight: float = 0.0,
        foreground_contact_radius: int = 2,
        foreground_surface: int = 0,
        foreground_ring: int | Sequence[int] | str = 0,
        kernel_threshold: float = 0.5,
        instance_anchor: str = "mean",
        max_anchors: int = 20,
        min_pool_fraction: float = 0.05,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}.")
        if delta_d <= 0:
            raise ValueError(f"delta_d must be positive, got {delta_d}.")
        self.embedding_dim = int(embedding_dim)
        self.delta_v = float(delta_v)
        self.delta_d = float(delta_d)
        self.weights = {
            "pull": float(alpha),
            "push": float(beta),
            "reg": float(gamma),
            "instance": float(instance_weight),
            "unlabeled": float(unlabeled_weight),
            "consistency": float(consistency_weight),
            "foreground": float(foreground_weight),
        }
        self.foreground_positive_weight = _check_positive_weight(foreground_positive_weight)
        self.foreground_strokes = bool(foreground_strokes)
        self.foreground_calibration_holdout = bool(foreground_calibration_holdout)
        if not 0.0 <= float(foreground_self_training) < math.inf:
            raise ValueError(f"foreground_self_training must be a number >= 0, got {foreground_self_training}.")
        self.foreground_self_training = float(foreground_self_training)
        if foreground_calibration not in ("label_frequency", "lee_liu", "lee_liu_images", "auto"):
            raise ValueError(
                "foreground_calibration must be 'label_frequency', 'lee_liu', 'lee_liu_images' or 'auto', got "
                f"{foreground_calibration!r}."
            )
        self.foreground_calibration_auto = foreground_calibration == "auto"
        self.foreground_calibration = foreground_calibration  # "auto": decided by set_foreground_ring below
        # "auto": decided when training starts (set_foreground_ring), off until then
        self.foreground_ring_auto = isinstance(foreground_ring, str)
        if self.foreground_ring_auto and foreground_ring != "auto":
            raise ValueError(
                f"foreground_ring must be whole numbers of voxels >= 0 or 'auto', got {foreground_ring!r}."
            )
        w = float(foreground_contact_weight)
        if not (w == 0.0 or 1.0 <= w < math.inf):
            raise ValueError(
                f"foreground_contact_weight must be 0 (off) or a number >= 1, got {foreground_contact_weight}."
            )
        if int(foreground_contact_radius) < 1:
            raise ValueError(f"foreground_contact_radius must be >= 1 voxel, got {foreground_contact_radius}.")
        self.foreground_contact_weight = w
        if int(foreground_surface) < 0 or int(foreground_surface) != foreground_surface:
            raise ValueError(f"foreground_surface must be a whole number of voxels >= 0, got {foreground_surface}.")
        self.foreground_surface = int(foreground_surface)
        self.set_foreground_ring(0 if self.foreground_ring_auto else foreground_ring)
        self.foreground_contact_radius = int(foreground_contact_radius)
        # (annotated, all) histograms of the head's logit in the last call, for "lee_liu"; None: not computed
        self.last_foreground_histograms: tuple[torch.Tensor, torch.Tensor] | None = None
        # share of the positive-unlabeled images' unlabeled voxels left out by self-training in the last call
        self.last_self_training_fraction = 0.0
        self.instance = InstanceDiceLoss(delta_v, kernel_threshold, instance_anchor, generator=generator)
        self.consistency = EmbeddingConsistencyLoss(
            delta_v, kernel_threshold, max_anchors, min_pool_fraction, generator=generator
        )
        self.last_terms: dict[str, float] = {}
        # (mean foreground probability over annotated voxels of images without annotated background, count)
        self.last_label_frequency: tuple[float, int] = (float("nan"), 0)

    def _split(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = _check_embeddings(x, name)
        c, e = x.shape[1], self.embedding_dim
        if c not in (e, e + 1):
            raise ValueError(
                f"{name} has {c} channels; expected embedding_dim={e}, or embedding_dim + 1={e + 1} with the last "
                "channel a foreground logit."
            )
        return x[:, :e], (x[:, e] if c == e + 1 else None)

    def _confident_unlabeled(self, teacher_logits: torch.Tensor, labels: torch.Tensor, held: torch.Tensor | None):
        """(B, N) unlabeled voxels of positive-unlabeled images whose teacher probability reaches
        ``foreground_self_training`` times the teacher's mean over the batch's annotated-object voxels (the label
        frequency ``c`` as the teacher sees it; the weight ``w`` shifts both alike, so it is undone first)."""
        p = torch.sigmoid(teacher_logits.float() - math.log(self.foreground_positive_weight))
        pu = _positive_unlabeled_images(labels, self._head_strokes)
        annotated = (labels > 0) & pu
        if held is not None:
            annotated = annotated & ~held
        unlabeled = (labels == 0) & pu
        if not bool(annotated.any()) or not bool(unlabeled.any()):
            self.last_self_training_fraction = 0.0
            return torch.zeros_like(unlabeled)
        c = p[annotated].mean()
        confident = unlabeled & (p >= self.foreground_self_training * c)
        self.last_self_training_fraction = float(confident.sum() / unlabeled.sum())
        return confident

    def set_foreground_ring(self, radius: int | Sequence[int]) -> None:
        """Set ``foreground_ring`` (see the class's Args); with ``foreground_calibration="auto"`` the calibration
        follows: ``"lee_liu_images"`` with a ring, ``"label_frequency"`` without. Called by
        :class:`~spoco_bundle.handlers.ForegroundRegimeHandler` when a training with ``"auto"`` starts."""
        ring = [radius] if isinstance(radius, (int, float)) else list(radius)
        if not ring or any(isinstance(v, bool) or int(v) < 0 or int(v) != v for v in ring):
            raise ValueError(f"foreground_ring must be whole numbers of voxels >= 0, got {radius}.")
        self.foreground_ring: int | tuple[int, ...] = int(ring[0]) if len(ring) == 1 else tuple(int(v) for v in ring)
        self._ring_on = max(int(v) for v in ring) > 0
        # the ring makes the head supervised: painted strokes join its annotated background instead of keeping the
        # images positive-unlabeled
        self._head_strokes = self.foreground_strokes and not self._ring_on
        if self.foreground_calibration_auto:
            self.foreground_calibration = "lee_liu_images" if self._ring_on else "label_frequency"

    def _head_labels(self, labels: torch.Tensor, spatial: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's ``(B, N)`` labels and voxel weights with ``foreground_surface`` (surface voxels become annotated
        background) and / or contact weighting (``foreground_contact_weight``: contact voxels become negatives,
        annotated background in supervised images and unlabeled in positive-unlabeled ones, which keeps each image
        in its regime; contact and gap voxels weigh w) and / or ``foreground_ring`` (the unlabeled voxels around the
        objects become annotated background). Unchanged labels and no weights when all are off."""
        w, r = self.foreground_contact_weight, self.foreground_surface
        if w == 0.0 and r == 0 and not self._ring_on:
            return labels, None
        head_labels = labels
        if r:  # annotated background: the images become supervised, their unlabeled voxels say nothing
            head_labels = torch.where(object_surfaces(labels, spatial, r), torch.full_like(labels, -1), labels)
        if self._ring_on:  # likewise, with the background around the objects as the annotated background
            rings = object_rings(labels, spatial, self.foreground_ring)
            head_labels = torch.where(rings, torch.full_like(labels, -1), head_labels)
        if not w:
            return head_labels, None
        supervised = ~_positive_unlabeled_images(head_labels, self._head_strokes)
        negative = torch.where(supervised, torch.full_like(labels, -1), torch.zeros_like(labels))
        contact, gap = object_contacts(labels, spatial, self.foreground_contact_radius)
        head_labels = torch.where(contact, negative, head_labels)
        weight = torch.where(contact | gap, torch.full(labels.shape, w, device=labels.device), torch.ones(()))
        return head_labels, weight

    def forward(self, pred: torch.Tensor | Sequence[torch.Tensor | None], target: torch.Tensor) -> torch.Tensor:
        if isinstance(pred, (tuple, list)):
            if len(pred) != 2:
                raise ValueError(f"pred must be a tensor or a (student, teacher) pair, got {len(pred)} items.")
            student, teacher = pred
        else:
            student, teacher = pred, None
        emb, fg = self._split(student, "student")
        b, e, *spatial = emb.shape
        teacher_fg = None
        if teacher is not None:
            teacher, teacher_fg = self._split(teacher, "teacher")
            if teacher.shape != emb.shape:
                raise ValueError(
                    f"teacher embeddings {tuple(teacher.shape)} do not match student embeddings {tuple(emb.shape)}."
                )
        labels = _flatten_target(target, b, spatial, emb.device)
        f = emb.reshape(b, e, -1)
        w = self.weights
        inst = self.instance
        # distance preparation shared by the instance / unlabeled terms and the consistency term
        needs = w["instance"] or w["unlabeled"] or (teacher is not None and w["consistency"])
        vox = _prepare(f) if needs else None
        per_image = _embedding_terms(
            f,
            labels,
            delta_v=self.delta_v if w["pull"] else None,
            delta_d=self.delta_d if w["push"] else None,
            reg=bool(w["reg"]),
            scale=inst.scale if w["instance"] else None,
            anchor=inst.anchor,
            unlabeled_delta=self.delta_d if w["unlabeled"] else None,
            eps=inst.eps,
            generator=inst.generator,
            vox=vox,
        )
        terms = {name: value.mean() for name, value in per_image.items()}
        if teacher is not None and w["consistency"]:
            terms["consistency"] = self.consistency._flat_forward(f, teacher.detach().reshape(f.shape), labels, vox)
        if fg is not None and w["foreground"]:
            pw = self.foreground_positive_weight
            strokes = self._head_strokes
            hold = self.foreground_calibration_holdout
            # pasted copies train the embeddings only: for the head they are neither objects nor unlabeled
            pasted = pasted_objects(labels)
            base = labels if pasted is None else torch.where(pasted, torch.zeros_like(labels), labels)
            head_labels, voxel_weight = self._head_labels(base, spatial)
            held = held_out_objects(head_labels, hold)
            if pasted is not None:
                held = pasted if held is None else held | pasted
            if self._ring_on:
                # a patch with nothing annotated has no ring: it says nothing about the foreground (as a
                # positive-unlabeled patch it would teach that every object in it is background); one with strokes
                # alone is supervised on them
                empty = ~(labels != 0).any(1, keepdim=True).expand_as(labels)
                held = empty if held is None else held | empty
            if self.foreground_self_training > 0 and teacher_fg is not None:
                confident = self._confident_unlabeled(teacher_fg.detach().reshape(b, -1), head_labels, held)
                held = confident if held is None else held | confident
            logits = fg.reshape(b, -1)
            terms["foreground"] = _foreground(logits, head_labels, pw, strokes, held, voxel_weight)
            if self._ring_on:
                # the ring makes every patch supervised or leaves it out; one that lies inside an object (no
                # unlabeled voxel, so no ring) must not calibrate the head as if it were positive-unlabeled
                self.last_label_frequency = (float("nan"), 0)
            else:
                self.last_label_frequency = labelled_foreground_probability(logits, head_labels, pw, strokes, hold)
            if self.foreground_calibration == "lee_liu":
                self.last_foreground_histograms = foreground_histograms(logits, head_labels, pw, strokes, hold)

        total = None
        for name, value in terms.items():
            total = w[name] * value if total is None else total + w[name] * value
        if total is None:  # every term skipped: a zero that still allows backward()
            total = f.sum() * 0
        names = list(terms)
        values = torch.stack([terms[k].detach() for k in names] + [total.detach()]).tolist()
        self.last_terms = dict.fromkeys(self.terms, 0.0)
        self.last_terms.update(zip(names + ["total"], values))
        if self.foreground_self_training > 0:
            self.last_terms["self_trained"] = self.last_self_training_fraction
        return total
