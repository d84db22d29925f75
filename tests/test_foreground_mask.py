"""Inference with a given foreground mask per image (`foreground_mask_dir`): the file rule, transforms, the CLI."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import ConfigParser

from spoco_bundle.bundle import inference_postprocessing
from spoco_bundle.data import foreground_mask_file, foreground_mask_index
from spoco_bundle.io import read_image
from spoco_bundle.postprocessing import (
    ClusterInstances,
    ClusterInstancesd,
    ForegroundMask,
    ForegroundMaskd,
    RemoveSmallInstances,
)
from spoco_bundle.transforms import LoadForegroundMaskd

ROOT = Path(__file__).resolve().parents[1]
INFER = str(ROOT / "configs" / "inference.json")
META = str(ROOT / "metadata.json")
FEATURES = [8, 16, 32]


def _save_model(path: Path, spatial_dims: int) -> None:
    """A random network whose foreground head marks a good part of an image (bias 0 instead of the initial -2,
    which leaves a random head's mask nearly empty), so that the head and a given mask differ visibly."""
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"features": FEATURES, "spatial_dims": spatial_dims})
    torch.manual_seed(0)
    state = parser.get_parsed_content("network_def").state_dict()
    state["output_block.conv.conv.bias"][-1] = 0.0
    torch.save(state, path)


