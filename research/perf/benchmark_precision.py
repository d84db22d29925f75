"""
Inference precision and back-end: the same configs/inference.json chain in float32, in bfloat16 (torch autocast), and
through OpenVINO (``backend`` openvino, float32 and bfloat16, when the package is installed), on training images
(settings are chosen on them), timed and compared label for label with float32.

Cases (``--cases``):

- ``dsb2018_train``: every 4th image of the DSB2018 training split (67 images, 2D) with the shipped ``nuclei2d``
  (test-time flips on, as by default in 2D).
- ``gonuclear1135``: a 200 x 200 x 200 TIFF of mirrored copies of the GoNuclear training volume 1135 with its voxel
  size (``research.perf.benchmark_inference``'s tiling) with the shipped ``nuclei3d``.

Per case and setting: the network's seconds (``inference_network`` through the inferer, flips and resampling
included; for OpenVINO the model's conversion and compilation on the first images too), the post-processing's, AP50
against the dense labels (mean over images), and for every setting but float32 the agreement with the float32
labels (AP50 of its labels against the float32 ones, mean and minimum over images) and the largest difference of the
network outputs. All settings run in one process, float32 first, on the same inputs.

    .venv/bin/python -m research.perf.benchmark_precision [--cases dsb2018_train,gonuclear1135] [--threads 2]
        [--settings float32,bfloat16,openvino_float32,openvino_bfloat16] [--data_dir ../shared/data]
        [--work eval/precision] [--page]

OpenVINO's settings need ``pip install openvino`` (the bundle's ``openvino`` extra); without it they are left out.
``--page`` writes research/pages/benchmark_precision.{md,json}. One benchmark at a time on a 2-core machine.
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
from research.perf.benchmark_inference import _parser, _read, _tile  # noqa: E402

PAGE = ROOT / "research" / "pages" / "benchmark_precision"
CASES = {"dsb2018_train": "nuclei2d", "gonuclear1135": "nuclei3d"}
# inference.json ids per setting; the first is the reference
SETTINGS = {
    "float32": {"precision": "float32"},
    "bfloat16": {"precision": "bfloat16"},
    "openvino_float32": {"precision": "float32", "backend": "openvino"},
    "openvino_bfloat16": {"precision": "bfloat16", "backend": "openvino"},
}


def case_inputs(case: str, data_dir: Path, work: Path) -> list[tuple[str, str]]:
    """(image path, label path) pairs of ``case`` (the 3D tile built in ``work`` once)."""
    if case == "dsb2018_train":
        root = data_dir / "dsb2018"
        ids = json.loads((root / "split.json").read_text())["training"][::4]
        return [(str(root / "images" / f"{i}.tif"), str(root / "labels" / f"{i}.tif")) for i in ids]
    import nibabel as nib
    import tifffile

    image, labels = work / "gonuclear1135_image.tif", work / "gonuclear1135_labels.tif"
    if not (image.exists() and labels.exists()):
        root = data_dir / "gonuclear"
        src = nib.load(root / "1135_image.nii.gz")
        im = np.asarray(src.dataobj).transpose(2, 1, 0)  # NIfTI x, y, z -> z, y, x
        lab = np.asarray(nib.load(root / "1135_labels.nii.gz").dataobj).astype(np.uint16).transpose(2, 1, 0)
        x, _, z = (float(v) for v in src.header.get_zooms()[:3])
        geometry = {"imagej": True, "resolution": (1 / x, 1 / x), "metadata": {"axes": "ZYX", "spacing": z}}
        work.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(labels, np.ascontiguousarray(_tile(lab, (2, 2, 2), True)), **geometry)
        tifffile.imwrite(image, np.ascontiguousarray(_tile(im, (2, 2, 2), False)), **geometry)
    return [(str(image), str(labels))]


def measure(case: str, inputs: list[tuple[str, str]], threads: int, settings: list[str]) -> dict:
    import torch

    from spoco_bundle.metrics import ap50

    torch.set_num_threads(threads)
    results: dict = {}
    reference: list[np.ndarray] = []
    outputs: list = []
    for setting in settings:
        parser = _parser(CASES[case], SETTINGS[setting])
        network = parser.get_parsed_content("inference_network").eval()
        pre, inferer, post = (parser.get_parsed_content(k) for k in ("preprocessing", "inferer", "postprocessing"))
        t_net = t_post = 0.0
        scores, agree, diff = [], [], 0.0
        for k, (image, label) in enumerate(inputs):
            item = pre({"image": image})
            t0 = time.perf_counter()
            with torch.inference_mode():
                item["pred"] = inferer(item["image"][None], network)[0]
            t1 = time.perf_counter()
            pred = item["pred"]
            seg = np.asarray(post(item)["pred"])[0]
            t_net, t_post = t_net + t1 - t0, t_post + time.perf_counter() - t1
            scores.append(ap50(_read(label), seg))
            if setting == settings[0]:
                reference.append(seg)
                outputs.append(pred[:, ::4, ::4] if pred.ndim == 3 else pred[:, ::2, ::4, ::4])  # a subsample
            else:
                agree.append(ap50(reference[k], seg))
                sub = pred[:, ::4, ::4] if pred.ndim == 3 else pred[:, ::2, ::4, ::4]
                diff = max(diff, float((torch.as_tensor(sub) - torch.as_tensor(outputs[k])).abs().max()))
        row = {"network_s": t_net, "post_s": t_post, "ap50": float(np.mean(scores))}
        if agree:
            row.update(agreement=float(np.mean(agree)), min_agreement=float(np.min(agree)), max_abs_diff=diff)
        results[setting] = row
        print(f"{case} {setting}: {json.dumps(row)}", flush=True)
    return results


def table(all_results: dict) -> str:
    lines = [
        "| case | setting | network s | x float32 | post-processing s | AP50 | agreement with float32 (mean / min)"
        " | max abs. output difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, results in all_results.items():
        base = next(iter(results.values()))["network_s"]
        for setting, r in results.items():
            agree = f"{r['agreement']:.3f} / {r['min_agreement']:.3f}" if "agreement" in r else "–"
            diff = f"{r['max_abs_diff']:.3g}" if "max_abs_diff" in r else "–"
            lines.append(
                f"| {case} | {setting.replace('_', ' ')} | {r['network_s']:.1f} | {base / r['network_s']:.2f} | "
                f"{r['post_s']:.1f} | {r['ap50']:.3f} | {agree} | {diff} |"
            )
    return "\n".join(lines)


def main(
    cases: str = "dsb2018_train,gonuclear1135",
    threads: int = 2,
    settings: str = ",".join(SETTINGS),
    data_dir: str | None = None,
    work: str = "eval/precision",
    page: bool = False,
) -> None:
    from spoco_bundle.backends import openvino_available
    from spoco_bundle.inferers import native_bfloat16

    data = Path(data_dir) if data_dir else default_data_dir()
    names = [c.strip() for c in str(cases).split(",") if c.strip()]
    chosen = [s.strip() for s in (settings.split(",") if isinstance(settings, str) else settings) if s.strip()]
    unknown = [s for s in chosen if s not in SETTINGS]
    if unknown or not chosen or chosen[0] != "float32":
        raise SystemExit(f"--settings: float32 first, then any of {', '.join(SETTINGS)}; got {chosen}.")
    if not openvino_available():
        print("openvino is not installed: its settings are left out.")
        chosen = [s for s in chosen if "backend" not in SETTINGS[s]]
    load = os.getloadavg()[0]
    all_results = {c: measure(c, case_inputs(c, data, Path(work)), threads, chosen) for c in names}
    text = table(all_results)
    setup = (
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {threads} torch threads (OpenVINO: as many), no GPU; "
        f"bfloat16 native on this CPU: {native_bfloat16('cpu')}; load average before the run {load:.2f} (one "
        f"benchmark at a time). Command: `python -m research.perf.benchmark_precision --cases {','.join(names)} "
        f"--threads {threads} --settings {','.join(chosen)} --page`."
    )
    print(text + "\n\n" + setup)
    if page:
        write_page(
            PAGE,
            "Inference precision and back-end",
            "research/perf/benchmark_precision.py",
            __doc__,
            text,
            setup,
            all_results,
        )


if __name__ == "__main__":
    fire.Fire(main)
