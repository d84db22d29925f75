"""Blockwise segmentation of volumes larger than memory: the block grid, stitching across block borders, blockwise
against whole-volume results, a real dask.distributed LocalCluster, Zarr / OME-Zarr / TIFF / NIfTI files, bad input
and interrupted runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
import zarr
from monai.bundle import ConfigParser

from spoco_bundle.blockwise import (
    BlockGrid,
    ClusterBlock,
    choose_block_shape,
    match_overlap,
    merge_ids,
    open_volume,
    receptive_field,
    segment_blockwise,
    window_halo,
    window_tail,
    work_path,
)
from spoco_bundle.blockwise.synthetic import SyntheticEmbeddings
from spoco_bundle.blockwise.volume import BlockwiseSettings, _object_table, segment_volume
from spoco_bundle.bundle import inference_postprocessing
from spoco_bundle.clustering import relabel_consecutive
from spoco_bundle.engines import segment_files
from spoco_bundle.handlers.suggestions import object_table
from spoco_bundle.io import read_image
from spoco_bundle.metrics import ap50
from spoco_bundle.postprocessing import ObjectScores
from spoco_bundle.postprocessing.suggestions import score_rows
from spoco_bundle.synthetic import generate_nuclei

ROOT = Path(__file__).resolve().parents[1]
INFER = str(ROOT / "configs" / "inference.json")
META = str(ROOT / "metadata.json")
SHAPE = (48, 96, 96)
FULL = tuple(slice(0, s) for s in SHAPE)


def _chain_of(method: str) -> object:
    """The ``postprocessing`` of configs/inference.json with the clustering ``method``, no shape split, min_size 16."""
    return inference_postprocessing(ROOT, clustering=method, shape_split=0.0, min_size=16)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The two label images are equal up to a renumbering of the ids (0 stays 0)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(pairs[0]) == len(np.unique(a)) == len(np.unique(b)) and bool(((pairs[0] == 0) == (pairs[1] == 0)).all())


def _crossing(labels: np.ndarray, grid: BlockGrid) -> int:
    """Objects with voxels in more than one block core."""
    block_of = np.zeros(labels.shape, dtype=np.int64)
    for k, index in enumerate(grid.blocks()):
        block_of[grid.core(index)] = k
    pairs = np.unique(np.stack([labels.ravel(), block_of.ravel()])[:, labels.ravel() > 0], axis=1)
    ids, n_blocks = np.unique(pairs[0], return_counts=True)
    return int((n_blocks > 1).sum())


def _split(gt: np.ndarray, seg: np.ndarray, min_share: float = 0.1) -> int:
    """Ground-truth objects covered by two or more predicted objects, each with at least ``min_share`` of it."""
    fg = (gt > 0) & (seg > 0)
    pairs, n = np.unique(np.stack([gt[fg], seg[fg]]), axis=1, return_counts=True)
    size = dict(zip(*np.unique(gt[gt > 0], return_counts=True)))
    big = n / np.array([size[g] for g in pairs[0]]) >= min_share
    ids, parts = np.unique(pairs[0][big], return_counts=True)
    return int((parts > 1).sum())


# ------------------------------------------------------------------------------------------------ grid, stitching


def test_blocks_tile_the_volume_and_their_overlap_slabs_line_up():
    grid = BlockGrid((20, 33, 17), (8, 10, 17), 3)
    assert grid.grid_shape == (3, 4, 1) and grid.halo == (3, 3, 0)  # an unsplit axis needs no halo
    cover = np.zeros(grid.shape, dtype=int)
    for index in grid.blocks():
        cover[grid.core(index)] += 1
        ext = grid.extended(index)
        assert all(
            0 <= e.start <= c.start and c.stop <= e.stop <= s for e, c, s in zip(ext, grid.core(index), grid.shape)
        )
    assert (cover == 1).all()
    assert len(list(grid.faces())) == 2 * 4 + 3 * 3
    # two neighbours' views of their overlap, cut from one volume, agree voxel for voxel (padding included), also
    # with halos on the sliding window's grid (asymmetric, blocks near the end extended for its last window)
    volume = np.random.default_rng(0).integers(1, 9, grid.shape)
    aligned = BlockGrid(grid.shape, (8, 8, 8), (4, 8, 4), (2, 4, 2), window_tail(grid.shape, (6, 12, 6), (4, 8, 4)))
    assert aligned.extended((0, 3, 0))[1] == slice(16, 33)  # core [24, 32) reaches past the last window at 21
    for g in (grid, aligned):
        for axis, lower, upper in g.faces():
            a = g.face_slab(volume[g.extended(lower)], lower, axis, upper_face=True)
            b = g.face_slab(volume[g.extended(upper)], upper, axis, upper_face=False)
            assert a.shape == b.shape == g.slab_shape(axis) and (a == b).all()
            assert (a > 0).sum() > 0
    with pytest.raises(ValueError, match="halo along axis 0"):
        BlockGrid((20, 20), 8, (0, 2))  # a split axis without overlap cannot be stitched


def test_match_overlap_pairs_objects_by_iou():
    a = np.array([[1, 1, 1, 1, 0, 2, 2, 0, 3, 3]])
    b = np.array([[5, 5, 5, 0, 0, 6, 7, 0, 0, 8]])
    # 1~5: IoU 3/4; 2 and 6/7: 1/2 each (not above 0.5); 3~8: 1/2
    assert match_overlap(a, b).tolist() == [[1, 5]]
    assert sorted(match_overlap(a, b, iou_threshold=0.4).tolist()) == [[1, 5], [2, 6], [2, 7], [3, 8]]
    assert match_overlap(np.zeros((2, 2), int), np.ones((2, 2), int)).shape == (0, 2)


def test_merge_ids_unites_chains_drops_empty_and_small_groups_and_numbers_1_to_n():
    # ids 1..6; 1-3-5 one object across three blocks, 2 alone, 4 only in a halo (size 0), 6 small
    sizes = np.array([0, 10, 20, 10, 0, 10, 3])
    lut, n = merge_ids(6, np.array([[1, 3], [3, 5], [4, 2]]), sizes, min_size=5)
    assert n == 2
    assert lut[0] == 0 and lut[1] == lut[3] == lut[5] == 1 and lut[2] == lut[4] == 2 and lut[6] == 0


def test_block_shape_from_the_memory_budget():
    assert choose_block_shape((40, 50, 60), 10**6, (4, 4, 4)) == (40, 50, 60)  # fits: one block
    block = choose_block_shape((1024, 1024, 1024), 2_000_000, (16, 32, 32), minimum=(32, 64, 64))
    assert np.prod([b + 2 * h for b, h in zip(block, (16, 32, 32))]) <= 2_000_000
    assert all(b >= m for b, m in zip(block, (32, 64, 64))) and max(block) / min(block) < 2  # about cubic
    assert choose_block_shape((1024, 1024, 1024), 1000, (16, 32, 32), minimum=(32, 64, 64)) == (32, 64, 64)
    assert choose_block_shape((8, 4096, 4096), 10**6, (4, 16, 16))[0] == 8  # a thin axis stays whole


def test_the_window_batch_comes_off_the_block_budget():
    from spoco_bundle.blockwise.volume import WINDOW_BYTES_PER_VOXEL, block_budget
    from spoco_bundle.inferers import sliding_window

    parser = ConfigParser()
    parser.read_config(INFER)
    inferer = parser.get_parsed_content("inferer")  # ScaledInferer around the sliding window
    windows = sliding_window(inferer, 3)
    batch = WINDOW_BYTES_PER_VOXEL * 4 * int(np.prod(windows[0]))  # sw_batch_size 4
    assert windows[0] == (64, 112, 112) and block_budget(8e9, inferer, windows) == 8e9 - batch
    assert block_budget(1e9, inferer, windows) == 0.25e9  # the batch alone exceeds it: a quarter stays
    assert block_budget(8e9, inferer, None) == 8e9  # another inferer: nothing known to take off


def test_receptive_field_of_the_bundle_network():
    parser = ConfigParser()
    parser.read_config(INFER)
    net = parser.get_parsed_content("network_def")  # features [16, 32, 64, 128]: three down-samplings
    assert receptive_field(net) == (75, 75, 75)
    assert receptive_field(torch.nn.Conv3d(1, 1, 3)) is None


def test_blocks_on_the_sliding_window_grid_give_the_whole_volume_network_output():
    # a real (untrained) U-Net in MONAI's SlidingWindowInferer: with the halos of window_halo and the tail rule, every
    # window that touches a block's core is one of the whole volume's, so the core's output is the whole volume's
    parser = ConfigParser()
    parser.read_config(INFER)
    # a window of the 3D training patch (the default window is larger): blocks of a stride stay small here
    parser.update({"ckpt_path": "/none/model.pt", "features": [8, 16, 32], "window_size": [32, 64, 64]})
    net, inferer = parser.get_parsed_content("network_def").eval(), parser.get_parsed_content("sliding_window_inferer")
    roi = tuple(inferer.roi_size)
    image = np.random.default_rng(0).random((40, 152, 176), dtype=np.float32)
    lo, hi, stride = window_halo(roi, inferer.overlap)
    assert (lo, hi, stride) == ((24, 48, 48), (8, 16, 16), (24, 48, 48))
    grid = BlockGrid(image.shape, (24, 48, 48), lo, hi, window_tail(image.shape, roi, stride))
    assert grid.grid_shape == (2, 4, 4)
    with torch.no_grad():
        whole = inferer(torch.from_numpy(image)[None, None], net)[0].numpy()
        for index in [(0, 0, 0), (0, 1, 2), (1, 2, 1), (1, 3, 3)]:
            block = np.ascontiguousarray(image[grid.extended(index)])
            out = inferer(torch.from_numpy(block)[None, None], net)[0].numpy()
            core = (slice(None),) + grid.core_in_extended(index)
            np.testing.assert_allclose(out[core], whole[(slice(None),) + grid.core(index)], atol=1e-4)


def _resampled_blocks(scale: tuple[float, float], output_grid: str = "input"):
    """A real (untrained) 2D U-Net in a ScaledInferer around MONAI's SlidingWindowInferer, a random image of 3 x 3
    blocks of whole k (the last ones cut short) and the margin a NetworkBlock is read with:
    ``(inferer, network, image, grid, margin)``."""
    from spoco_bundle.blockwise.volume import _resampled_window_halo
    from spoco_bundle.inferers import ScaledInferer

    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"ckpt_path": "/none/model.pt", "features": [8, 16, 32], "spatial_dims": 2, "patch_size": [48, 64]})
    net, sw = parser.get_parsed_content("network_def").eval(), parser.get_parsed_content("sliding_window_inferer")
    inferer = ScaledInferer(sw, scale, output_grid=output_grid)
    lo, hi, k, _, margin = _resampled_window_halo((10**4, 10**4), tuple(sw.roi_size), sw.overlap, scale, None)
    block = tuple(-(-max(a, b) // c) * c for a, b, c in zip(lo, hi, k))  # whole k
    shape = (3 * block[0] - 5, 3 * block[1] - 11)  # the last blocks cut short
    tail = _resampled_window_halo(shape, tuple(sw.roi_size), sw.overlap, scale, None)[3]
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    return inferer, net, image, BlockGrid(shape, block, lo, hi, tail), margin


def _blocks_read_with_margin(inferer, net, image: np.ndarray, grid: BlockGrid, margin):
    """Per block, as segment_blockwise reads a NetworkBlock (its extended block with ``margin`` of context for the
    resampling): ``(index, extended block, network output of the extended block)``."""
    for index in np.ndindex(*grid.grid_shape):
        ext = grid.extended(index)
        wide = tuple(slice(max(0, e.start - m), min(n, e.stop + m)) for e, m, n in zip(ext, margin, image.shape))
        cut = (
            tuple(e.start - w.start for e, w in zip(ext, wide)),
            tuple(w.stop - e.stop for e, w in zip(ext, wide)),
        )
        block = torch.from_numpy(np.ascontiguousarray(image[wide]))[None, None]
        yield index, ext, inferer.infer_inner(block, net, cut)[0].numpy()


@pytest.mark.parametrize("scale", [(0.7, 0.55), (1.4, 1.4)])
def test_resampled_blocks_give_the_whole_volume_network_output(scale):
    # image_scale != 1: ScaledInferer moves the scale to whole strides and pads to whole k; blocks and halos of
    # whole k (halos of more than a window) then resample onto the whole volume's grid and its windows
    inferer, net, image, grid, margin = _resampled_blocks(scale)
    assert grid.grid_shape == (3, 3)
    with torch.no_grad():
        whole = inferer(torch.from_numpy(image)[None, None], net)[0].numpy()
        moved = inferer.last_scale
        assert all(abs(m / s - 1) < 0.1 for m, s in zip(moved, scale)) and moved != scale
        for index, _, out in _blocks_read_with_margin(inferer, net, image, grid, margin):
            core = (slice(None),) + grid.core_in_extended(index)
            # float32 interpolation coordinates differ by the block offset: differences of float rounding only (a few
            # 1e-4, more where a convolution of another extent rounds differently)
            np.testing.assert_allclose(out[core], whole[(slice(None),) + grid.core(index)], atol=2e-3)


@pytest.mark.parametrize("scale", [(0.7, 0.55), (1.4, 1.4)])
def test_resampled_blocks_on_the_network_grid_give_the_whole_volume_network_output(scale):
    # output_grid "network" (what inference clusters on): a block's output is the whole volume's, on the same grid
    inferer, net, image, grid, margin = _resampled_blocks(scale, output_grid="network")
    with torch.no_grad():
        whole = inferer(torch.from_numpy(image)[None, None], net)[0].numpy()
        ratio = [m / n for m, n in zip(whole.shape[1:], image.shape)]
        for index, ext, out in _blocks_read_with_margin(inferer, net, image, grid, margin):
            assert out.shape[1:] == tuple(round((e.stop - e.start) * r) for e, r in zip(ext, ratio))
            # the core, on the network grid: block starts are whole k voxels, so the offsets are whole voxels
            core, inner = grid.core(index), grid.core_in_extended(index)
            mine = (slice(None),) + tuple(slice(round(c.start * r), round(c.stop * r)) for c, r in zip(inner, ratio))
            theirs = (slice(None),) + tuple(slice(round(c.start * r), round(c.stop * r)) for c, r in zip(core, ratio))
            # float32 convolutions of other extents round differently (oneDNN picks its algorithm by size), by up to
            # about 1e-3 on outputs of a few units; a block placed one voxel off differs by O(1)
            np.testing.assert_allclose(out[mine], whole[theirs], atol=2e-3)


def _permuted(block: np.ndarray) -> np.ndarray:
    """A 'segmentation' that finds the true objects but numbers them in its own order, as a block's clustering does."""
    labels = relabel_consecutive(block)
    perm = np.concatenate([[0], 1 + np.random.default_rng(int(labels.max())).permutation(int(labels.max()))])
    return perm[labels].astype(np.int32)


