"""Tests of spoco_bundle.data: data list discovery, validation and the validation split."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile

from spoco_bundle.data import build_datalist, epoch_sampler, epoch_samples, split_for_validation, validate_datalist

DATA_DIR = Path(os.environ.get("SPOCO_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
GONUCLEAR = DATA_DIR / "gonuclear"


def save(path: Path, arr: np.ndarray, spacing=None) -> Path:
    """Write ``arr`` as NIfTI or TIFF depending on the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    spacing = spacing or [1.0] * arr.ndim
    if path.name.endswith((".nii", ".nii.gz")):
        nib.save(nib.Nifti1Image(arr, np.diag(list(spacing)[:3] + [1.0] * (4 - min(arr.ndim, 3)))), path)
    else:
        meta = {"axes": "ZYX"} if arr.ndim == 3 else {}
        imagej = arr.dtype in (np.uint8, np.uint16, np.float32)
        tifffile.imwrite(path, arr, imagej=imagej, metadata=meta, photometric="minisblack")
    return path


def blobs(shape, n, dtype=np.uint16, seed=0):
    """Label map with ``n`` non-overlapping single-voxel-wide slabs, ids 1..n (a known object count)."""
    lab = np.zeros(shape, dtype)
    for i in range(n):
        lab[(slice(None),) * (len(shape) - 1) + (slice(2 * i, 2 * i + 1),)] = i + 1
    return lab


def image(shape, dtype=np.uint8):
    return (np.arange(np.prod(shape)) % 200).reshape(shape).astype(dtype)


# ------------------------------------------------------------------------------------------------ build_datalist


def test_folder_pairing_absolute_sorted(tmp_path):
    for name in ("b.tif", "a.nii.gz", "c.tiff"):
        save(tmp_path / "imagesTr" / name, image((3, 4, 5)))
        save(tmp_path / "labelsTr" / name, blobs((3, 4, 5), 2))
    (tmp_path / "imagesTr" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "imagesTr" / "README.txt").write_text("not an image")
    save(tmp_path / "imagesTr" / "case_0000.nii.gz", image((3, 4, 5)))  # nnU-Net channel suffix
    save(tmp_path / "labelsTr" / "case.nii.gz", blobs((3, 4, 5), 2))
    dl = build_datalist(tmp_path)
    names = [(Path(d["image"]).name, Path(d["label"]).name) for d in dl]
    assert names == [
        ("a.nii.gz", "a.nii.gz"),
        ("b.tif", "b.tif"),
        ("c.tiff", "c.tiff"),
        ("case_0000.nii.gz", "case.nii.gz"),
    ]
    assert all(os.path.isabs(d["image"]) and os.path.isabs(d["label"]) for d in dl)
    assert build_datalist(tmp_path, section="validation") == []
    assert build_datalist(tmp_path, section="test") == []


def test_dataset_json(tmp_path):
    for name in ("x", "y", "z"):
        save(tmp_path / "imgs" / f"{name}.nii.gz", image((3, 4, 5)))
        save(tmp_path / "labs" / f"{name}.nii.gz", blobs((3, 4, 5), 1))
    spec = {
        "training": [
            {"image": "./imgs/x.nii.gz", "label": "./labs/x.nii.gz"},
            {"image": "imgs/y.nii.gz", "label": "labs/y.nii.gz"},
        ],
        "validation": [{"image": "imgs/z.nii.gz", "label": "labs/z.nii.gz"}],
        "test": ["imgs/z.nii.gz"],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    train = build_datalist(tmp_path, "training")
    assert [d["image"] for d in train] == [str(tmp_path / "imgs" / "x.nii.gz"), str(tmp_path / "imgs" / "y.nii.gz")]
    assert [d["label"] for d in train] == [str(tmp_path / "labs" / "x.nii.gz"), str(tmp_path / "labs" / "y.nii.gz")]
    assert build_datalist(tmp_path, "validation") == [
        {"image": str(tmp_path / "imgs" / "z.nii.gz"), "label": str(tmp_path / "labs" / "z.nii.gz")}
    ]
    assert build_datalist(tmp_path, "test") == [{"image": str(tmp_path / "imgs" / "z.nii.gz")}]
    del spec["validation"]
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    assert build_datalist(tmp_path, "validation") == []


def test_build_datalist_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="nowhere"):
        build_datalist(missing)
    empty = tmp_path / "empty_dataset"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_dataset.*imagesTr"):
        build_datalist(empty)
    # image without label
    orphan = tmp_path / "orphan"
    save(orphan / "imagesTr" / "lonely_image.tif", image((4, 5)))
    save(orphan / "imagesTr" / "ok.tif", image((4, 5)))
    save(orphan / "labelsTr" / "ok.tif", blobs((4, 5), 1))
    with pytest.raises(ValueError, match="lonely_image.tif"):
        build_datalist(orphan)
    # empty training folders
    none = tmp_path / "no_images"
    (none / "imagesTr").mkdir(parents=True)
    (none / "labelsTr").mkdir()
    with pytest.raises(ValueError, match="empty"):
        build_datalist(none)
    # dataset.json listing a missing file
    listed = tmp_path / "listed"
    save(listed / "a.tif", image((4, 5)))
    (listed / "dataset.json").write_text(json.dumps({"training": [{"image": "a.tif", "label": "missing_label.tif"}]}))
    with pytest.raises(ValueError, match="missing_label.tif"):
        build_datalist(listed)
    # dataset.json with an empty training list
    (listed / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match="empty"):
        build_datalist(listed)
    with pytest.raises(ValueError, match="section"):
        build_datalist(listed, section="train")


