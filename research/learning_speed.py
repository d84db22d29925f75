"""
Learning-speed screen (issue 24 item 3): which training recipe learns fastest, judged on *training* images only.

Each recipe is a set of ``configs/train.json`` overrides. Every run trains the bundle (``monai.bundle run training``,
as a user does) for the same CPU budget on the first images of a data set's training split with ``--ratio`` of the
objects kept, then segments the *last* ``--tune`` training images, which it never saw (an inner split: settings are
chosen here, never on the validation images the benchmark scores). Reported per run: AP50 / mAP with the head's
foreground (the user's result), the head's pixel precision / recall, AP50 with the true foreground given (what the
embeddings alone separate), iterations, CPU seconds and the final epoch's loss terms.

    .venv/bin/python -m research.learning_speed [--dataset dsb2018] [--tune 40] [--ratios 0.1]
        [--recipes default,fg20] [--budget_s 300] [--threads 1] [--jobs 2] [--out_dir eval/learning_speed]
        [--no_run]

``--jobs 2`` runs two 1-thread runs side by side (the deliberate mode on a 2-core machine; the CPU-time budget keeps
runs comparable, wall times grow). Each run's record is cached as ``<out_dir>/<dataset>/<recipe>/ratio_<r>_<budget>s
.json`` (a finished run is skipped, so the grid can run in pieces); ``--no_run`` only prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from research.data import REPO_ROOT, Split, kept_digest, load_benchmark, score, volume_halves
from research.methods import spoco as spoco_runner
from research.records import git_commit, machine_info, reference_words
from research.settings import RunSettings
from spoco_bundle.io import split_image_suffix, write_label_image


def _augmentation_ids(target: str, argument: str, value) -> dict:
    """``train#random_transforms#<i>#<argument>``: ``value`` for every transform ``target`` of ``configs/train.json``'s
    random transforms (found by name: their places move when the list changes)."""
    transforms = json.loads((REPO_ROOT / "configs" / "train.json").read_text())["train"]["random_transforms"]
    return {
        f"train#random_transforms#{i}#{argument}": value for i, t in enumerate(transforms) if t["_target_"] == target
    }


# train.json overrides per recipe ("default": the bundle as it ships)
# tissue whose labels cover the membranes (plant3d): the head learns interiors against the membrane on both sides
# of the annotated cells' surfaces, with its own 0.5, cut by the boundary clustering into a partition
_TISSUE_BOUNDARY = {
    "foreground_surface": 2,
    "foreground_ring": 2,
    "foreground_calibration": "label_frequency",
    "clustering": "boundary",
    "background": "none",
    "shape_split": 0.0,
}

_SHAPE_BRANCH = {
    "network_def#_target_": "research.recipes.shape_branch.ShapeBranchUNet",
    "loss#_target_": "research.recipes.shape_branch.ShapeBranchLoss",
}

# Retired recipes (their training options left the bundle; research/README.md, "Retired"): calib0.2, calib0.35,
# self0.5, self0.5_calib0.2, leeliu_calib0.2, self0.5_leeliu_calib0.2, scribbles4, scribbles4_ring1_2, contact10,
# dense_contact10, field0.5, field0, tophat5, tophat0, gamma0.5, paste0.5, paste1: in git at commit 7c97b4b
# (git show 7c97b4b:benchmarks/learning_speed.py).
RECIPES: dict[str, dict] = {
    "default": {},
    # the foreground term's weight: 300 (after a warm-up from 20) dominates the shared layers' gradients
    "fg20": {"loss#foreground_weight": 20.0, "foreground_warmup_iterations": 0},
    "fg5": {"loss#foreground_weight": 5.0, "foreground_warmup_iterations": 0},
    "fg1": {"loss#foreground_weight": 1.0, "foreground_warmup_iterations": 0},
    "lr5e-3": {"learning_rate": 0.005},
    "lr1e-3": {"learning_rate": 0.001},
    "lr1e-2": {"learning_rate": 0.01},
    "lr1e-2_fg1000": {"learning_rate": 0.01, "loss#foreground_weight": 1000.0},
    "no_consistency": {"loss#consistency_weight": 0.0},
    "fg1000": {"loss#foreground_weight": 1000.0},
    # cheaper iterations: half the feature maps (~4x fewer operations), or smaller patches
    "narrow": {"features": [8, 16, 32, 64]},
    "patch128": {"patch_size": [128, 128]},
    # one more level (down to 1/16): twice the field of view, for objects larger than the default network sees whole
    "deep5": {"features": [16, 32, 64, 128, 256]},
    # the foreground head alone (every embedding term off): what the head learns without sharing the network
    "head_only": {
        f"loss#{k}": 0.0
        for k in ("alpha", "beta", "gamma", "instance_weight", "unlabeled_weight", "consistency_weight")
    },
    # large objects (phase-contrast cells 40-70 px across): trained and segmented at half / a third of the resolution,
    # so that a patch and the network's field of view hold whole cells
    "scale0.5": {"image_scale": 0.5},
    # small nuclei (DSB2018): trained and segmented at twice the resolution, so that the seam between two touching
    # nuclei spans more than a pixel (the patch then holds a quarter of the area)
    "scale2": {"image_scale": 2.0},
    # the foreground head with annotated background: every unlabeled pixel (dense labels, --ratios 1), to tell
    # positive-unlabeled learning from the head's capacity
    "dense": {"background_label": 0},
    # the head learns object interiors against the annotated objects' outer voxel layer (membranes in tissue), cut
    # by the boundary clustering (ISBI's documented settings have it; plant3d's use no head, so it is set here)
    "surface1": {"foreground_surface": 1},
    "surface2": {"foreground_surface": 2},
    # nuclei: the head learns interiors against the annotated objects' outer pixel layer and the background right
    # around them, so that touching nuclei fall apart in its mask (grown back by a pixel at inference)
    "surface1_ring2": {"foreground_surface": 1, "foreground_ring": 2, "foreground_calibration": "label_frequency"},
    "surface1_boundary": {"foreground_surface": 1, "clustering": "boundary", "background": "none", "shape_split": 0.0},
    # membranes a few voxels thick (3D tissue): the head's negatives are the annotated cells' outer 2 voxels and the
    # unlabeled voxels within 2 voxels outside them (the neighbour's side of the membrane), its positives the interiors
    "surface2_ring2_boundary": dict(_TISSUE_BOUNDARY),
    # the same with the ring head's default threshold (calibration "auto": Lee & Liu's criterion on the training
    # volume), not the head's own 0.5
    "surface2_ring2_boundary_auto": {**_TISSUE_BOUNDARY, "foreground_calibration": "auto"},
    # the same at half the resolution (the same physical layer), twice the iterations in a budget
    "surface1_ring1_boundary_half": {
        **_TISSUE_BOUNDARY,
        "foreground_surface": 1,
        "foreground_ring": 1,
        "image_scale": 0.5,
    },
    # the head learns the annotated objects against the background right around them (the unlabeled voxels within r
    # voxels; the rest says nothing), instead of positive-unlabeled against everything; in 3D [z, y, x] voxels. With
    # the head's own 0.5, pinned: since 0.24 calibration "auto" would add Lee & Liu's threshold to a ring head
    "ring2": {"foreground_ring": 2, "foreground_calibration": "label_frequency"},
    # the positive-unlabeled head with the label frequency whatever the number of annotated objects (the default up
    # to 0.23; since 0.24 "default" gives a handful of annotated objects a ring)
    "pu": {"foreground_ring": 0, "foreground_calibration": "label_frequency"},
    "ring1_2": {"foreground_ring": [1, 2, 2], "foreground_calibration": "label_frequency"},
    "ring2_4": {"foreground_ring": [2, 4, 4], "foreground_calibration": "label_frequency"},
    # dim objects beside bright ones (session 55, it did not help): milder intensity augmentation (the consistency
    # views' shifts and noise), in case it drowns their contrast
    "weak_aug": {
        **_augmentation_ids("RandShiftIntensityd", "offsets", 0.03),
        **_augmentation_ids("RandGaussianNoised", "std", 0.015),
    },
    # fine-tuning from the shipped 2D nuclei model (issue 19), at the default and a lower learning rate
    "finetune": {"pretrained": "nuclei2d"},
    "finetune_lr5e-4": {"pretrained": "nuclei2d", "learning_rate": 0.0005},
    # a branch of its own for an in-object distance map and affinities learned from the sparse masks
    # (research/recipes/shape_branch.py), segmented with seeds from the distance map (research/shape_seeds.py);
    # "_agree": the embeddings also follow the teacher's confident affinities on the unlabeled region
    "shape_branch": _SHAPE_BRANCH,
    "shape_branch_agree": {**_SHAPE_BRANCH, "loss#agreement_weight": 1.0},
    # GoNuclear's voxels are 2.2 times as deep as wide: the distance map in micrometres
    "shape_branch_z2.2": {**_SHAPE_BRANCH, "loss#sampling": [2.2, 1.0, 1.0]},
}

# inference overlays after configs/inference.json for recipes whose network or post-processing is the study's
INFERENCE_CONFIGS: dict[str, tuple[str, ...]] = {
    name: ("research/configs/shape_branch_inference.json",) for name in RECIPES if name.startswith("shape_branch")
}

PARTITION_KEYS = ("arand", "voi_split", "voi_merge")

_TERMS = re.compile(r"Epoch (\d+) loss terms: (.*)")


def tune_split(split: Split, n_tune: int, cache_dir: str | os.PathLike | None = None) -> Split:
    """Train on all but the last ``n_tune`` training images of ``split``, test on those (dense labels). A split with
    a single training image (a 3D volume: GoNuclear, plant3d) is cut in two along its last axis instead (``n_tune``
    1): the first half trains, the second scores (:func:`~research.data.volume_halves`, files under ``cache_dir``)."""
    if len(split.train) == 1 and n_tune == 1:
        first, second = volume_halves(split.train[0], cache_dir)
        return replace(split, name=f"tune_{split.name}_halves", train=[first], test=[second])
    if not 0 < n_tune < len(split.train):
        raise ValueError(f"--tune must be between 1 and {len(split.train) - 1} for {split.name}, got {n_tune}.")
    return replace(
        split,
        name=f"tune_{split.name}_{len(split.train) - n_tune}_{n_tune}",
        train=split.train[:-n_tune],
        test=split.train[-n_tune:],
    )


def screen_split(dataset: str, data_dir: str | None, name: str, n_tune: int) -> Split:
    """The screen's split (:func:`tune_split`) of the data set's split ``name`` (its first when empty); ValueError
    for an unknown name."""
    splits = load_benchmark(dataset, data_dir)
    named = {s.name: s for s in splits}
    if name and name not in named:
        raise ValueError(f"unknown --split {name!r} for {dataset}; known: {sorted(named)}")
    return tune_split(named[name] if name else splits[0], n_tune)


def other_split(record: dict, split: Split) -> str:
    """Why a record does not belong to ``split``'s screen ('' when it does): record files do not name the split, so
    another split's record in the out_dir would pass for a finished run."""
    if record.get("split", split.name) == split.name:
        return ""
    return f"is a run on {record['split']}, not {split.name}: pass its --split, or give each split its own --out_dir"