def test_objects_crossing_block_borders_get_one_id(tmp_path):
    syn = SyntheticEmbeddings(SHAPE, cell=14, seed=3)
    gt = syn.labels(FULL)
    info: dict = {}
    out = segment_blockwise(gt, _permuted, tmp_path / "l.ome.zarr", (16, 40, 40), 8, info=info)
    labels = np.asarray(out)
    assert _crossing(gt, BlockGrid(SHAPE, (16, 40, 40), 8)) > 50  # the test means something
    assert _same_partition(gt, labels)
    assert info["objects"] == labels.max() == len(np.unique(gt)) - 1  # ids 1..n, unique over the volume
    assert sorted(np.unique(labels)) == list(range(labels.max() + 1))


@pytest.mark.parametrize("method", ["fast", "watershed"])
def test_blockwise_agrees_with_whole_volume_on_synthetic_embeddings(tmp_path, method):
    syn = SyntheticEmbeddings(SHAPE, seed=1)
    gt = syn.labels(FULL)
    segment = ClusterBlock(_chain_of(method))
    whole = segment(syn[FULL])
    grid = BlockGrid(SHAPE, (24, 48, 48), 12)
    blockwise = np.asarray(segment_blockwise(syn, segment, tmp_path / "e.ome.zarr", grid.block_shape, 12, min_size=16))
    assert ap50(whole, blockwise) >= 0.99
    assert ap50(gt, blockwise) >= 0.95
    assert _crossing(blockwise, grid) > 20 and _split(gt, blockwise) == _split(gt, whole) == 0


