"""The shape-branch study's pieces: targets from sparse masks, the network's layout, the loss, the seeded labels and
the inference overlay (none of them trains)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from research.data import REPO_ROOT
from research.recipes.shape_branch import (
    ShapeBranchLoss,
    ShapeBranchUNet,
    affinity_target,
    branch_channels,
    distance_target,
    split_branch,
)
from research.shape_seeds import ShapeSeedsd, SplitShapeBranchd, affinity_boundaries, seeded_labels, split_by_peaks


def _touching_pair() -> np.ndarray:
    """Two 10 x 10 squares side by side (ids 1, 2), one square on the left edge (3), annotated background (-1)."""
    labels = np.zeros((40, 40), np.int64)
    labels[10:20, 10:20] = 1
    labels[10:20, 20:30] = 2
    labels[25:35, 0:10] = 3
    labels[30:40, 30:40] = -1
    return labels


def test_the_distance_map_peaks_in_each_object_and_is_low_at_their_contact():
    target, weight = distance_target(_touching_pair())
    for k, (r, c) in {1: (15, 15), 2: (15, 25)}.items():
        inside = _touching_pair() == k
        assert target[inside].max() == pytest.approx(1.0)
        assert target[r - 1 : r + 1, c - 1 : c + 1].min() >= 0.8
    assert target[15, 19] <= 0.25 and target[15, 20] <= 0.25  # the seam, although no pixel of background lies there
    assert weight[15, 15] == 1 and weight[0, 0] == 0  # annotated object / unlabeled
    assert weight[30, 5] == 0  # an object on the image's edge: its centre is unknown
    assert weight[35, 35] == 1 and target[35, 35] == 0  # annotated background


def test_the_distance_map_uses_the_voxel_size():
    labels = np.zeros((9, 30, 30), np.int64)
    labels[2:7, 5:25, 5:25] = 1
    iso, _ = distance_target(labels)
    aniso, _ = distance_target(labels, sampling=(4.0, 1.0, 1.0))
    # counted in voxels the 5-slice depth caps the distance: a flat plateau over the centre plane; in micrometres
    # (slices 4 times as thick) the in-plane extent does, and the map peaks at the object's centre
    assert (iso[4] > 0.9).sum() > 100 and (aniso[4] > 0.9).sum() < 25


def test_affinities_say_different_across_an_outline_whatever_lies_beyond_it():
    labels = torch.as_tensor(_touching_pair())[None]
    target, defined = affinity_target(labels, (0, 1))  # pairs (y, x) - (y, x + 1)
    assert defined[0, 15, 19] and not target[0, 15, 19]  # object 1 | object 2
    assert defined[0, 15, 12] and target[0, 15, 12]  # inside object 1
    assert defined[0, 15, 9] and not target[0, 15, 9]  # unlabeled | object 1: an unannotated neighbour or background
    assert not defined[0, 5, 5]  # unlabeled | unlabeled: says nothing
    assert not defined[0, 35, 35]  # background | background: says nothing about objects
    long_target, long_defined = affinity_target(labels, (4, 0))
    assert long_target.shape == (1, 36, 40) and long_defined[0, 8, 15] and not long_target[0, 8, 15]


def test_the_network_keeps_the_head_last_and_its_branch_apart():
    net = ShapeBranchUNet(spatial_dims=2, embedding_dim=8, features=(8, 16, 32)).eval()
    offsets = net.offsets
    with torch.no_grad():
        out = net(torch.rand(1, 1, 32, 32))
    assert out.shape == (1, 8 + branch_channels(offsets) + 1, 32, 32)
    main, branch = split_branch(out, 8, branch_channels(offsets))
    assert main.shape[1] == 9 and branch.shape[1] == branch_channels(offsets)
    torch.testing.assert_close(main[:, -1], out[:, -1])
    clone = ShapeBranchUNet(spatial_dims=2, embedding_dim=8, features=(8, 16, 32))
    clone.load_state_dict(net.state_dict())  # strict: the branch's weights are part of the checkpoint
    with pytest.raises(ValueError, match="foreground head"):
        ShapeBranchUNet(spatial_dims=2, embedding_dim=8, features=(8, 16, 32), foreground_head=False)


def test_the_loss_trains_the_branch_and_the_agreement_follows_a_confident_teacher():
    torch.manual_seed(0)
    net = ShapeBranchUNet(spatial_dims=2, embedding_dim=8, features=(8, 16, 32)).train()
    k = branch_channels(net.offsets)
    loss = ShapeBranchLoss(embedding_dim=8, agreement_weight=1.0)
    x = torch.rand(2, 1, 40, 40)
    target = torch.as_tensor(np.stack([_touching_pair()] * 2))[:, None]
    student = net(x)
    teacher = torch.zeros_like(student)
    teacher[:, 8 + 1 : 8 + k] = -8.0  # the teacher is sure every pair is cut: agreement pushes embeddings apart
    value = loss((student, teacher), target)
    value.backward()
    terms = loss.statistics.terms
    assert terms["distance"] > 0 and terms["affinity"] > 0 and terms["agreement"] > 0
    assert terms["total"] == pytest.approx(float(value.detach()))
    assert net.branch[1].conv.conv.weight.grad.abs().sum() > 0
    # the training's handlers reach the embedding loss's weights through the wrapper
    loss.weights["foreground"] = 5.0
    assert loss.spoco.weights["foreground"] == 5.0


def test_seeds_from_the_distance_map_cut_touching_objects_the_mask_joins():
    truth = np.zeros((40, 40), np.int64)
    yy, xx = np.mgrid[:40, :40]
    truth[(yy - 20) ** 2 + (xx - 13) ** 2 <= 49] = 1
    truth[(yy - 20) ** 2 + (xx - 26) ** 2 <= 49] = 2  # touching discs: one connected mask
    distance, _ = distance_target(truth)
    labels = seeded_labels(distance, truth > 0, seed_threshold=0.6)
    assert len(np.unique(labels[truth > 0])) == 2
    assert (labels[truth == 1] == labels[20, 13]).mean() > 0.95
    # a part of the mask without a seed stays an object of its own
    region = truth > 0
    region[0:3, 0:3] = True
    labels = seeded_labels(distance, region, seed_threshold=0.6)
    assert labels[1, 1] > 0 and labels[1, 1] not in (labels[20, 13], labels[20, 26])


def test_the_affinity_boundary_map_marks_both_sides_of_a_cut_pair():
    prob = np.ones((2, 5, 5), np.float32)
    prob[0, 2, 1] = 0.0  # offset (0, 1): (2, 1) and (2, 2) are apart
    bound = affinity_boundaries(prob, [(0, 1), (1, 0)])
    assert bound[2, 1] == 1 and bound[2, 2] == 1 and bound.sum() == 2


def test_the_transforms_label_the_head_mask_from_the_branch():
    truth = np.zeros((32, 32), np.int64)
    truth[8:16, 8:24] = 1
    truth[16:24, 8:24] = 2
    distance, _ = distance_target(truth)
    pred = torch.zeros(8 + 5 + 1, 32, 32)
    pred[8] = torch.logit(torch.as_tensor(distance).clamp(1e-4, 1 - 1e-4))
    pred[-1] = torch.where(torch.as_tensor(truth) > 0, 5.0, -5.0)
    d = SplitShapeBranchd(embedding_dim=8)({"pred": pred})
    assert d["pred"].shape == (9, 32, 32) and d["shape_branch"].shape == (5, 32, 32)
    d["foreground_mask"] = torch.as_tensor(truth > 0)[None]
    out = ShapeSeedsd(embedding_dim=8, seed_threshold=0.6)(d)["pred"]
    assert out.shape == (1, 32, 32) and len(np.unique(out[0][truth > 0])) == 2


def test_the_overlay_keeps_the_bundle_chain_around_its_two_steps():
    chain = json.loads((REPO_ROOT / "configs" / "inference.json").read_text())["postprocessing"]["transforms"]
    overlay = json.loads((REPO_ROOT / "research" / "configs" / "shape_branch_inference.json").read_text())
    steps = overlay["postprocessing"]["transforms"]
    assert steps[0]["_target_"] == "research.shape_seeds.SplitShapeBranchd"
    replaced = [s for s in steps[1:] if s["_target_"] != "research.shape_seeds.ShapeSeedsd"]
    kept = [s for s in chain if s["_target_"] != "spoco_bundle.postprocessing.ClusterInstancesd"]
    assert replaced == kept


def test_objects_with_two_distance_peaks_are_cut_and_others_stay_whole():
    yy, xx = np.mgrid[:40, :60]
    truth = np.zeros((40, 60), np.int64)
    distance = np.zeros((40, 60))
    for k, cx in enumerate((13, 26, 48), start=1):  # cones: a smooth map with one peak per disc, as a network's
        r = np.hypot(yy - 20, xx - cx)
        truth[(r <= 7) & (truth == 0)] = k
        distance = np.maximum(distance, np.clip(1 - r / 8, 0, 1))
    merged = np.where(truth == 2, 1, truth).astype(np.int32)  # the touching pair as one object, the third apart
    cut = split_by_peaks(merged, distance, seed_threshold=0.3, seed_depth=0.1)
    assert len(np.unique(cut[truth > 0])) == 3 and cut.max() == 3
    assert (cut[truth == 3] == cut[20, 48]).all()
    assert (cut[truth == 1] == cut[20, 13]).mean() > 0.95 and cut[20, 13] != cut[20, 26]
