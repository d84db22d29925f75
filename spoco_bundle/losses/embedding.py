"""The embedding terms of SPOCO on the annotated objects: pull (variance), push (distance), mean-norm regulariser,
instance Dice and the push of unlabeled voxels away from the objects (each a MONAI ``_Loss``; :class:`SpocoLoss`
computes them together, sharing object means and distances)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import LossReduction, look_up_option
from torch.nn.modules.loss import _Loss

from spoco_bundle.losses._core import (
    _LOG_FLOOR,
    _anchor_voxel_sums,
    _compact_labels,
    _flatten,
    _flatten_target,
    _object_stats,
    _ObjectStats,
    _per_object_mean,
    _plain,
    _prepare,
    _reduce,
    _scatter_objects,
    _sqrt_eps,
    _uniform,
    _Voxels,
    kernel_scale,
)

__all__ = [
    "PullLoss",
    "PushLoss",
    "MeanNormRegularizer",
    "InstanceDiceLoss",
    "UnlabeledPushLoss",
    "sample_object_voxels",
    "embedding_terms",
]


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


def embedding_terms(
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
        return _reduce(embedding_terms(*_flatten(embeddings, target), delta_v=self.delta_v)["pull"], self.reduction)


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
        return _reduce(embedding_terms(*_flatten(embeddings, target), delta_d=self.delta_d)["push"], self.reduction)


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
        return _reduce(embedding_terms(*_flatten(embeddings, target), reg=True)["reg"], self.reduction)


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
        terms = embedding_terms(
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
        terms = embedding_terms(*_flatten(embeddings, target), unlabeled_delta=self.delta_d)
        return _reduce(terms["unlabeled"], self.reduction)
