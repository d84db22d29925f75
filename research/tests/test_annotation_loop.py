"""The simulated annotator's pieces that need no training: matching, random choice, the label files it writes."""

from __future__ import annotations

import argparse

import numpy as np

from research.annotation_loop import BACKGROUND, _matches, _random, _write_annotations, summary
from research.data import Item, Split
from spoco_bundle.io import read_image


def _item(tmp_path, name: str = "a") -> Item:
    labels = np.zeros((20, 20), np.int32)
    labels[2:8, 2:8], labels[10:18, 10:18], labels[2:6, 12:18] = 3, 7, 9
    return Item(name, labels.astype(np.float32), labels, None, str(tmp_path / f"{name}.tif"), str(tmp_path / "l.tif"))


def test_a_suggestion_stands_for_the_true_objects_it_covers_or_is_painted_as_background(tmp_path):
    truth = _item(tmp_path).labels
    pred = np.zeros_like(truth)
    pred[2:8, 2:9] = 1  # 36 of 42 pixels on object 3: IoU 0.86
    pred[10:18, 10:12] = 2  # a sliver of object 7 (16 of its 64 pixels): neither a match nor a false object
    pred[0:2, 0:5] = 4  # background only: a false object
    pred[1:9, 11:19] = 5  # object 9 whole and much background around it: half of object 9 is inside
    assert _matches(pred, truth, 1) == ([3], False) and _matches(pred, truth, 2) == ([], False)
    assert _matches(pred, truth, 4) == ([], True) and _matches(pred, truth, 5) == ([9], False)
    merged = np.where((truth == 7) | (truth == 9), 6, 0)  # two true objects merged into one suggestion
    assert _matches(merged, truth, 6) == ([7, 9], False)


def test_random_choice_adds_only_unannotated_objects_and_the_files_hold_the_annotation(tmp_path):
    item = _item(tmp_path)
    added = _random([item], {"a": {3}}, 5, seed=0)
    assert added == {"a": {7, 9}}  # only two were left
    painted = {"a": np.zeros((20, 20), bool)}
    painted["a"][0:2, 0:20] = True  # a false suggestion along the top: background where no true object lies
    painted["a"][2:4, 2:4] = True  # ... but not inside object 3
    (written,) = _write_annotations(tmp_path, [item], {"a": {3, 9}}, painted)
    ann = np.asarray(read_image(written.label_path)[0])
    assert set(np.unique(ann)) == {0, 3, 9, BACKGROUND}
    assert (ann[0:2] == BACKGROUND).all() and (ann[2:8, 2:8] == 3).all() and (ann[10:18, 10:18] == 0).all()


def test_the_summary_tests_the_goal_against_random_at_equal_counts(tmp_path):
    args = argparse.Namespace(dataset="toy", start=0.05, add=0.05, first_budget_s=450, budget_s=240, threads=1)
    split = Split("toy", "toy", 2, [_item(tmp_path, "a"), _item(tmp_path, "b")], [_item(tmp_path, "c")])
    records = [{"arm": "random", "round": 0, "annotated": 10, "ap50": 0.5}]
    for n, (rand, sugg) in enumerate([(0.60, 0.55), (0.70, 0.72), (0.74, 0.78)], start=1):
        records += [
            {"arm": "random", "round": n, "annotated": 10 + 10 * n, "ap50": rand},
            {"arm": "suggest", "round": n, "annotated": 10 + 10 * n, "ap50": sugg},
        ]
    out = summary(args, split, records, "cmd")
    # +0.04 after round 3; random's final 0.74 first reached in round 3 by suggest: all 30 added objects
    assert out["verdicts"] == {"suggest": {"ahead_of_random": 0.04, "share_to_reach_random": 1.0}}
    rows = ["| random | 0.500 | 0.600 | 0.700 | 0.740 |", "| suggest | 0.500 | 0.550 | 0.720 | 0.780 |"]
    assert out["table"].splitlines()[2:] == rows
    assert (
        "round 3 (40)" in out["table"]
        and "(2 annotated, 1 held back for scoring)" in out["setup"]
        and out["command"] == "cmd"
    )
