"""spoco_bundle.training_set.TrainingSet: the annotated objects a training run keeps (their count and median
diameter, from real label files) and the blob size of its images, as the model records them."""

from __future__ import annotations

import math
import os

import nibabel as nib
import numpy as np
import pytest
import tifffile
from _shapes import discs, grid_centres
from scipy import ndimage

from spoco_bundle.measure import blob_scale, median_diameter
from spoco_bundle.training_set import TrainingSet
from spoco_bundle.transforms import SparseInstanceLabel


def _training_set(files, **kwargs) -> TrainingSet:
    """A 2D training set of these files, each one an item's image and label at once: the objects are measured on
    the labels alone, the blob sizes on the images alone, so each test reads its files in one role only."""
    return TrainingSet([{"image": str(f), "label": str(f)} for f in files], 2, **kwargs)


def test_object_diameter_reads_files_and_counts_the_kept_objects(tmp_path):
    """The diameter training records: the objects its sparse selection keeps, from TIFF and NIfTI files, times the
    training's image_scale; background_label ids are not objects."""
    small = discs((128, 128), grid_centres((128, 128), 32, 16), radius=5)  # 16 discs of diameter 10
    large = discs((128, 128), grid_centres((128, 128), 64, 32), radius=12)  # 4 discs of diameter 24
    tifffile.imwrite(tmp_path / "a_labels.tif", small.astype(np.uint16))
    nib.save(nib.Nifti1Image(large.T.astype(np.int16), np.eye(4)), str(tmp_path / "b_labels.nii.gz"))
    files = [tmp_path / "a_labels.tif", tmp_path / "b_labels.nii.gz"]
    # all objects: 16 of diameter 10 and 4 of 24 pooled -> the median is a small one's
    assert _training_set(files).object_diameter == pytest.approx(10.0, rel=0.05)
    assert _training_set(files, image_scale=[0.5, 0.5]).object_diameter == pytest.approx(5.0, rel=0.05)
    # a sparse selection: exactly the objects SparseInstanceLabel keeps for these file names
    keep = SparseInstanceLabel(instance_ratio=0.25, seed=3)
    kept = [keep(small, name="a_labels"), keep(large, name="b_labels")]
    assert _training_set(files, instance_ratio=0.25, seed=3).object_diameter == pytest.approx(median_diameter(kept))
    # the id of painted background is no object: one disc of diameter 10, two of 30, one of them id 99
    painted = discs((128, 128), [(20, 20), (60, 60), (60, 100)], radius=15)
    painted[painted == 1] = 0
    painted[discs((128, 128), [(20, 20)], radius=5) > 0] = 1
    painted[painted == 3] = 99
    tifffile.imwrite(tmp_path / "c_labels.tif", painted.astype(np.uint16))
    assert _training_set([tmp_path / "c_labels.tif"]).object_diameter == pytest.approx(30.0, rel=0.05)
    with_background = _training_set([tmp_path / "c_labels.tif"], background_label=99)
    assert with_background.object_diameter == pytest.approx(20.0, rel=0.05)
    assert math.isnan(_training_set([]).object_diameter)


def test_object_count_counts_the_kept_objects_of_every_file(tmp_path):
    """What foreground_ring "auto" decides on: every kept object in every file, and a label file rewritten under the
    same name is read again by the next run's training set (MONAI Label trains again in one process after an
    annotator saved)."""
    lab = discs((64, 64), grid_centres((64, 64), 16, 8), radius=4)  # 16 discs
    path = tmp_path / "a_labels.tif"
    tifffile.imwrite(path, lab.astype(np.uint16))
    assert _training_set([path]).object_count == 16 and _training_set([path, path]).object_count == 32
    keep = SparseInstanceLabel(instance_ratio=0.25, seed=3)
    sparse = _training_set([path], instance_ratio=0.25, seed=3)
    assert sparse.object_count == len(np.unique(keep(lab, name="a_labels"))) - 1
    tifffile.imwrite(path, np.where(lab > 2, 0, lab).astype(np.uint16))  # an annotator removed 14 objects
    st = path.stat()  # the same size: a later modification time (not left to the clock's resolution) marks it new
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _training_set([path]).object_count == 2
    assert _training_set([]).object_count == 0


def _blob_image(radius: float, size: int = 192) -> np.ndarray:
    """Bright discs of ``radius`` on a grid (as nuclei), slightly blurred."""
    lab = discs((size, size), grid_centres((size, size), int(4 * radius), int(2 * radius)), radius)
    return ndimage.gaussian_filter((lab > 0).astype(np.float32), 1.0)


def test_blob_scales_from_files(tmp_path):
    files = []
    for k, r in enumerate((4.0, 6.0, 8.0, 10.0, 12.0)):
        files.append(tmp_path / f"img{k}.tif")
        tifffile.imwrite(files[-1], _blob_image(r).astype(np.float32))
    q = _training_set(files).blob_scales
    b = [blob_scale(_blob_image(r)) for r in (4.0, 6.0, 8.0, 10.0, 12.0)]
    assert q == pytest.approx(tuple(np.quantile(b, (0.1, 0.5, 0.9))), rel=1e-4)
    assert _training_set(files, image_scale=0.5).blob_scales == pytest.approx(tuple(v / 2 for v in q), rel=1e-4)
    assert all(math.isnan(v) for v in _training_set([]).blob_scales)
