"""
Test-time flips for fewer network passes: the foreground head averaged over all mirror images (4 in 2D, the
default), over two (the image and its mirror image along every axis at once: a 180-degree rotation in 2D) or none,
with the shipped ``nuclei2d`` on DSB2018 training images (every 4th image of the training split, 67 images;
settings are chosen on training images), the rest of configs/inference.json's defaults unchanged.

Per arm: the network's seconds (flips and resampling included), the post-processing's, the pooled AP50 against the
dense labels and, per arm, the number of images where it scores above / below the default (all flips).

    .venv/bin/python -m research.perf.benchmark_flips [--threads 2] [--data_dir ../shared/data] [--page]

``--page`` writes research/pages/benchmark_flips.{md,json}. One benchmark at a time on a 2-core machine.
"""

from __future__ import annotations

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

PAGE = ROOT / "research" / "pages" / "benchmark_flips"
ARMS = ("all 4 views (default)", "2 views: image + all-axes flip", "no flips")


def _pooled(tp: float, n: float) -> float:
    return tp / (n - tp) if n > tp else 1.0


def _views(network, arm: str):
    """The inference network of ``arm``: the config's (all flips), two views, or the network without flips."""
    from spoco_bundle.inferers import FlippedHeadNet, ReducedPrecisionNet

    outer = network if isinstance(network, ReducedPrecisionNet) else None
    flipped = outer.network if outer is not None else network
    assert isinstance(flipped, FlippedHeadNet), type(flipped)
    if arm.startswith("all"):
        return network
    if arm.startswith("2 views"):
        two = FlippedHeadNet(flipped.network, len(flipped.flips[-1]), head_network=flipped.head_network)
        two.flips = [flipped.flips[0], flipped.flips[-1]]
        inner = two
    else:
        inner = flipped.network
    return ReducedPrecisionNet(inner) if outer is not None else inner


def measure(inputs: list[tuple[str, str]], threads: int) -> dict:
    import torch

    from spoco_bundle.metrics import ap50

    torch.set_num_threads(threads)
    parser = _parser("nuclei2d", {})
    base = parser.get_parsed_content("inference_network").eval()
    pre, inferer, post = (parser.get_parsed_content(k) for k in ("preprocessing", "inferer", "postprocessing"))
    per_image: dict[str, list[float]] = {}
    results: dict = {}
    for arm in ARMS:
        network = _views(base, arm)
        t_net = t_post = tp = n = 0.0
        scores = []
        for image, label in inputs:
            item = pre({"image": image})
            t0 = time.perf_counter()
            with torch.inference_mode():
                item["pred"] = inferer(item["image"][None], network)[0]
            t1 = time.perf_counter()
            seg = np.asarray(post(item)["pred"])[0]
            t_net, t_post = t_net + t1 - t0, t_post + time.perf_counter() - t1
            truth = _read(label)
            ap = ap50(truth, seg)
            scores.append(ap)
            k = sum(len(np.unique(x[x > 0])) for x in (truth, seg))
            tp, n = tp + ap * k / (1 + ap), n + k
        per_image[arm] = scores
        ref = per_image[ARMS[0]]
        results[arm] = {
            "network_s": t_net,
            "post_s": t_post,
            "ap50_pooled": _pooled(tp, n),
            "ap50_mean": float(np.mean(scores)),
            "better": int(sum(a > b for a, b in zip(scores, ref))),
            "worse": int(sum(a < b for a, b in zip(scores, ref))),
        }
        print(f"{arm}: {json.dumps(results[arm])}", flush=True)
    return results


def table(results: dict) -> str:
    base = results[ARMS[0]]["network_s"]
    lines = [
        "| arm | network s | x default | post-processing s | AP50 (pooled) | AP50 (mean per image) "
        "| images better / worse |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, r in results.items():
        lines.append(
            f"| {arm} | {r['network_s']:.1f} | {base / r['network_s']:.2f} | {r['post_s']:.1f} "
            f"| {r['ap50_pooled']:.3f} | {r['ap50_mean']:.3f} | {r['better']} / {r['worse']} |"
        )
    return "\n".join(lines)


def main(threads: int = 2, data_dir: str | None = None, page: bool = False) -> None:
    from spoco_bundle.inferers import native_bfloat16

    data = Path(data_dir) if data_dir else default_data_dir()
    load = os.getloadavg()[0]
    results = measure(case_inputs("dsb2018_train", data, Path("eval/flips")), threads)
    text = table(results)
    setup = (
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {threads} torch threads, no GPU (precision auto: bfloat16 "
        f"{'on' if native_bfloat16('cpu') else 'off'}); load average before the run {load:.2f} (one benchmark at a "
        f"time). Command: `python -m research.perf.benchmark_flips --threads {threads} --page`."
    )
    print(text + "\n\n" + setup)
    if page:
        write_page(
            PAGE, "Test-time flips: fewer views", "research/perf/benchmark_flips.py", __doc__, text, setup, results
        )


if __name__ == "__main__":
    fire.Fire(main)
