"""Ignite handlers for SPOCO training: momentum teacher update, foreground calibration, the training objects' size,
progress bar, loss logging, time budget, the run's length, the resume checkpoint, the model card beside
``model.pt``, a TensorBoard preview of the instances, and the log file."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.handlers.tensorboard_handlers import TensorBoardHandler

from spoco_bundle.distributed import unwrap

# max_epochs of a run that only its time budget ends (train.json sets it when time_limit_s is given)
UNLIMITED_EPOCHS = 10**9

__all__ = [
    "MomentumTeacherHandler",
    "TrainingProgressBar",
    "LossTermsLogger",
    "ForegroundCalibrationHandler",
    "lee_liu_threshold",
    "ForegroundThresholdPass",
    "ObjectSizeHandler",
    "ForegroundRegimeHandler",
    "TrainingTimeLimit",
    "TrainingLengthLogger",
    "ValidateOnTerminate",
    "UNLIMITED_EPOCHS",
    "LossWeightWarmup",
    "pred_label_batch",
    "ResumeCheckpointSaver",
    "ResumeCheckpointLoader",
    "handler_of",
    "BestCheckpointState",
    "ModelCardWriter",
    "TensorBoardInstancePreview",
    "instance_preview",
    "add_log_file",
    "remove_log_file",
]


class MomentumTeacherHandler:
    """
    Exponential-moving-average update of the teacher after every iteration: ``g <- m * g + (1 - m) * f``.

    Only parameters are averaged (as in SPOCO); buffers, if any, are copied from the student. On a fresh start
    (iteration 0) the teacher is first set equal to the student, so its random initialisation never matters; when
    resuming, the teacher loaded from the checkpoint is kept. A student wrapped in ``DistributedDataParallel`` is
    unwrapped; as DDP keeps the student identical on all ranks (rank 0's weights are broadcast when it is wrapped,
    the all-reduced gradients are identical), every rank's teacher stays identical too.

    Args:
        teacher: the momentum teacher network ``g`` (its parameters should not require grad).
        student: the trained network ``f``; defaults to the engine's ``network`` at attach time.
        momentum: ``m``, 0.999 in the paper.
    """

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module | None = None, momentum: float = 0.999):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}.")
        self.teacher = teacher
        self.student = student
        self.momentum = momentum

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._sync_if_fresh)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _sync_if_fresh(self, engine: Engine) -> None:
        if self.student is None:  # MONAI workflows attach handlers before they set `network`, so look it up here
            self.student = engine.network  # type: ignore[attr-defined]
        if isinstance(self.student, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            self.student = self.student.module  # same parameter names as the teacher (no "module." prefix)
        if engine.state.iteration == 0:
            self.teacher.load_state_dict(self.student.state_dict())  # type: ignore[union-attr]

    @torch.no_grad()
    def __call__(self, engine: Engine | None = None) -> None:
        student_params = dict(self.student.named_parameters())  # type: ignore[union-attr]
        teacher_params = [p for _, p in self.teacher.named_parameters()]
        source = [student_params[n] for n, _ in self.teacher.named_parameters()]
        # one fused op over all tensors: g = m g + (1 - m) f
        torch._foreach_lerp_(teacher_params, [s.detach() for s in source], 1.0 - self.momentum)
        for (_, tb), (_, sb) in zip(self.teacher.named_buffers(), self.student.named_buffers()):  # type: ignore
            tb.copy_(sb)


class TrainingProgressBar:
    """
    tqdm progress bar over the iterations of each epoch, showing the running loss (rank 0 only), when standard
    error is a terminal: in a log file or a pipe its carriage-return updates are megabytes of noise, and the
    epoch's loss line (:class:`LossTermsLogger`) says the same.

    Args:
        persist: keep each epoch's finished bar on screen.
        terminal_only: attach only when ``sys.stderr`` is a terminal (False: always).
    """

    def __init__(self, persist: bool = False, terminal_only: bool = True) -> None:
        self.persist = persist
        self.terminal_only = terminal_only

    def attach(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() != 0:
                return
        if self.terminal_only and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
            return
        ProgressBar(persist=self.persist).attach(engine, output_transform=lambda out: {"loss": _loss_of(out)})


class LossTermsLogger:
    """
    Logs the epoch mean of every SPOCO loss term (pull, push, instance, unlabeled, consistency, ...) at the end
    of each epoch, read from the loss function's ``last_terms`` dict after each iteration, and the learning rate
    of the epoch's last iteration.

    The same values are put into ``engine.state.metrics`` (``loss_<term>`` and ``lr``), where MONAI's epoch-level
    trackers read them: ``TensorBoardStatsHandler`` and ``MLFlowHandler`` (``--tracking mlflow``) attached after this
    handler plot them per epoch.

    Args:
        loss: the ``SpocoLoss`` instance used by the trainer.
        optimizer: the trainer's optimizer, for the learning rate (its first parameter group); None: not logged.
        name: logger name.
    """

    def __init__(self, loss: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, name: str = "spoco"):
        self.loss = loss
        self.optimizer = optimizer
        self.logger = logging.getLogger(name)
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self._lr: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    def _accumulate(self, engine: Engine) -> None:
        for k, v in getattr(self.loss, "last_terms", {}).items():
            self._sums[k] += float(v)
        self._count += 1
        if self.optimizer is not None:  # before the epoch's scheduler step: the rate this epoch trained with
            self._lr = float(self.optimizer.param_groups[0]["lr"])

    def _report(self, engine: Engine) -> None:
        if self._count:
            means = {k: v / self._count for k, v in self._sums.items()}
            terms = "  ".join(f"{k} {v:.4f}" for k, v in means.items())
            lr = "" if self._lr is None else f"  (lr {self._lr:.3g})"
            of = "" if engine.state.max_epochs >= UNLIMITED_EPOCHS else f"/{engine.state.max_epochs}"
            self.logger.info(f"Epoch {engine.state.epoch}{of} loss terms: {terms}{lr}")
            engine.state.metrics.update({f"loss_{k}": v for k, v in means.items()})
            if self._lr is not None:
                engine.state.metrics["lr"] = self._lr
        self._sums.clear()
        self._count = 0


def _loss_of(output) -> float:
    if isinstance(output, list):  # decollated batch: every item carries the same loss
        output = output[0]
    return float(output["loss"]) if isinstance(output, dict) else float(output)


def pred_label_batch(output) -> tuple[torch.Tensor, torch.Tensor]:
    """
    ``output_transform`` for ignite metrics on an evaluator: stack the decollated ``pred`` and ``label`` items back
    into ``(B, C, *S)`` batches (every validation volume is its own batch, so sizes match).
    """
    items = output if isinstance(output, list) else [output]
    return torch.stack([i["pred"] for i in items]), torch.stack([i["label"] for i in items])


class ForegroundCalibrationHandler:
    """
    Estimate the label frequency ``c`` of a positive-unlabeled foreground head during training (Elkan & Noto, KDD
    2008) and store it in the network's ``fg_label_frequency`` buffer, with the loss's
    ``foreground_positive_weight`` in ``fg_positive_weight``; they calibrate the head at inference (see
    :class:`~spoco_bundle.networks.EmbeddingUNet` and :class:`~spoco_bundle.losses.ForegroundLoss`).

    After every iteration, the loss's ``last_label_frequency`` (mean foreground probability of the student over
    annotated-object voxels of images without annotated background, see :class:`~spoco_bundle.losses.SpocoLoss`)
    enters an exponential moving average (bias-corrected, so the first iterations count fully). Images with
    annotated background do not take part; if no image ever lacks it, ``c`` stays 1. Under DDP the estimate pools
    every rank's voxels. The average's running sums are the handler's ``state_dict()``, kept in the resume
    checkpoint: without them a resumed run would restart the average from its next iteration alone.

    Args:
        loss: the :class:`~spoco_bundle.losses.SpocoLoss` of the trainer (looked up as ``engine.loss_function``
            when None).
        network: the student (looked up as ``engine.network`` when None); a DDP wrapper is unwrapped.
        momentum: weight of the old estimate in the moving average.
    """

    def __init__(
        self, loss: torch.nn.Module | None = None, network: torch.nn.Module | None = None, momentum: float = 0.98
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        self.loss = loss
        self.network = network
        self.momentum = float(momentum)
        self._sum = 0.0
        self._weight = 0.0
        self._hists: tuple[np.ndarray, np.ndarray] | None = None  # moving (annotated, all) histograms, "lee_liu"

    def state_dict(self) -> dict:
        state = {"sum": self._sum, "weight": self._weight}
        if self._hists is not None:
            state["histograms"] = [h.tolist() for h in self._hists]
        return state

    def load_state_dict(self, state: dict) -> None:
        self._sum = float(state["sum"])
        self._weight = float(state["weight"])
        hists = state.get("histograms")
        self._hists = None if hists is None else tuple(np.asarray(h, dtype=np.float64) for h in hists)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        net = self.network if self.network is not None else engine.network  # type: ignore[attr-defined]
        loss = self.loss if self.loss is not None else getattr(engine, "loss_function", None)
        if isinstance(net, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            net = net.module
        buf = getattr(net, "fg_label_frequency", None)
        stats = getattr(loss, "last_label_frequency", None)
        if buf is None or stats is None:
            return
        mean, count = stats
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank's voxels count (DDP would otherwise broadcast rank 0's buffer alone)
            t = torch.tensor([mean * count if count else 0.0, float(count)], dtype=torch.float64, device=buf.device)
            torch.distributed.all_reduce(t)
            count = int(t[1].item())
            mean = float(t[0].item()) / count if count else mean
        if count == 0:
            return
        self._sum = self.momentum * self._sum + (1.0 - self.momentum) * mean
        self._weight = self.momentum * self._weight + (1.0 - self.momentum)
        buf.fill_(self._sum / self._weight)
        hists = getattr(loss, "last_foreground_histograms", None)
        if getattr(loss, "foreground_calibration", "label_frequency") == "lee_liu" and hists is not None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                t = torch.stack(hists).to(buf.device)
                torch.distributed.all_reduce(t)
                hists = tuple(t.cpu())
            new = tuple(h.cpu().numpy().astype(np.float64) for h in hists)
            # unnormalised moving sums: a bias correction would divide both histograms alike
            old = self._hists or tuple(np.zeros_like(h) for h in new)
            self._hists = tuple(self.momentum * o + (1.0 - self.momentum) * n for o, n in zip(old, new))
            # the network's calibration puts its 0.5 at g = c / 2: c = twice the threshold on g
            buf.fill_(2.0 * lee_liu_threshold(*self._hists))
        weight = getattr(net, "fg_positive_weight", None)
        if weight is not None:
            weight.fill_(float(getattr(loss, "foreground_positive_weight", 1.0)))


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
    from spoco_bundle.losses import LOGIT_RANGE

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


class ForegroundThresholdPass:
    """
    Choose the positive-unlabeled head's threshold on whole training images with Lee & Liu's criterion
    (:func:`lee_liu_threshold`) and store it in the network's ``fg_label_frequency`` buffer as ``c = 2 t`` (the
    network's 0.5 then sits at ``g = t``). The criterion needs no ``c`` and, on whole images, has no patch sampling
    bias (patches are centred on annotated objects), but it takes the recall over the annotated objects for the
    recall over all objects: a head that memorised a few annotated objects (one 3D volume) makes it choose far too
    high a threshold (docs/lee_liu_images.md). With ``foreground_ring`` (a head trained supervised on the annotated
    objects against the ring around them, whose plain 0.5 keeps only part of the unannotated objects) it is the
    threshold ``foreground_calibration="auto"`` chooses for it (docs/foreground_ring.md); with "auto" and no ring
    the pass does nothing.

    The pass runs before every validation (the evaluator's ``EPOCH_STARTED``, so that what validation scores and the
    best-model saver keeps is calibrated by it) or, without validation, when training completes: attach it before
    the final checkpoint saver. Training images are taken in a fixed shuffled order until ``max_voxels`` (an image
    larger than what is left is cropped to its centre), each with its sparse label after the deterministic
    training transforms (annotated objects > 0, unlabeled 0, annotated background < 0): the annotated objects
    (the calibration objects with ``calibration_holdout``) against every voxel of the images without annotated
    background. With no such voxels (every image has annotated background: a supervised head) the buffer is left as
    it is. Under DDP the histograms of every rank's images are summed.

    Args:
        data: the training datalist (``train#dataset.data``).
        transform: loads an item and applies the deterministic training transforms, without padding.
        inferer: runs the network on a whole image (the validation inferer).
        loss: the :class:`~spoco_bundle.losses.SpocoLoss` (its ``foreground_positive_weight``,
            ``foreground_strokes`` and ``foreground_calibration_holdout`` select the voxels as in training);
            looked up as ``engine.loss_function`` when None.
        network: the student (looked up as ``engine.network`` when None); a DDP wrapper is unwrapped.
        evaluator: the run's validation engine, if any.
        max_voxels: voxels of training images (on the network's grid) the pass looks at.
        name: logger name.
    """

    def __init__(
        self,
        data: list[dict],
        transform,
        inferer,
        loss: torch.nn.Module | None = None,
        network: torch.nn.Module | None = None,
        evaluator=None,
        max_voxels: int = 2**22,
        name: str = "spoco",
    ) -> None:
        if int(max_voxels) < 1:
            raise ValueError(f"max_voxels must be at least 1, got {max_voxels}.")
        self.data = list(data)
        self.transform = transform
        self.inferer = inferer
        self.loss = loss
        self.network = network
        self.evaluator = evaluator
        self.max_voxels = int(max_voxels)
        self.logger = logging.getLogger(name)
        self._trainer: Engine | None = None
        self.threshold: float | None = None  # the last pass's t, for logs and tests

    def attach(self, engine: Engine) -> None:
        self._trainer = engine
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.EPOCH_STARTED, self)
        else:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        trainer = self._trainer if self._trainer is not None else engine
        net = self.network if self.network is not None else getattr(trainer, "network", None)
        loss = self.loss if self.loss is not None else getattr(trainer, "loss_function", None)
        net = unwrap(net)
        buf = getattr(net, "fg_label_frequency", None)
        if buf is None or not getattr(net, "foreground_head", True) or loss is None:
            return
        if getattr(loss, "foreground_calibration_auto", False) and loss.foreground_calibration != "lee_liu_images":
            return  # foreground_calibration "auto" without a ring: the label frequency
        from spoco_bundle.losses import LOGIT_BINS, foreground_histograms

        device = buf.device
        hists = torch.zeros(2, LOGIT_BINS, dtype=torch.float64, device=device)
        order = np.random.default_rng(0).permutation(len(self.data))  # fixed, and not biased to the list's start
        left, images = self.max_voxels, 0
        old = buf.clone()
        was_training = net.training
        net.eval()
        try:
            # at c = 1 the network's output is the head's logit with the weighting undone, log(g / (1 - g))
            buf.fill_(1.0)
            with torch.no_grad():
                for i in order:
                    if left <= 0:
                        break
                    item = self.transform(dict(self.data[i]))
                    image, label = _centre_crop(item["image"], item["label"], left)
                    left -= int(np.prod(image.shape[1:]))
                    images += 1
                    out = self.inferer(torch.as_tensor(image)[None].float().to(device), net)
                    h = foreground_histograms(
                        out[:, -1:].float(),
                        torch.as_tensor(label)[None].to(device),
                        1.0,
                        bool(getattr(loss, "foreground_strokes", False)),
                        bool(getattr(loss, "foreground_calibration_holdout", False)),
                    )
                    hists += torch.stack([t.to(device) for t in h])
        finally:
            buf.copy_(old)
            net.train(was_training)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(hists)
        annotated, everything = hists.cpu().numpy()
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


def _centre_crop(image, label, max_voxels: int):
    """``image`` and ``label`` (channel first) cropped to their centre so that they hold at most ``max_voxels``
    voxels (the same factor on every spatial axis)."""
    from monai.transforms import CenterSpatialCrop

    shape = np.asarray(image.shape[1:])
    if np.prod(shape) <= max_voxels:
        return image, label
    f = (max_voxels / np.prod(shape)) ** (1.0 / len(shape))
    crop = CenterSpatialCrop(np.maximum(1, np.floor(shape * f)).astype(int).tolist())
    return crop(image), crop(label)


class ObjectSizeHandler:
    """
    Record the size of what the model is trained on in the network's buffers when training starts, so that the
    model carries it (see :mod:`spoco_bundle.object_size`): ``object_diameter``, the median diameter of the
    annotated training objects (those the run's sparse selection keeps), and ``image_blob_scale``, the 10th / 50th /
    90th percentile of the training images' blob size, which inference with ``image_scale="auto"`` compares with
    each image's. Both on the network's grid (the training's ``image_scale`` applied). Every rank computes the same
    values from the files; a resumed run recomputes them.

    Args:
        image_files, label_files: the training datalist's ``image`` and ``label`` entries.
        instance_ratio, seed, background_label, image_scale: the training run's (see ``train.json``).
        tophat: the training's top-hat background subtraction: the blob sizes are measured after it, as inference
            measures its images (:class:`~spoco_bundle.transforms.TopHat` runs before the inferer).
        network: the student (looked up as ``engine.network`` when None); a DDP wrapper is unwrapped.
    """

    def __init__(
        self,
        image_files: list[str],
        label_files: list[str],
        instance_ratio: float = 1.0,
        seed: int = 0,
        image_scale: float | list[float] = 1.0,
        background_label: int | None = None,
        network: torch.nn.Module | None = None,
        tophat: float = 0.0,
    ) -> None:
        self.image_files = [str(f) for f in image_files]
        self.label_files = [str(f) for f in label_files]
        self.tophat = float(tophat)
        self.instance_ratio = instance_ratio
        self.seed = seed
        self.image_scale = image_scale
        self.background_label = background_label
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from spoco_bundle.object_size import training_blob_scales, training_object_diameter

        net = unwrap(self.network if self.network is not None else engine.network)  # type: ignore[attr-defined]
        log = logging.getLogger(__name__)
        if getattr(net, "object_diameter", None) is not None:
            d = training_object_diameter(
                self.label_files, self.instance_ratio, self.seed, self.image_scale, self.background_label
            )
            if math.isfinite(d):
                log.info(f"median diameter of the annotated training objects: {d:.1f} voxels (recorded in the model)")
            net.object_diameter.fill_(d if math.isfinite(d) else 0.0)
        if getattr(net, "image_blob_scale", None) is not None:
            q = training_blob_scales(self.image_files, self.image_scale, self.tophat)
            if all(math.isfinite(v) for v in q):
                log.info(
                    "blob size of the training images (10th / 50th / 90th percentile, voxels): "
                    + " / ".join(f"{v:.2f}" for v in q)
                    + " (recorded in the model for image_scale 'auto')"
                )
                net.image_blob_scale.copy_(torch.tensor(q, dtype=net.image_blob_scale.dtype))
            else:
                log.warning("the training images have no structure to measure: image_scale 'auto' will not resample.")
                net.image_blob_scale.zero_()


class ForegroundRegimeHandler:
    """
    Decide ``foreground_ring="auto"`` when training starts, from the number of annotated objects the run sees and
    the training images' voxel size (:func:`~spoco_bundle.losses.auto_foreground_ring`): a ring of background
    around each object when they are few, so that the head learns them supervised, the positive-unlabeled head when
    they are many; with ``foreground_calibration="auto"`` the threshold follows (Lee & Liu's for a ring head). No
    ring where every voxel is annotated (``background_label`` 0) or the head learns object surfaces or contacts
    (``foreground_surface``, ``foreground_contact_weight``). The objects are those :class:`ObjectSizeHandler`
    measures (the label files are read once for both; the count includes objects cut by the image border). With a
    ring the network's ``fg_positive_weight`` is reset to 1 (a fine-tuned positive-unlabeled model's weight would
    otherwise stay). The decision is the handler's ``state_dict()``, kept in the resume checkpoint: a resumed run
    keeps it even if the labels changed since. Nothing happens when the loss's ring is not ``"auto"``. Attach it
    first: other handlers read the loss's settings.

    Args:
        image_files, label_files: the training datalist's ``image`` and ``label`` entries (the images' headers give
            the voxel size).
        spatial_dims: 2 or 3.
        instance_ratio, seed, background_label, image_scale: the training run's (see ``train.json``).
        loss: the :class:`~spoco_bundle.losses.SpocoLoss` (looked up as ``engine.loss_function`` when None).
        name: logger name.
    """

    def __init__(
        self,
        image_files: list[str],
        label_files: list[str],
        spatial_dims: int,
        instance_ratio: float = 1.0,
        seed: int = 0,
        image_scale: float | list[float] = 1.0,
        background_label: int | None = None,
        loss: torch.nn.Module | None = None,
        name: str = "spoco",
    ) -> None:
        self.image_files = [str(f) for f in image_files]
        self.label_files = [str(f) for f in label_files]
        self.spatial_dims = int(spatial_dims)
        self.instance_ratio = instance_ratio
        self.seed = seed
        self.image_scale = image_scale
        self.background_label = background_label
        self.loss = loss
        self.logger = logging.getLogger(name)
        self.ring: int | tuple[int, ...] | None = None  # the decision (None: not taken, or not "auto")
        self._engine: Engine | None = None

    def state_dict(self) -> dict:
        return {"ring": None if self.ring is None else _plain(self.ring)}

    def load_state_dict(self, state: dict) -> None:
        ring = state.get("ring")
        if ring is None:
            return
        self.ring = int(ring) if isinstance(ring, (int, float)) else tuple(int(v) for v in ring)
        if self._engine is not None:  # decided already at this run's start: the resumed run's decision wins
            self._apply(self._engine, "kept from the resumed run")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def _loss(self, engine: Engine):
        return self.loss if self.loss is not None else getattr(engine, "loss_function", None)

    def _apply(self, engine: Engine, why: str) -> None:
        loss = self._loss(engine)
        loss.set_foreground_ring(self.ring)
        net = unwrap(getattr(engine, "network", None))
        if self.ring and getattr(net, "fg_positive_weight", None) is not None:
            net.fg_positive_weight.fill_(1.0)
        ring = list(self.ring) if isinstance(self.ring, tuple) else self.ring
        self.logger.info(
            f"foreground_ring 'auto': {why}: {ring} (foreground_calibration {loss.foreground_calibration})"
        )

    def __call__(self, engine: Engine) -> None:
        from spoco_bundle.losses import AUTO_RING_MAX_OBJECTS, auto_foreground_ring
        from spoco_bundle.object_size import training_object_count, training_voxel_size
        from spoco_bundle.transforms import check_scale

        loss = self._loss(engine)
        if not getattr(loss, "foreground_ring_auto", False):
            return
        self._engine = engine
        if self.ring is not None:  # a resumed run's decision, loaded before this event
            self._apply(engine, "kept from the resumed run")
            return
        count = training_object_count(self.label_files, self.instance_ratio, self.seed, self.background_label)
        many = "at most" if count <= AUTO_RING_MAX_OBJECTS else "more than"
        why = f"{count} annotated object(s), {many} {AUTO_RING_MAX_OBJECTS}"
        if self.background_label == 0:
            self.ring, why = 0, why + ", but every voxel is annotated (background_label 0)"
        elif loss.foreground_surface or loss.foreground_contact_weight:
            self.ring, why = 0, why + ", but the head learns surfaces or contacts"
        else:
            try:
                voxel = training_voxel_size(self.image_files, self.spatial_dims)[0]
            except ValueError as e:  # a header the reader cannot parse: the data checks name it elsewhere
                self.logger.warning(f"foreground_ring 'auto': voxel size unknown ({e}), taken as isotropic")
                voxel = None
            if not voxel or len(voxel) != self.spatial_dims or not all(math.isfinite(v) and v > 0 for v in voxel):
                voxel = [1.0] * self.spatial_dims
            scale = np.broadcast_to(np.asarray(check_scale(self.image_scale), np.float64), (self.spatial_dims,))
            grid = [float(v / f) for v, f in zip(voxel, scale)]  # the voxel size on the network's grid
            self.ring = auto_foreground_ring(count, grid)
            why += f", voxel size {' x '.join(f'{v:.3g}' for v in grid)}"
        self._apply(engine, why)


class TrainingTimeLimit:
    """
    Stop training after a time budget, annealing the learning rate over that budget.

    With a budget, the progress of training is the larger of the elapsed fraction of the budget and of
    ``max_epochs``; when ``optimizer`` is given, every iteration sets each group's learning rate to
    ``base_lr * (1 + cos(pi * progress)) / 2`` (the cosine schedule of the reference, on a time axis), and
    training stops once the budget is spent. Use it instead of an epoch-based scheduler: ``train.json`` disables its
    ``LrScheduleHandler`` when ``time_limit_s`` is set, and sets ``max_epochs`` to :data:`UNLIMITED_EPOCHS` so that
    the budget alone ends the run (the by-epoch fraction is then about 0). Without a budget (``None``) the handler
    does nothing. The time spent is the handler's ``state_dict()``, kept in the resume checkpoint, so that a resumed
    run continues the budget and the schedule where it stopped rather than starting both again.

    Args:
        max_seconds: the budget, or None.
        clock: ``"wall"`` (elapsed time) or ``"cpu"`` (CPU time of this process, all threads; stable on a machine
            shared with other jobs).
        optimizer: optimizer whose learning rate follows the schedule, or None.
    """

    def __init__(
        self, max_seconds: float | None = None, clock: str = "wall", optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        if clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}.")
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive or None, got {max_seconds}.")
        self.max_seconds = None if max_seconds is None else float(max_seconds)
        self.clock = clock
        self.optimizer = optimizer
        self._start: float | None = None
        self._before = 0.0  # time spent by the run before it was resumed
        self._base: list[float] = []

    def _now(self) -> float:
        return time.process_time() if self.clock == "cpu" else time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self._before + (0.0 if self._start is None else self._now() - self._start)

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed}

    def load_state_dict(self, state: dict) -> None:
        # the time since this process started is not counted twice: restart this process's clock here
        self._before = float(state["elapsed"])
        self._start = None if self._start is None else self._now()

    def attach(self, engine: Engine) -> None:
        if self.max_seconds is None:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._schedule)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    def _started(self, engine: Engine) -> None:
        self._start = self._now()
        if self.optimizer is not None:
            self._base = [g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups]

    def progress(self, engine: Engine) -> float:
        state = engine.state
        # at ITERATION_STARTED the counter already includes the iteration about to run
        done = max(state.iteration - 1, 0)
        by_epoch = done / (state.epoch_length * state.max_epochs) if state.epoch_length else 0.0
        return min(1.0, max(self.elapsed / self.max_seconds, by_epoch))  # type: ignore[operator]

    def _schedule(self, engine: Engine) -> None:
        if self.optimizer is None:
            return
        factor = 0.5 * (1.0 + math.cos(math.pi * self.progress(engine)))
        for group, base in zip(self.optimizer.param_groups, self._base):
            group["lr"] = base * factor

    def _check(self, engine: Engine) -> None:
        if self.elapsed >= self.max_seconds:  # type: ignore[operator]
            logging.getLogger(__name__).info(
                f"time limit of {self.max_seconds:.0f} s ({self.clock}) reached after {engine.state.iteration} "
                f"iterations, epoch {engine.state.epoch}: stopping"
            )
            engine.terminate()


class TrainingLengthLogger:
    """
    Logs once, before the first iteration a run trains (after a resumed run's state is loaded), how long the run will
    be: ``epochs x epoch_length = N iterations``, or, with a time budget, that the budget ends it. Rank 0 only.

    Args:
        time_limit_s: the budget of :class:`TrainingTimeLimit`, or None.
        clock: its clock, ``"wall"`` or ``"cpu"``.
        name: logger name.
    """

    def __init__(self, time_limit_s: float | None = None, clock: str = "wall", name: str = "spoco") -> None:
        self.time_limit_s = time_limit_s
        self.clock = clock
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() != 0:
                return
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        engine.remove_event_handler(self, Events.ITERATION_STARTED)
        state = engine.state
        done = state.iteration - 1
        resumed = f", resuming after iteration {done}" if done > 0 else ""
        if self.time_limit_s is not None:
            self.logger.info(
                f"training until the time limit of {self.time_limit_s:g} s ({self.clock}) is spent (epochs of "
                f"{state.epoch_length} iterations; `epochs` does not apply){resumed}"
            )
        else:
            total = state.epoch_length * state.max_epochs
            self.logger.info(
                f"training {state.max_epochs} epochs x {state.epoch_length} iterations = {total} iterations{resumed}"
            )


class ValidateOnTerminate:
    """
    Runs the validator once more when training is terminated (by :class:`TrainingTimeLimit`): the run then ends in
    the middle of an epoch, where the epoch-level validation does not run, so without this the weights of the last
    iterations (the lowest learning rates of the schedule) would never be scored, and a budget that ends before the
    first validation would leave no best-model checkpoint at all.

    Args:
        validator: the evaluator (``validate#evaluator``); its checkpoint saver keeps the best model as usual.
    """

    def __init__(self, validator) -> None:
        self.validator = validator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.TERMINATE, self)

    def __call__(self, engine: Engine) -> None:
        self.validator.run(engine.state.epoch)


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


def handler_of(handlers, name: str):
    """
    The one handler of class ``name`` in ``handlers`` (a trainer's handler list), so that a config can put a handler's
    own state (e.g. :class:`ForegroundCalibrationHandler`'s running sums) into the resume checkpoint without indexing
    the list.

    Raises:
        ValueError: no handler, or more than one, of that class.
    """
    found = [h for h in handlers or [] if type(h).__name__ == name]
    if len(found) != 1:
        raise ValueError(f"expected one {name} in the handler list, found {len(found)}.")
    return found[0]


class BestCheckpointState:
    """
    The memory of a MONAI ``CheckpointSaver`` that keeps the checkpoint of the best key metric (validation's
    ``model.pt``): the score and file it holds, as a ``state_dict`` for the resume checkpoint. Without it a resumed
    run forgets the best score so far, and its first validation replaces ``model.pt`` whatever it scores.

    Args:
        saver: the ``CheckpointSaver`` with ``save_key_metric=True``; with none (no key metric) the state is empty.
    """

    def __init__(self, saver) -> None:
        self.saver = saver

    def _checkpoint(self):
        return getattr(self.saver, "_key_metric_checkpoint", None)

    def state_dict(self) -> dict:
        checkpoint = self._checkpoint()
        saved = [] if checkpoint is None else checkpoint.state_dict()["_saved"]
        return {"saved": [(float(p), str(f)) for p, f in saved]}

    def load_state_dict(self, state: dict) -> None:
        checkpoint = self._checkpoint()
        if checkpoint is None:
            return
        # a file that is gone (deleted, or a kill between the removal of the old best and the write of the new) is
        # forgotten: the saver would fail removing it, and any score beats no file
        folder = Path(self.saver.save_dir)
        fixed = getattr(checkpoint.save_handler, "filename", None)  # MONAI's saver writes this name whatever `f`
        saved = [(p, f) for p, f in state["saved"] if (folder / (fixed or f)).is_file()]
        checkpoint.load_state_dict({"_saved": saved})


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


class ResumeCheckpointSaver:
    """
    Keeps one resume checkpoint of the running training, for ``--resume True``: the state dicts of ``save_dict``
    (student, teacher, optimizer, trainer, scheduler, stateful handlers) written to ``save_path`` every ``interval``
    iterations and when the run ends (its epochs done or its time budget spent). Each write goes to a temporary file
    next to it (``.<name>.partial``), is flushed to disk and then renamed over ``save_path``, so a run killed at any
    moment leaves the previous complete state, never a truncated file, and only ever one file.

    The file belongs to the run in progress: a run started without ``resume`` removes a ``save_path`` left by an
    earlier run when it starts, so ``--resume True`` can only continue the latest run. Rank 0 alone writes.

    Attach it after the trainer's other handlers: a save that falls on an epoch's last iteration is made when the
    epoch is complete, after the epoch's handlers (learning-rate step, validation), so that a run resumed from it
    starts the next epoch with the state a continuous run would have.

    Args:
        save_path: the checkpoint file (``ckpt_dir/resume.pt``).
        save_dict: name -> object with ``state_dict()``; a ``DistributedDataParallel`` network is unwrapped.
        interval: iterations between writes (counted on the trainer's iteration, so a resumed run keeps the rhythm);
            0 writes only at the end.
        resume: whether this run continues from ``save_path`` (then the file is kept at the start).
        name: logger name.
    """

    def __init__(
        self, save_path: str, save_dict: dict, interval: int = 100, resume: bool = False, name: str = "spoco"
    ) -> None:
        if interval < 0:
            raise ValueError(f"resume_interval must be >= 0 iterations, got {interval}.")
        self.save_path = Path(save_path)
        self.save_dict = save_dict
        self.interval = int(interval)
        self.resume = bool(resume)
        self.logger = logging.getLogger(name)
        self._last: int | None = None  # the iteration last saved

    @property
    def partial_path(self) -> Path:
        return self.save_path.with_name(f".{self.save_path.name}.partial")

    def attach(self, engine: Engine) -> None:
        if not _is_main_process():
            return
        engine.add_event_handler(Events.STARTED, self._started)
        if self.interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self._periodic)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _periodic(self, engine: Engine) -> None:
        # an epoch's last iteration is saved once the epoch's handlers (the scheduler's step) have run
        length = engine.state.epoch_length
        if not length or engine.state.iteration % length:
            self(engine)

    def _epoch_completed(self, engine: Engine) -> None:
        if engine.state.iteration % self.interval == 0:
            self(engine)

    def _completed(self, engine: Engine) -> None:
        if self._last != engine.state.iteration:
            self(engine)

    def _started(self, engine: Engine) -> None:
        if self.partial_path.exists():
            self.partial_path.unlink()  # a write cut short by a kill; the file itself is intact
        if not self.resume and self.save_path.exists():
            self.save_path.unlink()
            self.logger.info(f"removed {self.save_path} of an earlier run: this run keeps its own state there")

    def __call__(self, engine: Engine) -> None:
        state = {k: unwrap(obj).state_dict() for k, obj in self.save_dict.items()}
        self.save_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.partial_path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.partial_path, self.save_path)
        self._last = engine.state.iteration
        self.logger.info(f"resume state saved: {self.save_path} (iteration {engine.state.iteration})")


class ResumeCheckpointLoader:
    """
    ``--resume True``: continue the run whose state :class:`ResumeCheckpointSaver` keeps in ``load_path``.

    The file is read and checked when the handler is attached, before training starts, so that a missing file, a
    file that is not a resume checkpoint, or a run that has nothing left to train (its iterations all done, or its
    time budget spent) fails with a message saying so, and no other handler writes anything. The state is restored
    when the trainer starts, with a log line naming the file, the iteration and the epoch.

    A finished run can be extended by resuming it with a larger ``--epochs`` (or ``--time_limit_s``); the trainer
    then continues with the new length (as MONAI's ``CheckpointLoader``).

    Args:
        load_path: the checkpoint file (``ckpt_dir/resume.pt``).
        load_dict: name -> object with ``load_state_dict()``; must include ``trainer``.
        map_location: ``torch.load``'s ``map_location``.
        optional: names that may be missing from the file (state that earlier versions of the bundle did not save);
            their objects then start fresh, with a warning.
        name: logger name.
    """

    def __init__(
        self,
        load_path: str,
        load_dict: dict,
        map_location=None,
        optional: tuple[str, ...] | list[str] = ("fg_calibration", "time_limit", "best_model", "foreground_regime"),
        name: str = "spoco",
    ) -> None:
        if "trainer" not in load_dict:
            raise ValueError("load_dict must include the trainer ('trainer').")
        self.load_path = Path(load_path)
        self.load_dict = load_dict
        self.map_location = map_location
        self.optional = tuple(optional)
        self.logger = logging.getLogger(name)
        self._checkpoint: dict | None = None

    def attach(self, engine: Engine) -> None:
        self._checkpoint = self._read(engine)
        engine.add_event_handler(Events.STARTED, self)

    def _read(self, engine: Engine) -> dict:
        path = self.load_path
        if not path.is_file():
            raise FileNotFoundError(
                f"--resume True: nothing to resume in {path.parent}: {path.name} does not exist (a run writes it every "
                "resume_interval iterations and at its end). Start the run without --resume, or pass the --ckpt_dir "
                "of the run to continue."
            )
        try:
            ckpt = torch.load(path, map_location=self.map_location, weights_only=True)
        except Exception as e:
            raise ValueError(f"--resume True: cannot read {path}: {type(e).__name__}: {e}") from e
        missing = [k for k in self.load_dict if k not in self.optional and k not in (ckpt or {})]
        if not isinstance(ckpt, dict) or missing:
            raise ValueError(f"--resume True: {path} is not a resume checkpoint of this bundle (missing {missing}).")
        trainer = ckpt["trainer"]
        done = int(trainer.get("iteration", trainer.get("epoch", 0) * trainer["epoch_length"]))
        total = int(engine.state.max_epochs or 0) * int(trainer["epoch_length"])
        if done >= total:
            raise ValueError(
                f"--resume True: the run in {path} is finished ({done} of {total} iterations, "
                f"{engine.state.max_epochs} epochs of {trainer['epoch_length']}); nothing to resume. Pass a larger "
                "--epochs to train it on, or start a new run without --resume."
            )
        limit = self.load_dict.get("time_limit")
        budget = getattr(limit, "max_seconds", None)
        spent = float((ckpt.get("time_limit") or {}).get("elapsed", 0.0))
        if budget is not None and spent >= budget:
            raise ValueError(
                f"--resume True: the run in {path} has spent its time budget ({spent:.0f} s of {budget:g} s); "
                "nothing to resume. Pass a larger --time_limit_s to train it on, or start a new run without --resume."
            )
        return ckpt

    def __call__(self, engine: Engine) -> None:
        ckpt = self._checkpoint
        if ckpt is None:
            raise RuntimeError("ResumeCheckpointLoader was not attached.")
        prior_max_epochs = engine.state.max_epochs  # the length of this run, not the saved one's (as MONAI's loader)
        for k, obj in self.load_dict.items():
            if k in ckpt:
                unwrap(obj).load_state_dict(ckpt[k])
            else:
                self.logger.warning(f"{self.load_path} holds no {k!r} state (an earlier version): it starts afresh")
        self._checkpoint = None  # free the memory
        engine.state.max_epochs = prior_max_epochs
        state = engine.state
        length = state.epoch_length
        into = state.iteration - state.epoch * length
        where = f", {into} of {length} iterations into epoch {state.epoch + 1}" if into else ""
        self.logger.info(
            f"resuming from {self.load_path}: iteration {state.iteration}, epoch {state.epoch} of {state.max_epochs} "
            f"complete{where}"
        )


class ModelCardWriter:
    """
    Keeps the card ``model.json`` of the model checkpoint ``model_path`` (:mod:`spoco_bundle.shipped`) in step with
    it: whenever this run writes the checkpoint (validation's best-model saver, or the final saver when there is no
    validation), the card is written right after it, atomically, with the settings inference needs
    (``inference``: shape, patch size, ...), the run's ``train.json`` ids (``training.settings``), the size of what
    the model was trained on (the network's ``object_diameter`` and ``image_blob_scale``, set by
    :class:`ObjectSizeHandler`, and the training images' voxel size) and the bundle's version. A checkpoint left by
    an earlier run keeps its card until this run replaces the weights. Rank 0 only.

    The checkpoint is watched at the trainer's ``EPOCH_COMPLETED``, ``TERMINATE`` and ``COMPLETED``: attach this
    handler after the savers and validation handlers, so that it runs after them on the same event.

    Args:
        model_path: the checkpoint the card describes (``ckpt_dir/model.pt``); the card is ``model.json`` beside it.
        inference: the ``inference.json`` ids inference takes from the card (``spatial_dims``, ``features``,
            ``embedding_dim``, ``patch_size``, ``min_size``, ``intensity_percentiles``, ``tophat``).
        settings: the run's ``train.json`` ids worth keeping (``evaluate.json`` takes its defaults from them).
        image_files: the training images, for their voxel size (headers only).
        network: the student (looked up as ``engine.network`` when None); a DDP wrapper is unwrapped.
        evaluator: the run's validation engine, if any: its best key metric (the score of the weights the
            best-model saver keeps) goes into the card as ``validation`` (the metric's name, value, epoch and the
            number of validation images), which the zoo package reports as ``eval_metrics``.
        name: logger name.
    """

    def __init__(
        self,
        model_path: str,
        inference: dict,
        settings: dict | None = None,
        image_files: list[str] | None = None,
        network: torch.nn.Module | None = None,
        evaluator: Engine | None = None,
        name: str = "spoco",
    ) -> None:
        if "spatial_dims" not in inference:
            raise ValueError(f"inference settings must include spatial_dims, got {sorted(inference)}.")
        self.model_path = Path(model_path)
        self.inference = dict(inference)
        self.settings = dict(settings or {})
        self.image_files = [str(f) for f in image_files or []]
        self.network = network
        self.evaluator = evaluator
        self.logger = logging.getLogger(name)
        self._seen: tuple | None = None
        self._voxel: tuple[list[float] | None, str] = (None, "")
        self._network: torch.nn.Module | None = None

    def _signature(self) -> tuple | None:
        try:
            st = self.model_path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def attach(self, engine: Engine) -> None:
        if not _is_main_process():
            return
        engine.add_event_handler(Events.STARTED, self._started)
        for event in (Events.EPOCH_COMPLETED, Events.TERMINATE, Events.COMPLETED):
            engine.add_event_handler(event, self)

    def _started(self, engine: Engine) -> None:
        from spoco_bundle.object_size import training_voxel_size

        self._seen = self._signature()  # an earlier run's weights: not this run's to describe
        self._network = unwrap(self.network if self.network is not None else engine.network)  # type: ignore
        try:
            self._voxel = training_voxel_size(self.image_files, int(self.inference["spatial_dims"]))
        except ValueError as e:  # a detail of the card; the data were checked before training
            self.logger.warning(f"model card: the training images' voxel size is unknown ({e})")

    def card(self, engine: Engine) -> dict:
        """The card for the weights saved now."""
        import monai

        from spoco_bundle.shipped import bundle_version

        net = self._network
        diameter = getattr(net, "object_diameter", None)
        blobs = getattr(net, "image_blob_scale", None)
        voxel_size, voxel_unit = self._voxel
        settings = _plain(self.settings)
        loss = getattr(engine, "loss_function", None)
        for key in ("foreground_ring", "foreground_calibration"):  # what "auto" chose, not "auto"
            if settings.get(key) == "auto" and hasattr(loss, key):
                settings[key] = _plain(getattr(loss, key))
        if "intensity_gamma" in settings and hasattr(net, "input_gamma"):  # the weights' own: --pretrained, resume
            settings["intensity_gamma"] = float(net.input_gamma)
        return {
            "description": "weights saved by a training of this bundle (configs/train.json)",
            "bundle_version": bundle_version(),
            "inference": _plain(self.inference),
            "training": {
                "settings": settings,
                "object_diameter": None if diameter is None else float(diameter),
                "image_blob_scale": None if blobs is None else [float(v) for v in blobs.tolist()],
                "voxel_size": voxel_size,
                "voxel_unit": voxel_unit,
                "iteration": int(engine.state.iteration),
                "epoch": int(engine.state.epoch),
                "saved": time.strftime("%Y-%m-%d %H:%M:%S"),
                "monai": monai.__version__,
                "torch": torch.__version__,
            },
        }

    def _validation(self) -> dict | None:
        """The validation engine's best key metric: what the saved weights scored (None before any validation)."""
        state = getattr(self.evaluator, "state", None)
        if state is None or getattr(state, "key_metric_name", None) is None or state.best_metric_epoch < 0:
            return None
        loader = getattr(self.evaluator, "data_loader", None)
        return {
            "metric": str(state.key_metric_name),
            "value": float(state.best_metric),
            "epoch": int(state.best_metric_epoch),
            "images": len(loader.dataset) if loader is not None and hasattr(loader, "dataset") else None,
        }

    def __call__(self, engine: Engine) -> None:
        signature = self._signature()
        if signature is None or signature == self._seen:
            return
        from spoco_bundle.shipped import write_card

        card = self.card(engine)
        validation = self._validation()
        if validation is not None:
            card["validation"] = validation
        path = write_card(self.model_path, card)
        self._seen = signature
        self.logger.info(f"model card written: {path} (iteration {engine.state.iteration})")


def _plain(value):
    """``value`` as JSON types: tuples as lists, tensors and numpy scalars as numbers, dict keys as strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _instance_colours(ids: np.ndarray) -> np.ndarray:
    """A fixed, well-spread RGB colour per instance id (uint8, shape ``ids.shape + (3,)``); 0 is black."""
    ids = ids.astype(np.uint64)
    rgb = np.stack([(ids * np.uint64(m)) % np.uint64(191) + np.uint64(64) for m in (2654435761, 40503, 9973)], -1)
    return np.where(ids[..., None] > 0, rgb, 0).astype(np.uint8)


def instance_preview(image, label, pred, max_size: int = 512) -> np.ndarray:
    """
    One RGB picture of a segmentation: the image (grey, 1-99.8 percentiles), the annotation and the prediction (each
    object in its own colour over the image) side by side; 3D data show their middle slice along the first axis.

    Args:
        image: ``(C, *S)`` (channel 0 is shown).
        label: ``(1, *S)`` instance ids, or None (then that panel is the image alone).
        pred: ``(1, *S)`` instance ids.
        max_size: the panels' longest side in pixels (larger data are subsampled).

    Returns:
        ``(H, 3 * W, 3)`` uint8.
    """

    def plane(x) -> np.ndarray:
        a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)[0]
        a = a[a.shape[0] // 2] if a.ndim == 3 else a
        step = max(1, int(math.ceil(max(a.shape) / max_size)))
        return a[::step, ::step]

    img = plane(image).astype(np.float64)
    lo, hi = np.percentile(img, (1, 99.8)) if img.size else (0.0, 1.0)
    grey = np.clip((img - lo) / (hi - lo) if hi > lo else img * 0, 0, 1)
    grey = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1)
    panels = [grey]
    for ids in (label, pred):
        if ids is None:
            panels.append(grey)
            continue
        ids = np.clip(plane(ids), 0, None)
        panels.append(np.where(ids[..., None] > 0, _instance_colours(ids), grey // 2))
    return np.concatenate(panels, axis=1)


class TensorBoardInstancePreview(TensorBoardHandler):
    """
    After each validation, a preview in TensorBoard (``IMAGES`` tab, one step per epoch): the first validation
    image, its annotation and the predicted instances (:func:`instance_preview`). MONAI's ``TensorBoardImageHandler``
    would show instance ids as grey levels and 3D volumes as GIFs of every slice; this shows one slice in colours.

    Args:
        summary_writer: a ``SummaryWriter`` to share; None: one of its own in ``log_dir``.
        log_dir: the TensorBoard folder (``output_dir``).
        tag: the image's tag.
        max_size: the panels' longest side in pixels.
    """

    def __init__(
        self, summary_writer=None, log_dir: str = "./runs", tag: str = "validation/instances", max_size: int = 512
    ) -> None:
        super().__init__(summary_writer=summary_writer, log_dir=log_dir)
        self.tag = tag
        self.max_size = int(max_size)
        self._first: np.ndarray | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep_first)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._first = None

    def _keep_first(self, engine: Engine) -> None:
        if self._first is not None:
            return
        out = engine.state.output
        item = out[0] if isinstance(out, list) and out else out
        if isinstance(item, dict) and "pred" in item and "image" in item:
            self._first = instance_preview(item["image"], item.get("label"), item["pred"], self.max_size)

    def __call__(self, engine: Engine) -> None:
        if self._first is None:
            return
        self._writer.add_image(self.tag, self._first, engine.state.epoch, dataformats="HWC")
        self._writer.flush()


def add_log_file(path: str | None) -> str | None:
    """
    Also write the log to the file ``path`` (appending; its folder is made): a ``FileHandler`` on the root logger,
    with the console's format (``configs/logging.conf``) and level. Once per path; nothing for None, and nothing on
    the ranks other than 0 of a ``torchrun`` launch (``RANK`` > 0). Returns the path written to, or None.
    """
    if not path or int(os.environ.get("RANK", "0") or 0) > 0:
        return None
    path = os.path.abspath(str(path))
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in root.handlers):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    formatter = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    handler.setFormatter(formatter or logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    root.addHandler(handler)
    logging.getLogger(__name__).info(f"log also written to {path}")
    return path


def remove_log_file(path: str | None) -> None:
    """Stop writing the log to ``path`` (:func:`add_log_file`) and close the file."""
    if not path:
        return
    path = os.path.abspath(str(path))
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler) and h.baseFilename == path]:
        root.removeHandler(h)
        h.close()
