"""The compiled morphology kernels (spoco_bundle.clustering._morphology) against scikit-image, their reference."""

import numpy as np
import pytest
from scipy import ndimage
from skimage import morphology as skm

from spoco_bundle.clustering import _morphology as M

SHAPES = [(20, 30), (7, 9, 11), (1, 12), (12, 1), (3, 3, 3), (40, 50), (5, 16, 16)]


def _images(seed: int = 0):
    """Smooth random images of several shapes and float types, some quantised into plateaus (ties)."""
    rng = np.random.default_rng(seed)
    for i in range(2 * 3 * len(SHAPES)):
        shape = SHAPES[i % len(SHAPES)]
        dtype = (np.float32, np.float64)[i % 2]
        img = ndimage.gaussian_filter(rng.random(shape), 1 + i % 3)
        if i % 3 == 0:
            img = np.round(img * 20) / 20
        yield img.astype(dtype), float(rng.uniform(0.001, 0.05))


def test_reconstruction_equals_scikit_image():
    for img, h in _images():
        for method, seed in (("dilation", img - h), ("erosion", img + h)):
            ref = skm.reconstruction(seed, img, method=method)
            out = M.reconstruction(seed, img, method=method)
            assert out.dtype == ref.dtype and np.array_equal(out, ref), (img.shape, img.dtype, method)


def test_h_minima_and_local_maxima_equal_scikit_image():
    n_minima = n_maxima = 0
    for img, h in _images(1):
        ref = skm.h_minima(img, h)
        assert np.array_equal(M.h_minima(img, h), ref), (img.shape, img.dtype, h)
        ref_max = skm.local_maxima(img, allow_borders=True)
        assert np.array_equal(M.local_maxima(img), ref_max), (img.shape, img.dtype)
        n_minima += int(ref.sum())
        n_maxima += int(ref_max.sum())
    assert n_minima > 50 and n_maxima > 50  # the comparison saw many extrema, not empty masks


def test_edge_cases():
    flat = np.full((6, 7), 0.5)
    assert not M.local_maxima(flat).any() and not skm.local_maxima(flat, allow_borders=True).any()
    ramp = np.linspace(0, 1, 20).reshape(4, 5)
    assert not M.h_minima(ramp, 2.0).any()  # h above the image's range: no minimum
    with pytest.raises(ValueError, match="seed <= mask"):
        M.reconstruction(ramp + 1, ramp)
    with pytest.raises(ValueError, match="float image"):
        M.h_minima(np.arange(12).reshape(3, 4), 1)
    with pytest.raises(ValueError, match="one shape"):
        M.reconstruction(ramp, ramp[:2])


def test_dome_maxima_equals_scikit_image():
    for img, h in _images(2):
        img = img.astype(np.float64)
        ref = skm.local_maxima(skm.reconstruction(img - h, img), allow_borders=True)
        assert np.array_equal(M.dome_maxima(img, h), ref), (img.shape, h)
        within = img > np.median(img)  # as split_by_shape asks: the maxima inside the object only
        assert np.array_equal(M.dome_maxima(img, h, within), ref & within), (img.shape, h)
    assert not M.dome_maxima(np.ones((4, 5)), 0.1).any()


def test_watershed_agrees_with_scikit_image():
    """The hierarchical queue floods values closer than 1/4096 of the range in the order reached: a few voxels where
    basins meet may go to the other basin, no more."""
    from skimage.segmentation import watershed as sk_watershed

    rng = np.random.default_rng(3)
    differ = total = 0
    for i in range(24):
        shape = [(30, 40), (9, 20, 21), (1, 15), (64, 64)][i % 4]
        img = ndimage.gaussian_filter(rng.random(shape), 1.5).astype((np.float32, np.float64)[i % 2])
        markers, n = ndimage.label(M.h_minima(img, 0.005))
        mask = None if i % 3 == 0 else ndimage.gaussian_filter(rng.random(shape), 2) > 0.48
        ref = sk_watershed(img, markers, mask=mask)
        out = M.watershed(img, markers, mask)
        assert out.dtype == np.int32 and out.shape == ref.shape
        assert np.array_equal(out > 0, ref > 0)  # the same voxels are reached (mask, markers' components)
        assert set(np.unique(out)) == set(np.unique(ref))  # every basin keeps its seed
        differ += int((out != ref).sum())
        total += out.size
    assert differ <= 0.005 * total, (differ, total)
    with pytest.raises(ValueError, match="one shape"):
        M.watershed(np.zeros((3, 4)), np.zeros((3, 5), int))
