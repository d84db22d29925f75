"""
Training-step benchmark: seconds per iteration (student forward + teacher forward + SPOCO loss + backward +
optimizer step + teacher EMA update) and the share of the step spent in the loss (its forward and backward).

Default setting (issue #2): 3D patch 48x64x64, batch 2, feature maps 16-32-64, E=16, on CPU; labels from the
built-in synthetic nuclei (all objects annotated = the loss's worst case; `--instance_ratio 0.1` for sparse).

    .venv/bin/python -m research.perf.benchmark_training_step [--device cuda] [--iters 5] [--instance_ratio 1.0]
        [--spatial_dims 2 --patch "[192,192]" --features "[16,32,64,128]"] [--metatensor]

``--metatensor``: the batch comes as MONAI ``MetaTensor``s (with default metadata; the training DataLoader's carry
more, so this is a lower bound of the overhead), and a second row times the step with the networks called on those
directly, as the training did up to bundle 0.36 (``TwoViewInferer`` now hands them plain tensors: a MetaTensor's
per-operation dispatch slows every layer). ``--spatial_dims`` without ``--patch`` takes the bundle's default patch.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import fire
import numpy as np
import torch
from monai.data import MetaTensor

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere: this repository's spoco_bundle (and research)
    sys.path.insert(0, str(ROOT))

from spoco_bundle.handlers import MomentumTeacherHandler  # noqa: E402
from spoco_bundle.inferers import TwoViewInferer  # noqa: E402
from spoco_bundle.losses import SpocoLoss  # noqa: E402
from spoco_bundle.networks import EmbeddingUNet, default_patch_size, make_teacher  # noqa: E402
from spoco_bundle.synthetic import generate_nuclei  # noqa: E402
from spoco_bundle.transforms import SparseInstanceLabel  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(patch, batch_size, instance_ratio, device):
    images, labels = [], []
    for b in range(batch_size):
        img, lab = generate_nuclei(shape=tuple(patch), spacing=(2.0, 1.0, 1.0)[-len(patch) :], seed=b)
        lab = SparseInstanceLabel(instance_ratio=instance_ratio, seed=b)(lab[None].astype(np.int64))
        images.append(torch.as_tensor(img[None] / img.max()))
        labels.append(torch.as_tensor(np.asarray(lab)))
    x = torch.stack(images).float().to(device)
    return x, x + 0.05 * torch.randn_like(x), torch.stack(labels).long().to(device)


def main(
    device: str = "cpu",
    iters: int = 5,
    warmup: int = 2,
    patch=None,
    batch_size: int = 2,
    features=(16, 32, 64),
    embedding_dim: int = 16,
    instance_ratio: float = 1.0,
    threads: int | None = None,
    spatial_dims: int | None = None,
    metatensor: bool = False,
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    if patch is None:
        patch = (48, 64, 64) if spatial_dims in (None, 3) else tuple(default_patch_size(int(spatial_dims)))
    dims = len(patch) if spatial_dims is None else int(spatial_dims)
    if dims != len(patch):
        raise SystemExit(f"error: --patch {tuple(patch)} has {len(patch)} axes, --spatial_dims is {dims}.")
    dev = torch.device(device)
    torch.manual_seed(0)
    student = EmbeddingUNet(spatial_dims=dims, embedding_dim=embedding_dim, features=features).to(dev)
    teacher = make_teacher(student)
    inferer = TwoViewInferer(teacher)
    ema = MomentumTeacherHandler(teacher, student, momentum=0.999)
    loss_fn = SpocoLoss(embedding_dim=embedding_dim)
    opt = torch.optim.Adam(student.parameters(), lr=2e-4, weight_decay=1e-5)
    x, x_g, y = _batch(patch, batch_size, instance_ratio, dev)
    if metatensor:
        x, x_g, y = (MetaTensor(t) for t in (x, x_g, y))
    n_obj = [int(y[b].max()) for b in range(batch_size)]

    def direct(x, network, x_g):  # the networks on the batch as it comes (bundle <= 0.36's TwoViewInferer)
        s = network(x)
        with torch.no_grad():
            t = teacher(x_g)
        return s, t

    def times(forward) -> tuple[float, float]:
        step_times, loss_times = [], []
        for i in range(warmup + iters):
            _sync(dev)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            pred = forward(x, student, x_g)
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
        return float(np.mean(step_times)), float(np.mean(loss_times))

    forwards = {"TwoViewInferer": inferer}
    if metatensor:
        forwards["networks on the MetaTensors (<= 0.36)"] = direct
    # the set-ups take turns (two rounds each), so that a slower or faster period of the machine is shared
    runs: dict[str, list] = {name: [] for name in forwards}
    for _ in range(2 if metatensor else 1):
        for name, forward in forwards.items():
            runs[name].append(times(forward))
    rows = {name: tuple(float(np.mean(v)) for v in zip(*r)) for name, r in runs.items()}
    print(
        f"device {dev}, torch threads {torch.get_num_threads()}, patch {tuple(patch)}, batch {batch_size}, "
        f"features {tuple(features)}, E={embedding_dim}, annotated objects per patch {n_obj}, "
        f"batch as {'MetaTensor' if metatensor else 'torch.Tensor'}"
    )
    print("| step | s/iteration (mean of %d) | loss s/iteration | loss share |" % (iters * len(runs["TwoViewInferer"])))
    print("| --- | --- | --- | --- |")
    for name, (step, lt) in rows.items():
        print(f"| {name} | {step:.3f} | {lt:.3f} | {100 * lt / step:.1f} % |")
    step, lt = rows["TwoViewInferer"]
    out = {"step_s": step, "loss_s": lt, "loss_share": lt / step}
    if metatensor:
        out["step_s_metatensor_direct"] = rows["networks on the MetaTensors (<= 0.36)"][0]
    return out


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
