"""Tests of spoco_bundle.transforms: sparse instance labels, dimensionality handling, runtime checks, loading."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from monai.data import MetaTensor, list_data_collate
from monai.transforms import EnsureChannelFirstd, LoadImaged, SaveImaged

from spoco_bundle.io import LoadVolumed, read_image
from spoco_bundle.transforms import (
    CheckImageLabel,
    CheckImageLabeld,
    EnsureSpatialDims,
    EnsureSpatialDimsd,
    Rescale,
    Rescaled,
    SparseInstanceLabel,
    SparseInstanceLabeld,
    load_transforms,
)


def dense_labels(n: int, shape=(1, 8, 40), seed: int = 0, first_id: int = 1, background: int | None = None):
    """(1, *S) map with n objects (ids first_id.., shuffled in space, each >= 2 voxels) and 0 elsewhere."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int64)
    flat = lab.reshape(-1)
    positions = rng.permutation(flat.size)[: 3 * n]
    ids = np.arange(first_id, first_id + n)
    flat[positions] = np.repeat(ids, 3)
    if background is not None:
        flat[rng.permutation(np.flatnonzero(flat == 0))[:20]] = background
    return lab


def mapping(orig: np.ndarray, out: np.ndarray) -> dict[int, int]:
    """new id -> original id, asserting that every new object is exactly one original object."""
    result = {}
    for k in np.unique(out[out > 0]):
        src = np.unique(orig[out == k])
        assert len(src) == 1, f"new id {k} covers original ids {src}"
        np.testing.assert_array_equal(out == k, orig == src[0])  # the whole original object, nothing else
        result[int(k)] = int(src[0])
    return result


def expected_kept(ratio: float, n: int) -> int:
    return 0 if n == 0 or ratio == 0 else min(n, max(1, int(np.floor(ratio * n + 0.5))))


# ------------------------------------------------------------------------------------------------ SparseInstanceLabel


@pytest.mark.parametrize("n", [0, 1, 5, 17, 54])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.4, 0.5, 1.0])
def test_sparse_counts_and_consecutive_relabel(n, ratio):
    orig = dense_labels(n)
    out = SparseInstanceLabel(ratio, seed=3)(orig)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64 and out.shape == orig.shape
    k = expected_kept(ratio, n)
    np.testing.assert_array_equal(np.unique(out[out != 0]), np.arange(1, k + 1))  # consecutive 1..K
    m = mapping(orig, out)
    assert list(m.values()) == sorted(m.values())  # numbered in increasing original id
    assert np.all(out[orig == 0] == 0)  # unlabeled stays unlabeled; no -1 without a background id
    assert (out < 0).sum() == 0
    if ratio == 1.0:
        assert sorted(m.values()) == list(range(1, n + 1))  # keeps all


def test_sparse_reproducible_independent_of_call_order():
    a = MetaTensor(torch.as_tensor(dense_labels(30, seed=1)), meta={"filename_or_obj": "/data/a_labels.nii.gz"})
    b = MetaTensor(torch.as_tensor(dense_labels(30, seed=2)), meta={"filename_or_obj": "/data/b_labels.tif"})
    t1 = SparseInstanceLabel(0.3, seed=5)
    out_a1, out_b1 = t1(a), t1(b)
    t2 = SparseInstanceLabel(0.3, seed=5)
    out_b2, out_a2 = t2(b), t2(a)
    out_a3 = t2(a)
    torch.testing.assert_close(out_a1.as_tensor(), out_a2.as_tensor())
    torch.testing.assert_close(out_a1.as_tensor(), out_a3.as_tensor())
    torch.testing.assert_close(out_b1.as_tensor(), out_b2.as_tensor())
    # same file name elsewhere (or another format) -> same choice
    moved = MetaTensor(a.as_tensor().clone(), meta={"filename_or_obj": "/elsewhere/a_labels.tif"})
    torch.testing.assert_close(t1(moved).as_tensor(), out_a1.as_tensor())