def test_objects_cut_by_blocks_are_scored_as_the_whole_volume_scores_them(tmp_path):
    """``spoco suggest`` blockwise: each block's part of an object is summed into the object's scores, voxels,
    centroid and box, which then equal the whole volume's; only the spread of an object cut by a face differs a
    little (each part's voxels are measured about that part's mean)."""
    syn = SyntheticEmbeddings(SHAPE, seed=1, noise=0.25)  # embeddings this noisy spread about half of each object
    segment = ClusterBlock(_chain_of("watershed"), scores=ObjectScores(embedding_dim=16))
    whole, maps = segment(syn[FULL])
    flat = whole.reshape(-1)
    n = int(whole.max())
    sums = {k: np.bincount(flat, weights=m.reshape(-1), minlength=n + 1) for k, m in maps.items()}
    expected = {r["id"]: r for r in object_table(whole, score_rows(np.bincount(flat, minlength=n + 1), sums))}
    grid = BlockGrid(SHAPE, (24, 48, 48), 12)
    block_of = np.zeros(SHAPE, dtype=np.int64)
    for k, index in enumerate(grid.blocks()):
        block_of[grid.core(index)] = k
    info: dict = {}
    out = segment_blockwise(syn, segment, tmp_path / "s.ome.zarr", grid.block_shape, 12, min_size=16, info=info)
    blockwise = np.asarray(out)
    rows = _object_table(info["object_sums"])
    assert sorted(r["id"] for r in rows) == list(range(1, blockwise.max() + 1))  # every object ...
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))  # ... most unsure first
    assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:]))
    cut = whole_ = 0
    for r in rows:
        mine = blockwise == r["id"]
        ids, n_same = np.unique(whole[mine], return_counts=True)
        if len(ids) != 1 or n_same[0] != (whole == ids[0]).sum():
            continue  # the two runs drew this object differently
        e = expected[int(ids[0])]
        for column in ("voxels", "z_min", "z_max", "y_min", "y_max", "x_min", "x_max"):
            assert r[column] == e[column], (column, r, e)
        for column in ("centroid_z", "centroid_y", "centroid_x", "head_uncertainty"):
            assert r[column] == pytest.approx(e[column], abs=1e-4), (column, r, e)
        if len(np.unique(block_of[mine])) > 1:
            cut += 1
            assert r["embedding_spread"] == pytest.approx(e["embedding_spread"], abs=0.05), (r, e)
        else:
            whole_ += 1
            assert r["embedding_spread"] == pytest.approx(e["embedding_spread"], abs=1e-4), (r, e)
    assert cut > 20 and whole_ > 20 and cut + whole_ >= 0.9 * len(rows)
    assert 0.2 < np.mean([r["embedding_spread"] for r in rows]) < 0.8  # neither score is trivially 0 or 1


