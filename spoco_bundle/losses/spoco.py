"""The full SPOCO training loss: the embedding terms on the annotated objects, the consistency term on the unlabeled
region and the foreground head's term, computed in one pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from spoco_bundle.losses._core import _check_embeddings, _flatten_target, _prepare
from spoco_bundle.losses.consistency import EmbeddingConsistencyLoss
from spoco_bundle.losses.embedding import InstanceDiceLoss, embedding_terms
from spoco_bundle.losses.foreground import ForegroundLoss

__all__ = ["LossStatistics", "SpocoLoss"]


@dataclass
class LossStatistics:
    """What the last call of :class:`SpocoLoss` measured, for the training's handlers (the loss log, the foreground
    head's calibration).

    Attributes:
        terms: each term's unweighted value (0.0 when skipped) and ``"total"``, the weighted sum.
        label_frequency: ``(mean, count)``: the head's mean probability over the annotated voxels of the
            positive-unlabeled images and their number (:func:`~spoco_bundle.losses.labelled_foreground_probability`);
            ``(nan, 0)`` when there are none (a supervised head, or no head).
    """

    terms: dict[str, float] = field(default_factory=dict)
    label_frequency: tuple[float, int] = (float("nan"), 0)


class SpocoLoss(nn.Module):
    """
    Full SPOCO training loss::

        mean_b( alpha pull + beta push + gamma reg + instance_weight inst + unlabeled_weight unlabeled_push )
            + consistency_weight consistency + foreground_weight foreground

    (see :class:`~spoco_bundle.losses.PullLoss`, :class:`~spoco_bundle.losses.PushLoss`,
    :class:`~spoco_bundle.losses.MeanNormRegularizer`, :class:`~spoco_bundle.losses.InstanceDiceLoss`,
    :class:`~spoco_bundle.losses.UnlabeledPushLoss`, :class:`~spoco_bundle.losses.EmbeddingConsistencyLoss`,
    :class:`~spoco_bundle.losses.ForegroundLoss`). Object means and the voxel-to-mean distances are computed once
    and shared by the terms; a weight of 0 skips its term entirely. What the last call measured is in
    ``statistics`` (:class:`LossStatistics`).

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
        foreground_weight: weight of the foreground head's term (only with a foreground channel).
        foreground: the head's loss and what it trains on (:class:`~spoco_bundle.losses.ForegroundLoss`); default:
            positive-unlabeled with its default weighting.
        kernel_threshold: kernel value at distance ``delta_v``.
        instance_anchor: ``"mean"`` or ``"random"``, see :class:`~spoco_bundle.losses.InstanceDiceLoss`.
        max_anchors: consistency anchors per image, see :class:`~spoco_bundle.losses.EmbeddingConsistencyLoss`.
        min_pool_fraction: see :class:`~spoco_bundle.losses.EmbeddingConsistencyLoss`.
        generator: optional ``torch.Generator`` for the random draws (consistency and random instance anchors).

    Inputs:
        pred: student output (B, C, *S), or a tuple/list ``(student, teacher)`` as returned by the two-view inferer
            (the teacher may be ``None``; without a teacher the consistency term is skipped). C is ``embedding_dim``
            or ``embedding_dim + 1`` (last channel = foreground logit, used by the foreground term only; the
            teacher's foreground channel is ignored).
        target: (B, 1, *S) or (B, *S) integer labels: 0 unlabeled, 1..K objects, -1 annotated background.
    """

    TERMS = ("pull", "push", "reg", "instance", "unlabeled", "consistency", "foreground")

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
        foreground: ForegroundLoss | None = None,
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
        self.foreground = foreground if foreground is not None else ForegroundLoss()
        self.instance = InstanceDiceLoss(delta_v, kernel_threshold, instance_anchor, generator=generator)
        self.consistency = EmbeddingConsistencyLoss(
            delta_v, kernel_threshold, max_anchors, min_pool_fraction, generator=generator
        )
        self.statistics = LossStatistics()

    def _split(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = _check_embeddings(x, name)
        c, e = x.shape[1], self.embedding_dim
        if c not in (e, e + 1):
            raise ValueError(
                f"{name} has {c} channels; expected embedding_dim={e}, or embedding_dim + 1={e + 1} with the last "
                "channel a foreground logit."
            )
        return x[:, :e], (x[:, e] if c == e + 1 else None)

    def _pair(self, pred: torch.Tensor | Sequence[torch.Tensor | None]) -> tuple:
        """(student embeddings, student logit or None, teacher embeddings or None)."""
        if isinstance(pred, (tuple, list)):
            if len(pred) != 2:
                raise ValueError(f"pred must be a tensor or a (student, teacher) pair, got {len(pred)} items.")
            student, teacher = pred
        else:
            student, teacher = pred, None
        emb, fg = self._split(student, "student")
        if teacher is not None:
            teacher = self._split(teacher, "teacher")[0]
            if teacher.shape != emb.shape:
                raise ValueError(
                    f"teacher embeddings {tuple(teacher.shape)} do not match student embeddings {tuple(emb.shape)}."
                )
        return emb, fg, teacher

    def forward(self, pred: torch.Tensor | Sequence[torch.Tensor | None], target: torch.Tensor) -> torch.Tensor:
        emb, fg, teacher = self._pair(pred)
        b, e, *spatial = emb.shape
        labels = _flatten_target(target, b, spatial, emb.device)
        f = emb.reshape(b, e, -1)
        w = self.weights
        inst = self.instance
        # distance preparation shared by the instance / unlabeled terms and the consistency term
        needs = w["instance"] or w["unlabeled"] or (teacher is not None and w["consistency"])
        vox = _prepare(f) if needs else None
        per_image = embedding_terms(
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
        label_frequency = (float("nan"), 0)
        if fg is not None and w["foreground"]:
            terms["foreground"], label_frequency = self.foreground.flat_forward(fg.reshape(b, -1), labels, spatial)

        total = None
        for name, value in terms.items():
            total = w[name] * value if total is None else total + w[name] * value
        if total is None:  # every term skipped: a zero that still allows backward()
            total = f.sum() * 0
        names = list(terms)
        values = torch.stack([terms[k].detach() for k in names] + [total.detach()]).tolist()
        self.statistics = LossStatistics(
            terms={**dict.fromkeys(self.TERMS, 0.0), **dict(zip(names + ["total"], values))},
            label_frequency=label_frequency,
        )
        return total
