"""Tests of spoco_bundle.io: NIfTI/TIFF reading in storage order with spacing, reader dispatch, TiffWriter."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from monai.data import ITKReader, MetaTensor
from monai.transforms import LoadImaged, SaveImaged

from spoco_bundle.io import (
    LoadVolumed,
    NiftiTiffReader,
    TiffReader,
    TiffWriter,
    filename_of,
    image_readers,
    is_zarr,
    read_image,
    read_spacing,
    split_image_suffix,
    split_volume_suffix,
    stem_of,
)

DATA_DIR = Path(os.environ.get("SPOCO_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
GONUCLEAR = DATA_DIR / "gonuclear"
needs_data = pytest.mark.skipif(not GONUCLEAR.is_dir(), reason=f"real data not found at {GONUCLEAR}")


def ramp(shape, dtype=np.uint16):
    """Asymmetric array whose value encodes its index: v[i, j, k] = 10000 i + 100 j + k (any swap is visible)."""
    idx = np.indices(shape)
    weights = [10 ** (2 * (len(shape) - 1 - a)) for a in range(len(shape))]
    return sum(w * i for w, i in zip(weights, idx)).astype(dtype)


def load(path, key="image"):
    return LoadVolumed(key)({key: str(path)})[key]


def test_split_image_suffix():
    assert split_image_suffix("/a/b/x.y.nii.gz") == ("x.y", ".nii.gz")
    assert split_image_suffix("c.TIF") == ("c", ".TIF")
    assert split_image_suffix("c.ome.tiff") == ("c.ome", ".tiff")
    assert split_image_suffix("notes.txt") == ("notes.txt", "")


def test_split_volume_suffix_and_is_zarr(tmp_path):
    assert split_volume_suffix("/a/b/vol.ome.zarr/") == ("vol", ".ome.zarr")
    assert split_volume_suffix("vol.ZARR") == ("vol", ".ZARR")
    assert split_volume_suffix("/a/x.nii.gz") == ("x", ".nii.gz")
    assert is_zarr(tmp_path / "not_yet_written.zarr")  # by its name
    store = tmp_path / "store"
    store.mkdir()
    assert not is_zarr(store)
    (store / "zarr.json").write_text("{}")
    assert is_zarr(store) and not is_zarr(tmp_path / "x.tif")


def test_filename_and_stem_of_a_loaded_item():
    image = MetaTensor(torch.zeros(1, 2, 2), meta={"filename_or_obj": "/d/imagesTr/case7.nii.gz"})
    assert filename_of(image) == "/d/imagesTr/case7.nii.gz" and filename_of(np.zeros(3)) is None
    assert filename_of(np.zeros(3), {"filename_or_obj": Path("/d/m.tif")}) == "/d/m.tif"
    data = {"image": image, "label": np.zeros(3), "label_meta_dict": {"filename_or_obj": "/d/l/case7_seg.tif"}}
    assert stem_of(data, "image") == "case7" and stem_of(data, "label") == "case7_seg"
    assert stem_of(data, "missing") == "" and stem_of({"x": torch.zeros(2)}, "x") == ""


def test_nifti_3d_order_dtype_spacing(tmp_path):
    arr = ramp((5, 7, 9))
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 3.0, 4.0, 1.0])), path)
    img = load(path)
    assert isinstance(img, MetaTensor)
    assert tuple(img.shape) == (5, 7, 9)
    assert not img.dtype.is_floating_point  # dtype=None keeps integers (uint16 -> int32 in torch)
    np.testing.assert_array_equal(img.numpy(), arr)
    np.testing.assert_allclose(img.pixdim, [2.0, 3.0, 4.0])


def test_nifti_2d(tmp_path):
    arr = ramp((7, 9), np.uint8)
    path = tmp_path / "im.nii"
    nib.save(nib.Nifti1Image(arr, np.diag([0.5, 0.25, 1.0, 1.0])), path)
    img = load(path)
    np.testing.assert_array_equal(img.numpy(), arr)
    assert img.dtype == torch.uint8


def test_tiff_imagej_3d_order_dtype_spacing(tmp_path):
    arr = ramp((5, 7, 9))
    path = tmp_path / "stack.tif"
    # ImageJ: resolution = (pixels per unit in x, in y); z spacing in the description
    tifffile.imwrite(
        path, arr, imagej=True, resolution=(1 / 0.5, 1 / 0.25), metadata={"spacing": 2.5, "unit": "um", "axes": "ZYX"}
    )
    img = load(path)
    assert tuple(img.shape) == (5, 7, 9)
    np.testing.assert_array_equal(img.numpy(), arr)
    assert not img.dtype.is_floating_point
    np.testing.assert_allclose(img.pixdim, [2.5, 0.25, 0.5])  # (z, y, x) = array axis order
    assert img.meta["spacing_unit"] == "um"
    assert math.isnan(img.meta["original_channel_dim"])  # the value NibabelReader uses for "no channel"
    np.testing.assert_array_equal(img.meta["spatial_shape"], [5, 7, 9])
    np.testing.assert_allclose(img.meta["original_affine"], np.diag([2.5, 0.25, 0.5, 1.0]))


def test_tiff_2d_with_resolution(tmp_path):
    arr = ramp((7, 9), np.uint8)
    path = tmp_path / "im.tiff"
    tifffile.imwrite(path, arr, imagej=True, resolution=(1 / 0.5, 1 / 0.25), metadata={"unit": "um"})
    img = load(path)
    np.testing.assert_array_equal(img.numpy(), arr)
    assert img.dtype == torch.uint8
    np.testing.assert_allclose(img.pixdim, [0.25, 0.5])  # (y, x)
    assert img.meta["affine"].shape == (4, 4)


def test_tiff_plain_multipage_defaults_to_unit_spacing(tmp_path):
    arr = ramp((5, 7, 9)).astype(np.float32)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, arr, photometric="minisblack", metadata=None)
    img = load(path)
    np.testing.assert_array_equal(img.numpy(), arr)
    assert img.dtype == torch.float32
    np.testing.assert_allclose(img.pixdim, [1.0, 1.0, 1.0])


def test_tiff_ome_physical_size(tmp_path):
    path = tmp_path / "x.ome.tif"
    arr = ramp((5, 7, 9))
    tifffile.imwrite(
        path, arr, ome=True, metadata={"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.25, "PhysicalSizeZ": 2.0}
    )
    img = load(path)
    np.testing.assert_array_equal(img.numpy(), arr)
    np.testing.assert_allclose(img.pixdim, [2.0, 0.25, 0.5])
    assert img.meta["spacing_unit"] == "um"


def test_tiff_resolution_units(tmp_path):
    arr = ramp((7, 9), np.uint8)
    cm = tmp_path / "cm.tif"
    tifffile.imwrite(cm, arr, resolution=(1e4 / 0.5, 1e4 / 0.25), resolutionunit="CENTIMETER")  # 0.5 um, 0.25 um
    np.testing.assert_allclose(load(cm).pixdim, [0.25, 0.5], rtol=1e-6)
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, arr, resolution=(72, 72), resolutionunit="INCH")  # a print DPI, not a pixel size
    np.testing.assert_allclose(load(inch).pixdim, [1.0, 1.0])


@pytest.mark.parametrize(
    "shape, kwargs",
    [
        ((2, 7, 9), {"imagej": True, "metadata": {"axes": "CYX"}}),
        ((7, 9, 3), {"photometric": "rgb"}),
        ((2, 3, 7, 9), {"imagej": True, "metadata": {"axes": "TZYX"}}),
    ],
    ids=["channels", "rgb", "4d"],
)
def test_tiff_rejects_multichannel_and_4d(tmp_path, shape, kwargs):
    path = tmp_path / "bad_input.tif"
    tifffile.imwrite(path, ramp(shape, np.uint8), **kwargs)  # the RGB one with different colour channels
    with pytest.raises(ValueError, match="bad_input.tif"):
        load(path)
    with pytest.raises(ValueError, match="bad_input.tif"):
        read_image(path)


@pytest.mark.parametrize(
    "layout, extra",
    [("rgb", None), ("rgb_planar", None), ("rgba", 255), ("gray_alpha", 200)],
)
def test_tiff_grayscale_stored_as_colour_is_read_as_one_channel(tmp_path, caplog, layout, extra):
    gray = ramp((7, 9), np.uint8)
    n = {"rgb": 3, "rgb_planar": 3, "rgba": 4, "gray_alpha": 2}[layout]
    samples = [gray] * (n if extra is None else n - 1) + ([] if extra is None else [np.full_like(gray, extra)])
    path = tmp_path / f"{layout}.tif"
    if layout == "rgb_planar":
        tifffile.imwrite(path, np.stack(samples), photometric="rgb", planarconfig="separate")
    elif layout == "gray_alpha":
        tifffile.imwrite(path, np.stack(samples, -1), photometric="minisblack", extrasamples=["unassalpha"])
    else:
        tifffile.imwrite(path, np.stack(samples, -1), photometric="rgb")
    assert "S" in tifffile.TiffFile(path).series[0].axes  # really stored with colour samples
    with caplog.at_level(logging.INFO, logger="spoco_bundle.io"):
        img = load(path)
    assert tuple(img.shape) == (7, 9) and img.dtype == torch.uint8
    np.testing.assert_array_equal(img.numpy(), gray)
    assert "stored as colour" in caplog.text and path.name in caplog.text
    array, _ = read_image(path)
    np.testing.assert_array_equal(array, gray)
    assert read_spacing(path)[0] == (7, 9)  # the header agrees with what is read


def test_tiff_grayscale_stack_stored_as_colour_is_read_as_a_stack(tmp_path):
    vol = ramp((3, 7, 9), np.uint8)
    path = tmp_path / "stack_rgb.tif"
    tifffile.imwrite(path, np.stack([vol] * 3, -1), photometric="rgb")  # one RGB page per slice
    assert tifffile.TiffFile(path).series[0].axes.endswith("YXS")
    np.testing.assert_array_equal(read_image(path)[0], vol)
    assert read_spacing(path)[0] == (3, 7, 9)


@pytest.mark.parametrize("what", ["colour", "alpha", "cmyk", "two_channels"])
def test_tiff_colour_image_or_varying_alpha_is_rejected_with_the_reason(tmp_path, what):
    gray = ramp((7, 9), np.uint8)
    path = tmp_path / f"{what}_input.tif"
    if what == "colour":
        tifffile.imwrite(path, np.stack([gray, gray, gray // 2], -1), photometric="rgb")
        reason = "has 3 colour samples per pixel [(]RGB[)] with different colour channels"
    elif what == "alpha":
        tifffile.imwrite(path, np.stack([gray, gray, gray, gray], -1), photometric="rgb")  # alpha = the ramp
        reason = "varying transparency"
    elif what == "cmyk":  # equal C, M, Y would read as an inverted image: refused from the header
        tifffile.imwrite(path, np.stack([gray, gray, gray, np.zeros_like(gray)], -1), photometric="separated")
        reason = "4 samples per pixel [(]photometric SEPARATED"
    else:  # two samples, the second not an alpha channel: two channels of data
        tifffile.imwrite(
            path, np.stack([gray, np.zeros_like(gray)], -1), photometric="minisblack", planarconfig="contig"
        )
        reason = "samples per pixel [(]photometric MINISBLACK"
    if what == "two_channels":
        assert "S" in tifffile.TiffFile(path).series[0].axes
    with pytest.raises(ValueError, match=f"{what}_input.tif.*{reason}"):
        read_image(path)
    with pytest.raises(ValueError, match=f"{what}_input.tif"):
        load(path)


def test_corrupt_tiff_error_names_file_and_does_not_fall_back(tmp_path):
    path = tmp_path / "broken_file.tif"
    path.write_bytes(b"this is not a tiff")
    with pytest.raises(ValueError, match="broken_file.tif"):
        load(path)


def test_reader_dispatch(tmp_path, caplog):
    nii, tif = tmp_path / "a.nii.gz", tmp_path / "b.TIF"
    nib.save(nib.Nifti1Image(ramp((5, 7, 9)), np.eye(4)), nii)
    tifffile.imwrite(tif, ramp((5, 7, 9)), imagej=True, metadata={"axes": "ZYX"})
    reader = NiftiTiffReader()
    assert reader.verify_suffix(str(nii)) and reader.verify_suffix(str(tif)) and reader.verify_suffix("c.nii")
    assert not reader.verify_suffix("c.png") and not reader.verify_suffix([str(nii), str(tif)])
    # through plain LoadImaged with our readers: NIfTI via nibabel (NIfTI header keys), TIFF via TiffReader
    loader = LoadImaged(["n", "t"], reader=image_readers(), dtype=None)
    with caplog.at_level(logging.INFO):
        out = loader({"n": str(nii), "t": str(tif)})
    assert "sform_code" in out["n"].meta and "tiff_axes" not in out["n"].meta
    assert out["t"].meta["tiff_axes"] == "ZYX" and "sform_code" not in out["t"].meta
    np.testing.assert_array_equal(out["n"].numpy(), out["t"].numpy())
    assert "unable to load" not in caplog.text  # no failed reader attempts logged
    # TiffReader alone declines other suffixes so that LoadImage can try its next reader
    with pytest.raises(ValueError):
        TiffReader().read(str(nii))


def test_tiff_reader_stacks_several_files(tmp_path):
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"c{i}.tif"))
        tifffile.imwrite(paths[-1], ramp((7, 9), np.uint8) + i, imagej=True)
    reader = TiffReader()
    arr, meta = reader.get_data(reader.read(paths))
    assert arr.shape == (2, 7, 9) and meta["original_channel_dim"] == 0
    np.testing.assert_array_equal(arr[1] - arr[0], np.ones((7, 9)))


@needs_data
def test_real_gonuclear_nifti_and_tiff():
    for name in ("1135_image.nii.gz", "1136_image.tif", "1135_labels.nii.gz", "1136_labels.tif"):
        img = load(GONUCLEAR / name)
        assert tuple(img.shape) == (100, 100, 100), name
        np.testing.assert_allclose(img.pixdim, [0.284, 0.127, 0.127], atol=2e-3, err_msg=name)
        assert not img.dtype.is_floating_point
    # independent reference for the TIFF axis order: ITK with reversed indexing gives (Z, Y, X)
    ours = load(GONUCLEAR / "1136_labels.tif").numpy()
    itk_reader = ITKReader(reverse_indexing=True)
    ref, _ = itk_reader.get_data(itk_reader.read(str(GONUCLEAR / "1136_labels.tif")))
    np.testing.assert_array_equal(ours, ref)
    # and for NIfTI: nibabel's on-disk order
    nifti = nib.load(GONUCLEAR / "1135_labels.nii.gz")
    np.testing.assert_array_equal(load(GONUCLEAR / "1135_labels.nii.gz").numpy(), np.asarray(nifti.dataobj))


@pytest.mark.parametrize(
    "dtype, imagej",
    [(np.uint8, True), (np.uint16, True), (np.float32, True), (np.uint32, False), (np.int16, False)],
)
@pytest.mark.parametrize("shape", [(5, 7, 9), (7, 9)])
def test_tiff_writer_round_trip(tmp_path, dtype, imagej, shape):
    arr = ramp(shape, np.uint32)
    if dtype == np.uint32:
        arr = arr * 100_000 + 7  # ids beyond uint16
    elif dtype == np.uint8:
        arr = arr % 251
    arr = arr.astype(dtype)
    spacing = [2.5, 0.25, 0.5][-len(shape) :]
    affine = np.diag(spacing + [1.0] * (4 - len(shape)))
    path = tmp_path / "out.tif"
    writer = TiffWriter()
    writer.set_data_array(arr[None], channel_dim=0)
    writer.set_metadata({"affine": affine, "spacing_unit": "um"})
    writer.write(path)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej == imagej
    back, meta = read_image(path)
    assert back.dtype == dtype and back.shape == shape
    np.testing.assert_array_equal(back, arr)
    np.testing.assert_allclose(meta["spacing"], spacing, rtol=1e-7)
    assert meta["spacing_unit"] == "um"


def test_tiff_writer_dtype_choice_and_errors(tmp_path):
    labels = np.zeros((5, 7, 9), np.int64)
    labels[1, 2, 3] = 70_000
    writer = TiffWriter()
    writer.set_data_array(labels, channel_dim=None)
    writer.set_metadata({})
    writer.write(tmp_path / "auto.tif")
    back, _ = read_image(tmp_path / "auto.tif")
    assert back.dtype == np.uint32 and back[1, 2, 3] == 70_000
    with pytest.raises(ValueError, match="single-channel"):
        TiffWriter().set_data_array(np.zeros((2, 7, 9)), channel_dim=0)
    writer = TiffWriter(output_dtype=np.uint16)
    writer.set_data_array(labels, channel_dim=None)
    writer.set_metadata({})
    with pytest.raises(ValueError, match="uint16"):
        writer.write(tmp_path / "overflow.tif")


def test_save_imaged_round_trip_through_loader(tmp_path):
    arr = ramp((5, 7, 9))
    src = tmp_path / "src_labels.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.diag([2.5, 0.25, 0.5, 1.0])), src)
    data = LoadVolumed("label", ensure_channel_first=True)({"label": str(src)})
    saver = SaveImaged(
        "label",
        output_dir=str(tmp_path / "out"),
        output_postfix="",
        output_ext=".tif",
        writer="spoco_bundle.io.TiffWriter",
        output_dtype=np.uint16,
        separate_folder=False,
        print_log=False,
    )
    saver(data)
    back = load(tmp_path / "out" / "src_labels.tif")
    np.testing.assert_array_equal(back.numpy(), arr)
    np.testing.assert_allclose(back.pixdim, [2.5, 0.25, 0.5])


@pytest.mark.parametrize(
    "kind, shape, axes, option, index",
    [
        ("tiff", (5, 3, 7, 9), "ZCYX", "input_channel", (slice(None), 2)),  # ImageJ hyperstack, 3 channels
        ("tiff", (3, 7, 9), "CYX", "input_channel", (1,)),  # a 2D image with channels
        ("tiff", (4, 5, 7, 9), "TZYX", "input_time_point", (3,)),  # a time series of z-stacks
        ("nifti", (9, 7, 5, 4), None, "input_time_point", (slice(None),) * 3 + (3,)),  # NIfTI's 4th axis: time
        ("nifti", (9, 7, 5, 1, 3), None, "input_channel", (slice(None),) * 3 + (0, 2)),  # 5th: components
    ],
    ids=["tiff-zcyx", "tiff-cyx", "tiff-tzyx", "nifti-time", "nifti-channels"],
)
def test_a_channel_or_time_point_is_chosen_or_the_option_is_named(tmp_path, kind, shape, axes, option, index):
    from spoco_bundle.blockwise import open_volume

    data = ramp(shape, np.uint16)
    if kind == "tiff":
        path = tmp_path / "multi.tif"
        tifffile.imwrite(path, data, imagej=True, metadata={"axes": axes})
    else:
        path = tmp_path / "multi.nii.gz"
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    choice = index[-1]
    expected = data[index]
    # without a choice: one line naming the file, how many there are and the option that picks one
    for read in (read_image, lambda p: load(p), lambda p: open_volume(p)):
        with pytest.raises(ValueError, match=rf"multi\.(tif|nii\.gz).* has {shape[len(index) - 1]} .*--{option} \("):
            read(path)
    with pytest.raises(ValueError, match=rf"multi\..*--{option} 9 is outside 0\.\.{shape[len(index) - 1] - 1}"):
        read_image(path, **{option: 9})
    # with it: that one, the same by every reader, with the image's spatial geometry
    array, meta = read_image(path, **{option: choice})
    np.testing.assert_array_equal(array, expected)
    assert math.isnan(meta["original_channel_dim"])
    assert read_spacing(path, **{option: choice})[0] == expected.shape
    loaded = LoadVolumed("image", **{option: choice})({"image": str(path)})["image"]
    np.testing.assert_array_equal(np.asarray(loaded), expected)
    lazy, lazy_meta = open_volume(path, **{option: choice})
    np.testing.assert_array_equal(lazy.compute(), expected)
    assert len(lazy_meta["spacing"]) == expected.ndim


def test_a_channel_choice_reads_the_image_and_leaves_the_labels(tmp_path):
    from spoco_bundle.transforms import load_transforms

    image = ramp((2, 7, 9), np.uint16)
    tifffile.imwrite(tmp_path / "img.tif", image, imagej=True, metadata={"axes": "CYX"})
    labels = np.zeros((7, 9), np.uint16)
    labels[2:5, 3:6] = 1
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    items = {"image": str(tmp_path / "img.tif"), "label": str(tmp_path / "lab.tif")}
    out = items
    for transform in load_transforms(("image", "label"), spatial_dims=2, input_channel=1):
        out = transform(out)
    np.testing.assert_array_equal(np.asarray(out["image"][0]), image[1].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(out["label"][0]), labels)