@pytest.mark.slow
def test_a_local_cluster_of_two_workers_gives_the_threaded_result(tmp_path):
    from distributed import Client, LocalCluster

    syn = SyntheticEmbeddings(SHAPE, seed=2)
    segment = ClusterBlock(_chain_of("fast"))
    threaded = np.asarray(segment_blockwise(syn, segment, tmp_path / "t.ome.zarr", (24, 48, 48), 12, min_size=16))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://")
        info: dict = {}
        out = segment_blockwise(
            syn, segment, tmp_path / "d.ome.zarr", (24, 48, 48), 12, min_size=16, scheduler=address, info=info
        )
        with Client(address) as client:
            workers = client.run(os.getpid)  # two processes, not this one
    assert len(set(workers.values()) - {os.getpid()}) == 2 and info["blocks"] == 8
    assert (np.asarray(out) == threaded).all()  # the same ids, not only the same objects


# ---------------------------------------------------------------------------------------------- files and stores


class LevelNet(torch.nn.Module):
    """A stand-in for a trained network that needs no training: embedding 0 = 20 x the normalised intensity (each
    object of the test images has one of seven levels), foreground logit positive where the intensity is > 0.05."""

    spatial_dims = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 17, *x.shape[2:])
        out[:, 0] = 20 * x[:, 0]
        out[:, 16] = 40 * (x[:, 0] - 0.05)
        return out


