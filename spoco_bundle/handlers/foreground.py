"""The foreground head in training: what it trains on when the annotated objects are few (the regime), how its
weight rises at the start (the warm-up) and where its threshold lies (the calibration, stored in the network)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import CenterSpatialCrop, Compose, Randomizable, SpatialPadd

from spoco_bundle.losses import (
    AUTO_RING_MAX_OBJECTS,
    LOGIT_BINS,
    LOGIT_RANGE,
    auto_foreground_ring,
    foreground_histograms,
)
from spoco_bundle.networks import unwrap
from spoco_bundle.training_set import TrainingSet

__all__ = [
    "CALIBRATION_METHODS",
    "ForegroundRegimeHandler",
    "LossWeightWarmup",
    "ForegroundCalibration",
    "lee_liu_threshold",
    "deterministic_part",
    "calibration_method",
]

# how the head's threshold is found: see ForegroundCalibration
CALIBRATION_METHODS = ("auto", "label_frequency", "lee_liu_images")


def calibration_method(method: str, loss: torch.nn.Module | None) -> str:
    """The calibration ``method`` resolves to for the loss's foreground head: ``"auto"`` is ``"lee_liu_images"`` for
    a ring head (decided when training starts) and ``"label_frequency"`` otherwise; any other method is itself."""
    if method != "auto":
        return method
    return "lee_liu_images" if loss is not None and loss.foreground.ring_on else "label_frequency"


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks of a process group (``t`` itself outside one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


class ForegroundRegimeHandler:
    """
    Decide the foreground head's ring ``"auto"`` (:class:`~spoco_bundle.losses.ForegroundLoss`) when training starts,
    from the number of annotated objects the run sees and the training images' voxel size
    (:func:`~spoco_bundle.losses.auto_foreground_ring`): a ring of background around each object when they are few,
    so that the head learns them supervised, the positive-unlabeled head when they are many. No ring where every
    voxel is annotated (``background_label`` 0) or the head learns object surfaces. With a ring the network's
    ``fg_positive_weight`` is reset to 1 (a fine-tuned positive-unlabeled model's weight would otherwise stay). The
    decision is the handler's ``state_dict()``, kept in the resume checkpoint: a resumed run keeps it even if the
    labels changed since. Nothing happens when the loss's ring is not ``"auto"``. Attach it first: other handlers
    read the loss's settings.

    Args:
        training_set: what the run trains on (:class:`~spoco_bundle.training_set.TrainingSet`).
        loss: the :class:`~spoco_bundle.losses.SpocoLoss` (looked up as ``engine.loss_function`` when None).
        name: logger name.
    """

    state_key = "foreground_regime"  # its name in the resume checkpoint

    def __init__(self, training_set: TrainingSet, loss: torch.nn.Module | None = None, name: str = "spoco") -> None:
        self.training_set = training_set
        self.loss = loss
        self.logger = logging.getLogger(name)
        self.ring: int | tuple[int, ...] | None = None  # the decision (None: not taken, or not "auto")
        self._engine: Engine | None = None

    def state_dict(self) -> dict:
        return {"ring": list(self.ring) if isinstance(self.ring, tuple) else self.ring}

    def load_state_dict(self, state: dict) -> None:
        ring = state.get("ring")
        if ring is None:
            return
        self.ring = int(ring) if isinstance(ring, (int, float)) else tuple(int(v) for v in ring)
        if self._engine is not None:  # decided already at this run's start: the resumed run's decision wins
            self._apply(self._engine, "kept from the resumed run")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def _head(self, engine: Engine):
        loss = self.loss if self.loss is not None else engine.loss_function  # type: ignore[attr-defined]
        return loss.foreground

    def _apply(self, engine: Engine, why: str) -> None:
        self._head(engine).set_ring(self.ring)
        net = unwrap(engine.network)  # type: ignore[attr-defined]
        if self.ring and getattr(net, "fg_positive_weight", None) is not None:
            net.fg_positive_weight.fill_(1.0)
        ring = list(self.ring) if isinstance(self.ring, tuple) else self.ring
        self.logger.info(f"foreground_ring 'auto': {why}: {ring}")

    def __call__(self, engine: Engine) -> None:
        head = self._head(engine)
        if not head.ring_auto:
            return
        self._engine = engine
        if self.ring is not None:  # a resumed run's decision, loaded before this event
            self._apply(engine, "kept from the resumed run")
            return
        count = self.training_set.object_count
        many = "at most" if count <= AUTO_RING_MAX_OBJECTS else "more than"
        why = f"{count} annotated object(s), {many} {AUTO_RING_MAX_OBJECTS}"
        if self.training_set.background_label == 0:
            self.ring, why = 0, why + ", but every voxel is annotated (background_label 0)"
        elif head.surface:
            self.ring, why = 0, why + ", but the head learns object surfaces"
        else:
            grid = self.training_set.grid_voxel_size()
            self.ring = auto_foreground_ring(count, grid)
            why += f", voxel size {' x '.join(f'{v:.3g}' for v in grid)}"
        self._apply(engine, why)


class LossWeightWarmup:
    """
    Linear warm-up of one term's weight in :class:`~spoco_bundle.losses.SpocoLoss`: from ``min(start, target)`` at
    the first iteration to ``target`` (the weight the loss was built with) after ``iterations`` iterations, then
    constant; set before every iteration.

    Why: a large foreground weight helps long runs (the head decides what is an object), but from random weights
    the foreground BCE then dominates the first Adam steps and a run of a few iterations finds no objects. Warming
    the weight up keeps short runs as they are with the small weight. The schedule follows ``engine.state.iteration``,
    so a resumed run continues where it stopped; a target of 0 (term skipped) stays 0.

    Args:
        loss: the loss whose ``weights[term]`` is scheduled; its value at construction is the target.
        term: one of the loss's weights, e.g. ``"foreground"``.
        start: weight at the first iteration (capped at the target).
        iterations: length of the warm-up; 0 disables it.
    """

    def __init__(self, loss: torch.nn.Module, term: str = "foreground", start: float = 20.0, iterations: int = 0):
        weights = getattr(loss, "weights", None)
        if not isinstance(weights, dict) or term not in weights:
            raise ValueError(f"the loss has no weight named {term!r} (its weights: {sorted(weights or {})}).")
        if not math.isfinite(start) or start < 0:
            raise ValueError(f"start must be a finite number >= 0, got {start}.")
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}.")
        self.loss = loss
        self.term = term
        self.target = float(weights[term])
        self.start = min(float(start), self.target)
        self.iterations = int(iterations)

    def value(self, iteration: int) -> float:
        """The weight used by the ``iteration``-th iteration (1-based, as ``engine.state.iteration`` counts)."""
        if self.iterations == 0:
            return self.target
        t = min(max(iteration - 1, 0) / self.iterations, 1.0)
        return self.start + t * (self.target - self.start)

    def attach(self, engine: Engine) -> None:
        if self.iterations > 0:
            engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.loss.weights[self.term] = self.value(engine.state.iteration)  # type: ignore[index, union-attr]


def lee_liu_threshold(annotated: np.ndarray, everything: np.ndarray) -> float:
    """
    The threshold on a positive-unlabeled head's probability ``g`` that maximises ``r^2 / P(g > t)``, where ``r`` is
    the share of annotated-object voxels above it and ``P(g > t)`` the share of all voxels (Lee & Liu, ICML 2003).
    For annotated objects drawn at random from all objects, ``r`` is the recall on all of them and ``r^2 / P(g > t)``
    is ``precision * recall / P(foreground)``: the criterion ranks thresholds as precision x recall does, without
    the label frequency ``c`` (which a head that fits its annotated objects overstates).

    Args:
        annotated, everything: histograms over :data:`~spoco_bundle.losses.LOGIT_BINS` equal bins of the head's
            logit over +-:data:`~spoco_bundle.losses.LOGIT_RANGE` (:func:`~spoco_bundle.losses.foreground_histograms`).

    Returns:
        the threshold on ``g`` (a bin's lower edge, as a probability); 0.5 when either histogram is empty.
    """
    a, e = np.asarray(annotated, dtype=np.float64), np.asarray(everything, dtype=np.float64)
    if a.shape != e.shape or a.ndim != 1:
        raise ValueError(f"histograms must be 1-D of one length, got {a.shape} and {e.shape}.")
    if a.sum() <= 0 or e.sum() <= 0:
        return 0.5
    r = np.cumsum(a[::-1])[::-1] / a.sum()  # share at or above each bin's lower edge
    q = np.cumsum(e[::-1])[::-1] / e.sum()
    crit = np.where(q > 0, r**2 / np.maximum(q, 1e-300), 0.0)
    edges = np.linspace(-LOGIT_RANGE, LOGIT_RANGE, len(a) + 1)
    return float(1.0 / (1.0 + np.exp(-edges[int(np.argmax(crit))])))


def deterministic_part(preprocessing: Compose | Sequence[Callable]) -> Compose:
    """The steps of a training preprocessing before its first random transform (loading, checks, the sparse
    selection, resampling, normalisation), without padding: an item as training sees it, whole."""
    transforms = preprocessing.transforms if isinstance(preprocessing, Compose) else list(preprocessing)
    first_random = next((i for i, t in enumerate(transforms) if isinstance(t, Randomizable)), len(transforms))
    return Compose([t for t in transforms[:first_random] if not isinstance(t, SpatialPadd)])


def _centre_crop(image, label, max_voxels: int):
    """``image`` and ``label`` (channel first) cropped to their centre so that they hold at most ``max_voxels``
    voxels (the same factor on every spatial axis)."""
    shape = np.asarray(image.shape[1:])
    if np.prod(shape) <= max_voxels:
        return image, label
    f = (max_voxels / np.prod(shape)) ** (1.0 / len(shape))
    crop = CenterSpatialCrop(np.maximum(1, np.floor(shape * f)).astype(int).tolist())
    return crop(image), crop(label)


class ForegroundCalibration:
    """
    Where the foreground head's threshold lies, stored in the network's buffers ``fg_label_frequency`` (``c``) and
    ``fg_positive_weight`` (the loss's weight ``w`` of annotated voxels), which calibrate the head at inference
    (:class:`~spoco_bundle.networks.EmbeddingUNet`: its 0.5 lies at ``g = c / 2`` of the weighting-free head).

    ``method``:

    - ``"label_frequency"``: after every iteration the loss's estimate of the label frequency ``c`` of a
      positive-unlabeled head (Elkan & Noto, KDD 2008; ``statistics.label_frequency`` of
      :class:`~spoco_bundle.losses.SpocoLoss`) enters an exponential moving average (bias-corrected, so the first
      iterations count fully). Images with annotated background do not take part; if no image ever lacks it, ``c``
      stays 1. Under DDP the estimate pools every rank's voxels.
    - ``"lee_liu_images"``: as above during training, and before every validation (the evaluator's
      ``EPOCH_STARTED``, so that what validation scores and the best-model saver keeps is calibrated by it) or,
      without validation, when training completes: Lee & Liu's threshold (:func:`lee_liu_threshold`) on whole
      training images, stored as ``c = 2 t``. Training images are taken in a fixed shuffled order until
      ``max_voxels`` (an image larger than what is left is cropped to its centre), each as training sees it
      (:func:`deterministic_part` of ``preprocessing``): the annotated objects against every voxel of the images
      without annotated background. It has no patch sampling bias, but it takes the recall over the annotated
      objects for the recall over all objects: a head that memorised a few annotated objects makes it choose too
      high a threshold. It is the threshold of a ring head (trained on the annotated objects against the ring
      around them, whose plain 0.5 keeps only part of the unannotated objects).
    - ``"auto"``: ``"lee_liu_images"`` for a ring head (the loss's ``foreground.ring_on``, decided when training
      starts), ``"label_frequency"`` otherwise.

    The moving average's running sums are the handler's ``state_dict()``, kept in the resume checkpoint. Attach it
    before the final checkpoint saver.

    Args:
        method: see above.
        data: the training datalist (or a dataset holding it as ``data``), for ``"lee_liu_images"``.
        preprocessing: the training preprocessing, whose deterministic part loads an item.
        inferer: runs the network on a whole image (the validation inferer).
        evaluator: the run's validation engine, if any.
        loss: the :class:`~spoco_bundle.losses.SpocoLoss` (looked up as ``engine.loss_function`` when None).
        network: the student (looked up as ``engine.network`` when None); a DDP wrapper is unwrapped.
        momentum: weight of the old estimate in the moving average.
        max_voxels: voxels of training images (on the network's grid) the threshold pass looks at.
        name: logger name.
    """

    state_key = "fg_calibration"  # its name in the resume checkpoint

    def __init__(
        self,
        method: str = "auto",
        data=(),
        preprocessing: Compose | Sequence[Callable] = (),
        inferer: Callable | None = None,
        evaluator: Engine | None = None,
        loss: torch.nn.Module | None = None,
        network: torch.nn.Module | None = None,
        momentum: float = 0.98,
        max_voxels: int = 2**22,
        name: str = "spoco",
    ) -> None:
        if method not in CALIBRATION_METHODS:
            raise ValueError(f"foreground_calibration must be one of {CALIBRATION_METHODS}, got {method!r}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        if int(max_voxels) < 1:
            raise ValueError(f"max_voxels must be at least 1, got {max_voxels}.")
        self.method = method
        self.data = list(getattr(data, "data", data))
        self.preprocessing = preprocessing
        self.inferer = inferer
        self.evaluator = evaluator
        self.loss = loss
        self.network = network
        self.momentum = float(momentum)
        self.max_voxels = int(max_voxels)
        self.logger = logging.getLogger(name)
        self.threshold: float | None = None  # the last pass's t, for logs and tests
        self._sum = 0.0
        self._weight = 0.0
        self._trainer: Engine | None = None

    def state_dict(self) -> dict:
        return {"sum": self._sum, "weight": self._weight}

    def load_state_dict(self, state: dict) -> None:
        self._sum = float(state["sum"])
        self._weight = float(state["weight"])

    def method_in_use(self, loss: torch.nn.Module | None = None) -> str:
        """The method ``"auto"`` resolves to for the loss's head (:func:`calibration_method`)."""
        return calibration_method(self.method, loss if loss is not None else self._loss(self._trainer))

    def attach(self, engine: Engine) -> None:
        self._trainer = engine
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.EPOCH_STARTED, self.threshold_pass)
        else:
            engine.add_event_handler(Events.COMPLETED, self.threshold_pass)

    def _loss(self, engine: Engine | None):
        return self.loss if self.loss is not None else getattr(engine, "loss_function", None)

    def _network(self, engine: Engine | None):
        net = unwrap(self.network if self.network is not None else getattr(engine, "network", None))
        return net if getattr(net, "foreground_head", False) else None

    def update(self, engine: Engine) -> None:
        """The moving average of the label frequency, after an iteration."""
        net, loss = self._network(engine), self._loss(engine)
        if net is None or loss is None:
            return
        mean, count = loss.statistics.label_frequency
        # every rank's voxels count (DDP would otherwise broadcast rank 0's buffer alone)
        t = _all_reduce(torch.tensor([mean * count if count else 0.0, float(count)], dtype=torch.float64))
        count = int(t[1].item())
        if count == 0:
            return
        mean = float(t[0].item()) / count
        self._sum = self.momentum * self._sum + (1.0 - self.momentum) * mean
        self._weight = self.momentum * self._weight + (1.0 - self.momentum)
        net.fg_label_frequency.fill_(self._sum / self._weight)
        net.fg_positive_weight.fill_(loss.foreground.positive_weight)

    def threshold_pass(self, engine: Engine | None = None) -> None:
        """Lee & Liu's threshold on whole training images (``"lee_liu_images"``, or ``"auto"`` for a ring head)."""
        trainer = self._trainer if self._trainer is not None else engine
        net, loss = self._network(trainer), self._loss(trainer)
        if net is None or loss is None or self.method_in_use(loss) != "lee_liu_images":
            return
        buf = net.fg_label_frequency
        old = buf.clone()
        was_training = net.training
        net.eval()
        try:
            buf.fill_(1.0)  # at c = 1 the network's output is the head's logit with the weighting undone
            with torch.no_grad():
                # painted strokes keep every image in the pass (they do not make an image's head supervised here)
                hists, images = self._histograms(net, loss.foreground.strokes, buf.device)
        finally:
            buf.copy_(old)
            net.train(was_training)
        annotated, everything = _all_reduce(hists).cpu().numpy()
        if annotated.sum() <= 0 or everything.sum() <= 0:
            self.logger.info(
                "foreground threshold: no annotated objects in images without annotated background, c kept"
            )
            return
        self.threshold = lee_liu_threshold(annotated, everything)
        buf.fill_(2.0 * self.threshold)
        self.logger.info(
            f"foreground threshold (Lee & Liu on {images} training image(s)): t = {self.threshold:.3f}, "
            f"label frequency c {float(old):.3f} -> {float(buf):.3f}"
        )

    def _histograms(self, net: torch.nn.Module, strokes: bool, device: torch.device) -> tuple[torch.Tensor, int]:
        """The (annotated, all) histograms of the head's logit over whole training images, and how many."""
        transform = deterministic_part(self.preprocessing)
        hists = torch.zeros(2, LOGIT_BINS, dtype=torch.float64, device=device)
        order = np.random.default_rng(0).permutation(len(self.data))  # fixed, and not biased to the list's start
        left, images = self.max_voxels, 0
        for i in order:
            if left <= 0:
                break
            item = transform(dict(self.data[i]))
            image, label = _centre_crop(item["image"], item["label"], left)
            left -= int(np.prod(image.shape[1:]))
            images += 1
            out = self.inferer(torch.as_tensor(image)[None].float().to(device), net)
            h = foreground_histograms(out[:, -1:].float(), torch.as_tensor(label)[None].to(device), 1.0, strokes)
            hists += torch.stack([t.to(device) for t in h])
        return hists, images