# ----------------------------------------------------------------------------------------------- validate_datalist


def pair(tmp_path, name, img, lab, img_suffix=".nii.gz", lab_suffix=None):
    lab_suffix = lab_suffix or img_suffix
    return {
        "image": str(save(tmp_path / f"{name}_img{img_suffix}", img)),
        "label": str(save(tmp_path / f"{name}_lab{lab_suffix}", lab)),
    }


def test_validate_good_3d_and_summary(tmp_path):
    dl = [
        pair(tmp_path, "a", image((3, 4, 9)), blobs((3, 4, 9), 4), ".nii.gz"),
        pair(tmp_path, "b", image((5, 6, 7), np.float32), blobs((5, 6, 7), 3, np.uint32), ".tif"),
        pair(tmp_path, "c", image((5, 6, 7)), np.zeros((5, 6, 7), np.uint16), ".tif"),
    ]
    summary = validate_datalist(dl, spatial_dims=3)
    assert summary["num_images"] == 3 and summary["num_labels"] == 3
    assert summary["objects_per_image"] == [4, 3, 0]
    assert summary["num_objects"] == 7
    assert summary["min_spatial_shape"] == (3, 4, 7) and summary["max_spatial_shape"] == (5, 6, 9)
    # background id not counted as an object
    assert validate_datalist(dl, 3, background_label=1)["objects_per_image"] == [3, 2, 0]


def test_validate_2d_squeezes_singleton_axes(tmp_path):
    dl = [  # a 2D NIfTI stored as (7, 9, 1): the trailing singleton is dropped for 2D
        pair(tmp_path, "hw1", image((7, 9))[..., None], blobs((7, 9), 2)[..., None], ".nii.gz"),
        pair(tmp_path, "hw", image((7, 9)), blobs((7, 9), 3), ".tif"),
    ]
    summary = validate_datalist(dl, spatial_dims=2)
    assert summary["objects_per_image"] == [2, 3]
    assert summary["min_spatial_shape"] == (7, 9)


@pytest.mark.parametrize(
    "case",
    ["unreadable", "2d_for_3d", "3d_for_2d", "shape_mismatch", "float_label", "scaled_int_label", "negative", "nan"],
)
def test_validate_rejects_bad_files(tmp_path, case):
    spatial_dims = 3
    img, lab = image((3, 4, 9)), blobs((3, 4, 9), 2)
    bad = "bad_image" if case in ("unreadable", "2d_for_3d", "nan") else "bad_label"
    if case == "2d_for_3d":
        img, lab = image((4, 9)), blobs((4, 9), 2)
    elif case == "3d_for_2d":
        spatial_dims, bad = 2, "bad_image"
    elif case == "shape_mismatch":
        lab = blobs((3, 4, 8), 2)
    elif case == "float_label":
        lab = lab.astype(np.float32)  # whole numbers, still rejected
    elif case == "negative":
        lab = lab.astype(np.int16)
        lab[0, 0, 0] = -3
    elif case == "nan":
        img = img.astype(np.float32)
        img[1, 1, 1] = np.nan
    good_shape = (3, 4, 9)[-spatial_dims:]
    good = pair(tmp_path, "good", image(good_shape), blobs(good_shape, 2))
    item = {
        "image": str(save(tmp_path / "bad_image.nii.gz", img)),
        "label": str(save(tmp_path / "bad_label.nii.gz", lab)),
    }
    if case == "unreadable":
        Path(item["image"]).write_bytes(b"\x1f\x8b garbage that is not a NIfTI file")
    if case == "scaled_int_label":
        # integer on disk with a scale factor: nibabel returns floats, so it is rejected like a float label
        scaled = nib.Nifti1Image(lab.astype(np.float32) * 0.5, np.eye(4))
        scaled.set_data_dtype(np.int16)
        nib.save(scaled, item["label"])
        assert np.asanyarray(nib.load(item["label"]).dataobj).dtype.kind == "f"
    with pytest.raises(ValueError, match=bad):
        validate_datalist([good, item], spatial_dims=spatial_dims)


