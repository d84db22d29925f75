"""Tests of the ``boundary`` clustering (spoco_bundle.clustering.boundary) on synthetic tissue: cells tiling the image,
separated by thin membranes where the foreground head is low, with embeddings that cannot tell neighbours apart
(what the sparse loss leaves for unannotated neighbours)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.segmentation import find_boundaries

from spoco_bundle.clustering import cluster_boundary, cluster_embeddings, cluster_watershed
from spoco_bundle.metrics import adapted_rand_error, ap50
from spoco_bundle.postprocessing import ClusterInstances


def tissue(shape, n_cells, seed=0):
    """A Voronoi tiling: cell ids 1..n, membranes (the tiling's boundaries, 1-2 voxels) set to 0; the head's
    foreground probability: high inside cells, low on membranes, with noise."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, shape, size=(n_cells, len(shape)))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    d = ((grid[..., None, :] - centres) ** 2).sum(-1)
    cells = (np.argmin(d, -1) + 1).astype(np.int32)
    membrane = find_boundaries(cells, mode="thick")
    labels = np.where(membrane, 0, cells)
    prob = np.where(membrane, 0.1, 0.9) + rng.normal(0, 0.05, shape)
    return labels, np.clip(prob, 0, 1).astype(np.float32)


def flat_embeddings(shape, seed=0):
    """Embeddings that are the same for every cell up to small noise: no clustering of them separates neighbours."""
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.05, (4, *shape)).astype(np.float32)


def test_boundary_separates_cells_that_embeddings_merge():
    labels, prob = tissue((96, 96), 12)
    emb = flat_embeddings(labels.shape)
    seg = cluster_boundary(emb, prob, min_size=1)
    assert seg.shape == labels.shape and seg.dtype == np.int32
    assert (seg > 0).all()  # background "none": a partition, membranes included
    assert adapted_rand_error(labels, seg, ignore_background=True) < 0.05
    assert ap50(labels, np.where(labels > 0, seg, 0)) > 0.9
    # the embeddings alone: one object
    assert cluster_watershed(emb, background="none").max() <= 2
    assert cluster_embeddings(emb, "boundary", foreground=prob, min_size=1).max() == seg.max()


def test_boundary_3d_and_spacing():
    labels, prob = tissue((24, 40, 40), 8, seed=1)
    emb = flat_embeddings(labels.shape)
    seg = cluster_boundary(emb, prob, spacing=(1.0, 1.0, 1.0))
    assert adapted_rand_error(labels, seg, ignore_background=True) < 0.1
    # a larger h (in spacing units) merges more: a coarse grid spacing makes the same h reach fewer seeds
    coarse = cluster_boundary(emb, prob, spacing=(0.25, 0.25, 0.25))
    assert coarse.max() < seg.max()


def test_boundary_keeps_to_the_mask_and_unseeded_parts():
    labels, prob = tissue((64, 64), 6, seed=2)
    emb = flat_embeddings(labels.shape)
    mask = labels > 0
    mask[:, :8] = False
    islet = np.zeros_like(mask)
    islet[2:4, 2:4] = True  # a tiny part of the mask with no interior deep enough for a seed
    mask[:, :8] |= islet[:, :8]
    seg = cluster_boundary(emb, prob, fg_mask=mask, min_size=1)
    assert not seg[~mask].any()
    assert (seg[mask] > 0).all()
    assert len(np.unique(seg[islet])) == 1 and seg[2, 2] not in np.unique(seg[:, 8:])
    # min_size drops it
    assert not cluster_boundary(emb, prob, fg_mask=mask, min_size=8)[islet].any()
    assert not cluster_boundary(emb, prob, fg_mask=np.zeros_like(mask)).any()


def test_boundary_h_controls_splitting():
    labels, prob = tissue((96, 96), 12, seed=3)
    emb = flat_embeddings(labels.shape)
    counts = [cluster_boundary(emb, prob, h=h, min_size=1).max() for h in (0.5, 3.0, 20.0)]
    assert counts[0] >= counts[1] > counts[2]


def test_boundary_merge_joins_parts_of_a_cell_cut_by_a_faint_inner_line():
    """A faint line through every cell (an inner structure the head half calls membrane) splits each cell in two
    seeds; merging contacts weaker than the membranes gives the cells back, and keeps neighbours and the mask."""
    labels, prob = tissue((96, 96), 12, seed=4)
    emb = flat_embeddings(labels.shape)
    cut = prob.copy()
    for cell, (rows, _) in enumerate(ndimage.find_objects(labels), start=1):
        row = (rows.start + rows.stop) // 2
        line = np.zeros_like(labels, bool)
        line[row - 1 : row + 1] = True
        cut[line & (labels == cell)] = 0.45  # a cut of probability 0.45: boundary value 0.55, membranes 0.9
    split = cluster_boundary(emb, cut, h=1.0, min_size=1)
    merged = cluster_boundary(emb, cut, h=1.0, min_size=1, merge=0.75)
    err = [adapted_rand_error(labels, s, ignore_background=True) for s in (split, merged)]
    assert err[0] > 0.2 and err[1] < 0.05
    assert split.max() > labels.max() >= merged.max() > labels.max() - 2
    assert np.array_equal(np.unique(merged), np.arange(1, merged.max() + 1))  # consecutive ids
    # a merge threshold above the membranes' value joins everything
    assert cluster_boundary(emb, cut, h=1.0, min_size=1, merge=0.99).max() == 1
    # with a mask: nothing merges into the outside, which stays 0
    mask = labels > 0
    mask[:, :20] = False
    masked = cluster_boundary(emb, cut, h=1.0, min_size=1, merge=0.75, fg_mask=mask)
    assert not masked[~mask].any() and (masked[mask] > 0).all()


