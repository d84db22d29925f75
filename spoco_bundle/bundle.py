"""The bundle's configs from Python: where the bundle is, a parser of one of its config files, a MONAI workflow of
them (what ``monai.bundle run`` runs, for apps that run the bundle in their own process), and the post-processing
chain of ``configs/inference.json``, which training's validation runs too (one definition, no copy to drift)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from spoco_bundle.cards import bundle_root
from spoco_bundle.networks import NetworkObjectDiameter

__all__ = ["bundle_root", "config_parser", "config_workflow", "inference_postprocessing"]


def config_parser(
    config_file: str | os.PathLike, root: str | os.PathLike | None = None, meta_file: str | os.PathLike | None = None
) -> ConfigParser:
    """A ``ConfigParser`` of ``config_file`` (and ``meta_file``) with ``bundle_root`` set to ``root`` (default: this
    bundle's)."""
    parser = ConfigParser()
    parser.read_config(str(config_file))
    if meta_file is not None:
        parser.read_meta(str(meta_file))
    parser["bundle_root"] = str(root if root is not None else bundle_root())
    return parser


def config_workflow(
    configs: Sequence[str], workflow_type: str, root: str | os.PathLike | None = None, **ids: Any
) -> ConfigWorkflow:
    """The ``ConfigWorkflow`` that ``python -m monai.bundle run`` would run: ``configs`` (names under
    ``<root>/configs``, later ones override earlier ones), the bundle's ``metadata.json``, ``bundle_root`` ``root``
    (default: this bundle's) and ``ids`` as config overrides. Not initialised yet."""
    root = Path(root if root is not None else bundle_root())
    files = [str(root / "configs" / name) for name in configs]
    return ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        meta_file=str(root / "configs" / "metadata.json"),
        workflow_type=workflow_type,
        bundle_root=str(root),
        **ids,
    )


def inference_postprocessing(
    root: str | os.PathLike | None = None, network: torch.nn.Module | None = None, **ids: Any
) -> Callable[[dict], dict]:
    """
    The ``postprocessing`` of ``configs/inference.json`` with ``ids`` set: the chain training's validation runs
    (``validate#postprocessing`` of ``configs/train.json``), so that the checkpoint kept as best is chosen on what
    inference will output.

    Args:
        root: a bundle folder whose ``configs/inference.json`` defines the chain; None, or a folder without one (a
            run's ``--bundle_root`` that only holds its outputs): the bundle whose code runs (:func:`bundle_root`).
        network: the network being trained, whose recorded training object size the size filter reads while it
            trains (:class:`~spoco_bundle.networks.NetworkObjectDiameter`); None: the chain's own ``object_diameter``.
        ids: inference ids to set (``embedding_dim``, ``clustering``, ``min_size``, ...).

    Raises:
        ValueError: an id that ``configs/inference.json`` does not have.
    """
    root = Path(root) if root is not None else bundle_root()
    if not (root / "configs" / "inference.json").is_file():
        root = bundle_root()
    config_file = root / "configs" / "inference.json"
    parser = config_parser(config_file, root)
    unknown = sorted(k for k in ids if k not in parser)
    if unknown:
        raise ValueError(f"{unknown} are not ids of {config_file}.")
    for key, value in ids.items():
        parser[key] = value
    if network is not None:
        parser["object_diameter"] = NetworkObjectDiameter(network)
    return parser.get_parsed_content("postprocessing")
