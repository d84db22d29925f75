"""Tests of spoco_bundle.labels: the reproducible choice of annotated objects (which ids are kept, how many) and the
relabelling that :class:`~spoco_bundle.transforms.SparseInstanceLabel` applies (tests/test_transforms.py tests the
transform itself)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spoco_bundle.labels import count_objects, kept_ids, num_kept, object_priority, select_objects
from spoco_bundle.transforms import SparseInstanceLabel


def test_selection_depends_on_name_and_seed():
    ids = np.arange(1, 51)
    by_name = {tuple(kept_ids(ids, 0.3, 0, f"img_{i}")) for i in range(10)}
    assert len(by_name) > 1
    by_seed = {tuple(kept_ids(ids, 0.3, s, "img")) for s in range(10)}
    assert len(by_seed) > 1


def test_selection_is_unbiased_and_nested():
    ids = np.arange(1, 21)
    counts = np.zeros(21)
    for i in range(400):
        counts[kept_ids(ids, 0.25, 0, f"image_{i:03d}")] += 1
    freq = counts[1:] / 400  # each id should be kept ~25% of the time (sd ~2.2%), not e.g. always the lowest ids
    assert np.all((freq > 0.13) & (freq < 0.37)), freq
    for i in range(20):
        small = set(kept_ids(ids, 0.1, 0, f"n{i}"))
        large = set(kept_ids(ids, 0.4, 0, f"n{i}"))
        assert small <= large


def test_an_objects_priority_depends_only_on_seed_name_and_id():
    ids = np.array([3, 17, 4_000_000_000])
    alone = [int(object_priority(np.array([i]), 5, "img")[0]) for i in ids]
    assert [int(v) for v in object_priority(ids, 5, "img")] == alone  # not on the other ids present
    assert [int(v) for v in object_priority(ids, 5, "img")] != [int(v) for v in object_priority(ids, 6, "img")]
    assert [int(v) for v in object_priority(ids, 5, "img")] != [int(v) for v in object_priority(ids, 5, "other")]


def test_num_kept_rounds_half_up_and_keeps_at_least_one():
    assert [num_kept(n, 0.25) for n in (0, 1, 2, 3, 5, 6, 10)] == [0, 1, 1, 1, 1, 2, 3]
    assert num_kept(7, 0.0) == 0 and num_kept(7, 1.0) == 7


def test_sparse_instance_label_is_select_objects():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 30, size=(1, 16, 20))
    label[label == 29] = 99
    for ratio, background in ((0.3, None), (0.5, 0), (1.0, 99)):
        transform = SparseInstanceLabel(ratio, background_label=background, seed=4)
        np.testing.assert_array_equal(
            transform(label, name="img"), select_objects(label, ratio, background, seed=4, name="img")
        )
        ids = np.arange(1, 29)
        np.testing.assert_array_equal(transform.kept_ids(ids, "img"), kept_ids(ids, ratio, 4, "img"))
        assert transform.num_kept(28) == num_kept(28, ratio)


def test_select_objects_names_the_file_in_its_errors():
    with pytest.raises(ValueError, match=r"/d/x_labels\.tif: labels contain negative values"):
        select_objects(np.array([[0, -1], [2, 3]]), name="x_labels", where="/d/x_labels.tif")
    with pytest.raises(ValueError, match="x_labels: labels must be integer ids"):
        select_objects(np.array([[0, 1.5]]), name="x_labels")
    with pytest.raises(ValueError, match="instance_ratio must be in"):
        select_objects(np.zeros((2, 2), np.int64), instance_ratio=1.5)


def test_count_objects_leaves_out_zero_and_the_background_id():
    label = np.array([[0, 3, 3], [7, 99, 0]], np.int32)
    assert count_objects(label) == 3 and count_objects(label, background_label=99) == 2
    assert count_objects(torch.as_tensor(label), background_label=99) == 2
    assert count_objects(np.zeros((3, 3), np.int32)) == 0
