"""The bundle's training command line as the tests run it (``monai.bundle run training`` on the CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "configs" / "train.json")
META = str(ROOT / "metadata.json")


def training_command(
    bundle_root: Path, dataset: Path, *overrides: str, features: str | None = "[8,16,32]"
) -> list[str]:
    """``python -m monai.bundle run training`` with ``train.json``, ``bundle_root`` and ``dataset`` on the CPU without
    workers; ``features`` small for speed (None: the config's, e.g. to load a shipped model), then ``overrides``."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN, "--meta_file", META]
    cmd += ["--bundle_root", str(bundle_root), "--dataset_dir", str(dataset), "--device", "cpu", "--num_workers", "0"]
    return cmd + (["--features", features] if features is not None else []) + list(overrides)
