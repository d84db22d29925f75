"""Data lists for the SPOCO bundle: discovery, validation and the image/label checks shared with the transforms.

Dataset layouts accepted by :func:`build_datalist` (paths inside are relative to ``dataset_dir``):

- ``dataset_dir/dataset.json`` in Decathlon style::

      {"training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
       "validation": [...],            # optional
       "test": ["imagesTs/c.tif", ...]}  # optional, strings or {"image": ...}

- otherwise ``imagesTr/`` and ``labelsTr/`` holding files with identical names (``.nii``, ``.nii.gz``, ``.tif``,
  ``.tiff``; an nnU-Net style image ``case_0000.nii.gz`` also pairs with ``case.nii.gz``), and optionally
  ``imagesTs/`` for the ``"test"`` section.

Label files hold instance ids: an integer type, 0 = unlabeled/background, 1..n = objects (gaps allowed), no
negative values. Images are single-channel 2D or 3D arrays.

Dimensionality rule (shared by :func:`validate_datalist` and the load transforms): an array with more axes than
``spatial_dims`` is accepted when the extra axes have size 1; trailing singleton axes are dropped first, then
leading ones (``(H, W, 1)`` and ``(1, H, W)`` become 2D ``(H, W)``; ``(Z, Y, X, 1)`` becomes 3D). Anything else
(an extra axis of size > 1, or fewer axes than ``spatial_dims``) is an error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from spoco_bundle.io import IMAGE_SUFFIXES, VOLUME_SUFFIXES, is_zarr, read_image, split_image_suffix
from spoco_bundle.labels import count_objects

__all__ = [
    "image_files",
    "foreground_mask_index",
    "foreground_mask_file",
    "checked_datalist",
    "evaluation_datalist",
    "build_datalist",
    "epoch_sampler",
    "epoch_samples",
    "validate_datalist",
    "split_for_validation",
    "spatial_squeeze_axes",
    "check_image_array",
    "check_label_array",
    "check_same_shape",
]

logger = logging.getLogger(__name__)

_SECTIONS = ("training", "validation", "test")
_FLOAT_LABEL_HINT = (
    "instance labels must be stored as integers (e.g. uint16 or uint32). If the ids are whole numbers, convert "
    "the file, e.g. `arr.round().astype(np.uint32)` and save it again (NIfTI: also reset scl_slope/scl_inter, "
    "since integer data with a scale factor is read as float)"
)


# ----------------------------------------------------------------------------------------------------------------
# array checks shared with spoco_bundle.transforms (numpy arrays or torch tensors, no channel axis)
# ----------------------------------------------------------------------------------------------------------------


# what fixes an image of this many dimensions given to the other kind of model
_DIMS_HINT = {
    2: "For 2D images train with --spatial_dims 2 (or --pretrained nuclei2d) and segment with a 2D model "
    "(--model nuclei2d).",
    3: "For volumes train with --spatial_dims 3 and segment with a 3D model (--model nuclei3d).",
}


def spatial_squeeze_axes(shape: Sequence[int], spatial_dims: int, filename: Any = None) -> tuple[int, ...]:
    """
    Axes to drop so that an array of ``shape`` has ``spatial_dims`` axes (see the module docstring for the rule).

    Args:
        shape: array shape without a channel axis.
        spatial_dims: 2 or 3.
        filename: named in the error message.

    Returns:
        the axes to squeeze, in descending order (so they can be removed one by one).

    Raises:
        ValueError: when the array has too few axes or an extra axis larger than 1.
    """
    shape = tuple(int(s) for s in shape)
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    if len(shape) < spatial_dims:
        raise ValueError(
            f"{filename}: image has {len(shape)} dimension(s) {shape}, but spatial_dims={spatial_dims} needs "
            f"{spatial_dims}D single-channel images. {_DIMS_HINT[len(shape)] if len(shape) in _DIMS_HINT else ''}"
        )
    axes = list(range(len(shape)))
    drop = []
    while len(axes) > spatial_dims and shape[axes[-1]] == 1:
        drop.append(axes.pop())
    while len(axes) > spatial_dims and shape[axes[0]] == 1:
        drop.append(axes.pop(0))
    if len(axes) > spatial_dims:
        hint = (
            "Several channels or time points: choose one with --input_channel / --input_time_point (TIFF, NIfTI "
            "and OME-Zarr files that name their axes)."
        )
        if len(axes) == 3:
            hint = f"{_DIMS_HINT[3]} {hint}"
        raise ValueError(
            f"{filename}: image has shape {shape} ({len(shape)} dimensions), but spatial_dims={spatial_dims} needs "
            f"{spatial_dims}D single-channel images (only singleton extra axes are dropped). {hint}"
        )
    return tuple(sorted(drop, reverse=True))


def _is_floating(arr: Any) -> bool:
    if isinstance(arr, torch.Tensor):
        return arr.is_floating_point() or arr.is_complex()
    dtype = np.asarray(arr).dtype
    return bool(np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.complexfloating))


def _dtype_name(arr: Any) -> str:
    return str(arr.dtype).replace("torch.", "")


def check_image_array(image: Any, spatial_dims: int, filename: Any = None) -> None:
    """
    Check one image (no channel axis): exactly ``spatial_dims`` axes, and finite values.

    Raises:
        ValueError: naming ``filename``.
    """
    if image.ndim != spatial_dims:
        raise ValueError(
            f"{filename}: image has spatial shape {tuple(image.shape)}, expected {spatial_dims}D (spatial_dims)."
        )
    if _is_floating(image):
        finite = torch.isfinite(image).all() if isinstance(image, torch.Tensor) else np.isfinite(image).all()
        if not bool(finite):
            raise ValueError(f"{filename}: image contains NaN or infinite values; fix or mask them before training.")


def check_label_array(label: Any, spatial_dims: int, filename: Any = None) -> None:
    """
    Check one instance label map (no channel axis): ``spatial_dims`` axes, an integer (or bool) type, no negatives.

    Raises:
        ValueError: naming ``filename``.
    """
    if label.ndim != spatial_dims:
        raise ValueError(
            f"{filename}: label has spatial shape {tuple(label.shape)}, expected {spatial_dims}D (spatial_dims)."
        )
    if _is_floating(label):
        raise ValueError(
            f"{filename}: label has floating-point type {_dtype_name(label)}; {_FLOAT_LABEL_HINT}. When loading with "
            "MONAI's LoadImaged, pass dtype=None (its default float32 makes every label float; LoadVolumed does this)."
        )
    if isinstance(label, torch.Tensor):
        if label.dtype == torch.bool or label.numel() == 0:
            return
    elif label.dtype == np.bool_ or label.size == 0:
        return
    if bool(label.min() < 0):
        raise ValueError(
            f"{filename}: label contains negative values (min {label.min()}); instance ids must be >= 0 "
            "(0 = unlabeled/background)."
        )


def check_same_shape(image_shape: Sequence[int], label_shape: Sequence[int], image_name: Any, label_name: Any) -> None:
    """Raise ValueError naming both files when the spatial shapes differ."""
    if tuple(image_shape) != tuple(label_shape):
        raise ValueError(
            f"Image/label shape mismatch: image {image_name} has spatial shape {tuple(image_shape)}, label "
            f"{label_name} has {tuple(label_shape)}."
        )


# ----------------------------------------------------------------------------------------------------------------
# data lists
# ----------------------------------------------------------------------------------------------------------------


def _supported(name: str) -> bool:
    return not name.startswith(".") and split_image_suffix(name)[1] != ""


def _resolve(dataset_dir: str, path: Any, where: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{where}: expected a file path, got {path!r}.")
    full = os.path.abspath(os.path.join(dataset_dir, os.fspath(path)))
    if not os.path.isfile(full):
        raise ValueError(f"{where}: listed file {full} does not exist.")
    return full


def _from_dataset_json(dataset_dir: str, json_path: str, section: str) -> list[dict]:
    try:
        with open(json_path) as f:
            spec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read {json_path}: {e}") from e
    if not isinstance(spec, Mapping):
        raise ValueError(f"{json_path}: expected a JSON object with a 'training' list.")
    if section == "training" and "training" not in spec:
        raise ValueError(f"{json_path} has no 'training' list.")
    entries = spec.get(section, [])
    if not isinstance(entries, list):
        raise ValueError(f"{json_path}: '{section}' must be a list, got {type(entries).__name__}.")
    out = []
    for i, entry in enumerate(entries):
        where = f"{json_path} '{section}'[{i}]"
        if isinstance(entry, (str, os.PathLike)) and section == "test":
            entry = {"image": entry}
        if not isinstance(entry, Mapping) or "image" not in entry:
            raise ValueError(f"{where}: expected an object with an 'image' path, got {entry!r}.")
        if section != "test" and "label" not in entry:
            raise ValueError(f"{where}: entry for image {entry['image']} has no 'label' path.")
        item = dict(entry)
        item["image"] = _resolve(dataset_dir, entry["image"], where)
        if "label" in entry:
            item["label"] = _resolve(dataset_dir, entry["label"], where)
        out.append(item)
    return out


def _from_folders(dataset_dir: str, section: str) -> list[dict]:
    images_dir = os.path.join(dataset_dir, "imagesTs" if section == "test" else "imagesTr")
    labels_dir = os.path.join(dataset_dir, "labelsTr")
    if section == "validation" or (section == "test" and not os.path.isdir(images_dir)):
        return []
    if section == "test":
        return [
            {"image": os.path.abspath(os.path.join(images_dir, n))}
            for n in sorted(os.listdir(images_dir))
            if _supported(n) and os.path.isfile(os.path.join(images_dir, n))
        ]
    if not (os.path.isdir(images_dir) and os.path.isdir(labels_dir)):
        raise ValueError(
            f"Dataset folder {dataset_dir} has neither a dataset.json nor imagesTr/ and labelsTr/ folders "
            f"(supported files: {', '.join(IMAGE_SUFFIXES)})."
        )
    return _pairs(images_dir, labels_dir)


def _pairs(images_dir: str, labels_dir: str) -> list[dict]:
    """The ``{"image", "label"}`` pairs of two folders holding files of the same names (an nnU-Net style image
    ``case_0000.nii.gz`` also pairs with ``case.nii.gz``), absolute paths."""
    labels = {n for n in os.listdir(labels_dir) if _supported(n) and os.path.isfile(os.path.join(labels_dir, n))}
    out, used = [], set()
    for name in sorted(os.listdir(images_dir)):
        if not _supported(name) or not os.path.isfile(os.path.join(images_dir, name)):
            continue
        stem, suffix = split_image_suffix(name)
        candidates = [name]
        if stem.endswith("_0000"):  # nnU-Net channel suffix: case_0000.nii.gz <-> case.nii.gz
            candidates.append(stem[: -len("_0000")] + suffix)
        label = next((c for c in candidates if c in labels), None)
        if label is None:
            raise ValueError(
                f"Image {os.path.join(images_dir, name)} has no label: expected "
                f"{' or '.join(os.path.join(labels_dir, c) for c in candidates)}."
            )
        used.add(label)
        out.append(
            {
                "image": os.path.abspath(os.path.join(images_dir, name)),
                "label": os.path.abspath(os.path.join(labels_dir, label)),
            }
        )
    unused = sorted(labels - used)
    if unused:
        logger.warning(f"{len(unused)} label file(s) in {labels_dir} have no image and are ignored: {unused[:5]}")
    return out


def build_datalist(dataset_dir: str | os.PathLike, section: str = "training", spatial_dims: int = 3) -> list[dict]:
    """
    List the ``{"image": path, "label": path}`` pairs of a dataset folder, with absolute paths.

    Args:
        dataset_dir: folder with a ``dataset.json`` or ``imagesTr/`` + ``labelsTr/`` (see the module docstring).
        section: ``"training"``, ``"validation"`` (the dataset.json list, ``[]`` when there is none) or ``"test"``
            (dataset.json ``"test"`` or ``imagesTs/``; entries have only ``"image"``).
        spatial_dims: 2 or 3; only checked here (shapes are checked by :func:`validate_datalist`).

    Raises:
        ValueError: naming the path, when the folder is missing, has no recognised layout, an image has no label,
            a listed file is missing, or the training list is empty.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    if section not in _SECTIONS:
        raise ValueError(f"section must be one of {_SECTIONS}, got {section!r}.")
    dataset_dir = os.path.abspath(os.fspath(dataset_dir))
    if not os.path.isdir(dataset_dir):
        raise ValueError(f"Dataset folder {dataset_dir} does not exist.")
    json_path = os.path.join(dataset_dir, "dataset.json")
    if os.path.isfile(json_path):
        datalist = _from_dataset_json(dataset_dir, json_path, section)
        source = json_path
    else:
        datalist = _from_folders(dataset_dir, section)
        source = os.path.join(dataset_dir, "imagesTr")
    if section == "training" and not datalist:
        raise ValueError(f"The training list from {source} is empty.")
    return datalist


