"""
``spoco``: the bundle's commands for people who don't speak ``monai.bundle``.

    spoco train DATA [--pretrained NAME|PATH] [--spatial_dims 2] [--time_limit_s S] [--any_config_id VALUE ...]
    spoco segment IN OUT [--model NAME | --ckpt PATH] [--preview] [--any_config_id VALUE ...]
    spoco suggest IN OUT [--model NAME | --ckpt PATH] [--top 10] [--any_config_id VALUE ...]
    spoco evaluate DATA [--model NAME | --ckpt PATH] [--output_dir runs/evaluate] [--any_config_id VALUE ...]
    spoco package [--model NAME | --ckpt PATH] --output_dir dist [--teacher models/teacher.pt]
    spoco monailabel-deploy APP [--model NAME | --ckpt PATH] [--name spoco] [--studies DIR] [--overwrite]

The weights of a command are ``--model NAME`` (a shipped model, ``models/<name>/``) or ``--ckpt PATH`` (a
``model.pt`` with its ``model.json``); an explicit one always wins, and without either the ``models/model.pt`` of
the current folder (where ``spoco train`` writes) is used, else the bundle's own, and the command says which, with
its full path. ``--ckpt_path`` and ``--checkpoint`` are read as ``--ckpt`` with a note.

``train``, ``segment`` and ``evaluate`` are thin wrappers: each builds the ``python -m monai.bundle run ...``
command line (docs/install.md: the bundle's configs, metadata and logging configuration, the ids given) and runs it
from the bundle's folder, so what they do is exactly what that command does; ``--dry_run`` prints the command
instead. Paths are taken relative to the folder ``spoco`` is called from. ``segment --preview`` also writes
``OUT/preview.png``: the predicted instances outlined over each image (the middle slice of a volume).
``suggest`` segments as ``segment`` does and also says what to outline next (``configs/suggest.json``): per image
``<stem>_suggestions.csv`` and ``.png`` (the objects the model is least sure of first) and ``suggestions.csv``
(the images, the one to annotate next first).
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

__all__ = [
    "OPTIONS",
    "bundle_root",
    "bundle_command",
    "weights",
    "train",
    "segment",
    "suggest",
    "evaluate",
    "package",
    "monailabel_deploy",
    "main",
]

# ids that name files or folders: made absolute against the caller's folder (the command runs in the bundle's)
_PATH_IDS = ("dataset_dir", "output_dir", "ckpt_dir", "ckpt_path", "foreground_mask_dir", "pretrained", "bundle_root")


# the main options of each command, one line each: `spoco <command> --help` lists them with their defaults, read from
# the configs (any other id of the configs is accepted too)
OPTIONS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "train": (
        "train.json",
        (
            ("spatial_dims", "2 for 2D images, 3 for volumes (a --pretrained model's card sets it)"),
            ("pretrained", "start from these weights: a shipped model's name (nuclei2d) or a model.pt (fine-tuning)"),
            ("background_label", "the label id of painted background strokes; 0: dense labels whose 0 is background"),
            ("instance_ratio", "share of each image's objects kept as annotated (simulates sparse labels)"),
            ("time_limit_s", "train for this many seconds instead of epochs x epoch_length iterations"),
            ("epochs", "epochs of epoch_length iterations (50 x 100: hours on a CPU, minutes on a GPU)"),
            ("patch_size", "training patch: [32,64,64] in 3D, [192,192] in 2D (a --pretrained model's card sets it)"),
            ("image_scale", "resample the images by this factor (e.g. [1,0.5,0.5] for finely sampled volumes)"),
            ("foreground_surface", "objects separated by membranes (EM, tissue): the head learns their interiors"),
            ("input_channel", "the channel of multi-channel images to train on (TIFF, NIfTI)"),
            ("resume", "True: continue the run that was stopped, from ckpt_dir/resume.pt"),
            ("output_dir", "TensorBoard events and train.log (default runs/ in the current folder)"),
            (
                "ckpt_dir",
                "model.pt, its card model.json, teacher.pt, resume.pt (default models/ in the current folder)",
            ),
            ("device", "cpu, or cuda:0 (the default when there is a GPU)"),
        ),
    ),
    "segment": (
        "inference.json",
        (
            ("image_scale", "auto: images at another magnification are resampled; or a factor"),
            ("clustering", "watershed, fast (large volumes), boundary (membranes), hdbscan, meanshift, consistency"),
            ("background", "head: the model's foreground; largest; none (tissue without background)"),
            ("foreground_mask_dir", "cluster inside your own masks: one per image, with the image's stem"),
            ("min_size", "objects smaller than this many voxels are removed (default: the model card's)"),
            ("shape_split", "split objects shaped like two joined round ones; 0: off"),
            ("max_memory_gb", "volumes whose segmentation needs more are segmented block by block"),
            ("scheduler", "tcp://host:port of a dask.distributed cluster for blockwise volumes"),
            ("input_channel", "the channel of multi-channel images to segment (TIFF, NIfTI, OME-Zarr)"),
            ("input_time_point", "the time point of time series to segment (TIFF, NIfTI, OME-Zarr)"),
            ("output_ext", "e.g. .tif: the outputs' format (default: each input's own)"),
            ("device", "cpu, or cuda:0 (the default when there is a GPU)"),
        ),
    ),
}
OPTIONS["evaluate"] = OPTIONS["segment"]
OPTIONS["suggest"] = OPTIONS["segment"]


def options_help(command: str) -> str:
    """The main options of ``command`` (:data:`OPTIONS`), one line each, with their defaults from the config."""
    config_name, options = OPTIONS[command]
    config = json.loads((Path(__file__).resolve().parents[1] / "configs" / config_name).read_text())
    lines = [f"Main options (any id of configs/{config_name} is accepted too):"]
    for key, text in options:
        value = config.get(key)
        computed = isinstance(value, dict) or str(value).startswith("$")  # the text says what it is
        lines.append(f"  --{key}: {text}" if computed else f"  --{key} (default {json.dumps(value)}): {text}")
    return "\n".join(lines)


def bundle_root() -> Path:
    """The folder holding ``configs/`` and ``models/``: the parent of this package (a checkout, an editable install
    or an unpacked zoo bundle).

    Raises:
        SystemExit: with one line saying where ``configs/`` was expected, when it is not there.
    """
    from spoco_bundle.cards import bundle_root as root_of_bundle

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


# other spellings of --ckpt, read as it (the configs' id is ckpt_path, the zoo's)
_CKPT_SPELLINGS = ("ckpt_path", "checkpoint")


def weights(model: str | None, ckpt: str | None, ids: dict[str, Any], untrained_ok: bool = False) -> str | None:
    """
    The weights a command uses, as MONAI ids put into ``ids`` (``model`` or ``ckpt_path``), and their path (None
    for untrained weights): ``--model NAME`` (a shipped model) or ``--ckpt PATH``, given explicitly, always win;
    ``--ckpt_path`` / ``--checkpoint`` in ``ids`` are read as ``--ckpt`` with a note; without any, the
    ``models/model.pt`` of the current folder, else the bundle's own (``untrained_ok``: else none), said on stderr
    with its full path.

    Raises:
        SystemExit: ``--model`` and ``--ckpt`` together, two spellings naming different files, an unknown model.
    """
    for spelling in _CKPT_SPELLINGS:
        if spelling in ids:
            given = str(ids.pop(spelling))
            print(f"note: --{spelling} is read as --ckpt, the weights option of every spoco command", file=sys.stderr)
            if ckpt is not None and os.path.abspath(str(ckpt)) != os.path.abspath(given):
                raise SystemExit(f"error: --ckpt {ckpt} and --{spelling} {given} name different weights: give one.")
            ckpt = given
    if model is not None and ckpt is not None:
        raise SystemExit("error: give --model or --ckpt, not both.")
    if model is not None:
        from spoco_bundle import cards

        try:
            path = cards.checkpoint(bundle_root(), str(model))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        ids["model"] = model
        return path
    if ckpt is not None:
        ids["ckpt_path"] = ckpt
        return os.path.abspath(os.path.expanduser(str(ckpt)))
    own, bundled = _own_checkpoint(), str(bundle_root() / "models" / "model.pt")
    if own is not None:
        print(f"weights: {own} (models/model.pt of this folder; --model or --ckpt to choose)", file=sys.stderr)
        ids["ckpt_path"] = own
        return own
    if os.path.isfile(bundled) or not untrained_ok:
        print(f"weights: {bundled} (the bundle's models/model.pt; --model or --ckpt to choose)", file=sys.stderr)
        return bundled
    return None


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
    ids = {**ids, "dataset_dir": input, "output_dir": output}
    weights(model, ckpt, ids)
    _run(bundle_command(["inference.json"], ids), dry_run)
    if preview and not dry_run:
        print(f"preview: {write_preview(input, output)}")


def suggest(
    input: str,
    output: str,
    model: str | None = None,
    ckpt: str | None = None,
    top: int = 10,
    dry_run: bool = False,
    **ids: Any,
) -> None:
    """Segment every image in ``input`` into ``output`` as ``spoco segment`` does, and say which objects to outline
    next: per image ``<stem>_suggestions.csv`` (every object, the most unsure first: its score, the foreground
    head's uncertainty and the embeddings' spread over it, centroid and bounding box in the image's voxels) and
    ``<stem>_suggestions.png`` (the ``top`` objects outlined and numbered), and ``suggestions.csv`` ranking the images
    by their ``top`` most unsure objects (``configs/inference.json`` + ``configs/suggest.json``). Volumes too large
    to segment whole (``--max_memory_gb``) are segmented blockwise and scored block by block (an object cut by a
    block face: its parts' sums).

    Args:
        input: an image folder or file.
        output: the folder for the labels and the suggestions.
        model: a shipped model by name; ckpt: a ``model.pt``; neither: as ``segment``.
        top: objects per image in the preview and in the images' ranking.
        dry_run: print the ``monai.bundle`` command instead of running it.
        ids: any ``configs/inference.json`` id, as for ``segment``.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise SystemExit(f"error: --top must be a positive whole number of objects, got {top!r}.")
    ids = {**ids, "dataset_dir": input, "output_dir": output, "suggest_top": top}
    weights(model, ckpt, ids)
    _run(bundle_command(["inference.json", "suggest.json"], ids), dry_run)


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


def evaluate(
    data: str,
    model: str | None = None,
    ckpt: str | None = None,
    output_dir: str = os.path.join("runs", "evaluate"),
    dry_run: bool = False,
    **ids: Any,
) -> None:
    """Score a model on the images of ``data`` that have dense labels (``configs/inference.json`` +
    ``configs/evaluate.json``): they are segmented exactly as ``spoco segment`` segments (the model card's settings,
    ``image_scale`` auto, test-time flips) into ``output_dir``, and AP50, mAP, SBD, ARAND and VOI are written there as
    CSV files. Which images: the ``validation`` list of ``data/dataset.json``, else ``imagesTs/`` + ``labelsTs/``, else
    the training pairs (said in the log: those the model may have trained on).

    Args:
        data: the data folder (``dataset.json``, ``imagesTs/`` + ``labelsTs/``, or ``imagesTr/`` + ``labelsTr/``).
        model: a shipped model by name; ckpt: a ``model.pt``; neither: as ``segment``.
        output_dir: where the segmentations and the metric CSVs are written.
        dry_run: print the ``monai.bundle`` command instead of running it.
        ids: any ``configs/inference.json`` id, e.g. ``--clustering fast``.
    """
    ids = {**ids, "dataset_dir": data, "output_dir": output_dir}
    weights(model, ckpt, ids)
    _run(bundle_command(["inference.json", "evaluate.json"], ids), dry_run)


def package(
    output_dir: str,
    model: str | None = None,
    ckpt: str | None = None,
    teacher: str | None = None,
    **kwargs: Any,
) -> str:
    """Package a model for the MONAI model zoo (``spoco_bundle.package.package_bundle``): the bundle folder and its
    zip in ``output_dir``.

    Args:
        output_dir: where the bundle folder and zip are written.
        model: a shipped model by name; ckpt: a ``model.pt``; neither: as ``segment``.
        teacher: the momentum teacher's weights (``teacher.pt``), for ``--clustering consistency``.
        kwargs: further arguments of ``package_bundle`` (``name``, ``overwrite``, ``torchscript``, ...).
    """
    from spoco_bundle.package import package_bundle

    ids: dict[str, Any] = dict(kwargs)
    path = weights(model, ckpt, ids)
    extra = sorted(k for k in ids if k not in ("model", "ckpt_path"))
    return package_bundle(path, output_dir, teacher=teacher, **{k: ids[k] for k in extra})


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
    from spoco_bundle.monailabel import deploy_bundle

    ckpt = weights(model, ckpt, {}, untrained_ok=True)
    try:
        dest = deploy_bundle(app, name=name, checkpoint=ckpt, overwrite=overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"error: {e}") from None
    serve = ["monailabel", "start_server", "--app", os.path.abspath(app), "--studies", studies, "--conf", "models"]
    serve += [name, "--conf", "zoo_source", "github", "--uvicorn_app", "spoco_bundle.monailabel.server:app"]
    print(f"deployed {ckpt or 'untrained weights'} as {dest}\nserve it (in .venv-monailabel): {shlex.join(serve)}")


for _command in (train, segment, suggest, evaluate):  # the options before the Args section, where `--help` shows them
    _head, _args = _command.__doc__.split("\n    Args:", 1)
    _options = "\n".join(f"    {line}" for line in options_help(_command.__name__).splitlines())
    _command.__doc__ = f"{_head.rstrip()}\n\n{_options}\n\n    Args:{_args}"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    commands = {"train": train, "segment": segment, "suggest": suggest, "evaluate": evaluate, "package": package}
    commands["monailabel-deploy"] = monailabel_deploy
    fire.Fire(commands, name="spoco")


if __name__ == "__main__":
    main()
