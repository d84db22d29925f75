"""Inference bundle: NIfTI/TIFF in, instance volumes out with the input's geometry; bad inputs; strict weights."""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import shutil
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_failed_inputs_report_the_root_cause_per_file_and_in_the_summary(tmp_path):
    """A truncated .nii.gz, an RGB TIFF and a 2D image for a 3D model: each is reported with the reader's or the
    check's own message, on its FAILED line and in the final summary, never as MONAI's ``applying transform``."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    vol = np.random.default_rng(3).random((12, 32, 32)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), inputs / "good.nii.gz")
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "whole.nii.gz")
    whole = (tmp_path / "whole.nii.gz").read_bytes()
    (inputs / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])  # a copy that stopped half-way
    tifffile.imwrite(inputs / "rgb.tif", (vol[0, :, :, None] * [255, 128, 0]).astype(np.uint8), photometric="rgb")
    tifffile.imwrite(inputs / "flat.tif", vol[0])  # 2D for a 3D model
    ckpt = tmp_path / "model.pt"
    _save_model(ckpt, 3)
    proc = _infer(tmp_path, inputs, tmp_path / "out", ckpt, "--patch_size", "[8,32,32]")
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "applying transform" not in log and " object at 0x" not in log
    summary = log[log.index("3 of 4 inputs failed:") :].splitlines()
    causes = {
        "truncated.nii.gz": "EOFError: Compressed file ended before the end-of-stream marker was reached",
        "rgb.tif": "has 3 colour samples per pixel (RGB)",
        "flat.tif": "image has 2 dimension(s) (32, 32), but spatial_dims=3 needs 3D single-channel images",
    }
    for name, cause in causes.items():
        per_file = [line for line in log.splitlines() if f"FAILED {inputs / name}:" in line]
        assert len(per_file) == 1 and cause in per_file[0], (name, per_file)
        assert any(line.startswith(str(inputs / name)) and cause in line for line in summary), (name, summary)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good_instances.nii.gz"]


@pytest.mark.slow
def test_inputs_that_would_share_an_output_are_refused_before_any_work(tmp_path):
    """``a.nii.gz`` + ``a.tif`` or ``a.tif`` + ``a.tiff`` with ``--output_ext .tif`` both map to ``a_instances.tif``:
    the second used to replace the first silently (exit 0). Now an error names both inputs; nothing is written."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    vol = np.random.default_rng(4).random((12, 32, 32)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), inputs / "a.nii.gz")
    for name in ("a.tif", "b.tif", "c.tif", "c.tiff"):
        tifffile.imwrite(inputs / name, vol)
    ckpt = tmp_path / "model.pt"
    _save_model(ckpt, 3)
    proc = _infer(tmp_path, inputs, tmp_path / "out", ckpt, "--patch_size", "[8,32,32]", "--output_ext", ".tif")
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "same output file" in log and "Nothing was segmented" in log
    for group, out in ((("a.nii.gz", "a.tif"), "a_instances.tif"), (("c.tif", "c.tiff"), "c_instances.tif")):
        names = " and ".join(str(inputs / n) for n in group)
        assert f"{names} would both be written to {tmp_path / 'out' / out}" in log
    assert not (tmp_path / "out").exists()  # refused before any work
    # without --output_ext each keeps its own suffix: no clash
    from spoco_bundle.engines import _output_paths

    files = [str(inputs / n) for n in ("a.nii.gz", "a.tif", "c.tif", "c.tiff")]
    assert [Path(p).name for p in _output_paths(files, str(tmp_path / "out"), None)] == [
        "a_instances.nii.gz",
        "a_instances.tif",
        "c_instances.tif",
        "c_instances.tiff",
    ]