def test_sparse_background_label_zero_dense_ground_truth():
    orig = dense_labels(10)
    out = SparseInstanceLabel(0.5, background_label=0, seed=1)(orig)
    assert np.all(out[orig == 0] == -1)  # true background becomes annotated background
    m = mapping(orig, out)
    assert len(m) == 5
    dropped = [i for i in range(1, 11) if i not in m.values()]
    assert all(np.all(out[orig == i] == 0) for i in dropped)  # thinned-away objects are unlabeled (0)
    assert set(np.unique(out)) == {-1, 0, 1, 2, 3, 4, 5}


def test_sparse_background_label_nonzero_id():
    orig = dense_labels(8, background=99)
    out = SparseInstanceLabel(1.0, background_label=99)(orig)
    assert np.all(out[orig == 99] == -1)
    assert np.all(out[orig == 0] == 0)  # 0 stays unlabeled
    m = mapping(orig, out)
    assert sorted(m.values()) == list(range(1, 9))  # 99 is not an object


def test_sparse_types_and_meta():
    orig = dense_labels(6)
    t = SparseInstanceLabel(0.5)
    out_t = t(torch.as_tensor(orig, dtype=torch.int32))
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.int64
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    mt = MetaTensor(torch.as_tensor(orig.astype(np.uint8)), affine=affine, meta={"filename_or_obj": "x.nii.gz"})
    out_m = t(mt)
    assert isinstance(out_m, MetaTensor) and out_m.dtype == torch.int64
    assert out_m.meta["filename_or_obj"] == "x.nii.gz"
    torch.testing.assert_close(out_m.affine, affine)
    # whole-number floats are accepted and give the same result; other floats and negatives are rejected
    np.testing.assert_array_equal(t(orig.astype(np.float32), name="x"), t(orig, name="x"))
    with pytest.raises(ValueError, match="integer"):
        t(orig + 0.5)
    with pytest.raises(ValueError, match="negative"):
        t(orig - 1)
    with pytest.raises(ValueError, match="instance_ratio"):
        SparseInstanceLabel(1.5)


def test_sparse_huge_ids():
    orig = dense_labels(12, first_id=3_000_000_000)
    out = SparseInstanceLabel(0.5, seed=2)(orig.astype(np.uint32))
    m = mapping(orig, out)
    assert sorted(m) == list(range(1, 7))


def test_sparse_dict_name_key():
    orig = dense_labels(20)
    image = MetaTensor(torch.zeros(orig.shape), meta={"filename_or_obj": "/d/imagesTr/case7.nii.gz"})
    label = MetaTensor(torch.as_tensor(orig), meta={"filename_or_obj": "/d/labelsTr/case7_seg.nii.gz"})
    out = SparseInstanceLabeld("label", 0.3, seed=4, name_key="image")({"image": image, "label": label})
    ref = SparseInstanceLabel(0.3, seed=4)(orig, name="case7")
    np.testing.assert_array_equal(out["label"].numpy(), ref)
    own = SparseInstanceLabeld("label", 0.3, seed=4)({"label": label})["label"]
    np.testing.assert_array_equal(own.numpy(), SparseInstanceLabel(0.3, seed=4)(orig, name="case7_seg"))


# -------------------------------------------------------------------------------------------------- EnsureSpatialDims


