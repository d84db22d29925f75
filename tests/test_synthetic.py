"""Tests of the synthetic nuclei generator and the Decathlon-style dataset writer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from scipy import ndimage

from spoco_bundle.synthetic import generate_nuclei, write_synthetic_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]


def _touching_fraction(labels: np.ndarray) -> float:
    """Fraction of objects with a face neighbour that belongs to another object (reference via binary dilation)."""
    ids = [k for k in np.unique(labels) if k > 0]
    touching = 0
    for k in ids:
        mask = labels == k
        ring = ndimage.binary_dilation(mask) & ~mask
        touching += bool(np.any((labels[ring] > 0) & (labels[ring] != k)))
    return touching / len(ids)


def _check_partition(labels: np.ndarray) -> int:
    """Ids are 0..n consecutive and each object is one face-connected component; returns n."""
    ids = np.unique(labels)
    n = int(ids.max())
    np.testing.assert_array_equal(ids, np.arange(n + 1))
    for k in range(1, n + 1):
        _, n_components = ndimage.label(labels == k)
        assert n_components == 1, f"object {k} has {n_components} components"
    return n


@pytest.fixture(scope="module")
def volume_3d():
    return generate_nuclei(shape=(48, 96, 96), n_objects=(30, 40), spacing=(2.0, 1.0, 1.0), seed=0)


def test_shapes_dtypes_and_partition(volume_3d):
    image, labels = volume_3d
    assert image.shape == labels.shape == (48, 96, 96)
    assert image.dtype == np.float32 and labels.dtype == np.uint16
    assert np.all(np.isfinite(image))
    n = _check_partition(labels)
    assert 30 <= n <= 40


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_count_within_range(seed):
    _, labels = generate_nuclei(shape=(48, 96, 96), n_objects=(20, 26), seed=seed)
    assert 20 <= _check_partition(labels) <= 26
    _, labels = generate_nuclei(shape=(48, 96, 96), n_objects=33, seed=seed)
    assert labels.max() == 33


def test_default_count_is_dense():
    _, labels = generate_nuclei(seed=5)
    assert 25 <= labels.max() <= 45
    # a dense packing: a sizeable part of the volume is nuclei
    assert 0.12 < np.mean(labels > 0) < 0.5


def test_objects_touch(volume_3d):
    _, labels = volume_3d
    assert _touching_fraction(labels) >= 0.5


def test_reproducible_and_seed_dependent():
    a_img, a_lab = generate_nuclei(shape=(24, 64, 64), seed=7)
    b_img, b_lab = generate_nuclei(shape=(24, 64, 64), seed=7)
    c_img, c_lab = generate_nuclei(shape=(24, 64, 64), seed=8)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_lab, c_lab)
    assert not np.allclose(a_img, c_img)


def test_objects_brighter_than_background(volume_3d):
    image, labels = volume_3d
    fg = labels > 0
    bg_mean = image[~fg].mean()
    assert image[fg].mean() > 3 * bg_mean
    per_object = ndimage.mean(image, labels, index=np.arange(1, labels.max() + 1))
    assert np.mean(per_object > 2 * bg_mean) >= 0.9
    # brightness varies noticeably between objects
    assert per_object.std() / per_object.mean() > 0.1


def test_objects_round_physically_flat_in_voxels(volume_3d):
    """With spacing (2, 1, 1) objects are about half as extended along z in voxels, i.e. round in physical units."""
    _, labels = volume_3d
    ratios = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        touches_border = any(s.start == 0 or s.stop == n for s, n in zip(sl, labels.shape))
        if touches_border:
            continue
        coords = np.argwhere(labels[sl] == k).astype(float)
        std_vox = coords.std(axis=0)
        ratios.append(std_vox[0] * 2.0 / std_vox[1:].mean())  # z std in physical units over the in-plane std
    assert len(ratios) >= 5
    assert 0.75 < np.median(ratios) < 1.3


def test_2d_variant():
    image, labels = generate_nuclei(shape=(128, 128), n_objects=(15, 25), seed=3)
    assert image.shape == labels.shape == (128, 128)
    assert image.dtype == np.float32 and labels.dtype == np.uint16
    assert 15 <= _check_partition(labels) <= 25
    assert _touching_fraction(labels) >= 0.4
    assert image[labels > 0].mean() > 3 * image[labels == 0].mean()


def test_invalid_arguments():
    with pytest.raises(ValueError, match="shape"):
        generate_nuclei(shape=(4, 8, 8, 8))
    with pytest.raises(ValueError, match="spacing"):
        generate_nuclei(shape=(16, 32, 32), spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="n_objects"):
        generate_nuclei(shape=(16, 32, 32), n_objects=(5, 2))
    with pytest.raises(ValueError, match="ext"):
        write_synthetic_dataset("unused", ext=".png")


def _read(path: Path, ext: str):
    """Read an array and its spacing in storage order with nibabel or tifffile."""
    if ext == ".nii.gz":
        img = nib.load(str(path))
        return np.asarray(img.dataobj), tuple(float(v) for v in img.header.get_zooms()), img.get_data_dtype()
    with tifffile.TiffFile(path) as tif:
        array = tif.asarray()
        page = tif.pages[0]
        num, den = page.tags["XResolution"].value
        sx = den / num
        num, den = page.tags["YResolution"].value
        sy = den / num
        spacing = (sy, sx) if array.ndim == 2 else (tif.imagej_metadata["spacing"], sy, sx)
    return array, spacing, array.dtype


@pytest.mark.parametrize(
    "ext, spatial_dims, shape, spacing",
    [
        (".nii.gz", 3, (16, 40, 48), (2.0, 1.0, 1.0)),
        (".tif", 3, (16, 40, 48), (2.0, 0.5, 0.5)),
        (".tif", 2, (64, 72), (1.0, 1.0)),
    ],
)
def test_write_dataset_roundtrip(tmp_path, ext, spatial_dims, shape, spacing):
    out = tmp_path / "ds"
    ds = write_synthetic_dataset(
        out, n_train=2, n_val=1, n_test=1, shape=shape, spacing=spacing, seed=3, ext=ext, spatial_dims=spatial_dims
    )
    on_disk = json.loads((out / "dataset.json").read_text())
    assert on_disk == ds
    assert len(ds["training"]) == 2 and len(ds["validation"]) == 1 and len(ds["test"]) == 1
    train_images = {e["image"] for e in ds["training"]}
    val_images = {e["image"] for e in ds["validation"]}
    assert not train_images & val_images
    assert not {e["label"] for e in ds["training"]} & {e["label"] for e in ds["validation"]}
    assert all(e["image"].startswith("imagesTr/") and e["label"].startswith("labelsTr/") for e in ds["validation"])
    assert all(e["image"].startswith("imagesTs/") and e["label"].startswith("labelsTs/") for e in ds["test"])
    assert ds["synthetic"]["spacing"] == list(spacing)

    for entry in ds["training"] + ds["validation"] + ds["test"]:
        image, image_spacing, image_dtype = _read(out / entry["image"], ext)
        labels, label_spacing, label_dtype = _read(out / entry["label"], ext)
        assert image.shape == labels.shape == shape
        np.testing.assert_allclose(image_spacing, spacing, rtol=1e-5)
        np.testing.assert_allclose(label_spacing, spacing, rtol=1e-5)
        assert image_dtype == (np.float32 if ext == ".nii.gz" else np.uint16)
        assert label_dtype == np.uint16
        _check_partition(labels)
        assert labels.max() >= 1
        assert image[labels > 0].mean() > 2 * image[labels == 0].mean()

    # files on disk are exactly those listed
    listed = {e[k] for e in ds["training"] + ds["validation"] + ds["test"] for k in ("image", "label")}
    written = {str(p.relative_to(out)) for p in out.glob("*/*") if p.is_file()}
    assert written == listed


def test_write_dataset_nifti_affine_matches_storage_order(tmp_path):
    ds = write_synthetic_dataset(tmp_path, n_train=1, n_val=0, n_test=0, shape=(12, 32, 40), spacing=(2.5, 0.5, 0.75))
    img = nib.load(str(tmp_path / ds["training"][0]["image"]))
    assert img.shape == (12, 32, 40)
    np.testing.assert_allclose(img.affine, np.diag([2.5, 0.5, 0.75, 1.0]))


def test_write_dataset_idempotent(tmp_path):
    kwargs = dict(n_train=1, n_val=1, n_test=1, shape=(12, 32, 32), seed=1)
    ds1 = write_synthetic_dataset(tmp_path, **kwargs)
    first = tmp_path / ds1["training"][0]["image"]
    mtime = first.stat().st_mtime_ns
    ds2 = write_synthetic_dataset(tmp_path, **kwargs)
    assert ds2 == ds1
    assert first.stat().st_mtime_ns == mtime  # not rewritten

    # other parameters regenerate, and files of the earlier run disappear
    ds3 = write_synthetic_dataset(tmp_path, **{**kwargs, "n_train": 2, "n_test": 0, "seed": 2})
    assert ds3["synthetic"]["seed"] == 2 and len(ds3["training"]) == 2 and ds3["test"] == []
    listed = {e[k] for e in ds3["training"] + ds3["validation"] for k in ("image", "label")}
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.glob("*/*") if p.is_file()} == listed

    # a missing file triggers regeneration
    (tmp_path / ds3["validation"][0]["label"]).unlink()
    ds4 = write_synthetic_dataset(tmp_path, **{**kwargs, "n_train": 2, "n_test": 0, "seed": 2})
    assert ds4 == ds3 and (tmp_path / ds3["validation"][0]["label"]).is_file()


def test_same_seed_same_dataset(tmp_path):
    kwargs = dict(n_train=1, n_val=0, n_test=1, shape=(12, 32, 32), seed=4)
    ds_a = write_synthetic_dataset(tmp_path / "a", **kwargs)
    ds_b = write_synthetic_dataset(tmp_path / "b", **kwargs)
    for ea, eb in zip(ds_a["training"] + ds_a["test"], ds_b["training"] + ds_b["test"]):
        np.testing.assert_array_equal(
            _read(tmp_path / "a" / ea["label"], ".nii.gz")[0], _read(tmp_path / "b" / eb["label"], ".nii.gz")[0]
        )
    # train and test volumes are different draws
    la = _read(tmp_path / "a" / ds_a["training"][0]["label"], ".nii.gz")[0]
    lt = _read(tmp_path / "a" / ds_a["test"][0]["label"], ".nii.gz")[0]
    assert not np.array_equal(la, lt)


def test_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "spoco_bundle.synthetic", "--out_dir", str(tmp_path), "--spatial_dims", "2"]
    cmd += ["--n_train", "1", "--n_val", "1", "--n_test", "1", "--shape", "[48,64]", "--ext", ".tif"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "1 train / 1 val / 1 test" in lines[0]
    ds = json.loads((tmp_path / "dataset.json").read_text())
    assert ds["synthetic"]["shape"] == [48, 64] and ds["synthetic"]["spatial_dims"] == 2
    image, spacing, _ = _read(tmp_path / ds["test"][0]["image"], ".tif")
    assert image.shape == (48, 64) and spacing == (1.0, 1.0)
