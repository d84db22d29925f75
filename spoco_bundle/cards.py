"""
Model cards: the ``model.json`` beside a ``model.pt`` that says what the weights are, so that inference needs no
flags to rebuild the network that fits them. One schema serves the user's own trainings and the shipped models:

- ``inference``: the ``configs/inference.json`` ids the model needs or was tuned with: ``spatial_dims``,
  ``features``, ``embedding_dim`` (they define the network's shape), ``patch_size``, ``min_size``,
  ``intensity_percentiles``;
- ``training``: how it was trained: ``settings`` (the run's settings), and for a training of this bundle the size of
  what it was trained on (``object_diameter``, ``image_blob_scale`` in voxels of the network's grid, the images'
  ``voxel_size`` and ``voxel_unit``), the iteration and time of the save;
- ``bundle_version``: the bundle (``configs/metadata.json``) that wrote it;
- ``validation`` (a training with a validation list): the best key metric of the run's validation, i.e. the score
  of the weights the best-model saver kept; ``scores`` (shipped models): scores on held-out images, each with the
  images and how they were segmented. :func:`eval_metrics` turns either into the zoo metadata's ``eval_metrics``.

Training writes the card of ``ckpt_dir/model.pt`` whenever the weights are saved
(:class:`~spoco_bundle.handlers.ModelCardWriter`). Shipped models are ``models/<name>/model.pt`` with
``models/<name>/model.json`` (written by ``scripts/shipped_models.py``, with a description and scores as well).

``configs/inference.json`` reads the card of the checkpoint it loads (``ckpt_path``; ``--model <name>`` selects a
shipped model's) through ``model_settings``: its ``inference`` ids are the defaults of inference; any of them given
on the command line still wins, and a given shape setting that contradicts the card is refused by
:func:`~spoco_bundle.networks.load_weights` (:func:`check_network`) with one line naming both values. A checkpoint
without a card is used with the config's defaults.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "bundle_root",
    "SHAPE_SETTINGS",
    "available",
    "card",
    "checkpoint",
    "settings",
    "pretrained_settings",
    "card_path",
    "read_card",
    "inference_settings",
    "training_settings",
    "check_network",
    "network_settings",
    "flag_value",
    "write_card",
    "bundle_version",
    "eval_metrics",
]

# the card's inference settings that define the network's shape: a different value cannot load the weights
SHAPE_SETTINGS = ("spatial_dims", "features", "embedding_dim")
# inference settings that cards of earlier versions may hold for preprocessing this version no longer has, with the
# value that meant "not used": such a card still loads; another value is refused (the weights expect that input)
RETIRED_SETTINGS = {"tophat": 0.0}


def bundle_root() -> Path:
    """The folder holding ``spoco_bundle/``, ``configs/`` and ``models/``: a checkout of the repository, an editable
    install or an unpacked bundle."""
    return Path(__file__).resolve().parents[1]


def _models_dir(bundle_root: str | os.PathLike) -> Path:
    return Path(bundle_root) / "models"


def available(bundle_root: str | os.PathLike) -> list[str]:
    """Names of the shipped models under ``<bundle_root>/models`` (folders with a ``model.json``)."""
    root = _models_dir(bundle_root)
    return sorted(p.parent.name for p in root.glob("*/model.json")) if root.is_dir() else []


def card(bundle_root: str | os.PathLike, name: str) -> dict[str, Any]:
    """The ``model.json`` of shipped model ``name``.

    Raises:
        ValueError: no such model (the message lists the shipped ones), or a ``model.json`` that cannot be read.
    """
    path = _models_dir(bundle_root) / str(name) / "model.json"
    if not path.is_file():
        names = ", ".join(available(bundle_root)) or "none"
        raise ValueError(f"no shipped model {name!r} in {_models_dir(bundle_root)} (shipped: {names}).")
    return _read_json(path)


def checkpoint(bundle_root: str | os.PathLike, name: str | None) -> str:
    """The weights to load: ``models/<name>/model.pt`` of a shipped model, ``models/model.pt`` for None."""
    if name is None:
        return str(_models_dir(bundle_root) / "model.pt")
    card(bundle_root, name)  # a clear error for an unknown name
    return str(_models_dir(bundle_root) / str(name) / "model.pt")


def settings(bundle_root: str | os.PathLike, name: str | None) -> dict[str, Any]:
    """The inference settings of the checkpoint :func:`checkpoint` selects (its card's ``inference`` section);
    ``{}`` when it has no card."""
    return inference_settings(checkpoint(bundle_root, name))


def pretrained_settings(pretrained: str | os.PathLike | None, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The inference settings of the card of the weights a training starts from (``--pretrained``: a shipped model's
    name, looked up in the bundle ``root``, default this one, or a ``model.pt``), which ``configs/train.json`` takes
    its network and preprocessing defaults from; ``{}`` without ``pretrained`` or without a card."""
    if pretrained is None:
        return {}
    name, root = str(pretrained), root if root is not None else bundle_root()
    if name in available(root):
        return settings(root, name)
    return inference_settings(name) if os.path.isfile(name) else {}


def card_path(ckpt_path: str | os.PathLike) -> Path:
    """The card of a checkpoint: ``model.json`` for ``model.pt`` (the same name, suffix ``.json``)."""
    return Path(ckpt_path).with_suffix(".json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(content, dict):
        raise ValueError(f"cannot read {path}: a model card is a JSON object, got {type(content).__name__}.")
    return content


def read_card(ckpt_path: str | os.PathLike) -> dict[str, Any] | None:
    """The card of checkpoint ``ckpt_path`` (:func:`card_path`), or None when it has none.

    Raises:
        ValueError: the card exists but cannot be read (naming the file).
    """
    path = card_path(ckpt_path)
    return _read_json(path) if path.is_file() else None


def _section(ckpt_path: str | os.PathLike, *keys: str) -> dict[str, Any]:
    content: Any = read_card(ckpt_path) or {}
    for key in keys:
        content = content.get(key) if isinstance(content, Mapping) else None
    if content is None:
        return {}
    if not isinstance(content, Mapping):
        raise ValueError(f"{card_path(ckpt_path)}: '{'.'.join(keys)}' must be a JSON object.")
    return dict(content)


def inference_settings(ckpt_path: str | os.PathLike) -> dict[str, Any]:
    """The ``inference`` section of the card of ``ckpt_path``: ``configs/inference.json``'s defaults for
    ``spatial_dims``, ``features``, ``embedding_dim``, ``patch_size``, ``min_size``, ``intensity_percentiles``;
    ``{}`` without a card.

    Raises:
        ValueError: a card that asks for preprocessing this version does not have (:data:`RETIRED_SETTINGS`).
    """
    section = _section(ckpt_path, "inference")
    for key, unused in RETIRED_SETTINGS.items():
        value = section.pop(key, unused)
        if value != unused:
            raise ValueError(
                f"{card_path(ckpt_path)}: the model was trained with {key} {value!r}, preprocessing this version of "
                "the bundle no longer has; segment with the bundle version that trained it, or retrain."
            )
    return section


def training_settings(ckpt_path: str | os.PathLike) -> dict[str, Any]:
    """The ``training.settings`` section of the card of ``ckpt_path``: the ``train.json`` ids of the run, which
    ``configs/evaluate.json`` takes its defaults from; ``{}`` without a card."""
    return _section(ckpt_path, "training", "settings")


def flag_value(value: Any) -> str:
    """``value`` as it is typed on the command line: ``[8,16,32]`` for a list."""
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, tuple)) else str(value)


