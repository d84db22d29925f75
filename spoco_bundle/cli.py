"""
``spoco``: the bundle's commands for people who don't speak ``monai.bundle``.

    spoco train DATA [--output_dir runs] [--ckpt_dir models] [--any_config_id VALUE ...] [--dry_run]
    spoco segment IN OUT [--model nuclei2d | nuclei3d | --ckpt PATH] [--preview] [--any_config_id VALUE ...] [--dry_run]
    spoco evaluate DATA [--ckpt PATH] [--any_config_id VALUE ...] [--dry_run]
    spoco package --checkpoint models/model.pt --output_dir dist [--teacher models/teacher.pt]
    spoco monailabel-deploy APP [--model nuclei2d | nuclei3d | --ckpt PATH] [--name spoco] [--studies DIR] [--overwrite]

``train``, ``segment`` and ``evaluate`` are thin wrappers: each builds the ``python -m monai.bundle run ...``
command line (docs/install.md: the bundle's configs, metadata and logging configuration, the ids given) and runs it
from the bundle's folder, so what they do is exactly what that command does; ``--dry_run`` prints the command
instead. Paths are taken relative to the folder ``spoco`` is called from. ``segment --preview`` also writes
``OUT/preview.png``: the predicted instances outlined over each image (the middle slice of a volume).
``monailabel-deploy`` copies the bundle with a model into a MONAI Label ``monaibundle`` app and prints the command
that serves it (docs/monailabel.md).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import fire

# the package's own modules are imported inside the commands: they load torch and MONAI, and `spoco --help` or a
# mistyped command should answer at once

__all__ = ["bundle_root", "bundle_command", "train", "segment", "evaluate", "monailabel_deploy", "main"]

# ids that name files or folders: made absolute against the caller's folder (the command runs in the bundle's)
_PATH_IDS = ("dataset_dir", "output_dir", "ckpt_dir", "ckpt_path", "foreground_mask_dir", "pretrained", "bundle_root")


def bundle_root() -> Path:
    """The folder holding ``configs/`` and ``models/``: the parent of this package (a checkout, an editable install
    or an unpacked zoo bundle).

    Raises:
        SystemExit: with one line saying where ``configs/`` was expected, when it is not there.
    """
    from spoco_bundle.bundle import bundle_root as root_of_bundle

    root = root_of_bundle()
    if not (root / "configs" / "train.json").is_file():
        raise SystemExit(
            f"error: the bundle's configs are not beside the installed package (expected {root / 'configs'}); "
            "install the bundle from its folder with `pip install -e .` or run from an unpacked bundle."
        )
    return root


def _value(key: str, value: Any) -> str:
    if key in _PATH_IDS and isinstance(value, (str, os.PathLike)) and not str(value).startswith("$"):
        # a shipped model's name stays a name; anything that exists or looks like a path becomes absolute
        if key != "pretrained" or os.sep in str(value) or os.path.exists(value):
            return os.path.abspath(os.path.expanduser(str(value)))
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def bundle_command(configs: list[str], ids: dict[str, Any], run_id: str | None = None) -> list[str]:
    """``python -m monai.bundle run [run_id]`` with ``configs`` (names under ``configs/``), the bundle's metadata
    and logging configuration, and ``ids`` as ``--key value`` flags (paths made absolute)."""
    root = bundle_root()
    files = [str(root / "configs" / c) for c in configs]
    config = files[0] if len(files) == 1 else json.dumps(files)
    cmd = [sys.executable, "-m", "monai.bundle", "run"] + ([run_id] if run_id else [])
    cmd += ["--config_file", config, "--meta_file", str(root / "configs" / "metadata.json")]
    cmd += ["--logging_file", str(root / "configs" / "logging.conf"), "--bundle_root", str(root)]
    for key, value in ids.items():
        cmd += [f"--{key}", _value(key, value)]
    return cmd


def _run(cmd: list[str], dry_run: bool) -> None:
    if dry_run:
        print(shlex.join(cmd))
        return
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(bundle_root()), env.get("PYTHONPATH")) if p)
    code = subprocess.run(cmd, cwd=bundle_root(), env=env).returncode
    if code:
        raise SystemExit(code)  # the bundle has printed its `error: ...` line


def _own_checkpoint() -> str | None:
    """``models/model.pt`` under the caller's folder (where ``spoco train`` writes by default), if it exists."""
    path = os.path.abspath(os.path.join("models", "model.pt"))
    return path if os.path.isfile(path) else None


def train(data: str, dry_run: bool = False, **ids: Any) -> None:
    """Train on the images and sparse labels in ``data`` (``configs/train.json``; docs/data.md).

    Args:
        data: the data folder (``imagesTr/`` + ``labelsTr/`` or a ``dataset.json``).
        dry_run: print the ``monai.bundle`` command instead of running it.
        ids: any ``configs/train.json`` id, e.g. ``--spatial_dims 2 --time_limit_s 1800``.
    """
    ids = {"output_dir": "runs", "ckpt_dir": "models", **ids, "dataset_dir": data}
    _run(bundle_command(["train.json"], ids, run_id="training"), dry_run)


