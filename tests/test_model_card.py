"""
A model that describes itself, and a training that can be watched: a tiny 2D training with non-default
``features`` writes ``models/model.json`` beside ``model.pt``, TensorBoard events and ``train.log`` in
``output_dir``; inference and evaluation then need no shape flags, a contradicting flag is one clear line, and a
checkpoint without a card behaves as before. Packaging and MONAI Label deployment carry the card.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from _bundle_cli import training_command
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser, ConfigWorkflow

from spoco_bundle import cards
from spoco_bundle.errors import root_cause
from spoco_bundle.handlers import ModelCardWriter, add_log_file, instance_preview, remove_log_file
from spoco_bundle.io import read_image
from spoco_bundle.networks import EmbeddingUNet, load_weights
from spoco_bundle.synthetic import write_synthetic_dataset
from spoco_bundle.training_set import TrainingSet

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "configs" / "train.json")
INFER = str(ROOT / "configs" / "inference.json")
EVALUATE = str(ROOT / "configs" / "evaluate.json")
META = str(ROOT / "metadata.json")
FEATURES = [8, 16, 32, 64]  # not the default (16, 32, 64, 128), nor the tests' usual (8, 16, 32)


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args, "--meta_file", META, "--device", "cpu"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """2 epochs of 2 iterations in 2D (64 x 64 TIFFs), validated after each epoch: model.pt is validation's best."""
    root = tmp_path_factory.mktemp("card")
    data = root / "data"
    write_synthetic_dataset(data, n_train=2, n_val=1, n_test=0, shape=(64, 64), seed=2, ext=".tif", spatial_dims=2)
    bundle = root / "bundle"
    args = ["--spatial_dims", "2", "--epochs", "2", "--epoch_length", "2", "--val_interval", "1"]
    args += ["--patch_size", "[32,32]", "--background_label", "0"]
    cmd = training_command(bundle, data, *args, features=json.dumps(FEATURES))
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    inputs = root / "inputs"
    inputs.mkdir()
    image = (np.random.default_rng(0).random((50, 70)) * 1000).astype(np.uint16)
    tifffile.imwrite(inputs / "plane.tif", image)
    return {"root": root, "data": data, "bundle": bundle, "ckpt": bundle / "models" / "model.pt", "inputs": inputs}


@pytest.mark.slow
def test_training_writes_the_card_beside_the_weights(trained):
    ckpt = trained["ckpt"]
    card = json.loads((ckpt.parent / "model.json").read_text())
    assert card["inference"] == {
        "spatial_dims": 2,
        "features": FEATURES,
        "embedding_dim": 16,
        "patch_size": [32, 32],
        "min_size": 16,
        "intensity_percentiles": [1, 99.8],
    }
    assert card["bundle_version"] == json.loads(Path(META).read_text())["version"]
    # how it was trained, read from the run's objects: the network, the training set's selection, what "auto" chose
    # for the foreground head (every voxel annotated: no ring, the label frequency), the trainer's length
    settings = card["training"]["settings"]
    assert settings == {
        **card["inference"],
        "images": 2,
        "instance_ratio": 1.0,
        "seed": 0,
        "background_label": 0,
        "image_scale": 1.0,
        "foreground_ring": 0,
        "foreground_surface": 0,
        "foreground_strokes": False,
        "foreground_calibration": "label_frequency",
        "epochs": 2,
        "epoch_length": 2,
        "learning_rate": 0.002,
    }
    # the size of what it was trained on: the same values as the weights' buffers, and the images' voxel size
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert card["training"]["object_diameter"] == pytest.approx(float(state["object_diameter"])) and (
        card["training"]["object_diameter"] > 0
    )
    assert card["training"]["image_blob_scale"] == pytest.approx(state["image_blob_scale"].tolist())
    # measured on the training images as training sees them (image_scale 1), as inference with image_scale "auto"
    # measures the images it is given
    listed = json.loads((trained["data"] / "dataset.json").read_text())["training"]
    data = [{k: str(trained["data"] / d[k]) for k in ("image", "label")} for d in listed]
    training_set = TrainingSet(data, spatial_dims=2, background_label=0)
    assert data and card["training"]["image_blob_scale"] == pytest.approx(list(training_set.blob_scales))
    assert card["training"]["object_diameter"] == pytest.approx(training_set.object_diameter)
    assert card["training"]["voxel_size"] == [1.0, 1.0]
    assert card["training"]["epoch"] in (1, 2)  # the epoch whose validation scored best
    assert not list(ckpt.parent.glob(".*partial"))  # written atomically
    # one reader for trainings and shipped models
    assert cards.inference_settings(ckpt) == card["inference"]
    assert cards.training_settings(ckpt)["spatial_dims"] == 2