def record_path(out_dir: Path, dataset: str, recipe: str, ratio: float, budget_s: float, seed: int = 0) -> Path:
    tail = f"_seed{seed}" if seed else ""  # seed 0 keeps the names of the runs made before --seed existed
    return out_dir / dataset / recipe / f"ratio_{ratio:.2f}_{budget_s:g}s{tail}.json"


def _last_terms(log: Path) -> dict[str, float]:
    """The last ``Epoch N loss terms: ...`` line of a training log (unweighted terms), as a dict."""
    text = log.read_text(errors="replace").replace("\r", "\n") if log.is_file() else ""
    found = _TERMS.findall(text)
    if not found:
        return {}
    epoch, terms = found[-1]
    parts = terms.split("(")[0].split()  # "pull 0.43  push 1.17 ... total 40.9  (lr 1.6e-05)"
    values = {k: float(v) for k, v in zip(parts[::2], parts[1::2])}
    return {"epoch": int(epoch), **values}


def run_one(
    split: Split,
    recipe: str,
    ratio: float,
    budget_s: float,
    threads: int,
    out_dir: Path,
    rescore: bool = False,
    seed: int = 0,
) -> dict:
    """Train and score one recipe; returns (and caches) its record. ``rescore``: score the predictions a finished
    run left in its folder (no training; its CPU time is then unknown). ``seed``: the kept objects and the
    training's random state."""
    path = record_path(out_dir, split.dataset, recipe, ratio, budget_s, seed)
    work = path.with_suffix("")  # the run's folder: dataset.json, checkpoints, logs, predictions
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_start = os.getloadavg()[0]
    commit = git_commit() or "unknown"  # the code the run starts with
    machine = machine_info(reference=not rescore)  # the machine's speed before this run starts
    truth = [item.labels for item in split.test]
    run = RunSettings(budget_s=budget_s, clock="cpu", threads=threads, seed=seed, overrides=RECIPES[recipe])
    if rescore:
        log = (work / "train.log").read_text(errors="replace") if (work / "train.log").is_file() else ""
        found = re.findall(r"reached after (\d+) iterations", log)
        try:
            predictions = spoco_runner.read_predictions(split.test, work)
            oracle = spoco_runner.read_predictions(split.test, work, "_mask")
        except FileNotFoundError as e:
            raise RuntimeError(f"{work}: no finished run to rescore ({e})") from e
        if not found:
            raise RuntimeError(f"{work}: no finished run to rescore (no end of training in its train.log)")
        iterations, train_cpu, train_wall = int(found[-1]), None, None
    else:
        overlays = INFERENCE_CONFIGS.get(recipe, ())
        result = spoco_runner.fit_predict(split, ratio, run, work_dir=work, inference_configs=overlays)
        predictions, iterations = result.predictions, result.iterations
        train_cpu, train_wall = result.info.get("train_cpu_s"), round(result.train_seconds, 1)
        # the same checkpoint inside the true foreground: what the embeddings separate without the head's errors
        masks = work / "masks"
        masks.mkdir(exist_ok=True)
        for item in split.test:
            stem = split_image_suffix(os.path.basename(item.path))[0]
            write_label_image(masks / f"{stem}.tif", (item.labels > 0).astype("uint8"))
        ids = dict(spoco_runner.run_ids({"info": result.info}), foreground_mask_dir=str(masks))
        ckpt = work / "models" / "model.pt"
        oracle = spoco_runner.predict(ckpt, split, work, threads=threads, tag="_mask", overrides=ids, configs=overlays)
    head = score(predictions, truth, split.spatial_dims, split.dataset)
    truth_mask = score(oracle, truth, split.spatial_dims, split.dataset)
    record = {
        "dataset": split.dataset,
        "split": split.name,
        "recipe": recipe,
        "overrides": RECIPES[recipe],
        # the benchmark's patch / scale / data-set settings the recipe's overrides went on top of
        "benchmark_settings": spoco_runner.settings_for(split),
        "ratio": ratio,
        "kept_digest": kept_digest(split, ratio, seed),
        "seed": seed,
        "budget_s": budget_s,
        "clock": "cpu",
        "threads": threads,
        "settings": run.as_record(),
        "commit": commit,
        "machine": machine,
        "started": started,
        "loadavg_start": round(load_start, 2),
        "loadavg_end": round(os.getloadavg()[0], 2),
        "iterations": iterations,
        "train_cpu_s": train_cpu,
        "train_wall_s": train_wall,
        "rescored": rescore,
        "loss_terms": _last_terms(work / "train.log"),
        # partition scores (ARAND, VOI) where the data set has them (EM, dense tissue)
        "head": {k: head[k] for k in ("ap50", "map", "sbd", "fg_precision", "fg_recall", *PARTITION_KEYS) if k in head},
        "truth_mask": {k: truth_mask[k] for k in ("ap50", "map", "sbd")},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return record


def _name(record: dict) -> str:
    """A run's recipe, with its seed where not 0."""
    return record["recipe"] + (f" (seed {record['seed']})" if record.get("seed") else "")


def table(records: list[dict]) -> str:
    # ARAND / VOI columns where any run has them (EM, dense tissue)
    partition = any("arand" in r["head"] for r in records)
    extra = " ARAND | VOI split | VOI merge |" if partition else ""
    head = (
        f"| recipe | labelled | AP50 | mAP |{extra} fg precision | fg recall | AP50 (true mask) | iterations | CPU s | "
        "pull | push | instance | consistency | foreground | commit | load |\n"
        "|---|---|---|---|" + "---|" * (3 if partition else 0) + "---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in sorted(records, key=lambda r: (r["ratio"], r["budget_s"], -r["head"]["ap50"])):
        t = r["loss_terms"]
        # a rescored run's load figures are those of the rescoring, not of its training
        load = "-" if r.get("rescored") else f"{r['loadavg_start']:.1f}-{r['loadavg_end']:.1f}"
        rows.append(
            f"| {_name(r)} | {r['ratio']:.0%} | {r['head']['ap50']:.3f} | {r['head']['map']:.3f} | "
            + "".join(f"{r['head'][k]:.3f} | " if k in r["head"] else "- | " for k in PARTITION_KEYS if partition)
            + f"{r['head']['fg_precision']:.2f} | {r['head']['fg_recall']:.2f} | {r['truth_mask']['ap50']:.3f} | "
            f"{r['iterations']} | {'-' if r['train_cpu_s'] is None else format(r['train_cpu_s'], '.0f')} | "
            + " | ".join(
                f"{t.get(k, float('nan')):.3f}" for k in ("pull", "push", "instance", "consistency", "foreground")
            )
            + f" | {r['commit']} | {load} |"
        )
    return head + "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="dsb2018")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--tune", type=int, default=40, help="last N training images held out for scoring")
    p.add_argument(
        "--split",
        default="",
        help="the data set's split whose training images are cut (default: its first, e.g. 1135to1136); records do "
        "not name the split, so give each its own --out_dir (a record of another split there is an error)",
    )
    p.add_argument("--ratios", default="0.1")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--budget_s", type=float, default=300.0, help="training budget per run (process CPU seconds)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="runs side by side")
    p.add_argument("--out_dir", default=str(REPO_ROOT / "eval" / "learning_speed"))
    p.add_argument("--no_run", action="store_true", help="only print the table of cached runs")
    p.add_argument("--docs", default="", help="also write the report to this markdown file")
    p.add_argument("--rescore", action="store_true", help="score runs whose folder holds finished predictions")
    p.add_argument("--seed", type=int, default=0, help="kept objects and training random state of the runs to do")
    args = p.parse_args()

    out_dir = Path(args.out_dir)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        p.error(f"unknown recipes {unknown}; known: {sorted(RECIPES)}")
    ratios = [float(r) for r in args.ratios.split(",")]
    try:
        split = screen_split(args.dataset, args.data_dir, args.split, args.tune)
    except ValueError as e:
        p.error(str(e))
    paths = {
        (rc, r): record_path(out_dir, split.dataset, rc, r, args.budget_s, args.seed) for rc in recipes for r in ratios
    }
    for path in paths.values():
        if path.is_file() and (wrong := other_split(json.loads(path.read_text()), split)):
            p.error(f"{path} {wrong}")
    todo = [key for key, path in paths.items() if not path.is_file()]
    if not args.no_run and todo:
        print(f"{len(todo)} runs to do on {split.name}: {todo}", flush=True)
        # processes, not threads: each run's CPU time is read from its own process's finished children
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = {
                pool.submit(
                    run_one, split, recipe, ratio, args.budget_s, args.threads, out_dir, args.rescore, args.seed
                ): (recipe, ratio)
                for recipe, ratio in todo
            }
            for future, key in futures.items():
                try:
                    r = future.result()
                    print(f"{key}: AP50 {r['head']['ap50']:.3f} (true mask {r['truth_mask']['ap50']:.3f})", flush=True)
                except Exception as e:  # keep the other runs going; the error is in the run's log
                    print(f"{key}: failed: {e}", file=sys.stderr, flush=True)
    # records only (ratio_<r>_<budget>s[_seed<S>].json), not the follow-up studies cached beside them
    found = [
        f
        for f in (out_dir / split.dataset).glob("*/ratio_*.json")
        if re.fullmatch(r"ratio_.*s(_seed\d+)?\.json", f.name)
    ]
    records = [json.loads(f.read_text()) for f in sorted(found)]
    records = [r for r in records if r["split"] == split.name]
    text = report(split, records, _selection_flags(args), args.docs or "research/pages/learning_speed.md")
    print(text)
    if args.docs:
        Path(args.docs).write_text(text)
        print(f"wrote {args.docs}")


