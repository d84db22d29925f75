"""Tests of the inference speed benchmark's inputs (research/perf/benchmark_inference.py)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from research.perf.benchmark_inference import _tile


def test_tiled_labels_keep_every_copy_of_an_object_its_own_id():
    labels = np.zeros((6, 8, 8), dtype=np.uint32)
    labels[1:3, 1:4, 1:4] = 1
    labels[3:5, 4:7, 2:6] = 7
    tiled = _tile(labels, (2, 3, 2), labels=True)
    assert tiled.shape == (12, 24, 16)
    ids = np.unique(tiled[tiled > 0])
    assert len(ids) == 2 * 2 * 3 * 2  # two objects in each of the 12 copies, no id shared between copies
    for i in ids:  # each id is one connected object (a copy's own)
        assert ndimage.label(tiled == i)[1] == 1
    assert np.array_equal(tiled > 0, _tile(labels > 0, (2, 3, 2), labels=False))  # the same foreground as the image


def test_an_object_cut_by_a_face_and_its_mirror_image_are_one_object():
    labels = np.zeros((4, 6, 6), dtype=np.uint16)
    labels[1:3, 4:6, 1:3] = 3  # touches the face y = 5: its mirror image in the next copy joins it
    labels[1:3, 1:3, 1:3] = 5  # inside: stays one object per copy
    tiled = _tile(labels, (1, 2, 1), labels=True)
    assert len(np.unique(tiled[tiled > 0])) == 3  # object 3 once (fused across the face), object 5 twice
    assert ndimage.label(tiled == tiled[1, 5, 1])[1] == 1 and (tiled == tiled[1, 5, 1]).sum() == 2 * 8


def test_tiled_images_are_mirrored_so_copies_meet_without_a_seam():
    image = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    tiled = _tile(image, (1, 2, 2), labels=False)
    assert np.array_equal(tiled[:, :3, :4], image)
    assert np.array_equal(tiled[:, 3:, :4], image[:, ::-1])  # mirrored along y: row 2 meets row 2
    assert np.array_equal(tiled[:, :3, 4:], image[:, :, ::-1])
