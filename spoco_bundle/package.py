"""
Package a trained checkpoint as a MONAI model-zoo bundle: a folder in the zoo layout and a zip of it.

    python -m spoco_bundle package --ckpt models/model.pt --output_dir dist [--teacher models/teacher.pt]
        [--name spoco_sparse_instance_segmentation] [--features "[8,16,32]" ...]

The bundle holds ``configs/`` (every ``*.json`` of the source, ``logging.conf``, ``metadata.json`` as a real file),
``models/model.pt`` (the student's plain CPU state dict) with its ``models/model.json`` (the checkpoint's own
model.json, which the packaged ``inference.json`` builds its network from, see :mod:`spoco_bundle.cards`; for a
checkpoint without one, written from the packaged settings), ``models/model.ts`` (TorchScript from MONAI's
``ckpt_export``, checked against the eager network), optionally ``models/teacher.pt``, the ``spoco_bundle`` code,
``docs/`` (``README.md`` = model card, ``data_license.txt``, the other guides), ``LICENSE``, and
``large_files.yml`` when a file exceeds the zoo's 25 MB limit. Extra ``--<id> <value>`` arguments override
top-level config ids (e.g. ``features``, ``embedding_dim``, ``spatial_dims``) in every packaged config that defines
them; a checkpoint with a model.json needs none for its shape (and refuses contradicting ones), one without needs
them to match its weights. ``network_data_format`` in the packaged metadata is derived from the packaged inference
config.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ckpt_export

from spoco_bundle.bundle import bundle_root, config_parser
from spoco_bundle.cards import bundle_version, eval_metrics, network_settings, read_card, write_card
from spoco_bundle.networks import load_weights

__all__ = ["META_SCHEMA_URL", "check_metadata", "network_data_format", "package_bundle", "torchscript_parity"]

logger = logging.getLogger(__name__)

META_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
LARGE_FILE_MB = 25.0
# TorchScript must reproduce the eager embeddings; on CPU the scripted graph runs the same kernels (measured
# difference 0.0), so this bound only leaves room for a different kernel choice on another machine
TS_ATOL, TS_RTOL = 1e-5, 1e-5

# keys and JSON types the bundle metadata schema (meta_schema_20240725) requires, then the optional typed ones
_REQUIRED = {
    "schema": str,
    "version": str,
    "monai_version": str,
    "pytorch_version": str,
    "numpy_version": str,
    "required_packages_version": dict,
    "task": str,
    "description": str,
    "authors": str,
    "copyright": str,
    "network_data_format": dict,
}
_OPTIONAL = {
    "changelog": dict,
    "data_source": str,
    "data_type": str,
    "image_classes": str,
    "label_classes": str,
    "pred_classes": str,
    "eval_metrics": dict,
    "intended_use": str,
    "references": list,
    "supported_apps": dict,
    "name": str,
}
_TENSOR_REQUIRED = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_argument(v: Any, where: str) -> list[str]:
    """One network input/output: a plain number/string/bool or a tensor description."""
    if isinstance(v, (str, bool)) or _is_number(v):
        return []
    if not isinstance(v, dict):
        return [f"{where}: must be a tensor description (object) or a number/string/boolean"]
    errors = [f"{where}: missing '{k}'" for k in _TENSOR_REQUIRED if k not in v]
    checks = {
        "type": (lambda x: isinstance(x, str), "a string"),
        "format": (lambda x: isinstance(x, str), "a string"),
        "num_channels": (_is_int, "an integer"),
        "spatial_shape": (
            lambda x: isinstance(x, list) and all(isinstance(s, str) or _is_int(s) for s in x),
            "a list of integers or strings",
        ),
        "dtype": (lambda x: isinstance(x, str), "a string"),
        "value_range": (lambda x: isinstance(x, list) and all(_is_number(s) for s in x), "a list of numbers"),
        "is_patch_data": (lambda x: isinstance(x, bool), "a boolean"),
        "channel_def": (lambda x: isinstance(x, dict), "an object"),
    }
    for key, (ok, what) in checks.items():
        if key in v and not ok(v[key]):
            errors.append(f"{where}.{key}: must be {what}, got {v[key]!r}")
    return errors


def _check_network_io(io: Any, where: str) -> list[str]:
    if not isinstance(io, dict):
        return [f"{where}: must be an object"]
    errors = [f"{where}: missing '{k}'" for k in ("inputs", "outputs") if k not in io]
    for section in ("inputs", "outputs", "post_processed_outputs"):
        if section not in io:
            continue
        if not isinstance(io[section], dict):
            errors.append(f"{where}.{section}: must be an object")
            continue
        for name, arg in io[section].items():
            errors += _check_argument(arg, f"{where}.{section}.{name}")
    return errors


def check_metadata(meta: Mapping) -> list[str]:
    """
    Check bundle metadata against the MONAI bundle specification (meta_schema_20240725: required keys, JSON
    types, network input/output descriptions) and the model zoo's rules (``changelog`` holding ``version``, the
    schema URL, a ``name``, ``inputs.image``/``outputs.pred`` for ``verify_net_in_out``).

    Returns:
        the problems found, one readable line each; empty when the metadata is valid.
    """
    if not isinstance(meta, Mapping):
        return [f"metadata must be a JSON object, got {type(meta).__name__}"]
    errors = []
    for key, typ in {**_REQUIRED, **_OPTIONAL}.items():
        if key not in meta:
            if key in _REQUIRED:
                errors.append(f"missing required key '{key}'")
        elif not isinstance(meta[key], typ):
            errors.append(f"'{key}' must be a JSON {typ.__name__}, got {type(meta[key]).__name__}")
    if isinstance(meta.get("references"), list) and not all(isinstance(r, str) for r in meta["references"]):
        errors.append("'references' must be a list of strings")
    for key, value in meta.items():
        if key.endswith("_data_format"):
            errors += _check_network_io(value, key)
    # model-zoo rules on top of the schema
    if meta.get("schema") != META_SCHEMA_URL:
        errors.append(f"'schema' must be {META_SCHEMA_URL}")
    for key in ("changelog", "name"):
        if key not in meta:
            errors.append(f"missing '{key}' (required by the model zoo)")
    version = meta.get("version")
    if isinstance(version, str):
        parts = version.split(".")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            errors.append(f"'version' must be MAJOR.MINOR.PATCH, got {version!r}")
        if isinstance(meta.get("changelog"), dict) and version not in meta["changelog"]:
            errors.append(f"'changelog' has no entry for version {version}")
    pkgs = meta.get("required_packages_version")
    if isinstance(pkgs, dict):
        errors += [f"required_packages_version['{k}'] must be a version string" for k, v in pkgs.items() if not v]
    fmt = meta.get("network_data_format")
    if isinstance(fmt, dict):
        if "image" not in (fmt.get("inputs") or {}):
            errors.append("network_data_format.inputs needs 'image' (verify_net_in_out reads it)")
        if "pred" not in (fmt.get("outputs") or {}):
            errors.append("network_data_format.outputs needs 'pred' (verify_net_in_out reads it)")
    return errors


def network_data_format(meta_format: Mapping, network: torch.nn.Module, patch_size: list[int]) -> dict:
    """
    ``network_data_format`` for ``network`` with sliding-window patches of ``patch_size``: the documented format
    with channel counts and spatial shapes taken from the network and config, so they cannot drift apart.
    """
    fmt = json.loads(json.dumps(meta_format))  # deep copy
    e = int(network.embedding_dim)
    fg = bool(getattr(network, "foreground_head", False))
    image = fmt["inputs"]["image"]
    image["spatial_shape"] = list(patch_size)
    image["num_channels"] = int(network.in_channels)
    pred = fmt["outputs"]["pred"]
    pred["spatial_shape"] = list(patch_size)
    pred["num_channels"] = e + int(fg)
    # one key per channel: consumers such as MONAI Label read the keys as integer channel indices
    pred["channel_def"] = {
        **{str(i): f"embedding {i}" for i in range(e)},
        **({str(e): "foreground logit"} if fg else {}),
    }
    for out in (fmt.get("post_processed_outputs") or {}).values():
        if isinstance(out, dict):
            out["spatial_shape"] = ["*"] * len(patch_size)  # the whole input image, any size
    return fmt


def torchscript_parity(eager: torch.nn.Module, scripted: torch.nn.Module, shape: list[int], seed: int = 0) -> float:
    """
    Run both networks on the same random ``(1, C, *shape)`` input on CPU; raise ``AssertionError`` when the outputs
    differ by more than ``TS_ATOL + TS_RTOL * |eager|``. Returns the largest absolute difference.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, int(eager.in_channels), *shape), generator=g)
    eager, scripted = eager.cpu().eval(), scripted.cpu().eval()
    with torch.no_grad():
        a, b = eager(x), scripted(x)
    torch.testing.assert_close(b, a, atol=TS_ATOL, rtol=TS_RTOL)
    return float((a - b).abs().max())


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, content: Any) -> None:
    path.write_text(json.dumps(content, indent=4) + "\n")