def _selection_flags(args: argparse.Namespace) -> str:
    """The flags that select this report's runs (data set, tuning split, results folder), where not the default."""
    flags = [f"--dataset {args.dataset}"] if args.dataset != "dsb2018" else []
    flags += [f"--split {args.split}"] if args.split else []
    flags += [f"--tune {args.tune}"] if args.tune != 40 else []
    out_dir = Path(args.out_dir).resolve()
    if out_dir != (REPO_ROOT / "eval" / "learning_speed").resolve():
        flags.append(f"--out_dir {os.path.relpath(out_dir, REPO_ROOT)}")
    return " ".join(flags)


def _run_commands(records: list[dict], flags: str) -> list[str]:
    """The commands that rerun the report's runs: one per budget, labelled fraction and seed, naming its recipes."""
    groups: dict[tuple, list[str]] = {}
    for r in records:
        groups.setdefault((r["budget_s"], r["ratio"], r.get("seed", 0)), []).append(r["recipe"])
    lines = []
    for (budget, ratio, seed), recipes in sorted(groups.items()):
        tail = f" --seed {seed}" if seed else ""
        lines.append(
            f".venv/bin/python -m research.learning_speed --recipes {','.join(sorted(set(recipes)))} --ratios "
            f"{ratio:g} --budget_s {budget:g} --jobs 2{tail}{flags}"
        )
    return lines or [f".venv/bin/python -m research.learning_speed --recipes default --jobs 2{flags}"]


