"""Tests of spoco_bundle.metrics against maintained implementations and brute-force references.

References: ``stardist.matching.matching`` (AP / TP / FP / FN), ``skimage.metrics`` (ARAND, VOI), and explicit
loops over objects and voxel pairs written here. Real label images come from ``SPOCO_DATA_DIR`` (default: the
repository's ``../shared/data``); those tests are skipped when the data is missing.
"""

from __future__ import annotations

import os
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from spoco_bundle.metrics import (
    DEFAULT_THRESHOLDS,
    adapted_rand_error,
    ap50,
    average_precision,
    mean_ap,
    segmentation_scores,
    symmetric_best_dice,
    variation_of_information,
)

DATA_DIR = Path(os.environ.get("SPOCO_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
THRESHOLDS = (0.1, 0.3, 0.4) + DEFAULT_THRESHOLDS

stardist_matching = pytest.importorskip("stardist.matching")
skm = pytest.importorskip("skimage.metrics")


def _dsb_labels(n: int) -> list[np.ndarray]:
    files = sorted((DATA_DIR / "dsb2018" / "labels").glob("*.tif"))
    if not files:
        pytest.skip(f"DSB2018 labels not found under {DATA_DIR}")
    import tifffile

    # spread the picks over the data set (different sizes and densities of nuclei)
    picks = np.linspace(0, len(files) - 1, n).astype(int)
    return [tifffile.imread(files[i]).astype(np.int64) for i in picks]


def _gonuclear_labels() -> np.ndarray:
    path = DATA_DIR / "gonuclear" / "1136_labels.tif"
    if not path.exists():
        pytest.skip(f"GoNuclear labels not found under {DATA_DIR}")
    import tifffile

    return tifffile.imread(path).astype(np.int64)


def perturb(gt: np.ndarray, seed: int) -> np.ndarray:
    """A plausible prediction: eroded / dilated, merged, split, dropped, shifted and spurious objects."""
    rng = np.random.default_rng(seed)
    seg = gt.copy()
    ids = [i for i in np.unique(gt) if i != 0]
    rng.shuffle(ids)
    n = len(ids)
    groups = np.array_split(np.array(ids), 6)
    erode, dilate, drop, split, shift, _keep = groups
    for i in erode:
        m = gt == i
        seg[m & ~ndimage.binary_erosion(m, iterations=int(rng.integers(1, 3)))] = 0
    for i in dilate:
        seg[ndimage.binary_dilation(gt == i) & (seg == 0)] = i
    for i in drop:
        seg[gt == i] = 0
    nxt = int(gt.max()) + 1
    for i in split:
        coords = np.nonzero(gt == i)
        axis = int(rng.integers(gt.ndim))
        cut = np.quantile(coords[axis], rng.uniform(0.2, 0.8))
        part = coords[axis] > cut
        seg[tuple(c[part] for c in coords)] = nxt
        nxt += 1
    for i in shift:
        m = seg == i
        seg[m] = 0
        seg[np.roll(m, int(rng.integers(1, 4)), axis=int(rng.integers(gt.ndim)))] = i
    # merge a pair of touching objects
    a, b = gt[:, :-1] if gt.ndim == 2 else gt[:, :, :-1], gt[:, 1:] if gt.ndim == 2 else gt[:, :, 1:]
    touching = (a != b) & (a > 0) & (b > 0)
    if touching.any():
        j = int(rng.integers(touching.sum()))
        seg[seg == b[touching][j]] = a[touching][j]
    # spurious blobs in the background
    bg = np.argwhere(gt == 0)
    for k in range(max(1, n // 10)):
        c = bg[rng.integers(len(bg))]
        sl = tuple(slice(max(x - 2, 0), x + 3) for x in c)
        seg[sl][seg[sl] == 0] = nxt + k
    # non-consecutive, large ids must not matter
    perm = np.zeros(seg.max() + 1, dtype=np.int64)
    perm[1:] = rng.permutation(seg.max()) * 7 + 1000
    return perm[seg]


def brute_force_ap(gt: np.ndarray, seg: np.ndarray, thresholds) -> list[float]:
    """Loops over object pairs, then a Kuhn augmenting-path maximum matching on pairs with IoU >= t."""
    gt_ids = [i for i in np.unique(gt) if i > 0]
    seg_ids = [j for j in np.unique(seg) if j > 0]
    masks_s = {j: seg == j for j in seg_ids}
    iou = {}
    for i in gt_ids:
        mi = gt == i
        for j in np.unique(seg[mi]):
            if j > 0:
                inter = np.count_nonzero(mi & masks_s[j])
                iou[(i, j)] = inter / np.count_nonzero(mi | masks_s[j])
    out = []
    for t in thresholds:
        adj = {i: [j for j in seg_ids if iou.get((i, j), 0.0) >= t] for i in gt_ids}
        owner: dict = {}

        def augment(i, seen):
            for j in adj[i]:
                if j not in seen:
                    seen.add(j)
                    if j not in owner or augment(owner[j], seen):
                        owner[j] = i
                        return True
            return False

        tp = sum(augment(i, set()) for i in gt_ids)
        denom = len(gt_ids) + len(seg_ids) - tp
        out.append(tp / denom if denom else 1.0)
    return out


def brute_force_sbd(gt: np.ndarray, seg: np.ndarray) -> float:
    def bd(a, b):
        scores = []
        for i in (i for i in np.unique(a) if i > 0):
            mi = a == i
            best = 0.0
            for j in (j for j in np.unique(b) if j > 0):
                mj = b == j
                best = max(best, 2 * np.count_nonzero(mi & mj) / (mi.sum() + mj.sum()))
            scores.append(best)
        return np.mean(scores)

    return min(bd(gt, seg), bd(seg, gt))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_matches_stardist_dsb(seed):
    for k, gt in enumerate(_dsb_labels(4)):
        seg = perturb(gt, seed * 10 + k)
        ours = average_precision(gt, seg, THRESHOLDS)
        ref = stardist_matching.matching(gt, seg, thresh=THRESHOLDS)
        np.testing.assert_allclose(ours, [r.accuracy for r in ref], atol=1e-12)
        assert ap50(gt, seg) == pytest.approx(ref[THRESHOLDS.index(0.5)].accuracy)
        assert mean_ap(gt, seg) == pytest.approx(np.mean([r.accuracy for r in ref[3:]]))


def test_ap_and_sbd_match_brute_force_dsb():
    for k, gt in enumerate(_dsb_labels(2)):
        seg = perturb(gt, 100 + k)
        np.testing.assert_allclose(average_precision(gt, seg, THRESHOLDS), brute_force_ap(gt, seg, THRESHOLDS))
        assert symmetric_best_dice(gt, seg) == pytest.approx(brute_force_sbd(gt, seg), abs=1e-12)


def test_3d_gonuclear_against_references_and_speed():
    gt = _gonuclear_labels()
    seg = perturb(gt, 7)
    ref = stardist_matching.matching(gt, seg, thresh=THRESHOLDS)
    np.testing.assert_allclose(average_precision(gt, seg, THRESHOLDS), [r.accuracy for r in ref], atol=1e-12)
    crop = (slice(20, 70),) * 3  # the all-pairs loop is slow on the full volume
    assert symmetric_best_dice(gt[crop], seg[crop]) == pytest.approx(brute_force_sbd(gt[crop], seg[crop]), abs=1e-12)

    arand_ref = skm.adapted_rand_error(gt, seg, ignore_labels=())[0]
    arand_ref_ign = skm.adapted_rand_error(gt, seg, ignore_labels=(0,))[0]
    assert adapted_rand_error(gt, seg) == pytest.approx(arand_ref, abs=1e-10)
    assert adapted_rand_error(gt, seg, ignore_background=True) == pytest.approx(arand_ref_ign, abs=1e-10)
    # skimage returns (H(seg | gt), H(gt | seg)) = (split, merge), in bits
    np.testing.assert_allclose(variation_of_information(gt, seg), skm.variation_of_information(gt, seg), atol=1e-10)
    np.testing.assert_allclose(
        variation_of_information(gt, seg, ignore_background=True),
        skm.variation_of_information(gt, seg, ignore_labels=(0,)),
        atol=1e-10,
    )

    t0 = time.perf_counter()
    scores = segmentation_scores(gt, seg)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"segmentation_scores took {elapsed:.2f} s on 100^3"
    assert scores["ap50"] == pytest.approx(ref[THRESHOLDS.index(0.5)].accuracy)
    assert scores["map"] == pytest.approx(np.mean([r.accuracy for r in ref[3:]]))
    assert scores["arand"] == pytest.approx(arand_ref)
    assert (scores["voi_split"], scores["voi_merge"]) == pytest.approx(tuple(skm.variation_of_information(gt, seg)))


def test_arand_voi_brute_force_small():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 4, size=(6, 7))
    seg = rng.integers(0, 5, size=(6, 7))
    g, s = gt.ravel(), seg.ravel()
    for ignore in (False, True):
        keep = g > 0 if ignore else np.ones_like(g, bool)
        gg, ss = g[keep], s[keep]
        # Rand F-score over unordered pairs of distinct voxels
        both = same_g = same_s = 0
        for i, j in combinations(range(len(gg)), 2):
            sg, ssm = gg[i] == gg[j], ss[i] == ss[j]
            both += sg and ssm
            same_g += sg
            same_s += ssm
        assert adapted_rand_error(gt, seg, ignore) == pytest.approx(1 - 2 * both / (same_g + same_s))
        n = len(gg)
        split = merge = 0.0
        for a in np.unique(gg):
            for b in np.unique(ss):
                nab = np.sum((gg == a) & (ss == b))
                if nab:
                    split -= nab / n * np.log2(nab / np.sum(gg == a))
                    merge -= nab / n * np.log2(nab / np.sum(ss == b))
        assert variation_of_information(gt, seg, ignore) == pytest.approx((split, merge))


def test_identical_and_edge_cases():
    gt = np.zeros((20, 20), np.int32)
    gt[2:8, 2:8] = 3
    gt[10:18, 5:15] = 9
    scores = segmentation_scores(gt, gt)
    assert scores == pytest.approx({"ap50": 1, "map": 1, "sbd": 1, "arand": 0, "voi_split": 0, "voi_merge": 0})
    empty = np.zeros_like(gt)
    assert ap50(empty, empty) == 1.0 and symmetric_best_dice(empty, empty) == 1.0
    assert ap50(gt, empty) == 0.0 and symmetric_best_dice(gt, empty) == 0.0
    # negative ids (annotated background -1) count as background
    assert ap50(np.where(gt == 0, -1, gt), gt) == 1.0
    # object 9 split in two halves: IoU 0.5 with each -> matched at 0.5 only
    seg = gt.copy()
    seg[10:18, 10:15] = 4
    np.testing.assert_allclose(average_precision(gt, seg, [0.5, 0.55]), [2 / 3, 1 / 4])
    with pytest.raises(ValueError, match="same shape"):
        ap50(gt, gt[:10])
    with pytest.raises(ValueError, match="integer"):
        ap50(gt.astype(float), gt)
    with pytest.raises(ValueError, match="thresholds"):
        average_precision(gt, gt, [0.0])


def test_instance_metric_per_image_matches_segmentation_scores():
    import torch

    from spoco_bundle.metrics import InstanceMetric, segmentation_scores

    gt = np.zeros((2, 1, 32, 32), np.int64)
    gt[0, 0, 2:10, 2:10], gt[0, 0, 12:20, 12:20], gt[1, 0, 5:25, 5:15] = 1, 2, 1
    seg = gt.copy()
    seg[0, 0, 12:20, 12:17] = 0  # most of an object lost: IoU 3/8 < 0.5
    seg[1, 0, 0:3, 0:3] = 7  # a false positive
    gt[1, 0, 28:, 28:] = -1  # annotated background counts as background
    metric = InstanceMetric("ap50")
    values = metric(torch.as_tensor(seg), torch.as_tensor(gt))
    expected = [segmentation_scores(np.clip(g[0], 0, None), s[0])["ap50"] for g, s in zip(gt, seg)]
    np.testing.assert_allclose(values.numpy().ravel(), expected)
    assert values.shape == (2, 1) and expected[0] < 1 and expected[1] < 1
    assert float(metric.aggregate()) == pytest.approx(np.mean(expected))
    with pytest.raises(ValueError, match="Unknown metric"):
        InstanceMetric("dice")


def test_metric_handlers_name_one_instance_metric_per_score():
    from spoco_bundle.metrics import InstanceMetric, metric_handlers

    handlers = metric_handlers(["ap50", "sbd"])
    assert list(handlers) == ["val_ap50", "val_sbd"]
    assert list(metric_handlers(["map"], prefix="")) == ["map"]
    for name, handler in handlers.items():
        assert isinstance(handler.metric_fn, InstanceMetric) and handler.metric_fn.name == name[len("val_") :]
        assert handler.save_details  # per-image values for MetricsSaver
        # what the evaluator's output holds under pred and label, for every image
        output = [{"pred": np.ones((1, 4, 4)), "label": np.zeros((1, 4, 4))}] * 2
        pred, label = handler._output_transform(output)
        assert len(pred) == len(label) == 2
    with pytest.raises(ValueError, match="Unknown metric"):
        metric_handlers(["dice"])
