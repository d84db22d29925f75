"""Tests of spoco_bundle.clustering on synthetic embeddings with known instances.

The synthetic embeddings follow the geometry the SPOCO losses train for: every object (and the background) has
a centre in R^E, centres at least 2 delta_d apart (many close to that margin), per-voxel Gaussian noise so that
most voxels lie within delta_v of their centre, a few outliers, touching blob-shaped objects, a large background
cluster, and optionally a blurred centre field (network outputs change over a voxel or two at borders).
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from _fast_oracle import _core_mask, _grow, _means, _to_orig, cluster_fast_reference
from scipy import ndimage

from spoco_bundle.clustering import (
    _common,
    cluster_consistency,
    cluster_embeddings,
    cluster_fast,
    cluster_hdbscan,
    cluster_meanshift,
    cluster_watershed,
    fast,
    filter_small,
    relabel_consecutive,
    remove_background,
    split_by_shape,
)
from spoco_bundle.metrics import ap50


def make_labels(shape, n_objects, radius=(4.0, 8.0), min_size=20, seed=0) -> np.ndarray:
    """Touching blobs: each voxel goes to the ball (centre, radius) with the smallest distance / radius."""
    rng = np.random.default_rng(seed)
    best = np.full(shape, 1.0)
    lab = np.zeros(shape, np.int32)
    for k in range(1, n_objects + 1):
        c = rng.uniform(0, shape)
        r = rng.uniform(*radius)
        lo = np.maximum(np.floor(c - r).astype(int), 0)
        hi = np.minimum(np.ceil(c + r).astype(int) + 1, shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        d = np.sqrt(sum((g - ci) ** 2 for g, ci in zip(grids, c))) / r
        upd = d < best[sl]
        best[sl][upd] = d[upd]
        lab[sl][upd] = k
    # one connected piece per object, at least min_size voxels, ids 1..n
    out = np.zeros_like(lab)
    nxt = 1
    for k, sl in enumerate(ndimage.find_objects(lab), 1):
        if sl is None:
            continue
        cc, n = ndimage.label(lab[sl] == k)
        if n == 0:
            continue
        sizes = np.bincount(cc.ravel())
        sizes[0] = 0
        if sizes.max() >= min_size:
            out[sl][cc == np.argmax(sizes)] = nxt
            nxt += 1
    return out


def make_centres(n, dim=16, delta_d=2.0, seed=0) -> np.ndarray:
    """n points, pairwise >= 2 delta_d apart, each new one placed 2-2.6 delta_d from an earlier one."""
    rng = np.random.default_rng(seed)
    cs = [rng.standard_normal(dim)]
    while len(cs) < n:
        v = rng.standard_normal(dim)
        c = cs[rng.integers(len(cs))] + v / np.linalg.norm(v) * rng.uniform(2.0, 2.6) * delta_d
        if np.linalg.norm(np.array(cs) - c, axis=1).min() >= 2 * delta_d:
            cs.append(c)
    return np.array(cs, np.float32)


def make_embeddings(labels, dim=16, noise=0.1, bg_noise=0.1, outliers=0.01, blur=0.0, seed=0) -> np.ndarray:
    """Embeddings (dim, *S): centre of the voxel's label (row 0 = background) + noise; 1% outliers."""
    rng = np.random.default_rng(seed)
    cs = make_centres(int(labels.max()) + 1, dim, seed=seed)
    sigma = np.where(labels == 0, bg_noise, noise).astype(np.float32)
    sigma[rng.random(labels.shape) < outliers] = 0.8
    emb = np.empty((dim,) + labels.shape, np.float32)
    for c in range(dim):
        field = cs[:, c][labels]
        if blur:
            field = ndimage.gaussian_filter(field, blur)
        emb[c] = field + sigma * rng.standard_normal(labels.shape, dtype=np.float32)
    return emb


@pytest.fixture(scope="module")
def data2d():
    lab = make_labels((96, 96), 14, (5, 11), seed=1)
    return lab, make_embeddings(lab, seed=2)


@pytest.fixture(scope="module")
def data3d():
    lab = make_labels((24, 48, 48), 24, (4, 8), seed=3)
    return lab, make_embeddings(lab, blur=0.5, seed=4)


def test_fast_recovers_objects(data2d, data3d):
    for lab, emb in (data2d, data3d):
        seg = cluster_fast(emb)
        assert seg.dtype == np.int32 and seg.shape == lab.shape
        assert ap50(lab, seg) >= 0.95
        # consecutive ids and background (the largest cluster) removed
        assert set(np.unique(seg)) == set(range(seg.max() + 1))
        assert (seg[lab == 0] == 0).mean() > 0.99


