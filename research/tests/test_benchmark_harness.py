"""Tests of the accuracy benchmark's harness (the ``research`` package) on the real data of
``SPOCO_DATA_DIR`` (default: the repository's ``../shared/data``); skipped when the data is missing."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose
from scipy import ndimage

from research.accuracy import parse_args
from research.chain import ClusterEmbeddings
from research.data import (
    GONUCLEAR2D_STEP,
    Item,
    MethodUnavailable,
    Split,
    dataset_available,
    default_data_dir,
    device_error,
    kept_ids,
    load_benchmark,
    score,
    sparsify,
)
from research.foreground import foreground_breakdown, object_errors
from research.foreground import parse_args as foreground_args
from research.methods import classical, membrane
from research.methods import spoco as spoco_runner
from research.methods.spoco import bundle_ids, inference_clustering, study_overrides
from research.records import (
    collect,
    collect_foreground,
    collect_scale,
    is_cached,
    load_record,
    machine_info,
    reference_throughput,
    reference_words,
)
from research.report import _grid_budget, _protocol_lines, _study_overrides, figures_dir, write_docs
from research.runner import method_unavailable_reason, repredict_one, rescore_one, run_one
from research.scale import rescale
from research.settings import RunSettings, run_timeout
from spoco_bundle.io import read_image
from spoco_bundle.metrics import adapted_rand_error
from spoco_bundle.transforms import SparseInstanceLabeld, load_transforms

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = default_data_dir()


def _need(name: str) -> None:
    if not dataset_available(name, DATA_DIR):
        pytest.skip(f"{name} not found under {DATA_DIR}")


@pytest.fixture(scope="module")
def dsb_small() -> Split:
    _need("dsb2018")
    return load_benchmark("dsb2018", DATA_DIR, max_train=6, max_test=4)[0]


@pytest.fixture(scope="module")
def gonuclear() -> list[Split]:
    _need("gonuclear")
    return load_benchmark("gonuclear", DATA_DIR)


def test_relative_data_dir_gives_paths_valid_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the SPOCO runs list the paths in a dataset.json inside their work folder, which the bundle resolves there
    _need("dsb2018")
    monkeypatch.chdir(DATA_DIR.parent)
    split = load_benchmark("dsb2018", DATA_DIR.name, max_train=2, max_test=1)[0]
    monkeypatch.chdir(tmp_path)
    for item in split.train + split.test:
        assert Path(item.path).is_absolute() and Path(item.path).is_file()
        assert Path(item.label_path).is_file()


def _pipeline_labels(item: Item, ratio: float, seed: int, spatial_dims: int) -> np.ndarray:
    """What the SPOCO training config's transforms give for this file pair (loading + SparseInstanceLabeld)."""
    pipeline = Compose(
        load_transforms(("image", "label"), spatial_dims=spatial_dims)
        + [SparseInstanceLabeld("label", instance_ratio=ratio, background_label=None, seed=seed)]
    )
    out = pipeline({"image": item.path, "label": item.label_path})
    return np.asarray(out["label"])[0]


@pytest.mark.parametrize("ratio", [0.1, 0.4])
def test_sparsify_keeps_what_the_training_pipeline_keeps(
    dsb_small: Split, gonuclear: list[Split], ratio: float
) -> None:
    cases = [(it, 2) for it in dsb_small.train[:3]] + [(s.train[0], 3) for s in gonuclear]  # TIFF 2D, NIfTI, TIFF 3D
    for item, dims in cases:
        ours = sparsify(item, ratio, seed=0)
        theirs = _pipeline_labels(item, ratio, seed=0, spatial_dims=dims)
        np.testing.assert_array_equal(ours, theirs, err_msg=item.path)
        # the kept objects are real objects of the dense map, round(ratio * n) of them, renumbered 1..K
        ids = kept_ids(item, ratio, seed=0)
        n = len(np.unique(item.labels)) - 1
        assert len(ids) == max(1, int(np.floor(ratio * n + 0.5))) == ours.max()
        np.testing.assert_array_equal(ours > 0, np.isin(item.labels, ids))
    # the 3D case of the issue: 5 of the 54 nuclei of 1135 at 10 %
    assert len(kept_ids(gonuclear[0].train[0], 0.1, 0)) == 5 and gonuclear[0].train[0].name == "1135_image"
    # another seed keeps other objects (the selection is not a fixed prefix of the ids)
    item = dsb_small.train[0]
    assert not np.array_equal(kept_ids(item, 0.4, 0), kept_ids(item, 0.4, 1))