def test_ensure_spatial_dims_trailing_nifti(tmp_path):
    path = tmp_path / "flat.nii.gz"
    arr = (np.arange(63).reshape(7, 9, 1) % 50).astype(np.uint8)
    nib.save(nib.Nifti1Image(arr, np.diag([0.5, 0.25, 3.0, 1.0])), path)
    d = EnsureChannelFirstd("image", channel_dim="no_channel")(LoadVolumed("image")({"image": str(path)}))
    assert tuple(d["image"].shape) == (1, 7, 9, 1)
    out = EnsureSpatialDimsd("image", spatial_dims=2)(d)["image"]
    assert tuple(out.shape) == (1, 7, 9)
    np.testing.assert_array_equal(out[0].numpy(), arr[..., 0])
    assert tuple(out.affine.shape) == (4, 4)
    np.testing.assert_allclose(out.pixdim, [0.5, 0.25])
    np.testing.assert_array_equal(out.meta["spatial_shape"], [7, 9])
    # a writer sees a consistent 2D image
    SaveImaged(
        "image",
        output_dir=str(tmp_path / "o"),
        output_postfix="",
        output_ext=".tif",
        writer="spoco_bundle.io.TiffWriter",
        output_dtype=np.uint8,
        separate_folder=False,
        print_log=False,
    )({"image": out})
    back, meta = read_image(tmp_path / "o" / "flat.tif")
    np.testing.assert_array_equal(back, arr[..., 0])
    np.testing.assert_allclose(meta["spacing"], [0.5, 0.25])


def test_ensure_spatial_dims_leading_and_errors():
    affine = torch.diag(torch.tensor([3.0, 0.5, 0.25, 1.0], dtype=torch.float64))
    img = MetaTensor(torch.arange(63.0).reshape(1, 1, 7, 9), affine=affine, meta={"filename_or_obj": "lead.tif"})
    out = EnsureSpatialDims(2)(img)
    assert tuple(out.shape) == (1, 7, 9)
    np.testing.assert_allclose(out.affine, np.diag([0.5, 0.25, 1.0, 1.0]))
    same = torch.zeros(1, 4, 5, 6)
    assert EnsureSpatialDims(3)(same) is same
    with pytest.raises(ValueError, match="three_channels.nii"):
        EnsureSpatialDims(2)(MetaTensor(torch.zeros(1, 7, 9, 3), meta={"filename_or_obj": "three_channels.nii"}))
    with pytest.raises(ValueError, match="flat_image.tif"):
        EnsureSpatialDims(3)(MetaTensor(torch.zeros(1, 7, 9), meta={"filename_or_obj": "flat_image.tif"}))


# ---------------------------------------------------------------------------------------------------- CheckImageLabel


def pair(img: torch.Tensor, lab: torch.Tensor) -> dict:
    return {
        "image": MetaTensor(img, meta={"filename_or_obj": "/d/the_image.tif"}),
        "label": MetaTensor(lab, meta={"filename_or_obj": "/d/the_label.tif"}),
    }


def test_check_image_label_passes_good_data():
    d = pair(torch.rand(1, 4, 5, 6), torch.randint(0, 5, (1, 4, 5, 6), dtype=torch.int32))
    out = CheckImageLabeld(("image", "label"), spatial_dims=3)(d)
    assert out["image"] is d["image"] and out["label"] is d["label"]
    # image only (inference), and a missing label when allowed
    CheckImageLabeld("image", 3)({"image": d["image"]})
    CheckImageLabeld(("image", "label"), 3, allow_missing_keys=True)({"image": d["image"]})
    CheckImageLabel(2)(np.zeros((1, 4, 5), np.float32), np.zeros((1, 4, 5), np.bool_))


@pytest.mark.parametrize(
    "case, bad",
    [
        ("shape_mismatch", "the_label"),
        ("wrong_dims", "the_image"),
        ("multichannel", "the_image"),
        ("nan", "the_image"),
        ("inf", "the_image"),
        ("float_label", "the_label"),
        ("negative_label", "the_label"),
    ],
)
def test_check_image_label_rejects(case, bad):
    img, lab = torch.rand(1, 4, 5, 6), torch.randint(0, 5, (1, 4, 5, 6))
    if case == "shape_mismatch":
        lab = lab[..., :5]
    elif case == "wrong_dims":
        img, lab = img[..., 0], lab[..., 0]
    elif case == "multichannel":
        img = torch.rand(2, 4, 5, 6)
    elif case == "nan":
        img[0, 1, 1, 1] = float("nan")
    elif case == "inf":
        img[0, 1, 1, 1] = float("inf")
    elif case == "float_label":
        lab = lab.float()
    elif case == "negative_label":
        lab[0, 0, 0, 0] = -1
    with pytest.raises(ValueError, match=bad):
        CheckImageLabeld(("image", "label"), spatial_dims=3)(pair(img, lab))