def test_validate_accepts_integer_nifti_without_scaling(tmp_path):
    dl = [pair(tmp_path, "i16", image((3, 4, 9)), blobs((3, 4, 9), 2, np.int16))]
    assert validate_datalist(dl, 3)["num_objects"] == 2


def test_validate_multichannel_2d_rejected(tmp_path):
    dl = [pair(tmp_path, "rgbish", image((7, 9, 3)), blobs((7, 9, 3), 2))]
    with pytest.raises(ValueError, match="rgbish_img"):
        validate_datalist(dl, spatial_dims=2)


def test_images_of_the_other_dimensionality_name_the_flag_that_fits(tmp_path):
    flat = [pair(tmp_path, "flat", image((32, 40)), blobs((32, 40), 2))]
    with pytest.raises(ValueError, match=r"flat_img.*spatial_dims=3 .*train with --spatial_dims 2"):
        validate_datalist(flat, spatial_dims=3)
    stack = [pair(tmp_path, "stack", image((6, 32, 40)), blobs((6, 32, 40), 2))]
    with pytest.raises(ValueError, match=r"stack_img.*spatial_dims=2 .*train with --spatial_dims 3"):
        validate_datalist(stack, spatial_dims=2)
    channels = [pair(tmp_path, "channels", image((6, 32, 40, 1, 2)), blobs((6, 32, 40), 2))]  # NIfTI components
    with pytest.raises(ValueError, match=r"channels_img.* has 2 channels .*--input_channel"):
        validate_datalist(channels, spatial_dims=3)
    assert validate_datalist(channels, spatial_dims=3, input_channel=1)["num_objects"] == 2


def test_validate_no_objects_at_all(tmp_path):
    dl = [pair(tmp_path, n, image((3, 4, 9)), np.zeros((3, 4, 9), np.uint16)) for n in ("p", "q")]
    with pytest.raises(ValueError, match="annotated object"):
        validate_datalist(dl, 3)


def test_validate_warns_about_a_constant_16bit_image(tmp_path, caplog):
    flat = np.full((3, 4, 9), 512, dtype=np.uint16)
    dl = [
        pair(tmp_path, "flat", flat, blobs((3, 4, 9), 2)),
        pair(tmp_path, "ok", image((3, 4, 9)), blobs((3, 4, 9), 2)),
    ]
    with caplog.at_level(logging.WARNING, logger="spoco_bundle.data"):
        assert validate_datalist(dl, 3)["num_objects"] == 4  # legal, so training goes on
    warned = [r.getMessage() for r in caplog.records if "constant" in r.getMessage()]
    assert len(warned) == 1 and "flat_img" in warned[0] and "512" in warned[0]


@pytest.mark.skipif(not GONUCLEAR.is_dir(), reason=f"real data not found at {GONUCLEAR}")
def test_validate_real_gonuclear():
    dl = [
        {"image": str(GONUCLEAR / "1135_image.nii.gz"), "label": str(GONUCLEAR / "1135_labels.nii.gz")},
        {"image": str(GONUCLEAR / "1136_image.tif"), "label": str(GONUCLEAR / "1136_labels.tif")},
    ]
    summary = validate_datalist(dl, 3)
    ref = [
        len(np.unique(np.asarray(nib.load(dl[0]["label"]).dataobj))) - 1,
        len(np.unique(tifffile.imread(dl[1]["label"]))) - 1,
    ]
    assert summary["objects_per_image"] == ref == [54, 32]  # counts stated in the data README
    np.testing.assert_allclose(summary["spacings"], [[0.284, 0.127, 0.127]] * 2, atol=2e-3)


