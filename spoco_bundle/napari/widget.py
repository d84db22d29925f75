"""
The *SPOCO* dock widget: pick a model, **Segment** the chosen image layer into a Labels layer, **Fine-tune** on
sparse annotations painted in a Labels layer (0 = unlabeled, optionally one id for painted background) with a time
budget and the loss shown live, **Suggest** the objects to outline next as a Points layer, and step through them with
**Next**. Runs go to a worker thread (the viewer stays responsive) and **Stop** ends them; bad input is a message in
the widget and a notification, never a traceback.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, ProgressBar, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal

from spoco_bundle import cards
from spoco_bundle.napari import runs

if TYPE_CHECKING:
    import napari

__all__ = ["SpocoWidget", "CHECKPOINT"]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint file..."  # the model choice that reads the checkpoint field
SUGGESTIONS = "suggestions"  # the Points layer's name


class _Relay(QObject):
    """Carries messages from the worker thread to the widget (Qt queues signals across threads)."""

    message = Signal(str)
    loss = Signal(int, float, float)


class SpocoWidget(Container):
    """The plugin's dock widget (napari passes the viewer)."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self._stop = threading.Event()
        self._worker: Any = None
        self._losses: deque[float] = deque(maxlen=20)
        self._next = -1
        self._relay = _Relay()
        self._relay.message.connect(self._show_progress)
        self._relay.loss.connect(self._show_loss)

        models = cards.available(cards.bundle_root())
        self.model = ComboBox(label="model", choices=[*models, CHECKPOINT], value=models[0] if models else CHECKPOINT)
        self.ckpt = FileEdit(label="checkpoint", mode="r", filter="*.pt", tooltip="a model.pt with its model.json")
        self.image = ComboBox(label="image", choices=self._layers(Image), tooltip="the image to segment or train on")
        self.segment_button = PushButton(text="Segment")
        self.labels = ComboBox(label="annotations", choices=self._layers(Labels))
        self.semantics = Label(value="0 = unlabeled (not background); each other id = one object")
        self.background = SpinBox(
            label="background id", value=0, min=0, max=2**31 - 1, tooltip="strokes of this id are background; 0: none"
        )
        self.budget = SpinBox(label="budget (s)", value=300, min=1, max=7 * 24 * 3600, step=30)
        self.ckpt_dir = FileEdit(label="save to", mode="d", value=str(Path.cwd() / "models"))
        self.train_button = PushButton(text="Fine-tune")
        self.loss = Label(value="")
        self.top = SpinBox(label="suggestions", value=10, min=1, max=1000)
        self.suggest_button = PushButton(text="Suggest")
        self.next_button = PushButton(text="Next suggestion", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, visible=False)
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.status = Label(value="")
        self.extend(
            [
                self.model,
                self.ckpt,
                self.image,
                self.segment_button,
                self.labels,
                self.semantics,
                self.background,
                self.budget,
                self.ckpt_dir,
                self.train_button,
                self.loss,
                self.top,
                self.suggest_button,
                self.next_button,
                self.progress,
                self.stop_button,
                self.status,
            ]
        )
        self._show_checkpoint_field()
        self.model.changed.connect(self._show_checkpoint_field)
        self.segment_button.changed.connect(self.run_segment)
        self.train_button.changed.connect(self.run_fine_tune)
        self.suggest_button.changed.connect(self.run_suggest)
        self.next_button.changed.connect(self.next_suggestion)
        self.stop_button.changed.connect(self.stop)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self.viewer.layers.selection.events.active.connect(self._follow_active_layer)
        self._follow_active_layer()

    # --- layers and choices
    def _layers(self, kind: type) -> Any:
        return lambda _widget=None: [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, kind)]

    def _refresh_layers(self, event: Any = None) -> None:
        self.image.reset_choices()
        self.labels.reset_choices()

    def _follow_active_layer(self, event: Any = None) -> None:
        active = self.viewer.layers.selection.active
        if isinstance(active, Image):
            self.image.value = active
        elif isinstance(active, Labels) and active.name != self._instances_name():
            self.labels.value = active

    def _show_checkpoint_field(self, value: Any = None) -> None:
        self.ckpt.visible = self.model.value == CHECKPOINT

    def _instances_name(self) -> str:
        layer = self.image.value
        return f"{layer.name} instances" if layer is not None else "instances"

    # --- inputs
    def weights(self) -> runs.Weights:
        """The chosen model (:class:`~spoco_bundle.napari.runs.InputError` when none is)."""
        if self.model.value == CHECKPOINT:
            path = str(self.ckpt.value) if self.ckpt.value else ""
            if not path or path == "." or not Path(path).is_file():
                raise runs.InputError("choose a checkpoint file (model.pt) for the model, or a shipped model.")
            return runs.Weights(ckpt=path)
        return runs.Weights(name=self.model.value)

    def _image_layer(self) -> Image:
        layer = self.image.value
        if layer is None:
            raise runs.InputError("open an image first (File > Open), or choose one under 'image'.")
        return layer

    def _image(self, weights: runs.Weights) -> tuple[Image, np.ndarray]:
        layer = self._image_layer()
        return layer, runs.check_image(layer.data, weights, name=layer.name, rgb=layer.rgb)

    # --- runs
    @property
    def running(self) -> bool:
        return self._worker is not None

    def _start(self, function: Any, done: Any, what: str, total: int = 0) -> None:
        self._stop.clear()
        self._losses.clear()
        self.progress.max, self.progress.value, self.progress.visible = total, 0, True
        for button in (self.segment_button, self.train_button, self.suggest_button):
            button.enabled = False
        self.stop_button.enabled = True
        self.status.value = f"{what}..."

        def outcome() -> tuple[bool, Any]:
            # errors come back as results: a raised one would also reach napari's notifier with its traceback
            try:
                return True, function()
            except Exception as e:
                return False, e

        def returned(result: tuple[bool, Any]) -> None:
            ok, value = result
            if ok:
                done(value)
            else:
                self._failed(value)

        self._worker = create_worker(outcome, _connect={"returned": returned, "finished": self._finished})

    def _finished(self) -> None:
        self._worker = None
        self.progress.visible = False
        for button in (self.segment_button, self.train_button, self.suggest_button):
            button.enabled = True
        self.stop_button.enabled = False

    def _failed(self, error: Exception) -> None:
        if isinstance(error, runs.Stopped):
            self.status.value = "stopped"
            show_info("SPOCO: stopped")
            return
        if not isinstance(error, ValueError):  # not a message about the input: keep the traceback in the log
            logger.error("SPOCO run failed", exc_info=error)
        self._error(error)

    def _error(self, error: Exception) -> None:
        message = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        self.status.value = f"error: {message.splitlines()[0] if message else type(error).__name__}"
        show_error(f"SPOCO: {message}")

    def _show_progress(self, text: str) -> None:
        self.status.value = text

    def _show_loss(self, iteration: int, loss: float, seconds: float) -> None:
        self._losses.append(loss)
        self.loss.value = f"iteration {iteration}: loss {loss:.3f} (mean of the last {len(self._losses)}: "
        self.loss.value += f"{np.mean(self._losses):.3f})"
        if self.progress.max:
            self.progress.value = min(self.progress.max, int(seconds))

    def stop(self, value: Any = None) -> None:
        """End the current run (segmenting: before the next network pass; training: after the current iteration,
        and the checkpoint is written)."""
        if self.running:
            self._stop.set()
            self.status.value = "stopping..."

    def run_segment(self, value: Any = None, suggest_top: int | None = None) -> None:
        """Segment the chosen image into the Labels layer ``<image> instances`` (replaced if it exists)."""
        if self.running:
            return
        try:
            weights = self.weights()
            layer, image = self._image(weights)
        except runs.InputError as e:
            return self._error(e)
        scale = tuple(layer.scale)[-image.ndim :]

        def work() -> runs.Segmentation:
            return runs.segment(
                image, weights, scale=scale, suggest_top=suggest_top, stop=self._stop, progress=self._relay.message.emit
            )

        def done(result: runs.Segmentation) -> None:
            labels = self._put_labels(layer, result.labels)
            self.status.value = f"{int(result.labels.max())} objects in {labels.name!r} ({weights})"
            if suggest_top:
                self._put_suggestions(layer, result.suggestions[: int(suggest_top)])

        self._start(work, done, f"segmenting {layer.name!r} with {weights}")

    def run_suggest(self, value: Any = None) -> None:
        """Segment the chosen image and put its most unsure objects in the Points layer ``suggestions`` (numbered,
        with their scores), the first one selected."""
        self.run_segment(suggest_top=int(self.top.value))

    def run_fine_tune(self, value: Any = None) -> None:
        """Fine-tune the chosen model on the image and the annotations layer; the new checkpoint becomes the
        model."""
        if self.running:
            return
        try:
            weights = self.weights()
            layer, image = self._image(weights)
            annotations = self.labels.value
            if annotations is None:
                raise runs.InputError("add a Labels layer and paint some objects in it (0 = unlabeled).")
            background = int(self.background.value) or None
            labels = runs.check_labels(annotations.data, image.shape, background, name=annotations.name)
            ckpt_dir = str(self.ckpt_dir.value) if self.ckpt_dir.value else ""
            if not ckpt_dir or ckpt_dir == ".":
                raise runs.InputError("choose the folder the new checkpoint is saved to ('save to').")
        except runs.InputError as e:
            return self._error(e)
        scale, budget = tuple(layer.scale)[-image.ndim :], float(self.budget.value)

        def work() -> str:
            return runs.fine_tune(
                image,
                labels,
                weights,
                ckpt_dir,
                time_limit_s=budget,
                background_label=background,
                scale=scale,
                stop=self._stop,
                on_iteration=self._relay.loss.emit,
            )

        def done(path: str) -> None:
            self.ckpt.value = path
            self.model.value = CHECKPOINT
            stopped = " (stopped early)" if self._stop.is_set() else ""
            self.status.value = f"fine-tuned{stopped}: {path}, now the model"

        self._start(work, done, f"fine-tuning {weights} on {layer.name!r} + {annotations.name!r}", total=int(budget))

    # --- results
    def _put_labels(self, image: Image, labels: np.ndarray) -> Labels:
        name = self._instances_name()
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], Labels):
            layer = self.viewer.layers[name]
            layer.data = labels
        else:
            layer = self.viewer.add_labels(labels, name=name, scale=image.scale, translate=image.translate)
        return layer

    def _put_suggestions(self, image: Image, rows: list[dict[str, int | float]]) -> None:
        axes = "zyx"[-image.data.ndim :]
        points = np.array([[row[f"centroid_{a}"] for a in axes] for row in rows], dtype=float).reshape(-1, len(axes))
        features = {key: [row[key] for row in rows] for key in ("rank", "id", "score")} if rows else None
        if SUGGESTIONS in self.viewer.layers:
            self.viewer.layers.remove(SUGGESTIONS)
        layer = self.viewer.add_points(
            points,
            name=SUGGESTIONS,
            features=features,
            text={"string": "{rank:.0f}", "color": "yellow", "anchor": "upper_left"},
            size=8,
            face_color="transparent",
            border_color="yellow",
            scale=image.scale,
            translate=image.translate,
        )
        self._next = -1
        self.next_button.enabled = len(rows) > 0
        self.status.value = f"{len(rows)} suggestions, the most unsure first" if rows else "no object to suggest"
        if rows:
            self.next_suggestion()
        self.viewer.layers.selection.active = layer

    def next_suggestion(self, value: Any = None) -> int:
        """Select the next suggestion (after the last, the first again), centre the view on it and, in 3D, go to
        its slice; returns its index."""
        if SUGGESTIONS not in self.viewer.layers or len(self.viewer.layers[SUGGESTIONS].data) == 0:
            self.next_button.enabled = False
            return -1
        layer = self.viewer.layers[SUGGESTIONS]
        self._next = (self._next + 1) % len(layer.data)
        layer.selected_data = {self._next}
        world = np.asarray(layer.data_to_world(layer.data[self._next]))
        dims = self.viewer.dims
        for axis, coordinate in zip(range(dims.ndim - len(world), dims.ndim), world):
            dims.set_point(axis, coordinate)
        self.viewer.camera.center = tuple(world[-2:])
        row = {k: layer.features[k].iloc[self._next] for k in ("rank", "id", "score")}
        self.status.value = f"suggestion {row['rank']:.0f}: object {row['id']:.0f}, score {row['score']:.2f}"
        return self._next
