"""The consistency term of SPOCO: the student's embeddings of one view against the momentum teacher's of another,
anchored in the region outside the annotated objects, where the sparse labels say nothing."""

from __future__ import annotations

import torch
import torch.nn as nn

from spoco_bundle.losses._core import (
    _MAX_CANDIDATES,
    _AnchorVoxelSums,
    _check_embeddings,
    _flatten,
    _kernel_,
    _prepare,
    _uniform,
    _Voxels,
    kernel_scale,
)

__all__ = ["EmbeddingConsistencyLoss", "select_consistency_anchors"]


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
