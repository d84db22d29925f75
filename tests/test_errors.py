"""Command-line errors end on their root cause: ``error: <type>: <message>`` after the traceback, not on MONAI's
``Failed to evaluate ConfigExpression`` wrapper (``spoco_bundle.errors``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from spoco_bundle.errors import install_error_summary, root_cause

ROOT = Path(__file__).resolve().parents[1]
META = str(ROOT / "metadata.json")


def _bundle_run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args, "--meta_file", META, "--device", "cpu"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def _tiny_model(path: Path) -> None:
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"features": [8, 16, 32]})
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)


@pytest.mark.parametrize("case", ["missing_checkpoint", "missing_input_folder", "missing_training_data"])
@pytest.mark.slow
def test_cli_error_ends_on_its_root_cause(tmp_path, case):
    infer = ["--config_file", str(ROOT / "configs" / "inference.json"), "--output_dir", str(tmp_path / "out")]
    if case == "missing_checkpoint":
        args = [*infer, "--dataset_dir", str(tmp_path), "--ckpt_path", str(tmp_path / "none.pt")]
        expected = f"error: FileNotFoundError: Checkpoint {tmp_path / 'none.pt'} not found (train first, or pass"
        wrapper = "Failed to evaluate ConfigExpression"  # the error of a "$..." expression
    elif case == "missing_input_folder":
        _tiny_model(tmp_path / "model.pt")
        args = [*infer, "--dataset_dir", str(tmp_path / "nowhere"), "--ckpt_path", str(tmp_path / "model.pt")]
        args += ["--features", "[8,16,32]"]
        expected = f"error: ValueError: Input folder {tmp_path / 'nowhere'} does not exist."
        wrapper = "Failed to evaluate ConfigExpression"
    else:
        args = ["training", "--config_file", str(ROOT / "configs" / "train.json"), "--dataset_dir", str(tmp_path / "D")]
        expected = f"error: ValueError: Dataset folder {tmp_path / 'D'} does not exist."
        wrapper = "Failed to instantiate component 'spoco_bundle.data.checked_datalist'"  # the error of a "_target_"
    proc = _bundle_run(tmp_path, *args)
    assert proc.returncode != 0
    assert _last_line(proc.stderr).startswith(expected), proc.stderr[-2000:]
    # the traceback is still there, above the summary, with MONAI's wrapper
    assert "Traceback (most recent call last)" in proc.stderr and wrapper in proc.stderr


def test_root_cause_unwraps_only_monais_wrappers():
    cause = FileNotFoundError("model.pt not found")
    try:
        try:
            try:
                raise cause
            except FileNotFoundError as e:
                raise RuntimeError("applying transform <x object at 0x1>") from e
        except RuntimeError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression: '$f()'") from e
    except RuntimeError as wrapped:
        assert root_cause(wrapped) is cause
    own = RuntimeError("2 of 3 inputs failed")
    own.__cause__ = ValueError("not a wrapper: kept")
    assert root_cause(own) is own
    assert root_cause(RuntimeError("Failed to evaluate x")).args == ("Failed to evaluate x",)  # no cause: itself


def test_the_hook_is_installed_only_under_monai_bundle():
    hook = sys.excepthook
    assert install_error_summary() is False and sys.excepthook is hook  # pytest is not `python -m monai.bundle`