@pytest.mark.slow
def test_a_second_run_into_the_input_folder_skips_the_first_runs_outputs(tmp_path):
    """Output folder = input folder: the second run used to segment ``a_instances.nii.gz`` as an image (writing
    ``a_instances_instances.nii.gz``). Outputs beside their input are skipped with a message; a file named
    ``*_instances`` without such an input is still an image."""
    folder = tmp_path / "data"
    folder.mkdir()
    vol = np.random.default_rng(5).random((12, 32, 32)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), folder / "a.nii.gz")
    tifffile.imwrite(folder / "b.tif", vol)
    tifffile.imwrite(folder / "x_instances.tif", vol)  # no x.* beside it: an image
    ckpt = tmp_path / "model.pt"
    _save_model(ckpt, 3)
    first = _infer(tmp_path, folder, folder, ckpt, "--patch_size", "[8,32,32]")
    assert first.returncode == 0, first.stderr[-3000:]
    written = {"a_instances.nii.gz", "b_instances.tif", "x_instances_instances.tif"}
    assert {p.name for p in folder.iterdir()} == {"a.nii.gz", "b.tif", "x_instances.tif"} | written
    second = _infer(tmp_path, folder, folder, ckpt, "--patch_size", "[8,32,32]")
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    for output, source in (
        ("a_instances.nii.gz", "a.nii.gz"),
        ("b_instances.tif", "b.tif"),
        ("x_instances_instances.tif", "x_instances.tif"),
    ):
        assert f"skipping {folder / output}: the output of {folder / source} from an earlier run" in log
    assert "[3/3]" in log and "[4/" not in log  # a, b and x_instances segmented again, nothing else
    assert {p.name for p in folder.iterdir()} == {"a.nii.gz", "b.tif", "x_instances.tif"} | written