def test_fast_harder_cases():
    # strong blur (3-4 voxel wide borders) and noisier background: still one cluster per object
    lab = make_labels((20, 40, 40), 16, (4, 8), seed=5)
    seg = cluster_fast(make_embeddings(lab, blur=1.0, bg_noise=0.15, seed=6))
    assert ap50(lab, seg) >= 0.95
    # two distant objects with the same embedding centre (the losses only separate objects seen in one
    # training patch): a non-spatial merge joins them, the default adjacency merge keeps them apart
    lab = np.zeros((40, 80), np.int32)
    lab[5:20, 5:20], lab[5:20, 60:75], lab[25:35, 30:45] = 1, 2, 3
    emb = make_embeddings(np.where(lab == 2, 1, lab), seed=7)  # objects 1 and 2 share a centre
    assert ap50(lab, cluster_fast(emb)) == 1.0
    assert ap50(lab, cluster_fast(emb, merge="global")) < 1.0


def test_fast_background_pockets_and_fg_mask(data2d):
    lab, emb = data2d
    # background enclosed by objects: not connected to the main background, still removed with it
    ring = np.zeros((60, 60), np.int32)
    ring[15:45, 15:45] = 1
    ring[25:35, 25:35] = 0
    ring[18:23, 37:42] = 2
    seg = cluster_fast(make_embeddings(ring, seed=8))
    assert ap50(ring, seg) == 1.0 and (seg[25:35, 25:35] == 0).all()
    # with a foreground mask nothing is dropped as "largest" and voxels outside stay 0
    fg = lab > 0
    seg = cluster_fast(emb, fg_mask=fg)
    assert (seg[~fg] == 0).all() and ap50(lab, seg) >= 0.95
    assert seg.max() == lab.max()
    # min_size removes small objects (cut in the widest gap between object sizes, so noise cannot flip one)
    sizes = np.sort(np.bincount(lab.ravel())[1:])
    i = int(np.argmax(sizes[1:] / sizes[:-1]))
    cut = int((sizes[i] + sizes[i + 1]) // 2)
    seg = cluster_fast(emb, min_size=cut)
    assert seg.max() == np.sum(sizes >= cut) and np.bincount(seg.ravel())[1:].min() >= cut


def test_fast_not_worse_than_hdbscan():
    # the acceptance criterion: AP50 within 0.01 of HDBSCAN on the same embeddings
    for shape, n, blur, seed in (((80, 80), 12, 0.0, 11), ((16, 40, 40), 14, 0.5, 12)):
        lab = make_labels(shape, n, (4, 9), seed=seed)
        emb = make_embeddings(lab, blur=blur, seed=seed)
        ap_fast = ap50(lab, cluster_fast(emb))
        ap_hdb = ap50(lab, cluster_hdbscan(emb, min_size=16, max_points=8000))
        assert ap_fast >= ap_hdb - 0.01, (ap_fast, ap_hdb)
        assert ap_fast >= 0.95


def test_hdbscan_and_meanshift_recover_objects():
    lab2 = make_labels((48, 48), 6, (4, 9), seed=21)
    emb2 = make_embeddings(lab2, seed=22)
    seg = cluster_hdbscan(emb2, min_size=16)
    assert ap50(lab2, seg) >= 0.95
    # subsampled: the rest is assigned to the nearest cluster mean
    seg = cluster_hdbscan(emb2, min_size=16, max_points=800)
    assert ap50(lab2, seg) >= 0.95
    lab3 = make_labels((10, 20, 20), 5, (3, 6), seed=23)
    assert ap50(lab3, cluster_embeddings(make_embeddings(lab3, seed=24), "hdbscan", min_size=10)) >= 0.95
    # mean-shift in 16-D is slow and needs compact clusters: small, clean input
    lab = make_labels((24, 24), 4, (3, 7), seed=25)
    seg = cluster_meanshift(make_embeddings(lab, noise=0.05, bg_noise=0.05, outliers=0.0, seed=26), min_size=8)
    assert ap50(lab, seg) >= 0.95
    lab3 = make_labels((6, 16, 16), 4, (3, 6), seed=27)
    emb3 = make_embeddings(lab3, noise=0.05, bg_noise=0.05, outliers=0.0, seed=28)
    seg = cluster_embeddings(emb3, "meanshift", min_size=8, max_points=600)
    assert ap50(lab3, seg) >= 0.95


def test_consistency_drops_inconsistent_cluster():
    # anchors are single voxels, so the rule needs compact clusters (pairwise distances mostly < delta_v)
    lab = make_labels((64, 64), 8, (5, 10), seed=31)
    emb_f = make_embeddings(lab, noise=0.05, bg_noise=0.05, outliers=0.0, seed=32)
    rng = np.random.default_rng(33)
    # the teacher lives in its own (rotated) embedding space, with its own noise
    rot, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    emb_g = np.einsum("ij,j...->i...", rot, emb_f).astype(np.float32)
    emb_g += 0.02 * rng.standard_normal(emb_g.shape).astype(np.float32)
    # ... except that it splits object 1 into two halves with distinct embeddings
    bad = lab == 1
    ys = np.nonzero(bad)[0]
    half = bad & (np.arange(64)[:, None] > np.median(ys))
    emb_g[:, half] += (3.0 * np.eye(16)[0])[:, None]
    seg = cluster_consistency(emb_f, emb_g, n_samples=50)
    assert np.all(seg[bad] == 0)
    keep = lab.copy()
    keep[bad] = 0
    assert ap50(relabel_consecutive(keep), seg) == 1.0
    # a consistent teacher keeps everything; dispatcher route
    seg = cluster_embeddings(emb_f, "consistency", emb_g=np.einsum("ij,j...->i...", rot, emb_f).astype(np.float32))
    assert ap50(lab, seg) >= 0.95


def test_post_processing_helpers():
    lab = np.array([[0, 5, 5, 5], [7, 7, 0, 9], [7, 7, 7, 0]])
    np.testing.assert_array_equal(relabel_consecutive(lab), [[0, 1, 1, 1], [2, 2, 0, 3], [2, 2, 2, 0]])
    np.testing.assert_array_equal(filter_small(lab, 3), np.where(lab == 9, 0, lab))
    np.testing.assert_array_equal(remove_background(lab, "largest"), np.where(lab == 7, 0, lab))
    np.testing.assert_array_equal(remove_background(lab, "none"), lab)
    fg = lab != 7
    # outside the mask first, then the largest remaining (5) goes
    np.testing.assert_array_equal(remove_background(lab, "largest", fg), np.where(lab == 9, 9, 0))
    with pytest.raises(ValueError, match="mode"):
        remove_background(lab, "smallest")


def test_input_validation():
    emb = np.zeros((16, 8, 8), np.float32)
    with pytest.raises(ValueError, match="Unknown clustering method 'kmeans'.*consistency.*fast.*hdbscan"):
        cluster_embeddings(emb, "kmeans")
    with pytest.raises(ValueError, match="emb_g"):
        cluster_embeddings(emb, "consistency")
    with pytest.raises(ValueError, match="shape"):
        cluster_embeddings(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="shape"):
        cluster_fast(np.zeros((2, 3, 4, 5, 6), np.float32))
    bad = emb.copy()
    bad[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cluster_embeddings(bad)
    with pytest.raises(ValueError, match="fg_mask"):
        cluster_fast(emb, fg_mask=np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="background"):
        cluster_fast(emb, background="smallest")
    with pytest.raises(ValueError, match="merge"):
        cluster_fast(emb, merge="sometimes")
    with pytest.raises(ValueError, match="same shape"):
        cluster_consistency(emb, emb[:, :4])
    with pytest.raises(ValueError, match="floating"):
        cluster_fast(np.zeros((16, 8, 8), np.int32))
    # constant embeddings: one cluster, which is the background
    assert cluster_fast(emb).max() == 0
    assert cluster_fast(emb, background="none").max() == 1


def test_fast_speed_report(capsys):
    """Prints (does not assert) the throughput of cluster_fast on a 2 Mvoxel volume, E = 16."""
    lab = make_labels((32, 256, 256), 400, (5, 10), seed=41)
    emb = make_embeddings(lab, seed=42)
    cluster_fast(emb[:, :4])  # compile (numba) outside the timing
    t0 = time.perf_counter()
    seg = cluster_fast(emb)
    dt = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\ncluster_fast {lab.size / 1e6:.1f} Mvoxel: {dt:.2f} s, {lab.size / dt / 1e6:.1f} Mvoxel/s")
    assert ap50(lab, seg) >= 0.95


def test_fast_clustering_does_not_depend_on_thread_count():
    # weakly separated, noisy embeddings: many voxels are near several means, where the growth order matters
    import numba

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(16, 24, 64, 64)).astype(np.float32) * 0.6
    emb[:, :, :32] += 0.8
    emb = (np.cumsum(emb, axis=3) / 8).astype(np.float32)
    before = numba.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 2, 1):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            results.append(cluster_fast(emb, min_size=4, background="none"))
    finally:
        numba.set_num_threads(before)
    assert results[0].max() > 1
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


