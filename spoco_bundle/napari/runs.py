"""
The bundle's own workflows on arrays from a viewer: segment (optionally with suggestions of what to outline next) and
fine-tune, run in this process through ``monai.bundle.ConfigWorkflow`` on the same configs as ``spoco segment`` /
``spoco suggest`` / ``spoco train``, so that the viewer gives exactly the command line's results. No Qt here: the
widget (:mod:`spoco_bundle.napari.widget`) runs these functions in a worker thread and stops them through a
:class:`threading.Event`, which is checked before every network pass (segmenting) and after every iteration
(training: the run ends there and writes its checkpoint, as at the end of its time budget).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from ignite.engine import Events

from spoco_bundle import cards
from spoco_bundle.bundle import config_workflow
from spoco_bundle.errors import root_cause
from spoco_bundle.handlers.suggestions import read_suggestions
from spoco_bundle.io import read_image

__all__ = [
    "InputError",
    "Stopped",
    "Weights",
    "Segmentation",
    "check_image",
    "check_labels",
    "segment",
    "fine_tune",
]

_STEM = "image"  # the name the arrays are written under in the run's temporary folder


class InputError(ValueError):
    """Input the bundle cannot run on, with a message for the viewer's user (which layer, what is wrong, what to do)."""


class Stopped(Exception):
    """The user stopped the run."""


@dataclass(frozen=True)
class Weights:
    """The weights a run uses: a shipped model by ``name`` or a ``model.pt`` ``ckpt`` (with its ``model.json`` card)."""

    name: str | None = None
    ckpt: str | None = None

    def __post_init__(self) -> None:
        if (self.name is None) == (self.ckpt is None):
            raise InputError("choose one model: a shipped model or a checkpoint file (model.pt).")
        if self.ckpt is not None and not os.path.isfile(self.ckpt):
            raise InputError(f"the checkpoint {self.ckpt} does not exist: choose a model.pt.")
        if self.name is not None and self.name not in cards.available(cards.bundle_root()):
            shipped = ", ".join(cards.available(cards.bundle_root())) or "none"
            raise InputError(f"there is no shipped model {self.name!r} (shipped: {shipped}).")

    @property
    def path(self) -> str:
        return self.ckpt if self.ckpt is not None else cards.checkpoint(cards.bundle_root(), self.name)

    def ids(self) -> dict[str, str]:
        """The inference config's ids that select these weights."""
        return {"model": self.name} if self.name is not None else {"ckpt_path": os.path.abspath(self.ckpt)}

    @property
    def spatial_dims(self) -> int:
        """2 or 3, from the card (a checkpoint without a card: 3, the inference config's default)."""
        try:
            return int(cards.inference_settings(self.path).get("spatial_dims", 3))
        except ValueError as e:
            raise InputError(str(e)) from None

    def __str__(self) -> str:
        return self.name if self.name is not None else str(self.ckpt)


@dataclass
class Segmentation:
    """Instance labels of one image (``labels``: 0 background, 1..N objects, the image's shape) and, when asked for,
    ``suggestions``: the rows of ``<stem>_suggestions.csv`` (most unsure first: ``rank``, ``id``, ``score``, its
    parts, ``voxels``, ``centroid_<axis>`` and the bounding box, in the image's voxels)."""

    labels: np.ndarray
    suggestions: list[dict[str, int | float]] = field(default_factory=list)


def check_image(image: Any, weights: Weights, name: str = "image", rgb: bool = False) -> np.ndarray:
    """``image`` as a float32 array the model can segment.

    Raises:
        InputError: an RGB image, or one whose dimensions are not the model's (2D for a 2D model, 3D for a 3D one),
            naming the layer and saying what to do.
    """
    array = np.asarray(image)
    dims = weights.spatial_dims
    if rgb:
        raise InputError(
            f"the image layer {name!r} is RGB, and the model {weights} takes one channel: split its channels "
            "(right-click the layer > Split RGB) and choose the one with the objects."
        )
    if array.ndim != dims:
        what = f"a {array.ndim}D layer of shape {tuple(array.shape)}"
        hint = " (a stack of 2D images: segment one slice at a time, or choose a 3D model)" if dims == 2 else ""
        raise InputError(f"the model {weights} segments {dims}D images; {name!r} is {what}{hint}.")
    if min(array.shape) < 2:
        raise InputError(f"the image layer {name!r} of shape {tuple(array.shape)} is too small to segment.")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"the image layer {name!r} holds {array.dtype} values; the model needs intensities.")
    return array.astype(np.float32, copy=False)


