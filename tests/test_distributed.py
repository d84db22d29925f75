"""Multi-process training: configs/train.json + configs/multi_gpu_train.json under torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from spoco_bundle.synthetic import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "configs" / "train.json")
MULTI = str(ROOT / "configs" / "multi_gpu_train.json")
META = str(ROOT / "metadata.json")
FEATURES = [8, 16, 32]


def _torchrun() -> list[str]:
    script = Path(sys.executable).parent / "torchrun"  # the console script of the same environment
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def _network_def():
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"features": FEATURES})
    return parser.get_parsed_content("network_def")


def test_merged_config_keeps_monai_label_keys():
    """MONAI Label's multi-GPU path writes its overrides into train.json, then merges multi_gpu_train.json on top."""
    parser = ConfigParser()
    parser.read_config([TRAIN, MULTI])
    for key in (
        "bundle_root",
        "device",
        "network_def",
        "train#trainer#max_epochs",
        "train#trainer#epoch_length",
        "train#dataset#data",
        "validate#dataset#data",
        "train#handlers",
        "run",
        "training",
        "initialize",
        "finalize",
    ):
        assert key in parser, key
    multi = json.loads(Path(MULTI).read_text())
    # these must come from train.json (or MONAI Label's overrides of it), never be replaced by the multi-GPU file
    for key in (
        "train#dataset#data",
        "validate#dataset#data",
        "train#handlers",
        "train#trainer#max_epochs",
        "train#trainer#epoch_length",
        "epoch_length",
        "bundle_root",
        "run",
        "training",
    ):
        assert key not in multi, key
    assert parser["network"]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
    assert parser["train#dataloader#shuffle"] is False and parser["train#dataloader#sampler"] == "@train#sampler"
    # train.json's own initialize/finalize steps are kept, the process group steps appended
    assert parser["initialize"][: len(ConfigParser.load_config_file(TRAIN)["initialize"])] == (
        ConfigParser.load_config_file(TRAIN)["initialize"]
    )
    assert "init_process_group" in " ".join(parser["initialize"])
    assert "destroy_process_group" in parser["finalize"][-1]


def test_multi_gpu_config_without_torchrun_says_so(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    wf = ConfigWorkflow(config_file=[TRAIN, MULTI], meta_file=META, workflow_type="train", bundle_root=str(tmp_path))
    with pytest.raises(Exception) as info:
        wf.initialize()
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    assert any("launched with torchrun" in m for m in chain), chain


@pytest.mark.distributed
def test_torchrun_two_processes_gloo(tmp_path):
    # 3 training volumes over 2 ranks (each rank draws from its shard of 2), 2 epochs of 2 iterations on every rank;
    # 3 validation volumes split 2 + 1, their metrics gathered across ranks
    data = tmp_path / "data"
    write_synthetic_dataset(data, n_train=3, n_val=3, n_test=0, shape=(16, 32, 32), seed=3)
    # test-only addition: every rank dumps its teacher after training, so the ranks can be compared here
    dump = tmp_path / "dump_teacher.json"
    save = "$torch.save(@teacher.state_dict(), os.path.join(@ckpt_dir, f\"teacher_rank{os.environ['RANK']}.pt\"))"
    dump.write_text(json.dumps({"+imports": ["$import os"], "+finalize": [save]}))
    bundle = tmp_path / "bundle"
    cmd = [
        *_torchrun(),
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        f"['{TRAIN}','{MULTI}','{dump}']",
        "--meta_file",
        META,
        "--bundle_root",
        str(bundle),
        "--dataset_dir",
        str(data),
        "--features",
        json.dumps(FEATURES),
        "--patch_size",
        "[16,32,32]",
        "--batch_size",
        "1",
        "--epochs",
        "2",
        "--epoch_length",
        "2",
        "--val_interval",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    assert "backend gloo, world size 2" in log
    assert "teacher: parameters identical on all 2 ranks" in log
    # logs from rank 0 only: one loss-terms line per epoch, one validation (at epoch 2)
    assert log.count("loss terms: pull") == 2, log[-6000:]
    assert log.count("Metrics -- val_ap50") == 1, log[-6000:]

    models = bundle / "models"
    # the same model.pt as single-process training: the plain student state dict, loadable strictly
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    net = _network_def()
    assert set(state) == set(net.state_dict())  # no "module." prefix from DistributedDataParallel
    net.load_state_dict(state, strict=True)

    resume = torch.load(models / "resume.pt", map_location="cpu", weights_only=True)
    assert resume["trainer"]["epoch_length"] == 2 and resume["trainer"]["iteration"] == 4

    teachers = [torch.load(models / f"teacher_rank{r}.pt", map_location="cpu", weights_only=True) for r in (0, 1)]
    saved = torch.load(models / "teacher.pt", map_location="cpu", weights_only=True)
    assert teachers[0].keys() == teachers[1].keys() == saved.keys() == state.keys()
    for k in saved:  # bitwise identical on both ranks, and what rank 0 wrote
        assert torch.equal(teachers[0][k], teachers[1][k]), k
        assert torch.equal(teachers[0][k], saved[k]), k
    # ... and really an EMA of a trained student: close to it, not equal (the head's threshold buffers are the
    # student's alone: the Lee & Liu pass of a ring head sets them after the teacher's last update)
    calibration = {"fg_label_frequency", "fg_positive_weight"}
    diff = max(
        (saved[k].float() - resume["model"][k].float()).abs().max().item() for k in saved if k not in calibration
    )
    assert 0 < diff < 0.1
