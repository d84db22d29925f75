"""Simulated background scribbles (research.recipes.scribbles) and the config overlay that puts them into the
bundle's training (research/configs/scribbles.json, the accuracy benchmark's ``scribbles`` variant)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from scipy import ndimage

from research.data import Item, Split
from research.methods import spoco as spoco_runner
from research.recipes.scribbles import SimulateScribbles, SimulateScribblesd, item_name, scribble_slice
from research.settings import RunSettings
from spoco_bundle.transforms import SparseInstanceLabeld

B = 65535
ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "research" / "configs" / "scribbles.json"


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


def test_item_name_is_the_file_stem_from_a_metatensor_or_a_meta_dict():
    mt = MetaTensor(torch.zeros(1, 2, 2), meta={"filename_or_obj": "/d/labels/cell_07.nii.gz"})
    assert item_name({"label": mt}, "label") == "cell_07"
    plain = {"label": np.zeros((1, 2, 2)), "label_meta_dict": {"filename_or_obj": "/d/x.tif"}}
    assert item_name(plain, "label") == "x" and item_name({"label": np.zeros(2)}, "label") == ""


def test_the_overlay_puts_the_simulation_in_front_of_train_json_transforms():
    """The overlay, read after today's configs/train.json (as the scribbles variant passes both), replaces the
    training's transforms by the simulated strokes first, then train.json's own; nothing trains here."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.json"), str(OVERLAY)])
    expression = parser["train"]["preprocessing"]["transforms"]
    assert expression == (
        "$@load_transforms + [research.recipes.scribbles.SimulateScribblesd(keys='label', strokes=@scribbles, "
        "background_label=@background_label, seed=@seed)] + @train#deterministic_transforms + "
        "@train#random_transforms"
    )
    assert "$import research.recipes.scribbles" in parser["imports"] and parser["scribbles"] == 4
    # MONAI binds "$import a.b.c" under the name "a.b.c": the expression's research.recipes... needs "research" too
    assert "$import research" in parser["imports"]
    assert "$import spoco_bundle" in parser["imports"]  # train.json's imports kept ("+imports" adds)
    modules = parser.get_parsed_content("imports")
    assert any(getattr(m, "__name__", "") == "research.recipes.scribbles" for m in modules)
    # parsed with the ids the variant sets: the research transform with the overlay's strokes, before the rest
    parser.update({"bundle_root": str(ROOT), "spatial_dims": 2, "background_label": B, "seed": 3})
    transforms = parser.get_parsed_content("train#preprocessing").transforms
    n_load = len(parser.get_parsed_content("load_transforms"))
    simulate = transforms[n_load]
    assert isinstance(simulate, SimulateScribblesd) and simulate.simulate.strokes == 4
    assert simulate.simulate.background_label == B and simulate.simulate.seed == 3
    assert len(transforms) == n_load + 1 + len(parser.get_parsed_content("train#deterministic_transforms")) + len(
        parser.get_parsed_content("train#random_transforms")
    )


def test_the_scribbles_variant_trains_with_train_json_and_the_overlay(tmp_path, monkeypatch):
    """The harness's command for the scribbles variant: both config files in one --config_file list, the strokes'
    background id, and no `scribbles` id of train.json's own (retired); other variants train.json alone."""
    commands = []

    def run(args, log_path, threads):
        commands.append(args)
        return "Time limit reached after 3 iterations"

    monkeypatch.setattr(spoco_runner, "_run", run)
    item = Item("a", np.zeros((8, 8), np.float32), np.zeros((8, 8), np.int32), None, "a.tif", "a_labels.tif")
    split = Split("dsb2018", "tiny", 2, [item], [item])
    fit = spoco_runner.fit(split, 0.1, RunSettings(budget_s=1.0), "scribbles", tmp_path / "s")
    args = commands[-1]
    assert args[args.index("--config_file") + 1] == "['configs/train.json','research/configs/scribbles.json']"
    assert args[args.index("--background_label") + 1] == "65535" and "--scribbles" not in args
    assert fit.configs == ("configs/train.json", "research/configs/scribbles.json") and fit.iterations == 3
    assert all((ROOT / c).is_file() for c in fit.configs)  # relative to the repository root, the runs' folder
    spoco_runner.fit(split, 0.1, RunSettings(budget_s=1.0), "full", tmp_path / "f")
    assert commands[-1][commands[-1].index("--config_file") + 1] == "configs/train.json"
    assert "--background_label" not in commands[-1]
    with pytest.raises(ValueError, match="without quotes or commas"):
        spoco_runner.config_file_arg(["a,b.json"])
