"""The shared machinery of the SPOCO loss terms: input checks and label compaction, per-object statistics, and the
fused anchor-to-voxel reductions (private to :mod:`spoco_bundle.losses`).

Speed matters: the loss runs on every training step, on CPUs too.

- No Python loop over objects. Object sums are one scatter / index add; every anchor-to-voxel term (instance Dice and
  unlabeled push anchored at the object means, random-voxel instance anchors, consistency anchors) goes through
  :class:`_AnchorVoxelSums`, which gets the squared distances of all anchors to a block of voxels from one batched
  matmul (``|x - a|^2 = |x|^2 - 2 a.x + |a|^2`` on prepared columns ``[x, |x|^2, 1]``, see :class:`_Voxels`),
  reduces over the voxels on the fly and computes its own backward from per-element terms (kept, or recomputed
  block by block when they would not fit in ``_STORE_ELEMENTS``). Voxel blocks are cache-sized on CPUs.
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
from monai.utils import LossReduction
from torch.autograd.function import once_differentiable

# log of the smallest kernel value used (see module docstring)
_LOG_FLOOR = -40.0
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


def _gather_columns(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, C, N), idx (B, K) -> (B, K, C)."""
    return x.gather(2, idx.unsqueeze(1).expand(x.shape[0], x.shape[1], idx.shape[1])).transpose(1, 2)


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


def _reduce(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == LossReduction.MEAN.value:
        return per_image.mean()
    if reduction == LossReduction.SUM.value:
        return per_image.sum()
    return per_image