def _write_ome_zarr(path: Path, array: np.ndarray, axes: str, scale: list[float]) -> None:
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=array.shape, chunks=(1,) * (array.ndim - 3) + (16, 32, 32), dtype=array.dtype)
    group["0"][:] = array
    kinds = {"c": "channel", "t": "time"}
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [{"name": a, "type": kinds.get(a, "space")} for a in axes],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
        }
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The same volume as ImageJ TIFF, NIfTI and OME-Zarr (voxel size 2 x 1 x 1)."""
    folder = tmp_path_factory.mktemp("inputs")
    _, lab = generate_nuclei(SHAPE, seed=0)
    vol = ((lab % 7 + 1) * (lab > 0) * 1000).astype(np.uint16)
    tifffile.imwrite(folder / "a.tif", vol, imagej=True, metadata={"axes": "ZYX", "spacing": 2.0}, resolution=(1, 1))
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 1.0, 1.0, 1.0])), folder / "b.nii.gz")
    _write_ome_zarr(folder / "c.ome.zarr", vol, "zyx", [2.0, 1.0, 1.0])
    return folder


def _chain() -> tuple:
    parser = ConfigParser()
    parser.read_config(INFER)
    # the 3D training patch as window (the default window is larger than these small volumes): several blocks
    ids = {"ckpt_path": "/none/model.pt", "spatial_dims": 3, "image_scale": 1.0, "shape_split": 0.0}
    parser.update(dict(ids, window_size=[32, 64, 64]))
    return tuple(parser.get_parsed_content(k) for k in ("preprocessing", "inferer", "postprocessing"))


def test_tiff_nifti_and_ome_zarr_blockwise_match_the_whole_volume_path(tmp_path, inputs):
    pre, inferer, post = _chain()
    net = LevelNet()
    files = [str(inputs / n) for n in ("a.tif", "b.nii.gz", "c.ome.zarr")]
    segment_files(files[:2], pre, net, inferer, post, str(tmp_path / "whole"))
    settings = BlockwiseSettings(max_memory_gb=0.001)  # the smallest blocks the network allows: 32 x 64 x 64
    assert settings.wanted(files[0]) and not BlockwiseSettings(max_memory_gb=100).wanted(files[0])
    written = segment_files(files, pre, net, inferer, post, str(tmp_path / "bw"), blockwise=settings)
    assert [os.path.basename(p) for p in written] == ["a_instances.tif", "b_instances.nii.gz", "c_instances.ome.zarr"]
    assert sorted(os.listdir(tmp_path / "bw")) == sorted(os.path.basename(p) for p in written)  # no leftovers
    whole, whole_meta = read_image(tmp_path / "whole" / "a_instances.tif")
    assert whole.max() > 20
    for name in ("a_instances.tif", "b_instances.nii.gz"):
        labels, meta = read_image(tmp_path / "bw" / name)
        assert labels.shape == SHAPE and labels.dtype == np.uint16 and ap50(whole, labels) >= 0.99
        assert np.allclose(np.diag(meta["affine"])[:3], [2.0, 1.0, 1.0])
    labels, meta = open_volume(tmp_path / "bw" / "c_instances.ome.zarr")
    assert ap50(whole, np.asarray(labels)) >= 0.99 and meta["spacing"] == (2.0, 1.0, 1.0)


class LevelNet2d(LevelNet):
    spatial_dims = 2


def test_a_2d_tiff_blockwise_matches_the_whole_image(tmp_path):
    _, lab = generate_nuclei((400, 520), seed=0)
    image = ((lab % 7 + 1) * (lab > 0) * 1000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", image, imagej=True, resolution=(2, 2))  # pixels of 0.5
    parser = ConfigParser()
    parser.read_config(INFER)
    # LevelNet2d has no receptive field, so a block must hold a whole window: the 2D training patch as window
    ids = {"ckpt_path": "/none/model.pt", "spatial_dims": 2, "image_scale": 1.0, "shape_split": 0.0}
    parser.update(dict(ids, window_size=[192, 192]))
    pre, inferer, post = (parser.get_parsed_content(k) for k in ("preprocessing", "inferer", "postprocessing"))
    path = [str(tmp_path / "a.tif")]
    segment_files(path, pre, LevelNet2d(), inferer, post, str(tmp_path / "whole"))
    settings = BlockwiseSettings(max_memory_gb=0.001, block_shape=[200, 200], halo=48)  # 2 x 3 blocks
    segment_files(path, pre, LevelNet2d(), inferer, post, str(tmp_path / "bw"), blockwise=settings)
    whole, whole_meta = read_image(tmp_path / "whole" / "a_instances.tif")
    labels, meta = read_image(tmp_path / "bw" / "a_instances.tif")
    assert whole.max() > 50 and ap50(whole, labels) >= 0.99
    assert np.allclose(meta["spacing"], [0.5, 0.5]) and np.allclose(meta["spacing"], whole_meta["spacing"])


def test_blockwise_refuses_a_tiff_with_colour_samples_from_its_header(tmp_path):
    # the whole-image reader accepts a grayscale image saved as RGB after comparing its channels; blocks cannot
    path = tmp_path / "gray_as_rgb.tif"
    gray = np.random.default_rng(0).integers(0, 255, (40, 48), dtype=np.uint8)
    tifffile.imwrite(path, np.stack([gray] * 3, -1), photometric="rgb")
    with pytest.raises(ValueError, match="gray_as_rgb.tif stores colour samples.*single-channel"):
        open_volume(path)


def test_ome_zarr_channels_and_time_points_need_a_choice(tmp_path):
    vol = np.random.default_rng(0).random((2, 3) + (8, 16, 16)).astype(np.float32)
    _write_ome_zarr(tmp_path / "tc.ome.zarr", vol, "tczyx", [1.0, 1.0, 2.0, 0.5, 0.5])
    path = str(tmp_path / "tc.ome.zarr")
    with pytest.raises(ValueError, match=f"{path} has 2 time points.*--input_time_point"):
        open_volume(path)
    with pytest.raises(ValueError, match=f"{path} has 3 channel.*--input_channel"):
        open_volume(path, input_time_point=1)
    with pytest.raises(ValueError, match="--input_channel 3 is outside"):
        open_volume(path, input_channel=3, input_time_point=1)
    image, meta = open_volume(path, input_channel=2, input_time_point=1)
    assert np.array_equal(np.asarray(image), vol[1, 2]) and meta["spacing"] == (2.0, 0.5, 0.5)


def test_stores_that_cannot_be_opened_name_their_path(tmp_path):
    broken = tmp_path / "broken.zarr"
    broken.mkdir()
    (broken / "zarr.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"Cannot open the Zarr store {broken}"):
        open_volume(broken)
    with pytest.raises(ValueError, match="does not exist"):
        open_volume(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(ValueError, match=f"{tmp_path / 'plain.zarr'} has no OME-NGFF"):
        open_volume(tmp_path / "plain.zarr")


def test_an_existing_output_store_is_never_overwritten(tmp_path, inputs):
    pre, inferer, post = _chain()
    out = tmp_path / "out"
    (out / "c_instances.ome.zarr").mkdir(parents=True)
    settings = BlockwiseSettings(block_shape=[32, 64, 64], halo=12)
    with pytest.raises(RuntimeError, match=f"The output store {out / 'c_instances.ome.zarr'} exists"):
        segment_files([str(inputs / "c.ome.zarr")], pre, LevelNet(), inferer, post, str(out), blockwise=settings)
    assert os.listdir(out / "c_instances.ome.zarr") == []


def test_a_block_smaller_than_the_receptive_field_is_refused(tmp_path, inputs):
    parser = ConfigParser()
    parser.read_config(INFER)
    net = parser.get_parsed_content("network_def")
    _, inferer, post = _chain()
    path = str(inputs / "c.ome.zarr")
    settings = BlockwiseSettings(block_shape=[16, 32, 32])
    with pytest.raises(
        ValueError, match=f"{path}: block_shape \\[16, 32, 32\\] is smaller than the network's receptive"
    ):
        segment_volume(path, str(tmp_path / "x.ome.zarr"), net, inferer, post, settings, 3)
    assert not os.path.exists(tmp_path / "x.ome.zarr") and not os.path.exists(work_path(tmp_path / "x.ome.zarr"))


class _FailOnce:
    """Segments like :func:`_permuted`, but fails on the ``fail_at``-th block it sees; counts its calls."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at, self.calls = fail_at, 0

    def __call__(self, block: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("interrupted")  # as a crash or a killed worker in the middle of the run
        return _permuted(block)


def test_an_interrupted_run_leaves_no_output_and_resumes(tmp_path):
    gt = SyntheticEmbeddings(SHAPE, cell=14, seed=4).labels(FULL)
    out = tmp_path / "r.ome.zarr"
    first = _FailOnce(fail_at=5)
    with pytest.raises(RuntimeError, match="interrupted"):
        segment_blockwise(gt, first, out, (16, 48, 48), 8, workers=1)
    assert not out.exists()  # nothing under the output's name until it is complete
    done = os.listdir(os.path.join(work_path(out), "blocks"))
    assert len(done) == 4
    second = _FailOnce(fail_at=None)
    info: dict = {}
    labels = np.asarray(segment_blockwise(gt, second, out, (16, 48, 48), 8, workers=1, info=info))
    assert second.calls == 12 - 4 and info["resumed_blocks"] == 4
    assert _same_partition(gt, labels) and not os.path.exists(work_path(out))
    # other settings: the stale blocks are not reused
    first = _FailOnce(fail_at=3)
    with pytest.raises(RuntimeError, match="interrupted"):
        segment_blockwise(gt, first, tmp_path / "s.ome.zarr", (16, 48, 48), 8, workers=1)
    again = _FailOnce(fail_at=None)
    segment_blockwise(gt, again, tmp_path / "s.ome.zarr", (24, 48, 48), 8, workers=1)
    assert again.calls == 8


# ------------------------------------------------------------------------------------------------ the bundle


def test_inference_config_reads_the_blockwise_settings():
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"max_memory_gb": 2, "scheduler": "tcp://127.0.0.1:8786", "block_shape": [64, 128, 128]})
    settings = parser.get_parsed_content("blockwise")
    assert isinstance(settings, BlockwiseSettings)
    assert settings.budget_gb() == 2.0 and settings.scheduler == "tcp://127.0.0.1:8786"
    assert settings.block_shape == [64, 128, 128] and settings.min_size == parser.get_parsed_content("min_size")
    parser = ConfigParser()
    parser.read_config(INFER)
    default = parser.get_parsed_content("blockwise")
    assert default.max_memory_gb is None and 0 < default.budget_gb()
    with pytest.raises(ValueError, match="max_memory_gb must be positive"):
        BlockwiseSettings(max_memory_gb=0)


