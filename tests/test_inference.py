"""Inference bundle: NIfTI/TIFF in, instance volumes out with the input's geometry; bad inputs; strict weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import ConfigParser

from spoco_bundle.io import read_image
from spoco_bundle.networks import load_weights

ROOT = Path(__file__).resolve().parents[1]
INFER = str(ROOT / "configs" / "inference.json")
META = str(ROOT / "metadata.json")
FEATURES = "[8,16,32]"


def _network(spatial_dims: int):
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"features": [8, 16, 32], "spatial_dims": spatial_dims})
    return parser.get_parsed_content("network_def")


def _save_model(path: Path, spatial_dims: int) -> None:
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_network(spatial_dims).state_dict(), path)


def _infer(cwd: Path, inputs: Path, out: Path, ckpt: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        INFER,
        "--meta_file",
        META,
        "--dataset_dir",
        str(inputs),
        "--output_dir",
        str(out),
        "--ckpt_path",
        str(ckpt),
        "--device",
        "cpu",
        "--features",
        FEATURES,
        *extra,
    ]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_nifti_and_tiff_keep_shape_axes_and_spacing(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    vol = rng.random((12, 40, 36)).astype(np.float32)  # asymmetric: (z, y, x)
    affine = np.diag([2.5, 0.5, 0.4, 1.0])
    nib.save(nib.Nifti1Image(vol, affine), inputs / "a.nii.gz")
    tifffile.imwrite(
        inputs / "b.tif",
        (vol * 1000).astype(np.uint16),
        imagej=True,
        resolution=(1 / 0.4, 1 / 0.5),
        metadata={"spacing": 2.5, "unit": "um", "axes": "ZYX"},
    )
    ckpt = tmp_path / "models" / "model.pt"
    _save_model(ckpt, 3)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = _infer(cwd, inputs, tmp_path / "out", ckpt, "--patch_size", "[8,32,32]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, ext in (("a", ".nii.gz"), ("b", ".tif")):
        labels, meta = read_image(tmp_path / "out" / f"{name}_instances{ext}")
        assert labels.shape == vol.shape
        assert labels.dtype == np.uint16
        np.testing.assert_allclose(np.abs(np.diag(np.asarray(meta["affine"]))[:3]), [2.5, 0.5, 0.4], rtol=1e-3)
    # written by nibabel/tifffile as an outside tool would read them
    assert nib.load(tmp_path / "out" / "a_instances.nii.gz").shape == vol.shape
    with tifffile.TiffFile(tmp_path / "out" / "b_instances.tif") as tif:
        assert tif.series[0].shape == vol.shape and tif.imagej_metadata["spacing"] == pytest.approx(2.5)


def test_output_ext_override_and_2d(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    img = np.random.default_rng(1).random((50, 70)).astype(np.float32)
    tifffile.imwrite(inputs / "c.tif", img)
    ckpt = tmp_path / "model.pt"
    _save_model(ckpt, 2)
    proc = _infer(
        tmp_path,
        inputs,
        tmp_path / "out",
        ckpt,
        "--spatial_dims",
        "2",
        "--patch_size",
        "[32,32]",
        "--output_ext",
        ".nii.gz",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels, _ = read_image(tmp_path / "out" / "c_instances.nii.gz")
    assert labels.shape == (50, 70)


def test_bad_inputs_are_skipped_and_reported(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(np.random.rand(12, 32, 32).astype(np.float32), np.eye(4)), inputs / "good.nii.gz")
    (inputs / "corrupt.nii.gz").write_bytes(b"not a nifti file")
    tifffile.imwrite(inputs / "flat.tif", np.random.rand(32, 32).astype(np.float32))  # 2D for a 3D model
    ckpt = tmp_path / "model.pt"
    _save_model(ckpt, 3)
    proc = _infer(tmp_path, inputs, tmp_path / "out", ckpt, "--patch_size", "[8,32,32]")
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "corrupt.nii.gz" in log and "flat.tif" in log and "2 of 3 inputs failed" in log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good_instances.nii.gz"]  # nothing partial


def test_missing_and_mismatched_checkpoint(tmp_path):
    net = _network(3)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_weights(net, str(tmp_path / "missing.pt"))
    torch.save(_network(2).state_dict(), tmp_path / "2d.pt")
    with pytest.raises(ValueError, match="does not match network_def"):
        load_weights(net, str(tmp_path / "2d.pt"))
    _save_model(tmp_path / "ok.pt", 3)
    load_weights(net, str(tmp_path / "ok.pt"))
    reference = torch.load(tmp_path / "ok.pt", weights_only=True)
    assert all(torch.equal(v, reference[k]) for k, v in net.state_dict().items())