def _perturb(gt: np.ndarray, seed: int) -> np.ndarray:
    """A plausible prediction: shifted, eroded/dilated objects, a dropped and a merged pair, a spurious blob."""
    rng = np.random.default_rng(seed)
    seg = np.roll(gt, shift=tuple(rng.integers(-2, 3, size=2)), axis=(0, 1)).astype(np.int64)
    ids = np.unique(seg)[1:]
    for i in ids[: len(ids) // 4]:
        seg[seg == i] = 0  # dropped
    if len(ids) > 6:
        seg[seg == ids[-1]] = ids[-2]  # merged
    grown = ndimage.grey_dilation(seg, size=3)
    seg = np.where((seg == 0) & (rng.random(seg.shape) < 0.5), grown, seg)
    seg[:6, :6] = seg.max() + 1  # spurious
    return seg


def test_score_pools_like_stardist_matching_dataset(dsb_small: Split) -> None:
    matching = pytest.importorskip("stardist.matching")
    gts = [it.labels for it in dsb_small.train[:4]]
    preds = [_perturb(g, k) for k, g in enumerate(gts)]
    ours = score(preds, gts, spatial_dims=2)
    for t in (0.5, 0.75, 0.9):
        ref = matching.matching_dataset(gts, preds, thresh=t, by_image=False, show_progress=False)
        assert ours["ap_by_threshold"][f"{t:.2f}"] == pytest.approx(ref.accuracy, abs=1e-12)
        if t == 0.5:
            assert (ours["tp50"], ours["fp50"], ours["fn50"]) == (ref.tp, ref.fp, ref.fn)
            assert ours["ap50"] == pytest.approx(ref.accuracy, abs=1e-12)
    per_image = [matching.matching(g, p, thresh=0.5).accuracy for g, p in zip(gts, preds)]
    assert ours["ap50_per_image"] == pytest.approx(np.mean(per_image), abs=1e-12)
    assert 0.2 < ours["ap50"] < 0.95  # the perturbation leaves a partial match: the test can fail either way
    assert ours["n_gt"] == sum(len(np.unique(g)) - 1 for g in gts)


def test_classical_segments_2d_and_3d(dsb_small: Split, gonuclear: list[Split]) -> None:
    item = dsb_small.test[0]
    seg = classical.segment(item.image)
    assert seg.dtype == np.int32 and seg.shape == item.image.shape
    ids = np.unique(seg)
    np.testing.assert_array_equal(ids, np.arange(len(ids)))  # 0 plus consecutive ids
    assert score([seg], [item.labels], 2)["ap50"] > 0.4
    vol = gonuclear[0].test[0]  # 1136, anisotropic spacing
    crop = (slice(30, 70), slice(0, 64), slice(0, 64))
    seg3 = classical.segment(vol.image[crop], vol.spacing)
    assert seg3.dtype == np.int32 and seg3.shape == (40, 64, 64) and 1 <= seg3.max() <= 40
    assert classical.estimate_radius(vol.image, vol.spacing) == pytest.approx(12.0, rel=0.5)  # ~12 px nuclei


def _tiny_split(dsb_small: Split, size: int) -> tuple[Split, list[Item]]:
    """A split of one training and one test image of ``dsb_small``, cropped to ``size`` x ``size``."""
    crop = (slice(0, size), slice(0, size))
    tiny = [
        Item(it.name, it.image[crop], it.labels[crop], it.spacing, it.path, it.label_path)
        for it in (dsb_small.train[0], dsb_small.test[0])
    ]
    return Split("dsb2018", "tiny", 2, [tiny[0]], [tiny[1]]), tiny


def test_docs_from_cached_classical_runs(dsb_small: Split, tmp_path: Path) -> None:
    split, tiny = _tiny_split(dsb_small, 128)
    settings = RunSettings(
        budget_s=60.0, clock="wall", threads=1, max_train=1, max_test=1, out_dir=str(tmp_path / "runs")
    )
    for ratio in (0.1, 1.0):
        rec = run_one(split, "classical", ratio, settings)
        assert rec["status"] == "ok", rec.get("reason")
        # the record carries every setting of the run, and the cache keys at the top level as before
        stored = load_record(tmp_path / "runs" / "dsb2018" / "tiny" / "classical" / f"ratio_{ratio:.2f}.json")
        assert stored["settings"] == settings.as_record() == rec["settings"]
        assert stored["settings"]["out_dir"] == str(tmp_path / "runs") and stored["settings"]["overrides"] == {}
        assert rec["budget_s"] == 60.0 and rec["clock"] == "wall" and rec["threads"] == 1
        shorter = RunSettings(budget_s=30.0, clock="wall", threads=1, max_train=1, max_test=1)
        assert is_cached(stored, settings) and not is_cached(stored, shorter)
        with np.load(tmp_path / "runs" / "dsb2018" / "tiny" / "classical" / f"ratio_{ratio:.2f}.npz") as data:
            pred = data[tiny[1].name]
        assert score([pred], [tiny[1].labels], 2)["ap50"] == pytest.approx(rec["metrics"]["ap50"])
    # scale-robustness records: shown only for the checkpoint of the cached run, a stale one is left out
    path = tmp_path / "runs" / "dsb2018" / "tiny" / "classical" / "ratio_0.10.json"
    rec = json.loads(path.read_text())
    rec["info"]["work_dir"] = "/runs/current"
    path.write_text(json.dumps(rec))
    for work, ap in (("/runs/current", 0.625), ("/runs/older", 0.875)):
        scale = {"dataset": "dsb2018", "split": "tiny", "method": "classical", "ratio": 0.1, "n_test": 1}
        scale.update(checkpoint_run=work, rows=[{"scale": 0.5, "ap50": ap, "map": 0.25, "sbd": 0.5}])
        scale["rows"][0]["matched"] = {"image_scale": 2.0, "ap50": 0.75, "map": 0.5, "sbd": 0.75}
        scale["rows"][0]["auto"] = {"found_median": 1.8125, "ap50": 0.7, "map": 0.5, "sbd": 0.75}
        scale["rows"][0]["auto"].update(rule="halfway", commit="abc1234", auto_only=False)  # segmented with the rest
        scale["rows"].append({"scale": 1.0, "ap50": 0.8, "map": 0.5, "sbd": 0.75})
        scale["blob_scales_source"] = "computed"
        (path.parent / f"scale_ratio_0.10{work[-3:]}.json").write_text(json.dumps(scale))
        fg = dict(scale, pixel={"precision": 0.61, "recall": 0.97, "area_ratio": 1.6})
        fg.update(masks=[{"mask": "truth", "description": "truth (oracle)", "ap50": ap, "map": 0.5, "sbd": 0.75}])
        fg.update(thresholds=[{"threshold": 0.5, "ap50": ap / 2, "map": 0.125}])
        fates = {"n_gt": 9, "matched": 5, "missed": 1, "merged": 2, "other": 1, "merged_touching_share": 0.5}
        fg["objects"] = [{"mask": "head", "description": "head", "merged_distance_median": 1.25, **fates}]
        fg["clusterings"] = [{"method": m, "ap50": v, "map": 0.25, "sbd": 0.5} for m, v in (("fast", ap), ("ws", 0.7))]
        fg["shape_split"] = [
            {"mask": "truth", "method": "components + shape_split 0.1", "ap50": ap, "map": 0.5, "sbd": 1}
        ]
        (path.parent / f"foreground_ratio_0.10{work[-3:]}.json").write_text(json.dumps(fg))
    records = collect(tmp_path / "runs")
    assert len(records) == 2
    doc = write_docs(
        records,
        tmp_path / "docs" / "benchmarks.md",
        {"dsb2018": [split]},
        ["classical", "stardist"],
        [0.1, 1.0],
        "python -m research.accuracy --test",
        "data",
        scale_records=collect_scale(tmp_path / "runs"),
        foreground_records=collect_foreground(tmp_path / "runs"),
    )
    text = doc.read_text()
    assert "| 0.5 | 0.625 | 0.250 | 0.500 | 0.750 (2) | 0.700 (1.812) |" in text and "0.875" not in text
    assert "| 1 | 0.800 | 0.500 | 0.750 | (same) | - |" in text and "matching `--image_scale 1/factor`" in text
    assert "`--image_scale auto`" in text and "computed from the run's training images" in text
    assert "`auto` column: rule `halfway` at commit abc1234.\n" in text and "only that column" not in text
    assert "| truth (oracle) | 0.625 | 0.500 | 0.750 |" in text and "| 0.5 | 0.312 | 0.125 |" in text
    assert "precision 0.61, recall 0.97, predicted / true area 1.60" in text and "0.438" not in text
    assert "| head | 9 | 5 | 1 | 2 | 1 | 1.25 | 0.50 |" in text
    assert "| fast | 0.625 | 0.250 | 0.500 |\n| ws | 0.700 | 0.250 | 0.500 |" in text
    assert "| truth (oracle) | connected components + shape_split 0.1 | 0.625 | 0.500 | 1.000 |" in text
    # the command that reruns the grid states the grid and the budget of the runs shown
    grid = "--ratios 0.1,1 \\\n    --methods classical,stardist --budget_s 60 --clock wall --threads 1\n"
    assert "-m research.accuracy --datasets dsb2018 " + grid in text
    rec = json.loads((tmp_path / "runs" / "dsb2018" / "tiny" / "classical" / "ratio_0.10.json").read_text())
    row = next(line for line in text.splitlines() if line.startswith("| classical") and "| 10% |" in line)
    assert f"| {rec['metrics']['ap50']:.3f} | {rec['metrics']['map']:.3f} | {rec['metrics']['sbd']:.3f} |" in row
    commit = rec["commit"] or "-"
    assert "| 60 s wall, 1 thr |" in row and row.endswith(
        f"| {commit[:7]}{'+dirty' if commit.endswith('+dirty') else ''} |"
    )
    assert "dsb2018 stardist (10%, 100%): never run" in text  # missing runs are listed, not silently dropped
    assert "check runs on a subset" in text
    for png in ("benchmark_dsb2018.png", "benchmark_dsb2018_examples.png"):
        assert (tmp_path / "docs" / "images" / png).stat().st_size > 10_000
    assert os.path.basename(str(doc)) == "benchmarks.md" and torch.__version__ in text
    # its machine-readable twin (what scripts/sync_docs.py builds the README's results table from)
    summary = json.loads((tmp_path / "docs" / "benchmarks.json").read_text())
    assert summary["command"] == "python -m research.accuracy --test"
    assert [(r["method"], r["ratio"]) for r in summary["rows"]] == [("classical", 0.1), ("classical", 1.0)]
    assert summary["rows"][0]["ap50"] == rec["metrics"]["ap50"] and summary["rows"][0]["status"] == "ok"
    assert summary["rows"][0]["budget_s"] == 60.0 and summary["rows"][0]["clock"] == "wall"
    assert list(summary["rows"][0]) == sorted(summary["rows"][0])  # sorted keys: a rewrite is the same file
    # a second report (e.g. benchmarks_long.md) gets its own plots and leaves these alone
    before = (tmp_path / "docs" / "images" / "benchmark_dsb2018.png").read_bytes()
    long_doc = write_docs(
        records,
        tmp_path / "docs" / "benchmarks_long.md",
        {"dsb2018": [split]},
        ["classical"],
        [1.0],
        "python -m research.accuracy --test",
        "data",
    )
    assert "images/benchmarks_long_dsb2018.png" in long_doc.read_text()
    assert (tmp_path / "docs" / "images" / "benchmarks_long_dsb2018.png").is_file()
    assert (tmp_path / "docs" / "images" / "benchmark_dsb2018.png").read_bytes() == before
    # its summary holds the runs of its own grid only
    long_summary = json.loads((tmp_path / "docs" / "benchmarks_long.json").read_text())
    assert [(r["method"], r["ratio"]) for r in long_summary["rows"]] == [("classical", 1.0)]


def test_pages_are_written_to_research_pages_and_their_plots_to_research_figures(tmp_path: Path) -> None:
    # a page in research/pages/ puts its PNGs in research/figures/; any other folder keeps an images/ beside the page
    assert figures_dir(tmp_path / "research" / "pages" / "benchmarks_x.md") == tmp_path / "research" / "figures"
    assert figures_dir(tmp_path / "docs" / "x.md") == tmp_path / "docs" / "images"
    assert Path(parse_args([]).docs) == ROOT / "research" / "pages" / "benchmarks.md"


@pytest.mark.benchmark
def test_repredict_reuses_the_checkpoint_and_keeps_the_earlier_scores(dsb_small: Split, tmp_path: Path) -> None:
    # a real (very short) SPOCO run through the bundle's CLI, then its checkpoint segments the test images again
    split = Split("dsb2018", "tiny", 2, dsb_small.train[:2], dsb_small.test[:2])
    rec = run_one(split, "spoco", 1.0, RunSettings(budget_s=4.0, out_dir=str(tmp_path / "runs")))
    assert rec["status"] == "ok", rec.get("reason")
    default = inference_clustering()  # the configs' post-processing, e.g. "watershed + shape_split 0.1"
    assert rec["info"]["clustering"] == default and default.startswith(
        json.loads((ROOT / "configs" / "inference.json").read_text())["clustering"]
    )
    path = tmp_path / "runs" / "dsb2018" / "tiny" / "spoco" / "ratio_1.00.json"
    # the same post-processing again: the same model and settings give the same scores
    same = repredict_one(path, split, threads=2)
    assert same["metrics"] == rec["metrics"] and same["earlier_predictions"][0]["metrics"] == rec["metrics"]
    again = repredict_one(path, split, threads=2, overrides={"clustering": "fast", "shape_split": 0})
    assert again["clustering"] == "fast" and again["inference_overrides"] == {"clustering": "fast", "shape_split": 0}
    assert [e["clustering"] for e in again["earlier_predictions"]] == [default] * 2
    assert again["iterations"] == rec["iterations"] and again["commit"] == rec["commit"]  # training untouched
    with np.load(path.with_suffix(".npz")) as data:  # the stored predictions are the new ones
        preds = [data[it.name] for it in split.test]
    rescored = score(preds, [it.labels for it in split.test], 2)
    assert {k: rescored[k] for k in ("ap50", "map", "sbd", "tp50")} == pytest.approx(
        {k: again["metrics"][k] for k in ("ap50", "map", "sbd", "tp50")}
    )
    # a foreground-mask-given run repredicts inside its masks (the head would give other labels)
    masked = run_one(split, "spoco_mask", 1.0, RunSettings(budget_s=4.0, out_dir=str(tmp_path / "runs")))
    assert masked["status"] == "ok", masked.get("reason")
    mask_path = tmp_path / "runs" / "dsb2018" / "tiny" / "spoco_mask" / "ratio_1.00.json"
    assert repredict_one(mask_path, split, threads=2)["metrics"] == masked["metrics"]
    # without the checkpoint nothing is changed
    (Path(rec["info"]["work_dir"]) / "models" / "model.pt").unlink()
    assert repredict_one(path, split) is None
    assert json.loads(path.read_text())["clustering"] == "fast"


def test_inference_clustering_names_the_boundary_merge() -> None:
    """Records and tables name the post-processing a prediction used: the boundary clustering's merging of weak
    contacts (configs' ``boundary_merge``) where it is on; the other methods have no such step."""
    merge = json.loads((ROOT / "configs" / "inference.json").read_text())["boundary_merge"]
    assert inference_clustering({"clustering": "boundary", "shape_split": 0}) == f"boundary + merge {merge:g}"
    assert inference_clustering({"clustering": "boundary", "shape_split": 0, "boundary_merge": 0}) == "boundary"
    median = {"clustering": "boundary", "shape_split": 0, "boundary_merge": 0, "boundary_threshold": "median"}
    assert inference_clustering(median) == "boundary + threshold median"
    assert inference_clustering({"clustering": "watershed", "shape_split": 0.1}) == "watershed + shape_split 0.1"


def test_run_timeout_has_no_wall_limit_on_the_cpu_clock() -> None:
    # On the cpu clock wall time depends on the machine's load, so a fixed limit would kill finished runs.
    assert run_timeout(900, "wall") == 3 * 900 + 1800
    assert run_timeout(900, "cpu") is None
    assert run_timeout(900, "cpu", timeout_s=60) == 60
    assert run_timeout(900, "wall", timeout_s=0) is None


def test_settings_travel_as_flags_and_old_records_stay_cached(tmp_path: Path) -> None:
    # what a run's own process gets: the parent's settings, back through the same command line
    args = ["--budget_s", "900", "--clock", "cpu", "--threads", "1", "--overrides", '{"learning_rate": 0.005}']
    args += ["--timeout_s", "0", "--data_dir", str(DATA_DIR), "--out_dir", str(tmp_path / "runs")]
    args += ["--cache_dir", "cache", "--stardist_python", "/opt/sd/bin/python", "--max_train", "3"]
    settings = RunSettings.from_args(parse_args(args))
    assert settings.overrides == {"learning_rate": 0.005} and settings.timeout_s == 0 and settings.clock == "cpu"
    assert settings.cache_dir == str(Path("cache").resolve()) and settings.stardist_python == "/opt/sd/bin/python"
    assert RunSettings.from_args(parse_args(settings.to_args())) == settings
    assert json.loads(json.dumps(settings.as_record())) == settings.as_record()  # as a record keeps it
    # a record written before the settings were recorded in full (top-level fields only, overrides as the text of
    # the environment variable that set them then) still loads and is a cache hit
    old = {"dataset": "dsb2018", "split": "tiny", "method": "spoco", "ratio": 0.1, "status": "ok", "budget_s": 900.0}
    old.update(clock="cpu", threads=1, seed=0, device="cpu", max_train=3, max_test=None)
    old.update(overrides='{"learning_rate":0.005}', metrics={"ap50": 0.5}, machine={}, commit="0123456")
    path = tmp_path / "runs" / "dsb2018" / "tiny" / "spoco" / "ratio_0.10.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(old, indent=1))
    loaded = load_record(path)
    assert "settings" not in loaded and is_cached(loaded, settings)
    assert [r["method"] for r in collect(tmp_path / "runs")] == ["spoco"]
    assert not is_cached(loaded, replace(settings, budget_s=600.0)) and not is_cached(loaded, replace(settings, seed=1))
    assert not is_cached(loaded, replace(settings, overrides={}))
    assert is_cached({**loaded, "method": "classical"}, replace(settings, overrides={}))  # a SPOCO run's identity only
    for bad in ('{"a"', "[1, 2]"):
        with pytest.raises(SystemExit):
            parse_args(["--overrides", bad])
    with pytest.raises(ValueError, match="clock"):
        RunSettings(clock="gpu")


def test_stardist_interpreter_is_a_setting(tmp_path: Path) -> None:
    # the parent checks the interpreter the runs will use, not the default one
    missing = RunSettings(stardist_python=str(tmp_path / "none" / "python"))
    assert "none/python not found" in method_unavailable_reason("stardist", missing)
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    assert method_unavailable_reason("stardist", RunSettings(stardist_python=str(python))) is None


def test_rescale_resamples_images_linearly_and_labels_nearest() -> None:
    labels = np.zeros((40, 60), np.int32)
    labels[10:20, 10:30] = 3
    labels[25:35, 40:50] = 7
    image = (labels > 0).astype(np.float32) + 0.25
    for factor in (0.5, 2.0):
        img, lab = rescale(image, labels, factor)
        assert img.shape == lab.shape == (round(40 * factor), round(60 * factor))
        assert set(np.unique(lab)) == {0, 3, 7}  # no interpolated ids
        assert (lab == 3).sum() == pytest.approx(200 * factor**2, rel=0.15)
        assert 0.25 <= img.min() and img.max() <= 1.25
    same = rescale(image, labels, 1.0)
    assert same[0] is image and same[1] is labels


def test_foreground_breakdown_separates_head_halos_from_embedding_errors() -> None:
    # three 10x10 objects with distinct embeddings; the head also fires on a 3-pixel halo (background embedding)
    labels = np.zeros((64, 64), np.int32)
    for k, (y, x) in enumerate(((8, 8), (8, 40), (40, 24)), start=1):
        labels[y : y + 10, x : x + 10] = k
    emb = np.zeros((16, 64, 64), np.float32)
    for k in (1, 2, 3):
        emb[k - 1][labels == k] = 4.0  # means 4 sqrt(2) apart: beyond the push margin 2 delta_d
    halo = ndimage.binary_dilation(labels > 0, iterations=3) & (labels == 0)
    logit = np.where(labels > 0, 5.0, np.where(halo, 1.0, -5.0)).astype(np.float32)  # halo: probability 0.73
    out = np.concatenate([emb, logit[None]])
    res = foreground_breakdown([out], [labels], 2, thresholds=(0.5, 0.8), clusterings=("fast", "watershed"))
    ap = {r["mask"]: r["ap50"] for r in res["masks"]}
    # each halo ring is its own cluster: 3 true + 3 false objects
    assert ap == {"head": 0.5, "head_and_truth": 1.0, "head_or_truth": 0.5, "truth": 1.0}
    assert {r["threshold"]: r["ap50"] for r in res["thresholds"]} == {0.5: 0.5, 0.8: 1.0}
    n_true, n_head = int((labels > 0).sum()), int((labels > 0).sum() + halo.sum())
    assert res["pixel"] == pytest.approx({"precision": n_true / n_head, "recall": 1.0, "area_ratio": n_head / n_true})
    # the watershed also keeps each halo ring apart from its object (a large embedding step): the same 3 + 3
    assert {r["method"]: r["ap50"] for r in res["clusterings"]} == {"fast": 0.5, "watershed": 0.5}
    # the default mask is clustered exactly as the bundle's post-processing does it
    bundle = ClusterEmbeddings(method="fast", embedding_dim=16, background="head", min_size=16)(torch.from_numpy(out))
    assert score([np.asarray(bundle)[0]], [labels], 2)["ap50"] == ap["head"]
    with pytest.raises(ValueError, match="does not match labels"):
        foreground_breakdown([out[:, :32]], [labels], 2)
    head_fates = next(r for r in res["objects"] if r["mask"] == "head")
    assert {k: head_fates[k] for k in ("n_gt", "matched", "missed", "merged", "other")} == {
        "n_gt": 3,
        "matched": 3,
        "missed": 0,
        "merged": 0,
        "other": 0,
    }
    assert head_fates["merged_distance_median"] is None


def test_foreground_breakdown_shape_split_rows() -> None:
    # three overlapping discs in a chain with one embedding: every clustering and the connected components give one
    # object (IoU about 1/3 with each true disc); the shape split gives the three true ones
    yy, xx = np.mgrid[:60, :120]
    labels = np.zeros((60, 120), np.int32)
    for k, cx in enumerate((30, 58, 86), start=1):
        labels[((yy - 30) ** 2 + (xx - cx) ** 2 <= 225) & (np.abs(xx - cx) <= 14)] = k  # cut at the necks
    fg = labels > 0
    out = np.concatenate([np.zeros((16, 60, 120), np.float32), np.where(fg, 5.0, -5.0)[None].astype(np.float32)])
    res = foreground_breakdown([out], [labels], 2, clusterings=("fast",), shape_split=0.1, spacings=[(1.0, 1.0)])
    ap = {(r["mask"], r["method"]): r["ap50"] for r in res["shape_split"]}
    for key in ("head", "truth"):
        assert ap[(key, "fast")] == 0.0 and ap[(key, "components")] == 0.0
        assert ap[(key, "fast + shape_split 0.1")] == 1.0 and ap[(key, "components + shape_split 0.1")] == 1.0
    assert foreground_breakdown([out], [labels], 2)["shape_split"] == []  # off by default
    with pytest.raises(ValueError, match="one spacing per image"):
        foreground_breakdown([out], [labels], 2, shape_split=0.1, spacings=[])


def test_object_errors_sorts_true_objects_by_fate() -> None:
    labels = np.zeros((40, 60), np.int32)
    pred = np.zeros_like(labels)
    emb = np.zeros((2, 40, 60), np.float32)
    labels[2:8, 2:8] = 1  # matched
    pred[2:8, 2:9] = 1
    labels[12:18, 2:8], labels[12:18, 8:14] = 2, 3  # touching pair, predicted as one object
    pred[12:18, 2:15] = 2  # one column wider: IoU 36 / 78 with either
    emb[0][labels == 2], emb[1][labels == 3] = 1.0, 2.0  # means sqrt(5) apart
    labels[24:34, 2:12] = 4  # 30 % predicted: missed
    pred[24:27, 2:12] = 3
    labels[24:34, 20:30] = 5  # cut in three: best piece IoU 0.4
    pred[24:27, 20:30], pred[27:30, 20:30], pred[30:34, 20:30] = 4, 5, 7
    labels[2:8, 30:36], labels[2:8, 38:44] = 6, 7  # two pixels apart, bridged by the prediction
    pred[2:8, 30:44] = 6
    res = object_errors(pred, labels, emb)
    assert {k: res[k] for k in ("n_gt", "matched", "missed", "merged", "other")} == {
        "n_gt": 7,
        "matched": 1,
        "missed": 1,
        "merged": 4,
        "other": 1,
    }
    assert res["merged_distances"] == pytest.approx([np.sqrt(5), np.sqrt(5), 0.0, 0.0])  # pairs 2-3 and 6-7
    assert res["merged_touching"] == [True, True, False, False]
    assert res["matched"] == score([pred], [labels], 2)["tp50"]
    with pytest.raises(ValueError, match="prediction shape"):
        object_errors(pred[:, :10], labels)


def test_foreground_breakdown_checks_clusterings_before_running(capsys) -> None:
    assert foreground_args(["--clusterings", " fast, watershed "]).clusterings == ["fast", "watershed"]
    for bad in ("nope", "fast,consistency"):
        with pytest.raises(SystemExit):
            foreground_args(["--clusterings", bad])
        assert "--clusterings must be among ['fast', 'hdbscan', 'meanshift', 'watershed']" in capsys.readouterr().err


def test_inference_overrides_are_checked_when_parsed(capsys) -> None:
    assert parse_args(["--repredict", "--inference_overrides", '{"clustering": "fast"}']).inference_overrides == {
        "clustering": "fast"
    }
    for bad in ("{bad", "[1]"):
        with pytest.raises(SystemExit):
            parse_args(["--repredict", "--inference_overrides", bad])
        assert "--inference_overrides must be a JSON object" in capsys.readouterr().err


def test_grid_command_states_device_and_study_overrides() -> None:
    # a report of GPU runs, or of runs with --overrides, must say so in the command that reruns them
    assert _grid_budget([(280.0, "wall", 2, "cuda")]) == "--budget_s 280 --clock wall --threads 2 --device cuda"
    assert _grid_budget([(900.0, "cpu", 1, "cpu")]) == "--budget_s 900 --clock cpu --threads 1"

    def record(method: str, **extra) -> dict:
        ids = {"spatial_dims": 2, "patch_size": [192, 192], "image_scale": 1.0, "seed": 0, "instance_ratio": 0.1}
        ids.update({"time_limit_s": 900, "loss#consistency_weight": 0.0}, **extra)
        return {"method": method, "info": {"overrides": ids}}

    assert study_overrides(record("spoco")) == {}
    assert study_overrides(record("spoco", num_workers=3, patch_size=[128, 128])) == {
        "num_workers": 3,
        "patch_size": [128, 128],
    }
    runs = [record("spoco", num_workers=3), record("spoco_no_instance", num_workers=3), {"method": "classical"}]
    assert _study_overrides(runs) == ('{"num_workers": 3}', None)
    assert _study_overrides(runs + [record("spoco")])[0] is None
    assert "different" in _study_overrides(runs + [record("spoco")])[1]
    assert _study_overrides([record("spoco"), {"method": "stardist"}]) == (None, None)


def test_device_is_checked_when_parsed(capsys) -> None:
    assert device_error("cpu") is None
    for bad in ("gpu", "mps", "cuda:x"):
        assert "must be cpu or cuda[:N]" in device_error(bad)
    if torch.cuda.is_available():
        assert device_error("cuda") is None
        assert "CUDA device(s)" in device_error(f"cuda:{torch.cuda.device_count()}")
        return
    # without a GPU both benchmark scripts stop at once with the reason, instead of failing every run later
    for parse in (parse_args, foreground_args):
        with pytest.raises(SystemExit):
            parse(["--device", "cuda"])
        assert "this machine has no CUDA device" in capsys.readouterr().err


def test_score_reports_the_foreground_pixel_precision_and_recall() -> None:
    gt = np.zeros((20, 20), np.int32)
    gt[2:8, 2:8] = 1  # 36 pixels
    gt[12:18, 12:18] = 2  # 36 pixels
    pred = np.zeros_like(gt)
    pred[2:8, 2:8] = 5  # one object found exactly
    pred[0:2, 0:9] = 6  # 18 pixels of false foreground; the second object is missed
    m = score([pred, gt], [gt, gt], 2)  # pooled over both images
    assert m["fg_precision"] == pytest.approx((36 + 72) / (54 + 72))
    assert m["fg_recall"] == pytest.approx((36 + 72) / (72 + 72))


def test_protocol_table_and_rescore(dsb_small: Split, tmp_path: Path) -> None:
    # cached records of the protocol methods (predictions stored as a run stores them), scored before the
    # foreground precision existed: --rescore adds it from the .npz, the summary table shows it with the targets
    split = Split("dsb2018", "tiny", 2, dsb_small.train[:1], dsb_small.test[:2])
    truth = [it.labels for it in split.test]
    half = [np.where(np.arange(t.shape[1])[None] < t.shape[1] // 2, t, 0) for t in truth]  # left halves only
    for method, preds in (("spoco", half), ("spoco_scribbles", truth)):
        path = tmp_path / "runs" / "dsb2018" / "tiny" / method / "ratio_0.10.json"
        path.parent.mkdir(parents=True)
        np.savez_compressed(path.with_suffix(".npz"), **{it.name: p for it, p in zip(split.test, preds)})
        metrics = {k: v for k, v in score(preds, truth, 2).items() if not k.startswith("fg_")}
        rec = {"dataset": "dsb2018", "split": "tiny", "method": method, "ratio": 0.1, "status": "ok"}
        rec.update(metrics=metrics, train_seconds=1.0, iterations=3, budget_s=1.0, machine={}, commit=None)
        path.write_text(json.dumps(rec))
    again = rescore_one(tmp_path / "runs" / "dsb2018" / "tiny" / "spoco" / "ratio_0.10.json", split)
    assert again["metrics"]["fg_precision"] == pytest.approx(1.0) and 0 < again["metrics"]["fg_recall"] < 1
    assert rescore_one(tmp_path / "runs" / "dsb2018" / "tiny" / "spoco_mask" / "ratio_0.10.json", split) is None
    rescore_one(tmp_path / "runs" / "dsb2018" / "tiny" / "spoco_scribbles" / "ratio_0.10.json", split)
    ok = {(r["dataset"], r["split"], r["method"], round(r["ratio"], 4)): r for r in collect(tmp_path / "runs")}
    text = "\n".join(_protocol_lines(ok, {"dsb2018": [split]}, ["spoco", "spoco_scribbles", "spoco_mask"]))
    recall = again["metrics"]["fg_recall"]
    assert f"| objects only | 10% | {again['metrics']['ap50']:.3f} (>= 0.80) | 1.00 / {recall:.2f} |" in text
    assert "| objects + background scribbles | 10% | 1.000 (>= 0.85, met) | 1.00 / 1.00 |" in text
    assert "| objects only, foreground mask given | 10% | not run (>= 0.90) | - |" in text
    assert "| all objects labelled | 100% | not run (>= 0.80) | - |" in text
    assert _protocol_lines(ok, {"dsb2018": [split]}, ["spoco", "classical"]) == []  # no protocol in the grid


@pytest.mark.benchmark
def test_mask_protocol_reuses_the_objects_only_checkpoint(dsb_small: Split, tmp_path: Path) -> None:
    # spoco_mask trains nothing: the finished spoco run's model segments the test images inside their true
    # foreground, given as one mask file per image through the bundle's --foreground_mask_dir
    split = Split("dsb2018", "tiny", 2, dsb_small.train[:2], dsb_small.test[:2])
    settings = RunSettings(budget_s=4.0, out_dir=str(tmp_path / "runs"))
    missing = run_one(split, "spoco_mask", 0.5, settings)
    assert missing["status"] == "failed" and "run it first" in missing["reason"]
    rec = run_one(split, "spoco", 0.5, settings)
    assert rec["status"] == "ok", rec.get("reason")
    masked = run_one(split, "spoco_mask", 0.5, settings)
    assert masked["status"] == "ok", masked.get("reason")
    assert masked["iterations"] == rec["iterations"] and masked["info"]["derived_from"].endswith("ratio_0.50.json")
    with np.load(tmp_path / "runs" / "dsb2018" / "tiny" / "spoco_mask" / "ratio_0.50.npz") as data:
        preds = [data[it.name] for it in split.test]
    for pred, item in zip(preds, split.test):
        assert not np.any((pred > 0) & (item.labels == 0))  # nothing outside the given foreground
    assert masked["metrics"]["fg_precision"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "name, n_train, n_test, shape", [("usiigaci", 16, 4, (1022, 1024)), ("isbi2012", 16, 4, (512, 512))]
)
def test_the_2d_sets_beyond_nuclei_load_as_dsb2018(name: str, n_train: int, n_test: int, shape: tuple) -> None:
    _need(name)
    (split,) = load_benchmark(name, DATA_DIR)
    assert (split.spatial_dims, len(split.train), len(split.test)) == (2, n_train, n_test)
    assert split.test[0].image.shape == split.test[0].labels.shape == shape
    assert {it.name for it in split.train}.isdisjoint(it.name for it in split.test)


def test_plant3d_is_split_at_x100_into_files_of_its_own(tmp_path: Path) -> None:
    _need("plant3d")
    (split,) = load_benchmark("plant3d", DATA_DIR, cache_dir=tmp_path)
    train, test = split.train[0], split.test[0]
    assert train.image.shape == (64, 200, 100) and test.image.shape == (64, 200, 100)
    whole = load_benchmark("plant3d", DATA_DIR, cache_dir=tmp_path / "again")[0]  # written again, same content
    np.testing.assert_array_equal(whole.train[0].labels, train.labels)
    assert Path(train.label_path).parent == tmp_path / "plant3d" and (train.labels > 0).all()  # no background
    # the SPOCO runs on it ignore the foreground head: every voxel belongs to a cell
    assert bundle_ids(split, "cpu")["background"] == "none"


def test_gonuclear2d_slices_are_files_that_match_their_volume(tmp_path: Path) -> None:
    _need("gonuclear")
    a, b = load_benchmark("gonuclear2d", DATA_DIR, cache_dir=tmp_path)
    assert (a.name, b.name, a.spatial_dims) == ("1135to1136", "1136to1135", 2)
    assert len(a.train) == len(a.test) == 100 // GONUCLEAR2D_STEP
    assert [i.path for i in a.train] == [i.path for i in b.test]  # the same files serve both directions
    volume = {v: read_image(next(Path(DATA_DIR, "gonuclear").glob(f"{v}_labels.*")))[0] for v in ("1135", "1136")}
    for item in a.train + a.test:
        vol, z = item.name.split("_z")[0], int(item.name.split("_z")[1].split("_")[0])
        np.testing.assert_array_equal(item.labels, np.asarray(volume[vol])[z])
        assert Path(item.path).parent == tmp_path / "gonuclear2d" and item.spacing == pytest.approx((0.127,) * 2, 0.01)
    # the shipped 2D model runs on it as it is; the 3D GoNuclear volumes have no 2D model
    with pytest.raises(MethodUnavailable, match="2D"):
        spoco_runner.fit_predict(load_benchmark("gonuclear", DATA_DIR)[0], 0.1, RunSettings(), variant="shipped")


def test_isbi2012_partition_scores_leave_out_the_membrane() -> None:
    gt = np.zeros((20, 20), np.int32)
    gt[:, :9], gt[:, 11:] = 1, 2  # two cells, a 2-pixel membrane between them
    cells = np.where(np.arange(20)[None, :] < 10, 1, 2) * np.ones((20, 1), np.int32)  # membrane given to the cells
    isbi = score([cells], [gt], 2, dataset="isbi2012")
    assert isbi["arand"] == pytest.approx(0.0) and isbi["ap50"] == 1.0
    assert "arand" not in score([cells], [gt], 2, dataset="dsb2018")  # nuclei: AP only, as before
    assert adapted_rand_error(gt, cells) > 0.05  # the 3D sets' convention (0 one more segment) would count it


def _tissue(rng: np.random.Generator, shape: tuple[int, int] = (96, 96), n: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi cells with bright 2-pixel walls: (image, labels of the cell interiors)."""
    seeds = rng.uniform(0, shape[0], size=(n, 2))
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d = np.sort(((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2) ** 0.5, axis=-1)
    owner = np.argmin(((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2), axis=-1) + 1
    wall = (d[..., 1] - d[..., 0]) < 2.0
    image = np.where(wall, 200.0, 60.0) + rng.normal(0, 10, shape)
    return image.astype(np.float32), np.where(wall, 0, owner).astype(np.int32)


def test_membrane_baseline_follows_walls_of_either_polarity() -> None:
    rng = np.random.default_rng(0)
    image, labels = _tissue(rng)
    bright = membrane.segment(image, polarity="bright", drop_boundary=True)
    assert bright.dtype == np.int32 and score([bright], [labels], 2)["ap50"] > 0.7
    dark = membrane.segment(255.0 - image, polarity="dark", drop_boundary=True)  # EM: dark membranes
    assert score([dark], [labels], 2)["ap50"] > 0.7
    wrong = membrane.segment(image, polarity="dark", drop_boundary=True)
    assert score([wrong], [labels], 2)["ap50"] < 0.5


def test_membrane_baseline_chooses_its_polarity_on_the_training_images() -> None:
    rng = np.random.default_rng(1)
    items = []
    for i in range(3):
        image, labels = _tissue(rng)
        items.append(Item(f"t{i}", 255.0 - image, labels, None, f"t{i}.tif", f"t{i}_labels.tif"))
    split = Split("synthetic", "s", 2, items[:2], items[2:])
    result = membrane.fit_predict(split, 0.4, RunSettings(budget_s=600))
    assert result.info["params"]["polarity"] == "dark" and result.info["grid_complete"]
    assert score(result.predictions, [items[2].labels], 2)["ap50"] > 0.8


def test_stardist_peer_sees_the_image_scale_spoco_gets_and_answers_on_the_test_grid() -> None:
    from research.methods.stardist_peer import _rescale, _resize_labels

    labels = np.zeros((1022, 1023), np.int32)
    labels[100:300, 200:260] = 7
    small = _rescale(labels, 0.5, order=0)
    assert small.shape == (511, 512) and set(np.unique(small)) == {0, 7}  # nearest: no mixed ids
    back = _resize_labels(small, labels.shape)
    assert back.shape == labels.shape and (back == labels).mean() > 0.99
    assert _rescale(labels, 1.0, order=0) is labels


def test_learning_speed_screen_scores_on_training_images_it_did_not_train_on(tmp_path: Path) -> None:
    from research.learning_speed import _last_terms, tune_split

    items = [Item(f"t{i}", np.zeros((8, 8), np.float32), np.zeros((8, 8), np.int32), None, "", "") for i in range(5)]
    split = Split("dsb2018", "train5_val2", 2, items, [])
    tuned = tune_split(split, 2)
    assert [i.name for i in tuned.train] == ["t0", "t1", "t2"] and [i.name for i in tuned.test] == ["t3", "t4"]
    assert tuned.name != split.name  # its records never mix with the benchmark's
    for bad in (0, 5):
        with pytest.raises(ValueError, match="--tune"):
            tune_split(split, bad)
    # the loss-terms line as training logs it, learning rate appended
    log = tmp_path / "train.log"
    log.write_text(
        "x\rEpoch 1 loss terms: pull 2.5  push 3.7  total 21.6\n"
        "INFO - Epoch 15 loss terms: pull 0.4388  push 1.1746  foreground 0.1282  total 40.9  (lr 1.58e-05)\n"
    )
    assert _last_terms(log) == {"epoch": 15, "pull": 0.4388, "push": 1.1746, "foreground": 0.1282, "total": 40.9}
    assert _last_terms(tmp_path / "missing.log") == {}


def test_learning_speed_report_states_the_commands_of_its_runs() -> None:
    """The page's rerun lines name the recipes of each budget / fraction / seed that the tables show."""
    from research.learning_speed import _run_commands

    records = [
        {"recipe": "dense", "ratio": 1.0, "budget_s": 900.0, "seed": 0},
        {"recipe": "default", "ratio": 0.1, "budget_s": 900.0, "seed": 0},
        {"recipe": "scale0.5", "ratio": 0.1, "budget_s": 900.0, "seed": 0},
        {"recipe": "default", "ratio": 0.1, "budget_s": 1800.0, "seed": 1},
    ]
    lines = _run_commands(records, " --dataset usiigaci")
    assert lines == [
        ".venv/bin/python -m research.learning_speed --recipes default,scale0.5 --ratios 0.1 --budget_s 900 "
        "--jobs 2 --dataset usiigaci",
        ".venv/bin/python -m research.learning_speed --recipes dense --ratios 1 --budget_s 900 --jobs 2 "
        "--dataset usiigaci",
        ".venv/bin/python -m research.learning_speed --recipes default --ratios 0.1 --budget_s 1800 --jobs 2 "
        "--seed 1 --dataset usiigaci",
    ]


def test_learning_speed_report_states_the_settings_each_run_had() -> None:
    """The page names the benchmark settings its runs went on top of, and which runs had which where they differ
    (a data-set setting added after some runs); a record from before the field says so instead of guessing."""
    from research.learning_speed import _dataset_settings

    split = Split(name="tune", dataset="isbi2012", spatial_dims=2, train=[], test=[])
    old = {**spoco_runner.SETTINGS[2], "shape_split": 0.0}
    new = {**old, "foreground_surface": 1}
    same = [{"recipe": r, "seed": 0, "budget_s": 900.0, "benchmark_settings": new} for r in ("default", "surface2")]
    text = _dataset_settings(split, same)
    assert text.startswith("the benchmark's settings for isbi2012 (") and "`foreground_surface` 1" in text
    assert "differ" not in text
    mixed = [
        {"recipe": "default", "seed": 0, "budget_s": 900.0, "benchmark_settings": old},
        {"recipe": "default", "seed": 1, "budget_s": 1800.0, "benchmark_settings": new},
        {"recipe": "contact10", "seed": 0, "budget_s": 900.0},
    ]
    text = _dataset_settings(split, mixed)
    assert "differ between runs" in text
    assert "`shape_split` 0.0: default 900 s)" in text
    assert "`foreground_surface` 1: default (seed 1) 1800 s)" in text
    assert "(not recorded: contact10 900 s)" in text


def test_boundary_grid_scores_each_setting_on_the_same_outputs() -> None:
    """Two touching squares with a low-probability membrane between them: a grid setting whose seeds find both
    interiors partitions them exactly (ARAND 0); a high interior threshold finds no interior and merges them, and so
    does merging contacts weaker than the membrane."""
    from research.boundary_grid import grid

    truth = np.zeros((40, 60), np.int32)
    truth[:, :30], truth[:, 31:] = 1, 2
    fg = np.full(truth.shape, 0.9, np.float32)
    fg[:, 29:32] = 0.05  # the membrane (and the pixels either side)
    logit = np.log(fg / (1 - fg))
    out = np.concatenate([np.zeros((2, *truth.shape), np.float32), logit[None]])
    settings = [(0.5, 2.0, 0.0, 0.0), (0.95, 2.0, 0.0, 0.0), (0.5, 2.0, 0.0, 0.97)]
    result = grid([out], [truth], "isbi2012", 2, 2, 16, settings)
    assert result[(0.5, 2.0, 0.0, 0.0)]["arand"] == pytest.approx(0.0, abs=1e-6)
    assert result[(0.95, 2.0, 0.0, 0.0)]["arand"] > 0.3
    assert result[(0.5, 2.0, 0.0, 0.97)]["arand"] > 0.3  # merging below the membrane's value joins the two
    assert set(result[(0.5, 2.0, 0.0, 0.0)]) == {"arand", "voi_split", "voi_merge", "ap50"}


def test_inference_ids_carry_a_studied_network_shape() -> None:
    from research.methods.spoco import run_ids

    ids = run_ids({"info": {"overrides": {"patch_size": [192, 192], "features": [8, 16, 32, 64], "seed": 0}}})
    assert ids == {"patch_size": [192, 192], "features": [8, 16, 32, 64]}


def test_study_table_sets_arms_side_by_side(dsb_small: Split, tmp_path: Path) -> None:
    from research import study_table

    split, _ = _tiny_split(dsb_small, 96)
    aps = {}
    for arm, seed in (("a", 0), ("b", 0), ("b", 1)):
        out = tmp_path / f"{arm}{seed}"
        settings = RunSettings(budget_s=60.0, clock="wall", threads=1, seed=seed, out_dir=str(out))
        rec = run_one(split, "classical", 0.1, settings)
        assert rec["status"] == "ok", rec.get("reason")
        aps.setdefault(arm, []).append(rec["metrics"]["ap50"])
    docs = tmp_path / "study.md"
    study_table.main(
        ["--arms", f"a={tmp_path / 'a0'}", "--arms", f"b={tmp_path / 'b0'},{tmp_path / 'b1'}"]
        + ["--docs", str(docs), "--note", "tiny"]
    )
    text = docs.read_text()
    runs = [line for line in text.splitlines() if line.startswith("| a |") or line.startswith("| b |")]
    assert len(runs) == 3 + 2 + 2  # a row per run, a mean per arm, then a mean per arm over the runs both have
    assert f"| b | dsb2018 | 10% | 2 | {np.mean(aps['b']):.3f} |" in text and "- tiny" in text
    shared = text.split("every arm has")[1]  # b's seed 1 has no twin in a
    assert f"| b | dsb2018 | 10% | 1 | {aps['b'][0]:.3f} |" in shared and "| a | dsb2018 | 10% | 1 |" in shared
    with pytest.raises(SystemExit, match="no finished run records"):
        study_table.main(["--arms", f"c={tmp_path / 'empty'}"])
    with pytest.raises(SystemExit, match="no finished runs of"):  # --datasets keeps only the data sets named
        study_table.main(["--arms", f"a={tmp_path / 'a0'}", "--datasets", "gonuclear"])
    kept = tmp_path / "kept.md"
    study_table.main(["--arms", f"a={tmp_path / 'a0'}", "--datasets", "gonuclear,dsb2018", "--docs", str(kept)])
    assert "| a | dsb2018 |" in kept.read_text() and "--datasets gonuclear,dsb2018" in kept.read_text()


def test_window_study_names_and_mosaics(tmp_path):
    """research.window: window names become inference.json ids of the right dimension, and a mosaic keeps every
    tile's objects as distinct ids at their place."""
    from types import SimpleNamespace

    import tifffile

    from research.window import mosaics, window_overrides

    off = {"test_time_flips": False, "min_diameter_ratio": 0}
    assert window_overrides("default", 2, [192, 192]) == off
    assert window_overrides("flips", 3, [32, 64, 64]) == dict(off, test_time_flips=True)
    assert window_overrides("size0.45", 2, [192, 192]) == dict(off, min_diameter_ratio=0.45)
    assert window_overrides("scale1.25", 2, [192, 192]) == dict(off, image_scale=1.25)
    with pytest.raises(ValueError, match="size0.45"):
        window_overrides("sizeable", 2, [192, 192])
    with pytest.raises(ValueError, match="unknown window 'grow0.4'"):  # foreground_grow was retired
        window_overrides("grow0.4", 2, [192, 192])
    with pytest.raises(ValueError, match="scale1.25"):
        window_overrides("scaled", 2, [192, 192])
    # the seed depth reaches the clustering step of the inference config as parsed
    from monai.bundle import ConfigParser

    seeded = window_overrides("seed0.5", 2, [192, 192])
    (key,) = set(seeded) - set(off)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT), "spatial_dims": 2, key: seeded[key]})
    step = parser.get_parsed_content(key.rsplit("#", 1)[0])
    assert type(step).__name__ == "ClusterInstancesd" and step.cluster.kwargs == {"h": 0.5}
    with pytest.raises(ValueError, match="seed0.5"):
        window_overrides("seedless", 2, [192, 192])
    # cluster_boundary has an h of its own: a seed window on a run clustered that way is an error, not a silent change
    from research.window import _score_windows

    with pytest.raises(ValueError, match="clusters with 'boundary'"):
        _score_windows(ROOT, None, [], ["seed0.5"], {"clustering": "boundary"}, [192, 192], tmp_path / "w.json", "k", 1)
    patch = window_overrides("patch", 3, [32, 64, 64])
    assert patch["sliding_window_inferer#roi_size"] == [32, 64, 64]
    assert patch["sliding_window_inferer#padding_mode"] == "constant" and patch["test_time_flips"] is False
    assert patch["min_diameter_ratio"] == 0
    assert window_overrides("320", 2, [192, 192])["sliding_window_inferer#roi_size"] == [320, 320]
    assert window_overrides("64x112x112", 3, [32, 64, 64])["sliding_window_inferer#roi_size"] == [64, 112, 112]
    assert window_overrides("320", 3, [32, 64, 64]) is None and window_overrides("8x8x8", 2, [192, 192]) is None
    rng = np.random.default_rng(0)
    tiles = []
    for i in range(5):
        lab = np.zeros((8, 10), np.int32)
        lab[1:3, 1:3], lab[5:7, 4:9] = 1, 2
        tiles.append(SimpleNamespace(image=rng.random((8, 10)).astype(np.float32) + i, labels=lab))
    out = mosaics(tiles, 2, tmp_path)
    assert len(out) == 1  # 5 tiles make one 2 x 2 mosaic, the rest is left out
    m = out[0]
    assert m.labels.shape == (16, 20) and len(np.unique(m.labels)) - 1 == 8
    assert np.array_equal(tifffile.imread(m.path)[8:, 10:], tiles[3].image)
    assert np.array_equal(m.labels[8:, 10:] > 0, tiles[3].labels > 0) and m.labels[8:, 10:].max() == 8
    assert mosaics(tiles, 1, tmp_path) is tiles


def test_learning_speed_split_refuses_another_splits_record(tmp_path, gonuclear):
    # records are named without the split: a run of 1135's halves in the out_dir must not pass for one of 1136's
    # (neither for a screen nor for the threshold study of its models)
    import subprocess
    import sys

    from research.learning_speed import record_path

    path = record_path(tmp_path, "gonuclear", "default", 0.1, 900)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"split": "tune_1135to1136_halves"}))
    base = [sys.executable, "-m", "research.learning_speed", "--dataset", "gonuclear", "--tune", "1", "--recipes"]
    base += ["default", "--budget_s", "900", "--no_run", "--out_dir", str(tmp_path), "--data_dir", str(DATA_DIR)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # the threshold study of a screen's models reads the same records
    study = [sys.executable, "-m", "research.pu_threshold", "--dataset", "gonuclear", "--tune", "1", "--recipes"]
    study += ["default", "--budget_s", "900", "--out_dir", str(tmp_path), "--data_dir", str(DATA_DIR)]
    for cmd in (base, study):
        for split, message in (("1136to1135", "is a run on tune_1135to1136_halves"), ("1135to1137", "unknown --split")):
            proc = subprocess.run(cmd + ["--split", split], cwd=ROOT, env=env, capture_output=True, text=True)
            assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_tune_split_cuts_a_single_volume_in_two(tmp_path):
    # one 3D training volume (as GoNuclear, plant3d): the learning-speed protocol trains on the first half along x
    # and scores the second, both written as real ImageJ TIFFs with the voxel size kept
    import tifffile

    from research.data import Split, _item
    from research.learning_speed import tune_split

    image = np.arange(4 * 5 * 8, dtype=np.uint8).reshape(4, 5, 8)
    labels = np.zeros((4, 5, 8), np.uint16)
    labels[:, :, 1:3], labels[:, :, 5:7] = 1, 2
    spacing = {"resolution": (1 / 0.25, 1 / 0.25), "metadata": {"axes": "ZYX", "spacing": 0.5}}
    tifffile.imwrite(tmp_path / "vol_image.tif", image, imagej=True, **spacing)
    tifffile.imwrite(tmp_path / "vol_labels.tif", labels, imagej=True, **spacing)
    item = _item(tmp_path / "vol_image.tif", tmp_path / "vol_labels.tif")
    split = Split("plant3d", "x", 3, [item], [item])
    tuned = tune_split(split, 1, cache_dir=tmp_path / "cache")
    (first,), (second,) = tuned.train, tuned.test
    np.testing.assert_array_equal(first.image, image[..., :4])
    np.testing.assert_array_equal(second.labels, labels[..., 4:])
    assert first.spacing == pytest.approx((0.5, 0.25, 0.25)) and first.label_path != second.label_path
    with pytest.raises(ValueError, match="--tune"):
        tune_split(split, 2)
    # the screen's page says what it trained and scored on: halves of one volume, not "its first 1 images"
    from research.learning_speed import data_words

    assert "`vol_a_image`, the first half of the training volume" in data_words(tuned)
    assert "`vol_b_image`, the second half" in data_words(tuned)
    assert "first 1 images" in data_words(tune_split(Split("d", "y", 2, [item, item], [item]), 1))


def test_a_run_with_other_settings_does_not_replace_a_finished_one(tmp_path: Path, capsys) -> None:
    """Record paths do not carry the seed: a --seed 1 run into the out_dir of a finished seed-0 run is refused with
    what differs (it once overwrote the seed-0 record), and --force replaces it."""
    from research.accuracy import main

    _need("dsb2018")
    args = ["--datasets", "dsb2018", "--methods", "classical", "--ratios", "0.1", "--budget_s", "30", "--clock", "cpu"]
    args += ["--threads", "1", "--max_train", "2", "--max_test", "1", "--data_dir", str(DATA_DIR), "--docs", ""]
    args += ["--out_dir", str(tmp_path / "runs")]
    assert main(args) == 0
    path = next((tmp_path / "runs" / "dsb2018").glob("*/classical/ratio_0.10.json"))
    first = path.read_text()
    assert json.loads(first)["seed"] == 0
    capsys.readouterr()
    assert main(args + ["--seed", "1"]) == 1
    assert path.read_text() == first
    assert "holds a finished run with other settings (seed 0 -> 1)" in capsys.readouterr().err
    assert main(args) == 0 and "cached" in capsys.readouterr().err  # the seed-0 run is still the cached one
    assert main(args + ["--seed", "1", "--force"]) == 0
    assert json.loads(path.read_text())["seed"] == 1


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="lscpu not installed")
def test_machine_info_tells_cpu_generations_apart():
    # a virtual machine may name its CPU only "AMD EPYC"; records need the family / model to compare budgets
    info = machine_info()
    assert "CPU family" in info["cpu_detail"] and "Model" in info["cpu_detail"] and info["nproc"] >= 1


