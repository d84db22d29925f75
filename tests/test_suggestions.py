"""What to outline next: the per-object scores, their table and the ``spoco suggest`` command on real images."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from spoco_bundle.blockwise.volume import _without_whole_image_checks
from spoco_bundle.handlers.suggestions import object_table
from spoco_bundle.postprocessing import ObjectScores, ObjectScoresd

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPOCO_DATA_DIR", ROOT.parent / "shared" / "data"))


def _output_and_labels() -> tuple[np.ndarray, np.ndarray]:
    """Three objects: 1 tight and sure, 2 two embedding clusters merged into one object, 3 a head at about 1/2."""
    labels = np.zeros((1, 32, 48), np.int32)
    labels[0, 4:14, 4:14], labels[0, 4:14, 20:40], labels[0, 20:30, 4:14] = 1, 2, 3
    out = np.zeros((4 + 1, 32, 48), np.float32)
    rng = np.random.default_rng(0)
    out[:4] = rng.normal(0, 0.05, (4, 32, 48))
    out[0, 4:14, 4:14] += 4.0
    out[1, 4:14, 20:30] += 4.0  # the left half of object 2 ...
    out[2, 4:14, 30:40] += 4.0  # ... and its right half lie 5.7 apart in the embedding space
    out[3, 20:30, 4:14] += 4.0
    out[4] = -6.0
    out[4][labels[0] > 0] = 6.0
    out[4, 20:30, 4:14] = 0.1  # the head hesitates over object 3
    return out, labels


def test_merged_and_hesitant_objects_score_above_a_clean_one():
    out, labels = _output_and_labels()
    rows = {r["id"]: r for r in ObjectScores(embedding_dim=4)(torch.as_tensor(out), labels)}
    assert set(rows) == {1, 2, 3} and rows[2]["voxels"] == 200
    assert rows[2]["embedding_spread"] == pytest.approx(1.0) and rows[1]["embedding_spread"] == 0
    assert rows[3]["head_uncertainty"] > 0.9 > 0.1 > rows[1]["head_uncertainty"]
    assert rows[1]["score"] < 0.1 < 0.9 < min(rows[2]["score"], rows[3]["score"])
    without_head = ObjectScores(embedding_dim=4)(out[:4], labels)  # the spread alone, no head uncertainty
    assert np.isnan(without_head[0]["head_uncertainty"]) and without_head[1]["score"] == pytest.approx(1.0)
    # labels on the image's grid, twice as fine as the output's: each object's voxels there, the same scores
    fine = np.repeat(np.repeat(labels, 2, axis=1), 2, axis=2)
    on_image = {r["id"]: r for r in ObjectScores(embedding_dim=4)(out, fine)}
    assert on_image[2]["voxels"] == 4 * 200
    assert all(on_image[k]["score"] == pytest.approx(rows[k]["score"], abs=1e-6) for k in rows)
    with pytest.raises(ValueError, match="spatial axes"):
        ObjectScores(embedding_dim=4)(out, labels[:, :16, 0])
    with pytest.raises(ValueError, match="delta_v"):
        ObjectScores(delta_v=0)


def test_the_dictionary_version_reads_the_kept_output_and_drops_it():
    out, labels = _output_and_labels()
    d = ObjectScoresd(embedding_dim=4)({"pred": labels, "network_output": out})
    assert "network_output" not in d and [r["id"] for r in d["object_scores"]] == [1, 2, 3]
    with pytest.raises(KeyError, match="CopyItemsd"):
        ObjectScoresd(embedding_dim=4)({"pred": labels})


def test_the_table_ranks_objects_with_their_place_in_the_image():
    _, labels = _output_and_labels()
    scores = [{"id": 1, "score": 0.1}, {"id": 2, "score": 0.9}, {"id": 3, "score": 0.5}, {"id": 9, "score": 1.0}]
    rows = object_table(labels[0], scores)
    assert [(r["rank"], r["id"]) for r in rows] == [(1, 2), (2, 3), (3, 1)]  # id 9 is not in the image
    assert rows[0]["centroid_y"] == 8.5 and rows[0]["centroid_x"] == 29.5
    assert (rows[0]["y_min"], rows[0]["y_max"], rows[0]["x_min"], rows[0]["x_max"]) == (4, 13, 20, 39)


def test_the_scores_are_off_in_inference_and_taken_out_of_the_block_chain():
    plain = ConfigParser()
    plain.read_config(str(ROOT / "configs" / "inference.json"))
    steps = plain.get_parsed_content("postprocessing").transforms
    assert not any(isinstance(t, ObjectScoresd) for t in steps)
    suggest = ConfigParser()
    suggest.read_config([str(ROOT / "configs" / f) for f in ("inference.json", "suggest.json")])
    chain = suggest.get_parsed_content("postprocessing")
    assert len(chain.transforms) == len(steps) + 2
    assert isinstance(chain.transforms[-1], ObjectScoresd)  # after the labels are on the image's grid
    # a block is not the image: its chain leaves the scoring to the blockwise run (per-voxel maps summed per object
    # over the blocks), so its steps and resume identity stay those of plain inference
    assert [type(t) for t in _without_whole_image_checks(chain).transforms] == [
        type(t) for t in _without_whole_image_checks(plain.get_parsed_content("postprocessing")).transforms
    ]


def _faint_copy(name: str, folder: Path, contrast: float = 0.35) -> np.ndarray:
    """A DSB2018 image with one mid-sized nucleus (away from the border) turned faint: its mask."""
    import tifffile
    from scipy import ndimage

    from spoco_bundle.io import read_image

    img = np.asarray(read_image(DATA / "dsb2018" / "images" / f"{name}.tif")[0]).astype(np.float32)
    lab = np.asarray(read_image(DATA / "dsb2018" / "labels" / f"{name}.tif")[0])
    ids, sizes = np.unique(lab[lab > 0], return_counts=True)
    boxes = ndimage.find_objects(lab)
    inner = [
        (abs(n - np.median(sizes)), k)
        for k, n in zip(ids, sizes)
        if all(5 < s.start and s.stop < m - 5 for s, m in zip(boxes[k - 1], lab.shape))
    ]
    mask = lab == min(inner)[1]
    background = np.percentile(img, 5)
    img[mask] = background + contrast * (img[mask] - background)
    tifffile.imwrite(folder / f"{name}.tif", img)
    return mask


@pytest.mark.skipif(not (DATA / "dsb2018" / "split.json").is_file(), reason="needs ../shared/data/dsb2018")
@pytest.mark.slow
def test_spoco_suggest_puts_a_deliberately_faint_nucleus_first(tmp_path):
    """``spoco suggest`` with the shipped ``nuclei2d`` on real validation images, one nucleus each turned faint (a
    third of its contrast): the object found there is the first suggestion of its image; every file is written."""
    from spoco_bundle.io import read_image

    images = tmp_path / "in"
    images.mkdir()
    names = ["0287e7ee5b007c91", "06350c7cc618be44"]
    masks = {name: _faint_copy(name, images) for name in names}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "2"
    cmd = [sys.executable, "-m", "spoco_bundle", "suggest", "in", "out", "--model", "nuclei2d", "--top", "5"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / "out"
    for name, mask in masks.items():
        labels = np.asarray(read_image(out / f"{name}_instances.tif")[0])
        found, overlap = np.unique(labels[mask & (labels > 0)], return_counts=True)
        faint = int(found[np.argmax(overlap)])
        with open(out / f"{name}_suggestions.csv") as f:
            rows = list(csv.DictReader(f))
        assert int(rows[0]["id"]) == faint, (name, faint, rows[:3])
        assert len(rows) == len(np.unique(labels[labels > 0]))
        assert (out / f"{name}_suggestions.png").stat().st_size > 1000
    with open(out / "suggestions.csv") as f:
        ranking = list(csv.DictReader(f))
    assert sorted(Path(r["image"]).stem for r in ranking) == sorted(names) and ranking[0]["rank"] == "1"
    assert float(ranking[0]["image_score"]) >= float(ranking[1]["image_score"])


def test_suggest_builds_the_inference_command_with_its_overlay_and_checks_top(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base = [sys.executable, "-m", "spoco_bundle", "suggest", "imgs", "out", "--model", "nuclei2d"]
    done = subprocess.run(base + ["--top", "3", "--dry_run"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert "inference.json" in line and "suggest.json" in line and "--suggest_top 3" in line
    bad = subprocess.run(base + ["--top", "0"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "--top must be a positive whole number" in (bad.stdout + bad.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (DATA / "dsb2018" / "split.json").is_file(), reason="needs ../shared/data/dsb2018")
@pytest.mark.slow
def test_an_image_segmented_blockwise_gets_the_whole_image_suggestions(tmp_path):
    """``spoco suggest`` on a real image with a memory budget that sends it blockwise: its table lists every object
    it wrote with the whole-image run's scores (the network output in each block's core is the whole image's), the
    faint nucleus first in both, and its preview is drawn object by object from the written files."""
    from spoco_bundle.io import read_image

    images = tmp_path / "in"
    images.mkdir()
    name = "0287e7ee5b007c91"
    mask = _faint_copy(name, images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "2"
    cmd = [sys.executable, "-m", "spoco_bundle", "suggest", "in"]
    tables, labels = {}, {}
    for run, extra in (("whole", []), ("blocks", ["--max_memory_gb", "0.05"])):
        done = subprocess.run(
            cmd + [run, "--model", "nuclei2d", *extra],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        labels[run] = np.asarray(read_image(tmp_path / run / f"{name}_instances.tif")[0])
        with open(tmp_path / run / f"{name}_suggestions.csv") as f:
            tables[run] = {int(r["id"]): r for r in csv.DictReader(f)}
        assert (tmp_path / run / f"{name}_suggestions.png").stat().st_size > 1000
        assert (tmp_path / run / "suggestions.csv").is_file()
        if run == "blocks":
            assert "blockwise:" in done.stdout + done.stderr  # the budget did send it blockwise
    found, overlap = np.unique(labels["blocks"][mask & (labels["blocks"] > 0)], return_counts=True)
    first = min(tables["blocks"].values(), key=lambda r: int(r["rank"]))
    assert int(first["id"]) == int(found[np.argmax(overlap)])
    assert sorted(tables["blocks"]) == sorted(np.unique(labels["blocks"][labels["blocks"] > 0]))
    same = 0
    for k, row in tables["blocks"].items():
        ids = np.unique(labels["whole"][labels["blocks"] == k])
        if len(ids) == 1 and ids[0] and (labels["whole"] == ids[0]).sum() == int(row["voxels"]):
            other = tables["whole"][int(ids[0])]
            assert float(row["score"]) == pytest.approx(float(other["score"]), abs=0.02), (row, other)
            assert (row["centroid_y"], row["x_min"]) == (other["centroid_y"], other["x_min"])
            same += 1
    assert same >= 0.9 * len(tables["blocks"])


def test_a_volume_is_drawn_one_panel_per_suggested_object(tmp_path):
    from spoco_bundle.handlers.suggestions import draw_suggestions

    labels = np.zeros((12, 40, 40), np.int32)
    labels[2:8, 5:15, 5:15], labels[4:10, 20:35, 22:30] = 1, 2
    image = np.random.default_rng(0).random(labels.shape).astype(np.float32) + (labels > 0)
    rows = object_table(labels, [{"id": 1, "score": 0.2}, {"id": 2, "score": 0.8}])
    assert rows[0]["id"] == 2 and rows[0]["centroid_z"] == 6.5 and (rows[0]["z_min"], rows[0]["z_max"]) == (4, 9)
    path = draw_suggestions(image, labels, rows, 2, str(tmp_path / "v.png"))
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[1] > matplotlib.image.imread(path).shape[0]  # two panels side by side
    assert not list(tmp_path.glob("*.part*"))
