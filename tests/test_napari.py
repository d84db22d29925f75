"""The napari plugin in a real viewer: found through its npe2 manifest, it segments a real DSB2018 image with
``nuclei2d`` (the labels of ``spoco segment``), fine-tunes on two painted objects, suggests what to outline next and
steps through the suggestions; 3D volumes, stopping a run, and bad input as a message in the viewer.

The viewer needs a display: ``scripts/run_tests.sh`` runs the suite under a virtual X server (``xvfb-run``) and says
plainly when it cannot, and these tests are then skipped, never passed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari", reason="the napari extra is not installed (bash scripts/setup_env.sh napari)")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed (the test extra)")
if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    pytest.skip(
        "no display for the napari viewer: run under a virtual X server (xvfb-run -a; scripts/run_tests.sh does)",
        allow_module_level=True,
    )

from spoco_bundle.io import read_image  # noqa: E402
from spoco_bundle.metrics import ap50  # noqa: E402
from spoco_bundle.napari.runs import Weights  # noqa: E402
from spoco_bundle.napari.widget import CHECKPOINT, SUGGESTIONS, SpocoWidget  # noqa: E402
from spoco_bundle.synthetic import generate_nuclei  # noqa: E402

pytestmark = pytest.mark.napari

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPOCO_DATA_DIR", ROOT.parent / "shared" / "data"))
DSB_IMAGE = "0287e7ee5b007c91"  # a DSB2018 validation image of 256 x 256 with 47 nuclei, some of them touching
RUN_S = 240_000  # ms a run may take in the test (a 2-core CPU with other tests beside it)


def _widget(viewer) -> SpocoWidget:
    """The plugin's widget as napari finds it: through the installed package's npe2 manifest."""
    _, widget = viewer.window.add_plugin_dock_widget("spoco-bundle", "SPOCO")
    assert isinstance(widget, SpocoWidget)
    return widget


def _wait(qtbot, widget: SpocoWidget) -> None:
    qtbot.waitUntil(lambda: not widget.running, timeout=RUN_S)


def _click(button) -> None:
    button.native.click()  # a real click on the Qt button


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "dsb2018" / "images").is_dir(), reason="needs ../shared/data/dsb2018")
def test_segment_fine_tune_and_suggest_in_the_viewer(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    widget = _widget(viewer)
    [image] = viewer.open(str(DATA / "dsb2018" / "images" / f"{DSB_IMAGE}.tif"))
    truth = read_image(DATA / "dsb2018" / "labels" / f"{DSB_IMAGE}.tif")[0]
    assert widget.image.value is image and widget.model.value == "nuclei2d"

    # Segment: a Labels layer of the image's shape, the labels `spoco segment` writes for the same file
    _click(widget.segment_button)
    assert widget.running and widget.stop_button.enabled  # the run is in a worker thread; the viewer is free
    _wait(qtbot, widget)
    instances = viewer.layers[f"{image.name} instances"]
    assert instances.data.shape == image.data.shape and widget.status.value.startswith(f"{instances.data.max()}")
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "spoco_bundle.cli", "segment", str(DATA / "dsb2018" / "images" / f"{DSB_IMAGE}.tif")]
    subprocess.run(cmd + [str(out), "--model", "nuclei2d"], check=True, cwd=tmp_path, capture_output=True)
    cli_labels = read_image(out / f"{DSB_IMAGE}_instances.tif")[0]
    assert ap50(cli_labels, instances.data) == pytest.approx(1.0)
    assert ap50(truth, instances.data) > 0.6  # and it finds the nuclei

    # paint two nuclei in a new Labels layer, fine-tune for a few seconds: live loss, the checkpoint, the new model
    annotations = viewer.add_labels(np.zeros(image.data.shape, np.uint16), name="annotations")
    ids = [i for i in np.unique(truth) if i][:2]
    for new_id, true_id in enumerate(ids, start=1):
        annotations.data[truth == true_id] = new_id
    annotations.refresh()
    assert widget.labels.value is annotations
    widget.budget.value, widget.ckpt_dir.value = 6, str(tmp_path / "models")
    _click(widget.train_button)
    qtbot.waitUntil(lambda: widget.loss.value.startswith("iteration"), timeout=RUN_S)
    _wait(qtbot, widget)
    ckpt = tmp_path / "models" / "model.pt"
    assert ckpt.is_file() and (tmp_path / "models" / "model.json").is_file(), widget.status.value
    assert widget.model.value == CHECKPOINT and Path(widget.ckpt.value) == ckpt
    assert widget.weights() == Weights(ckpt=str(ckpt))

    # Suggest with the fine-tuned model: numbered points on objects of the new labels, the most unsure first
    widget.top.value = 5
    _click(widget.suggest_button)
    _wait(qtbot, widget)
    points = viewer.layers[SUGGESTIONS]
    labels = viewer.layers[f"{image.name} instances"].data
    assert 1 <= len(points.data) <= 5 and points.data.shape[1] == 2
    assert list(points.features["rank"]) == list(range(1, len(points.data) + 1))
    assert list(points.features["score"]) == sorted(points.features["score"], reverse=True)
    assert set(points.features["id"]) <= set(np.unique(labels)) - {0}
    assert points.selected_data == {0}
    # one click: the next one is selected and in the centre of the view
    _click(widget.next_button)
    assert points.selected_data == {1 % len(points.data)}
    assert np.allclose(viewer.camera.center[-2:], points.data[1 % len(points.data)])


@pytest.mark.slow
def test_segment_a_volume_keeps_its_scale(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = _widget(viewer)
    volume, truth = generate_nuclei((24, 64, 64), seed=2)
    image = viewer.add_image(volume, name="volume", scale=(2.0, 0.5, 0.5))
    widget.model.value = "nuclei3d"
    _click(widget.segment_button)
    _wait(qtbot, widget)
    instances = viewer.layers["volume instances"]
    assert instances.data.shape == volume.shape and tuple(instances.scale) == tuple(image.scale)
    assert instances.data.max() > 0, widget.status.value


@pytest.mark.slow
def test_stop_ends_a_training_early_and_keeps_its_checkpoint(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    widget = _widget(viewer)
    image, truth = generate_nuclei((96, 96), seed=4)
    viewer.add_image(image, name="nuclei")
    viewer.add_labels(np.where(truth == 1, 1, 0).astype(np.uint8), name="one nucleus")
    widget.budget.value, widget.ckpt_dir.value = 600, str(tmp_path)
    _click(widget.train_button)
    qtbot.waitUntil(lambda: widget.loss.value.startswith("iteration"), timeout=RUN_S)
    _click(widget.stop_button)
    _wait(qtbot, widget)
    assert "stopped early" in widget.status.value and (tmp_path / "model.pt").is_file()
    assert widget.progress.visible is False and widget.segment_button.enabled


def test_bad_input_is_a_message_in_the_viewer(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    widget = _widget(viewer)
    _click(widget.segment_button)
    assert "open an image" in widget.status.value and not widget.running

    viewer.add_image(np.zeros((32, 32, 3), np.uint8), name="colour", rgb=True)
    _click(widget.segment_button)
    assert "'colour' is RGB" in widget.status.value and not widget.running

    viewer.add_image(np.zeros((4, 32, 32), np.float32), name="stack")
    _click(widget.segment_button)
    assert "segments 2D images" in widget.status.value and "stack of 2D images" in widget.status.value

    image = viewer.add_image(generate_nuclei((64, 64), seed=1)[0], name="nuclei")
    widget.image.value = image
    _click(widget.train_button)
    assert "add a Labels layer" in widget.status.value
    viewer.add_labels(np.zeros((64, 48), np.uint8), name="other shape")
    widget.ckpt_dir.value = str(tmp_path)
    _click(widget.train_button)
    assert "'other shape' has shape (64, 48), the image (64, 64)" in widget.status.value
    empty = viewer.add_labels(np.zeros((64, 64), np.uint8), name="empty")
    widget.labels.value = empty
    _click(widget.train_button)
    assert "nothing is annotated in 'empty'" in widget.status.value
    empty.data[:4, :4] = 5
    widget.background.value = 5  # only painted background: still no object
    _click(widget.train_button)
    assert "nothing is annotated" in widget.status.value and "5 is background" in widget.status.value

    widget.model.value = CHECKPOINT
    assert not widget.ckpt.native.isHidden()
    _click(widget.segment_button)
    assert "choose a checkpoint file" in widget.status.value
    assert not widget.running and not any(tmp_path.iterdir())  # nothing started, nothing written


def test_the_manifest_is_valid_and_names_the_widget():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("spoco-bundle")
    assert [w.display_name for w in manifest.contributions.widgets] == ["SPOCO"]
    assert shutil.which("napari") or (Path(sys.executable).parent / "napari").is_file()  # the viewer the extra installs


@pytest.mark.slow
def test_a_run_that_fails_is_a_message_naming_the_cause(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    widget = _widget(viewer)
    viewer.add_image(generate_nuclei((64, 64), seed=1)[0], name="nuclei")
    broken = tmp_path / "model.pt"
    broken.write_bytes(b"not a checkpoint")
    shutil.copy(ROOT / "models" / "nuclei2d" / "model.json", tmp_path / "model.json")
    widget.model.value, widget.ckpt.value = CHECKPOINT, str(broken)
    _click(widget.segment_button)
    _wait(qtbot, widget)
    assert widget.status.value.startswith("error: ") and str(broken) in widget.status.value, widget.status.value
    assert "nuclei instances" not in viewer.layers and widget.segment_button.enabled