def test_reference_throughput_is_recorded_and_reported():
    # the speed of the machine per CPU-second, so that runs of one CPU-second budget can be compared across machines
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    speed = reference_throughput(cpu_s=0.3)
    assert speed is not None and speed > 0
    assert torch.equal(torch.rand(3), expected)  # the caller's random state is left alone
    assert "reference_it_per_cpu_s" not in machine_info()  # a few CPU-seconds: only where a run asks for it
    runs = [
        {"machine": {"reference_it_per_cpu_s": 2.5}},
        {"machine": {"reference_it_per_cpu_s": 1.25}},
        {"machine": {}},
    ]
    words = reference_words(runs)
    assert "1.25 to 2.50 steps per CPU-second" in words and "not recorded by 1 run (older, or rescored)." in words
    assert reference_words([{"machine": {}}]) == ""


def test_every_learning_speed_recipe_overrides_ids_that_train_json_has() -> None:
    """A recipe's override of an id that does not exist would train the defaults under the recipe's name; the
    ``weak_aug`` recipe names augmentations by their place in the list, which must still be those transforms."""
    import inspect
    import pydoc

    from monai.bundle import ConfigParser

    from research.learning_speed import RECIPES

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[2] / "configs" / "train.json"))
    for name, overrides in RECIPES.items():
        for key in overrides:
            # an id of its own, or an argument its component takes (e.g. loss#consistency_weight)
            parent_id = key.rsplit("#", 1)[0]
            parent = parser.get(parent_id) if "#" in key else None
            known = key in parser
            if not known and isinstance(parent, dict) and "_target_" in parent:
                # the recipe's own component where it replaces one (e.g. the shape branch's loss)
                component = pydoc.locate(overrides.get(f"{parent_id}#_target_", parent["_target_"]))
                known = key.rsplit("#", 1)[1] in inspect.signature(component).parameters
            assert known, f"recipe {name}: {key} is not an id of train.json"
    for key, value in RECIPES["weak_aug"].items():
        transform = parser.get(key.rsplit("#", 1)[0])
        target = {"offsets": "RandShiftIntensityd", "std": "RandGaussianNoised"}[key.rsplit("#", 1)[1]]
        assert transform["_target_"] == target and value < parser.get(key)


def test_pixel_classifier_finds_nuclei_and_its_label_frequency(dsb_small: Split) -> None:
    from research.pixel_classifier import fit, pixel_scores, predict

    forest, c, shape = fit(dsb_small, ratio=0.5, sigma_max=8, samples=2000, trees=20)
    assert 0.0 < c < 1.0 and shape[1] == 16  # 4 scales x (intensity, edges, 2 Hessian eigenvalues)
    probabilities = predict(forest, dsb_small.test, sigma_max=8)
    assert [p.shape for p in probabilities] == [item.image.shape for item in dsb_small.test]
    # bright nuclei on a dark background: the filter features and the c / 2 rule find most of them, and little else
    precision, recall = pixel_scores(probabilities, [item.labels > 0 for item in dsb_small.test], c / 2)
    assert precision > 0.7 and recall > 0.7
