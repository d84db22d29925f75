"""
A second representation learned from the same sparse masks: an in-object distance map and affinities, from a
branch of their own beside the embeddings and the foreground head (the recipe ``shape_branch`` of
``research/learning_speed.py``; studied by ``python -m research.shape_seeds``).

A sparse mask defines both exactly, with no guess about the unlabeled region:

- **distance**: inside every annotated object, each pixel's distance to the object's own outline, divided by the
  object's largest (1 at its centre, small at its border). Two touching nuclei give two peaks with a valley between
  them, whatever the image shows at their contact.
- **affinities**: for a pixel pair ``(p, p + o)`` (one channel per offset ``o``) where at least one pixel lies in an
  annotated object: 1 when both lie in the same object, 0 otherwise. Across an annotated object's outline this says
  "different" whatever lies on the other side (background or an unannotated neighbour), so the seam between an
  annotated nucleus and its unannotated twin is supervised (CRAC, Liu et al. ICCV 2023).
- **consistency**: on the unlabeled region, where the momentum teacher's affinities are confident, the student's
  embeddings follow them (the affinity a pair's embedding distance implies, SPOCO's kernel ``phi``, against the
  teacher's 0 or 1): CRAC's cross-representation agreement in SPOCO's student / teacher frame.

Output layout of :class:`ShapeBranchUNet`: ``[embeddings (E), distance (1), affinities (len(offsets)),
foreground logit (1)]``: the head stays last, so the bundle's foreground code reads it unchanged, and
:func:`split_branch` gives back the ``[embeddings, head]`` tensor the bundle's losses and clustering take.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock
from scipy import ndimage

from spoco_bundle.losses import SpocoLoss
from spoco_bundle.losses.spoco import LossStatistics
from spoco_bundle.networks import EmbeddingUNet

__all__ = [
    "DEFAULT_OFFSETS",
    "ShapeBranchUNet",
    "ShapeBranchLoss",
    "branch_channels",
    "split_branch",
    "distance_target",
    "affinity_target",
    "shifted_pair",
]

# (axis-aligned) pair offsets per dimensionality: the face neighbours and a few pixels further (the contact of two
# small touching nuclei is a pixel or two wide; the longer range sees across it)
DEFAULT_OFFSETS = {
    2: [[0, 1], [1, 0], [0, 4], [4, 0]],
    3: [[0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 4], [0, 4, 0], [2, 0, 0]],
}


def branch_channels(offsets: Sequence[Sequence[int]]) -> int:
    """Channels of the branch: one distance map and one affinity per offset."""
    return 1 + len(offsets)


class ShapeBranchUNet(EmbeddingUNet):
    """
    :class:`~spoco_bundle.networks.EmbeddingUNet` with a branch of its own on the decoder's last feature map: two
    3x3 convolutions (norm and activation as the U-Net's) and a 1x1 convolution to the distance map and the
    affinities, so that they do not share the 1x1 layer with the embeddings and the head.

    Args:
        offsets: the affinities' pair offsets, ``spatial_dims`` integers each; default :data:`DEFAULT_OFFSETS`.
        branch_features: the branch's feature maps (default the U-Net's first level's).
        kwargs: :class:`~spoco_bundle.networks.EmbeddingUNet`'s arguments.

    Shapes:
        input ``(B, in_channels, *S)``; output ``(B, E + 1 + len(offsets) + 1, *S)``: embeddings, distance logit,
        affinity logits, foreground logit.
    """

    def __init__(
        self,
        *args,
        offsets: Sequence[Sequence[int]] | None = None,
        branch_features: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not self.foreground_head:
            raise ValueError("ShapeBranchUNet needs the foreground head (its channel stays last).")
        offsets = DEFAULT_OFFSETS[self.spatial_dims] if offsets is None else offsets
        self.offsets = _check_offsets(offsets, self.spatial_dims)
        top = int(self.filters[0])
        width = int(branch_features or top)
        norm = ("group", {"num_groups": math.gcd(8, width)})
        act = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})
        self.branch = nn.Sequential(
            UnetBasicBlock(self.spatial_dims, top, width, kernel_size=3, stride=1, norm_name=norm, act_name=act),
            UnetOutBlock(self.spatial_dims, width, branch_channels(self.offsets)),
        )
        self.to(memory_format=self.memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        features = self.skip_layers(x)
        out = self.output_block(features)
        branch = self.branch(features)
        if not self.training:  # the head's calibration, as EmbeddingUNet.forward
            half_c = (0.5 * self.fg_label_frequency).clamp(1e-6, 1 - 1e-6)
            shift = torch.log(half_c) - torch.log1p(-half_c) + torch.log(self.fg_positive_weight.clamp_min(1e-6))
            out = torch.cat([out[:, :-1], out[:, -1:] - shift.to(out.dtype)], dim=1)
        return torch.cat([out[:, :-1], branch, out[:, -1:]], dim=1).contiguous()


def _check_offsets(offsets: Sequence[Sequence[int]], spatial_dims: int) -> list[tuple[int, ...]]:
    checked = [tuple(int(v) for v in o) for o in offsets]
    if not checked or any(len(o) != spatial_dims or min(o) < 0 or not any(o) for o in checked):
        raise ValueError(
            f"offsets must be non-empty, non-negative, non-zero {spatial_dims}-vectors (one per pair), got {offsets}."
        )
    return checked


def split_branch(out: torch.Tensor, embedding_dim: int, n_branch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, E + K + 1, *S)`` -> (``[embeddings, head]`` ``(B, E + 1, *S)``, branch ``(B, K, *S)``); works on one
    item ``(C, *S)`` with ``dim`` 0 likewise (channel axis first)."""
    axis = 1 if out.ndim >= 4 and out.shape[1] == embedding_dim + n_branch + 1 else 0
    if out.shape[axis] != embedding_dim + n_branch + 1:
        raise ValueError(
            f"expected {embedding_dim} embedding, {n_branch} branch and 1 head channels, got shape {tuple(out.shape)}."
        )
    emb, branch, head = torch.split(out, [embedding_dim, n_branch, 1], dim=axis)
    return torch.cat([emb, head], dim=axis), branch


def shifted_pair(x: torch.Tensor, offset: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The values at ``p`` and at ``p + offset`` for every ``p`` whose partner lies inside: two views of ``x``
    ``(..., *S)`` cut to ``S - offset`` along the last ``len(offset)`` axes."""
    n = len(offset)
    lead = (slice(None),) * (x.ndim - n)
    here = lead + tuple(slice(0, x.shape[-n + i] - o) for i, o in enumerate(offset))
    there = lead + tuple(slice(o, None) for o in offset)
    return x[here], x[there]


def distance_target(labels: np.ndarray, sampling: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """
    The distance map of a sparse label image and where it is defined.

    Args:
        labels: ``S`` integers: 0 unlabeled, 1..K annotated objects, -1 annotated background.
        sampling: voxel size per axis (anisotropic volumes), default isotropic.

    Returns:
        ``(target, weight)``, float32 ``S``: inside an annotated object its pixels' distance to the object's outline
        (the distance to the nearest pixel of it that has a face neighbour of another label, plus one) divided by the
        largest in the object; 0 on annotated background. Weight 1 there, 0 on the unlabeled region and on objects
        that touch the image's edge (their outline, and so their centre, lies partly outside).
    """
    labels = np.asarray(labels)
    objects = labels > 0
    target = np.zeros(labels.shape, np.float32)
    weight = (labels < 0).astype(np.float32)
    if not objects.any():
        return target, weight
    outline = np.zeros(labels.shape, bool)
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        o = np.moveaxis(outline, axis, 0)
        differ = a[1:] != a[:-1]
        o[1:] |= differ & (a[1:] > 0)
        o[:-1] |= differ & (a[:-1] > 0)
    dist = ndimage.distance_transform_edt(~outline, sampling=sampling).astype(np.float32) + 1.0
    ids, inverse = np.unique(np.where(objects, labels, 0), return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    peak = np.asarray(ndimage.maximum(dist, inverse, np.arange(len(ids))), np.float32)
    edge = np.zeros(len(ids), bool)
    for axis in range(labels.ndim):
        for index in (0, -1):
            edge[np.unique(np.take(inverse, index, axis=axis))] = True
    edge[0] = False
    target[objects] = (dist / peak[inverse])[objects]
    weight[objects] = (~edge[inverse])[objects]
    return target, weight


def affinity_target(labels: torch.Tensor, offset: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Affinities of a sparse label batch for one offset.

    Args:
        labels: ``(B, *S)`` integers: 0 unlabeled, 1..K annotated objects, -1 annotated background.
        offset: the pair offset, one integer per spatial axis.

    Returns:
        ``(target, defined)`` of shape ``(B, *(S - offset))`` (the pairs whose partner lies inside): target 1 where
        both pixels lie in the same annotated object, else 0; defined where at least one pixel lies in an annotated
        object (a pair of unlabeled or background pixels says nothing about objects).
    """
    here, there = shifted_pair(labels, offset)
    defined = (here > 0) | (there > 0)
    return (here == there) & defined, defined


def _balanced_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with the positives' and the negatives' means weighted equally (rare seams are not
    drowned by object interiors); 0 where ``mask`` holds none."""
    loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    total = logits.new_zeros(())
    parts = 0
    for part in (mask & (target > 0.5), mask & (target <= 0.5)):
        if part.any():
            total = total + loss[part].mean()
            parts += 1
    return total / max(parts, 1)


class ShapeBranchLoss(nn.Module):
    """
    :class:`~spoco_bundle.losses.SpocoLoss` on the embeddings and the head, plus the branch's terms::

        SpocoLoss + distance_weight distance + affinity_weight affinity + agreement_weight agreement

    - ``distance``: binary cross-entropy of the distance logit against :func:`distance_target` (a soft target in
      [0, 1]) where it is defined.
    - ``affinity``: per offset, balanced binary cross-entropy of the affinity logit against
      :func:`affinity_target` where it is defined; mean over offsets.
    - ``agreement``: on pairs of unlabeled pixels where the teacher's affinity is confident (sigmoid above
      ``confidence`` or below ``1 - confidence``), the student's embeddings' implied affinity ``phi(|e_p - e_q|)``
      (SPOCO's kernel: ``phi(delta_v) = kernel_threshold``) against the teacher's 0 or 1 (balanced binary
      cross-entropy), so that unannotated touching neighbours the branch cuts are pushed apart in the embeddings.

    Args:
        embedding_dim: E.
        offsets: the network's offsets (:class:`ShapeBranchUNet`), default :data:`DEFAULT_OFFSETS` for the
            target's dimensionality.
        distance_weight, affinity_weight, agreement_weight: the terms' weights (0 skips one).
        confidence: the teacher's affinity needed for an agreement pair.
        sampling: voxel size per axis for the distance (anisotropic volumes).
        kwargs: :class:`~spoco_bundle.losses.SpocoLoss`'s arguments.

    Inputs:
        pred: the student's output ``(B, E + K + 1, *S)`` or ``(student, teacher)``.
        target: ``(B, 1, *S)`` or ``(B, *S)`` sparse labels (0 unlabeled, 1..K objects, -1 annotated background).
    """

    def __init__(
        self,
        embedding_dim: int = 16,
        offsets: Sequence[Sequence[int]] | None = None,
        distance_weight: float = 1.0,
        affinity_weight: float = 1.0,
        agreement_weight: float = 0.0,
        confidence: float = 0.9,
        sampling: Sequence[float] | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        self.spoco = SpocoLoss(embedding_dim=embedding_dim, **kwargs)
        self.embedding_dim = int(embedding_dim)
        self.offsets = None if offsets is None else [tuple(int(v) for v in o) for o in offsets]
        self.branch_weights = {
            "distance": float(distance_weight),
            "affinity": float(affinity_weight),
            "agreement": float(agreement_weight),
        }
        if not 0.5 < confidence < 1:
            raise ValueError(f"confidence must lie in (0.5, 1), got {confidence}.")
        self.confidence = float(confidence)
        self.sampling = None if sampling is None else [float(s) for s in sampling]
        # phi(d) = exp(-d^2 / (2 s^2)) with phi(delta_v) = kernel_threshold
        threshold = float(kwargs.get("kernel_threshold", 0.5))
        self._two_s2 = self.spoco.delta_v**2 / -math.log(threshold)
        self.statistics = LossStatistics()

    def __getattr__(self, name: str):
        # the training's handlers read and set the embedding loss's weights and foreground loss
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("spoco"), name)

    def forward(self, pred, target: torch.Tensor) -> torch.Tensor:
        student, teacher = pred if isinstance(pred, (tuple, list)) else (pred, None)
        spatial_dims = student.ndim - 2
        offsets = self.offsets or [tuple(o) for o in DEFAULT_OFFSETS[spatial_dims]]
        n_branch = branch_channels(offsets)
        student_main, branch = split_branch(student, self.embedding_dim, n_branch)
        teacher_main, teacher_branch = (
            (None, None) if teacher is None else split_branch(teacher, self.embedding_dim, n_branch)
        )
        total = self.spoco((student_main, teacher_main) if teacher is not None else student_main, target)
        labels = (target[:, 0] if target.ndim == student.ndim else target).long()
        terms = dict(self.spoco.statistics.terms)
        w = self.branch_weights
        if w["distance"]:
            tgt, wgt = zip(*(distance_target(item, self.sampling) for item in labels.cpu().numpy()))
            tgt_t = torch.as_tensor(np.stack(tgt), device=branch.device)
            wgt_t = torch.as_tensor(np.stack(wgt), device=branch.device)
            raw = F.binary_cross_entropy_with_logits(branch[:, 0].float(), tgt_t, reduction="none")
            value = (raw * wgt_t).sum() / wgt_t.sum().clamp_min(1.0)
            total = total + w["distance"] * value
            terms["distance"] = float(value.detach())
        if w["affinity"]:
            values = []
            for k, offset in enumerate(offsets):
                tgt, defined = affinity_target(labels, offset)
                logits = shifted_pair(branch[:, 1 + k].float(), offset)[0]
                values.append(_balanced_bce(logits, tgt, defined))
            value = torch.stack(values).mean()
            total = total + w["affinity"] * value
            terms["affinity"] = float(value.detach())
        if w["agreement"] and teacher_branch is not None:
            emb = student[:, : self.embedding_dim].float()
            values = []
            for k, offset in enumerate(offsets):
                prob = torch.sigmoid(shifted_pair(teacher_branch[:, 1 + k].float(), offset)[0]).detach()
                here, there = shifted_pair(labels, offset)
                sure = (here == 0) & (there == 0) & ((prob > self.confidence) | (prob < 1 - self.confidence))
                if not sure.any():
                    continue
                a, b = shifted_pair(emb, offset)
                phi = torch.exp(-((a - b) ** 2).sum(1) / self._two_s2).clamp(1e-6, 1 - 1e-6)
                values.append(_balanced_bce(torch.logit(phi), prob > 0.5, sure))
            value = torch.stack(values).mean() if values else total.new_zeros(())
            total = total + w["agreement"] * value
            terms["agreement"] = float(value.detach())
        terms["total"] = float(total.detach())
        self.statistics = LossStatistics(terms=terms, label_frequency=self.spoco.statistics.label_frequency)
        return total