# -------------------------------------------------------------------------------------------- split_for_validation


def test_split_for_validation():
    dl = [{"image": f"{i}.tif", "label": f"{i}_l.tif"} for i in range(10)]
    train, val = split_for_validation(dl, 0.25, seed=3)
    assert len(val) == 3 and len(train) == 7  # round half up: 2.5 -> 3
    assert sorted(d["image"] for d in train + val) == sorted(d["image"] for d in dl)
    assert [d["image"] for d in train] == [d["image"] for d in dl if d not in val]  # input order kept
    assert split_for_validation(dl, 0.25, seed=3) == (train, val)
    assert split_for_validation(dl, 0.25, seed=4) != (train, val)
    assert split_for_validation(dl[:2], 0.01, seed=0)[1] != []  # at least one validation item
    assert len(split_for_validation(dl[:1], 0.5, seed=0)[0]) == 1  # training never empty


def test_epoch_samples_whole_file_lists_covering_an_epoch():
    assert epoch_samples(1, 100) == 100  # one volume: a pass is the epoch
    assert epoch_samples(12, 100) == 108  # nine whole reshuffled lists
    assert epoch_samples(268, 100) == 268  # more files than iterations: the file list
    assert epoch_samples(3, 3.0) == 3
    for bad in (0, -5, 2.5, None, True, "100"):
        with pytest.raises(ValueError, match="epoch_length"):
            epoch_samples(4, bad)
    with pytest.raises(ValueError, match="empty"):
        epoch_samples(0, 100)


def test_epoch_sampler_draws_each_file_as_often_in_reshuffled_passes():
    sampler = epoch_sampler(list(range(12)), 100)
    drawn = list(iter(sampler))
    assert len(sampler) == len(drawn) == 108  # epoch_samples(12, 100): nine whole lists
    assert np.array_equal(np.bincount(drawn, minlength=12), np.full(12, 9))  # every file in every pass
    assert any(drawn[k * 12 : (k + 1) * 12] != list(range(12)) for k in range(9))  # not the list's order
    with pytest.raises(ValueError, match="empty"):
        epoch_sampler([], 100)


def test_evaluation_data_comes_from_the_layouts_training_reads(tmp_path, caplog):
    from spoco_bundle.data import evaluation_datalist

    def layout(root: Path, images: str, labels: str, names: tuple[str, ...]) -> list[dict]:
        (root / images).mkdir(parents=True)
        (root / labels).mkdir()
        return [pair_in(root / images, root / labels, n) for n in names]

    def pair_in(images: Path, labels: Path, name: str) -> dict:
        save(images / f"{name}.nii.gz", image((3, 8, 9)))
        save(labels / f"{name}.nii.gz", blobs((3, 8, 9), 2))
        return {"image": str(images / f"{name}.nii.gz"), "label": str(labels / f"{name}.nii.gz")}

    # imagesTr/ + labelsTr/ alone: the training pairs, with a warning that the model may have trained on them
    only_training = layout(tmp_path / "a", "imagesTr", "labelsTr", ("x", "y"))
    with caplog.at_level("INFO"):
        assert evaluation_datalist(tmp_path / "a", 3) == only_training
    assert "may have been trained on" in caplog.text and "scoring 2 image(s): the training pairs" in caplog.text
    # imagesTs/ + labelsTs/ beside them: those
    caplog.clear()
    held_out = layout(tmp_path / "b", "imagesTs", "labelsTs", ("z",))
    layout(tmp_path / "b", "imagesTr", "labelsTr", ("x",))
    with caplog.at_level("INFO"):
        assert evaluation_datalist(tmp_path / "b", 3) == held_out
    assert "may have been trained on" not in caplog.text
    assert f"scoring 1 image(s): the pairs of {tmp_path / 'b' / 'imagesTs'}" in caplog.text
    # a dataset.json with a validation list: that list
    pairs = layout(tmp_path / "c", "imagesTr", "labelsTr", ("p", "q", "r"))
    (tmp_path / "c" / "dataset.json").write_text(json.dumps({"training": pairs[:2], "validation": pairs[2:]}))
    assert evaluation_datalist(tmp_path / "c", 3) == pairs[2:]
    # nothing to score: the folder is named
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / "d")):
        evaluation_datalist(tmp_path / "d", 3)
