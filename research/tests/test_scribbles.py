"""Simulated background scribbles (spoco_bundle.scribbles) and the supervised foreground regime they train."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from scipy import ndimage

from spoco_bundle.losses import ForegroundLoss, SpocoLoss
from spoco_bundle.scribbles import SimulateScribbles, SimulateScribblesd, scribble_slice
from spoco_bundle.transforms import SparseInstanceLabeld

B = 65535


def _discs(shape=(128, 128), n=12, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        cy, cx = rng.integers(10, shape[0] - 10), rng.integers(10, shape[1] - 10)
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = i
    return lab


def test_strokes_lie_in_background_away_from_objects():
    lab = _discs()
    sim = SimulateScribbles(strokes=6, background_label=B, width=3, margin=2, max_fraction=0.02)
    strokes = sim.mask(lab, "img")
    assert strokes.any()
    assert not (strokes & (lab > 0)).any()
    # every stroke pixel keeps at least `margin` pixels from every object
    dist = ndimage.distance_transform_edt(lab == 0)
    assert dist[strokes].min() > 2
    assert strokes.sum() <= 0.02 * (lab == 0).sum()
    # thin paths, not blobs: far fewer pixels than their bounding boxes
    assert ndimage.label(strokes)[1] >= 1


def test_strokes_are_deterministic_per_file_name():
    lab = _discs()
    sim = SimulateScribbles(strokes=4, background_label=B, seed=3)
    np.testing.assert_array_equal(sim.mask(lab, "a"), sim.mask(lab, "a"))
    assert not np.array_equal(sim.mask(lab, "a"), sim.mask(lab, "b"))
    assert not np.array_equal(
        sim.mask(lab, "a"), SimulateScribbles(strokes=4, background_label=B, seed=4).mask(lab, "a")
    )


def test_3d_strokes_on_a_few_slices():
    lab = np.stack([_discs((64, 64), n=4, seed=z) for z in range(20)])
    strokes = SimulateScribbles(strokes=3, background_label=B, slices=3, max_fraction=0.5).mask(lab, "vol")
    painted = np.flatnonzero(strokes.reshape(20, -1).any(1))
    assert 1 <= len(painted) <= 3
    assert not (strokes & (lab > 0)).any()


def test_array_transform_paints_the_background_id_and_keeps_the_type():
    lab = _discs()
    mt = MetaTensor(torch.as_tensor(lab[None]), meta={"filename_or_obj": "/data/labels/cell_07.tif"})
    out = SimulateScribbles(strokes=4, background_label=B)(mt)
    assert isinstance(out, MetaTensor) and out.shape == mt.shape and out.dtype == mt.dtype
    assert out.meta["filename_or_obj"] == "/data/labels/cell_07.tif"
    painted = out[0].numpy() == B
    np.testing.assert_array_equal(painted, SimulateScribbles(strokes=4, background_label=B).mask(lab, "cell_07"))
    np.testing.assert_array_equal(out[0].numpy()[~painted], lab[~painted])  # objects and the rest unchanged
    assert SimulateScribbles(strokes=0)(lab) is lab  # off: untouched
    assert SimulateScribbles(strokes=0, background_label=0)(lab) is lab  # off, with the dense-truth background id 0


def test_with_sparse_labels_strokes_become_annotated_background():
    lab = _discs()
    d = {"label": MetaTensor(torch.as_tensor(lab[None]), meta={"filename_or_obj": "x.tif"})}
    d = SimulateScribblesd("label", strokes=4, background_label=B)(d)
    d = SparseInstanceLabeld("label", instance_ratio=0.25, background_label=B)(d)
    out = d["label"][0].numpy()
    assert (out == -1).sum() == SimulateScribbles(strokes=4, background_label=B).mask(lab, "x").sum() > 0
    assert out.max() == 3  # 25 % of 12 objects kept, the rest and the unpainted background unlabeled
    assert set(np.unique(out[(lab == 0) & (out != -1)])) == {0}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strokes": 2, "background_label": None}, "need a background_label"),
        ({"strokes": -1, "background_label": B}, "strokes must be"),
        ({"strokes": 2, "background_label": 0}, "positive id"),
        ({"strokes": 2, "background_label": B, "max_fraction": 0}, "max_fraction"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimulateScribbles(**kwargs)


def test_background_id_used_by_an_object_names_the_file():
    lab = _discs()
    lab[lab == 3] = 7
    mt = MetaTensor(torch.as_tensor(lab[None]), meta={"filename_or_obj": "/d/labels/bad.tif"})
    with pytest.raises(ValueError, match="bad.tif.*background_label 7 is already used"):
        SimulateScribbles(strokes=2, background_label=7)(mt)


def test_no_background_no_strokes():
    assert not scribble_slice(np.zeros((32, 32), bool), 4, np.random.default_rng(0)).any()
    full = np.ones((20, 30, 30), np.int32)  # tissue with no background (every voxel some cell)
    assert not SimulateScribbles(strokes=4, background_label=B).mask(full, "t").any()


def test_stroke_regime_is_positive_unlabeled_plus_a_stroke_term():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 6, 7, requires_grad=True)
    target = torch.zeros(2, 1, 6, 7, dtype=torch.long)
    target[0, 0, :2] = 1  # image 0: an object and a stroke
    target[0, 0, 5, :3] = -1
    target[1, 0, 3:, 4:] = 2  # image 1: an object, no stroke in this patch
    loss = ForegroundLoss(positive_weight=10.0, strokes=True)(logits, target)
    x, t = logits[:, 0].reshape(2, -1), target[:, 0].reshape(2, -1)
    bce = F.binary_cross_entropy_with_logits(x, (t > 0).float(), reduction="none")
    expected = torch.where(t > 0, 10 * bce, bce).mean() + bce[t < 0].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad != 0)  # every voxel counts: unlabeled ones are the negatives of PU learning
    # without strokes the same target is plain positive-unlabeled learning (image 0 would be supervised otherwise)
    no_strokes = target.clamp_min(0)
    pu = ForegroundLoss(positive_weight=10.0, strokes=True)(logits, no_strokes)
    assert pu.item() == pytest.approx(ForegroundLoss(positive_weight=10.0)(logits, no_strokes).item(), rel=1e-6)


def test_spoco_loss_estimates_the_label_frequency_on_images_with_strokes():
    emb = torch.randn(1, 5, 8, 8)  # 4 embedding channels + foreground logit
    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target[0, 0, :3, :3] = 1
    target[0, 0, 6:, 6:] = 2
    target[0, 0, 4, :5] = -1  # a stroke
    dense = SpocoLoss(embedding_dim=4)  # annotated background taken as dense: the image is supervised, no c
    dense(emb, target)
    assert dense.last_label_frequency[1] == 0
    strokes = SpocoLoss(embedding_dim=4, foreground_strokes=True)
    strokes(emb, target)
    assert strokes.last_label_frequency[1] == 13  # 9 + 4 annotated pixels: c from every image