def check_labels(
    labels: Any, image_shape: Sequence[int], background_label: int | None, name: str = "labels"
) -> np.ndarray:
    """``labels`` as a uint32 array of sparse annotations: 0 unlabeled, ``background_label`` painted background, any
    other id one object.

    Raises:
        InputError: a shape other than the image's, values that are not whole non-negative numbers, or no object.
    """
    array = np.asarray(labels)
    if tuple(array.shape) != tuple(image_shape):
        raise InputError(
            f"the labels layer {name!r} has shape {tuple(array.shape)}, the image {tuple(image_shape)}: paint the "
            "annotations in a labels layer made for this image (Layers > New Labels layer with the image selected)."
        )
    if not np.issubdtype(array.dtype, np.integer) or (array.size and array.min() < 0):
        raise InputError(f"the labels layer {name!r} must hold whole numbers >= 0 (0 = unlabeled).")
    ids = np.unique(array)
    objects = ids[(ids != 0) & (ids != (background_label if background_label is not None else 0))]
    if objects.size == 0:
        raise InputError(
            f"nothing is annotated in {name!r}: paint at least one object with its own id "
            f"(0 is unlabeled{'' if not background_label else f', {background_label} is background'})."
        )
    return array.astype(np.uint32, copy=False)


def _write_tiff(path: Path, array: np.ndarray, scale: Sequence[float] | None) -> None:
    """A TIFF the bundle's reader takes the spacing from (``scale``: the layer's, in array order), in the array's own
    type (labels keep their ids)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = [float(s) for s in (scale if scale is not None else [1.0] * array.ndim)][-array.ndim :]
    metadata: dict[str, Any] = {"axes": "ZYX"[-array.ndim :]}
    if array.ndim == 3:
        metadata["spacing"] = scale[0]
    resolution = (1.0 / scale[-1], 1.0 / scale[-2])
    tifffile.imwrite(path, array, resolution=resolution, resolutionunit="NONE", metadata=metadata)


@contextmanager
def _root_causes(stop: threading.Event) -> Iterator[None]:
    """Errors of the bundle's workflows as their root cause (MONAI wraps them in ``RuntimeError("Failed to evaluate
    ...")``), and :class:`Stopped` for a run that ``stop`` ended."""
    try:
        yield
    except Exception as e:
        cause = root_cause(e)
        if stop.is_set() or isinstance(cause, Stopped):
            raise Stopped() from None
        if cause is e:
            raise
        raise cause from None


def segment(
    image: np.ndarray,
    weights: Weights,
    scale: Sequence[float] | None = None,
    suggest_top: int | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[str], None] | None = None,
    **ids: Any,
) -> Segmentation:
    """
    Segment ``image`` as ``spoco segment`` does (``configs/inference.json``; the model card's settings, the
    resampling for ``image_scale`` auto, test-time flips, volumes larger than ``max_memory_gb`` blockwise), and with
    ``suggest_top`` as ``spoco suggest`` does (``configs/suggest.json``).

    Args:
        image: ``(Y, X)`` or ``(Z, Y, X)``, one channel (:func:`check_image`).
        weights: the model.
        scale: the voxel spacing in array order (a layer's ``scale``), for ``image_scale`` auto.
        suggest_top: also score the objects and return them, most unsure first.
        stop: set from another thread to stop before the next network pass (:class:`Stopped`).
        progress: called with a short text after each network pass.
        ids: any further ``configs/inference.json`` id.

    Raises:
        InputError: :func:`check_image`.
        Stopped: ``stop`` was set.
    """
    image = check_image(image, weights)
    stop = stop if stop is not None else threading.Event()
    with tempfile.TemporaryDirectory(prefix="spoco-napari-") as tmp:
        source, out = Path(tmp) / f"{_STEM}.tif", Path(tmp) / "out"
        _write_tiff(source, image, scale)
        configs = ["inference.json", *(["suggest.json"] if suggest_top else [])]
        run_ids = {**weights.ids(), **ids, "dataset_dir": str(source), "output_dir": str(out), "output_ext": ".tif"}
        if suggest_top:
            run_ids["suggest_top"] = int(suggest_top)
        passes = [0]

        def before_pass(module: Any, args: Any) -> None:
            if stop.is_set():
                raise Stopped()
            passes[0] += 1
            if progress is not None:
                progress(f"network pass {passes[0]}")

        with _root_causes(stop):
            workflow = config_workflow(configs, "infer", **run_ids)
            workflow.initialize()
            try:
                hook = workflow.evaluator.network.register_forward_pre_hook(before_pass)
                workflow.run()
                hook.remove()
            finally:
                workflow.finalize()
        if stop.is_set():
            raise Stopped()
        labels = read_image(out / f"{_STEM}_instances.tif")[0]
        table = out / f"{_STEM}_suggestions.csv"
        rows = read_suggestions(table) if suggest_top and table.is_file() else []
    return Segmentation(labels=labels.astype(np.uint32, copy=False), suggestions=rows)