def network_settings(network: Any) -> dict[str, Any]:
    """The shape settings (:data:`SHAPE_SETTINGS`) of an :class:`~spoco_bundle.networks.EmbeddingUNet` (None for
    one the network does not have)."""
    features = getattr(network, "filters", None)
    return {
        "spatial_dims": getattr(network, "spatial_dims", None),
        "features": None if features is None else [int(f) for f in features],
        "embedding_dim": getattr(network, "embedding_dim", None),
    }


def check_network(network: Any, ckpt_path: str | os.PathLike) -> None:
    """
    Refuse to load ``ckpt_path`` into ``network`` when the network's shape settings (``spatial_dims``,
    ``features``, ``embedding_dim``; the attributes of :class:`~spoco_bundle.networks.EmbeddingUNet`) contradict the
    checkpoint's card. Nothing is checked without a card, or for a setting the card does not record.

    Raises:
        ValueError: one line naming the checkpoint, each contradicting setting with its flag, and both values.
    """
    recorded = inference_settings(ckpt_path)
    given = network_settings(network)
    problems = []
    for name in SHAPE_SETTINGS:
        want, have = recorded.get(name), given[name]
        if want is None or have is None:
            continue
        if (list(want) if isinstance(want, (list, tuple)) else want) != (
            list(have) if isinstance(have, (list, tuple)) else have
        ):
            problems.append(f"--{name} {flag_value(have)} contradicts its {name} {flag_value(want)}")
    if problems:
        raise ValueError(
            f"checkpoint {ckpt_path} does not fit the network asked for: {'; '.join(problems)} (recorded in "
            f"{card_path(ckpt_path)}). Leave these flags out to take the checkpoint's values, or pass the checkpoint "
            "that was trained with them."
        )


def write_card(ckpt_path: str | os.PathLike, content: Mapping[str, Any]) -> Path:
    """Write ``content`` as the card of ``ckpt_path`` atomically (a temporary file renamed over it): a reader sees
    the previous card or the new one, never a partial file. Returns the card's path."""
    path = card_path(ckpt_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(content, indent=1, default=_json_default) + "\n")
    os.replace(partial, path)
    return path


def _json_default(value: Any) -> Any:
    try:
        return float(value)  # numpy / torch scalars
    except (TypeError, ValueError):
        return str(value)


def bundle_version() -> str:
    """The bundle's version: ``version`` of ``configs/metadata.json`` beside this package (the repository or an
    unpacked bundle), else the package's ``__version__``."""
    meta = Path(__file__).resolve().parents[1] / "configs" / "metadata.json"
    try:
        version = json.loads(meta.read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        version = None
    if isinstance(version, str):
        return version
    from importlib.metadata import version as installed_version  # a package without its configs: as installed

    return installed_version("spoco-bundle")


def eval_metrics(content: Mapping[str, Any] | None, digits: int = 3) -> dict[str, Any]:
    """The ``eval_metrics`` of bundle metadata for the model a card describes: the held-out scores of a shipped
    model (its ``scores.default_inference``: what a user gets with the default inference), else the best validation
    score of the training run (``validation``), else ``{}``. Scores are rounded to ``digits``."""
    content = content or {}
    scores = (content.get("scores") or {}).get("default_inference")
    if scores:
        out: dict[str, Any] = {k: round(float(scores[k]), digits) for k in ("ap50", "map", "sbd") if k in scores}
        return {**out, "images": scores.get("images", ""), "inference": scores.get("how", "")}
    validation = content.get("validation")
    if validation:
        return {
            f"val_{validation['metric'].removeprefix('val_')}": round(float(validation["value"]), digits),
            "images": f"{validation.get('images')} validation images of the training run (best epoch "
            f"{validation.get('epoch')})",
        }
    return {}