# ---------------------------------------------------------------------------------------------------- load_transforms


def run(transforms, data):
    for t in transforms:  # one by one, so that the ValueError is not wrapped by Compose
        data = t(data)
    return data


def test_load_transforms_2d_nifti_and_tiff_collate(tmp_path):
    img2d = (np.arange(63).reshape(7, 9) % 200).astype(np.uint8)
    lab2d = np.zeros((7, 9), np.uint16)
    lab2d[1:3, 2:5], lab2d[4:6, 6:8] = 3, 700
    nib.save(nib.Nifti1Image(img2d[..., None], np.diag([0.5, 0.25, 1.0, 1.0])), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(lab2d[..., None], np.diag([0.5, 0.25, 1.0, 1.0])), tmp_path / "a_l.nii.gz")
    tifffile.imwrite(tmp_path / "b.tif", img2d, imagej=True, resolution=(4.0, 2.0))
    tifffile.imwrite(tmp_path / "b_l.tif", lab2d, imagej=True, resolution=(4.0, 2.0))
    transforms = load_transforms(("image", "label"), spatial_dims=2)
    items = [
        run(transforms, {"image": str(tmp_path / "a.nii.gz"), "label": str(tmp_path / "a_l.nii.gz")}),
        run(transforms, {"image": str(tmp_path / "b.tif"), "label": str(tmp_path / "b_l.tif")}),
    ]
    for item in items:
        assert tuple(item["image"].shape) == (1, 7, 9) and item["image"].dtype == torch.float32
        assert item["label"].dtype == torch.int64
        np.testing.assert_array_equal(item["image"][0].numpy(), img2d)
        np.testing.assert_array_equal(item["label"][0].numpy(), lab2d)
        np.testing.assert_allclose(item["image"].pixdim, [0.5, 0.25])
    batch = list_data_collate(items)  # consistent 4x4 affines across formats
    assert tuple(batch["image"].shape) == (2, 1, 7, 9)
    sparse = SparseInstanceLabeld("label", 1.0)(items[0])["label"]
    assert set(np.unique(sparse.numpy())) == {0, 1, 2}


def test_load_transforms_reject_float_label_file(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), np.eye(4)), tmp_path / "im.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), np.eye(4)), tmp_path / "float_lab.nii.gz")
    data = {"image": str(tmp_path / "im.nii.gz"), "label": str(tmp_path / "float_lab.nii.gz")}
    with pytest.raises(ValueError, match="float_lab.nii.gz"):
        run(load_transforms(("image", "label"), spatial_dims=3), data)
    # loading with LoadImaged's default float32 is caught with a hint
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.uint16), np.eye(4)), tmp_path / "int_lab.nii.gz")
    data["label"] = str(tmp_path / "int_lab.nii.gz")
    loaded = EnsureChannelFirstd(["image", "label"])(LoadImaged(["image", "label"])(data))
    with pytest.raises(ValueError, match="dtype=None"):
        CheckImageLabeld(("image", "label"), 3)(loaded)


def test_load_transforms_image_only(tmp_path):
    path = Path(tmp_path) / "vol.tif"
    vol = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    tifffile.imwrite(path, vol, imagej=True, metadata={"axes": "ZYX", "spacing": 2.0})
    out = run(load_transforms("image", spatial_dims=3), {"image": str(path)})
    assert tuple(out["image"].shape) == (1, 4, 5, 6) and out["image"].dtype == torch.float32
    np.testing.assert_array_equal(out["image"][0].numpy(), vol)
    np.testing.assert_allclose(out["image"].pixdim, [2.0, 1.0, 1.0])


# ------------------------------------------------------------------------------------------------------------ Rescale