def _copy_code(src_pkg: Path, dst_pkg: Path) -> None:
    """Copy the package's Python sources (no caches, no build artefacts)."""
    for f in sorted(src_pkg.rglob("*.py")):
        rel = f.relative_to(src_pkg)
        if "__pycache__" in rel.parts:
            continue
        (dst_pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst_pkg / rel)


def _zip_folder(folder: Path, zip_path: Path) -> None:
    """Zip ``folder`` with its name as the top-level directory (the zoo's archive layout), in a stable order."""
    tmp = zip_path.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, arcname=str(Path(folder.name) / f.relative_to(folder)))
    os.replace(tmp, zip_path)


def _card_of(network: torch.nn.Module, parser, source: str) -> dict:
    """A model card (:mod:`spoco_bundle.cards`) for weights that came without one: the settings of the packaged
    ``inference.json`` they were loaded with."""
    return {
        "description": f"packaged from {source}, which had no model.json: settings of the packaged inference.json",
        "bundle_version": bundle_version(),
        "inference": {
            **network_settings(network),
            "patch_size": [int(v) for v in parser.get_parsed_content("patch_size")],
            "min_size": int(parser.get_parsed_content("min_size")),
            "intensity_percentiles": [float(v) for v in parser.get_parsed_content("intensity_percentiles")],
        },
    }