def segment(
    input: str,
    output: str,
    model: str | None = None,
    ckpt: str | None = None,
    preview: bool = False,
    dry_run: bool = False,
    **ids: Any,
) -> None:
    """Segment every NIfTI / TIFF image and Zarr store in ``input`` (or that one) into ``output``
    (``configs/inference.json``; volumes larger than ``--max_memory_gb`` and Zarr stores blockwise on dask,
    ``--scheduler tcp://host:8786`` for a dask.distributed cluster: docs/large_volumes.md).

    Args:
        input: an image folder or file.
        output: the folder for ``<stem>_instances<ext>``.
        model: a shipped model by name (``nuclei2d``); default: ``models/model.pt`` of the current folder (where
            ``spoco train`` writes), else the bundle's own ``models/model.pt``.
        ckpt: weights to use instead (a ``model.pt``; its ``model.json`` card supplies the network settings).
        preview: also write ``output/preview.png``, the predicted instances outlined over each image.
        dry_run: print the ``monai.bundle`` command instead of running it.
        ids: any ``configs/inference.json`` id, e.g. ``--clustering fast --shape_split 0 --max_memory_gb 2``.
    """
    if model is not None and ckpt is not None:
        raise SystemExit("error: give --model or --ckpt, not both.")
    ids = {**ids, "dataset_dir": input, "output_dir": output}
    if model is not None:
        ids["model"] = model
    ckpt = ckpt if ckpt is not None or model is not None else _own_checkpoint()
    if ckpt is not None:
        ids["ckpt_path"] = ckpt
    _run(bundle_command(["inference.json"], ids), dry_run)
    if preview and not dry_run:
        print(f"preview: {write_preview(input, output)}")


def write_preview(input: str, output: str, count: int = 4) -> str:
    """Draw the first ``count`` segmented images of ``input`` with their predictions from ``output`` into
    ``output/preview.png`` (no ground truth needed)."""
    from spoco_bundle.data import image_files
    from spoco_bundle.io import read_image, split_image_suffix
    from spoco_bundle.report import draw_preview

    predictions = {split_image_suffix(os.path.basename(p))[0]: p for p in image_files(output)}
    rows = []
    for image_path in image_files(input) if os.path.isdir(input) else [input]:
        stem = split_image_suffix(os.path.basename(image_path))[0]
        pred = predictions.get(f"{stem}_instances")
        if pred is None or len(rows) >= count:
            continue
        image = read_image(image_path)[0].astype("float32")
        rows.append((stem, image, None, read_image(pred)[0]))
    if not rows:
        raise SystemExit(f"error: no segmentation of an image of {input} found in {output}: nothing to preview.")
    return draw_preview(rows, os.path.join(output, "preview.png"))


def evaluate(data: str, ckpt: str | None = None, dry_run: bool = False, **ids: Any) -> None:
    """Score a model on the validation list of ``data`` (dense labels; ``configs/evaluate.json``): AP50, mAP, SBD,
    ARAND, VOI, written as CSV to ``output_dir``.

    Args:
        data: the data folder with a ``dataset.json`` whose ``validation`` list holds the images to score.
        ckpt: the weights (default: ``models/model.pt`` of the current folder, else the bundle's).
        dry_run: print the ``monai.bundle`` command instead of running it.
        ids: any ``configs/evaluate.json`` / ``configs/train.json`` id.
    """
    ids = {"output_dir": "runs", **ids, "dataset_dir": data}
    ckpt = ckpt if ckpt is not None else _own_checkpoint()
    if ckpt is not None:
        ids["ckpt_path"] = ckpt
    _run(bundle_command(["train.json", "evaluate.json"], ids), dry_run)


def monailabel_deploy(
    app: str,
    model: str | None = None,
    ckpt: str | None = None,
    name: str = "spoco",
    studies: str = "STUDIES",
    overwrite: bool = False,
) -> None:
    """Put the bundle with a model into a MONAI Label ``monaibundle`` app (``apps/monaibundle`` from
    ``monailabel apps --download --name monaibundle --output apps``) and print the command that serves it.

    Args:
        app: the app folder.
        model: a shipped model by name (``nuclei2d``): segmentations are useful from the first study, and training
            from the client fine-tunes it.
        ckpt: weights to deploy instead (a ``model.pt``, with its ``model.json``). Neither: ``models/model.pt`` of the
            current folder if it exists, else untrained weights (train from the client first).
        name: the model's name in MONAI Label (``--conf models NAME``).
        studies: the studies folder to put in the printed command.
        overwrite: replace an earlier deployment of ``name``.
    """
    from spoco_bundle import cards
    from spoco_bundle.monailabel import deploy_bundle

    if model is not None and ckpt is not None:
        raise SystemExit("error: give --model or --ckpt, not both.")
    try:
        if model is not None:
            ckpt = cards.checkpoint(bundle_root(), model)
        ckpt = ckpt if ckpt is not None else _own_checkpoint()
        dest = deploy_bundle(app, name=name, checkpoint=ckpt, overwrite=overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"error: {e}") from None
    serve = ["monailabel", "start_server", "--app", os.path.abspath(app), "--studies", studies, "--conf", "models"]
    serve += [name, "--conf", "zoo_source", "github", "--uvicorn_app", "spoco_bundle.monailabel.server:app"]
    print(f"deployed {ckpt or 'untrained weights'} as {dest}\nserve it (in .venv-monailabel): {shlex.join(serve)}")


def main() -> None:
    from spoco_bundle.package import package_bundle

    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    commands = {"train": train, "segment": segment, "evaluate": evaluate, "package": package_bundle}
    commands["monailabel-deploy"] = monailabel_deploy
    fire.Fire(commands, name="spoco")


if __name__ == "__main__":
    main()
