"""The foreground head's loss: which voxels teach it object and which background, under sparse labels.

The head is one extra output channel (a logit). Unlabeled voxels are not background, so the head is trained in one
of these regimes, chosen per image and by the loss's settings (:class:`ForegroundLoss`):

- positive-unlabeled (no annotated background): annotated objects against every unlabeled voxel, calibrated at
  inference by the label frequency ``c`` (:func:`labelled_foreground_probability`);
- supervised: annotated objects against annotated background (dense labels with ``background_label`` 0, a ring of
  background around each object, the objects' outer layer);
- painted strokes (``background_label`` other than 0): positive-unlabeled plus a term of their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from spoco_bundle.labels import ANNOTATED_BACKGROUND
from spoco_bundle.losses._core import _check_embeddings, _flatten

__all__ = [
    "AUTO_RING_MAX_OBJECTS",
    "LOGIT_BINS",
    "LOGIT_RANGE",
    "auto_foreground_ring",
    "object_rings",
    "object_surfaces",
    "labelled_foreground_probability",
    "foreground_histograms",
    "ForegroundLoss",
]

# ring "auto": a training with at most this many annotated objects gets the ring (docs/training.md)
AUTO_RING_MAX_OBJECTS = 80
# bins of the head's uncalibrated logit log(g / (1 - g)) for the Lee & Liu threshold: 0.1 wide, values beyond the
# ends count in the end bins
LOGIT_BINS = 240
LOGIT_RANGE = 12.0


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
    """The ring that ``"auto"`` chooses for a training with ``count`` annotated objects on a grid of ``voxel_size``
    (per spatial axis, any unit; ones where the files state none).

    At most :data:`AUTO_RING_MAX_OBJECTS` objects: a positive-unlabeled head memorises a few annotated objects and
    its calibrated threshold then misses most others, so the head trains on them against a ring of background
    instead: 2 voxels along the finest axis and as thick in physical length along the others, at least 1 voxel
    ([1, 2, 2] on GoNuclear's 0.28 x 0.13 x 0.13 um grid, the ring that was measured). More objects: 0 (off), the
    positive-unlabeled head.
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


def _positive_unlabeled_images(labels: torch.Tensor, strokes: bool) -> torch.Tensor:
    """``(B, 1)``: the images of ``(B, N)`` labels whose head trains positive-unlabeled (painted strokes keep an image
    positive-unlabeled; dense annotated background does not)."""
    if strokes:
        return torch.ones_like(labels[:, :1], dtype=torch.bool)
    return ~(labels < 0).any(1, keepdim=True)


def _bce(
    x: torch.Tensor,
    labels: torch.Tensor,
    positive_weight: float = 1.0,
    strokes: bool = False,
    ignore: torch.Tensor | None = None,
) -> torch.Tensor:
    """BCE on (B, N) foreground logits; see :class:`ForegroundLoss` for which voxels count as what; ``ignore``:
    voxels left out."""
    pos = labels > 0
    bce = F.binary_cross_entropy_with_logits(x, pos.to(x.dtype), reduction="none")
    if strokes:  # positive-unlabeled on every voxel, plus the painted strokes as certain negatives of their own
        bce = torch.where(pos, bce * positive_weight, bce)
        if ignore is None:
            loss = bce.mean()
        else:
            loss = torch.where(ignore, torch.zeros_like(bce), bce).sum() / (~ignore).sum().clamp(min=1)
        neg = labels < 0
        if bool(neg.any()):
            loss = loss + torch.where(neg, bce, torch.zeros_like(bce)).sum() / neg.sum()
        return loss
    has_bg = (labels < 0).any(1, keepdim=True)
    # annotated background: supervised on labelled voxels; none: positive-unlabeled, every voxel counts
    mask = torch.where(has_bg, labels != 0, torch.ones_like(labels, dtype=torch.bool))
    if ignore is not None:
        mask = mask & ~ignore
    count = mask.sum()
    if not bool(count > 0):
        return x.sum() * 0
    if positive_weight != 1.0:  # only the positive-unlabeled images' positives are up-weighted
        bce = torch.where(pos & ~has_bg, bce * positive_weight, bce)
    return torch.where(mask, bce, torch.zeros_like(bce)).sum() / count


def _calibration_voxels(
    logits: torch.Tensor, target: torch.Tensor, positive_weight: float, strokes: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, annotated, images)``: the head's ``(B, N)`` logits with the weighting undone (``- log w``), the
    annotated voxels of the positive-unlabeled images and, ``(B, 1)``, those images
    (:func:`_positive_unlabeled_images`)."""
    b = logits.shape[0]
    x = logits.detach().reshape(b, -1).float() - math.log(positive_weight)
    labels = target.reshape(b, -1).to(x.device)
    if labels.shape != x.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match.")
    images = _positive_unlabeled_images(labels, strokes)
    return x, (labels > 0) & images, images


def labelled_foreground_probability(
    logits: torch.Tensor, target: torch.Tensor, positive_weight: float = 1.0, strokes: bool = False
) -> tuple[float, int]:
    """Mean foreground probability over the annotated-object voxels of images *without* annotated background (of
    every image with ``strokes=True``: painted strokes leave the head positive-unlabeled, see :class:`ForegroundLoss`).

    For a head trained positive-unlabeled this estimates the label frequency ``c`` of Elkan & Noto (2008); the logits
    of a head trained with ``positive_weight`` w are first shifted by ``-log(w)``, which undoes the weighting.
    Returns ``(mean, count)``; ``(nan, 0)`` when no such voxel exists.

    Inputs: logits ``(B, 1, *S)`` or ``(B, *S)``; target ``(B, 1, *S)`` or ``(B, *S)``.
    """
    x, sel, _ = _calibration_voxels(logits, target, positive_weight, strokes)
    count = int(sel.sum())
    if count == 0:
        return float("nan"), 0
    return float(torch.sigmoid(x[sel]).mean()), count


def foreground_histograms(
    logits: torch.Tensor, target: torch.Tensor, positive_weight: float = 1.0, strokes: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Histograms (:data:`LOGIT_BINS` bins over +-:data:`LOGIT_RANGE`) of the head's logit ``log(g / (1 - g))``
    (weighting undone as in :func:`labelled_foreground_probability`) over the annotated-object voxels of the
    positive-unlabeled images and over every voxel of those images, float64 counts: what Lee & Liu's threshold is
    chosen from (:func:`spoco_bundle.handlers.lee_liu_threshold`).

    Inputs: logits ``(B, 1, *S)`` or ``(B, *S)``; target ``(B, 1, *S)`` or ``(B, *S)``.
    """
    x, annotated, images = _calibration_voxels(logits, target, positive_weight, strokes)

    def hist(v: torch.Tensor) -> torch.Tensor:
        v = v.clamp(-LOGIT_RANGE, LOGIT_RANGE)
        return torch.histc(v, LOGIT_BINS, -LOGIT_RANGE, LOGIT_RANGE).double()

    return hist(x[annotated]), hist(x[images.expand_as(x)])


def _ring(radius: int | Sequence[int]) -> int | tuple[int, ...]:
    ring = [radius] if isinstance(radius, (int, float)) else list(radius)
    if not ring or any(isinstance(v, bool) or int(v) < 0 or int(v) != v for v in ring):
        raise ValueError(f"foreground_ring must be whole numbers of voxels >= 0 or 'auto', got {radius!r}.")
    return int(ring[0]) if len(ring) == 1 else tuple(int(v) for v in ring)


class ForegroundLoss(nn.Module):
    """
    Binary cross-entropy (with logits) of the foreground head. Two regimes, chosen per image:

    - Images with annotated background (target < 0 somewhere): supervised. Annotated objects (target > 0) are
      foreground, annotated background is background, unlabeled voxels (0) are ignored.
    - Images without annotated background: positive-unlabeled. Annotated objects are positives and every unlabeled
      voxel counts as a negative. Unlabeled voxels are *not* assumed to be background: when the annotated objects
      are a random subset of all objects, such a head learns ``g(x) = c * P(foreground | x)``, where ``c`` is the
      fraction of foreground that was annotated (Elkan & Noto, KDD 2008). ``c`` is estimated in training as the
      mean of ``g`` over annotated voxels (:func:`labelled_foreground_probability`,
      :class:`~spoco_bundle.handlers.ForegroundCalibration`) and the network shifts its foreground logit by
      ``logit(c / 2)`` at inference, so that a probability above 0.5 means ``P(foreground | x) > 0.5``. Annotated
      voxels are a small minority (a few % of a patch with 10 % of the objects labelled), and with plain BCE the head
      stays nearly flat for thousands of iterations; ``positive_weight`` w multiplies their BCE, which multiplies
      the head's odds by w (logit + log w) without changing what it ranks; the network undoes the shift by ``log w``
      exactly at inference (its ``fg_positive_weight`` buffer).
    - Painted strokes (a ``background_label`` other than 0: the annotator painted a few strokes of background): every
      image is trained
      positive-unlabeled as above (unlabeled voxels are the negatives that put the object boundaries where they are:
      strokes lie far from objects, and a head trained on objects against strokes alone calls the whole
      neighbourhood of an object foreground), and the mean BCE over the stroke voxels is added as a term of its own,
      so the few painted voxels count as much as all the rest. ``c`` is estimated on every image.

    What the head sees as annotated background can be widened, which makes the head supervised:

    - ``surface`` r >= 1: the outer ``r`` voxels of every annotated object (:func:`object_surfaces`), so it trains on
      object *interiors* against the layer around them (unlabeled voxels say nothing): the map that
      ``--clustering boundary`` cuts along, for objects separated by membranes (EM, tissue).
    - ``ring`` r >= 1 (or one value per spatial axis): the unlabeled voxels within ``r`` voxels of an annotated object
      (:func:`object_rings`), so it trains on the annotated objects against the background right around them;
      patches with nothing annotated are left out, no label frequency is estimated. For objects on a background when
      only a few are annotated, where a positive-unlabeled head memorises them. Painted strokes join the ring.
      ``"auto"``: off until :meth:`set_ring` sets it when training starts
      (:class:`~spoco_bundle.handlers.ForegroundRegimeHandler`, :func:`auto_foreground_ring`).

    The loss is the weighted mean over all voxels that count, 0 (attached to the graph) if there are none.

    Args:
        positive_weight: weight of annotated-object voxels in positive-unlabeled images (>= 1).
        background_label: the labels' annotated background id (``background_label`` of the training; they reach
            the loss as -1): None or 0 (dense labels whose 0 is background) make the images with annotated background
            supervised; another id marks painted strokes (see above).
        surface: the objects' outer layer as annotated background, in voxels (0: off).
        ring: the background around the objects as annotated background, in voxels (0: off), or ``"auto"``.

    Inputs:
        logits: (B, 1, *S) foreground logits; target: (B, 1, *S) or (B, *S) integer labels.
    """

    def __init__(
        self,
        positive_weight: float = 10.0,
        background_label: int | None = None,
        surface: int = 0,
        ring: int | Sequence[int] | str = 0,
    ) -> None:
        super().__init__()
        if not math.isfinite(positive_weight) or positive_weight < 1.0:
            raise ValueError(f"foreground positive_weight must be a finite number >= 1, got {positive_weight}.")
        if isinstance(surface, bool) or int(surface) < 0 or int(surface) != surface:
            raise ValueError(f"foreground_surface must be a whole number of voxels >= 0, got {surface!r}.")
        self.positive_weight = float(positive_weight)
        self.strokes = background_label not in (None, 0)
        self.surface = int(surface)
        self.ring_auto = isinstance(ring, str)
        if self.ring_auto and ring != "auto":
            raise ValueError(f"foreground_ring must be whole numbers of voxels >= 0 or 'auto', got {ring!r}.")
        self.set_ring(0 if self.ring_auto else ring)

    def set_ring(self, radius: int | Sequence[int]) -> None:
        """Set the ring (see the class's Args); what ``"auto"`` decides when a training starts."""
        self.ring: int | tuple[int, ...] = _ring(radius)
        self.ring_on = max(self.ring if isinstance(self.ring, tuple) else (self.ring,)) > 0

    @property
    def head_strokes(self) -> bool:
        """Whether the strokes keep the images positive-unlabeled (not with a ring, which makes the head supervised:
        the strokes then join its annotated background)."""
        return self.strokes and not self.ring_on

    def head_labels(self, labels: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        """The head's ``(B, N)`` labels: with ``surface`` the objects' outer layer, with ``ring`` the unlabeled voxels
        around them become annotated background."""
        head = labels
        background = torch.full_like(labels, ANNOTATED_BACKGROUND)
        if self.surface:
            head = torch.where(object_surfaces(labels, spatial, self.surface), background, head)
        if self.ring_on:  # around the whole annotated objects, not around what the surface left of them
            head = torch.where(object_rings(labels, spatial, self.ring), background, head)
        return head

    def flat_forward(
        self, logits: torch.Tensor, labels: torch.Tensor, spatial: Sequence[int]
    ) -> tuple[torch.Tensor, tuple[float, int]]:
        """The loss on ``(B, N)`` logits and labels of spatial shape ``spatial``, and the label frequency estimate
        ``(mean, count)`` of :func:`labelled_foreground_probability` (``(nan, 0)`` with a ring: a supervised head)."""
        head = self.head_labels(labels, spatial)
        ignore = None
        if self.ring_on:
            # a patch with nothing annotated has no ring: it says nothing about the foreground (as a
            # positive-unlabeled patch it would teach that every object in it is background)
            ignore = ~(labels != 0).any(1, keepdim=True).expand_as(labels)
        loss = _bce(logits, head, self.positive_weight, self.head_strokes, ignore)
        if self.ring_on:
            # a patch inside an object (no unlabeled voxel, no ring) must not calibrate the head as if it were
            # positive-unlabeled: a ring head is supervised
            return loss, (float("nan"), 0)
        return loss, labelled_foreground_probability(logits, head, self.positive_weight, self.head_strokes)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = _check_embeddings(logits, "logits")
        if logits.shape[1] != 1:
            raise ValueError(f"logits must have 1 channel, got shape {tuple(logits.shape)}.")
        x, labels = _flatten(logits, target)
        return self.flat_forward(x[:, 0], labels, logits.shape[2:])[0]