def model_section(card: Mapping[str, Any] | None) -> str:
    """The model card's section on the packaged weights, written from their ``model.json`` at packaging time (so
    the card states what this package's model is and scores, not what the repository's models do)."""
    card = card or {}
    training = card.get("training") or {}
    lines = ["", "## This package's model", "", str(card.get("description", "weights without a model card")) + "."]
    if training.get("command"):
        lines.append(
            f"Trained with `{training['command']}` ({training.get('budget', '')}, {training.get('iterations')} "
            f"iterations; data: {training.get('data', '')})."
        )
    elif training.get("iteration") is not None:
        lines.append(f"Saved at iteration {training['iteration']} of its training run (`configs/train.json`).")
    rows = [(name, s) for name, s in (card.get("scores") or {}).items() if isinstance(s, Mapping)]
    if card.get("validation"):
        v = card["validation"]
        rows.append(
            (
                "validation",
                {
                    "images": f"{v.get('images')} validation images",
                    "how": "training run",
                    v["metric"].removeprefix("val_"): v["value"],
                },
            )
        )
    if rows:
        lines += ["", "| scores | images | AP50 | mAP | SBD |", "|---|---|---|---|---|"]
        for name, s in rows:
            cells = [f"{float(s[k]):.3f}" if isinstance(s.get(k), (int, float)) else "" for k in ("ap50", "map", "sbd")]
            lines.append(f"| {name} ({s.get('how', '')}) | {s.get('images', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _append_model_section(path: Path, card: Mapping[str, Any] | None) -> None:
    path.write_text(path.read_text().rstrip("\n") + "\n" + model_section(card))


def package_bundle(
    checkpoint: str,
    output_dir: str,
    name: str = "spoco_sparse_instance_segmentation",
    teacher: str | None = None,
    source_dir: str | None = None,
    torchscript: bool = True,
    make_zip: bool = True,
    overwrite: bool = False,
    large_file_mb: float = LARGE_FILE_MB,
    large_files_url: str | None = None,
    **overrides: Any,
) -> str:
    """
    Package ``checkpoint`` into ``output_dir/name`` (zoo layout) and ``output_dir/name_v<version>.zip``.

    Args:
        checkpoint: trained weights, ``model.pt`` (plain state dict) or ``resume.pt`` (its student is taken);
            loaded strictly into the packaged ``network_def``, re-saved as a plain CPU state dict; its
            ``model.json`` (if any) is packaged beside it.
        output_dir: where the bundle folder and zip are written.
        name: bundle folder name (the zoo's bundle id).
        teacher: optional ``teacher.pt``, needed only for ``--clustering consistency``.
        source_dir: folder with ``configs/``, ``spoco_bundle/``, ``docs/`` and ``LICENSE``; defaults to the
            repository (or unpacked bundle) this code lives in.
        torchscript: export ``models/model.ts`` with ``monai.bundle.ckpt_export`` and check it against the eager
            network (``TS_ATOL``/``TS_RTOL``).
        make_zip: also write the zip.
        overwrite: replace an existing ``output_dir/name``.
        large_file_mb: files above this size (MB) are listed in ``large_files.yml`` (the zoo keeps them outside
            its git repository).
        large_files_url: base URL where the large files will be uploaded; ``large_files.yml`` gets
            ``<url>/<path>``. Without it the ``url`` entries are empty and must be filled in before submitting.
        overrides: top-level config ids and values written into every packaged config that defines the id, so the
            bundle's defaults match the checkpoint (e.g. ``features=[8, 16, 32]``).

    Returns:
        the bundle folder.

    Raises:
        FileNotFoundError: a checkpoint or source file is missing.
        ValueError: invalid metadata, an unknown override id, a checkpoint that does not match the network,
            or the output folder exists (without ``overwrite``).
    """
    src = Path(source_dir) if source_dir else bundle_root()
    out_root = Path(output_dir)
    bundle = out_root / name
    meta = _check_sources(src, checkpoint, teacher)
    if bundle.exists() and any(bundle.iterdir()):
        if not overwrite:
            raise ValueError(f"Output folder {bundle} exists and is not empty (pass --overwrite True to replace it).")
        shutil.rmtree(bundle)
    out_root.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_root))  # build aside, then move into place
    try:
        stage = work / name
        _stage_files(src, stage, overrides)
        parser = config_parser(stage / "configs" / "inference.json", stage)
        network, card = _stage_weights(stage, parser, checkpoint, teacher)
        patch_size = [int(v) for v in parser.get_parsed_content("patch_size")]
        meta["network_data_format"] = network_data_format(meta["network_data_format"], network, patch_size)
        meta["eval_metrics"] = eval_metrics(card)  # the packaged model's own scores, from its card
        _append_model_section(stage / "docs" / "README.md", card)
        problems = check_metadata(meta)
        if problems:
            raise ValueError("packaged metadata is not valid:\n  " + "\n  ".join(problems))
        _write_json(stage / "configs" / "metadata.json", meta)
        if torchscript:
            _export_torchscript(stage, network, patch_size)
        _list_large_files(stage, large_file_mb, large_files_url)
        shutil.move(str(stage), str(bundle))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if make_zip:
        zip_path = out_root / f"{name}_v{meta['version']}.zip"
        _zip_folder(bundle, zip_path)
        logger.info(f"zip: {zip_path} ({zip_path.stat().st_size / 1e6:.1f} MB)")
    logger.info(f"bundle: {bundle}")
    return str(bundle)