@pytest.mark.slow
def test_training_writes_tensorboard_events_and_a_log_file(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = trained["bundle"] / "runs"  # train.json's output_dir
    assert list(runs.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(runs), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    # the loss per iteration, each loss term and the learning rate per epoch, the validation metrics per epoch
    assert {"train_loss", "loss_pull", "loss_push", "loss_consistency", "lr", "val_ap50", "val_map"} <= scalars
    assert len(events.Scalars("train_loss")) == 4 and [s.step for s in events.Scalars("loss_pull")] == [1, 2]
    assert [s.step for s in events.Scalars("val_ap50")] == [1, 2]
    assert all(np.isfinite(s.value) for s in events.Scalars("loss_pull"))
    # an instance preview per validation: image | annotation | prediction
    previews = events.Images("validation/instances")
    assert [p.step for p in previews] == [1, 2] and previews[0].width == 3 * previews[0].height == 3 * 64
    log = (runs / "train.log").read_text()
    assert "loss terms: pull" in log and "model card written" in log and "Metrics -- val_ap50" in log


@pytest.mark.slow
def test_a_2d_model_segments_without_shape_flags(trained, tmp_path):
    out = tmp_path / "out"
    proc = _cli(tmp_path, "--config_file", INFER, "--ckpt_path", str(trained["ckpt"]), "--dataset_dir",
                str(trained["inputs"]), "--output_dir", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels, _ = read_image(out / "plane_instances.tif")
    assert labels.shape == (50, 70)


@pytest.mark.slow
def test_a_flag_that_contradicts_the_card_is_one_clear_error(trained, tmp_path):
    out = tmp_path / "out"
    proc = _cli(tmp_path, "--config_file", INFER, "--ckpt_path", str(trained["ckpt"]), "--dataset_dir",
                str(trained["inputs"]), "--output_dir", str(out), "--features", "[16,32,64,128]")  # fmt: skip
    assert proc.returncode != 0
    ckpt = trained["ckpt"]
    assert _last_line(proc.stderr) == (
        f"error: ValueError: checkpoint {ckpt} does not fit the network asked for: --features [16,32,64,128] "
        f"contradicts its features [8,16,32,64] (recorded in {ckpt.parent / 'model.json'}). Leave these flags out "
        "to take the checkpoint's values, or pass the checkpoint that was trained with them."
    )
    assert "size mismatch" not in proc.stdout + proc.stderr  # no torch wall
    assert not out.exists()  # nothing written


@pytest.mark.slow
def test_evaluation_segments_as_inference_does_with_the_cards_settings(trained, tmp_path):
    # a card whose inference settings differ from its training ones: evaluation scores what `segment` writes
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(trained["ckpt"], model / "model.pt")
    card = json.loads((trained["ckpt"].parent / "model.json").read_text())
    card["inference"]["min_size"] = 40
    (model / "model.json").write_text(json.dumps(card))
    ckpt, data = str(model / "model.pt"), trained["data"]
    proc = _cli(tmp_path, "--config_file", f"['{INFER}','{EVALUATE}']", "--ckpt_path", ckpt, "--dataset_dir",
                str(data), "--output_dir", str(tmp_path / "scores"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val_ap50" in (tmp_path / "scores" / "metrics.csv").read_text()
    assert "Metrics -- val_ap50" in (tmp_path / "scores" / "evaluate.log").read_text()
    validation = json.loads((data / "dataset.json").read_text())["validation"]
    assert (
        f"scoring {len(validation)} image(s): the validation list of {data / 'dataset.json'}"
        in proc.stdout + proc.stderr
    )
    parser = ConfigParser()
    parser.read_config([INFER, EVALUATE])
    parser.update({"ckpt_path": ckpt})
    assert parser.get_parsed_content("min_size") == 40
    # volumes segmented block by block (over the memory budget) are scored too
    proc = _cli(tmp_path, "--config_file", f"['{INFER}','{EVALUATE}']", "--ckpt_path", ckpt, "--dataset_dir",
                str(data), "--output_dir", str(tmp_path / "blocks"), "--max_memory_gb", "1e-6")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = (tmp_path / "blocks" / "val_ap50_raw.csv").read_text().splitlines()
    assert len(raw) == 1 + len(validation) and all(0 <= float(line.split(",")[-1]) <= 1 for line in raw[1:])
    assert "blocks" in proc.stdout + proc.stderr  # segmented block by block
    # the same images segmented by inference.json alone: the same label files
    images = tmp_path / "images"
    images.mkdir()
    for item in validation:
        shutil.copy(data / item["image"], images)
    proc = _cli(tmp_path, "--config_file", INFER, "--ckpt_path", ckpt, "--dataset_dir", str(images), "--output_dir",
                str(tmp_path / "segmented"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(p.name for p in (tmp_path / "segmented").iterdir())
    assert written and written == sorted(p.name for p in (tmp_path / "scores").glob("*_instances*"))
    for name in written:
        np.testing.assert_array_equal(
            read_image(tmp_path / "segmented" / name)[0], read_image(tmp_path / "scores" / name)[0]
        )


@pytest.mark.slow
def test_shape_checks_in_process(trained, tmp_path):
    ckpt = trained["ckpt"]
    with pytest.raises(ValueError, match=r"--spatial_dims 3 contradicts its spatial_dims 2; --features"):
        load_weights(EmbeddingUNet(spatial_dims=3, features=(16, 32, 64, 128)), str(ckpt))
    # a checkpoint without a card: the config's defaults as before, flags make it load, and a mismatch names the
    # weights' shape in one line instead of torch's size-mismatch wall
    bare = tmp_path / "old" / "model.pt"
    bare.parent.mkdir()
    shutil.copy(ckpt, bare)
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"ckpt_path": str(bare), "device": "$torch.device('cpu')"})
    assert parser.get_parsed_content("spatial_dims") == 3 and parser.get_parsed_content("features") == [16, 32, 64, 128]
    with pytest.raises(RuntimeError) as info:  # MONAI's wrapper around the expression's error
        parser.get_parsed_content("network")
    message = str(root_cause(info.value))
    assert "\n" not in message and message == (
        f"Checkpoint {bare} does not match network_def: its weights have spatial_dims 2, features [8, 16, 32, 64], "
        "network_def has spatial_dims 3, features [16, 32, 64, 128]. Pass --spatial_dims 2 --features [8,16,32,64] "
        "(it has no model.json to take them from)."
    )
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"ckpt_path": str(bare), "device": "$torch.device('cpu')", "spatial_dims": 2, "features": FEATURES})
    assert parser.get_parsed_content("network").spatial_dims == 2


@pytest.mark.slow
def test_package_and_deployment_carry_the_card(trained, tmp_path):
    from spoco_bundle.monailabel import deploy_bundle
    from spoco_bundle.package import package_bundle

    card = json.loads((trained["ckpt"].parent / "model.json").read_text())
    bundle = Path(package_bundle(str(trained["ckpt"]), str(tmp_path / "dist"), torchscript=False, make_zip=False))
    assert json.loads((bundle / "models" / "model.json").read_text()) == card
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    assert parser.get_parsed_content("features") == FEATURES  # no --features override needed
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32]
    # the run validated after each epoch: the card holds the best score, which the package reports
    validation = card["validation"]
    assert validation["metric"] == "val_ap50" and 0 <= validation["value"] <= 1 and validation["images"] == 1
    assert validation["epoch"] in (1, 2)
    assert meta["eval_metrics"]["val_ap50"] == round(validation["value"], 3)
    model_card = (bundle / "docs" / "README.md").read_text()
    assert "## This package's model" in model_card and f"{validation['value']:.3f}" in model_card.split("package's")[-1]
    # MONAI Label: the deployed bundle's inference.json builds the 2D network from the card
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.py").write_text("# tasks only\n")
    dest = Path(deploy_bundle(app, name="spoco2d", checkpoint=str(trained["ckpt"])))
    assert json.loads((dest / "models" / "model.json").read_text()) == card
    parser = ConfigParser()
    parser.read_config(str(dest / "configs" / "inference.json"))
    parser["bundle_root"] = str(dest)
    net = load_weights(parser.get_parsed_content("network_def"), str(dest / "models" / "model.pt"))  # strict
    assert net.spatial_dims == 2
    # the copy's own training (a fresh start too) goes on with the card's network and preprocessing
    train = json.loads((dest / "configs" / "train.json").read_text())
    assert {k: train[k] for k in ("spatial_dims", "features", "patch_size")} == {
        "spatial_dims": 2,
        "features": FEATURES,
        "patch_size": [32, 32],
    }


def test_packaging_a_checkpoint_without_card_writes_one(tmp_path):
    from spoco_bundle.package import package_bundle

    torch.manual_seed(0)
    torch.save(EmbeddingUNet(spatial_dims=3, features=(8, 16, 32)).state_dict(), tmp_path / "old.pt")
    bundle = Path(
        package_bundle(str(tmp_path / "old.pt"), str(tmp_path / "dist"), torchscript=False, make_zip=False,
                       features=[8, 16, 32])
    )  # fmt: skip
    card = json.loads((bundle / "models" / "model.json").read_text())
    assert card["inference"]["features"] == [8, 16, 32] and card["inference"]["spatial_dims"] == 3
    assert card["inference"]["patch_size"] == [32, 64, 64] and "old.pt" in card["description"]
    assert json.loads((bundle / "configs" / "metadata.json").read_text())["eval_metrics"] == {}  # nothing measured


def test_card_follows_this_runs_saves_only(tmp_path):
    """An earlier run's model.pt keeps its card until this run writes new weights; then the card follows, with the
    settings read from the run's objects at the save."""
    from spoco_bundle.losses import ForegroundLoss, SpocoLoss

    tifffile.imwrite(tmp_path / "image.tif", np.zeros((24, 32), np.uint16), imagej=True, resolution=(2, 4))
    tifffile.imwrite(tmp_path / "label.tif", np.ones((24, 32), np.uint16))
    training_set = TrainingSet([{"image": str(tmp_path / "image.tif"), "label": str(tmp_path / "label.tif")}], 2)
    model = tmp_path / "model.pt"
    torch.save({"old": torch.zeros(1)}, model)
    net = EmbeddingUNet(spatial_dims=2, features=(8, 16, 32))
    inference = {"patch_size": [16, 16], "min_size": 9, "intensity_percentiles": [2, 98]}
    writer = ModelCardWriter(str(tmp_path), training_set, inference, foreground_calibration="auto", network=net)
    engine = Engine(lambda e, b: None)
    # what the card reads of the trainer (SupervisedTrainer's attributes): the loss (a ring head: calibration "auto"
    # is Lee & Liu's) and the optimizer
    engine.loss_function = SpocoLoss(foreground=ForegroundLoss(ring=[1, 2]))  # type: ignore[attr-defined]
    engine.optimizer = torch.optim.Adam(net.parameters(), lr=0.01)  # type: ignore[attr-defined]
    writer.attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda e: torch.save(net.state_dict(), model))
    engine.add_event_handler(Events.EPOCH_COMPLETED(once=2), writer)  # after the save, as in train.json's order
    card_file = tmp_path / "model.json"
    engine.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: seen.append(card_file.exists()))
    seen: list[bool] = []
    engine.run([0], max_epochs=3)
    assert seen == [False]  # epoch 1: the old weights, not described
    card = json.loads(card_file.read_text())
    assert card["inference"] == {"spatial_dims": 2, "features": [8, 16, 32], "embedding_dim": 16, **inference}
    assert card["training"]["epoch"] == 2 and card["training"]["object_diameter"] == 0.0
    assert card["training"]["settings"] == {
        **card["inference"],
        "images": 1,
        "instance_ratio": 1.0,
        "seed": 0,
        "background_label": None,
        "image_scale": 1.0,
        "foreground_ring": [1, 2],
        "foreground_surface": 0,
        "foreground_strokes": False,
        "foreground_calibration": "lee_liu_images",
        "epochs": 3,
        "epoch_length": 1,
        "learning_rate": 0.01,
    }
    assert card["training"]["voxel_size"] == [0.25, 0.5] and "validation" not in card  # no validation engine
    assert cards.training_settings(model) == card["training"]["settings"]