def _infer(tmp: Path, inputs: Path, out: Path, ckpt: Path, *extra: str) -> subprocess.CompletedProcess:
    """``monai.bundle run`` with the real inference config, from an unrelated working directory."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", INFER, "--meta_file", META]
    cmd += ["--dataset_dir", str(inputs), "--output_dir", str(out), "--ckpt_path", str(ckpt), "--device", "cpu"]
    cmd += ["--features", str(FEATURES).replace(" ", ""), *extra]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)


def _labels(path: Path) -> np.ndarray:
    return read_image(path)[0]


# ------------------------------------------------------------------------------------------------ file rule


def test_mask_file_rule_same_stem_any_suffix(tmp_path):
    masks, images = tmp_path / "masks", tmp_path / "images"
    masks.mkdir()
    images.mkdir()
    for name in ("a.TIF", "b.nii.gz", "c.tif", "c.nii", "d_mask.tif", ".e.tif", "notes.txt"):
        (masks / name).write_bytes(b"")
    index = foreground_mask_index(masks, [str(images / "a.tif")])
    assert foreground_mask_file(images / "a.nii.gz", index) == str(masks / "a.TIF")  # suffix in any case
    assert foreground_mask_file(images / "b.tif", index) == str(masks / "b.nii.gz")  # another format
    with pytest.raises(ValueError, match=r"2 candidate foreground masks for image .*c\.tif: .*c\.nii, .*c\.tif"):
        foreground_mask_file(images / "c.tif", index)
    for image in ("d.tif", "e.tif", "A.tif"):  # no suffix games, hidden files ignored, stems are case-sensitive
        with pytest.raises(FileNotFoundError, match=rf"no foreground mask for image .*{image} in .*masks"):
            foreground_mask_file(images / image, index, masks)
    with pytest.raises(FileNotFoundError, match="foreground_mask_dir .*missing does not exist"):
        foreground_mask_index(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        foreground_mask_index(masks / "notes.txt")
    with pytest.raises(ValueError, match="is the folder of the input images"):
        foreground_mask_index(masks, [str(masks / "c.tif")])


# ------------------------------------------------------------------------------------------------ transforms


def test_the_postprocessing_keeps_to_a_given_mask():
    rng = np.random.default_rng(0)
    emb = np.zeros((4, 24, 30), np.float32)  # two objects, 4-D embeddings, no foreground head channel
    emb[0, :, 15:] = 5.0
    emb += 0.01 * rng.standard_normal(emb.shape).astype(np.float32)
    mask = np.zeros((24, 30), bool)
    mask[4:20, 5:25] = True
    for method in ("fast", "watershed"):
        foreground = ForegroundMask("head", 0.5, embedding_dim=4, method=method)
        cluster = ClusterInstances(method, embedding_dim=4, background="head", min_size=4)

        def segment(fg_mask=None):  # the array steps of the chain: the foreground, clustering, small objects
            return RemoveSmallInstances(4)(cluster(emb, foreground(emb, fg_mask)))

        labels = segment(mask)[0]
        assert labels.max() == 2 and not labels[~mask].any() and labels[mask].all()
        with pytest.raises(ValueError, match="foreground head"):  # without the mask, "head" needs the channel
            segment()
        with pytest.raises(ValueError, match=r"mask has shape \(24, 29\).*spatial shape \(24, 30\)"):
            segment(mask[:, 1:])
    # configs/inference.json's chain takes it from the data
    post = inference_postprocessing(
        ROOT, embedding_dim=4, clustering="fast", background="largest", min_size=4, shape_split=0, min_diameter_ratio=0
    )
    image = torch.zeros(1, 24, 30)
    out = post({"pred": torch.as_tensor(emb), "image": image, "foreground_mask": torch.as_tensor(mask)[None]})["pred"]
    assert torch.equal(out[0] > 0, torch.as_tensor(mask))
    # a file name that was never loaded is an error of the chain's foreground and clustering steps
    for step in post.transforms:
        if isinstance(step, (ForegroundMaskd, ClusterInstancesd)):
            with pytest.raises(TypeError, match="still a file name .*m.tif.*LoadForegroundMaskd"):
                step({"pred": torch.as_tensor(emb), "image": image, "foreground_mask": "m.tif"})
    assert sum(isinstance(step, (ForegroundMaskd, ClusterInstancesd)) for step in post.transforms) == 2


def test_load_foreground_mask_reads_checks_and_warns(tmp_path, caplog):
    from spoco_bundle.io import LoadVolumed
    from spoco_bundle.transforms import EnsureSpatialDims

    tifffile.imwrite(tmp_path / "img.tif", np.random.default_rng(0).random((20, 24)).astype(np.float32))
    image = EnsureSpatialDims(2)(LoadVolumed("image")({"image": str(tmp_path / "img.tif")})["image"][None])
    mask = np.zeros((20, 24, 1), np.float32)  # a 2D NIfTI stored (H, W, 1), values 0 / 2
    mask[5:10] = 2.0
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "m.nii.gz")
    load = LoadForegroundMaskd("foreground_mask", spatial_dims=2)
    out = load({"image": image, "foreground_mask": str(tmp_path / "m.nii.gz")})["foreground_mask"]
    assert out.dtype == torch.bool and out.shape == (1, 20, 24)
    assert torch.equal(out[0], torch.as_tensor(mask[..., 0] != 0))
    assert load({"image": image}) == {"image": image}  # no mask given: nothing happens

    def fails(array: np.ndarray, match: str) -> None:
        tifffile.imwrite(tmp_path / "bad.tif", array, metadata={"axes": "ZYX"[-array.ndim :]})
        with pytest.raises(ValueError, match=match):
            load({"image": image, "foreground_mask": str(tmp_path / "bad.tif")})

    fails(np.ones((20, 25), np.uint8), r"bad\.tif has spatial shape \(20, 25\), but image .*img\.tif has \(20, 24\)")
    fails(np.ones((3, 20, 24), np.uint8), r"bad\.tif.*spatial_dims=2")
    fails(np.full((20, 24), np.nan, np.float32), r"bad\.tif .*NaN")
    (tmp_path / "corrupt.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(ValueError, match=r"Cannot read foreground mask .*corrupt\.nii\.gz \(for image .*img\.tif\)"):
        load({"image": image, "foreground_mask": str(tmp_path / "corrupt.nii.gz")})
    caplog.set_level(logging.WARNING)
    for array, message in ((np.full((20, 24), 0.7, np.float32), "probability map"), (np.zeros((20, 24)), "empty")):
        tifffile.imwrite(tmp_path / "warn.tif", array.astype(np.float32))
        load({"image": image, "foreground_mask": str(tmp_path / "warn.tif")})
        assert message in caplog.text


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.slow
def test_cli_clusters_only_inside_the_masks(tmp_path):
    """3D, NIfTI and TIFF images with masks of the other format: no instance outside a mask, while the head's
    foreground on the same images reaches outside it."""
    inputs, masks = tmp_path / "in", tmp_path / "masks"
    inputs.mkdir()
    masks.mkdir()
    vol = np.random.default_rng(0).random((12, 40, 36)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([2.5, 0.5, 0.4, 1.0])), inputs / "a.nii.gz")
    tifffile.imwrite(inputs / "b.tif", (vol * 1000).astype(np.uint16), imagej=True, metadata={"axes": "ZYX"})
    mask_a = np.zeros(vol.shape, np.uint8)
    mask_a[2:10, 5:25, 4:30] = 255
    mask_b = np.zeros(vol.shape, np.float32)
    mask_b[:, 20:, :18] = 1.0
    tifffile.imwrite(masks / "a.tif", mask_a, imagej=True, metadata={"axes": "ZYX"})
    nib.save(nib.Nifti1Image(mask_b, np.eye(4)), masks / "b.nii.gz")
    ckpt = tmp_path / "model.pt"
    _save_model(ckpt, 3)
    common = ("--patch_size", "[8,32,32]", "--min_size", "4")
    proc = _infer(tmp_path, inputs, tmp_path / "out", ckpt, *common, "--foreground_mask_dir", str(masks))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in mask" in proc.stdout + proc.stderr
    head = _infer(tmp_path, inputs, tmp_path / "head", ckpt, *common)
    assert head.returncode == 0, head.stderr[-3000:]
    for name, ext, mask in (("a", ".nii.gz", mask_a != 0), ("b", ".tif", mask_b != 0)):
        labels = _labels(tmp_path / "out" / f"{name}_instances{ext}")
        assert labels.shape == vol.shape
        assert not labels[~mask].any()  # nothing outside the mask
        assert (labels[mask] > 0).mean() > 0.9  # watershed fills the mask but for objects under min_size
        assert _labels(tmp_path / "head" / f"{name}_instances{ext}")[~mask].any()  # the head's mask is another


@pytest.mark.slow
def test_cli_full_mask_differs_from_the_head_and_works_with_image_scale(tmp_path):
    """2D TIFF image, NIfTI masks stored (H, W, 1): the mask, not the head, decides the foreground; with
    ``--image_scale`` the mask stays on the input's grid like the written labels."""
    inputs, full, part = tmp_path / "in", tmp_path / "full", tmp_path / "part"
    for folder in (inputs, full, part):
        folder.mkdir()
    tifffile.imwrite(inputs / "c.tif", np.random.default_rng(1).random((50, 70)).astype(np.float32))
    nib.save(nib.Nifti1Image(np.ones((50, 70, 1), np.uint8), np.eye(4)), full / "c.nii.gz")
    mask = np.zeros((50, 70), np.uint8)
    mask[10:40, 30:65] = 1
    nib.save(nib.Nifti1Image(mask[..., None], np.eye(4)), part / "c.nii")
    ckpt = tmp_path / "model.pt"
    _save_model(ckpt, 2)
    common = ("--spatial_dims", "2", "--patch_size", "[32,32]", "--min_size", "4")
    runs = {
        "head": (),
        "full": ("--foreground_mask_dir", str(full)),
        "part": ("--foreground_mask_dir", str(part), "--image_scale", "0.5"),
    }
    labels = {}
    for run, extra in runs.items():
        proc = _infer(tmp_path, inputs, tmp_path / f"out_{run}", ckpt, *common, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        labels[run] = _labels(tmp_path / f"out_{run}" / "c_instances.tif")
        assert labels[run].shape == (50, 70)
    assert (labels["full"] > 0).mean() > 0.9 > (labels["head"] > 0).mean()
    assert not np.array_equal(labels["full"], labels["head"])
    assert not labels["part"][mask == 0].any() and (labels["part"][mask != 0] > 0).mean() > 0.9


@pytest.mark.slow
def test_cli_bad_masks_fail_per_file_and_a_missing_folder_before_any_work(tmp_path):
    inputs, masks = tmp_path / "in", tmp_path / "masks"
    inputs.mkdir()
    masks.mkdir()
    vol = np.random.default_rng(2).random((12, 32, 32)).astype(np.float32)
    for name in ("good", "nomask", "shape", "two", "corrupt"):
        nib.save(nib.Nifti1Image(vol, np.eye(4)), inputs / f"{name}.nii.gz")
    tifffile.imwrite(masks / "good.tif", np.ones(vol.shape, np.uint8))
    tifffile.imwrite(masks / "shape.tif", np.ones((12, 32, 31), np.uint8))
    tifffile.imwrite(masks / "two.tif", np.ones(vol.shape, np.uint8))
    nib.save(nib.Nifti1Image(np.ones(vol.shape, np.uint8), np.eye(4)), masks / "two.nii.gz")
    (masks / "corrupt.nii.gz").write_bytes(b"not a nifti file")
    ckpt = tmp_path / "model.pt"
    _save_model(ckpt, 3)
    common = ("--patch_size", "[8,32,32]")
    proc = _infer(tmp_path, inputs, tmp_path / "out", ckpt, *common, "--foreground_mask_dir", str(masks))
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "4 of 5 inputs failed" in log
    assert f"no foreground mask for image {inputs / 'nomask.nii.gz'} in {masks}" in log
    assert f"foreground mask {masks / 'shape.tif'} has spatial shape (12, 32, 31), but image" in log
    assert f"2 candidate foreground masks for image {inputs / 'two.nii.gz'}" in log
    assert f"Cannot read foreground mask {masks / 'corrupt.nii.gz'}" in log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good_instances.nii.gz"]  # nothing partial

    missing = _infer(tmp_path, inputs, tmp_path / "out2", ckpt, *common, "--foreground_mask_dir", str(tmp_path / "no"))
    assert missing.returncode != 0
    assert f"foreground_mask_dir {tmp_path / 'no'} does not exist" in missing.stdout + missing.stderr
    assert not (tmp_path / "out2").exists()