def _check_sources(src: Path, checkpoint: str, teacher: str | None) -> dict:
    """The bundle metadata of ``src``, after checking that the checkpoints and the files a package needs exist."""
    for path in (checkpoint, teacher):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"Checkpoint {path} not found.")
    needed = ["configs/inference.json", "configs/metadata.json", "configs/logging.conf", "LICENSE"]
    needed += ["docs/README.md", "docs/data_license.txt", "spoco_bundle/__init__.py"]
    missing = [p for p in needed if not (src / p).is_file()]
    if missing:
        raise FileNotFoundError(f"Source folder {src} lacks {missing}: package from a checkout of the repository.")
    meta = json.loads((src / "configs" / "metadata.json").read_text())
    problems = check_metadata(meta)
    if problems:
        raise ValueError(
            f"{src / 'configs' / 'metadata.json'} is not valid bundle metadata:\n  " + "\n  ".join(problems)
        )
    return meta


def _stage_files(src: Path, stage: Path, overrides: dict[str, Any]) -> None:
    """The configs (with ``overrides`` written into every config that defines the id), the code, the license and the
    manual, copied into ``stage``."""
    (stage / "configs").mkdir(parents=True)
    (stage / "models").mkdir()
    (stage / "docs").mkdir()
    used = set()
    for cfg in sorted((src / "configs").glob("*.json")):
        if cfg.name == "metadata.json":
            continue
        content = json.loads(cfg.read_text())
        for key, value in overrides.items():
            if isinstance(content, dict) and key in content:
                content[key] = value
                used.add(key)
        _write_json(stage / "configs" / cfg.name, content)
    unknown = sorted(set(overrides) - used)
    if unknown:
        raise ValueError(f"Override ids {unknown} are not top-level ids of any config in {src / 'configs'}.")
    shutil.copy2(src / "configs" / "logging.conf", stage / "configs" / "logging.conf")
    _copy_code(src / "spoco_bundle", stage / "spoco_bundle")
    shutil.copy2(src / "LICENSE", stage / "LICENSE")
    for doc in sorted((src / "docs").iterdir()):  # the model card, data license and the other guides
        if doc.is_file():
            shutil.copy2(doc, stage / "docs" / doc.name)


