"""
Is the window dependence of the network its group norm's per-window statistics? A screen with the shipped
``nuclei3d`` on the 200^3 tile of the GoNuclear training volume 1135 (``research.perf.benchmark_precision``'s
``gonuclear1135``): every group norm frozen to statistics pooled over 8 crops of the window's size spread over the
image (mean and variance per group, as one image-wide normalisation), against the shipped per-window statistics,
with the default window (64 x 112 x 112, overlap 0.25) and with larger windows or less overlap (fewer voxels
computed twice).

Per arm: the network's seconds, AP50 against the dense labels and against the default's labels (agreement); for the
frozen network, the agreement between two window layouts (a window-independent network would give the same
labels). The rest of configs/inference.json's defaults (image_scale auto, precision auto) unchanged.

    .venv/bin/python -m research.perf.benchmark_window_norm [--threads 2] [--data_dir ../shared/data] [--page]

``--page`` writes research/pages/benchmark_window_norm.{md,json}. One benchmark at a time on a 2-core machine.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import fire
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from anywhere: the repository's package
    sys.path.insert(0, str(ROOT))

from research.data import default_data_dir  # noqa: E402
from research.perf import cpu_model, write_page  # noqa: E402
from research.perf.benchmark_inference import _parser, _read  # noqa: E402
from research.perf.benchmark_precision import case_inputs  # noqa: E402

PAGE = ROOT / "research" / "pages" / "benchmark_window_norm"
WINDOW = [64, 112, 112]
LARGE = [96, 160, 160]


def frozen_group_norm(network, crops) -> object:
    """A copy of ``network`` whose group norms use fixed statistics: per group, the mean and variance of its input
    pooled over ``crops`` (one pass with the shipped per-window norms), folded into a per-channel scale and shift."""
    import torch

    net = copy.deepcopy(network)
    norms = [(n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    sums: dict[str, list] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().double()
            g = x.reshape(x.shape[0], module.num_groups, -1)
            s = sums.setdefault(name, [0, 0.0, 0.0])
            s[0] += g.shape[0] * g.shape[-1]
            s[1] = s[1] + g.sum((0, 2))
            s[2] = s[2] + (g * g).sum((0, 2))

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in norms]
    with torch.inference_mode():
        for c in crops:
            net(c[None])
    for h in handles:
        h.remove()

    class Frozen(torch.nn.Module):
        def __init__(self, gn, mean, var):
            super().__init__()
            rep = gn.num_channels // gn.num_groups
            scale = gn.weight.detach() / torch.sqrt(var.repeat_interleave(rep).float() + gn.eps)
            self.register_buffer("scale", scale)
            self.register_buffer("shift", gn.bias.detach() - mean.repeat_interleave(rep).float() * scale)

        def forward(self, x):
            shape = (1, -1) + (1,) * (x.ndim - 2)
            return x * self.scale.view(shape).to(x.dtype) + self.shift.view(shape).to(x.dtype)

    for name, gn in norms:
        n, s1, s2 = sums[name]
        mean = s1 / n
        parent = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
        setattr(parent, name.rsplit(".", 1)[-1], Frozen(gn, mean, s2 / n - mean * mean))
    return net


def measure(inputs: list[tuple[str, str]], threads: int) -> dict:
    import torch

    from spoco_bundle.inferers import Rescale, _plain
    from spoco_bundle.metrics import ap50

    torch.set_num_threads(threads)
    ((image, label),) = inputs
    truth = _read(label)
    parser = _parser("nuclei3d", {})
    network = parser.get_parsed_content("inference_network").eval()
    pre, inferer, post = (parser.get_parsed_content(k) for k in ("preprocessing", "inferer", "postprocessing"))
    item = pre({"image": image})

    def segment(net, settings):
        infer = _parser("nuclei3d", settings).get_parsed_content("inferer") if settings else inferer
        it = dict(item)
        t0 = time.perf_counter()
        with torch.inference_mode():
            it["pred"] = infer(it["image"][None], net)[0]
        seconds = time.perf_counter() - t0
        return np.asarray(post(it)["pred"])[0], seconds

    default, t_default = segment(network, {})
    # 8 crops of the window on the grid the network sees (the image resampled by the scale auto found)
    x = _plain(Rescale(inferer.last_scale, mode="linear")(_plain(item["image"])))
    starts = [np.linspace(0, max(0, s - w), 2).astype(int) for s, w in zip(x.shape[1:], WINDOW)]
    crops = [
        x[:, a : a + WINDOW[0], b : b + WINDOW[1], c : c + WINDOW[2]]
        for a in starts[0]
        for b in starts[1]
        for c in starts[2]
    ]
    frozen = frozen_group_norm(network, crops)
    arms = {
        "per-window norm, 64x112x112, overlap 0.25 (default)": (network, {}),
        "frozen norm, 64x112x112, overlap 0.25": (frozen, {}),
        "frozen norm, 64x112x112, overlap 0.125": (frozen, {"sliding_window_inferer#overlap": 0.125}),
        "frozen norm, 96x160x160, overlap 0.125": (
            frozen,
            {"window_size": LARGE, "sliding_window_inferer#overlap": 0.125, "sliding_window_inferer#sw_batch_size": 1},
        ),
        "per-window norm, 96x160x160, overlap 0.125": (
            network,
            {"window_size": LARGE, "sliding_window_inferer#overlap": 0.125, "sliding_window_inferer#sw_batch_size": 1},
        ),
    }
    results, labels = {}, {}
    for arm, (net, settings) in arms.items():
        seg, seconds = (default, t_default) if net is network and not settings else segment(net, settings)
        labels[arm] = seg
        results[arm] = {"network_s": seconds, "ap50": ap50(truth, seg), "agreement": ap50(default, seg)}
        print(f"{arm}: {json.dumps(results[arm])}", flush=True)
    a, b = "frozen norm, 64x112x112, overlap 0.25", "frozen norm, 96x160x160, overlap 0.125"
    results["frozen norm: agreement between the two windows"] = {"agreement": ap50(labels[a], labels[b])}
    return results


def table(results: dict) -> str:
    lines = ["| arm | network s | AP50 | AP50 vs the default's labels |", "|---|---|---|---|"]
    for arm, r in results.items():
        seconds = f"{r['network_s']:.1f}" if "network_s" in r else "–"
        ap = f"{r['ap50']:.3f}" if "ap50" in r else "–"
        lines.append(f"| {arm} | {seconds} | {ap} | {r['agreement']:.3f} |")
    return "\n".join(lines)


def main(threads: int = 2, data_dir: str | None = None, page: bool = False) -> None:
    data = Path(data_dir) if data_dir else default_data_dir()
    load = os.getloadavg()[0]
    results = measure(case_inputs("gonuclear1135", data, Path("eval/precision")), threads)
    text = table(results)
    setup = (
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {threads} torch threads, no GPU; load average before the "
        f"run {load:.2f} (one benchmark at a time). Command: "
        f"`python -m research.perf.benchmark_window_norm --threads {threads} --page`."
    )
    print(text + "\n\n" + setup)
    if page:
        write_page(
            PAGE,
            "Window dependence: per-window group norm or the window's border?",
            "research/perf/benchmark_window_norm.py",
            __doc__,
            text,
            setup,
            results,
        )


if __name__ == "__main__":
    fire.Fire(main)
