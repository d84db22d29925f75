"""
Training-step benchmark: seconds per iteration (student forward + teacher forward + SPOCO loss + backward +
optimizer step + teacher EMA update) and the share of the step spent in the loss (its forward and backward).

Default setting (issue #2): 3D patch 48x64x64, batch 2, feature maps 16-32-64, E=16, on CPU; labels from the
built-in synthetic nuclei (all objects annotated = the loss's worst case; `--instance_ratio 0.1` for sparse).

    .venv/bin/python scripts/benchmark_training_step.py [--device cuda] [--iters 5] [--instance_ratio 1.0]
"""

from __future__ import annotations

import time

import fire
import numpy as np
import torch

from spoco_bundle.handlers import MomentumTeacherHandler
from spoco_bundle.inferers import TwoViewInferer
from spoco_bundle.losses import SpocoLoss
from spoco_bundle.networks import EmbeddingUNet, make_teacher
from spoco_bundle.synthetic import generate_nuclei
from spoco_bundle.transforms import SparseInstanceLabel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(patch, batch_size, instance_ratio, device):
    images, labels = [], []
    for b in range(batch_size):
        img, lab = generate_nuclei(shape=tuple(patch), spacing=(2.0, 1.0, 1.0), seed=b)
        lab = SparseInstanceLabel(instance_ratio=instance_ratio, seed=b)(lab[None].astype(np.int64))
        images.append(torch.as_tensor(img[None] / img.max()))
        labels.append(torch.as_tensor(np.asarray(lab)))
    x = torch.stack(images).float().to(device)
    return x, x + 0.05 * torch.randn_like(x), torch.stack(labels).long().to(device)


def main(
    device: str = "cpu",
    iters: int = 5,
    warmup: int = 2,
    patch=(48, 64, 64),
    batch_size: int = 2,
    features=(16, 32, 64),
    embedding_dim: int = 16,
    instance_ratio: float = 1.0,
    threads: int | None = None,
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    student = EmbeddingUNet(spatial_dims=3, embedding_dim=embedding_dim, features=features).to(dev)
    teacher = make_teacher(student)
    inferer = TwoViewInferer(teacher)
    ema = MomentumTeacherHandler(teacher, student, momentum=0.999)
    loss_fn = SpocoLoss(embedding_dim=embedding_dim)
    opt = torch.optim.Adam(student.parameters(), lr=2e-4, weight_decay=1e-5)
    x, x_g, y = _batch(patch, batch_size, instance_ratio, dev)
    n_obj = [int(y[b].max()) for b in range(batch_size)]

    step_times, loss_times = [], []
    for i in range(warmup + iters):
        _sync(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        pred = inferer(x, student, x_g)
        loss = loss_fn(pred, y)
        loss.backward()
        opt.step()
        ema()
        _sync(dev)
        t1 = time.perf_counter()
        # the loss alone (forward + backward) on the same network outputs
        s = pred[0].detach().requires_grad_(True)
        _sync(dev)
        t2 = time.perf_counter()
        loss_fn((s, pred[1]), y).backward()
        _sync(dev)
        t3 = time.perf_counter()
        if i >= warmup:
            step_times.append(t1 - t0)
            loss_times.append(t3 - t2)
    step, lt = float(np.mean(step_times)), float(np.mean(loss_times))
    print(
        f"device {dev}, torch threads {torch.get_num_threads()}, patch {tuple(patch)}, batch {batch_size}, "
        f"features {tuple(features)}, E={embedding_dim}, annotated objects per patch {n_obj}"
    )
    print("| s/iteration (mean of %d) | loss s/iteration | loss share |" % iters)
    print("| --- | --- | --- |")
    print(f"| {step:.3f} | {lt:.3f} | {100 * lt / step:.1f} % |")
    return {"step_s": step, "loss_s": lt, "loss_share": lt / step}


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
