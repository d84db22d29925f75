"""RandPasteObjects: copies of a patch's annotated objects pasted beside annotated objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from spoco_bundle.copy_paste import RandPasteObjects, RandPasteObjectsd
from spoco_bundle.transforms import CALIBRATION_ID_OFFSET, PASTED_ID_OFFSET


def _patch(shape=(64, 64), seed=0):
    """Two annotated blobs of distinct shapes, one unannotated region, random image values."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((1, *shape), np.int64)
    grid = np.indices(shape)
    centre = np.array(shape) // 2
    ball = (centre - np.array(shape) // 5).reshape(-1, *[1] * len(shape))
    lab[0][((grid - ball) ** 2).sum(0) <= 16] = 1  # a disc / ball of radius 4
    box = tuple(slice(c + 2, c + 6) for c in centre)
    lab[0][box] = 2  # a square / cube of side 4
    lab[0][tuple(slice(1, 5) for _ in shape)] = -1  # annotated background in a corner
    image = rng.random((1, *shape)).astype(np.float32)
    return image, lab


def _new_objects(before, after):
    return [i for i in np.unique(after) if i > before.max()]


@pytest.mark.parametrize("shape", [(64, 64), (24, 40, 40)])
def test_copies_are_whole_objects_with_their_pixels(shape):
    image, lab = _patch(shape)
    t = RandPasteObjects(prob=1.0, max_objects=3, touch_prob=0.5)
    t.set_random_state(3)
    seen = 0
    for _ in range(10):
        img2, lab2 = t(image, lab)
        old = lab[0] > 0
        # annotated voxels keep their label and their pixels
        np.testing.assert_array_equal(lab2[0][old], lab[0][old])
        np.testing.assert_array_equal(img2[:, old], image[:, old])
        for i in _new_objects(lab, lab2):
            seen += 1
            mask = lab2[0] == i
            assert ndimage.label(mask)[1] == 1
            # a copy of object 1 or 2: the same size and the same multiset of pixel values
            sources = [j for j in (1, 2) if (lab[0] == j).sum() == mask.sum()]
            assert any(np.array_equal(np.sort(img2[0][mask]), np.sort(image[0][lab[0] == j])) for j in sources)
        # outside the copies nothing changed
        changed = lab2[0] > lab[0].max()
        np.testing.assert_array_equal(img2[:, ~changed], image[:, ~changed])
    assert seen > 5


def test_touching_copies_touch_an_annotated_object():
    image, lab = _patch()
    t = RandPasteObjects(prob=1.0, max_objects=2, touch_prob=1.0, touch_distance=2)
    t.set_random_state(0)
    seen = 0
    for _ in range(10):
        _, lab2 = t(image, lab)
        for i in _new_objects(lab, lab2):
            seen += 1
            near = ndimage.binary_dilation(lab2[0] == i, iterations=2)
            others = (lab2[0] > 0) & (lab2[0] != i)
            assert (near & others).any()
            assert not ((lab2[0] == i) & (lab[0] > 0)).any()
    assert seen > 5


def test_nothing_to_copy_leaves_the_patch_unchanged():
    image, lab = _patch()
    border = np.zeros_like(lab)
    border[0, :6, 20:26] = 1  # touches the patch's border: not a whole object
    border[0, 30:34, 30:34] = CALIBRATION_ID_OFFSET + 1  # calibration objects are not copied
    border[0, 40:44, 40:44] = -1
    t = RandPasteObjects(prob=1.0)
    img2, lab2 = t(image, border)
    assert img2 is image and lab2 is border


def test_off_and_types():
    image, lab = _patch()
    img2, lab2 = RandPasteObjects(prob=0.0)(image, lab)
    assert img2 is image and lab2 is lab
    t = RandPasteObjects(prob=1.0, max_objects=1)
    t.set_random_state(1)
    img_t, lab_t = t(torch.from_numpy(image), torch.from_numpy(lab))
    assert isinstance(img_t, torch.Tensor) and lab_t.dtype == torch.int64 and img_t.dtype == torch.float32


def test_dictionary_version_is_reproducible():
    image, lab = _patch()
    out = []
    for _ in range(2):
        t = RandPasteObjectsd("label", prob=1.0, max_objects=3)
        t.set_random_state(7)
        out.append(t({"image": image, "label": lab, "image_g": image}))
    np.testing.assert_array_equal(out[0]["label"], out[1]["label"])
    np.testing.assert_array_equal(out[0]["image"], out[1]["image"])
    assert out[0]["label"].max() > PASTED_ID_OFFSET


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prob": 1.5}, "prob"),
        ({"touch_prob": -0.1}, "touch_prob"),
        ({"max_objects": 0}, "max_objects"),
        ({"touch_distance": -1}, "touch_distance"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandPasteObjects(**kwargs)


def test_float_labels_from_spatial_transforms_and_narrow_types():
    # a spatial transform (RandZoomd) may hand the label over as float32: ids stay exact
    image, lab = _patch()
    t = RandPasteObjects(prob=1.0, max_objects=2)
    t.set_random_state(0)
    _, out = t(image, lab.astype(np.float32))
    assert out.dtype == np.float32
    new = np.unique(out[out > PASTED_ID_OFFSET])
    assert len(new) >= 1 and np.array_equal(new, np.round(new)) and new.min() == PASTED_ID_OFFSET + 1
    with pytest.raises(ValueError, match="int16"):
        RandPasteObjects(prob=1.0)(image, lab.astype(np.int16))


def test_bad_shapes():
    image, lab = _patch()
    with pytest.raises(ValueError, match="label \\(1, \\*S\\)"):
        RandPasteObjects(prob=1.0)(image, lab[:, :32])
    with pytest.raises(ValueError, match="one label key"):
        RandPasteObjectsd(["label", "other"])
    with pytest.raises(KeyError, match="image key 'image'"):
        RandPasteObjectsd("label", prob=1.0)({"label": lab})


def test_pasted_copies_train_the_embeddings_not_the_head():
    from spoco_bundle.losses import SpocoLoss, labelled_foreground_probability

    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(1, 1, 32, 32, dtype=torch.int64)
    labels[0, 0, 4:10, 4:10] = 1
    labels[0, 0, 20:26, 20:26] = PASTED_ID_OFFSET + 1  # a copy
    pred = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=gen).requires_grad_()  # 2 embedding + head
    head_only = SpocoLoss(2, alpha=0, beta=0, gamma=0, instance_weight=0, unlabeled_weight=0, consistency_weight=0)
    head_only(pred, labels).backward()
    copy = labels[0, 0] > PASTED_ID_OFFSET
    assert (pred.grad[0, 2][copy] == 0).all() and (pred.grad[0, 2][~copy] != 0).all()
    # the same voxels as an ordinary object train the head
    pred.grad = None
    head_only(pred, torch.where(labels > PASTED_ID_OFFSET, 2, labels)).backward()
    assert (pred.grad[0, 2][copy] != 0).all()
    # the label frequency is estimated on the annotated objects alone, as for the labels without the copy
    c, count = head_only.last_label_frequency
    assert count > 36
    head_only(pred, labels)
    assert head_only.last_label_frequency[1] == 36
    assert head_only.last_label_frequency[0] == pytest.approx(
        labelled_foreground_probability(
            pred[:, 2:].detach(),
            torch.where(labels > PASTED_ID_OFFSET, 0, labels),
            head_only.foreground_positive_weight,
        )[0]
    )
    # for the embeddings the copy is an object: the pull term moves its voxels
    pred.grad = None
    pull_only = SpocoLoss(2, alpha=1, beta=0, gamma=0, instance_weight=0, unlabeled_weight=0, consistency_weight=0,
                          foreground_weight=0)  # fmt: skip
    pull_only(pred, labels).backward()
    assert (pred.grad[0, :2][:, copy] != 0).any()