@pytest.mark.slow
def test_bundle_run_segments_an_ome_zarr_blockwise(tmp_path, inputs):
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"features": [8, 16, 32]})
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", INFER, "--meta_file", META]
    cmd += ["--logging_file", str(ROOT / "configs" / "logging.conf")]
    cmd += [
        "--dataset_dir",
        str(inputs / "c.ome.zarr"),
        "--output_dir",
        str(tmp_path / "out"),
        "--ckpt_path",
        str(ckpt),
    ]
    cmd += ["--device", "cpu", "--features", "[8,16,32]", "--image_scale", "1", "--background", "none"]
    # the 3D training patch as window (the default is larger than this small volume): 4 blocks on its grid
    cmd += ["--max_memory_gb", "2", "--block_shape", "[48,48,48]", "--window_size", "[32,64,64]"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "blockwise: 4 blocks of [48, 48, 48] + halo [0, 48, 48] / [0, 16, 16]" in done.stdout + done.stderr
    labels, meta = open_volume(tmp_path / "out" / "c_instances.ome.zarr")
    assert labels.shape == SHAPE and meta["spacing"] == (2.0, 1.0, 1.0)
    attrs = json.loads((tmp_path / "out" / "c_instances.ome.zarr" / ".zattrs").read_text())
    assert attrs["multiscales"][0]["name"] == "c_instances.ome.zarr"
    # again: the output exists -> a clear error naming it, exit code 1
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and f"{tmp_path / 'out' / 'c_instances.ome.zarr'} exists" in done.stdout + done.stderr


def test_blocks_run_the_chain_without_the_whole_image_count_check():
    """A block is not an image: the object-count warning (WarnFewInstancesd) is left out of the blocks' chain, whose
    description (the resume identity) is then that of the chain before the check existed."""
    from monai.transforms import Compose

    from spoco_bundle.blockwise.volume import _describe, _without_whole_image_checks
    from spoco_bundle.postprocessing import WarnFewInstancesd

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "configs" / "inference.json"))
    parser.update({"bundle_root": str(Path(__file__).resolve().parents[1]), "model": "nuclei2d"})
    chain = parser.get_parsed_content("postprocessing")
    assert any(isinstance(t, WarnFewInstancesd) for t in chain.transforms)
    blocks = _without_whole_image_checks(chain)
    assert [type(t) for t in blocks.transforms] == [
        type(t) for t in chain.transforms if not isinstance(t, WarnFewInstancesd)
    ]
    assert len(chain.transforms) == len(blocks.transforms) + 1  # the config's own chain is untouched
    before = Compose([t for t in chain.transforms if not isinstance(t, WarnFewInstancesd)])
    assert _describe(blocks) == _describe(before)
    assert _without_whole_image_checks(blocks) is blocks


