"""
Models that ship with the bundle: ``models/<name>/model.pt`` with ``models/<name>/model.json`` (what the model is,
the inference settings it needs, how it was trained, its scores; written by ``scripts/shipped_models.py``).

``configs/inference.json`` selects one with ``--model <name>``: the checkpoint and the settings the model was
trained with (``spatial_dims``, ``patch_size``, ``min_size``) come from its ``model.json`` (``model_settings``, a
component that puts the bundle on ``sys.path`` first, like ``network_def``, so that MONAI's zoo commands resolve the
network from an unpacked bundle); any of them given on the command line still wins. ``--model`` unset (the
default) segments with ``models/model.pt``, the user's own training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["available", "card", "checkpoint", "settings"]


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
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def checkpoint(bundle_root: str | os.PathLike, name: str | None) -> str:
    """The weights to load: ``models/<name>/model.pt`` of a shipped model, ``models/model.pt`` for None."""
    if name is None:
        return str(_models_dir(bundle_root) / "model.pt")
    card(bundle_root, name)  # a clear error for an unknown name
    return str(_models_dir(bundle_root) / str(name) / "model.pt")


def settings(bundle_root: str | os.PathLike, name: str | None) -> dict[str, Any]:
    """The inference settings of shipped model ``name`` (its ``model.json`` ``inference`` section); ``{}`` for None.
    ``configs/inference.json`` builds its ``spatial_dims``, ``patch_size`` and ``min_size`` defaults on this."""
    return {} if name is None else dict(card(bundle_root, name).get("inference", {}))