def test_rescale_labels_nearest_keeps_ids_dtype_and_blocks():
    # 4x4x4 blocks of ids: halving keeps every block as an exact 2x2x2 block, doubling back restores the map
    blocks = np.arange(1, 1 + 2 * 3 * 2, dtype=np.int64).reshape(2, 3, 2)
    lab = MetaTensor(torch.from_numpy(np.kron(blocks, np.ones((4, 4, 4), np.int64))[None]))
    half = Rescale(0.5, mode="nearest")(lab)
    assert tuple(half.shape) == (1, 4, 6, 4) and half.dtype == torch.int64
    np.testing.assert_array_equal(half[0].numpy(), np.kron(blocks, np.ones((2, 2, 2), np.int64)))
    np.testing.assert_allclose(half.pixdim, [2.0, 2.0, 2.0])  # the affine follows the new grid
    back = Rescale(2.0, mode="nearest")(half)
    np.testing.assert_array_equal(back[0].numpy(), lab[0].numpy())


def test_rescale_image_matches_resampled_blob_per_axis():
    # a smooth Gaussian blob sampled on the fine grid, shrunk 2x in y/x only, equals the blob sampled at the coarse
    # grid's centres (pixel-centre alignment: a half-pixel shift would exceed the tolerance)
    z, y, x = np.meshgrid(np.arange(12), np.arange(64), np.arange(64), indexing="ij")
    blob = np.exp(-((z - 6.0) ** 2 / 18 + (y - 30.5) ** 2 / 72 + (x - 33.5) ** 2 / 72)).astype(np.float32)
    out = Rescale((1, 0.5, 0.5))(torch.from_numpy(blob[None]))
    assert tuple(out.shape) == (1, 12, 32, 32) and out.dtype == torch.float32
    zc, yc, xc = np.meshgrid(np.arange(12), np.arange(32) * 2 + 0.5, np.arange(32) * 2 + 0.5, indexing="ij")
    expected = np.exp(-((zc - 6.0) ** 2 / 18 + (yc - 30.5) ** 2 / 72 + (xc - 33.5) ** 2 / 72))
    np.testing.assert_allclose(out[0].numpy(), expected, atol=0.03)
    # no scale: the input itself
    img = torch.rand(1, 5, 6)
    assert Rescale(1.0)(img) is img


def test_rescaled_keeps_image_and_labels_aligned_on_numpy():
    lab = np.zeros((1, 40, 60), np.int32)
    lab[0, 10:20, 12:30] = 3
    lab[0, 24:36, 40:52] = 7
    img = (lab > 0).astype(np.float32) * 0.8 + 0.1
    out = Rescaled(["image", "label"], scale=[0.5, 0.25], mode=["linear", "nearest"])({"image": img, "label": lab})
    assert out["image"].shape == (1, 20, 15) and out["label"].shape == (1, 20, 15)
    assert isinstance(out["label"], np.ndarray) and out["label"].dtype == np.int32
    assert set(np.unique(out["label"])) == {0, 3, 7}
    inside = out["image"][out["label"] > 0]
    assert inside.mean() > 0.75 and out["image"][out["label"] == 0].mean() < 0.2


def test_rescale_errors_name_the_problem():
    for bad in (0, -1, float("nan"), "x", []):
        with pytest.raises(ValueError, match="image_scale must be a positive number"):
            Rescale(bad)
    with pytest.raises(ValueError, match="mode must be"):
        Rescale(0.5, mode="cubic")
    img = MetaTensor(torch.zeros(1, 4, 5, 6), meta={"filename_or_obj": "/data/vol_7.nii.gz"})
    with pytest.raises(ValueError, match=r"vol_7.nii.gz: image_scale has 2 factors but the image has 3 spatial"):
        Rescale([0.5, 0.5])(img)
    with pytest.raises(ValueError, match="2 modes given for 3 keys"):
        Rescaled(["a", "b", "c"], 0.5, mode=["linear", "nearest"])