def fine_tune(
    image: np.ndarray,
    labels: np.ndarray,
    weights: Weights,
    ckpt_dir: str | os.PathLike,
    time_limit_s: float,
    background_label: int | None = None,
    scale: Sequence[float] | None = None,
    stop: threading.Event | None = None,
    on_iteration: Callable[[int, float, float], None] | None = None,
    **ids: Any,
) -> str:
    """
    Fine-tune ``weights`` on one image and its sparse annotations as ``spoco train --pretrained`` does
    (``configs/train.json``: every painted object kept, the model's card for the network and preprocessing), for
    ``time_limit_s`` seconds, and write ``model.pt`` with its card ``model.json`` (and ``teacher.pt``) to
    ``ckpt_dir``; the run's log goes to ``ckpt_dir/runs``.

    Args:
        image: ``(Y, X)`` or ``(Z, Y, X)``, one channel.
        labels: the annotations, the image's shape: 0 unlabeled, ``background_label`` painted background, any other
            id one object (:func:`check_labels`).
        weights: the model to start from.
        ckpt_dir: the folder for the checkpoint.
        time_limit_s: the training's budget in seconds (wall clock).
        background_label: the id of painted background, or None (no background painted).
        scale: the voxel spacing in array order.
        stop: set from another thread to end the training after the current iteration (it writes its checkpoint).
        on_iteration: called after each iteration with ``(iteration, loss, seconds since the start)``.
        ids: any further ``configs/train.json`` id.

    Returns:
        The path of the new ``model.pt``.

    Raises:
        InputError: :func:`check_image`, :func:`check_labels`, a budget that is not positive, no checkpoint folder.
        Stopped: ``stop`` was set before the training started.
    """
    image = check_image(image, weights)
    labels = check_labels(labels, image.shape, background_label)
    if not time_limit_s or time_limit_s <= 0:
        raise InputError(f"the training budget must be a positive number of seconds, got {time_limit_s!r}.")
    if not str(ckpt_dir).strip():
        raise InputError("choose the folder the new checkpoint is written to.")
    ckpt_dir = Path(ckpt_dir).expanduser().resolve()
    stop = stop if stop is not None else threading.Event()
    with tempfile.TemporaryDirectory(prefix="spoco-napari-") as tmp:
        _write_tiff(Path(tmp) / "imagesTr" / f"{_STEM}.tif", image, scale)
        _write_tiff(Path(tmp) / "labelsTr" / f"{_STEM}.tif", labels, scale)
        run_ids = {
            "spatial_dims": weights.spatial_dims,
            "pretrained": weights.name if weights.name is not None else os.path.abspath(weights.path),
            "background_label": background_label,
            "time_limit_s": float(time_limit_s),
            "tensorboard": False,
            **ids,
            "dataset_dir": tmp,
            "ckpt_dir": str(ckpt_dir),
            "output_dir": str(ckpt_dir / "runs"),
        }
        start: list[float] = []

        def after_iteration(engine: Any) -> None:
            if not start:
                start.append(time.perf_counter())
            output = engine.state.output
            output = output[0] if isinstance(output, (list, tuple)) else output
            if on_iteration is not None:
                on_iteration(engine.state.iteration, float(output["loss"]), time.perf_counter() - start[0])
            if stop.is_set():
                engine.terminate()

        with _root_causes(threading.Event()):  # a stop during the training ends it with its checkpoint written
            workflow = config_workflow(["train.json"], "train", **run_ids)
            workflow.initialize()
            try:
                workflow.trainer.add_event_handler(Events.ITERATION_COMPLETED, after_iteration)
                if stop.is_set():
                    raise Stopped()
                workflow.run()
            finally:
                workflow.finalize()
    path = ckpt_dir / "model.pt"
    if not path.is_file():
        raise RuntimeError(f"the training ended without writing {path}; its log: {ckpt_dir / 'runs'}.")
    return str(path)
