"""
Data of the accuracy benchmark (``python -m research.accuracy``): data sets, sparse labels, scoring and the method
interface.

Data (``data_dir``, default ``$SPOCO_DATA_DIR`` or the repository's ``../shared/data``):

- ``dsb2018``: one split, ``dsb2018/split.json`` ``training`` (268 images) -> ``validation`` (66), files
  ``images/<id>.tif`` and ``labels/<id>.tif``.
- ``gonuclear``: two splits, ``1135 -> 1136`` and ``1136 -> 1135`` (train on one volume, test on the other), files
  ``<id>_image.*`` / ``<id>_labels.*`` (NIfTI or TIFF).
- ``usiigaci`` (phase-contrast cells, 16 -> 4 images) and ``isbi2012`` (EM neurites, 16 -> 4 slices): one split each,
  laid out as ``dsb2018``.
- ``plant3d``: one volume of tissue with no background, split along x: training ``x < 100``, test ``x >= 100``. The
  two halves are written once as TIFF files under ``<cache_dir>/plant3d`` (default ``eval/data_cache``), because the
  SPOCO runs read files.
- ``gonuclear2d``: 2D nuclei of another organism and microscope than DSB2018 (a domain the shipped ``nuclei2d``
  never saw, for fine-tuning): every ``GONUCLEAR2D_STEP``-th z slice of each GoNuclear volume, written once as 2D
  TIFF files under ``<cache_dir>/gonuclear2d``; two splits, the slices of one volume -> those of the other.

Files are read with :func:`spoco_bundle.io.read_image`, so arrays have the bundle's axis order (storage order).

Sparse labels: :func:`sparsify` applies :class:`spoco_bundle.transforms.SparseInstanceLabel` with the *label file's*
stem as the selection name, which is what :class:`~spoco_bundle.transforms.SparseInstanceLabeld` uses in the
training config (it reads ``filename_or_obj`` of the loaded label). So a SPOCO run that loads the same label files
keeps exactly the objects every other method gets. The result is int64, 0 = unlabeled (SPOCO) / background (peers
without a notion of "unknown", e.g. StarDist), kept objects renumbered 1..K.

Scoring (:func:`score`): AP at IoU t is ``TP / (TP + FP + FN)`` with TP, FP, FN summed over all test images of the
split before dividing (pooled, as ``stardist.matching.matching_dataset(by_image=False)``); ``ap50`` at t = 0.5,
``map`` the mean over t = 0.50, 0.55, ..., 0.95. SBD, ARAND and VOI are means over test images; ARAND and VOI (the
partition scores) are reported for the 3D sets and for ``isbi2012``, and on ``isbi2012`` they leave out the pixels
that are background (membrane) in the ground truth, as the ISBI 2012 challenge's foreground-restricted Rand score
does. Per-image means of
AP50 / mAP are kept too (``ap50_per_image``, ``map_per_image``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from monai.data.utils import affine_to_spacing

from spoco_bundle.io import IMAGE_SUFFIXES, read_image, split_image_suffix
from spoco_bundle.metrics import DEFAULT_THRESHOLDS, _contingency, _true_positives, segmentation_scores
from spoco_bundle.transforms import SparseInstanceLabel

__all__ = [
    "DATASETS",
    "DEFAULT_DATASETS",
    "GONUCLEAR2D_STEP",
    "REPO_ROOT",
    "default_data_dir",
    "device_error",
    "Item",
    "Split",
    "Result",
    "MethodUnavailable",
    "FitPredict",
    "load_benchmark",
    "dataset_available",
    "selection_name",
    "sparsify",
    "kept_ids",
    "kept_digest",
    "label_counts",
    "score",
    "partition_scores",
    "normalize_image",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
# data set -> (spatial dims, how its files are laid out)
DATASET_LAYOUT = {
    "dsb2018": (2, "split_json"),
    "gonuclear": (3, "gonuclear"),
    "usiigaci": (2, "split_json"),
    "isbi2012": (2, "split_json"),
    "plant3d": (3, "plant3d"),
    "gonuclear2d": (2, "gonuclear2d"),
}
DATASETS = tuple(DATASET_LAYOUT)
# the accuracy grid's default: gonuclear2d re-uses GoNuclear's volumes, for the fine-tuning study only
DEFAULT_DATASETS = tuple(d for d in DATASETS if d != "gonuclear2d")
GONUCLEAR_VOLUMES = ("1135", "1136")
PLANT3D_SPLIT_X = 100
# gonuclear2d: z slices 2, 6, ..., 98 of each 100^3 volume (neighbouring slices cut the same nuclei)
GONUCLEAR2D_STEP = 4  # training x < 100, test x >= 100 (the data's README)
# ARAND / VOI: reported for these 2D sets too (the usual scores of dense EM), and computed over the ground truth's
# foreground only where its background is the membrane between touching objects
PARTITION_SCORES_2D = ("isbi2012",)
PARTITION_IGNORE_BACKGROUND = ("isbi2012",)


def default_data_dir() -> Path:
    """``$SPOCO_DATA_DIR`` if set, else ``<repository>/../shared/data``."""
    env = os.environ.get("SPOCO_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


class MethodUnavailable(RuntimeError):
    """A method cannot run here (missing optional environment or runner); the benchmark reports it as not run."""


@dataclass
class Item:
    """
    One image of a benchmark split.

    Args:
        name: image file stem (e.g. ``0287e7ee5b007c91``, ``1136_image``).
        image: raw intensities as float32, ``(H, W)`` or ``(Z, Y, X)``.
        labels: dense instance labels (int32, 0 = background), same shape.
        spacing: voxel size in array axis order (from the file), or None when the file has none.
        path: image file path.
        label_path: label file path; its stem is the sparse-label selection name.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, ...] | None
    path: str
    label_path: str

    @property
    def selection_name(self) -> str:
        return selection_name(self)