def _dataset_settings(split: Split, records: list[dict]) -> str:
    """The benchmark's settings (patch, scale, data-set settings) the report's runs went on top of, in words; where
    runs differ (a data-set setting added after some ran), which runs had which."""

    def named(settings: dict | None) -> str:
        if settings is None:
            return "not recorded"
        return ", ".join(f"`{k}` {json.dumps(v)}" for k, v in settings.items())

    groups: dict[str, list[str]] = {}
    for r in records:
        groups.setdefault(named(r.get("benchmark_settings")), []).append(f"{_name(r)} {r['budget_s']:g} s")
    if len(groups) <= 1:
        settings = next(iter(groups), named(spoco_runner.settings_for(split)))
        return f"the benchmark's settings for {split.dataset} ({settings})"
    parts = [f"({settings}: {', '.join(runs)})" for settings, runs in groups.items()]
    return f"the benchmark's settings for {split.dataset}, which differ between runs {'; '.join(parts)}"


def data_words(split: Split) -> str:
    """What the tuning split trains on and scores, in words."""
    if split.name.endswith("_halves"):  # one volume cut in two (tune_split with a single training image)
        return (
            f"train on `{split.train[0].name}`, the first half of the training volume cut along its last axis, with "
            f"the kept objects of `SparseInstanceLabel(seed=S)`, score on `{split.test[0].name}`, the second half"
        )
    return (
        f"train on its first {len(split.train)} images with the kept objects of `SparseInstanceLabel(seed=S)`, "
        f"score on its last {len(split.test)} images"
    )


