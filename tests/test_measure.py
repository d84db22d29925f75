"""spoco_bundle.measure: equivalent diameters of objects; the blob size of an image and ``image_scale "auto"``
resampling images outside the training images' range; the coarse background taken off before the blob size is
measured. (The training set's own measurements: tests/test_training_set.py.)"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from _shapes import discs, grid_centres
from scipy import ndimage

from spoco_bundle.measure import (
    BLOB_SIGMAS,
    MIN_INTERIOR,
    blob_scale,
    coarse_background,
    equivalent_diameters,
    median_diameter,
)


def test_equivalent_diameters_of_discs_and_balls():
    lab = discs((120, 120), grid_centres((120, 120), 30, 15), radius=8)
    d = equivalent_diameters(lab)
    assert d.shape == (16,) and np.allclose(d, 16.0, rtol=0.03)
    ball = discs((40, 40, 40), [(20, 20, 20)], radius=10)
    assert equivalent_diameters(ball) == pytest.approx(20.0, rel=0.03)
    assert equivalent_diameters(np.zeros((5, 5), np.int32)).size == 0
    assert math.isnan(median_diameter([np.zeros((5, 5), np.int32)]))
    with pytest.raises(ValueError, match="integers"):
        equivalent_diameters(lab.astype(np.float32))
    with pytest.raises(ValueError, match="2D or 3D"):
        equivalent_diameters(np.zeros(5, np.int32))


def test_objects_cut_by_the_border_are_left_out_when_enough_others_remain():
    interior = discs((100, 100), grid_centres((100, 100), 25, 20)[:MIN_INTERIOR], radius=6)
    cut = np.zeros_like(interior)
    cut[:3, 40:60] = 99  # a sliver of a large object cut by the top border
    lab = np.where(cut > 0, cut, interior)
    assert np.allclose(equivalent_diameters(lab), 12.0, rtol=0.05)  # the sliver does not count
    assert equivalent_diameters(lab, exclude_border=False).size == MIN_INTERIOR + 1
    few = np.where(cut > 0, cut, np.where(interior > 2, 0, interior))  # two interior objects only: all count
    assert equivalent_diameters(few).size == 3
    # negative ids (painted background) are not objects
    assert equivalent_diameters(np.where(cut > 0, -1, interior)).size == MIN_INTERIOR


# ------------------------------------------------------------------------------------ blob size, image_scale auto


def _blob_image(radius: float, size: int = 192, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """Bright discs of ``radius`` on a grid (as nuclei), slightly blurred, optional Gaussian noise."""
    lab = discs((size, size), grid_centres((size, size), int(4 * radius), int(2 * radius)), radius)
    img = ndimage.gaussian_filter((lab > 0).astype(np.float32), 1.0)
    return img + noise * np.random.default_rng(seed).standard_normal(img.shape).astype(np.float32)


def test_blob_scale_moves_with_the_magnification():
    b5, b10, b20 = (blob_scale(_blob_image(r)) for r in (5.0, 10.0, 20.0))
    assert b10 / b5 == pytest.approx(2.0, rel=0.1) and b20 / b10 == pytest.approx(2.0, rel=0.1)
    # pixel noise as strong as the blobs does not pull the peak to the finest scale
    assert blob_scale(_blob_image(10.0, noise=0.5)) == pytest.approx(b10, rel=0.15)
    # 3D
    ball = ndimage.gaussian_filter(discs((48, 48, 48), [(24, 24, 24)], 8).astype(np.float32), 1.0)
    big = ndimage.gaussian_filter(discs((96, 96, 96), [(48, 48, 48)], 16).astype(np.float32), 1.0)
    assert blob_scale(big) / blob_scale(ball) == pytest.approx(2.0, rel=0.15)
    assert math.isnan(blob_scale(np.ones((32, 32), np.float32)))
    with pytest.raises(ValueError, match="2D or 3D"):
        blob_scale(np.zeros(8, np.float32))


def test_blob_scale_ignores_a_background_ramp():
    spots = _blob_image(6.0)
    ramp = spots + np.linspace(0.0, 3.0, spots.shape[1], dtype=np.float32)[None, :]  # 3x the spots' height
    assert blob_scale(ramp) == pytest.approx(blob_scale(spots), rel=0.1)
    # measured as it is, the ramp (not the spots) sets the scale: at the range's end
    assert blob_scale(ramp, flatten=False) > 3 * blob_scale(spots) and blob_scale(spots) < BLOB_SIGMAS[-1] / 4
    # brighter in the middle (vignetting)
    yy, xx = np.mgrid[:192, :192]
    dome = spots + 2.0 * (1 - ((yy - 96) ** 2 + (xx - 96) ** 2) / 96**2).astype(np.float32)
    assert blob_scale(dome) == pytest.approx(blob_scale(spots), rel=0.1) and blob_scale(dome, flatten=False) > 20
    # a volume brighter along z, with a ball a third of its width: the ball keeps its size
    ball = ndimage.gaussian_filter(discs((48, 48, 48), [(24, 24, 24)], 8).astype(np.float32), 1.0)
    slope = ball + np.linspace(0.0, 2.0, 48, dtype=np.float32)[:, None, None]
    assert blob_scale(slope) == pytest.approx(blob_scale(ball, flatten=False), rel=0.15)


class _Recorder(torch.nn.Module):
    """A stand-in network that returns its input twice and records the sizes it saw (the resampling under test
    does not depend on what the network computes)."""

    def __init__(self, blob_scales: tuple[float, float, float] | None = None) -> None:
        super().__init__()
        self.register_buffer("image_blob_scale", torch.tensor(blob_scales or (0.0, 0.0, 0.0)))
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[2:]))
        return torch.cat([x, x], dim=1)


def test_auto_scale_resamples_only_images_outside_the_training_range():
    from monai.inferers import SimpleInferer

    from spoco_bundle.inferers import ScaledInferer

    trained = [blob_scale(_blob_image(r)) for r in (8.0, 10.0, 12.0)]  # the model saw blobs of radius 8-12
    net = _Recorder(tuple(trained))
    inferer = ScaledInferer(SimpleInferer(), "auto")
    same = torch.as_tensor(_blob_image(9.0))[None, None]
    out = inferer(same, net)
    assert inferer.last_scale == (1.0,) and net.seen == [(192, 192)] and torch.equal(out, torch.cat([same, same], 1))
    large = torch.as_tensor(_blob_image(20.0, size=256))[None, None]  # twice the training median
    out = inferer(large, net)
    # resampled halfway (geometrically) between the range's nearer end (radius 12.5: the median x 1.25) and the
    # median (10): to radius sqrt(12.5 x 10)
    assert inferer.last_scale[0] == pytest.approx((12.5 * 10) ** 0.5 / 20, rel=0.12)
    assert net.seen[-1] == (round(256 * inferer.last_scale[0]),) * 2 and out.shape == (1, 2, 256, 256)
    small = torch.as_tensor(_blob_image(4.0))[None, None]
    inferer(small, net)
    # enlarged alike: halfway between the range's lower end (radius 8) and the median
    assert inferer.last_scale[0] == pytest.approx((8 * 10) ** 0.5 / 4, rel=0.12)
    # the training range given explicitly replaces the record
    given = ScaledInferer(SimpleInferer(), "auto", blob_scales=[v / 2 for v in trained])
    given(large, _Recorder())
    assert given.last_scale[0] == pytest.approx((6.25 * 5) ** 0.5 / 20, rel=0.12)
    # one training blob size (a single training volume): images within 1.25x either way are left alone
    b = blob_scale(_blob_image(10.0))
    single = ScaledInferer(SimpleInferer(), "auto", blob_scales=[b, b, b])
    single(torch.as_tensor(_blob_image(11.0))[None, None], _Recorder())
    assert single.last_scale == (1.0,)
    single(torch.as_tensor(_blob_image(15.0))[None, None], _Recorder())
    assert single.last_scale[0] == pytest.approx((12.5 * 10) ** 0.5 / 15, rel=0.12)


def test_auto_scale_without_a_record_runs_at_one_and_says_so(caplog):
    from monai.inferers import SimpleInferer

    from spoco_bundle.inferers import ScaledInferer

    net = _Recorder()
    inferer = ScaledInferer(SimpleInferer(), "auto")
    with caplog.at_level(logging.WARNING, logger="spoco_bundle.inferers"):
        inferer(torch.as_tensor(_blob_image(20.0))[None, None], net)
    assert net.seen == [(192, 192)] and inferer.last_scale == (1.0,)
    assert "records no blob size of its training images" in caplog.text
    # an image with nothing in it: segmented at 1 (empty), with a warning, no error
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spoco_bundle.inferers"):
        out = ScaledInferer(SimpleInferer(), "auto", blob_scales=[4, 5, 6])(torch.zeros(1, 1, 64, 64), net)
    assert out.shape == (1, 2, 64, 64) and "no structure to measure" in caplog.text


@pytest.mark.parametrize("bad", [[1.0, 2.0], [3.0, 2.0, 1.0], [0.0, 1.0, 2.0], [1.0, float("nan"), 2.0]])
def test_auto_scale_arguments_are_checked(bad):
    from monai.inferers import SimpleInferer

    from spoco_bundle.inferers import ScaledInferer

    with pytest.raises(ValueError, match="blob_scales must be three increasing positive numbers"):
        ScaledInferer(SimpleInferer(), "auto", blob_scales=bad)
    with pytest.raises(ValueError, match="image_scale must be a positive number"):
        ScaledInferer(SimpleInferer(), "automatic")


# ------------------------------------------------------------------------------------------- coarse background


def _spots_on_a_ramp(shape: tuple[int, ...], ramp: float, radius: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Bright spots (height 1, Gaussian sigma ``radius``, every 16 voxels) over a background rising from 0 to
    ``ramp`` along the last axis; and the spots' mask."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    centres = np.stack(np.meshgrid(*[np.arange(8, n - 4, 16) for n in shape], indexing="ij"), -1)
    spots = np.zeros(shape, np.float32)
    for centre in centres.reshape(-1, len(shape)):
        r2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
        spots = np.maximum(spots, np.exp(-r2 / (2 * radius**2)))
    return spots + ramp * grids[-1] / (shape[-1] - 1), spots > 0.5


def test_coarse_background_at_the_border():
    # a ramp rising towards the border is followed up to it (a plain mirror makes a crest there, which the opening
    # cuts: the background ran up to a sixth of the ramp low along that border)
    ramp = np.linspace(0.0, 3.0, 128, dtype=np.float32)[None, :] * np.ones((96, 1), np.float32)
    assert np.abs(coarse_background(ramp, 15.0) - ramp).max() < 0.1
    # spots cut by the border (flat background 0), also along a short z axis: no dark copies past the border pull
    # the background below 0
    flat, _ = _spots_on_a_ramp((96, 128), 0.0)
    cut = np.concatenate([flat[:, 8:], flat[:, :8]], axis=1)  # a column of spots on the x = 0 border
    assert coarse_background(cut, 15.0).min() > -0.01
    short, _ = _spots_on_a_ramp((16, 96, 96), 0.0)
    assert coarse_background(short, 15.0).min() > -0.01 and coarse_background(short, 43.0).min() > -0.01


def test_coarse_background_of_a_constant_is_the_constant():
    # sides that are not whole blocks: the background of a constant is the constant up to the last voxel
    np.testing.assert_allclose(coarse_background(np.full((37, 50, 61), 3.0), 27.0), 3.0, rtol=1e-6)