@dataclass
class Split:
    """
    A training / test split of one data set.

    Args:
        dataset: data set name (``dsb2018``, ``gonuclear``).
        name: split name (``train268_val66``, ``1135to1136``, ...).
        spatial_dims: 2 or 3.
        train: training images (methods see only ``sparsify`` of their labels).
        test: held-back images (dense labels, for scoring only).
    """

    dataset: str
    name: str
    spatial_dims: int
    train: list[Item]
    test: list[Item]


@dataclass
class Result:
    """
    What a method's ``fit_predict`` returns.

    Args:
        predictions: one integer instance label map per test image of the split (same order and shapes),
            0 = background.
        train_seconds: wall time of training (the part limited by the budget).
        iterations: optimisation steps (or parameter sets tried, for the classical baseline).
        info: anything worth keeping in the run's JSON (parameters, CPU time, thresholds, ...); JSON-serialisable.
    """

    predictions: list[np.ndarray]
    train_seconds: float
    iterations: int
    info: dict[str, Any] = field(default_factory=dict)


class FitPredict(Protocol):
    """``fit_predict(split, ratio, settings) -> Result`` of every benchmark method: train on ``split``'s training
    images with ``ratio`` of their objects kept, within ``settings.budget_s`` on ``settings.clock`` with
    ``settings.threads`` threads (:class:`~research.settings.RunSettings`), and segment its test images."""

    def __call__(self, split: Split, ratio: float, settings: Any) -> Result: ...


# ------------------------------------------------------------------------------------------------ loading