def _stage_weights(stage: Path, parser, checkpoint: str, teacher: str | None) -> tuple[torch.nn.Module, dict]:
    """The weights loaded strictly into the packaged ``network_def`` and saved as a plain CPU state dict, with their
    model card (the checkpoint's, else one from the packaged config); the teacher likewise. Returns the network and
    the card."""
    card = read_card(checkpoint)
    if card is not None:  # the card first: the packaged inference.json (``parser``) builds network_def from it
        write_card(stage / "models" / "model.pt", card)
    network = parser.get_parsed_content("network_def")
    load_weights(network, str(checkpoint), map_location="cpu")
    torch.save(network.state_dict(), stage / "models" / "model.pt")
    if card is None:  # a checkpoint without a card: the packaged model describes itself all the same
        card = _card_of(network, parser, Path(checkpoint).name)
        write_card(stage / "models" / "model.pt", card)
    if teacher is not None:
        teacher_net = load_weights(copy.deepcopy(network), str(teacher), map_location="cpu")
        torch.save(teacher_net.state_dict(), stage / "models" / "teacher.pt")
    return network, card


def _export_torchscript(stage: Path, network: torch.nn.Module, patch_size: list[int]) -> None:
    """``models/model.ts`` by MONAI's ``ckpt_export``, checked against the eager network."""
    ckpt_export(
        net_id="network_def",
        filepath=str(stage / "models" / "model.ts"),
        ckpt_file=str(stage / "models" / "model.pt"),
        meta_file=str(stage / "configs" / "metadata.json"),
        config_file=str(stage / "configs" / "inference.json"),
        bundle_root=str(stage),
    )
    diff = torchscript_parity(network, torch.jit.load(str(stage / "models" / "model.ts")), patch_size)
    logger.info(f"models/model.ts matches the eager network (max |difference| {diff:.2e})")


def _list_large_files(stage: Path, large_file_mb: float, large_files_url: str | None) -> None:
    """``large_files.yml`` for the files above ``large_file_mb`` (the zoo keeps them outside its git repository)."""
    limit = large_file_mb * 1024 * 1024
    large = [f for f in sorted(stage.rglob("*")) if f.is_file() and f.stat().st_size > limit]
    if not large:
        return
    lines = ["large_files:"]
    for f in large:
        rel = f.relative_to(stage).as_posix()
        url = f"{large_files_url.rstrip('/')}/{rel}" if large_files_url else ""
        lines += [f'  - path: "{rel}"', f'    url: "{url}"', f'    hash_val: "{_md5(f)}"', '    hash_type: "md5"']
    (stage / "large_files.yml").write_text("\n".join(lines) + "\n")
    if not large_files_url:
        logger.warning(f"large_files.yml lists {len(large)} file(s) with empty urls: fill them in after upload")
