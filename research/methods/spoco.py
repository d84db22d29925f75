"""
SPOCO in the accuracy benchmark, run exactly as a user runs the bundle: ``python -m monai.bundle run training`` with
``configs/train.json``, then ``python -m monai.bundle run`` with ``configs/inference.json`` on the test images, each
in its own process, from the repository's files.

The training data are the split's original (dense) label files, listed in a temporary ``dataset.json``; the config's
own :class:`~spoco_bundle.transforms.SparseInstanceLabeld` keeps ``instance_ratio`` of the objects with ``seed``
(the same objects :func:`research.data.sparsify` gives every other method) and leaves everything else 0 =
unlabeled; background is *not* annotated (``background_label`` null), so the foreground head is trained
positive-unlabeled. Training stops at the time budget (``time_limit_s``; the learning rate follows a cosine over
the budget); no validation data are used (the final model is the result: picking a checkpoint by a dense-label
score would leak labels the sparse setting does not have).

Variants (ablations of the paper's claims) set one loss weight to 0: ``no_consistency``, ``no_unlabeled_push``,
``no_instance``. The annotation protocols: ``full`` is *objects only*; ``scribbles`` adds simulated background strokes
(:class:`~research.recipes.scribbles.SimulateScribbles`, put into the training by the config overlay
``research/configs/scribbles.json``: :data:`VARIANT_CONFIGS`); ``mask`` is *foreground mask given*: no training of its
own, the checkpoint of the finished ``spoco`` run of the same split and ratio (in the settings' ``out_dir``) segments
the test images inside their true foreground (``foreground_mask_dir``, as a user passes a mask per image).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from research.data import REPO_ROOT, MethodUnavailable, Result, Split
from research.settings import RunSettings, thread_env
from spoco_bundle.io import read_image, split_image_suffix, write_label_image

__all__ = [
    "VARIANTS",
    "VARIANT_CONFIGS",
    "TRAIN_CONFIG",
    "SETTINGS",
    "DATASET_SETTINGS",
    "settings_for",
    "Fit",
    "fit",
    "fit_predict",
    "predict",
    "read_predictions",
    "repredict",
    "run_ids",
    "study_overrides",
    "inference_clustering",
]

# the shipped model that fine-tuning starts from, and that the "shipped" variant runs as it is
SHIPPED_2D = "nuclei2d"

VARIANTS = {
    "full": {},
    "no_consistency": {"loss#consistency_weight": 0.0},
    "no_unlabeled_push": {"loss#unlabeled_weight": 0.0},
    "no_instance": {"loss#instance_weight": 0.0},
    # objects + background scribbles: strokes simulated in the true background of the dense labels (id 65535, an id
    # no object of the data sets uses), annotated background for the foreground head; the simulation comes with the
    # overlay of VARIANT_CONFIGS (4 strokes per image, its id "scribbles")
    "scribbles": {"background_label": 65535},
    # fine-tuning: the same training, started from the shipped 2D nuclei model's weights (issue 19)
    "finetuned": {"pretrained": SHIPPED_2D},
}

# the training config, and the overlays a variant adds after it (later files override earlier ones; paths relative to
# the repository root)
TRAIN_CONFIG = "configs/train.json"
VARIANT_CONFIGS = {"scribbles": ("research/configs/scribbles.json",)}

# per data set: training patch and inference options (everything else: the bundle's defaults)
SETTINGS = {
    2: {"patch_size": [192, 192], "image_scale": 1.0, "min_size": 16},
    3: {"patch_size": [32, 64, 64], "image_scale": 1.0, "min_size": 64},
}

# the documented settings for data that are not round nuclei (docs/data_kinds.md), chosen on training images only
DATASET_SETTINGS = {
    # densely packed neurite profiles, not star-convex: no split by shape, which cuts them along straight lines
    # (chosen on 4 training images; on usiigaci's training images the split still helps); cut along the head's
    # membrane map into a partition: the embeddings of unannotated neighbours are too alike to separate them
    # (chosen on the training images, docs/data_kinds.md); the head learns interiors against the annotated neurites'
    # outer pixel layer (foreground_surface, chosen on 4 held-back training slices, two seeds)
    "isbi2012": {"shape_split": 0.0, "clustering": "boundary", "background": "none", "foreground_surface": 1},
    # tissue where every voxel belongs to a cell: no background to find; cut along the head's membrane map, the head
    # trained on the annotated cells' interiors against the membrane on both sides of their surface (their outer 2
    # voxels and the 2 outside), with its own 0.5 (chosen on the training volume cut in two: docs/data_kinds.md)
    "plant3d": {
        "background": "none",
        "clustering": "boundary",
        "shape_split": 0.0,
        "foreground_surface": 2,
        "foreground_ring": 2,
        "foreground_calibration": "label_frequency",
    },
}
# the settings above that are inference.json ids (passed to training too, for its validation)
_INFERENCE_SETTINGS = ("background", "shape_split", "clustering")
# and those that are train.json ids only
_TRAINING_SETTINGS = ("foreground_surface", "foreground_ring", "foreground_calibration")


def settings_for(split: Split) -> dict:
    """The training / inference settings of a split: :data:`SETTINGS` of its dimensionality, then
    :data:`DATASET_SETTINGS` of its data set."""
    return {**SETTINGS[split.spatial_dims], **DATASET_SETTINGS.get(split.dataset, {})}


_ITERATIONS = re.compile(r"reached after (\d+) iterations")


def _cli_value(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _run(args: list[str], log_path: Path, threads: int) -> str:
    env = {**os.environ, **thread_env(threads), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    with open(log_path, "w") as log:
        proc = subprocess.run(args, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])} ... failed (exit {proc.returncode}); log {log_path}:\n{text[-3000:]}")
    return text


@dataclass
class Fit:
    """A finished training of :func:`fit`: its folder (checkpoint ``models/model.pt``, ``train.log``), the
    ``train.json`` ids it ran with, its optimisation steps, its wall / CPU seconds and its config files."""

    work: Path
    ids: dict
    iterations: int
    wall_s: float
    cpu_s: float
    configs: tuple[str, ...] = (TRAIN_CONFIG,)


def training_configs(variant: str) -> tuple[str, ...]:
    """The config files of a training variant: ``configs/train.json``, then the variant's overlays
    (:data:`VARIANT_CONFIGS`)."""
    return (TRAIN_CONFIG, *VARIANT_CONFIGS.get(variant, ()))


def fit(
    split: Split,
    ratio: float,
    run: RunSettings,
    variant: str = "full",
    work_dir: str | os.PathLike | None = None,
    overrides: dict | None = None,
) -> Fit:
    """Train the bundle on the split's training images for ``run.budget_s`` seconds (on ``run.clock``, with
    ``run.threads`` threads, on ``run.device``); no prediction.

    ``overrides``: further ``train.json`` ids to set (default ``run.overrides``, for hyperparameter studies).
    ``work_dir``: the run's folder (default: a new temporary one).
    """
    overrides = run.overrides if overrides is None else overrides
    if variant not in VARIANTS:
        raise ValueError(f"Unknown SPOCO training variant {variant!r}; valid: {sorted(VARIANTS)}.")
    work = Path(work_dir or tempfile.mkdtemp(prefix=f"spoco_{split.dataset}_{variant}_"))
    work.mkdir(parents=True, exist_ok=True)
    datalist = {"training": [{"image": i.path, "label": i.label_path} for i in split.train], "validation": []}
    (work / "dataset.json").write_text(json.dumps(datalist, indent=1))
    train = dict(
        bundle_ids(split, run.device),
        dataset_dir=str(work),
        ckpt_dir=str(work / "models"),
        output_dir=str(work / "runs"),
        instance_ratio=ratio,
        seed=run.seed,
        epochs=1_000_000,
        time_limit_s=run.budget_s,
        time_clock=run.clock,
        **VARIANTS[variant],
    )
    train.update({k: v for k, v in settings_for(split).items() if k in _TRAINING_SETTINGS})
    train.update(overrides)  # may replace the data set's patch_size / image_scale
    configs = training_configs(variant)
    t0, c0 = time.perf_counter(), _children_cpu()
    log = _bundle_run(configs, train, work / "train.log", run.threads, run_id="training")
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    found = _ITERATIONS.findall(log)
    iterations = int(found[-1]) if found else -1
    return Fit(work=work, ids=train, iterations=iterations, wall_s=wall, cpu_s=cpu, configs=configs)


def fit_predict(
    split: Split,
    ratio: float,
    run: RunSettings,
    variant: str = "full",
    work_dir: str | os.PathLike | None = None,
    overrides: dict | None = None,
    inference_configs: Sequence[str] = (),
) -> Result:
    """Train the bundle (:func:`fit`) and segment the split's test images with the trained model.

    ``overrides``: further ``train.json`` ids to set (default ``run.overrides``, for hyperparameter studies); they are
    recorded in the result's ``info``. ``work_dir``: the run's folder (default: a new temporary one).
    ``inference_configs``: overlays after ``configs/inference.json`` (a study's network or post-processing).
    """
    if variant not in VARIANTS and variant not in ("mask", "shipped"):
        raise ValueError(f"Unknown SPOCO variant {variant!r}; valid: {sorted(VARIANTS) + ['mask', 'shipped']}.")
    if variant == "mask":
        return _mask_given(split, ratio, run)
    if variant in ("finetuned", "shipped") and split.spatial_dims != 2:
        raise MethodUnavailable(f"the shipped {SHIPPED_2D} model is 2D; {split.dataset} is {split.spatial_dims}D")
    if variant == "shipped":
        return _shipped_as_is(split, run, work_dir)
    trained = fit(split, ratio, run, variant, work_dir, overrides)
    t0 = time.perf_counter()
    # inference at the training's patch size and scale
    shared = _inference_ids(trained.ids)
    predictions = predict(
        trained.work / "models" / "model.pt",
        split,
        trained.work,
        device=run.device,
        threads=run.threads,
        overrides=shared,
        configs=inference_configs,
    )
    infer_wall = time.perf_counter() - t0
    info = {
        "variant": variant,
        "train_cpu_s": round(trained.cpu_s, 1),
        "inference_s": round(infer_wall, 1),
        "threads": run.threads,
        "work_dir": str(trained.work),
        "overrides": {k: v for k, v in trained.ids.items() if k != "device"},
        "config_files": list(trained.configs),
        "inference_config_files": ["configs/inference.json", *inference_configs],
        "background": shared.get("background", "head"),
        "min_size": settings_for(split)["min_size"],
        "clustering": inference_clustering(shared),
    }
    return Result(predictions=predictions, train_seconds=trained.wall_s, iterations=trained.iterations, info=info)


def _shipped_as_is(split: Split, run: RunSettings, work_dir: str | os.PathLike | None) -> Result:
    """The shipped 2D model on the test images with no training and inference.json's defaults (its card's settings,
    ``image_scale`` auto): what a user gets before fine-tuning. The labelled fraction plays no part."""
    work = Path(work_dir or tempfile.mkdtemp(prefix=f"spoco_{split.dataset}_shipped_"))
    ckpt = REPO_ROOT / "models" / SHIPPED_2D / "model.pt"
    t0 = time.perf_counter()
    ids = {"image_scale": "auto"}  # the data set's patch size is replaced by the card's in inference.json
    predictions = predict(ckpt, split, work, device=run.device, threads=run.threads, overrides=ids)
    info = {
        "variant": "shipped",
        "model": SHIPPED_2D,
        "train_cpu_s": 0.0,
        "inference_s": round(time.perf_counter() - t0, 1),
        "threads": run.threads,
        "work_dir": str(work),
        "overrides": {},
        "background": "head",
        "min_size": settings_for(split)["min_size"],
        "clustering": inference_clustering(ids),
    }
    return Result(predictions=predictions, train_seconds=0.0, iterations=0, info=info)


def _mask_given(split: Split, ratio: float, run: RunSettings) -> Result:
    """The *foreground mask given* protocol: the objects-only run's checkpoint, its test images segmented inside
    their true foreground (one mask file per image in ``<work>/masks``). Its training numbers are that run's."""
    from research.records import load_record, run_path  # the harness owns the cache layout

    if not run.out_dir:
        raise RuntimeError("the mask protocol needs the results folder of the 'spoco' runs (RunSettings.out_dir)")
    device, threads = run.device, run.threads
    source = run_path(run.out_dir, split.dataset, split.name, "spoco", ratio)
    record = load_record(source)
    if not record or record.get("status") != "ok":
        raise RuntimeError(f"the mask protocol reuses the finished 'spoco' run, none at {source}: run it first")
    work = Path(record["info"]["work_dir"])
    ckpt = work / "models" / "model.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint of {source} not found: {ckpt}")
    masks = work / "masks"
    masks.mkdir(exist_ok=True)
    for item in split.test:
        stem = split_image_suffix(os.path.basename(item.path))[0]
        write_label_image(masks / f"{stem}.tif", (item.labels > 0).astype(np.uint8))
    t0 = time.perf_counter()
    ids = dict(run_ids(record), foreground_mask_dir=str(masks))
    predictions = predict(ckpt, split, work, device=device, threads=threads, tag="_mask", overrides=ids)
    info = dict(
        record["info"],
        inference_s=round(time.perf_counter() - t0, 1),
        background="mask (true foreground)",
        derived_from=str(source),
        clustering=inference_clustering(ids),
    )
    return Result(predictions, float(record["train_seconds"]), int(record["iterations"]), info)


