"""Helpers for multi-GPU / multi-node training with torchrun and DistributedDataParallel (configs/multi_gpu_train.json).

torchrun starts one process per GPU (or per CPU worker) and sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; these
helpers turn that into a device, a process group with the right backend, rank-0-only handlers and a clean teardown.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from spoco_bundle.networks import unwrap

__all__ = [
    "local_device",
    "init_process_group",
    "is_main_process",
    "main_process_handlers",
    "check_in_sync",
    "destroy_process_group",
]

logger = logging.getLogger(__name__)

# Handlers that only rank 0 runs: checkpoint writing (incl. the best model chosen by validation), logs, progress bar
# and metric/experiment writers. Everything else (teacher update, LR schedule, checkpoint *loading*, and validation
# itself, whose MONAI metrics all-gather their values across ranks) runs on every rank.
_MAIN_ONLY = (
    "CheckpointSaver",
    "StatsHandler",
    "TensorBoardStatsHandler",
    "TensorBoardImageHandler",
    "TensorBoardInstancePreview",
    "MLFlowHandler",
    "ClearMLStatsHandler",
    "MetricsSaver",
    "TrainingProgressBar",
    "LossTermsLogger",
    "ModelCardWriter",
)


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu`` (``LOCAL_RANK`` is set by torchrun, 0 without it)."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init_process_group(device: str | torch.device, timeout_minutes: float = 120.0) -> None:
    """
    Join the process group torchrun set up: backend NCCL for a CUDA ``device``, gloo for CPU. Sets the current CUDA
    device (NCCL needs it) and lowers the log level of every rank but 0 to WARNING, so the log is written once.

    Args:
        device: this process's device (``local_device()``).
        timeout_minutes: collective timeout: the longest any rank may wait for the others, e.g. while rank 0 writes
            checkpoints or the ranks' validation shards (clustering included) take different times.

    Raises:
        RuntimeError: not started by torchrun (no ``RANK``/``WORLD_SIZE`` in the environment).
    """
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"configs/multi_gpu_train.json must be launched with torchrun (missing environment {missing}), e.g. "
            "torchrun --nproc_per_node=2 -m monai.bundle run training --config_file "
            "\"['configs/train.json','configs/multi_gpu_train.json']\" ..."
        )
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    if dist.get_rank() > 0:
        logging.getLogger().setLevel(logging.WARNING)
    logger.info(f"process group: backend {backend}, world size {dist.get_world_size()}, rank 0 on {device}")


def is_main_process() -> bool:
    """True on rank 0 of a process group, and in a process that is in none: alone, or launched by torchrun as rank 0
    before the group is joined (``RANK``, which torchrun sets)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def main_process_handlers(handlers: Sequence | None) -> list | None:
    """
    The handlers of a trainer or evaluator for this rank: all of them on rank 0; on the other ranks, without
    checkpoint savers, loggers and progress bars (matched by class name, so the handler list may be reordered or
    extended). ``None`` (an evaluator without handlers) stays ``None``.
    """
    if handlers is None or is_main_process():
        return None if handlers is None else list(handlers)
    return [h for h in handlers if type(h).__name__ not in _MAIN_ONLY]


@torch.no_grad()
def check_in_sync(module: torch.nn.Module, name: str = "network") -> None:
    """
    Verify that ``module``'s parameters are the same on every rank (a float64 sum and sum of squares per tensor,
    gathered from all ranks and compared exactly). A no-op outside a process group.

    Raises:
        RuntimeError: on every rank, if any rank differs.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    params = [p.detach() for p in unwrap(module).parameters()]
    local = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in params]).flatten()
    if dist.get_backend() == "nccl":
        local = local.cuda()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    differing = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
    if differing:
        raise RuntimeError(f"{name} parameters differ between rank 0 and ranks {differing} after training.")
    logger.info(f"{name}: parameters identical on all {dist.get_world_size()} ranks")


def destroy_process_group() -> None:
    """Wait for every rank (rank 0 may still be writing checkpoints), then tear the process group down."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
