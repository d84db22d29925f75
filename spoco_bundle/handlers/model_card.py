"""What a trained model carries about its training: the size of what it was trained on (buffers of the network, read
by inference) and the model card ``model.json`` beside ``model.pt``."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import monai
import torch
from ignite.engine import Engine, Events

from spoco_bundle.cards import bundle_version, network_settings, write_card
from spoco_bundle.distributed import is_main_process
from spoco_bundle.handlers.foreground import calibration_method
from spoco_bundle.handlers.schedule import UNLIMITED_EPOCHS
from spoco_bundle.networks import unwrap
from spoco_bundle.training_set import TrainingSet

__all__ = ["TrainingSetRecorder", "ModelCardWriter"]

logger = logging.getLogger(__name__)


class TrainingSetRecorder:
    """
    Record the size of what the model is trained on in the network's buffers when training starts, so that the
    model carries it: ``object_diameter``, the median diameter of the annotated training objects (inference's size
    filter, ``min_diameter_ratio``), and ``image_blob_scale``, the 10th / 50th / 90th percentile of the training
    images' blob size, which inference with ``image_scale="auto"`` compares with each image's. Both on the network's
    grid (:class:`~spoco_bundle.training_set.TrainingSet`). A resumed run records them again.

    Args:
        training_set: what the run trains on.
        network: the student (looked up as ``engine.network`` when None); a DDP wrapper is unwrapped.
    """

    def __init__(self, training_set: TrainingSet, network: torch.nn.Module | None = None) -> None:
        self.training_set = training_set
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        net = unwrap(self.network if self.network is not None else engine.network)  # type: ignore[attr-defined]
        d = self.training_set.object_diameter
        if math.isfinite(d):
            logger.info(f"median diameter of the annotated training objects: {d:.1f} voxels (recorded in the model)")
        net.object_diameter.fill_(d if math.isfinite(d) else 0.0)
        q = self.training_set.blob_scales
        if all(math.isfinite(v) for v in q):
            logger.info(
                "blob size of the training images (10th / 50th / 90th percentile, voxels): "
                + " / ".join(f"{v:.2f}" for v in q)
                + " (recorded in the model for image_scale 'auto')"
            )
            net.image_blob_scale.copy_(torch.tensor(q, dtype=net.image_blob_scale.dtype))
        else:
            logger.warning("the training images have no structure to measure: image_scale 'auto' will not resample.")
            net.image_blob_scale.zero_()


def _plain(value: Any) -> Any:
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


class ModelCardWriter:
    """
    Keeps the card ``model.json`` of the checkpoint ``ckpt_dir/model.pt`` (:mod:`spoco_bundle.cards`) in step with it:
    whenever this run writes the checkpoint (validation's best-model saver, or the final saver when there is no
    validation), the card is written right after it, atomically. Everything on it is read from the run's own objects
    when the weights are saved: the network's shape and recorded sizes, the training set and its selection, the
    loss's foreground regime (what ``"auto"`` chose), the calibration in use, the trainer's length and the
    optimizer's learning rate. A checkpoint left by an earlier run keeps its card until this run replaces the
    weights. Rank 0 only.

    The checkpoint is watched at the trainer's ``EPOCH_COMPLETED``, ``TERMINATE`` and ``COMPLETED``: attach this
    handler after the savers and validation handlers, so that it runs after them on the same event.

    Args:
        ckpt_dir: where the run saves ``model.pt``, the checkpoint the card describes (``model.json`` beside it).
        training_set: what the run trains on.
        inference: the inference settings the network's shape does not tell (``patch_size``, ``min_size``,
            ``intensity_percentiles``), which inference takes from the card.
        foreground_calibration: the run's calibration method (``"auto"`` is recorded as what it resolved to,
            :func:`~spoco_bundle.handlers.foreground.calibration_method`).
        evaluator: the run's validation engine, if any: its best key metric (the score of the weights the
            best-model saver keeps) goes into the card as ``validation`` (the metric's name, value, epoch and the
            number of validation images), which the zoo package reports as ``eval_metrics``.
        network: the student (looked up as ``engine.network`` when None); a DDP wrapper is unwrapped.
        name: logger name.
    """

    def __init__(
        self,
        ckpt_dir: str,
        training_set: TrainingSet,
        inference: dict[str, Any],
        foreground_calibration: str | None = None,
        evaluator: Engine | None = None,
        network: torch.nn.Module | None = None,
        name: str = "spoco",
    ) -> None:
        self.model_path = Path(ckpt_dir) / "model.pt"
        self.training_set = training_set
        self.inference = dict(inference)
        self.foreground_calibration = foreground_calibration
        self.evaluator = evaluator
        self.network = network
        self.logger = logging.getLogger(name)
        self._seen: tuple | None = None

    def _signature(self) -> tuple | None:
        try:
            st = self.model_path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def attach(self, engine: Engine) -> None:
        if not is_main_process():
            return
        engine.add_event_handler(Events.STARTED, self._started)
        for event in (Events.EPOCH_COMPLETED, Events.TERMINATE, Events.COMPLETED):
            engine.add_event_handler(event, self)

    def _started(self, engine: Engine) -> None:
        self._seen = self._signature()  # an earlier run's weights: not this run's to describe

    def _settings(self, engine: Engine, net: torch.nn.Module) -> dict[str, Any]:
        """How the run trains, from its objects."""
        state, loss, head = engine.state, engine.loss_function, engine.loss_function.foreground  # type: ignore
        group = engine.optimizer.param_groups[0]  # type: ignore[attr-defined]
        return {
            **network_settings(net),
            **self.inference,
            **self.training_set.settings(),
            "foreground_ring": head.ring,
            "foreground_surface": head.surface,
            "foreground_strokes": head.strokes,
            "foreground_calibration": (
                None if self.foreground_calibration is None else calibration_method(self.foreground_calibration, loss)
            ),
            "epochs": None if state.max_epochs >= UNLIMITED_EPOCHS else int(state.max_epochs),
            "epoch_length": int(state.epoch_length),
            "learning_rate": float(group.get("initial_lr", group["lr"])),
        }

    def card(self, engine: Engine) -> dict[str, Any]:
        """The card for the weights saved now."""
        net = unwrap(self.network if self.network is not None else engine.network)  # type: ignore[attr-defined]
        try:
            voxel_size, voxel_unit = self.training_set.voxel_size, self.training_set.voxel_unit
        except ValueError as e:  # a detail of the card; the data were checked before training
            self.logger.warning(f"model card: the training images' voxel size is unknown ({e})")
            voxel_size, voxel_unit = None, ""
        return _plain(
            {
                "description": "weights saved by a training of this bundle (configs/train.json)",
                "bundle_version": bundle_version(),
                "inference": {**network_settings(net), **self.inference},
                "training": {
                    "settings": self._settings(engine, net),
                    "object_diameter": float(net.object_diameter),
                    "image_blob_scale": [float(v) for v in net.image_blob_scale.tolist()],
                    "voxel_size": voxel_size,
                    "voxel_unit": voxel_unit,
                    "iteration": int(engine.state.iteration),
                    "epoch": int(engine.state.epoch),
                    "saved": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "monai": monai.__version__,
                    "torch": torch.__version__,
                },
            }
        )

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
        card = self.card(engine)
        validation = self._validation()
        if validation is not None:
            card["validation"] = validation
        path = write_card(self.model_path, card)
        self._seen = signature
        self.logger.info(f"model card written: {path} (iteration {engine.state.iteration})")
