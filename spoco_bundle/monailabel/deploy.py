"""What the bundle needs to be served by MONAI Label's stock ``monaibundle`` app (see docs/monailabel.md)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import MetaKeys

from spoco_bundle.bundle import bundle_root, config_parser
from spoco_bundle.cards import read_card, write_card
from spoco_bundle.networks import load_weights
from spoco_bundle.package import network_data_format

__all__ = [
    "MonaiLabelWriterOrderd",
    "MONAILABEL_IMAGE_PATH_KEY",
    "MONAILABEL_POSTPROCESSING",
    "add_monailabel_postprocessing",
    "deploy_bundle",
]

logger = logging.getLogger(__name__)

# the card's network and preprocessing settings a deployment's own training must keep (configs/train.json ids)
_CARD_TRAIN_IDS = ("spatial_dims", "features", "embedding_dim", "patch_size", "intensity_percentiles")

# BasicInferTask.__call__ copies the request's image path to this key; its Writer reads it for the output suffix
MONAILABEL_IMAGE_PATH_KEY = "image_path"

# what deploy_bundle appends to the deployed copy's inference ``postprocessing`` (not in the repository's
# configs/inference.json: only MONAI Label's writer needs it)
MONAILABEL_POSTPROCESSING = (
    {"_target_": "spoco_bundle.monailabel.MonaiLabelWriterOrderd", "keys": "pred", "ref_image": "image"},
)


class MonaiLabelWriterOrderd(MapTransform):
    """
    Puts the instance map in the axis order MONAI Label's result writer expects; a no-op everywhere else.

    MONAI Label (``BundleInferTask``) appends its ``Restored`` transform after the bundle's ``postprocessing`` and
    writes the result with ITK: ``itk.image_from_array(array.T)``, i.e. it takes the array in ITK index order
    (x, y[, z]). For NIfTI that is the bundle's storage order (nibabel's (i, j, k)), but TIFF images are loaded in
    tifffile's order (Z, Y, X) (see :class:`~spoco_bundle.io.TiffReader`), so the label of a TIFF study would come
    back transposed: a (X, Y, Z) stack for a (Z, Y, X) image. For TIFF inputs this transform therefore reverses the
    spatial axes of ``keys`` and, so that ``Restored`` neither resizes nor mislabels the voxel size, also the
    ``spatial_shape`` and ``original_affine`` in the metadata of ``ref_image``. For 2D images (any format) the
    channel axis is dropped, because ``Restored`` keeps it for 3-axis arrays and ITK would then write a 1-voxel-thick
    volume.

    :func:`deploy_bundle` appends it to the deployed copy's ``postprocessing`` (:data:`MONAILABEL_POSTPROCESSING`);
    the repository's ``configs/inference.json`` does not hold it. It acts only when the data carries MONAI Label's
    ``image_path`` key (the bundle's own inference, evaluation and training never set it), so the copy's
    ``inference.json`` still gives the bundle's own results when run outside MONAI Label.

    Args:
        keys: keys of the channel-first instance maps, e.g. ``"pred"``.
        ref_image: key of the input image (a MetaTensor loaded by :class:`~spoco_bundle.io.LoadVolumed`).
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(self, keys: KeysCollection, ref_image: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_image = ref_image

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if MONAILABEL_IMAGE_PATH_KEY not in d:
            return d
        image = d.get(self.ref_image)
        meta = image.meta if isinstance(image, MetaTensor) else {}
        if MetaKeys.SPATIAL_SHAPE not in meta:
            raise ValueError(f"'{self.ref_image}' has no spatial_shape metadata (load it with LoadVolumed).")
        spatial_ndim = len(meta[MetaKeys.SPATIAL_SHAPE])
        # NIfTI storage order is already ITK index order; TIFF is loaded in reverse (Z, Y, X)
        reverse = "tiff_axes" in meta
        for key in self.key_iterator(d):
            pred = d[key] if isinstance(d[key], torch.Tensor) else torch.as_tensor(d[key])
            if pred.ndim != spatial_ndim + 1:
                raise ValueError(f"'{key}' must be channel-first with {spatial_ndim} spatial axes, got {pred.shape}.")
            if reverse:
                pred = pred.permute(0, *range(spatial_ndim, 0, -1))
            d[key] = pred[0] if spatial_ndim == 2 else pred
        if reverse:  # the image is not used any more by MONAI Label, only its metadata (by Restored)
            meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(meta[MetaKeys.SPATIAL_SHAPE])[::-1].copy()
            affine = np.asarray(meta.get(MetaKeys.ORIGINAL_AFFINE, np.eye(4)), dtype=np.float64)
            order = list(range(spatial_ndim))[::-1]
            reordered = np.eye(4, dtype=np.float64)
            reordered[:spatial_ndim, :spatial_ndim] = affine[np.ix_(order, order)]
            reordered[:spatial_ndim, 3] = affine[order, 3]
            meta[MetaKeys.ORIGINAL_AFFINE] = reordered
        return d


# what MONAI Label needs of the bundle: configs (metadata.json as a real file), the code, the license and docs
_BUNDLE_ITEMS = ("configs", "spoco_bundle", "LICENSE", "docs")


def deploy_bundle(
    app_dir: str | os.PathLike,
    name: str = "spoco",
    checkpoint: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> str:
    """
    Copy this bundle into a MONAI Label ``monaibundle`` app as ``<app_dir>/model/<name>`` (where the app's
    ``--conf models <name>`` looks for it) and give it ``models/model.pt``.

    The copy is self-contained: ``configs/`` (with ``metadata.json`` as a file, not the repository's symlink),
    the ``spoco_bundle`` package, ``LICENSE`` and ``docs/``. MONAI Label trains into this copy (it overwrites
    ``models/model.pt``), which is why it is a copy and not a link to the repository. The copy's
    ``configs/inference.json`` gets MONAI Label's result writer appended to its ``postprocessing``
    (:func:`add_monailabel_postprocessing`).

    Args:
        app_dir: the app folder, e.g. ``apps/monaibundle`` from ``monailabel apps --download --name monaibundle``.
        name: bundle (model) name; MONAI Label derives the task type from it, so avoid "deepedit", "deepgrow",
            "detection" and "classification" in it.
        checkpoint: trained student weights (``models/model.pt`` of a training run), deployed with its
            ``model.json`` (the network's settings, see :mod:`spoco_bundle.cards`) when it has one. None: an
            untrained network (``network_def`` of ``configs/inference.json`` with fixed seed 0) is saved, so that the
            model is listed and can be trained from the client; its segmentations are meaningless until then.
        source: the bundle to copy; defaults to the repository this module belongs to.
        overwrite: replace an existing ``<app_dir>/model/<name>``.

    Returns:
        the bundle folder in the app.
    """
    source = Path(source) if source is not None else bundle_root()
    app = Path(app_dir)
    if not (app / "main.py").is_file():
        raise ValueError(
            f"{app} is not a MONAI Label app folder (no main.py); create it with "
            "'monailabel apps --download --name monaibundle --output <folder>' first."
        )
    dest = app / "model" / name
    if dest.exists():
        if not overwrite:
            raise FileExistsError(f"{dest} exists; pass overwrite=True (--overwrite) to replace it.")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for item in _BUNDLE_ITEMS:
        src = source / item
        if src.is_dir():
            shutil.copytree(src, dest / item, symlinks=False, ignore=ignore)  # symlinks copied as files
        elif src.is_file():
            shutil.copy(src, dest / item)
    if not (dest / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"{source}/configs/metadata.json is missing; MONAI Label requires it.")
    add_monailabel_postprocessing(dest / "configs" / "inference.json")
    (dest / "models").mkdir()
    target = dest / "models" / "model.pt"
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"Checkpoint {checkpoint} not found.")
        card = read_card(checkpoint)  # the model card first: the bundle's inference.json builds network_def from it
        if card is not None:
            write_card(target, card)
    else:
        torch.manual_seed(0)  # the untrained network's initial weights, reproducibly
    parser = config_parser(dest / "configs" / "inference.json", dest)  # the copy's own config (and card)
    network = parser.get_parsed_content("network_def")
    if checkpoint is not None:  # load strictly now (an error here, not in the server); saved as the plain student
        load_weights(network, str(checkpoint))
        # the card's settings: the copy's own training (a fresh start too) keeps them
        _adopt_card(dest, dict(card.get("inference", {})) if card is not None else {})
    torch.save(network.state_dict(), target)
    _describe_network(dest, network, [int(v) for v in parser.get_parsed_content("patch_size")])
    if checkpoint is None:
        logger.warning(f"{target}: untrained initial weights; train from the client before trusting segmentations.")
    return str(dest)


def add_monailabel_postprocessing(config_file: str | os.PathLike) -> None:
    """
    Append :data:`MONAILABEL_POSTPROCESSING` (:class:`MonaiLabelWriterOrderd`) to the ``postprocessing`` transforms
    of an inference config file, in place; entries already there are not added again.

    Raises:
        ValueError: when the config has no ``postprocessing`` Compose with a ``transforms`` list.
    """
    path = Path(config_file)
    config = json.loads(path.read_text())
    post = config.get("postprocessing")
    transforms = post.get("transforms") if isinstance(post, dict) else None
    if not isinstance(transforms, list):
        raise ValueError(f"{path}: no 'postprocessing' with a 'transforms' list to append MONAI Label's writer to.")
    transforms.extend(dict(entry) for entry in MONAILABEL_POSTPROCESSING if entry not in transforms)
    path.write_text(json.dumps(config, indent=4) + "\n")


def _adopt_card(bundle: Path, settings: Mapping[str, Any]) -> None:
    """Make the deployed copy's training config agree with the model card's network and preprocessing: MONAI Label
    trains with ``configs/train.json``, and a 2D model must go on training in 2D with its own widths, patch and
    normalisation."""
    ids = {k: settings[k] for k in _CARD_TRAIN_IDS if k in settings}
    if ids:
        path = bundle / "configs" / "train.json"
        config = json.loads(path.read_text())
        config.update({k: v for k, v in ids.items() if k in config})
        path.write_text(json.dumps(config, indent=4) + "\n")


def _describe_network(bundle: Path, network: torch.nn.Module, patch_size: list[int]) -> None:
    """``network_data_format`` of the copy's metadata from the network it serves: MONAI Label reports the model's
    dimension from the length of ``inputs.image.spatial_shape``."""
    path = bundle / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    meta["network_data_format"] = network_data_format(meta["network_data_format"], network, patch_size)
    path.write_text(json.dumps(meta, indent=4) + "\n")
