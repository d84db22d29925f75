"""
Train and score the models that ship with the bundle (``models/<name>/``), reproducibly.

    .venv/bin/python scripts/shipped_models.py train nuclei2d [--budget_s 1800] [--threads 2] [--data_dir D]
        [--device cuda --clock wall --num_workers 3] [--no_score]
    .venv/bin/python scripts/shipped_models.py score nuclei2d [--threads 2] [--data_dir D]
    .venv/bin/python scripts/shipped_models.py docs

``docs`` (also the last step of ``train`` and ``score``) runs ``scripts/sync_docs.py``: the table of shipped models in
README.md and the model card, and ``metadata.json``'s ``eval_metrics``, are copied from the ``model.json`` files, so
the figures there are the scored ones.

``train`` runs the bundle's own training (``configs/train.json`` through ``monai.bundle run``, as a user does) on the
model's training data with *dense* labels (``instance_ratio 1``, ``background_label 0``: every unlabelled pixel is
background, so the foreground head trains supervised), for a time budget (CPU seconds on the CPU; wall seconds with
``--device cuda --clock wall``, on a GPU machine, with ``--num_workers`` data-loading processes), and copies the
weights to ``models/<name>/model.pt`` (the model records its training object size, see ``spoco_bundle.measure``). It
writes ``models/<name>/model.json``: the training's own model card (its inference settings, read by
``--model <name>``, :mod:`spoco_bundle.cards`; the size of what it was trained on) plus what the model is, the exact
training settings, iterations, CPU (or GPU wall) time, machine and commit. ``score``
segments the model's held-out images with ``configs/inference.json`` and the model's settings (the defaults,
``--image_scale auto``) and adds the scores (AP50, mAP, SBD, pooled as in ``python -m research.accuracy``) to
``model.json``; the front pages copy them from there.

Models:

- ``nuclei2d``: fluorescence nuclei, DSB2018 stage 1 training split of ``../shared/data/dsb2018`` (268 images, CC0)
  -> validation split (66 images).
- ``nuclei3d``: 3D nuclei, GoNuclear volume 1135 -> 1136 (one volume each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from scripts import sync_docs  # noqa: E402

# the lab's harness (research/: data, the bundle's runs, scores) is imported where a model is trained or scored, so
# that reading MODELS (as the tests do) needs nothing from research/

MODELS = {
    "nuclei2d": {
        "dataset": "dsb2018",
        "split": "train268_val66",
        "description": "fluorescence nuclei, 2D; trained on the DSB2018 stage 1 training split (268 images, dense "
        "labels, CC0), scored on its validation split (66 images)",
    },
    "nuclei3d": {
        "dataset": "gonuclear",
        "split": "1135to1136",
        "description": "nuclei in 3D (plant tissue, confocal); trained on ONE GoNuclear volume (1135, 100^3 voxels, "
        "54 nuclei, dense labels), scored on the other (1136): very little real 3D data",
    },
}
WORK_IDS = ("bundle_root", "dataset_dir", "ckpt_dir", "output_dir")
DENSE = {"instance_ratio": 1.0, "background_label": 0}


def model_dir(name: str) -> Path:
    return REPO_ROOT / "models" / name


def _split(name: str, data_dir: str | None):
    from research.data import load_benchmark

    splits = load_benchmark(MODELS[name]["dataset"], data_dir)
    return next(s for s in splits if s.name == MODELS[name]["split"])


def train(args: argparse.Namespace) -> Path:
    from research.methods.spoco import SETTINGS, fit
    from research.records import git_commit, machine_info
    from research.settings import RunSettings

    split = _split(args.name, args.data_dir)
    work = REPO_ROOT / "eval" / "shipped" / args.name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.strftime("%Y-%m-%d %H:%M:%S")
    run = RunSettings(budget_s=args.budget_s, clock=args.clock, threads=args.threads, seed=0, device=args.device)
    overrides = dict(DENSE, **({"num_workers": args.num_workers} if args.num_workers else {}))
    trained = fit(split, 1.0, run, work_dir=work, overrides=overrides)
    out = model_dir(args.name)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "models" / "model.pt", out / "model.pt")
    settings = SETTINGS[split.spatial_dims]
    # the training's own card (spoco_bundle.handlers.ModelCardWriter): what configs/inference.json takes from here
    # with --model (spoco_bundle.cards), the run's settings and the size of what it was trained on
    card_in = json.loads((work / "models" / "model.json").read_text())
    inference = {**card_in["inference"], "spatial_dims": split.spatial_dims, "min_size": settings["min_size"]}
    measured = ("object_diameter", "image_blob_scale", "voxel_size", "voxel_unit")
    flags = f"--budget_s {args.budget_s:g} --threads {args.threads}"
    if args.device != "cpu" or args.clock != "cpu":
        flags += f" --device {args.device} --clock {args.clock}"
    if args.num_workers:
        flags += f" --num_workers {args.num_workers}"
    card = {
        "name": args.name,
        "description": MODELS[args.name]["description"],
        "bundle_version": card_in["bundle_version"],
        "inference": inference,
        "training": {
            "command": f"python scripts/shipped_models.py train {args.name} {flags}",
            "data": f"{split.dataset} {split.name}: {len(split.train)} training images",
            # the training card's settings and the run's train.json ids, less its (temporary) folders and device
            "settings": {
                k: v
                for k, v in {**card_in["training"]["settings"], **trained.ids}.items()
                if k not in WORK_IDS + ("device",)
            },
            **{k: card_in["training"][k] for k in measured if k in card_in["training"]},
            "budget": f"{args.budget_s:g} {args.clock} s ({args.threads} threads, {args.device})",
            "device": args.device,
            "train_cpu_s": round(trained.cpu_s, 1),
            "train_wall_s": round(trained.wall_s, 1),
            "iterations": trained.iterations,
            "started": t0,
            "machine": machine_info(),
            "commit": git_commit(),
        },
        "scores": {},
    }
    (out / "model.json").write_text(json.dumps(card, indent=1, default=float) + "\n")
    print(f"[shipped] {args.name}: {trained.iterations} iterations in {trained.wall_s:.0f} s -> {out}")
    return out


def _scores(scores: dict, split, how: str) -> dict:
    keep = ("ap50", "map", "sbd", "n_gt", "n_pred")
    n = len(split.test)
    return {"images": f"{split.dataset} {split.name}: {n} held-out image{'s' * (n != 1)}", "how": how} | {
        k: scores[k] for k in keep if k in scores
    }


def score_model(args: argparse.Namespace) -> dict:
    from research.data import score
    from research.methods.spoco import predict

    split = _split(args.name, args.data_dir)
    out = model_dir(args.name)
    card = json.loads((out / "model.json").read_text())
    work = REPO_ROOT / "eval" / "shipped" / f"{args.name}_score"
    if work.exists():
        shutil.rmtree(work)
    ids = dict(card["inference"], image_scale="auto")
    preds = predict(out / "model.pt", split, work, threads=args.threads, overrides=ids)
    scores = score(preds, [i.labels for i in split.test], split.spatial_dims)
    from spoco_bundle.inferers import native_bfloat16

    precision = "bfloat16" if native_bfloat16("cpu") else "float32"  # what precision auto took on this CPU
    how = f"configs/inference.json defaults (image_scale auto, precision auto: {precision} here)"
    card["scores"]["default_inference"] = _scores(scores, split, how)
    (out / "model.json").write_text(json.dumps(card, indent=1, default=float) + "\n")
    print(f"[shipped] {args.name} on {split.name}: AP50 {scores['ap50']:.3f}, mAP {scores['map']:.3f}")
    return scores


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("train", "score", "docs"))
    p.add_argument("name", nargs="?", choices=sorted(MODELS))
    p.add_argument("--budget_s", type=float, default=1800.0, help="training budget, seconds on --clock")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="budget clock (wall on a GPU machine)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--num_workers", type=int, default=0, help="data-loading processes of the training")
    p.add_argument("--no_score", action="store_true", help="train only (score later, e.g. on another machine)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data_dir", default=None, help="default: $SPOCO_DATA_DIR, else ../shared/data")
    args = p.parse_args(argv)
    if args.action == "docs":
        return sync_docs.main([])
    if args.name is None:
        p.error(f"{args.action} needs a model name: {sorted(MODELS)}")
    if args.action == "train":
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device on this machine (train on the CPU with --device cpu)")
        train(args)
        if args.no_score:
            return 0
    score_model(args)
    return sync_docs.main([])  # the cards' new figures into README.md, the model card and metadata.json


if __name__ == "__main__":
    sys.exit(main())