def test_unreadable_card_names_the_file(tmp_path):
    (tmp_path / "model.json").write_text("{")
    with pytest.raises(ValueError, match=r"cannot read .*model\.json"):
        cards.inference_settings(tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps({"inference": [2]}))
    with pytest.raises(ValueError, match=r"model\.json: 'inference' must be a JSON object"):
        cards.inference_settings(tmp_path / "model.pt")
    assert cards.inference_settings(tmp_path / "none" / "model.pt") == {}  # no card: nothing to take


def test_a_card_with_a_retired_setting_loads_only_at_its_neutral_value(tmp_path):
    """Cards of earlier versions record the top-hat (retired): ``"tophat": 0.0`` (not used) still loads and is left out
    of the settings inference takes; another value is refused with a message naming the card, as are the shape
    checks and loads that read it."""
    assert cards.RETIRED_SETTINGS == {"tophat": 0.0}
    ckpt = tmp_path / "model.pt"
    torch.save(EmbeddingUNet(spatial_dims=2, features=(8, 16, 32)).state_dict(), ckpt)
    inference = {"spatial_dims": 2, "features": [8, 16, 32], "embedding_dim": 16, "min_size": 16}
    for tophat in (0.0, 0):
        (tmp_path / "model.json").write_text(json.dumps({"inference": {**inference, "tophat": tophat}}))
        assert cards.inference_settings(ckpt) == inference
    load_weights(EmbeddingUNet(spatial_dims=2, features=(8, 16, 32)), str(ckpt))
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"ckpt_path": str(ckpt), "device": "$torch.device('cpu')"})
    assert parser.get_parsed_content("spatial_dims") == 2 and parser.get_parsed_content("features") == [8, 16, 32]
    (tmp_path / "model.json").write_text(json.dumps({"inference": {**inference, "tophat": 4.0}}))
    expected = (
        f"{tmp_path / 'model.json'}: the model was trained with tophat 4.0, preprocessing this version of the bundle "
        "no longer has; segment with the bundle version that trained it, or retrain."
    )
    with pytest.raises(ValueError) as info:
        cards.inference_settings(ckpt)
    assert str(info.value) == expected
    with pytest.raises(ValueError) as info:
        load_weights(EmbeddingUNet(spatial_dims=2, features=(8, 16, 32)), str(ckpt))
    assert str(info.value) == expected
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"ckpt_path": str(ckpt), "device": "$torch.device('cpu')"})
    with pytest.raises(RuntimeError) as raised:  # the config parser wraps it; `monai.bundle run` ends on the cause
        parser.get_parsed_content("spatial_dims")
    assert str(root_cause(raised.value)) == expected