MEMORY_CHILD = """
import json, os, resource, sys
import numpy as np, psutil, tifffile, torch
from monai.bundle import ConfigParser
path = sys.argv[1]
parser = ConfigParser()
parser.read_config(os.path.join('configs', 'inference.json'))
parser.update({'bundle_root': '.', 'model': 'nuclei3d'})
network = parser.get_parsed_content('inference_network').eval()
pre, inferer, post = (parser.get_parsed_content(k) for k in ('preprocessing', 'inferer', 'postprocessing'))
settings = parser.get_parsed_content('blockwise')
shape = tifffile.imread(path).shape
estimate = settings.whole_volume_gb(shape) * 1e9 - psutil.Process().memory_info().rss
before = psutil.Process().memory_info().rss
item = pre({'image': path})
with torch.inference_mode():
    item['pred'] = inferer(item['image'][None], network)[0]
labels = np.asarray(post(item)['pred'])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({'estimate': estimate, 'measured': peak - before, 'objects': int(labels.max())}))
"""


@pytest.mark.slow
def test_the_whole_volume_memory_estimate_is_above_the_measured_peak_and_within_twice_it(tmp_path):
    # the budget decides whole-volume vs blockwise: an estimate below the real peak risks running out of memory, one
    # far above it sends volumes that fit through the slower blockwise path (a real run of the shipped nuclei3d)
    # 16 Mvoxel, where the volume's own memory (not the network's window batch) is most of the peak
    image, _ = generate_nuclei((64, 176, 176), seed=3)
    path = str(tmp_path / "nuclei.tif")
    tifffile.imwrite(path, np.tile((image * 1000).astype(np.uint16), (2, 2, 2)))
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, path], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["objects"] > 10
    assert result["measured"] <= result["estimate"] <= 2 * result["measured"], result


def test_blocks_the_budget_cannot_hold_are_said_so(caplog):
    from spoco_bundle.blockwise.volume import _blocks

    # image_scale 0.5: the network's field of view and the whole-window halos in image voxels are twice as large
    args = dict(view=(128, 224, 224), halo_lo=(96, 168, 168), halo_hi=(128, 224, 224), step=(32, 56, 56))
    with caplog.at_level("WARNING", logger="spoco_bundle.blockwise.volume"):
        block, workers = _blocks("big.tif", (200, 400, 400), BlockwiseSettings(), 0.3e9, 160, **args)
    assert workers == 1 and all(b >= v for b, v in zip(block, args["view"]))
    assert "big.tif" in caplog.text and "above the budget" in caplog.text and "--max_memory_gb" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="spoco_bundle.blockwise.volume"):
        _blocks("big.tif", (200, 400, 400), BlockwiseSettings(), 8e9, 160, **args)
    assert "above the budget" not in caplog.text