def _find(folder: Path, stem: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        path = folder / f"{stem}{suffix}"
        if path.exists():
            return path
    raise ValueError(f"{folder}: no file {stem} with one of the suffixes {IMAGE_SUFFIXES}.")


def _item(image_path: Path, label_path: Path) -> Item:
    image, meta = read_image(image_path)
    labels, _ = read_image(label_path)
    if image.shape != labels.shape:
        raise ValueError(
            f"{image_path}: image shape {image.shape} differs from label shape {labels.shape} ({label_path})."
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{label_path}: labels must be integers, got {labels.dtype}.")
    spacing = meta.get("spacing")  # TiffReader; NIfTI: from the affine
    if spacing is None and "affine" in meta:
        spacing = affine_to_spacing(np.asarray(meta["affine"], dtype=np.float64), r=image.ndim)
    spacing = None if spacing is None else tuple(float(s) for s in np.asarray(spacing).reshape(-1)[: image.ndim])
    return Item(
        name=split_image_suffix(image_path)[0],
        image=np.asarray(image, dtype=np.float32),
        labels=np.asarray(labels).astype(np.int32),
        spacing=spacing,
        path=str(image_path),
        label_path=str(label_path),
    )


def device_error(device: str) -> str | None:
    """Why ``--device`` cannot run here (None when it can): ``cpu``, or ``cuda`` / ``cuda:N`` with such a device.
    Checked when the arguments are parsed, instead of every run failing inside its bundle subprocess."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is not None and dev.type == "cpu":
        return None
    if dev is None or dev.type != "cuda":
        return f"--device must be cpu or cuda[:N], got {device!r}"
    if not torch.cuda.is_available():
        return f"--device {device}: this machine has no CUDA device (torch {torch.__version__})"
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def dataset_available(name: str, data_dir: str | os.PathLike | None = None) -> bool:
    """True when the files of data set ``name`` are under ``data_dir``."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if name not in DATASET_LAYOUT:
        raise ValueError(f"Unknown data set {name!r}; known: {DATASETS}.")
    layout = DATASET_LAYOUT[name][1]
    if layout == "split_json":
        return (root / name / "split.json").is_file()
    if layout == "plant3d":
        return all(any((root / name / f"plant3d_{k}{s}").exists() for s in IMAGE_SUFFIXES) for k in ("image", "labels"))
    folder = root / "gonuclear"  # gonuclear and the slices of gonuclear2d
    return all(
        any((folder / f"{v}_{k}{s}").exists() for s in IMAGE_SUFFIXES)
        for v in GONUCLEAR_VOLUMES
        for k in ("image", "labels")
    )


def load_benchmark(
    name: str,
    data_dir: str | os.PathLike | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[Split]:
    """
    Load the splits of data set ``name``.

    Args:
        name: one of :data:`DATASETS` (``gonuclear``: ``1135to1136`` and ``1136to1135``; the others one split).
        data_dir: folder holding the data sets; default :func:`default_data_dir`.
        max_train: keep only the first N training images of each split (quick checks; None = all).
        max_test: likewise for the test images.
        cache_dir: where ``plant3d``'s two halves are written (default ``eval/data_cache``).

    Raises:
        FileNotFoundError: naming the folder, when the data set is not there.
        ValueError: for an unknown name or unreadable files.
    """
    # absolute: the SPOCO runs list these paths in a dataset.json that the bundle resolves against its own folder
    root = (Path(data_dir) if data_dir is not None else default_data_dir()).resolve()
    if name not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; known: {DATASETS}.")
    if not dataset_available(name, root):
        raise FileNotFoundError(f"Data set {name!r} not found under {root} (expected {root / name}).")
    dims, layout = DATASET_LAYOUT[name]
    if layout == "split_json":
        folder = root / name
        with open(folder / "split.json") as f:
            split = json.load(f)
        if not {"training", "validation"} <= set(split):
            raise ValueError(f"{folder / 'split.json'}: needs 'training' and 'validation' lists, got {sorted(split)}.")
        train_ids = split["training"][:max_train]
        test_ids = split["validation"][:max_test]

        def load(ids: Sequence[str]) -> list[Item]:
            return [_item(_find(folder / "images", i), _find(folder / "labels", i)) for i in ids]

        split_name = f"train{len(split['training'])}_val{len(split['validation'])}"
        return [_make_split(name, split_name, dims, load(train_ids), load(test_ids))]
    if layout == "plant3d":
        train, test = _plant3d_halves(root / name, cache_dir)
        return [_make_split(name, f"x{PLANT3D_SPLIT_X}", dims, [train], [test])]
    if layout == "gonuclear2d":
        slices = {v: _gonuclear_slices(root / "gonuclear", v, cache_dir) for v in GONUCLEAR_VOLUMES}
        a, b = GONUCLEAR_VOLUMES
        return [
            _make_split(name, f"{a}to{b}", 2, slices[a][:max_train], slices[b][:max_test]),
            _make_split(name, f"{b}to{a}", 2, slices[b][:max_train], slices[a][:max_test]),
        ]
    folder = root / "gonuclear"
    items = {v: _item(_find(folder, f"{v}_image"), _find(folder, f"{v}_labels")) for v in GONUCLEAR_VOLUMES}
    a, b = GONUCLEAR_VOLUMES
    return [
        _make_split("gonuclear", f"{a}to{b}", 3, [items[a]], [items[b]]),
        _make_split("gonuclear", f"{b}to{a}", 3, [items[b]], [items[a]]),
    ]


def _up_to_date(paths: Sequence[Path], newest: float) -> bool:
    """Every derived file exists and is not older than its source (modification time ``newest``)."""
    return all(p.is_file() and p.stat().st_mtime >= newest for p in paths)


def _write_tiff(path: Path, array: np.ndarray, **kwargs) -> None:
    """An ImageJ TIFF written whole or not at all (a reader never sees half a file)."""
    import tifffile

    tmp = path.with_name(path.name + ".part")
    tifffile.imwrite(tmp, np.ascontiguousarray(array), imagej=True, **kwargs)
    os.replace(tmp, path)


def _plant3d_halves(folder: Path, cache_dir: str | os.PathLike | None) -> tuple[Item, Item]:
    """The training (x < 100) and test (x >= 100) halves of the plant volume, as files of their own (written when
    missing or older than the source)."""
    cache = Path(cache_dir or REPO_ROOT / "eval" / "data_cache") / "plant3d"
    image_path, label_path = _find(folder, "plant3d_image"), _find(folder, "plant3d_labels")
    newest = max(image_path.stat().st_mtime, label_path.stat().st_mtime)
    halves = {"train": np.s_[..., :PLANT3D_SPLIT_X], "test": np.s_[..., PLANT3D_SPLIT_X:]}
    paths = {h: (cache / f"plant3d_{h}_image.tif", cache / f"plant3d_{h}_labels.tif") for h in halves}
    if not _up_to_date([p for pair in paths.values() for p in pair], newest):
        image, _ = read_image(image_path)
        labels, _ = read_image(label_path)
        cache.mkdir(parents=True, exist_ok=True)
        for half, index in halves.items():
            for array, path in zip((np.asarray(image), np.asarray(labels)), paths[half]):
                _write_tiff(path, array[index], metadata={"axes": "ZYX"})
    return _item(*paths["train"]), _item(*paths["test"])


def _gonuclear_slices(folder: Path, volume: str, cache_dir: str | os.PathLike | None) -> list[Item]:
    """Every :data:`GONUCLEAR2D_STEP`-th z slice of GoNuclear volume ``volume`` as 2D items, their files written under
    ``<cache_dir>/gonuclear2d`` when missing or older than the source (an image and a label TIFF per slice)."""
    cache = Path(cache_dir or REPO_ROOT / "eval" / "data_cache") / "gonuclear2d"
    image_path, label_path = _find(folder, f"{volume}_image"), _find(folder, f"{volume}_labels")
    newest = max(image_path.stat().st_mtime, label_path.stat().st_mtime)
    source = _item(image_path, label_path)
    z = range(GONUCLEAR2D_STEP // 2, source.image.shape[0], GONUCLEAR2D_STEP)
    paths = [(cache / f"{volume}_z{i:03d}_image.tif", cache / f"{volume}_z{i:03d}_labels.tif") for i in z]
    if not _up_to_date([p for pair in paths for p in pair], newest):
        cache.mkdir(parents=True, exist_ok=True)
        image, labels = read_image(image_path)[0], read_image(label_path)[0]
        # the volume's y / x voxel size, as an ImageJ TIFF states it
        resolution = tuple(1.0 / s for s in source.spacing[1:]) if source.spacing else None
        meta = {"axes": "YX", "unit": "um"} if source.spacing else {"axes": "YX"}
        for i, pair in zip(z, paths):
            for array, path in zip((np.asarray(image)[i], np.asarray(labels)[i]), pair):
                _write_tiff(path, array, resolution=resolution, metadata=meta)
    return [_item(*pair) for pair in paths]


def volume_halves(item: Item, cache_dir: str | os.PathLike | None = None) -> tuple[Item, Item]:
    """``item`` cut in two along its last axis, each half an image and a label TIFF of its own (ImageJ, the voxel
    size kept) under ``<cache_dir>/tune_halves`` (default ``eval/data_cache``), written when missing or older than
    the source; a half's label file name is its own, so its sparse-label selection is too."""
    if int(item.labels.max(initial=0)) > np.iinfo(np.uint16).max:
        raise ValueError(f"{item.label_path}: ids above 65535 do not fit the halves' 16-bit label TIFFs.")
    cache = Path(cache_dir or REPO_ROOT / "eval" / "data_cache") / "tune_halves"
    newest = max(Path(item.path).stat().st_mtime, Path(item.label_path).stat().st_mtime)
    stem, cut = item.name.removesuffix("_image"), item.image.shape[-1] // 2
    parts = {"a": np.s_[..., :cut], "b": np.s_[..., cut:]}
    paths = {t: (cache / f"{stem}_{t}_image.tif", cache / f"{stem}_{t}_labels.tif") for t in parts}
    if not _up_to_date([p for pair in paths.values() for p in pair], newest):
        meta: dict = {"axes": "ZYX" if item.image.ndim == 3 else "YX"}
        kwargs: dict = {}
        if item.spacing is not None:
            kwargs["resolution"] = (1.0 / item.spacing[-1], 1.0 / item.spacing[-2])
            if item.image.ndim == 3:
                meta["spacing"] = item.spacing[0]
        source = np.asarray(read_image(item.path)[0])  # the file's own dtype, not the float32 copy
        cache.mkdir(parents=True, exist_ok=True)
        for tag, index in parts.items():
            for array, path in zip((source, item.labels.astype(np.uint16)), paths[tag]):
                _write_tiff(path, array[index], metadata=meta, **kwargs)
    first, second = (_item(*paths[t]) for t in parts)
    return first, second


def _make_split(dataset: str, name: str, spatial_dims: int, train: list[Item], test: list[Item]) -> Split:
    for item in train + test:
        if item.image.ndim != spatial_dims:
            raise ValueError(f"{item.path}: expected a {spatial_dims}D image, got shape {item.image.shape}.")
    return Split(dataset, name, spatial_dims, train, test)


def cached_checkpoint(
    dataset: str, split: str | None, method: str, ratio: float, out_dir: str | os.PathLike, data_dir=None
) -> tuple[Split, Path, dict[str, Any], Path]:
    """
    The checkpoint of a finished benchmark run, for follow-up checks on the same model.

    Returns ``(split, run_dir, record, checkpoint)``; ``split`` None = the data set's first split. Exits with a
    message (no traceback) for an unknown split, a missing run record or a deleted checkpoint.
    """
    splits = [s for s in load_benchmark(dataset, data_dir) if split in (None, s.name)]
    if not splits:
        raise SystemExit(f"{dataset} has no split {split!r}.")
    run_dir = Path(out_dir) / dataset / splits[0].name / method
    path = run_dir / f"ratio_{ratio:.2f}.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run python -m research.accuracy for {method} at {ratio:g} first.")
    record = json.loads(path.read_text())
    info = record.get("info", {})
    if info.get("variant") == "shipped":  # no training: the shipped model itself
        return splits[0], run_dir, record, REPO_ROOT / "models" / str(info.get("model")) / "model.pt"
    ckpt = Path(info.get("work_dir", "")) / "models" / "model.pt"
    if not ckpt.is_file():
        raise SystemExit(f"{ckpt} (the checkpoint of {path}) is gone; rerun that run with --force.")
    return splits[0], run_dir, record, ckpt


# ------------------------------------------------------------------------------------------------ sparse labels


def selection_name(item: Item) -> str:
    """The name :class:`~spoco_bundle.transforms.SparseInstanceLabeld` derives for this item's label file."""
    return split_image_suffix(os.path.basename(item.label_path))[0]


def sparsify(item: Item, ratio: float, seed: int) -> np.ndarray:
    """
    The item's sparse training labels: the objects :class:`~spoco_bundle.transforms.SparseInstanceLabel` keeps
    (``instance_ratio=ratio``, ``background_label=None``, ``seed``, selection by the label file's stem), renumbered
    1..K (in the order of their original ids); everything else 0. int64, same shape as the image.
    """
    return SparseInstanceLabel(instance_ratio=ratio, background_label=None, seed=seed)(
        item.labels, name=item.selection_name
    )


def kept_ids(item: Item, ratio: float, seed: int) -> np.ndarray:
    """Original ids of the objects kept by :func:`sparsify` (sorted)."""
    ids = np.unique(item.labels)
    return SparseInstanceLabel(instance_ratio=ratio, background_label=None, seed=seed).kept_ids(
        ids[ids != 0], item.selection_name
    )


def kept_digest(split: Split, ratio: float, seed: int) -> str:
    """A short hash of the kept objects of every training image (recorded per run: same value = same objects)."""
    h = hashlib.sha256()
    for item in split.train:
        h.update(f"{item.selection_name}:{','.join(map(str, kept_ids(item, ratio, seed).tolist()))};".encode())
    return h.hexdigest()[:16]


def label_counts(split: Split, ratio: float, seed: int) -> tuple[int, int]:
    """(kept objects, all objects) over the training images."""
    kept = total = 0
    for item in split.train:
        n = len(np.unique(item.labels)) - int((item.labels == 0).any())
        total += n
        kept += SparseInstanceLabel(instance_ratio=ratio, seed=seed).num_kept(n)
    return kept, total


# ------------------------------------------------------------------------------------------------ scoring


def partition_scores(dataset: str | None, spatial_dims: int) -> bool:
    """Whether ARAND and VOI are reported for a data set (3D sets and :data:`PARTITION_SCORES_2D`)."""
    return spatial_dims == 3 or dataset in PARTITION_SCORES_2D


def score(
    predictions: Sequence[np.ndarray],
    ground_truth: Sequence[np.ndarray],
    spatial_dims: int,
    dataset: str | None = None,
) -> dict[str, Any]:
    """
    Score predictions of a test set (see the module docstring for the aggregation).

    Args:
        predictions: integer label maps, 0 = background.
        ground_truth: dense label maps of the same shapes.
        spatial_dims: 2 or 3; ARAND and VOI (label 0 one more segment) are added for 3D.
        dataset: the data set's name, for its conventions (:func:`partition_scores`; ground-truth background
            left out of ARAND / VOI for :data:`PARTITION_IGNORE_BACKGROUND`).

    Returns:
        ``ap50``, ``map`` (pooled), ``ap50_per_image``, ``map_per_image``, ``sbd`` (means over images), ``arand``,
        ``voi_split``, ``voi_merge`` (3D only), ``tp50``, ``fp50``, ``fn50``, ``n_gt``, ``n_pred``,
        ``fg_precision`` / ``fg_recall`` (the predicted objects' pixels against the true foreground, pooled over
        images: how well the foreground was found, whatever the instances), and ``per_image``: a list of
        per-image dicts (``ap50``, ``map``, ``sbd``, ``n_gt``, ``n_pred``, ...).
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truth)} ground-truth images.")
    if not predictions:
        raise ValueError("score: no test images.")
    thresholds = [float(t) for t in DEFAULT_THRESHOLDS]
    partition = partition_scores(dataset, spatial_dims)
    ignore_background = dataset in PARTITION_IGNORE_BACKGROUND
    tp = np.zeros(len(thresholds), dtype=np.int64)
    n_gt = n_pred = 0
    fg_hit = fg_pred = fg_true = 0
    per_image = []
    for pred, gt in zip(predictions, ground_truth):
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}.")
        fg_hit += int(np.count_nonzero((pred > 0) & (gt > 0)))
        fg_pred += int(np.count_nonzero(pred > 0))
        fg_true += int(np.count_nonzero(gt > 0))
        table = _contingency(gt, pred)
        tp += _true_positives(table, thresholds)
        n_gt += table.n_gt
        n_pred += table.n_seg
        scores = segmentation_scores(gt, pred, ignore_background=ignore_background)
        entry = {
            "ap50": scores["ap50"],
            "map": scores["map"],
            "sbd": scores["sbd"],
            "n_gt": table.n_gt,
            "n_pred": table.n_seg,
        }
        if partition:
            entry.update(arand=scores["arand"], voi_split=scores["voi_split"], voi_merge=scores["voi_merge"])
        per_image.append(entry)
    denom = (n_gt + n_pred - tp).astype(np.float64)
    ap = np.where(denom > 0, tp / np.maximum(denom, 1), 1.0)
    i50 = thresholds.index(0.5)
    out: dict[str, Any] = {
        "ap50": float(ap[i50]),
        "map": float(ap.mean()),
        "ap50_per_image": float(np.mean([e["ap50"] for e in per_image])),
        "map_per_image": float(np.mean([e["map"] for e in per_image])),
        "sbd": float(np.mean([e["sbd"] for e in per_image])),
        "tp50": int(tp[i50]),
        "fp50": int(n_pred - tp[i50]),
        "fn50": int(n_gt - tp[i50]),
        "n_gt": int(n_gt),
        "n_pred": int(n_pred),
        "ap_by_threshold": {f"{t:.2f}": float(a) for t, a in zip(thresholds, ap)},
        "fg_precision": fg_hit / fg_pred if fg_pred else float("nan"),
        "fg_recall": fg_hit / fg_true if fg_true else float("nan"),
    }
    if partition:
        for key in ("arand", "voi_split", "voi_merge"):
            out[key] = float(np.mean([e[key] for e in per_image]))
    out["per_image"] = per_image
    return out


# ------------------------------------------------------------------------------------------------ helpers


def normalize_image(image: np.ndarray, lower: float = 1.0, upper: float = 99.8) -> np.ndarray:
    """Percentile normalisation to about [0, 1] (as the training config's ScaleIntensityRangePercentilesd)."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(image, (lower, upper))
    return (image - lo) / max(float(hi - lo), 1e-6)