@pytest.mark.slow
def test_a_killed_writes_partial_file_is_removed_by_the_next_run(tmp_path):
    """A run killed during a write leaves the hidden ``.<stem>_instances.partial<ext>`` (the atomic write's temporary
    file) in the output folder; the next run that writes that output removes it and says so."""
    from spoco_bundle.io import partial_path

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    nib.save(nib.Nifti1Image(np.random.rand(12, 32, 32).astype(np.float32), np.eye(4)), inputs / "a.nii.gz")
    stale = Path(partial_path(out / "a_instances.nii.gz"))
    assert stale.name == ".a_instances.partial.nii.gz"
    stale.write_bytes(b"\x1f\x8b truncated")
    other = out / ".z_instances.partial.tif"  # not an output of this run (another run may be writing it): kept
    other.write_bytes(b"II*\x00")
    ckpt = tmp_path / "model.pt"
    _save_model(ckpt, 3)
    proc = _infer(tmp_path, inputs, out, ckpt, "--patch_size", "[8,32,32]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"removed {stale}, a partial output left by an interrupted earlier run" in proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [other.name, "a_instances.nii.gz"]


@contextlib.contextmanager
def _read_only_folder(path: Path):
    """``path`` as a folder nobody can write to: mode 0555, and for root (whom modes do not stop) immutable."""
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    try:
        try:
            (path / "probe").touch()
        except OSError:
            pass  # the mode is enough
        else:
            (path / "probe").unlink()
            chattr = shutil.which("chattr")
            immutable = chattr is not None and subprocess.run([chattr, "+i", str(path)]).returncode == 0
            if not immutable:
                pytest.skip("cannot make a folder read-only here (root, no chattr +i)")
        yield path
    finally:
        if immutable:
            subprocess.run([shutil.which("chattr"), "-i", str(path)], check=True)
        path.chmod(0o755)


@pytest.mark.slow
def test_an_unwritable_output_folder_fails_before_any_work(tmp_path):
    """A read-only output folder used to be found only when each file, already computed, was written."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(np.random.rand(12, 32, 32).astype(np.float32), np.eye(4)), inputs / "a.nii.gz")
    ckpt = tmp_path / "model.pt"
    _save_model(ckpt, 3)
    with _read_only_folder(tmp_path / "out") as out:
        proc = _infer(tmp_path, inputs, out, ckpt, "--patch_size", "[8,32,32]")
        assert list(out.iterdir()) == []
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "FAILED" not in log and "instances ->" not in log  # no image was segmented
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"error: PermissionError: Output folder {out} is not writable"), proc.stderr[-2000:]
    (tmp_path / "file").write_text("")
    proc = _infer(tmp_path, inputs, tmp_path / "file", ckpt, "--patch_size", "[8,32,32]")
    assert proc.returncode != 0 and f"Output folder {tmp_path / 'file'} is a file" in proc.stderr


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


# ------------------------------------------------------------------------------------------- image_scale


def _blobs(shape: tuple[int, ...], sigma: float) -> torch.Tensor:
    """Smooth test image (Gaussian blobs), so resampling there and back should nearly reproduce it."""
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    img = np.zeros(shape, np.float32)
    for frac in (0.3, 0.55, 0.75):
        centre = [frac * n for n in shape]
        img += np.exp(-sum((g - c) ** 2 for g, c in zip(grid, centre)) / (2 * sigma**2))
    return torch.as_tensor(img)[None, None]


def test_scaled_inferer_runs_the_network_at_the_scaled_size_and_maps_back():
    from monai.inferers import SimpleInferer, SlidingWindowInferer

    from spoco_bundle.inferers import ScaledInferer

    seen = []

    def identity(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[2:]))
        return torch.cat([x, -x], dim=1)

    x = _blobs((60, 80), sigma=6.0)
    out = ScaledInferer(SimpleInferer(), 0.5)(x, identity)
    assert seen == [(30, 40)] and out.shape == (1, 2, 60, 80)
    # the round trip keeps the blobs where they were (a half-pixel misregistration would show here)
    assert float((out[:, :1] - x).abs().max()) < 0.06
    assert torch.equal(out[:, 1:], -out[:, :1])
    # per-axis factors, 3D, through a sliding window with a patch larger than the shrunk volume
    seen.clear()
    x3 = _blobs((12, 40, 48), sigma=4.0)
    out3 = ScaledInferer(SlidingWindowInferer((16, 32, 32)), (1.0, 0.5, 0.5))(x3, identity)
    assert out3.shape == (1, 2, 12, 40, 48) and float((out3[:, :1] - x3).abs().max()) < 0.1
    # scale 1 is the wrapped inferer itself, bit for bit
    net = torch.nn.Conv2d(1, 3, 3, padding=1)
    sw = SlidingWindowInferer((32, 32), overlap=0.25, mode="gaussian")
    with torch.no_grad():
        assert torch.equal(ScaledInferer(sw, 1.0)(x, net), sw(x, net))


def test_scaled_inferer_can_return_the_network_grid():
    """output_grid="network": the network's own output, cut to the input's extent, which the "input" output is
    resampled from; scale 1 is the wrapped inferer's output either way."""
    from monai.inferers import SimpleInferer, SlidingWindowInferer

    from spoco_bundle.inferers import ScaledInferer

    def identity(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, -x], dim=1)

    x = _blobs((60, 80), sigma=6.0)
    net = ScaledInferer(SimpleInferer(), 0.5, output_grid="network")(x, identity)
    assert net.shape == (1, 2, 30, 40)
    back = ScaledInferer(SimpleInferer(), 0.5)(x, identity)
    from spoco_bundle.inferers import _resize_to

    np.testing.assert_allclose(_resize_to(net, (60, 80)).numpy(), back.numpy(), atol=1e-6)
    # through a sliding window, which moves the factor to whole strides and pads the image: the padding is cut off
    sw = SlidingWindowInferer((32, 32), overlap=0.25)
    for scale in (0.37, 1.6, (1.0, 0.45)):
        inferer = ScaledInferer(sw, scale, output_grid="network")
        out = inferer(x, identity)
        moved = inferer.last_scale * (2 // len(inferer.last_scale))
        assert out.shape[2:] == tuple(round(n * s) for n, s in zip((60, 80), moved))
        # the blobs sit where the input's are: the output resized back matches the input
        assert float((_resize_to(out[:, :1], (60, 80)) - x).abs().max()) < 0.12
    with pytest.raises(ValueError, match="output_grid must be 'input' or 'network'"):
        ScaledInferer(sw, 0.5, output_grid="image")


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"), [], "abc", [0.5, None]])
def test_scaled_inferer_rejects_bad_scales(scale):
    from monai.inferers import SimpleInferer

    from spoco_bundle.inferers import ScaledInferer

    with pytest.raises(ValueError, match="image_scale must be a positive number"):
        ScaledInferer(SimpleInferer(), scale)
    assert ScaledInferer(SimpleInferer(), "0.5").scale == (0.5,)  # a number given as text is one factor


def test_scaled_inferer_needs_one_factor_per_axis():
    from monai.inferers import SimpleInferer

    from spoco_bundle.inferers import ScaledInferer

    with pytest.raises(ValueError, match="2 factors but the input has 3 spatial axes"):
        ScaledInferer(SimpleInferer(), (0.5, 0.5))(torch.zeros(1, 1, 8, 8, 8), lambda x: x)


@pytest.mark.slow
def test_image_scale_option_keeps_the_written_geometry(tmp_path):
    """``--image_scale`` resamples only what the network sees: the labels come back on the input's grid."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    vol = np.random.default_rng(2).random((12, 40, 36)).astype(np.float32)
    affine = np.diag([2.5, 0.5, 0.4, 1.0])
    nib.save(nib.Nifti1Image(vol, affine), inputs / "a.nii.gz")
    ckpt = tmp_path / "model.pt"
    _save_model(ckpt, 3)
    proc = _infer(tmp_path, inputs, tmp_path / "out", ckpt, "--patch_size", "[8,32,32]", "--image_scale", "[1,0.5,0.5]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels, meta = read_image(tmp_path / "out" / "a_instances.nii.gz")
    assert labels.shape == vol.shape
    np.testing.assert_allclose(np.abs(np.diag(np.asarray(meta["affine"]))[:3]), [2.5, 0.5, 0.4], rtol=1e-3)
    bad = _infer(tmp_path, inputs, tmp_path / "out_bad", ckpt, "--patch_size", "[8,32,32]", "--image_scale", "0")
    assert bad.returncode != 0 and "image_scale must be a positive number" in bad.stdout + bad.stderr
    assert not (tmp_path / "out_bad").exists() or not any((tmp_path / "out_bad").iterdir())


@pytest.mark.slow
def test_a_constant_image_gives_an_empty_segmentation_and_a_warning(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    tifffile.imwrite(inputs / "blank16.tif", np.full((40, 60), 1234, dtype=np.uint16))  # a failed 16-bit export
    tifffile.imwrite(inputs / "noise.tif", np.random.default_rng(2).random((40, 60)).astype(np.float32))
    ckpt = tmp_path / "model.pt"
    _save_model(ckpt, 2)
    proc = _infer(tmp_path, inputs, tmp_path / "out", ckpt, "--spatial_dims", "2", "--patch_size", "[32,32]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "blank16.tif: the image is constant" in log
    labels, _ = read_image(tmp_path / "out" / "blank16_instances.tif")
    assert labels.shape == (40, 60) and not np.asarray(labels).any()
    assert (tmp_path / "out" / "noise_instances.tif").is_file()  # the other image is segmented as usual


def test_sliding_window_runs_on_device_and_stitches_on_output_device():
    """GPU memory bounds the window, not the volume: windows go to ``device``, the stitched output to
    ``output_device`` (default the CPU)."""
    parser = ConfigParser()
    parser.read_config(INFER)
    window = parser.get_parsed_content("sliding_window_inferer")
    assert torch.device(window.device) == torch.device("cpu")
    assert torch.device(window.sw_device) == torch.device(parser.get_parsed_content("device"))
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"device": "$torch.device('cpu')", "output_device": "meta", "patch_size": [32, 32]})
    window = parser.get_parsed_content("sliding_window_inferer")
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    out = window(torch.rand(1, 1, 40, 50), net)  # windows on the CPU, the stitched output where asked
    assert out.device.type == "meta" and tuple(out.shape) == (1, 2, 40, 50)


def test_inference_window_is_the_training_patch_enlarged():
    from spoco_bundle.inferers import inference_window

    assert inference_window([192, 192]) == [320, 320]
    assert inference_window([32, 64, 64]) == [64, 112, 112]  # rounded up to a multiple of 16
    assert inference_window([192, 192], factor=1) == [192, 192]
    assert inference_window([32, 64, 64], features=[16, 32, 64, 128]) == [64, 112, 112]  # down-samples by 8
    assert inference_window([32, 64, 64], features=[8, 16, 32, 64, 128, 256]) == [64, 128, 128]  # by 32
    for bad in (dict(patch_size=[0, 64]), dict(patch_size=[64], factor=0), dict(patch_size=[])):
        with pytest.raises(ValueError, match="inference_window"):
            inference_window(**bad)
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"device": "$torch.device('cpu')", "patch_size": [192, 192]})
    assert list(parser.get_parsed_content("sliding_window_inferer").roi_size) == [320, 320]


def test_an_image_smaller_than_the_window_is_padded_with_its_own_border():
    """A constant image smaller than the window gives a constant output: the window is filled by replicating the
    image's border, not with zeros, so the image's edges look like its inside (zeros would mark them as dark
    background and shift the group norm's statistics)."""
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"device": "$torch.device('cpu')", "patch_size": [32, 32]})
    window = parser.get_parsed_content("sliding_window_inferer")
    assert list(window.roi_size) == [64, 64]
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    with torch.no_grad():
        out = window(torch.full((1, 1, 40, 50), 0.7), net)
    assert tuple(out.shape) == (1, 2, 40, 50)
    assert float((out - out[..., :1, :1]).abs().max()) < 1e-5