# ------------------------------------------------------------------------ fast: kernels against numpy references
# tests/_fast_oracle.py holds the numpy twins of fast's numba kernels (the former numpy backend); every kernel must
# give the same result as its twin on seeded random inputs: 2D (as (H, 1, W), how cluster_fast runs it) and 3D,
# singleton axes, one or many channels, masks, exact threshold hits and tied distances.

# work shapes (D, H, W): 3D, 2D as (H, 1, W), lines and single voxels
SHAPES3 = [(1, 1, 1), (1, 1, 9), (9, 1, 1), (1, 9, 1), (23, 1, 17), (1, 17, 23), (2, 2, 2), (6, 11, 13), (12, 9, 20)]


def _blocky(rng, e: int, shape3, cell: int, noise: float, integer: bool = False) -> np.ndarray:
    """(E, D, H, W) float32: piecewise constant over cell^3 blocks (random centres) plus noise; ``integer``: small
    integers, so that squared distances are exact and hit a threshold exactly."""
    coarse = rng.normal(size=(e,) + tuple(-(-s // cell) for s in shape3)) * 2.0
    emb = coarse[(slice(None),) + np.ix_(*[np.arange(s) // cell for s in shape3])]
    emb = emb + noise * rng.normal(size=emb.shape)
    if integer:
        emb = np.round(emb * 2)
    return np.ascontiguousarray(emb, dtype=np.float32)


def test_core_kernel_matches_numpy_reference():
    rng = np.random.default_rng(100)
    n_true = n_false = 0
    for case, (shape3, e) in enumerate(itertools.product(SHAPES3, (1, 3, 16))):
        integer = case % 3 == 0
        emb4 = _blocky(rng, e, shape3, int(rng.integers(2, 6)), 0.3, integer)
        # threshold: a random one, and (integer embeddings) one that squared distances hit exactly
        for tau2 in (np.float32(rng.uniform(0.1, 2.0) * e), np.float32(int(rng.integers(1, 3 * e)))):
            ref = _core_mask(emb4, float(tau2), 1)
            np.testing.assert_array_equal(fast._k_core(emb4, tau2), ref, err_msg=f"{shape3} E={e} tau2={tau2}")
            n_true, n_false = n_true + ref.sum(), n_false + (~ref).sum()
    assert n_true > 1000 and n_false > 1000  # the cases are not trivially all core / no core
    # a volume the reference splits into several chunks of slices (halos), worked in a thread pool
    emb4 = _blocky(rng, 2, (9, 256, 256), 7, 0.3)
    ref = _core_mask(emb4, 1.0, 2)
    assert 0.2 < ref.mean() < 0.9
    np.testing.assert_array_equal(fast._k_core(emb4, np.float32(1.0)), ref)


def test_orig_index_kernel_matches_numpy_reference():
    # padded flat index -> original flat index: the inner voxels in raster order are 0..N-1
    for shape3 in SHAPES3:
        geo = fast._Padded(shape3)
        inner = np.zeros(geo.pshape, bool)
        inner[geo.inner] = True
        p = np.flatnonzero(inner)
        expected = np.arange(int(np.prod(shape3)))
        np.testing.assert_array_equal(_to_orig(geo, p), expected)
        np.testing.assert_array_equal([fast._k_orig(q, geo.kernel_geo) for q in p], expected)


def _growth_case(rng, shape3, e: int, n_seeds: int, masked: bool, duplicate_means: bool):
    """Padded seed labels, growable mask, embeddings (E, N) and means (n + 1, E) for one growth problem."""
    geo = fast._Padded(shape3)
    n_vox = int(np.prod(shape3))
    emb = _blocky(rng, e, shape3, int(rng.integers(2, 5)), 0.5).reshape(e, -1)
    lab = np.zeros(n_vox, np.int32)
    n = min(n_seeds, n_vox)
    at = rng.choice(n_vox, size=min(n_vox, 2 * n), replace=False)
    lab[at] = np.concatenate([np.arange(1, n + 1), rng.integers(1, n + 1, size=len(at) - n)]).astype(np.int32)
    means = rng.normal(size=(n + 1, e)) * 2.0
    if duplicate_means and n > 1:
        means[2::2] = means[1:-1:2][: len(means[2::2])]  # tied distances: the first neighbour in offset order wins
    plab = np.zeros(geo.pshape, np.int32)
    plab[geo.inner] = lab.reshape(shape3)
    pgrow = np.zeros(geo.pshape, bool)
    pgrow[geo.inner] = lab.reshape(shape3) == 0
    if masked:
        pgrow[geo.inner] &= rng.random(shape3) < 0.8
    return geo, plab, pgrow, emb, means


def _kernel_growth(geo, plab, pgrow, emb, means, radius2, sweep: bool):
    plab, pgrow = plab.copy(), pgrow.copy()
    if sweep:
        fast._k_sweep(plab.reshape(-1), pgrow.reshape(-1), geo.offsets, emb, means, radius2, geo.kernel_geo)
    cand = fast._frontier(plab, pgrow, geo)
    fast._k_grow(plab.reshape(-1), pgrow.reshape(-1), geo.offsets, cand, emb, means, radius2, geo.kernel_geo)
    return plab, pgrow


def test_growth_kernels_match_numpy_reference():
    rng = np.random.default_rng(200)
    grown = 0
    for case, shape3 in enumerate(SHAPES3 * 4):
        e = (1, 4, 16)[case % 3]
        masked, dup = case % 2 == 1, case % 4 >= 2
        geo, plab, pgrow, emb, means = _growth_case(rng, shape3, e, int(rng.integers(1, 40)), masked, dup)
        n = len(means) - 1
        # no limit, a radius around the typical voxel-mean distance, and one below the means' spacing
        spacing = np.inf if n < 2 else min(np.linalg.norm(means[i] - means[j]) for i in range(1, n) for j in range(i))
        for radius2 in (np.inf, 2.0 * e * rng.uniform(0.5, 2.0), (0.49 * spacing) ** 2):
            ref_lab, ref_grow = plab.copy(), pgrow.copy()
            _grow(ref_lab, ref_grow, geo, emb, means, radius2)
            got_lab, got_grow = _kernel_growth(geo, plab, pgrow, emb, means, radius2, sweep=False)
            msg = f"case {case} {shape3} E={e} masked={masked} tied={dup} radius2={radius2}"
            np.testing.assert_array_equal(got_lab, ref_lab, err_msg=msg)
            np.testing.assert_array_equal(got_grow, ref_grow, err_msg=msg)
            grown += int((ref_lab != plab).sum())
            if radius2 < (spacing / 2) ** 2:
                # no voxel within the radius of two means: the raster sweep before the rounds changes nothing
                got_lab, got_grow = _kernel_growth(geo, plab, pgrow, emb, means, radius2, sweep=True)
                np.testing.assert_array_equal(got_lab, ref_lab, err_msg=msg + " (sweep)")
                np.testing.assert_array_equal(got_grow, ref_grow, err_msg=msg + " (sweep)")
    assert grown > 10_000


def test_adjacent_pairs_kernel_matches_numpy_reference():
    rng = np.random.default_rng(300)
    for case, shape3 in enumerate(SHAPES3 + [(30, 30, 30)]):
        # sparse random labels, dense random labels (many distinct pairs: the kernel's key buffer grows past 4096),
        # blocky labels (few pairs, long runs of repeated keys)
        for kind in ("sparse", "dense", "blocky"):
            n = int(rng.integers(1, 20 if kind != "dense" else 30_000))
            if kind == "blocky":
                coarse = rng.integers(0, n + 1, size=tuple(-(-s // 3) for s in shape3))
                lab = coarse[np.ix_(*[np.arange(s) // 3 for s in shape3])]
            else:
                lab = rng.integers(1, n + 1, size=shape3) * (rng.random(shape3) < (0.5 if kind == "sparse" else 1.0))
            lab = np.ascontiguousarray(lab, dtype=np.int32)
            keys = fast._k_adjacent_keys(lab, n)
            ref = _common._adjacent_keys(lab, n)
            np.testing.assert_array_equal(np.unique(keys), ref, err_msg=f"{shape3} {kind}")
            if shape3 == (30, 30, 30) and kind == "dense":
                assert len(keys) > 4096
            means = rng.normal(size=(n + 1, 3))
            for threshold in (0.5, 2.0, np.inf):
                np.testing.assert_array_equal(
                    _common._merge_adjacent(lab, means, threshold, keys), _common._merge_adjacent(lab, means, threshold)
                )


def test_means_kernel_matches_numpy_reference():
    # below and above the sampling size (1 << 20 voxels: every step-th voxel, labels with < 4 samples from all)
    rng = np.random.default_rng(400)
    for n_vox, e, n in ((1, 1, 1), (50, 3, 7), (5000, 16, 300), ((1 << 20) + 12345, 2, 5000)):
        lab = rng.integers(0, n + 1, size=n_vox).astype(np.int32)
        lab[rng.random(n_vox) < 0.5] = 0
        lab[lab == n] = 0  # an absent label
        emb = rng.normal(size=(e, n_vox)).astype(np.float32)
        got = _common._means(lab, emb, n)
        np.testing.assert_array_equal(got, _means(lab, emb, n))
        assert got.shape == (n + 1, e)


def _e2e_cases():
    """Seeded (embeddings, kwargs, separated) for cluster_fast: 2D and 3D, masks, background and merge modes, edge
    cases; ``separated``: the losses' geometry (object means 2 delta_d apart), not weakly separated noise."""
    rng = np.random.default_rng(500)
    for seed in range(6):
        shape = ((40, 40), (9, 20, 20), (1, 30), (30, 1), (2, 25, 1))[seed % 5]
        lab = make_labels(shape, 6, (3, 8), min_size=4, seed=600 + seed)
        emb = make_embeddings(lab, dim=(16, 4, 1)[seed % 3], blur=0.5 * (seed % 2), seed=700 + seed)
        for kwargs in (
            {},
            {"fg_mask": lab > 0},
            {"fg_mask": rng.random(lab.shape) < 0.7, "background": "largest"},
            {"background": "none", "merge": "global", "min_size": 1},
            {"merge": "none", "min_seed_size": 3, "fill_radius": 3.0},
            {"delta_v": 0.3, "assign_radius": 1.0, "fill_radius": 1.5, "min_size": 2},
        ):
            yield emb, kwargs, True
    # weakly separated noisy embeddings: many voxels within reach of several means
    for _ in range(2):
        noisy = rng.normal(size=(4, 8, 32, 32)).astype(np.float32) * 0.6
        noisy[:, :, :16] += 0.8
        noisy = np.cumsum(noisy, axis=3, dtype=np.float32) / 6
        yield noisy, {"min_size": 1, "background": "none"}, False
        yield noisy, {"min_size": 4, "fill_radius": 2.5, "merge": "none"}, False
    yield np.zeros((4, 1, 1), np.float32), {"background": "none", "min_size": 1}, True  # a single voxel
    yield np.zeros((4, 5, 6), np.float32), {}, True  # constant: one cluster, the background


def test_fast_matches_numpy_reference_end_to_end(monkeypatch, data2d, data3d):
    cases = list(_e2e_cases()) + [(emb, {}, True) for _, emb in (data2d, data3d)]
    results = [cluster_fast(emb, **kwargs) for emb, kwargs, _ in cases]
    assert sum(r.max() > 1 for r in results) > len(cases) // 2  # most cases have several objects
    refs = [cluster_fast_reference(emb, **kwargs) for emb, kwargs, _ in cases]
    # growth in breadth-first rounds only (as the reference): the same labels, voxel for voxel
    with monkeypatch.context() as m:
        m.setattr(fast, "_k_sweep", lambda *args: None)
        for (emb, kwargs, _), ref in zip(cases, refs):
            np.testing.assert_array_equal(cluster_fast(emb, **kwargs), ref, err_msg=f"{emb.shape} {kwargs}")
    # the raster sweep first (the library's growth): on the losses' geometry the same labels up to the rare voxel
    # within reach of two touching components' means (see cluster_fast); on weakly separated noise the visiting
    # order decides many voxels
    for (emb, kwargs, separated), default, ref in zip(cases, results, refs):
        if separated:
            assert default.max() == ref.max() and np.mean(default != ref) < 1e-3, (emb.shape, kwargs)


# ------------------------------------------------------------------------------------------------- watershed


def test_watershed_recovers_objects(data2d, data3d):
    for lab, emb in (data2d, data3d):
        for mask in (None, lab > 0):
            seg = cluster_watershed(emb, fg_mask=mask)
            assert seg.dtype == np.int32 and seg.shape == lab.shape
            assert ap50(lab, seg) >= 0.95
            assert set(np.unique(seg)) == set(range(seg.max() + 1))
            assert (seg[lab == 0] == 0).mean() > 0.99
    assert cluster_embeddings(data2d[1], "watershed").max() == cluster_watershed(data2d[1]).max()


def _smooth_border_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two touching 16x12 objects whose embeddings ramp from one to the other over 4 pixels at their border (steps of
    0.75: below the 2 delta_v = 1 that fast's core test tolerates, above the watershed's seed depth delta_v = 0.5),
    means about 3 apart; background far away."""
    lab = np.zeros((32, 48), np.int32)
    lab[8:24, 12:24], lab[8:24, 24:36] = 1, 2
    ramp = np.clip((np.arange(48) - 22) / 4.0, 0.0, 1.0).astype(np.float32)  # 0 up to x=22, 1 from x=26
    emb = np.zeros((4, 32, 48), np.float32)
    emb[0] = 3.0 * ramp[None, :]
    emb[1][lab == 0] = 6.0
    emb += 0.01 * np.random.default_rng(0).standard_normal(emb.shape).astype(np.float32)
    return lab, emb


def test_watershed_cuts_touching_objects_with_a_smooth_border():
    lab, emb = _smooth_border_pair()
    mask = lab > 0
    # fast's core test links the two through the ramp: one object
    assert cluster_fast(emb, fg_mask=mask, background="none").max() == 1
    seg = cluster_watershed(emb, fg_mask=mask, background="none")
    assert seg.max() == 2 and ap50(lab, seg) == 1.0
    # the cut is where the ramp is steepest between the two plateaus: the objects' true border, +-1 pixel
    left = np.flatnonzero(seg[16] == seg[16, 14])
    assert 22 <= left.max() + 1 <= 26
    # a merge threshold above the means' distance joins them again
    assert cluster_watershed(emb, fg_mask=mask, background="none", merge_threshold=3.5).max() == 1


def test_watershed_gentle_border_needs_a_shallower_seed_depth():
    # the same pair with the ramp spread over 8 pixels (steps of 0.375, under delta_v): the smoothed ridge is
    # shallower than the default seed depth, so one object by default; seeds of 0.2 cut it at the border
    lab, emb = _smooth_border_pair()
    ramp = np.clip((np.arange(48) - 20) / 8.0, 0.0, 1.0).astype(np.float32)
    emb[0] = 3.0 * ramp[None, :] + 0.01 * np.random.default_rng(1).standard_normal((32, 48)).astype(np.float32)
    mask = lab > 0
    assert cluster_watershed(emb, fg_mask=mask, background="none").max() == 1
    seg = cluster_watershed(emb, fg_mask=mask, background="none", h=0.2)
    assert seg.max() == 2 and ap50(lab, seg) == 1.0


def test_watershed_seed_depth_defaults_to_delta_v():
    # one object with a shallow inner ridge (an embedding step of 0.3, texture): its two basins are under delta_v
    # deep, so by default it stays one region (the merge step is off, so only the seeds decide); seeds of the old
    # depth (0.4 delta_v = 0.2) cut it, and a smaller delta_v lowers the default with it
    emb = np.zeros((4, 24, 40), np.float32)
    emb[0, :, 20:] = 0.3
    emb += 0.005 * np.random.default_rng(0).standard_normal(emb.shape).astype(np.float32)
    mask = np.zeros((24, 40), bool)
    mask[4:20, 4:36] = True
    kwargs = dict(fg_mask=mask, background="none", merge_threshold=0, sigma=0)
    assert cluster_watershed(emb, **kwargs).max() == 1
    assert cluster_watershed(emb, h=0.2, **kwargs).max() == 2
    assert cluster_watershed(emb, delta_v=0.2, **kwargs).max() == 2


def test_watershed_keeps_objects_without_a_seed():
    # a uniform object has a flat edge map (no basin deeper than h): it must stay one object, not vanish; beside it
    # an object with an ordinary basin
    emb = np.zeros((4, 30, 30), np.float32)
    mask = np.zeros((30, 30), bool)
    mask[3:12, 3:12] = True
    mask[16:27, 16:27] = True
    yy, xx = np.mgrid[:30, :30]
    emb[0] = np.where(yy >= 16, 5.0 + 0.5 * np.hypot(yy - 21, xx - 21), 0.0)  # a bowl: seed at the centre
    out = cluster_watershed(emb, fg_mask=mask, background="none", min_size=1)
    assert len(np.unique(out[mask])) == 2 and (out[:15][mask[:15]] > 0).all() and (out[~mask] == 0).all()


def test_watershed_input_validation():
    lab, emb = _smooth_border_pair()
    for kwargs in ({"h": 0.0}, {"sigma": -1.0}, {"merge_threshold": -0.5}):
        with pytest.raises(ValueError, match="need h > 0"):
            cluster_watershed(emb, **kwargs)
    with pytest.raises(ValueError, match="sigma needs one value or one per spatial axis"):
        cluster_watershed(emb, sigma=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="fg_mask must have the spatial shape"):
        cluster_watershed(emb, fg_mask=np.ones((3, 3), bool))
    assert cluster_watershed(emb, fg_mask=np.zeros(lab.shape, bool)).max() == 0  # empty mask: no objects


# ------------------------------------------------------------------------------------------------ split_by_shape


def _balls(shape, centres, radii, spacing=None) -> list[np.ndarray]:
    grids = np.meshgrid(
        *[np.arange(n) * (1 if spacing is None else spacing[i]) for i, n in enumerate(shape)], indexing="ij"
    )
    return [sum((g - c) ** 2 for g, c in zip(grids, centre)) <= r**2 for centre, r in zip(centres, radii)]


def _best_iou(part: np.ndarray, objects: list[np.ndarray]) -> float:
    return max((part & o).sum() / (part | o).sum() for o in objects)


def test_split_by_shape_cuts_two_joined_discs_at_the_neck():
    a, b = _balls((60, 90), [(30, 30), (30, 58)], [15, 15])  # overlapping discs: an 8 with a neck
    joined = (a | b).astype(np.int32) * 4
    out = split_by_shape(joined, h=0.1)
    parts = [out == k for k in np.unique(out[out > 0])]
    assert len(parts) == 2 and 4 in np.unique(out)  # one part keeps the id, the other gets the next free one
    halves = [a & (np.arange(90) < 44)[None], b & (np.arange(90) >= 44)[None]]  # the true cut is the neck at x=44
    assert min(_best_iou(p, halves) for p in parts) > 0.95
    assert out.dtype == np.int32 and ((out > 0) == (joined > 0)).all()  # nothing added or lost


def test_split_by_shape_leaves_round_and_elongated_objects_alone():
    lab = np.zeros((80, 120), np.int32)
    lab[_balls((80, 120), [(40, 30)], [18])[0]] = 1
    y, x = np.mgrid[:80, :120]
    lab[((y - 40) / 12.0) ** 2 + ((x - 90) / 26.0) ** 2 <= 1] = 2  # a 2:1 ellipse has one ridge, not two peaks
    np.testing.assert_array_equal(split_by_shape(lab, h=0.1), lab)
    # an h deeper than the neck keeps even the 8 whole (peaks 15, saddle about 5.4: 0.64 of the peak below it);
    # parts below min_size cancel the split
    a, b = _balls((60, 90), [(30, 30), (30, 58)], [15, 15])
    joined = (a | b).astype(np.int32)
    assert len(np.unique(split_by_shape(joined, h=0.55))) == 3
    np.testing.assert_array_equal(split_by_shape(joined, h=0.75), joined)
    np.testing.assert_array_equal(split_by_shape(joined, h=0.1, min_size=int(a.sum()) + 1), joined)


def test_split_by_shape_3d_uses_the_voxel_spacing():
    # two spheres of radius 4 um overlapping along z (centres 7 um apart), sampled with 1 um z and 0.25 um y/x
    # voxels: in physical units an 8 along z, split at the neck plane
    spacing = (1.0, 0.25, 0.25)
    a, b = _balls((20, 40, 40), [(6.0, 5.0, 5.0), (13.0, 5.0, 5.0)], [4.0, 4.0], spacing)
    joined = (a | b).astype(np.int32)
    out = split_by_shape(joined, h=0.1, spacing=spacing)
    assert len(np.unique(out[out > 0])) == 2
    assert min(_best_iou(out == k, [a, b]) for k in (1, 2)) > 0.85
    # one sphere alone stays whole
    np.testing.assert_array_equal(split_by_shape(a.astype(np.int32), h=0.1, spacing=spacing), a.astype(np.int32))


def test_split_by_shape_validation():
    with pytest.raises(ValueError, match="0 < h < 1"):
        split_by_shape(np.zeros((4, 4), np.int32), h=1.0)
    with pytest.raises(ValueError, match="integer array"):
        split_by_shape(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="spacing needs 2 positive values"):
        split_by_shape(np.zeros((4, 4), np.int32), spacing=(1.0, 0.0))
