"""research.label_audit: local contrast and matching of the ground-truth audit."""

from __future__ import annotations

import numpy as np

from research.label_audit import _matches, local_contrast


def test_local_contrast_tells_a_visible_object_from_an_invisible_one():
    rng = np.random.default_rng(0)
    image = rng.normal(10.0, 1.0, (64, 64))
    labels = np.zeros((64, 64), np.int64)
    yy, xx = np.indices((64, 64))
    labels[(yy - 16) ** 2 + (xx - 16) ** 2 <= 9] = 1
    labels[(yy - 44) ** 2 + (xx - 44) ** 2 <= 9] = 2
    image[labels == 1] += 5.0  # bright; object 2 has the background's intensity
    z = local_contrast(image, labels)
    assert z[1] > 3 and abs(z[2]) < 1.5


def test_matches_at_iou_half_are_one_to_one():
    gt = np.zeros((10, 10), np.int64)
    gt[0:2, 0:4] = 1  # 8 px
    gt[5:9, 5:9] = 2
    pred = np.zeros_like(gt)
    pred[0:2, 0:2] = 3  # 4 of gt 1's 8 px: IoU exactly 0.5, a match
    pred[5:9, 5:6] = 1  # a quarter of gt 2: no match
    g, p, table = _matches(gt, pred)
    assert g.tolist() == [1] and p.tolist() == [3]
    assert table[2, 1] == 4


def test_a_ground_truth_object_matches_one_of_two_equal_candidates():
    gt = np.zeros((10, 10), np.int64)
    gt[0:2, 0:4] = 1  # 8 px
    pred = np.zeros_like(gt)
    pred[0:2, 0:2] = 1  # IoU 0.5
    pred[0:2, 2:4] = 2  # IoU 0.5 too: only one of them may match
    g, p, _ = _matches(gt, pred)
    assert g.tolist() == [1] and len(p) == 1 and p[0] in (1, 2)


def test_a_missing_predictions_file_is_a_clear_error(capsys):
    import pytest

    from research.label_audit import main

    with pytest.raises(SystemExit):
        main(["--predictions", "x=no/such/file.npz"])
    assert "no such file no/such/file.npz" in capsys.readouterr().err