def test_boundary_bad_input():
    labels, prob = tissue((32, 32), 3)
    emb = flat_embeddings(labels.shape)
    with pytest.raises(ValueError, match="foreground probability has shape"):
        cluster_boundary(emb, prob[:16])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        cluster_boundary(emb, prob * 3)
    with pytest.raises(ValueError, match="need h > 0"):
        cluster_boundary(emb, prob, h=0)
    with pytest.raises(ValueError, match="spacing"):
        cluster_boundary(emb, prob, spacing=(1.0,))
    with pytest.raises(ValueError, match="0 <= merge < 1"):
        cluster_boundary(emb, prob, merge=1.0)
    with pytest.raises(ValueError, match="needs the foreground head's probability"):
        cluster_embeddings(emb, "boundary")


def test_cluster_instances_boundary_uses_the_head():
    labels, prob = tissue((64, 64), 8, seed=4)
    emb = flat_embeddings(labels.shape)
    logit = np.log(prob.clip(1e-4, 1 - 1e-4) / (1 - prob.clip(1e-4, 1 - 1e-4)))
    pred = torch.as_tensor(np.concatenate([emb, logit[None]]))
    out = ClusterInstances("boundary", embedding_dim=4, background="none")(pred)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 64, 64)
    assert np.array_equal(out[0].numpy(), cluster_boundary(emb, prob.clip(1e-4, 1 - 1e-4), min_size=1))
    with pytest.raises(ValueError, match="needs a network with a foreground head"):
        ClusterInstances("boundary", embedding_dim=4, background="none")(torch.as_tensor(emb))
    # with a mask (the head's, or a given one) it clusters inside it only
    mask = ndimage.binary_erosion(labels > 0)
    out = ClusterInstances("boundary", embedding_dim=4, background="head")(pred, mask)
    assert not out[0].numpy()[~mask].any()
    # the merging of weak contacts travels as boundary_merge (configs' id of the same name); other methods ignore it
    merged = ClusterInstances("boundary", embedding_dim=4, background="none", boundary_merge=0.95)(pred)
    p = prob.clip(1e-4, 1 - 1e-4)
    assert np.array_equal(merged[0].numpy(), cluster_boundary(emb, p, min_size=1, merge=0.95))
    assert merged.max() == 1  # every membrane (boundary value about 0.9) is below 0.95
    fast = ClusterInstances("fast", embedding_dim=4, background="none", boundary_merge=0.5)(torch.as_tensor(emb))
    assert np.array_equal(fast, ClusterInstances("fast", embedding_dim=4, background="none")(torch.as_tensor(emb)))
    with pytest.raises(ValueError, match=r"boundary_merge must be in \[0, 1\)"):
        ClusterInstances("boundary", embedding_dim=4, boundary_merge=-0.1)


def test_median_threshold_finds_the_cells_of_a_head_calibrated_too_low():
    """A head trained on a few cells can sit below 0.5 on every voxel of another volume (plant3d): with the fixed
    threshold nothing is interior and the whole image is one object; ``"median"`` takes the upper half of the map."""
    labels, prob = tissue((96, 96), 12)
    # a head's map falls off towards the membranes (smooth), here everywhere below 0.3
    low = (ndimage.gaussian_filter(prob, 1.5) * 0.3).astype(np.float32)
    emb = flat_embeddings(labels.shape)
    assert cluster_boundary(emb, low, min_size=1).max() == 1
    seg = cluster_boundary(emb, low, min_size=1, threshold="median")
    assert adapted_rand_error(labels, seg, ignore_background=True) < 0.05
    assert np.array_equal(seg, cluster_boundary(emb, low, min_size=1, threshold=float(np.median(low))))
    # through the post-processing transform (configs' boundary_threshold)
    logit = np.log(low.clip(1e-4, 1 - 1e-4) / (1 - low.clip(1e-4, 1 - 1e-4)))
    pred = torch.as_tensor(np.concatenate([emb, logit[None]]))
    out = ClusterInstances("boundary", embedding_dim=4, background="none", boundary_threshold="median")(pred)
    assert adapted_rand_error(labels, out[0].numpy(), ignore_background=True) < 0.05
    # a saturated head (most voxels exactly 1): the median is 1, and the voxels at it are the interiors
    saturated = np.where(labels > 0, 1.0, 0.1).astype(np.float32)
    seg = cluster_boundary(emb, saturated, min_size=1, threshold="median")
    assert adapted_rand_error(labels, seg, ignore_background=True) < 0.05
    with pytest.raises(ValueError, match="give boundary_threshold / boundary_merge"):
        ClusterInstances("boundary", embedding_dim=4, threshold=0.3)
    for bad in ("mean", 0, 1.0, None):
        with pytest.raises(ValueError, match="boundary_threshold must be a number in"):
            cluster_boundary(emb, low, threshold=bad)