def test_instance_preview_colours_each_object():
    image = torch.rand(1, 5, 40, 60)  # 3D: the middle slice is shown
    label = torch.zeros(1, 5, 40, 60, dtype=torch.int64)
    label[0, 2, 5:10, 5:10] = 3
    pred = torch.zeros_like(label)
    pred[0, 2, 5:10, 5:10], pred[0, 2, 20:30, 30:40] = 1, 70000
    panel = instance_preview(image, label, pred)
    assert panel.shape == (40, 180, 3) and panel.dtype == np.uint8
    objects = panel[7, 127], panel[25, 155]
    assert not np.array_equal(objects[0], objects[1]) and all(o.max() >= 64 for o in objects)
    assert instance_preview(torch.rand(1, 2000, 100), None, torch.zeros(1, 2000, 100)).shape == (500, 3 * 25, 3)


def test_log_file_is_added_once_and_removed(tmp_path):
    import logging

    path = str(tmp_path / "logs" / "train.log")
    assert add_log_file(path) == add_log_file(path)
    logging.getLogger("spoco").warning("written once")
    remove_log_file(path)
    logging.getLogger("spoco").warning("not written")
    text = Path(path).read_text()
    assert text.count("written once") == 1 and "not written" not in text


def test_mlflow_tracking_adds_its_handlers(tmp_path):
    """``monai.bundle run ... --tracking mlflow`` patches MLFlowHandler into both handler lists of train.json (the
    ids MONAI's default settings name) after the bundle's own, so it sees the loss terms of LossTermsLogger."""
    wf = ConfigWorkflow(
        config_file=TRAIN, meta_file=META, workflow_type="train", tracking="mlflow", bundle_root=str(tmp_path)
    )
    for handlers in ("train#handlers", "validate#handlers"):
        assert wf.parser[handlers][-1]["_target_"] == "MLFlowHandler"
    names = [h["_target_"] for h in wf.parser["train#handlers"]]
    assert names.index("spoco_bundle.handlers.LossTermsLogger") < names.index("MLFlowHandler")
    assert list((tmp_path / "runs").glob("config_*.json"))  # MONAI saved the executed config into output_dir


