"""The ``spoco`` console script: the monai.bundle command it builds, a real segmentation, bad input."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPOCO_DATA_DIR", ROOT.parent / "shared" / "data"))
SPOCO = [sys.executable, "-m", "spoco_bundle"]  # the entry point `spoco` runs (spoco_bundle.cli:main)


def _spoco(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # works without PYTHONPATH
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(SPOCO + args, cwd=cwd, env=env, capture_output=True, text=True)


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("spoco")
    assert script.is_file(), "pip install -e . should install the `spoco` console script"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, env={**os.environ, "PAGER": "cat"})
    assert "segment" in out.stdout + out.stderr


def test_dry_run_prints_the_bundle_command_with_absolute_paths(tmp_path: Path) -> None:
    done = _spoco(["segment", "imgs", "out", "--model", "nuclei2d", "--clustering", "fast", "--dry_run"], tmp_path)
    assert done.returncode == 0, done.stderr
    cmd = shlex.split(done.stdout.strip().splitlines()[-1])
    assert cmd[1:4] == ["-m", "monai.bundle", "run"]
    flags = dict(zip(cmd[4::2], cmd[5::2]))
    assert flags["--config_file"] == str(ROOT / "configs" / "inference.json")
    assert flags["--dataset_dir"] == str(tmp_path / "imgs") and flags["--output_dir"] == str(tmp_path / "out")
    assert flags["--model"] == "nuclei2d" and flags["--clustering"] == "fast" and "--ckpt_path" not in flags
    assert not (tmp_path / "out").exists()  # a dry run writes nothing

    done = _spoco(["train", "data", "--spatial_dims", "2", "--patch_size", "[128,128]", "--dry_run"], tmp_path)
    cmd = shlex.split(done.stdout.strip().splitlines()[-1])
    assert cmd[4] == "training"
    flags = dict(zip(cmd[5::2], cmd[6::2]))
    assert flags["--dataset_dir"] == str(tmp_path / "data") and flags["--ckpt_dir"] == str(tmp_path / "models")
    assert json.loads(flags["--patch_size"]) == [128, 128] and flags["--spatial_dims"] == "2"

    done = _spoco(["evaluate", "data", "--model", "nuclei2d", "--dry_run"], tmp_path)
    flags = _flags(done)
    assert json.loads(flags["--config_file"]) == [
        str(ROOT / "configs" / f) for f in ("inference.json", "evaluate.json")
    ]
    assert flags["--model"] == "nuclei2d" and "--ckpt_path" not in flags


def _flags(done: subprocess.CompletedProcess) -> dict[str, str]:
    """The ``--key value`` flags of the command a dry run printed."""
    assert done.returncode == 0, done.stderr[-2000:]
    cmd = shlex.split(done.stdout.strip().splitlines()[-1])
    return dict(zip(*[iter(cmd[4:] if cmd[4].startswith("--") else cmd[5:])] * 2))


def test_segment_uses_the_model_spoco_train_wrote_in_the_current_folder(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"")
    done = _spoco(["segment", "imgs", "out", "--dry_run"], tmp_path)
    assert _flags(done)["--ckpt_path"] == str(tmp_path / "models" / "model.pt")
    assert f"weights: {tmp_path / 'models' / 'model.pt'} (models/model.pt of this folder" in done.stderr  # said


@pytest.mark.parametrize("command", ["segment", "evaluate"])
def test_explicit_weights_win_over_the_current_folders_model(tmp_path: Path, command: str) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"")  # a decoy: the model.pt a training left here
    args = [command, "imgs"] + (["out"] if command == "segment" else []) + ["--dry_run"]
    other = str(tmp_path / "other.pt")
    for spelling in ("--ckpt", "--ckpt_path", "--checkpoint"):
        done = _spoco(args + [spelling, "other.pt"], tmp_path)
        assert _flags(done)["--ckpt_path"] == other, spelling
        assert ("note: " in done.stderr) == (spelling != "--ckpt")  # one line: the other spellings are read as --ckpt
        assert "weights: " not in done.stderr  # no default picked
    flags = _flags(_spoco(args + ["--model", "nuclei2d"], tmp_path))
    assert flags["--model"] == "nuclei2d" and "--ckpt_path" not in flags
    both = _spoco(args + ["--ckpt", "a.pt", "--ckpt_path", "b.pt"], tmp_path)
    assert both.returncode != 0 and "name different weights" in both.stderr.strip().splitlines()[-1]


def test_help_lists_each_commands_main_options_from_one_table(tmp_path: Path) -> None:
    from spoco_bundle.cli import OPTIONS

    train = json.loads((ROOT / "configs" / "train.json").read_text())
    for command, (_, options) in OPTIONS.items():
        done = subprocess.run(
            SPOCO + [command, "--help"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, "PAGER": "cat"},
        )
        text = done.stdout + done.stderr
        for key, line in options:
            assert f"--{key}" in text and line in text, (command, key)
        if command == "train":  # defaults read from the config
            assert f"--epochs (default {train['epochs']}): " in text


def test_bad_input_is_one_clear_error(tmp_path: Path) -> None:
    done = _spoco(["segment", "imgs", "out", "--model", "a", "--ckpt", "b"], tmp_path)
    assert done.returncode != 0 and "--model or --ckpt" in done.stderr
    done = _spoco(["segment", str(tmp_path / "missing"), str(tmp_path / "out"), "--model", "nuclei2d"], tmp_path)
    assert done.returncode != 0
    assert "missing" in done.stderr.strip().splitlines()[-1]  # the bundle's `error:` line names the folder


@pytest.mark.slow
def test_a_decoy_model_in_the_current_folder_does_not_replace_the_given_one(tmp_path: Path) -> None:
    import torch

    from spoco_bundle.io import read_image
    from spoco_bundle.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", n_train=0, n_val=0, n_test=1, shape=(96, 96), spatial_dims=2, seed=3)
    shipped = ROOT / "models" / "nuclei2d"
    (tmp_path / "models").mkdir()  # the decoy: the shipped model with its output layer negated, a valid other model
    state = torch.load(shipped / "model.pt", map_location="cpu", weights_only=True)
    last = [k for k in state if k.endswith(".weight") and state[k].ndim > 2][-1]
    state[last] = -state[last]
    torch.save(state, tmp_path / "models" / "model.pt")
    shutil.copy(shipped / "model.json", tmp_path / "models" / "model.json")

    def labels(*args: str) -> np.ndarray:
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        done = _spoco(["segment", "data/imagesTs", out.name, *args], tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        return np.asarray(read_image(next(out.glob("*_instances*")))[0])

    decoy, given, by_name = labels(), labels("--ckpt_path", str(shipped / "model.pt")), labels("--model", "nuclei2d")
    assert np.array_equal(given, by_name)  # the given checkpoint is the one used
    assert not np.array_equal(given, decoy)  # and the decoy would have segmented otherwise


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "dsb2018" / "split.json").is_file(), reason="needs ../shared/data/dsb2018")
def test_segment_with_a_shipped_model_writes_labels_and_a_preview(tmp_path: Path) -> None:
    from spoco_bundle.io import read_image

    names = json.loads((DATA / "dsb2018" / "split.json").read_text())["validation"][:2]
    (tmp_path / "in").mkdir()
    for name in names:
        (source,) = (DATA / "dsb2018" / "images").glob(f"{name}.*")
        shutil.copy(source, tmp_path / "in" / source.name)
    done = _spoco(["segment", "in", "out", "--model", "nuclei2d", "--preview"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in names:
        labels, _ = read_image(next((tmp_path / "out").glob(f"{name}_instances.*")))
        assert len(np.unique(np.asarray(labels))) > 3  # several nuclei found
    preview = tmp_path / "out" / "preview.png"
    assert preview.stat().st_size > 10_000 and preview.read_bytes()[:4] == b"\x89PNG"


def test_monailabel_deploy_puts_a_shipped_model_into_the_app(tmp_path: Path) -> None:
    import torch

    app = tmp_path / "apps" / "monaibundle"
    app.mkdir(parents=True)
    (app / "main.py").write_text("# the stock app's entry point\n")
    done = _spoco(["monailabel-deploy", "apps/monaibundle", "--model", "nuclei2d", "--studies", "imgs"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    dest = app / "model" / "spoco"
    shipped = ROOT / "models" / "nuclei2d"
    deployed = torch.load(dest / "models" / "model.pt", map_location="cpu", weights_only=True)
    reference = torch.load(shipped / "model.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(deployed[k], reference[k]) for k in reference)
    # the deployed weights are the shipped ones loaded into the network and saved again: the same entries, none added
    assert deployed.keys() == reference.keys()
    card = json.loads((shipped / "model.json").read_text())
    assert json.loads((dest / "models" / "model.json").read_text()) == card
    # the copy trains (from the client) and describes itself as the 2D network it serves
    train = json.loads((dest / "configs" / "train.json").read_text())
    assert train["spatial_dims"] == 2 and train["patch_size"] == card["inference"]["patch_size"]
    fmt = json.loads((dest / "configs" / "metadata.json").read_text())["network_data_format"]
    assert fmt["inputs"]["image"]["spatial_shape"] == card["inference"]["patch_size"]
    assert fmt["post_processed_outputs"]["pred"]["spatial_shape"] == ["*", "*"]
    serve = shlex.split(done.stdout.strip().splitlines()[-1].split(": ", 1)[1])
    assert serve[:2] == ["monailabel", "start_server"] and serve[serve.index("--app") + 1] == str(app)
    assert ["--conf", "models", "spoco"] == serve[serve.index("models") - 1 : serve.index("models") + 2]

    again = _spoco(["monailabel-deploy", "apps/monaibundle", "--model", "nuclei2d"], tmp_path)
    assert again.returncode != 0 and "--overwrite" in again.stderr.strip().splitlines()[-1]
    unknown = _spoco(["monailabel-deploy", "apps/monaibundle", "--model", "nuclei9d", "--name", "x"], tmp_path)
    assert unknown.returncode != 0 and "nuclei2d" in unknown.stderr.strip().splitlines()[-1]  # lists the shipped
    no_app = _spoco(["monailabel-deploy", "nowhere", "--model", "nuclei2d"], tmp_path)
    assert no_app.returncode != 0 and "main.py" in no_app.stderr.strip().splitlines()[-1]
