"""The post-processing chain of configs/inference.json (spoco_bundle.postprocessing, built from the config by
spoco_bundle.bundle.inference_postprocessing): the same labels as the post-processing in one pass of the clustering
package, on the shipped model's output for a real image and on embeddings built here; and each step's checks of its
input."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose

from spoco_bundle.bundle import inference_postprocessing
from spoco_bundle.clustering import (
    cluster_boundary,
    cluster_embeddings,
    filter_small,
    relabel_consecutive,
    split_by_shape,
)
from spoco_bundle.measure import ball_volume, equivalent_diameters
from spoco_bundle.postprocessing import (
    FEW_INSTANCES,
    ClusterInstances,
    ClusterInstancesd,
    ForegroundMask,
    ForegroundMaskd,
    RemoveSmallInstances,
    RemoveSmallInstancesd,
    ResizeToMatch,
    ResizeToMatchd,
    SplitByShape,
    SplitByShaped,
    WarnFewInstances,
    WarnFewInstancesd,
)

ROOT = Path(__file__).resolve().parents[1]
INFER = str(ROOT / "configs" / "inference.json")
DATA = Path(os.environ.get("SPOCO_DATA_DIR", ROOT.parent / "shared" / "data"))
DSB_IMAGE = DATA / "dsb2018" / "images" / "0287e7ee5b007c91.tif"  # a validation image nuclei2d never saw


def _one_pass(
    pred, method, background, min_size, threshold=0.5, shape_split=0.0, fg_mask=None, spacing=None, e=16, **kw
):
    """The post-processing as one function of the clustering package, as it ran before it became a chain of steps:
    the foreground (given mask, else the head for "head"), clustering with min_size and background removal inside
    the clustering function, then the shape split."""
    arr = np.asarray(pred, dtype=np.float32)
    if fg_mask is not None:
        fg, bg = np.asarray(fg_mask).reshape(arr.shape[1:]) != 0, "none"
    elif background == "head":
        t = float(threshold)
        fg, bg = arr[-1] > np.log(t / (1.0 - t)), "none"
    else:
        fg, bg = None, background
    if method == "consistency":
        kw["emb_g"] = arr[e : 2 * e]
    labels = cluster_embeddings(
        arr[:e], method, delta_v=0.5, delta_d=2.0, min_size=min_size, fg_mask=fg, background=bg, **kw
    )
    if shape_split > 0:
        labels = split_by_shape(labels, h=shape_split, spacing=spacing, min_size=max(1, min_size))
    return labels


def _config_chain(**ids):
    """configs/inference.json's postprocessing with these ids (as --id value on the command line), its min_size and
    the smallest object its last step keeps in 2D (min_size, or the share min_diameter_ratio of the model's
    training object diameter where that is larger)."""
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"bundle_root": str(ROOT), "model": "nuclei2d", "device": "$torch.device('cpu')", **ids})
    chain = parser.get_parsed_content("postprocessing")
    last = [t for t in chain.transforms if isinstance(t, RemoveSmallInstancesd)]
    return chain, parser.get_parsed_content("min_size"), last[-1].remove.smallest(2)


def _array_chain(
    pred, method, embedding_dim, background, min_size, shape_split=0.0, spacing=None, fg_mask=None, **kwargs
):
    """The post-processing transforms composed directly (array versions): the foreground (head at 0.5, or the given
    mask), clustering, the shape split with the given voxel size, removal of objects under min_size."""
    mask = ForegroundMask(background, 0.5, embedding_dim, method)(pred, fg_mask)
    labels = ClusterInstances(method, embedding_dim, background, min_size=min_size, **kwargs)(pred, mask)
    return RemoveSmallInstances(min_size)(SplitByShape(shape_split, min_size=min_size)(labels, spacing))


def _final(labels: np.ndarray, smallest: int) -> np.ndarray:
    """The chain's last size filter on labels of the one-pass reference."""
    return relabel_consecutive(filter_small(labels, smallest))