def test_training_voxel_size_from_headers(tmp_path):
    import nibabel as nib

    from spoco_bundle.io import read_spacing

    def voxel(files: list[Path], spatial_dims: int) -> tuple:
        training_set = TrainingSet([{"image": str(f), "label": str(f)} for f in files], spatial_dims)
        return training_set.voxel_size, training_set.voxel_unit

    vol = np.zeros((4, 6, 8), np.float32)
    for name, z in (("a", 2.0), ("b", 3.0), ("c", 3.0)):
        img = nib.Nifti1Image(vol, np.diag([z, 0.5, 0.25, 1.0]))
        img.header.set_xyzt_units("micron")
        nib.save(img, tmp_path / f"{name}.nii.gz")
    assert read_spacing(tmp_path / "a.nii.gz") == ((4, 6, 8), (2.0, 0.5, 0.25), "micron")
    files = [tmp_path / f"{n}.nii.gz" for n in "abc"]
    assert voxel(files, 3) == ([3.0, 0.5, 0.25], "micron")  # the median per axis
    nib.save(nib.Nifti1Image(np.zeros((6, 8, 1), np.float32), np.diag([0.5, 0.25, 4.0, 1.0])), tmp_path / "p.nii")
    assert voxel([tmp_path / "p.nii"], 2) == ([0.5, 0.25], "")  # a 2D image stored with a z axis
    tifffile.imwrite(tmp_path / "t.tif", np.zeros((3, 6, 8), np.uint16), imagej=True, resolution=(1 / 0.4, 1 / 0.4),
                     metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"})  # fmt: skip
    shape, spacing, unit = read_spacing(tmp_path / "t.tif")
    assert shape == (3, 6, 8) and spacing == pytest.approx((2.0, 0.4, 0.4)) and unit == "um"
    with pytest.raises(ValueError, match=r"Cannot read the header of image file .*bad\.nii\.gz"):
        (tmp_path / "bad.nii.gz").write_bytes(b"not nifti")
        read_spacing(tmp_path / "bad.nii.gz")
