"""MONAI Label adapters that need no MONAI Label: the writer-order transform and the deploy step (both venvs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImaged

from spoco_bundle.io import LoadVolumed, write_label_image
from spoco_bundle.monailabel import (
    MONAILABEL_POSTPROCESSING,
    MonaiLabelWriterOrderd,
    add_monailabel_postprocessing,
    deploy_bundle,
)

ROOT = Path(__file__).resolve().parents[1]


def _loaded(tmp_path: Path, name: str, shape: tuple, spacing: tuple) -> dict:
    """An image file of `shape` (storage order) loaded with the bundle's loader, plus a channel-first 'pred'."""
    array = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    path = tmp_path / name
    affine = np.eye(4)
    affine[range(len(spacing)), range(len(spacing))] = spacing
    write_label_image(path, array, {"affine": affine})
    data = LoadVolumed(keys="image")({"image": str(path)})
    data["pred"] = torch.as_tensor(array.astype(np.int32))[None]
    return data


def test_loader_is_a_loadimaged_so_monailabel_wraps_it():
    # BundleInferTask replaces LoadImaged instances by its LoadImageTensord wrapper and sets image_only=False
    assert isinstance(LoadVolumed(keys="image"), LoadImaged)


def test_writer_order_is_a_no_op_outside_monailabel(tmp_path):
    data = _loaded(tmp_path, "a.tif", (3, 4, 5), (2.0, 0.5, 0.25))
    out = MonaiLabelWriterOrderd(keys="pred")(data)
    assert out["pred"] is data["pred"]
    assert tuple(out["image"].meta["spatial_shape"]) == (3, 4, 5)


def test_writer_order_reverses_tiff_axes_and_geometry(tmp_path):
    data = _loaded(tmp_path, "a.tif", (3, 4, 5), (2.0, 0.5, 0.25))
    assert np.allclose(np.diag(data["image"].meta["original_affine"])[:3], [2.0, 0.5, 0.25])
    data["image_path"] = "a.tif"
    out = MonaiLabelWriterOrderd(keys="pred")(data)
    pred = np.asarray(out["pred"])
    assert pred.shape == (1, 5, 4, 3)
    # voxel (z, y, x) of the input is voxel (x, y, z) of the result: ITK index order, which MONAI Label's writer takes
    z, y, x = 2, 1, 3
    assert pred[0, x, y, z] == np.asarray(data["pred"])[0, z, y, x]
    assert tuple(out["image"].meta["spatial_shape"]) == (5, 4, 3)
    assert np.allclose(np.diag(out["image"].meta["original_affine"])[:3], [0.25, 0.5, 2.0])


def test_writer_order_keeps_nifti_order(tmp_path):
    data = _loaded(tmp_path, "a.nii.gz", (3, 4, 5), (2.0, 1.0, 1.0))
    data["image_path"] = "a.nii.gz"
    before = np.asarray(data["pred"]).copy()
    out = MonaiLabelWriterOrderd(keys="pred")(data)
    np.testing.assert_array_equal(np.asarray(out["pred"]), before)
    assert tuple(out["image"].meta["spatial_shape"]) == (3, 4, 5)


@pytest.mark.parametrize("name", ["a.tif", "a.nii.gz"])
def test_writer_order_drops_channel_for_2d(tmp_path, name):
    data = _loaded(tmp_path, name, (4, 5), (0.5, 0.25))
    data["image_path"] = name
    before = np.asarray(data["pred"])[0].copy()
    out = MonaiLabelWriterOrderd(keys="pred")(data)
    expected = before.T if name.endswith(".tif") else before
    np.testing.assert_array_equal(np.asarray(out["pred"]), expected)


def test_writer_order_rejects_wrong_rank(tmp_path):
    data = _loaded(tmp_path, "a.tif", (3, 4, 5), (1.0, 1.0, 1.0))
    data["image_path"] = "a.tif"
    data["pred"] = data["pred"][0]
    with pytest.raises(ValueError, match="channel-first with 3 spatial axes"):
        MonaiLabelWriterOrderd(keys="pred")(data)


def test_writer_order_needs_image_metadata():
    data = {"image_path": "x.tif", "image": MetaTensor(torch.zeros(1, 2, 2)), "pred": torch.zeros(1, 2, 2)}
    data["image"].meta.pop("spatial_shape", None)
    with pytest.raises(ValueError, match="no spatial_shape"):
        MonaiLabelWriterOrderd(keys="pred")(data)


def _app(tmp_path: Path) -> Path:
    app = tmp_path / "apps" / "monaibundle"
    app.mkdir(parents=True)
    (app / "main.py").write_text("# the monaibundle sample app's entry point\n")
    return app


def test_deploy_copies_a_self_contained_bundle_with_initial_weights(tmp_path):
    app = _app(tmp_path)
    dest = Path(deploy_bundle(app, name="spoco"))
    assert dest == app / "model" / "spoco"
    meta = dest / "configs" / "metadata.json"
    assert meta.is_file() and not meta.is_symlink()
    assert json.loads(meta.read_text()) == json.loads((ROOT / "metadata.json").read_text())
    for item in ("configs/inference.json", "configs/train.json", "spoco_bundle/networks.py", "LICENSE"):
        assert (dest / item).is_file(), item
    assert not list(dest.rglob("__pycache__"))
    # the initial model.pt is a plain state dict that loads strictly into network_def
    from monai.bundle import ConfigParser

    from spoco_bundle.networks import load_weights

    parser = ConfigParser()
    parser.read_config(str(dest / "configs" / "inference.json"))
    load_weights(parser.get_parsed_content("network_def"), str(dest / "models" / "model.pt"))
    # MONAI Label's writer is merged into the copy's postprocessing, last; the repository's config has none of it
    ours = json.loads((ROOT / "configs" / "inference.json").read_text())["postprocessing"]["transforms"]
    copy = json.loads((dest / "configs" / "inference.json").read_text())["postprocessing"]["transforms"]
    assert not any("monailabel" in step["_target_"] for step in ours)
    assert copy == ours + list(MONAILABEL_POSTPROCESSING)
    assert isinstance(parser.get_parsed_content("postprocessing").transforms[-1], MonaiLabelWriterOrderd)
    add_monailabel_postprocessing(dest / "configs" / "inference.json")  # once only
    assert json.loads((dest / "configs" / "inference.json").read_text())["postprocessing"]["transforms"] == copy
    with pytest.raises(FileExistsError, match="overwrite"):
        deploy_bundle(app, name="spoco")
    assert Path(deploy_bundle(app, name="spoco", overwrite=True)) == dest


def test_deploy_checks_the_checkpoint_and_the_app(tmp_path):
    app = _app(tmp_path)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save(net.state_dict(), good)
    torch.save({"model": net.state_dict(), "optimizer": {}}, tmp_path / "resume.pt")
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, bad)
    with pytest.raises(ValueError, match="does not match network_def"):
        deploy_bundle(app, name="a", checkpoint=bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        deploy_bundle(app, name="b", checkpoint=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not a MONAI Label app folder"):
        deploy_bundle(tmp_path, name="c")
    for name, ckpt in (("d", good), ("e", tmp_path / "resume.pt")):  # a resume checkpoint gives its student
        dest = Path(deploy_bundle(app, name=name, checkpoint=ckpt))
        saved = torch.load(dest / "models" / "model.pt", weights_only=True)
        assert saved.keys() == net.state_dict().keys()
        assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