@pytest.fixture(scope="module")
def nuclei2d_output(tmp_path_factory):
    """The shipped model's output (17, H, W) on a DSB2018 validation image (a synthetic 2D nuclei image when the
    data set is not there), with the image (MetaTensor) and a given mask: the lower half of the image."""
    path = DSB_IMAGE
    if not path.is_file():
        from spoco_bundle.synthetic import generate_nuclei

        image, _ = generate_nuclei((192, 192), seed=0, radius_range=(6.0, 10.0))
        path = tmp_path_factory.mktemp("img") / "synthetic.tif"
        tifffile.imwrite(path, image.astype(np.float32))
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"bundle_root": str(ROOT), "model": "nuclei2d", "device": "$torch.device('cpu')"})
    data = parser.get_parsed_content("preprocessing")({"image": str(path)})
    network, inferer = parser.get_parsed_content("network"), parser.get_parsed_content("inferer")
    with torch.no_grad():
        pred = inferer(data["image"][None], network)[0]
    mask = torch.zeros((1, *pred.shape[1:]), dtype=torch.bool)
    mask[:, pred.shape[1] // 2 :] = True
    return pred, data["image"], mask


CASES = [
    (method, background, shape_split, masked)
    for method in ("fast", "watershed")
    for background in ("head", "largest", "none")
    for shape_split in (0.0, 0.1)
    for masked in (False, True)
]


@pytest.mark.parametrize("method, background, shape_split, masked", CASES)
def test_config_chain_gives_the_one_pass_labels_on_the_shipped_model(
    nuclei2d_output, method, background, shape_split, masked
):
    pred, image, mask = nuclei2d_output
    chain, min_size, smallest = _config_chain(clustering=method, background=background, shape_split=shape_split)
    # nuclei2d records its training objects' diameter (12.96 px): the default share 0.45 keeps 27 px and more
    assert smallest > min_size
    data = {"image": image, "pred": pred.clone()}
    if masked:
        data["foreground_mask"] = mask
    got = chain(data)["pred"]
    spacing = [float(v) for v in image.pixdim][:2]
    one_pass = _one_pass(pred, method, background, min_size, 0.5, shape_split, mask if masked else None, spacing)
    want = _final(one_pass, min_size if masked else smallest)  # inside a given mask min_size alone
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int32 and got.shape == (1, *want.shape)
    np.testing.assert_array_equal(np.asarray(got[0]), want)
    assert want.max() > 3  # a real segmentation, ids 1..n
    assert set(np.unique(want)) - {0} == set(range(1, int(want.max()) + 1))
    if masked:
        assert not want[~np.asarray(mask[0])].any()
    # the chain with min_size alone (min_diameter_ratio 0) gives the one-pass labels themselves
    min_size_only = inference_postprocessing(
        ROOT,
        model="nuclei2d",
        clustering=method,
        background=background,
        min_size=min_size,
        shape_split=shape_split,
        min_diameter_ratio=0,
    )
    np.testing.assert_array_equal(np.asarray(min_size_only(dict(data, pred=pred))["pred"][0]), one_pass)


@pytest.mark.parametrize("background, masked", [("none", False), ("head", False), ("none", True)])
def test_config_chain_with_boundary_clustering_cuts_along_the_head(nuclei2d_output, background, masked):
    """--clustering boundary in inference.json: the head's probability and --boundary_merge reach cluster_boundary,
    which partitions the image (background none) or keeps to the head's / a given mask."""
    pred, image, mask = nuclei2d_output
    chain, _, smallest = _config_chain(
        clustering="boundary", background=background, shape_split=0.0, boundary_merge=0.3
    )
    data = {"image": image, "pred": pred.clone()}
    if masked:
        data["foreground_mask"] = mask
    got = np.asarray(chain(data)["pred"][0])
    arr = np.asarray(pred, dtype=np.float32)
    fg = None
    if masked:
        fg = np.asarray(mask[0])
    elif background == "head":
        fg = arr[-1] > 0.0
    want = cluster_boundary(arr[:16], 1.0 / (1.0 + np.exp(-arr[-1])), min_size=1, fg_mask=fg, merge=0.3)
    if masked:  # seeds from the head inside the given mask: more than the one object the mask's own shape gives
        head_only = cluster_boundary(arr[:16], 1.0 / (1.0 + np.exp(-arr[-1])), min_size=1)
        assert want.max() > 3 and head_only.max() > want.max()
    want = _final(want, smallest)
    np.testing.assert_array_equal(got, want)
    assert want.max() > 3
    if fg is None:  # a partition: no voxel left out but the small regions
        assert (want > 0).mean() > 0.99
    else:
        assert not want[~fg].any()


def test_the_other_methods_match_the_one_pass_labels(nuclei2d_output):
    pred, image, mask = nuclei2d_output
    spacing = [float(v) for v in image.pixdim][:2]
    crop = pred[:, :128, :128]  # mean-shift is slow in 16-D
    for method, out, kw in [
        ("hdbscan", pred, dict(max_points=2000)),  # min_size is HDBSCAN's minimum cluster size here
        ("meanshift", crop, dict(max_points=500)),
        # student and teacher channels, then the head; min_size applies before its test (which samples anchors
        # per cluster); at the default iou_threshold this untrained pair keeps no cluster
        ("consistency", torch.cat([pred[:16], pred[:16], pred[16:]]), dict(iou_threshold=0.1)),
    ]:
        given = mask[:, : out.shape[1], : out.shape[2]]
        for background, masked in (("head", False), ("largest", False), ("none", True)):
            steps = Compose(
                [
                    ForegroundMaskd("pred", background=background, method=method, embedding_dim=16),
                    ClusterInstancesd("pred", method=method, background=background, min_size=16, **kw),
                    SplitByShaped("pred", h=0.1, min_size=16),
                    RemoveSmallInstancesd("pred", min_size=16),
                ]
            )
            data = {"image": image, "pred": out}
            if masked:
                data["foreground_mask"] = given
            want = _one_pass(out, method, background, 16, 0.5, 0.1, given if masked else None, spacing, **kw)
            np.testing.assert_array_equal(np.asarray(steps(data)["pred"][0]), want, err_msg=f"{method} {background}")
            got = _array_chain(out, method, 16, background, 16, 0.1, spacing, given if masked else None, **kw)
            np.testing.assert_array_equal(np.asarray(got[0]), want, err_msg=f"{method} {background}")


# ------------------------------------------------------------------------------------------------ built embeddings


def _built_output() -> tuple[np.ndarray, np.ndarray]:
    """(5, 48, 64): 4 embedding channels and a head logit. Object A: two overlapping discs with one embedding (an 8
    the embeddings did not separate), B: a disc, C: a 3 x 3 square (below min_size 16); background embedding 0.
    Returns the output and a given mask: the foreground left of column 36 (A and C, not B)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:48, :64]
    a = ((y - 14) ** 2 + (x - 12) ** 2 <= 49) | ((y - 14) ** 2 + (x - 24) ** 2 <= 49)
    b = (y - 34) ** 2 + (x - 44) ** 2 <= 64
    c = (y >= 40) & (y < 43) & (x >= 10) & (x < 13)
    out = np.zeros((5, 48, 64), np.float32)
    out[4] = -5.0
    for channel, obj in enumerate((a, b, c)):
        out[channel][obj] = 3.0
        out[4][obj] = 5.0
    out[:4] += 0.02 * rng.standard_normal((4, 48, 64)).astype(np.float32)
    return out, (a | c) & (x < 36)


@pytest.mark.parametrize("method", ["fast", "watershed"])
@pytest.mark.parametrize("background", ["head", "largest", "none"])
def test_built_embeddings_chain_matches_and_reads_as_the_method(method, background):
    out, mask = _built_output()
    n_found = {}
    for shape_split in (0.0, 0.1):
        chain = inference_postprocessing(
            ROOT,
            embedding_dim=4,
            clustering=method,
            background=background,
            min_size=16,
            shape_split=shape_split,
            min_diameter_ratio=0,
        )
        for given in (None, mask):
            steps = Compose(
                [
                    ForegroundMaskd("pred", background=background, threshold=0.5, embedding_dim=4, method=method),
                    ClusterInstancesd("pred", method=method, embedding_dim=4, background=background, min_size=16),
                    SplitByShaped("pred", h=shape_split, min_size=16),
                    RemoveSmallInstancesd("pred", min_size=16),
                ]
            )
            data = {"pred": torch.as_tensor(out)}
            if given is not None:
                data["foreground_mask"] = torch.as_tensor(given)[None]
            got = np.asarray(steps(data)["pred"][0])
            want = _one_pass(out, method, background, 16, 0.5, shape_split, given, e=4)
            np.testing.assert_array_equal(got, want)
            # configs/inference.json's chain with min_size alone, on numpy arrays
            data = {"pred": out, "image": np.zeros((1, 48, 64), np.float32)}
            if given is not None:
                data["foreground_mask"] = given[None]
            one = chain(data)["pred"]
            assert isinstance(one, np.ndarray) and one.dtype == np.int32
            np.testing.assert_array_equal(one[0], want)
            n_found[shape_split, given is not None] = int(want.max())
    # A and B (C is too small), and with "none" the background cluster; the shape split cuts A in two
    assert n_found[0.0, False] == (3 if background == "none" else 2)
    if background != "none":  # (with "none" it also cuts the background cluster)
        assert n_found[0.1, False] == 3
    # the mask file replaces the background rule: A only (C too small, B outside), in two halves with the split
    assert n_found[0.0, True] == 1 and n_found[0.1, True] == 2


def test_chain_keeps_the_output_kind_and_reads_spacing_from_the_image():
    out, _ = _built_output()
    pred = MetaTensor(torch.as_tensor(out), affine=torch.diag(torch.tensor([2.0, 0.5, 1.0, 1.0])))
    labels = ClusterInstances("fast", 4, "head", min_size=16)(pred, ForegroundMask("head", 0.5, 4)(pred))
    assert isinstance(labels, MetaTensor) and labels.dtype == torch.int32 and labels.shape == (1, 48, 64)
    assert torch.equal(labels.affine, pred.affine)
    # anisotropic voxels from the labels' own metadata or from the image: the same as given explicitly
    split = SplitByShape(0.1, min_size=16)
    by_meta = split(labels)
    np.testing.assert_array_equal(np.asarray(by_meta), np.asarray(split(labels.as_tensor(), spacing=[2.0, 0.5])))
    image = MetaTensor(torch.zeros(1, 48, 64), affine=pred.affine)
    by_image = SplitByShaped("pred", h=0.1, min_size=16)({"pred": labels.as_tensor(), "image": image})["pred"]
    np.testing.assert_array_equal(np.asarray(by_image), np.asarray(by_meta))
    assert SplitByShape(0.0)(labels) is labels  # 0: off


def test_config_chain_shape_split_uses_the_image_spacing():
    # one embedding everywhere (the network did not separate them) and a head that marks two spheres of radius 4 um
    # overlapping along z; voxels 1 x 0.25 x 0.25 um
    spacing = (1.0, 0.25, 0.25)
    z, y, x = np.meshgrid(np.arange(20) * 1.0, np.arange(40) * 0.25, np.arange(40) * 0.25, indexing="ij")
    fg = ((z - 6) ** 2 + (y - 5) ** 2 + (x - 5) ** 2 <= 16) | ((z - 13) ** 2 + (y - 5) ** 2 + (x - 5) ** 2 <= 16)
    pred = np.zeros((17, 20, 40, 40), np.float32)
    pred[16] = np.where(fg, 5.0, -5.0)
    image = MetaTensor(torch.zeros(1, 20, 40, 40), affine=torch.diag(torch.tensor([*spacing, 1.0])))
    ids = dict(embedding_dim=16, clustering="fast", background="head", min_size=16, min_diameter_ratio=0)
    whole = inference_postprocessing(ROOT, shape_split=0.0, **ids)({"pred": torch.from_numpy(pred), "image": image})
    assert set(np.unique(np.asarray(whole["pred"]))) == {0, 1}
    split = inference_postprocessing(ROOT, shape_split=0.1, **ids)({"pred": torch.from_numpy(pred), "image": image})
    split = np.asarray(split["pred"])[0]
    assert set(np.unique(split)) == {0, 1, 2} and ((split > 0) == fg).all()
    # the cut lies at the neck plane between the centres (z = 9.5 um): each part is one sphere's side
    assert {int(np.unique(split[z < 9][fg[z < 9]])[0]), int(np.unique(split[z > 10][fg[z > 10]])[0])} == {1, 2}
    with pytest.raises(RuntimeError) as caught:  # MONAI names the component; the cause names the option
        inference_postprocessing(ROOT, shape_split=1.0)
    assert isinstance(caught.value.__cause__, ValueError)
    assert "h (shape_split) must be in [0, 1)" in str(caught.value.__cause__)


def _two_objects_with_outliers(seed: int = 0) -> np.ndarray:
    """(4, 40, 40) embeddings: two objects (means 0 and 5 e_0) with little noise, and every 7th voxel an outlier
    1.2 from its object's mean: within delta_d = 2, outside delta_d = 0.5."""
    rng = np.random.default_rng(seed)
    emb = np.zeros((4, 40, 40), np.float32)
    emb[0, :, 20:] = 5.0
    emb += 0.05 * rng.standard_normal(emb.shape).astype(np.float32)
    flat = emb.reshape(4, -1)
    out = np.arange(flat.shape[1])[3::7]
    v = rng.standard_normal((4, out.size))
    flat[:, out] += (1.2 * v / np.linalg.norm(v, axis=0)).astype(np.float32)
    return emb


@pytest.mark.parametrize(
    "method, min_size, kwargs",
    [
        ("fast", 16, dict(fill_radius=0.0)),  # only the growth pass within delta_d
        ("hdbscan", 16, dict(max_points=400)),  # voxels outside the subsample: nearest mean within delta_d
        # each sampled outlier is a cluster of its own, which most other outliers join: min_size 1 keeps them
        ("meanshift", 1, dict(max_points=400)),
        ("consistency", 16, dict(fill_radius=0.0)),  # delta_d goes to the base clustering (fast)
        ("watershed", 16, {}),  # accepts delta_d, does not use it
    ],
)
def test_cluster_instances_passes_delta_d_to_every_method(method, min_size, kwargs):
    emb = _two_objects_with_outliers()
    pred = np.concatenate([emb, emb + 0.01]) if method == "consistency" else emb
    common = dict(delta_v=0.5, min_size=min_size, fg_mask=None, background="none", **kwargs)
    if method == "consistency":
        common["emb_g"] = pred[4:]
    results = {}
    for delta_d in (0.5, 2.0):
        got = np.asarray(_array_chain(torch.as_tensor(pred), method, 4, "none", min_size, delta_d=delta_d, **kwargs))[0]
        # the transforms give what the clustering function gives with that delta_d
        np.testing.assert_array_equal(got, cluster_embeddings(emb, method, delta_d=delta_d, **common))
        results[delta_d] = got
    if method == "watershed":
        np.testing.assert_array_equal(results[0.5], results[2.0])
    else:  # the outliers (or those outside the subsample) join a cluster only within delta_d = 2
        assert (results[0.5] == 0).sum() > (results[2.0] == 0).sum()


def test_remove_small_instances_counts_an_id_whatever_its_pieces_and_renumbers():
    labels = np.zeros((1, 20, 20), np.int32)
    labels[0, 0:5, 0:4] = 3  # 20 voxels ...
    labels[0, 10, 10:13] = 3  # ... plus a detached piece of 3: one object of 23 voxels
    labels[0, 15:17, 15:17] = 5  # 4 voxels: removed
    labels[0, 15:20, 0:5] = 7
    out = RemoveSmallInstances(16)(labels)
    assert out.dtype == np.int32 and set(np.unique(out)) == {0, 1, 2}
    assert (out == 1).sum() == 23 and (out == 2).sum() == 25
    t = RemoveSmallInstancesd("pred", min_size=0)({"pred": torch.as_tensor(labels)})["pred"]
    assert t.dtype == torch.int32 and set(np.unique(t.numpy())) == {0, 1, 2, 3}  # nothing removed, renumbered


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_remove_small_instances_relative_to_the_training_objects(spatial_dims):
    """min_diameter_ratio: objects whose equivalent diameter is under that share of the model's training object
    diameter go, whatever min_size; ratio 0 or an unknown diameter (0): min_size alone."""
    side = 12 if spatial_dims == 2 else 5
    labels = np.zeros((1, *([40] * spatial_dims)), np.int32)
    labels[(0, *[slice(0, 15)] * spatial_dims)] = 1  # diameter about 16.9 (2D) / 18.6 (3D)
    labels[(0, *[slice(20, 20 + side)] * spatial_dims)] = 2  # 144 px (2D: d 13.5), 125 voxels (3D: d 6.2)
    labels[(0, *[slice(35, 38)] * spatial_dims)] = 3  # 9 / 27 voxels
    d = float(equivalent_diameters((labels[0] == 2).astype(np.int32), exclude_border=False)[0])
    unknown = RemoveSmallInstancesd("pred", min_size=5, min_diameter_ratio=0.5, object_diameter=0.0)
    assert set(np.unique(unknown({"pred": labels})["pred"])) == {0, 1, 2, 3}
    just_over = RemoveSmallInstancesd("pred", min_size=5, min_diameter_ratio=0.5, object_diameter=2.0 * d * 1.01)
    out = just_over({"pred": labels})["pred"]
    assert set(np.unique(out)) == {0, 1} and (out > 0).sum() == (labels == 1).sum()  # 2 and 3 go, 1 is id 1
    assert just_over.remove.smallest(spatial_dims) == math.ceil(ball_volume(d * 1.01, spatial_dims))
    just_under = RemoveSmallInstances(5, 0.5, 2.0 * d * 0.99)
    assert set(np.unique(just_under(labels))) == {0, 1, 2}  # 2 is just over the limit, 3 far under
    assert RemoveSmallInstances(5, 0.0, 2.0 * d)(labels).max() == 3  # ratio 0: off
    assert RemoveSmallInstances(100, 0.5, 2.0)(labels).max() == 2  # min_size the larger limit: 3 goes
    for bad in (-0.1, "off", None, True):
        with pytest.raises(ValueError, match=f"min_diameter_ratio must be a number >= 0 .*got {bad!r}"):
            RemoveSmallInstances(16, bad)
    for bad in (-1.0, "big", None):
        with pytest.raises(ValueError, match=f"object_diameter must be a number >= 0 .*got {bad!r}"):
            RemoveSmallInstances(16, 0.45, bad)


def test_a_given_mask_keeps_objects_smaller_than_the_training_objects():
    """With a given foreground mask only min_size applies: the relative limit is for the head's fragments in bright
    background, and inside a mask the user gives it would only remove real small objects. In the config chain too."""
    labels = np.zeros((1, 40, 40), np.int32)
    labels[0, :15, :15] = 1
    labels[0, 20:26, 20:26] = 2  # 36 px, diameter 6.8: under half of a 16 px training object
    step = RemoveSmallInstancesd("pred", min_size=16, min_diameter_ratio=0.5, object_diameter=16.0, mask_key="given")
    assert set(np.unique(step({"pred": labels})["pred"])) == {0, 1}
    assert set(np.unique(step({"pred": labels, "given": labels > 0})["pred"])) == {0, 1, 2}
    assert set(np.unique(step({"pred": labels, "given": None})["pred"])) == {0, 1}
    # configs/inference.json with the shipped model's record (objects under 27 px go): a disc of 21 px stays only
    # inside a given mask
    chain, min_size, smallest = _config_chain(shape_split=0.0)
    y, x = np.mgrid[:48, :64]
    big, small = (y - 20) ** 2 + (x - 20) ** 2 <= 64, (y - 30) ** 2 + (x - 48) ** 2 <= 6
    assert min_size <= small.sum() < smallest
    pred = np.zeros((17, 48, 64), np.float32)
    pred[16] = -5.0
    for channel, obj in enumerate((big, small)):
        pred[channel][obj], pred[16][obj] = 3.0, 5.0
    image = torch.zeros((1, 48, 64))
    free = np.asarray(chain({"image": image, "pred": torch.as_tensor(pred)})["pred"][0])
    mask = torch.as_tensor((big | small)[None])
    given = np.asarray(chain({"image": image, "pred": torch.as_tensor(pred), "foreground_mask": mask})["pred"][0])
    assert free.max() == 1 and not free[small].any()
    assert given.max() == 2 and (given[small] > 0).all()


def test_the_recorded_diameter_is_read_from_the_checkpoint_file(tmp_path):
    """recorded_object_diameter reads the network's buffer from a plain or a resume checkpoint without building
    the network; 0 for a model without the record and for a missing or unreadable file."""
    from spoco_bundle.networks import EmbeddingUNet, RecordedObjectDiameter, recorded_object_diameter

    net = EmbeddingUNet(spatial_dims=2, in_channels=1, embedding_dim=8, features=(8, 16, 32, 64))
    net.object_diameter.fill_(13.5)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    torch.save({"model": net.state_dict(), "optimizer": {}}, tmp_path / "resume.pt")
    assert recorded_object_diameter(tmp_path / "model.pt") == pytest.approx(13.5)
    assert recorded_object_diameter(tmp_path / "resume.pt") == pytest.approx(13.5)
    old = {k: v for k, v in net.state_dict().items() if k not in ("object_diameter", "image_blob_scale")}
    torch.save(old, tmp_path / "old.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for path in ("old.pt", "text.pt", "missing.pt"):
        assert recorded_object_diameter(tmp_path / path) == 0.0
    # what inference.json passes: read again when the file changes (a MONAI Label server retrains its model)
    follows = RecordedObjectDiameter(tmp_path / "model.pt")
    step = RemoveSmallInstances(1, 1.0, follows)
    assert float(follows) == pytest.approx(13.5) and step.smallest(2) == math.ceil(ball_volume(13.5, 2))
    net.object_diameter.fill_(20.0)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    assert step.smallest(2) == math.ceil(ball_volume(20.0, 2))
    assert float(RecordedObjectDiameter(tmp_path / "missing.pt")) == 0.0


def test_ball_volume_inverts_the_equivalent_diameter():
    for dims, volume in ((2, 150.0), (3, 2000.0)):
        labels = np.zeros([60] * dims, np.int32)
        labels[tuple(slice(0, round(volume ** (1 / dims))) for _ in range(dims))] = 1
        v = float((labels > 0).sum())
        d = float(equivalent_diameters(labels, exclude_border=False)[0])
        assert ball_volume(d, dims) == pytest.approx(v)
    with pytest.raises(ValueError, match="spatial_dims"):
        ball_volume(3.0, 4)


# ------------------------------------------------------------------------------------------------ bad input


def test_each_step_rejects_bad_options_and_input_clearly():
    out, mask = _built_output()
    pred = torch.as_tensor(out)
    with pytest.raises(ValueError, match="background must be 'largest', 'head' or 'none', got 'auto'"):
        ForegroundMask("auto")
    with pytest.raises(ValueError, match="foreground_threshold must be a probability in"):
        ForegroundMask("head", 1.5)
    with pytest.raises(ValueError, match="Unknown clustering method 'kmeans'"):
        ForegroundMask("head", 0.5, 4, "kmeans")
    with pytest.raises(ValueError, match="embedding_dim must be a positive integer"):
        ForegroundMask("head", 0.5, 0)
    with pytest.raises(ValueError, match=r"ForegroundMask expects \(8 or 9, \*spatial\) for method 'consistency'"):
        ForegroundMask("head", 0.5, 4, "consistency")(pred)
    with pytest.raises(ValueError, match=r"ForegroundMask expects .*got shape \(5, 64\)"):
        ForegroundMask("head", 0.5, 4)(pred[:, 0])
    with pytest.raises(ValueError, match="needs a network with a foreground head"):
        ForegroundMask("head", 0.5, 4)(pred[:4])
    with pytest.raises(ValueError, match=r"mask has shape \(48, 63\).*spatial shape \(48, 64\)"):
        ForegroundMask("head", 0.5, 4)(pred, torch.as_tensor(mask[:, 1:]))
    assert ForegroundMask("largest", 0.5, 4)(pred) is None  # no mask: the clustering decides
    with pytest.raises(ValueError, match="one mask .* from one output"):
        ForegroundMaskd(["pred", "other"])
    with pytest.raises(TypeError, match="still a file name .*m.tif.*LoadForegroundMaskd"):
        ForegroundMaskd("pred", embedding_dim=4)({"pred": pred, "foreground_mask": "m.tif"})
    with pytest.raises(TypeError, match="still a file name"):
        ClusterInstancesd("pred", embedding_dim=4)({"pred": pred, "foreground_mask": Path("m.tif")})

    with pytest.raises(ValueError, match="Unknown clustering method"):
        ClusterInstances("kmeans")
    with pytest.raises(ValueError, match="background must be"):
        ClusterInstances("fast", background="mask")
    with pytest.raises(ValueError, match="min_size must be >= 0"):
        ClusterInstances("fast", min_size=-1)
    with pytest.raises(ValueError, match=r"ClusterInstances expects \(4 or 5, \*spatial\)"):
        ClusterInstances("fast", 4)(pred[:3])
    with pytest.raises(ValueError, match="background='head' clusters inside the head's foreground mask"):
        ClusterInstances("fast", 4, "head")(pred)
    with pytest.raises(ValueError, match=r"mask has shape \(48, 63\)"):
        ClusterInstances("fast", 4, "head")(pred, mask[:, 1:])

    labels = np.zeros((1, 48, 64), np.int32)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"h \(shape_split\) must be in \[0, 1\)"):
            SplitByShape(bad)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        SplitByShape(0.1, sigma=-1)
    for step, name in ((SplitByShape(0.1), "SplitByShape"), (RemoveSmallInstances(16), "RemoveSmallInstances")):
        with pytest.raises(ValueError, match=rf"{name} expects instance labels \(1, \*spatial\).*\(2, 48, 64\)"):
            step(np.zeros((2, 48, 64), np.int32))
        with pytest.raises(ValueError, match=rf"{name} expects integer instance labels, got float32"):
            step(labels.astype(np.float32))
        with pytest.raises(ValueError, match=rf"{name} expects instance labels >= 0 .*min -1"):
            step(labels - 1)
    with pytest.raises(ValueError, match="min_size must be >= 0"):
        RemoveSmallInstances(-1)


def test_resize_to_match_keeps_ids_and_centres():
    labels = np.zeros((1, 9, 12), np.int32)
    labels[0, 2:6, 3:9] = 2**25 + 3  # above 2**24: float32 interpolation would round it
    labels[0, 7:9, 0:2] = 5
    up = ResizeToMatch()(labels, (27, 36))
    assert up.dtype == np.int32 and up.shape == (1, 27, 36)
    assert set(np.unique(up)) == {0, 5, 2**25 + 3}
    # voxel centres map onto voxel centres: each voxel becomes a 3x3 block, and shrinking gives the original back
    np.testing.assert_array_equal(up[0], np.kron(labels[0], np.ones((3, 3), np.int32)))
    np.testing.assert_array_equal(ResizeToMatch()(up, (9, 12)), labels)
    t = torch.as_tensor(labels)
    assert ResizeToMatch()(t, (9, 12)) is t  # the same shape: unchanged
    assert ResizeToMatch()(t, (5, 7)).dtype == torch.int32
    with pytest.raises(ValueError, match=r"cannot resize an input of spatial shape \(9, 12\) to \(4, 4, 4\)"):
        ResizeToMatch()(labels, (4, 4, 4))


def test_resize_to_matchd_takes_the_reference_shape_and_keeps_to_a_mask():
    labels = np.ones((1, 10, 10), np.int32)
    mask = np.zeros((1, 20, 20), bool)
    mask[0, 3:17, 5:15] = True  # odd borders: a nearest-neighbour round trip would miss them by a voxel
    step = ResizeToMatchd("pred", reference_key="image", mask_key="given")
    out = step({"pred": labels, "image": np.zeros((1, 20, 20)), "given": mask})
    np.testing.assert_array_equal(out["pred"][0], mask[0].astype(np.int32))
    out = step({"pred": labels, "image": np.zeros((1, 20, 20))})  # no mask given: labels resized only
    assert out["pred"].shape == (1, 20, 20) and out["pred"].all()
    with pytest.raises(KeyError, match="no 'image' to take the spatial shape from"):
        step({"pred": labels})


def test_split_reads_the_voxel_size_of_a_resampled_grid():
    """Labels on a grid resampled per axis (the network's): the split sees that grid's voxel size."""
    from spoco_bundle.postprocessing._common import _grid_spacing

    image = MetaTensor(torch.zeros(1, 20, 40, 40), affine=torch.diag(torch.tensor([2.0, 0.5, 0.5, 1.0])))
    assert _grid_spacing(image, torch.zeros(1, 20, 20, 20)) == pytest.approx([2.0, 1.0, 1.0])
    assert _grid_spacing(image, torch.zeros(1, 20, 40, 40)) == pytest.approx([2.0, 0.5, 0.5])
    assert _grid_spacing(np.zeros((1, 20, 40, 40)), torch.zeros(1, 20, 20, 20)) is None


def _discs(n: int, diameter: float, merged: bool = False, spatial_dims: int = 2) -> np.ndarray:
    """``(1, *S)`` labels: n discs (balls in 3D) of ``diameter`` on a grid, or (``merged``) all of them one object."""
    step = int(diameter) + 4
    side = int(math.ceil(n ** (1 / spatial_dims) - 1e-9))
    grid = np.indices((side * step,) * spatial_dims)
    labels = np.zeros(grid.shape[1:], np.int32)
    for k in range(n):
        cell = np.unravel_index(k, (side,) * spatial_dims)
        dist2 = sum((grid[a] - (cell[a] * step + step / 2)) ** 2 for a in range(spatial_dims))
        labels[dist2 <= (diameter / 2) ** 2] = 1 if merged else k + 1
    return labels[None]


def _few(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if FEW_INSTANCES in r.getMessage()]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_warn_few_instances_names_the_image_where_objects_merged(spatial_dims, caplog):
    n = 50 if spatial_dims == 2 else 64
    check = WarnFewInstances(object_diameter=10.0)
    many, one = _discs(n, 10.0, spatial_dims=spatial_dims), _discs(n, 10.0, True, spatial_dims)
    found, expected, diameter = check.counts(many)
    assert found == n and 0.8 * n < expected < 1.2 * n and diameter == 10.0  # about n discs of the training size
    assert check.counts(one)[0] == 1
    with caplog.at_level(logging.WARNING, logger="spoco_bundle.postprocessing"):
        assert check(many, name="many.tif") is many  # labels pass unchanged
        assert not _few(caplog)
        assert check(torch.as_tensor(one), name="one.tif") is not None
    (message,) = _few(caplog)
    assert message.startswith("one.tif: 1 object(s) found where") and "median diameter 10.0" in message


def test_warn_few_instances_limits_and_options(caplog):
    one = _discs(5, 10.0, merged=True)
    with caplog.at_level(logging.WARNING, logger="spoco_bundle.postprocessing"):
        WarnFewInstances(object_diameter=0.0)(_discs(50, 10.0, merged=True))  # diameter unknown: no check
        assert np.isnan(WarnFewInstances(object_diameter=0.0).counts(one)[1])
        WarnFewInstances(object_diameter=10.0)(one)  # a few objects expected: no check
        WarnFewInstances(object_diameter=10.0, min_expected=3)(one)  # 1 >= 0.03 x about 5
        WarnFewInstances(object_diameter=10.0, min_fraction=0.5, min_expected=3)(one)
    assert len(_few(caplog)) == 1  # only the last: 1 of about 5, under half

    class Recorded:  # the diameter of a checkpoint that is retrained meanwhile: read at every call
        value = 10.0

        def __float__(self) -> float:
            return self.value

    diameter = Recorded()
    check = WarnFewInstances(object_diameter=diameter, min_expected=3)
    assert check.counts(one)[2] == 10.0
    diameter.value = 2.0
    assert check.counts(one)[2] == 2.0
    for bad in (0, 1.5, "x"):
        with pytest.raises(ValueError, match="min_fraction must be a number in"):
            WarnFewInstances(10.0, min_fraction=bad)
    with pytest.raises(ValueError, match="object_diameter must be a number >= 0"):
        WarnFewInstances(-1.0)
    with pytest.raises(ValueError, match="WarnFewInstances expects integer instance labels"):
        WarnFewInstances(10.0)(one.astype(np.float32))


def test_warn_few_instances_dict_names_the_file_when_it_can(caplog):
    one = _discs(50, 10.0, merged=True)
    named = MetaTensor(torch.zeros(1, 4, 4), meta={"filename_or_obj": "/data/cells.tif"})
    cases = [
        (WarnFewInstancesd("pred", object_diameter=10.0), {"image": named}, "/data/cells.tif: "),
        (WarnFewInstancesd("pred", object_diameter=10.0), {"image": np.zeros((1, 4, 4))}, "image: "),
        (WarnFewInstancesd("pred", object_diameter=10.0), {}, "image: "),
        (WarnFewInstancesd("pred", image_key=None, object_diameter=10.0), {"image": named}, "image: "),
        (
            WarnFewInstancesd("pred", object_diameter=10.0),
            {"image": np.zeros((1, 4, 4)), "image_meta_dict": {"filename_or_obj": "m.nii.gz"}},
            "m.nii.gz: ",
        ),
    ]
    for step, extra, start in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="spoco_bundle.postprocessing"):
            out = step({"pred": one, **extra})
        assert out["pred"] is one
        (message,) = _few(caplog)
        assert message.startswith(start), (start, message)


