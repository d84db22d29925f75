"""
MONAI Label's own BundleTrainTask / BundleInferTask run in-process on the deployed bundle (no server): training
from sparse labels saved through a real LocalDatastore, then inference compared voxel by voxel with the bundle's
own inference. Needs monailabel (.venv-monailabel); skipped elsewhere. The server test is test_monailabel_server.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from _monailabel_helpers import (
    LABELLED,
    NIFTI_IDS,
    SHAPE,
    TIFF_ID,
    cli_segmentation,
    load_strict,
    read_result,
    requires_monailabel,
    set_epoch_length,
    write_bad_inputs,
    write_studies,
)

from spoco_bundle.monailabel import deploy_bundle

pytestmark = [requires_monailabel, pytest.mark.monailabel]

# one epoch of 2 iterations keeps this file fast; the server test trains longer and compares segmentations of a
# model that finds objects, so voxel-wise agreement there is not between two empty maps
EPOCHS = 1
EPOCH_LENGTH = 2


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fake_app(root: Path) -> Path:
    """A folder with main.py, where deploy_bundle puts bundles (these tests use the tasks, not the app)."""
    app = root / "app"
    app.mkdir()
    (app / "main.py").write_text("# in-process tests: tasks only\n")
    return app


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Deploy the bundle (initial weights), save sparse labels via LocalDatastore, run BundleTrainTask on CPU."""
    from monailabel.datastore.local import LocalDatastore
    from monailabel.tasks.train.bundle import BundleTrainTask

    root = tmp_path_factory.mktemp("monailabel_tasks")
    studies = write_studies(root)
    app = _fake_app(root)
    bundle = Path(deploy_bundle(app, name="spoco"))
    set_epoch_length(bundle, EPOCH_LENGTH)
    initial = _sha(bundle / "models" / "model.pt")
    datastore = LocalDatastore(str(studies["studies"]), extensions=["*.nii.gz", "*.nii", "*.tif"], auto_reload=False)
    assert sorted(datastore.list_images()) == sorted(NIFTI_IDS + [TIFF_ID])
    for image_id in LABELLED:
        datastore.save_label(image_id, studies["sparse"][image_id], "final", {})
    task = BundleTrainTask(str(bundle), {})
    assert task.is_valid()
    # the request a client sends (val_split left at MONAI Label's default 0.2)
    task({"model": "spoco", "max_epochs": EPOCHS, "device": "cpu"}, datastore)
    return {"root": root, "app": app, "bundle": bundle, "initial_sha": initial, "datastore": datastore, **studies}


def test_datastore_keeps_sparse_labels_as_given(trained):
    datalist = trained["datastore"].datalist()
    assert sorted(Path(d["image"]).name for d in datalist) == sorted(f"{i}.nii.gz" for i in LABELLED)
    for d in datalist:
        saved = np.asarray(nib.load(d["label"]).dataobj)
        image_id = Path(d["image"]).name[: -len(".nii.gz")]
        np.testing.assert_array_equal(saved, np.asarray(nib.load(trained["sparse"][image_id]).dataobj))
        ids = np.unique(saved)
        assert ids[0] == 0 and len(ids) >= 3 and ids[1] >= 100  # 0 = unlabeled, arbitrary object ids


def test_train_task_writes_new_plain_student_weights(trained):
    bundle = trained["bundle"]
    assert _sha(bundle / "models" / "model.pt") != trained["initial_sha"]
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # a plain state dict, not a wrapper
    net = load_strict(bundle)  # strict: same keys and shapes as network_def
    assert net.state_dict().keys() == state.keys()
    assert (bundle / "models" / "teacher.pt").is_file() and (bundle / "models" / "resume.pt").is_file()
    resume = torch.load(bundle / "models" / "resume.pt", map_location="cpu", weights_only=True)
    # MONAI Label's max_epochs override reached the trainer, every epoch ran its epoch_length iterations (from the
    # copy's train.json, not one per image), and the cosine learning-rate schedule spans MONAI Label's epochs
    assert resume["trainer"]["max_epochs"] == EPOCHS and resume["trainer"]["epoch_length"] == EPOCH_LENGTH
    assert resume["trainer"]["iteration"] == EPOCHS * EPOCH_LENGTH
    assert resume["lr_scheduler"]["T_max"] == EPOCHS