def report(split: Split, records: list[dict], flags: str = "", docs: str = "research/pages/learning_speed.md") -> str:
    """Markdown: how the screen ran, then one table per budget; ``flags``: those that select its runs, ``docs``: the
    page (both for the commands it states)."""
    flags = f" {flags}" if flags else ""
    machine = machine_info()
    lines = [
        "# Learning-speed screen (issue 24 item 3)",
        "",
        "Generated by `python -m research.learning_speed` from its cached runs; do not edit by hand.",
        "",
        "```bash",
        *_run_commands(records, flags),
        f".venv/bin/python -m research.learning_speed --no_run{flags} --docs {docs}",
        "```",
        "",
        f"- **Data**: {split.dataset}, training split only: {data_words(split)} (dense labels, never seen in "
        "training). The benchmark's validation images are not used: settings are chosen here.",
        "- **Recipes**: `configs/train.json` overrides (`RECIPES` in the script, each run's in its record) on top of "
        f"{_dataset_settings(split, records)}; everything else the bundle's defaults (`configs/train.json`, "
        "`configs/inference.json`).",
        "- **Columns**: AP50 / mAP with the head's foreground (what a user gets); the predicted objects' pixels "
        "against the true foreground (precision / recall); AP50 with the true foreground given (what the embeddings "
        "separate on their own); the last epoch's unweighted loss terms; 1-minute load average at start-end.",
        f"- **Machine**: {machine.get('cpu')}, {machine.get('nproc')} cores, torch {machine.get('torch')}, "
        f"{'GPU ' + str(machine.get('cuda')) if machine.get('cuda') else 'no GPU'}; each run 1 thread with a budget "
        "of process CPU seconds (enforced inside the training), two runs side by side. 'CPU s' (as measured by the "
        "script) is blank for runs scored from their saved predictions after a reporting error (`--rescore`) and "
        "for runs of the first grid whose count included the neighbour run (they shared one process).",
        *([f"- **Speed**: {speed}"] if (speed := reference_words(records)) else []),
        "- **Reading it**: a screen at a short budget only says which recipe learns fastest *early*; keep a recipe "
        "only when it also wins at the budget that matters (the ranking lists under each table show whether the "
        "order holds from one budget to the next). 'AP50 (true mask)' falling while AP50 rises means the recipe "
        "buys the head's speed with the embeddings' quality.",
        "",
    ]
    for budget in sorted({r["budget_s"] for r in records}):
        rows = [r for r in records if r["budget_s"] == budget]
        lines += [f"## {budget:g} CPU-s per run", "", table(rows), ""]
        for ratio in sorted({r["ratio"] for r in rows}):
            ranked = sorted((r for r in rows if r["ratio"] == ratio), key=lambda r: -r["head"]["ap50"])
            order = ", ".join(f"{_name(r)} {r['head']['ap50']:.3f}" for r in ranked)
            lines += [f"- {ratio:.0%} labelled, AP50 best first: {order}"]
        lines += [""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
