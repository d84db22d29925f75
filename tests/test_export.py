"""TorchScript export: the scripted network gives the eager network's embeddings (CPU; TS_ATOL = TS_RTOL = 1e-5)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spoco_bundle.networks import EmbeddingUNet
from spoco_bundle.package import TS_ATOL, torchscript_parity

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        ({"spatial_dims": 3, "features": (8, 16, 32)}, [12, 40, 28]),
        ({"spatial_dims": 2, "features": (8, 16, 32, 64)}, [72, 56]),
        ({"spatial_dims": 3, "features": (8, 16, 32), "foreground_head": False, "embedding_dim": 6}, [8, 24, 32]),
    ],
)
def test_scripted_network_matches_eager(kwargs, shape):
    torch.manual_seed(0)
    net = EmbeddingUNet(**kwargs).eval()
    with torch.no_grad():  # non-default buffers too, so every code path of forward() is compared
        for b in net.buffers():
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) * 0.8 + 0.1)
    scripted = torch.jit.script(net)
    assert torchscript_parity(net, scripted, shape) <= TS_ATOL
    # and after a save/load round trip, as ckpt_export writes it
    f = io.BytesIO()
    torch.jit.save(scripted, f)
    f.seek(0)
    assert torchscript_parity(net, torch.jit.load(f), shape) <= TS_ATOL


@pytest.mark.packaging
def test_ckpt_export_cli_2d(tmp_path):
    """``python -m monai.bundle ckpt_export`` on the repository's inference config, overridden to 2D."""
    parser_overrides = {"spatial_dims": 2, "features": [8, 16, 32]}
    torch.manual_seed(1)
    net = EmbeddingUNet(spatial_dims=2, features=(8, 16, 32)).eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(tmp_path / "m.ts")]
    cmd += ["--ckpt_file", str(tmp_path / "model.pt"), "--meta_file", str(ROOT / "metadata.json")]
    cmd += ["--config_file", str(ROOT / "configs" / "inference.json")]
    for k, v in parser_overrides.items():
        cmd += [f"--{k}", json.dumps(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scripted = torch.jit.load(str(tmp_path / "m.ts"))
    assert torchscript_parity(net, scripted, [48, 40]) <= TS_ATOL