def validate_datalist(
    datalist: Sequence[Mapping],
    spatial_dims: int = 3,
    background_label: int | None = None,
    require_labels: bool = True,
    image_key: str = "image",
    label_key: str = "label",
    input_channel: int | None = None,
    input_time_point: int | None = None,
) -> dict:
    """
    Open every image/label pair and check it with the same rules as
    :class:`~spoco_bundle.transforms.CheckImageLabeld`, so that bad data fails before training starts.

    Checks: the file is readable; dimensionality matches ``spatial_dims`` after dropping singleton axes
    (single-channel only); image and label shapes are equal; labels have an integer type (the type as read:
    float-stored labels and NIfTI integers with a scale factor are rejected) and no negative ids; images have no
    NaN/inf; at least one labelled object exists in the whole list.

    Args:
        datalist: ``[{"image": path, "label": path}, ...]`` as from :func:`build_datalist`.
        spatial_dims: 2 or 3.
        background_label: an id that marks annotated background, not counted as an object.
        require_labels: raise when an entry has no label (False: check images only, e.g. a test list).
        image_key: key of the image path.
        label_key: key of the label path.
        input_channel, input_time_point: the channel / time point of images with several (as loading reads them).

    Returns:
        ``{"num_images", "num_labels", "num_objects", "objects_per_image", "min_spatial_shape",
        "max_spatial_shape", "spacings"}`` (per-image lists in datalist order; spacings from the image affine).

    Raises:
        ValueError: naming the offending file.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    if not datalist:
        raise ValueError("The data list is empty.")
    shapes, spacings, objects = [], [], []
    num_labels = 0
    for i, item in enumerate(datalist):
        if image_key not in item:
            raise ValueError(f"Data list entry {i} has no {image_key!r} path: {dict(item)!r}.")
        image_path = os.fspath(item[image_key])
        image, meta = read_image(image_path, input_channel, input_time_point)
        drop = spatial_squeeze_axes(image.shape, spatial_dims, image_path)
        affine = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
        axis_spacing = np.sqrt((affine[:-1, :-1] ** 2).sum(0)).tolist() + [1.0] * image.ndim
        spacings.append(tuple(float(axis_spacing[a]) for a in range(image.ndim) if a not in drop))
        image = np.squeeze(image, axis=drop)
        check_image_array(image, spatial_dims, image_path)
        if image.size and image.min() == image.max():  # legal, but likely a failed export or an empty channel
            logger.warning(f"{image_path}: the image is constant (every voxel {image.flat[0]}); it teaches nothing.")
        shapes.append(image.shape)
        if label_key not in item:
            if require_labels:
                raise ValueError(f"Data list entry for image {image_path} has no {label_key!r} path.")
            objects.append(0)
            continue
        label_path = os.fspath(item[label_key])
        label, _ = read_image(label_path)
        label = np.squeeze(label, axis=spatial_squeeze_axes(label.shape, spatial_dims, label_path))
        check_label_array(label, spatial_dims, label_path)
        check_same_shape(image.shape, label.shape, image_path, label_path)
        objects.append(count_objects(label, background_label))
        num_labels += 1
    if require_labels and sum(objects) == 0:
        raise ValueError(
            f"None of the {len(datalist)} label files contains an annotated object (all ids are 0"
            f"{'' if background_label is None else f' or {background_label}'}), e.g. {datalist[0][label_key]}."
        )
    return {
        "num_images": len(datalist),
        "num_labels": num_labels,
        "num_objects": int(sum(objects)),
        "objects_per_image": objects,
        "min_spatial_shape": tuple(int(v) for v in np.min(shapes, axis=0)),
        "max_spatial_shape": tuple(int(v) for v in np.max(shapes, axis=0)),
        "spacings": spacings,
    }


def image_files(path: str | os.PathLike) -> list[str]:
    """
    Inputs to segment: ``path`` itself if it is a NIfTI/TIFF file or a Zarr store (``*.zarr``, ``*.ome.zarr``),
    else every NIfTI/TIFF file and Zarr store directly in the folder ``path`` (sorted, absolute paths).

    Raises:
        ValueError: naming the path, when it does not exist or holds no such file.
    """
    path = os.path.abspath(os.fspath(path))
    if is_zarr(path):
        return [path]
    if os.path.isfile(path):
        if not _supported(os.path.basename(path)):
            raise ValueError(f"Unsupported input file {path}: expected one of {VOLUME_SUFFIXES}.")
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"Input folder {path} does not exist.")
    files = sorted(
        os.path.join(path, f)
        for f in os.listdir(path)
        if not f.startswith(".") and (_supported(f) or f.lower().endswith(".zarr"))
    )
    if not files:
        raise ValueError(f"Input folder {path} holds no {VOLUME_SUFFIXES} files.")
    return files


def foreground_mask_index(mask_dir: str | os.PathLike, images: Sequence[str] = ()) -> dict[str, list[str]]:
    """
    The foreground masks in ``mask_dir`` by stem: ``{stem: [paths]}`` for every NIfTI/TIFF file directly in it
    (the stem is the name without ``.nii``, ``.nii.gz``, ``.tif``, ``.tiff``; see :func:`foreground_mask_file`).

    Args:
        mask_dir: the folder of masks.
        images: the images to be segmented; none of them may lie in ``mask_dir`` (their masks have their names).

    Raises:
        FileNotFoundError: naming the folder, when it does not exist or is not a folder.
        ValueError: when ``mask_dir`` is the folder of one of ``images``.
    """
    folder = os.path.abspath(os.fspath(mask_dir))
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise FileNotFoundError(f"foreground_mask_dir {folder} {what}.")
    for image in images:
        if os.path.samefile(os.path.dirname(os.path.abspath(image)) or ".", folder):
            raise ValueError(
                f"foreground_mask_dir {folder} is the folder of the input images ({image}): keep the masks in a "
                "folder of their own, each named like its image."
            )
    index: dict[str, list[str]] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if _supported(name) and os.path.isfile(path):
            index.setdefault(split_image_suffix(name)[0], []).append(path)
    return index


def foreground_mask_file(image: str | os.PathLike, index: Mapping[str, Sequence[str]], mask_dir: Any = None) -> str:
    """
    The foreground mask of ``image``: the one file of the mask folder with the image's stem, whatever its suffix
    (``.nii``, ``.nii.gz``, ``.tif``, ``.tiff``): image ``a.tif`` -> mask ``a.tif`` or ``a.nii.gz``, ... Stems compare
    exactly (case-sensitive), suffixes in any case.

    Args:
        image: the image path.
        index: the masks by stem, from :func:`foreground_mask_index`.
        mask_dir: the mask folder, for messages.

    Raises:
        FileNotFoundError: naming the image and the expected names, when there is no such mask.
        ValueError: naming the files, when there are several (e.g. ``a.tif`` and ``a.nii.gz``).
    """
    stem = split_image_suffix(image)[0]
    found = list(index.get(stem, ()))
    if not found:
        expected = ", ".join(f"{stem}{s}" for s in IMAGE_SUFFIXES)
        raise FileNotFoundError(
            f"no foreground mask for image {os.fspath(image)} in {mask_dir or 'the mask folder'} (expected one of "
            f"{expected})."
        )
    if len(found) > 1:
        raise ValueError(
            f"{len(found)} candidate foreground masks for image {os.fspath(image)}: {', '.join(found)}; keep one."
        )
    return found[0]


def epoch_samples(n_files: int, epoch_length: int) -> int:
    """
    Items in one pass of the training loader (``train#sampler``): the file list repeated, each time reshuffled, to
    cover at least one epoch of ``epoch_length`` iterations. With fewer files than iterations a pass then spans the
    epoch instead of ending after the file list (and, with ``num_workers``, restarting its worker processes); whole
    repetitions keep each file drawn once before any file is drawn again, across passes too. With at least
    ``epoch_length`` files a pass is the file list.

    Raises:
        ValueError: no training files, or an ``epoch_length`` that is not a positive whole number.
    """
    if n_files < 1:
        raise ValueError("The training data list is empty: nothing to sample (check dataset_dir and its datalist).")
    try:
        whole = not isinstance(epoch_length, bool) and float(epoch_length).is_integer() and epoch_length >= 1
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise ValueError(f"epoch_length must be a positive whole number of iterations, got {epoch_length!r}.")
    return n_files * -(-int(epoch_length) // n_files)


def epoch_sampler(dataset: Sequence, epoch_length: int) -> torch.utils.data.RandomSampler:
    """The training loader's sampler: the dataset's items in random order, as many as :func:`epoch_samples` puts in
    one pass (the file list repeated, each time reshuffled)."""
    return torch.utils.data.RandomSampler(dataset, num_samples=epoch_samples(len(dataset), epoch_length))


def checked_datalist(
    dataset_dir: str | os.PathLike,
    section: str = "training",
    spatial_dims: int = 3,
    background_label: int | None = None,
    input_channel: int | None = None,
    input_time_point: int | None = None,
) -> list[dict]:
    """
    :func:`build_datalist` followed by :func:`validate_datalist` (for a non-empty list), logging a one-line summary:
    what the training config calls so that bad data fails before any caching or training starts.
    """
    datalist = build_datalist(dataset_dir, section, spatial_dims)
    if datalist:
        summary = validate_datalist(
            datalist, spatial_dims, background_label, input_channel=input_channel, input_time_point=input_time_point
        )
        logger.info(
            f"{section} data from {os.fspath(dataset_dir)}: {summary['num_images']} images, "
            f"{summary['num_objects']} annotated objects, shapes {summary['min_spatial_shape']}.."
            f"{summary['max_spatial_shape']}"
        )
    return datalist


def evaluation_datalist(
    dataset_dir: str | os.PathLike,
    spatial_dims: int = 3,
    input_channel: int | None = None,
    input_time_point: int | None = None,
) -> list[dict]:
    """
    The image / dense-label pairs a model is scored on, checked (:func:`validate_datalist`), with one log line saying
    which: the ``validation`` list of ``dataset.json``; else ``imagesTs/`` + ``labelsTs/``; else the training pairs
    (``dataset.json``'s or ``imagesTr/`` + ``labelsTr/``), with a warning that the model may have been trained on
    them.

    Raises:
        ValueError: naming the folder, when it holds none of these layouts, or a pair is unreadable or inconsistent.
    """
    dataset_dir = os.path.abspath(os.fspath(dataset_dir))
    images_dir, labels_dir = os.path.join(dataset_dir, "imagesTs"), os.path.join(dataset_dir, "labelsTs")
    datalist = build_datalist(dataset_dir, "validation", spatial_dims)
    which = f"the validation list of {os.path.join(dataset_dir, 'dataset.json')}"
    if not datalist and os.path.isdir(images_dir) and os.path.isdir(labels_dir):
        datalist, which = _pairs(images_dir, labels_dir), f"the pairs of {images_dir} and {labels_dir}"
    if not datalist:
        datalist = build_datalist(dataset_dir, "training", spatial_dims)
        which = f"the training pairs of {dataset_dir} (no validation list, no imagesTs/ + labelsTs/)"
        logger.warning(f"scoring on {which}: images the model may have been trained on score higher than new ones")
    validate_datalist(datalist, spatial_dims, input_channel=input_channel, input_time_point=input_time_point)
    logger.info(f"scoring {len(datalist)} image(s): {which}")
    return datalist


def split_for_validation(
    datalist: Sequence[Mapping], fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """
    Split a data list reproducibly into ``(training, validation)``.

    ``round(fraction * n)`` items (half up) go to validation, at least 1 when ``fraction > 0`` and at most
    ``n - 1`` so that training is never empty; the choice depends only on ``seed`` and ``n``; both parts keep the
    input order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}.")
    n = len(datalist)
    n_val = int(np.floor(fraction * n + 0.5))
    if fraction > 0:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(n - 1, 0))
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [dict(d) for i, d in enumerate(datalist) if i not in val_idx]
    val = [dict(d) for i, d in enumerate(datalist) if i in val_idx]
    return train, val