def bundle_ids(split: Split, device: str) -> dict:
    """Config ids shared by training and inference (and by follow-up checks that parse the configs themselves)."""
    settings = settings_for(split)
    ids = {
        "bundle_root": str(REPO_ROOT),
        "device": f"$torch.device('{device}')",
        "spatial_dims": split.spatial_dims,
        "patch_size": settings["patch_size"],
        "image_scale": settings["image_scale"],
    }
    ids.update({k: settings[k] for k in _INFERENCE_SETTINGS if k in settings})
    return ids


def config_file_arg(configs: str | Sequence[str]) -> str:
    """``--config_file``'s value for one config file (its path) or several, later ones overriding earlier ones (the
    list as MONAI's CLI reads it, e.g. ``['configs/train.json','research/configs/scribbles.json']``)."""
    if isinstance(configs, str):
        return configs
    configs = list(configs)
    if not configs or any("'" in c or "," in c for c in configs):
        raise ValueError(f"config files must be named without quotes or commas, and at least one: {configs}")
    return configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"


def _bundle_run(
    configs: str | Sequence[str], ids: dict, log_path: Path, threads: int, run_id: str | None = None
) -> str:
    """``python -m monai.bundle run [run_id]`` with ``configs`` (one file or several, :func:`config_file_arg`) and
    the repository's metadata / logging, ids as flags."""
    args = [sys.executable, "-m", "monai.bundle", "run"] + ([run_id] if run_id else [])
    args += ["--config_file", config_file_arg(configs)]
    args += ["--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]
    args += [x for k, v in ids.items() for x in (f"--{k}", _cli_value(v))]
    return _run(args, log_path, threads)


def predict(
    ckpt_path: str | os.PathLike,
    split: Split,
    work_dir: str | os.PathLike,
    items: list | None = None,
    device: str = "cpu",
    threads: int = 2,
    tag: str = "",
    overrides: dict | None = None,
    configs: Sequence[str] = (),
) -> list[np.ndarray]:
    """Segment ``items`` (default: the split's test items; objects with ``path`` and ``labels`` attributes) with
    ``configs/inference.json`` and the checkpoint, as a user does (``--background head``); returns int32 labels.
    ``overrides``: further ``inference.json`` ids (e.g. ``image_scale``); ``configs``: overlays after
    ``configs/inference.json`` (later files replace earlier files' top-level ids).

    Inputs are linked into ``<work_dir>/test<tag>``, predictions go to ``<work_dir>/pred<tag>``.
    """
    items = split.test if items is None else items
    settings = settings_for(split)
    work = Path(work_dir)
    (work / f"test{tag}").mkdir(parents=True, exist_ok=True)
    for item in items:  # the inference config segments every image of a folder
        link = work / f"test{tag}" / os.path.basename(item.path)
        if not link.exists():
            link.symlink_to(os.path.abspath(item.path))
    infer = dict(
        bundle_ids(split, device),
        dataset_dir=str(work / f"test{tag}"),
        output_dir=str(work / f"pred{tag}"),
        ckpt_path=str(ckpt_path),
        min_size=settings["min_size"],
        output_ext=".tif",
    )
    infer.setdefault("background", "head")  # the data set's own (bundle_ids) where it has one
    infer.update(overrides or {})
    _bundle_run(("configs/inference.json", *configs), infer, work / f"inference{tag}.log", threads)
    return read_predictions(items, work, tag)


def read_predictions(items: list, work_dir: str | os.PathLike, tag: str = "") -> list[np.ndarray]:
    """The int32 labels :func:`predict` wrote for ``items`` into ``<work_dir>/pred<tag>``.

    Raises:
        FileNotFoundError: a prediction is missing. RuntimeError: one has another shape than its labels.
    """
    predictions = []
    for item in items:
        stem = split_image_suffix(os.path.basename(item.path))[0]
        pred, _ = read_image(Path(work_dir) / f"pred{tag}" / f"{stem}_instances.tif")
        pred = np.asarray(pred)
        if pred.shape != item.labels.shape:
            raise RuntimeError(f"prediction for {item.path} has shape {pred.shape}, labels {item.labels.shape}")
        predictions.append(pred.astype(np.int32))
    return predictions


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def _inference_ids(train_ids: dict) -> dict:
    """The training ids a checkpoint must be segmented with: its patch size, image scale, network shape (where a
    study changed it) and (where the data set sets them) background and shape split."""
    keys = ("patch_size", "image_scale", "features", "embedding_dim", *_INFERENCE_SETTINGS)
    return {k: train_ids[k] for k in keys if k in train_ids}


def run_ids(record: dict) -> dict:
    """:func:`_inference_ids` of a finished run, from its record."""
    return _inference_ids(record.get("info", {}).get("overrides", {}))


# train.json ids every run sets itself (paths, ratio, seed, budget, data set) and the variants' loss weights
_RUN_IDS = {"bundle_root", "device", "spatial_dims", "dataset_dir", "ckpt_dir", "output_dir", "instance_ratio"}
_RUN_IDS |= {"seed", "epochs", "time_limit_s", "time_clock"} | {k for v in VARIANTS.values() for k in v}


def study_overrides(record: dict) -> dict:
    """The ``train.json`` ids a finished run set beyond the benchmark's own: ``--overrides`` (or an
    ``overrides`` argument), with ``patch_size`` / ``image_scale`` only where they differ from :data:`SETTINGS`."""
    ids = record.get("info", {}).get("overrides", {})
    settings = SETTINGS.get(ids.get("spatial_dims"), {})
    return {k: v for k, v in ids.items() if k not in _RUN_IDS and not (k in settings and settings[k] == v)}


def inference_clustering(overrides: dict | None = None) -> str:
    """The post-processing a prediction with ``overrides`` uses (``configs/inference.json``'s defaults otherwise):
    the clustering method, ``+ threshold t`` when ``boundary`` seeds from another head threshold than 0.5, ``+ merge
    m`` when it merges weak contacts, and ``+ shape_split h`` when objects are split by shape."""
    config = json.loads((REPO_ROOT / "configs" / "inference.json").read_text())
    config.update(overrides or {})
    split = float(config.get("shape_split", 0) or 0)
    boundary = config["clustering"] == "boundary"
    merge = float(config.get("boundary_merge", 0) or 0) if boundary else 0.0
    threshold = config.get("boundary_threshold", 0.5) if boundary else 0.5
    return (
        str(config["clustering"])
        + (f" + threshold {threshold if isinstance(threshold, str) else f'{threshold:g}'}" if threshold != 0.5 else "")
        + (f" + merge {merge:g}" if merge > 0 else "")
        + (f" + shape_split {split:g}" if split > 0 else "")
    )


def repredict(
    record: dict, split: Split, device: str = "cpu", threads: int = 2, overrides: dict | None = None
) -> list[np.ndarray]:
    """
    Segment the split's test images again with the checkpoint of a finished run (``record`` from the benchmark's
    cache) and today's ``configs/inference.json`` (plus ``overrides``), at the run's patch size and image scale:
    to score new inference options (clustering) on the same trained models. A *foreground mask given* run
    (``spoco_mask``) segments inside the true masks it wrote, as it did. Outputs go to ``<work_dir>/pred_re``
    (``pred_mask_re``).

    Raises:
        FileNotFoundError: the run's checkpoint (or a mask run's masks) is gone (its work folder is temporary).
    """
    info = record.get("info", {})
    work = Path(info.get("work_dir", ""))
    ckpt = work / "models" / "model.pt"
    if not info.get("work_dir") or not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint of this run not found: {ckpt}")
    ids = dict(run_ids(record), **(overrides or {}))
    tag = "_re"
    if record.get("method") == "spoco_mask":
        masks = work / "masks"
        if not masks.is_dir():
            raise FileNotFoundError(f"foreground masks of this run not found: {masks}")
        ids.setdefault("foreground_mask_dir", str(masks))
        tag = "_mask_re"
    out = work / f"pred{tag}"
    if out.exists():  # no stale files from an earlier repredict
        for f in out.iterdir():
            f.unlink()
    return predict(ckpt, split, work, device=device, threads=threads, tag=tag, overrides=ids)