def test_a_window_the_network_cannot_take_is_an_error_naming_it():
    from spoco_bundle.inferers import check_window

    assert check_window([64, 112, 112], [16, 32, 64, 128]) == [64, 112, 112]
    assert check_window(96, [16, 32, 64, 128]) == 96
    for window in ([100, 100], [0, 64], [4, 8]):
        with pytest.raises(ValueError, match=r"window_size .* multiples of 8"):
            check_window(window, [16, 32, 64, 128])
    check_window([100, 100], [16, 32])  # two levels: multiples of 2
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"device": "$torch.device('cpu')", "window_size": [100, 100]})
    with pytest.raises(RuntimeError) as raised:  # the config parser wraps it; `monai.bundle run` ends on the cause
        parser.get_parsed_content("sliding_window_inferer")
    assert "window_size [100, 100] must be positive multiples of 8" in str(raised.value.__cause__)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_test_time_flips_make_the_head_flip_equivariant_and_keep_the_embeddings(spatial_dims):
    from spoco_bundle.inferers import FlippedHeadNet, network_for_clustering

    net = _network(spatial_dims).eval()
    wrapped = network_for_clustering(net, "watershed", "", embedding_dim=16, test_time_flips=True)
    assert isinstance(wrapped, FlippedHeadNet) and len(wrapped.flips) == 2**spatial_dims
    shape = (1, 1) + ((8, 16, 24) if spatial_dims == 3 else (16, 24))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, out = net(x), wrapped(x)
        flipped = wrapped(torch.flip(x, (2,)))
    assert out.shape == plain.shape
    torch.testing.assert_close(out[:, :-1], plain[:, :-1])  # the unflipped view's embeddings
    # the mean over the flip group commutes with a flip; the random network's own head does not
    torch.testing.assert_close(flipped[:, -1:], torch.flip(out[:, -1:], (2,)), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(net(torch.flip(x, (2,)))[:, -1:], torch.flip(plain[:, -1:], (2,)), atol=1e-4)


def test_test_time_flips_keep_what_the_inferers_read_from_the_network():
    from spoco_bundle.inferers import FlippedHeadNet, ScaledInferer, StudentTeacherNet, network_for_clustering

    net = _network(2).eval()
    net.image_blob_scale.copy_(torch.tensor([2.0, 3.0, 4.0]))
    wrapped = FlippedHeadNet(net, 2)
    assert wrapped.spatial_dims == 2 and wrapped.strides == net.strides
    assert ScaledInferer(lambda x, n: n(x), scale="auto")._training_blob_scales(wrapped) == (2.0, 3.0, 4.0)
    headless = ConfigParser()
    headless.read_config(INFER)
    headless.update({"features": [8, 16, 32], "spatial_dims": 2, "network_def#foreground_head": False})
    plain = headless.get_parsed_content("network_def")
    assert network_for_clustering(plain, "watershed", "", test_time_flips=True) is plain
    assert network_for_clustering(net, "watershed", "", test_time_flips=np.int64(2) == 2) is not net  # numpy's bool
    # beside its teacher too: the last channel is then a teacher embedding, never to be averaged as a head
    pair = StudentTeacherNet(plain, copy.deepcopy(plain), embedding_dim=16)
    assert network_for_clustering(pair, "watershed", "", test_time_flips=True) is pair
    # with a head, the pair's head channel is the student's averaged over the flips (the teacher runs once)
    headed = StudentTeacherNet(net, copy.deepcopy(net), embedding_dim=16)
    wrapped = network_for_clustering(headed, "watershed", "", test_time_flips=True)
    assert wrapped.head_network is net
    x = torch.rand(1, 1, 16, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = FlippedHeadNet(net, 2)(x)
        torch.testing.assert_close(wrapped(x)[:, -1:], alone[:, -1:])
        torch.testing.assert_close(wrapped(x)[:, :16], alone[:, :16])
    with pytest.raises(ValueError, match="spatial_dims"):
        FlippedHeadNet(net, 4)
    with pytest.raises(ValueError, match="--test_time_flips True or False\\), got 'false'"):
        network_for_clustering(net, "watershed", "", test_time_flips="false")


def test_bfloat16_runs_the_convolutions_in_bfloat16_and_the_embedding_head_in_float32():
    from spoco_bundle.inferers import ReducedPrecisionNet, ScaledInferer, network_for_clustering

    net = _network(2).eval()
    net.image_blob_scale.copy_(torch.tensor([2.0, 3.0, 4.0]))
    x = torch.rand(2, 1, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        exact = net(x)
    seen: dict[str, torch.dtype] = {}
    first_conv = net.input_block.conv1.conv
    spy = [
        first_conv.register_forward_hook(lambda m, a, out: seen.update(encoder=out.dtype)),
        net.output_block.register_forward_hook(lambda m, a, out: seen.update(head_in=a[0].dtype, head=out.dtype)),
    ]
    wrapped = network_for_clustering(net, "watershed", "", precision="bfloat16")
    assert isinstance(wrapped, ReducedPrecisionNet)
    with torch.inference_mode():
        out = wrapped(x)
    for h in spy:
        h.remove()
    assert seen == {"encoder": torch.bfloat16, "head_in": torch.float32, "head": torch.float32}
    assert out.dtype == torch.float32 and out.shape == exact.shape
    assert 0 < float((out - exact).abs().max()) < 0.05 * float(exact.abs().max())  # rounded, not another result
    # the wrapped network alone is untouched: autocast off after the call, float32 results (also in a thread)
    assert not torch.is_autocast_enabled("cpu")
    with torch.inference_mode():
        torch.testing.assert_close(net(x), exact, rtol=0, atol=0)
    with concurrent.futures.ThreadPoolExecutor(2) as pool, torch.inference_mode():
        both = list(pool.map(lambda f: f(x), [wrapped, net, wrapped, net]))
    torch.testing.assert_close(both[0], out, rtol=0, atol=0)
    torch.testing.assert_close(both[1], exact, rtol=0, atol=0)
    # wrapping twice hooks the head once
    network_for_clustering(net, "watershed", "", precision="bfloat16")
    assert len(net.output_block._forward_pre_hooks) == 1
    # what the inferers read from the network comes through
    assert wrapped.spatial_dims == 2 and wrapped.strides == net.strides
    assert ScaledInferer(lambda x, n: n(x), scale="auto")._training_blob_scales(wrapped) == (2.0, 3.0, 4.0)
    flipped = network_for_clustering(net, "watershed", "", test_time_flips=True, precision="bfloat16")
    assert ScaledInferer(lambda x, n: n(x), scale="auto")._training_blob_scales(flipped) == (2.0, 3.0, 4.0)


def test_precision_auto_takes_bfloat16_only_where_the_cpu_computes_it_natively():
    from spoco_bundle.inferers import ReducedPrecisionNet, native_bfloat16, network_for_clustering

    net = _network(2).eval()
    auto = network_for_clustering(net, "watershed", "", precision="auto")
    assert isinstance(auto, ReducedPrecisionNet) == native_bfloat16("cpu")
    assert network_for_clustering(net, "watershed", "", precision="float32") is net
    assert not native_bfloat16("meta")  # other devices: not measured, float32
    with pytest.raises(ValueError, match="precision must be one of auto, float32, bfloat16, got 'float16'"):
        network_for_clustering(net, "watershed", "", precision="float16")


def test_the_openvino_backend_without_openvino_says_how_to_install_it(monkeypatch):
    from spoco_bundle.inferers import network_for_clustering

    monkeypatch.setitem(sys.modules, "openvino", None)  # what `import openvino` meets where it is not installed
    with pytest.raises(ImportError, match=r"backend 'openvino' needs the openvino package: pip install"):
        network_for_clustering(_network(2).eval(), "watershed", "", backend="openvino")


@pytest.mark.slow
def test_inference_with_test_time_flips_on_a_real_file(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    tifffile.imwrite(inputs / "c.tif", np.random.default_rng(1).random((50, 70)).astype(np.float32))
    ckpt = tmp_path / "model.pt"
    _save_model(ckpt, 2)
    args = ("--spatial_dims", "2", "--patch_size", "[32,32]", "--test_time_flips", "True")
    proc = _infer(tmp_path, inputs, tmp_path / "out", ckpt, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels, _ = read_image(tmp_path / "out" / "c_instances.tif")
    assert labels.shape == (50, 70)


BAD_POSTPROCESSING_OPTIONS = [
    ("min_diameter_ratio", "off", "min_diameter_ratio must be a number >= 0 (0: off), got 'off'"),
    ("min_diameter_ratio", "-0.5", "min_diameter_ratio must be a number >= 0 (0: off), got -0.5"),
    ("boundary_threshold", "mean", "boundary_threshold must be a number in (0, 1) or 'median', got 'mean'"),
    ("boundary_threshold", "1", "boundary_threshold must be a number in (0, 1) or 'median', got 1"),
    ("precision", "float16", "precision must be one of auto, float32, bfloat16, got 'float16'"),
    ("backend", "onnx", "backend must be one of torch, openvino, got 'onnx'"),
]


@pytest.mark.parametrize("option, bad, want", BAD_POSTPROCESSING_OPTIONS)
def test_a_bad_postprocessing_option_fails_before_any_output(tmp_path, option, bad, want):
    inputs = tmp_path / "in"
    inputs.mkdir()
    tifffile.imwrite(inputs / "c.tif", np.random.default_rng(1).random((40, 40)).astype(np.float32))
    ckpt = tmp_path / "model.pt"
    _save_model(ckpt, 2)
    out = tmp_path / "out"
    proc = _infer(tmp_path, inputs, out, ckpt, "--spatial_dims", "2", "--patch_size", "[32,32]", f"--{option}", bad)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: ValueError: {want}"), proc.stderr[-2000:]  # at start-up, not per image
    assert not out.exists() or not any(out.iterdir())