@pytest.mark.parametrize("image_id", [NIFTI_IDS[2], TIFF_ID])
def test_infer_task_returns_the_bundle_segmentation(trained, image_id, tmp_path):
    from monailabel.tasks.infer.bundle import BundleInferTask

    bundle = trained["bundle"]
    task = BundleInferTask(str(bundle), {})
    assert task.is_valid() and task.dimension == 3
    image = trained["images"][image_id]
    out_file, result = task({"image": image, "device": "cpu"})
    assert Path(out_file).suffix == Path(image).suffix  # written in the input's format
    labels = read_result(out_file)
    assert labels.shape == SHAPE  # storage order of the input, TIFF included
    assert np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0
    reference = cli_segmentation(bundle, image, tmp_path)
    np.testing.assert_array_equal(labels, reference)
    assert json.dumps(result["label_names"])  # JSON-serialisable result params
    if image_id == TIFF_ID:  # the stack stays a (z, y, x) ImageJ-readable stack of 2D pages
        with tifffile.TiffFile(out_file) as tif:
            assert len(tif.pages) == SHAPE[0] and tif.pages[0].shape == SHAPE[1:]
    else:  # NIfTI keeps the voxel size
        assert nib.load(out_file).header.get_zooms()[:3] == nib.load(image).header.get_zooms()[:3]


def test_infer_task_bad_inputs_raise_clear_errors(trained, tmp_path):
    from monailabel.tasks.infer.bundle import BundleInferTask

    bad = write_bad_inputs(tmp_path)
    task = BundleInferTask(str(trained["bundle"]), {})
    with pytest.raises(ValueError, match=r"Cannot read NIfTI file .*corrupt_000\.nii\.gz"):
        task({"image": bad["corrupt_000"], "device": "cpu"})
    with pytest.raises(ValueError, match=r"flat_000\.tif: image has 2 dimension\(s\).*spatial_dims=3"):
        task({"image": bad["flat_000"], "device": "cpu"})
    out_file, _ = task({"image": trained["images"][NIFTI_IDS[0]], "device": "cpu"})  # the task still works
    assert read_result(out_file).shape == SHAPE


def test_infer_task_refuses_a_mismatched_checkpoint(trained):
    """MONAI Label loads model.pt with strict=False; the network refuses instead of keeping random weights."""
    from monailabel.tasks.infer.bundle import BundleInferTask

    bundle = Path(deploy_bundle(trained["app"], name="mismatch"))
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    torch.save({f"module.{k}": v for k, v in state.items()}, bundle / "models" / "model.pt")  # DDP-style keys
    task = BundleInferTask(str(bundle), {})
    with pytest.raises(RuntimeError, match=r"does not match EmbeddingUNet .*refusing a non-strict load"):
        task({"image": trained["images"][NIFTI_IDS[0]], "device": "cpu"})


def test_infer_task_2d_bundle_on_2d_tiff(trained, tmp_path):
    """A 2D model (spatial_dims 2 in the deployed configs): the result is a 2D image in the TIFF's (y, x) order."""
    from monailabel.tasks.infer.bundle import BundleInferTask

    bundle = Path(deploy_bundle(trained["app"], name="spoco2d"))
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["spatial_dims"] = 2
    (bundle / "configs" / "inference.json").write_text(json.dumps(config, indent=4))
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    image = tmp_path / "plane.tif"
    tifffile.imwrite(image, (np.random.default_rng(0).random((40, 56)) * 1000).astype(np.uint16))
    out_file, _ = BundleInferTask(str(bundle), {})({"image": str(image), "device": "cpu"})
    labels = read_result(out_file)
    assert labels.shape == (40, 56)
    np.testing.assert_array_equal(labels, cli_segmentation(bundle, str(image), tmp_path))