def test_the_chain_warns_with_the_file_name_when_the_segmentation_collapses(nuclei2d_output, caplog):
    """configs/inference.json checks the count: a boundary cut whose threshold leaves seeds in only a few nuclei
    tiles the image with a few regions, far fewer than it holds nuclei of the training size (a failed tissue head
    looks so); the same output with the defaults, or cut as tissue at the head's 0.5 (one region per nucleus, grown
    over the background), does not warn."""
    if not DSB_IMAGE.is_file():
        pytest.skip("needs ../shared/data/dsb2018 (the collapse was checked on that image)")
    pred, image, _ = nuclei2d_output
    (check,) = [t for t in _config_chain()[0].transforms if isinstance(t, WarnFewInstancesd)]
    assert float(check.check.object_diameter) > 0  # the shipped model's recorded diameter
    with caplog.at_level(logging.WARNING, logger="spoco_bundle.postprocessing"):
        _config_chain()[0]({"image": image, "pred": pred.clone()})
        tissue = dict(background="none", clustering="boundary", shape_split=0.0)
        _config_chain(**tissue)[0]({"image": image, "pred": pred.clone()})
        assert not _few(caplog)
        out = _config_chain(**tissue, boundary_threshold=0.99)[0]({"image": image, "pred": pred.clone()})
    warned = _few(caplog)
    assert len(warned) == 1 and warned[0].startswith(f"{DSB_IMAGE}: "), warned
    assert (np.asarray(out["pred"]) > 0).mean() > 0.99  # the few regions tile the image
