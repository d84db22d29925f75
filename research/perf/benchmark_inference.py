"""
Inference speed benchmark: the bundle's default inference end to end on real images, with the network's and the
post-processing's share, peak memory and AP50, beside a plain MONAI network pass over the same inputs.

Cases (``--cases``):

- ``dsb2018``: the DSB2018 validation images (66 fluorescence nuclei images, 2D, 4.3 Mpixel in all) with the
  shipped ``nuclei2d``; AP50 per image against their dense labels, averaged over images.
- ``gonuclear32``: a 200 x 400 x 400 (32 Mvoxel) TIFF tiled from the held-out GoNuclear volume 1136 (mirrored
  copies with its voxel size, each copy's labels renumbered, a nucleus cut by a copy's face and its mirror image
  one object; cut so that no face crosses the centre, where ``image_scale auto`` measures the blob size) with the
  shipped ``nuclei3d``; AP50 against the tiled labels (the nuclei doubled at the faces are shapes the model never
  saw: the single volume scores higher, see the model card).

Rows per case, each in its own child process (its peak resident memory, ``ru_maxrss``, interpreter and libraries
included):

- ``bundle``: configs/inference.json's objects (preprocessing, ``inference_network``, ``inferer``, post-processing
  chain) in one process, timed per stage: load, network (``inference_network`` through the inferer, test-time flips
  and ``image_scale`` included), post-processing (the whole chain). ``bytes/voxel``: (peak - resident memory before
  the image was read) / voxels, the whole-volume path's memory per voxel (3D; 2D images are too small to tell).
  The same in float32 (``precision`` ``auto`` computes in bfloat16 on a CPU with native bfloat16), and in 2D with
  test-time flips off and / or ``image_scale`` 1 (``VARIANTS_2D``): what each costs and buys; with OpenVINO
  installed (the ``openvino`` extra), ``backend`` openvino too (3D: also as ``spoco segment --backend openvino``).
- ``plain``: MONAI's ``SlidingWindowInferer`` (the model's window, overlap 0.25, 4 windows per batch, Gaussian
  weights) over the same normalised inputs with the same network, no flips, no resampling: what any MONAI bundle pays
  for one network pass. Its arithmetic rate (the network's FLOPs per window, torch's ``FlopCounterMode``, times the
  windows run, per second) is compared with the best of five runs of one wide convolution (64 -> 64 channels, 3x3
  (x3), channels-last, a window batch's size): the share of the CPU's convolution throughput the network reaches.
- ``stardist`` (2D): StarDist (the accuracy benchmark's peer, ``bash research/setup_benchmark.sh``) trained on the
  case's training images with every label for ``--stardist_budget_s`` CPU-s (0: no row), timed predicting the
  case's images (its network and non-maximum suppression, TensorFlow CPU on the same threads); its AP50 per image.
- ``spoco segment`` (3D): the command a user runs, defaults only (the memory budget picks whole-volume or blockwise),
  then with ``--max_memory_gb`` for each ``--budgets`` value; wall time of the command, the route it took, peak
  memory of the command, AP50 against the ground truth.

Every row but the first ``bundle`` row scores its labels against those of the ``bundle`` rows with the defaults and
in float32 (AP50 of its labels against theirs, mean over images): agreement.

Results are cached per row under ``--out_dir`` (a rerun measures only what is missing; ``--rerun`` measures again);
the table goes to stdout and, with ``--page``, to ``research/pages/benchmark_inference.{md,json}``, from which
``scripts/sync_docs.py`` copies it into docs/results.md.

    .venv/bin/python -m research.perf.benchmark_inference [--cases dsb2018,gonuclear32] [--budgets 2]
        [--threads 2] [--data_dir ../shared/data] [--out_dir eval/inference_speed] [--page]
        [--extra_cli '[{"max_memory_gb": 2, "blockwise#workers": 1}]']   (more 3D command rows, e.g. for a screen)

One benchmark at a time on a 2-core machine (anything beside it slows torch several-fold).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fire
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from anywhere: the repository's package
    sys.path.insert(0, str(ROOT))

from research.data import dataset_available, default_data_dir  # noqa: E402
from research.perf import cpu_model  # noqa: E402

PAGE = ROOT / "research" / "pages" / "benchmark_inference"
CASES = {
    "dsb2018": {"model": "nuclei2d", "dims": 2},
    # mirrored copies 3 x 5 x 5, cut so that the centre (where image_scale "auto" measures) lies inside a copy
    "gonuclear32": {
        "model": "nuclei3d",
        "dims": 3,
        "volume": "1136",
        "tiles": (3, 5, 5),
        "cut": (50, 50, 50),
        "shape": (200, 400, 400),
    },
}
# the 2D variants every dsb2018 run adds beside the defaults
VARIANTS_2D = (
    {"precision": "float32"},
    {"test_time_flips": False},
    {"image_scale": 1.0},
    {"image_scale": 1.0, "test_time_flips": False},
)
VARIANTS_3D = ({"precision": "float32"},)
# with OpenVINO installed (the bundle's openvino extra), every case adds these rows: the chain and (3D) the command
OPENVINO = {"backend": "openvino"}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def _machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores"


# ---------------------------------------------------------------------------------------------------------- inputs


def _tile(a: np.ndarray, reps: tuple[int, ...], labels: bool) -> np.ndarray:
    """``a`` repeated ``reps`` times per axis, every other copy mirrored (no seams in the image). Label copies are
    renumbered so that each copy's objects are their own, except that an object cut by a copy's face and its mirror
    image across that face are one object (as they are one in the image)."""
    out, copies = a, 1
    for ax, r in enumerate(reps):
        parts = []
        for i in range(r):
            part = out if i % 2 == 0 else np.flip(out, ax)
            if labels and i:
                part = np.where(part > 0, part + i * copies * (int(a.max()) + 1), 0)
            parts.append(part)
        out = np.concatenate(parts, axis=ax)
        copies *= r
    return _fuse_faces(out, reps, a.shape) if labels else out


def _fuse_faces(labels: np.ndarray, reps: tuple[int, ...], tile: tuple[int, ...]) -> np.ndarray:
    """``labels`` with the ids that meet across the faces between mirrored copies made one (union-find)."""
    parent = np.arange(int(labels.max()) + 1)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for ax, r in enumerate(reps):
        for k in range(1, r):
            a = np.take(labels, k * tile[ax] - 1, axis=ax)
            b = np.take(labels, k * tile[ax], axis=ax)
            both = (a > 0) & (b > 0)
            for x, y in np.unique(np.stack([a[both], b[both]], axis=1), axis=0):
                parent[root(int(x))] = root(int(y))
    lut = np.array([root(i) for i in range(len(parent))], dtype=labels.dtype)
    return lut[labels]


def case_inputs(case: str, data_dir: Path, work: Path) -> list[tuple[str, str]]:
    """(image path, label path) pairs of ``case`` (3D volumes built in ``work`` once)."""
    if case == "dsb2018":
        root = data_dir / "dsb2018"
        ids = json.loads((root / "split.json").read_text())["validation"]
        return [(str(root / "images" / f"{i}.tif"), str(root / "labels" / f"{i}.tif")) for i in ids]
    import tifffile

    spec = CASES[case]
    image, labels = work / f"{case}_image.tif", work / f"{case}_labels.tif"
    if not (image.exists() and labels.exists()):
        root = data_dir / "gonuclear"
        source = root / f"{spec['volume']}_image.tif"
        im, lab = tifffile.imread(source), tifffile.imread(root / f"{spec['volume']}_labels.tif")
        box = tuple(slice(c, c + n) for c, n in zip(spec["cut"], spec["shape"]))
        # the source's voxel size (ImageJ TIFF: z spacing in its metadata, y / x in the resolution tags): the
        # post-processing's shape split works in physical units
        with tifffile.TiffFile(source) as tif:
            z, (num, den) = tif.imagej_metadata["spacing"], tif.pages[0].tags["XResolution"].value
        geometry = {
            "imagej": True,
            "resolution": (num / den, num / den),
            "metadata": {"axes": "ZYX", "spacing": z, "unit": "um"},
        }
        tiled_labels = _tile(lab.astype(np.uint16), spec["tiles"], True)[box]  # 75 copies of 32 ids fit uint16
        tifffile.imwrite(labels, np.ascontiguousarray(tiled_labels), **geometry)
        tifffile.imwrite(image, np.ascontiguousarray(_tile(im, spec["tiles"], False)[box]), **geometry)
    return [(str(image), str(labels))]


def _read(path: str) -> np.ndarray:
    from spoco_bundle.io import read_image

    return read_image(path)[0]


# ---------------------------------------------------------------------------------------------------------- children


def _parser(model: str, settings: dict[str, Any]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser["bundle_root"] = str(ROOT)
    parser["model"] = model
    for k, v in settings.items():
        parser[k] = v
    return parser


def child_bundle(args: dict) -> dict:
    """configs/inference.json's chain, stage by stage, over the inputs; labels saved for the agreement rows."""
    import torch

    from spoco_bundle.blockwise.volume import resident_bytes
    from spoco_bundle.metrics import ap50

    torch.set_num_threads(args["threads"])
    parser = _parser(args["model"], args["settings"])
    network = parser.get_parsed_content("inference_network").eval()
    pre = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    post = parser.get_parsed_content("postprocessing")
    times = {"load": 0.0, "network": 0.0, "post": 0.0}
    voxels, scores, per_voxel, agree = 0, [], [], {}
    for k, (image, label) in enumerate(args["inputs"]):
        before = resident_bytes() / 1e9
        t0 = time.perf_counter()
        item = pre({"image": image})
        t1 = time.perf_counter()
        with torch.inference_mode():
            item["pred"] = inferer(item["image"][None], network)[0]
        t2 = time.perf_counter()
        seg = np.asarray(post(item)["pred"])[0]
        t3 = time.perf_counter()
        times["load"] += t1 - t0
        times["network"] += t2 - t1
        times["post"] += t3 - t2
        n = int(np.prod(seg.shape))
        voxels += n
        per_voxel.append((_peak_gb() - before) * 1e9 / n)
        scores.append(ap50(_read(label), seg))
        for name, folder in args.get("references", {}).items():
            agree.setdefault(name, []).append(ap50(np.load(os.path.join(folder, f"{k}.npy")), seg))
        if args.get("save"):
            np.save(os.path.join(args["save"], f"{k}.npy"), seg)
    result = {**times, "voxels": voxels, "ap50": float(np.mean(scores)), "bytes_per_voxel": max(per_voxel)}
    return {**result, "agreement": {name: float(np.mean(v)) for name, v in agree.items()}}


def child_plain(args: dict) -> dict:
    """A plain MONAI sliding-window pass of the same network over the same normalised inputs, with the network's
    arithmetic rate (FLOPs of its windows, counted by torch's FlopCounterMode, per second)."""
    import torch
    from monai.inferers import SlidingWindowInferer
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args["threads"])
    parser = _parser(args["model"], {})
    network = parser.get_parsed_content("network").eval()
    pre = parser.get_parsed_content("preprocessing")
    roi = parser.get_parsed_content("sliding_window_inferer::roi_size")
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=4, overlap=0.25, mode="gaussian")
    windows = [0]

    def counted(x: torch.Tensor) -> torch.Tensor:
        windows[0] += int(x.shape[0])
        return network(x)

    seconds, voxels = 0.0, 0
    for image, _ in args["inputs"]:
        x = pre({"image": image})["image"][None]
        t0 = time.perf_counter()
        with torch.inference_mode():
            inferer(x, counted)
        seconds += time.perf_counter() - t0
        voxels += int(np.prod(x.shape[2:]))
    with torch.inference_mode(), FlopCounterMode(display=False) as flops:
        network(torch.zeros(1, 1, *roi))
    gflop = flops.get_total_flops() * windows[0] / 1e9
    return {"network": seconds, "voxels": voxels, "gflop": gflop, "gflop_s": gflop / seconds}


def child_conv_peak(args: dict) -> dict:
    """The CPU's convolution throughput: the best of a few runs of one wide 3x3(x3) convolution (64 -> 64 channels,
    channels-last, the layout the network uses) on a batch the size of a sliding-window batch, in GFLOP/s."""
    import torch

    torch.set_num_threads(args["threads"])
    dims = args["dims"]
    conv = (torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d)(64, 64, 3, padding=1).eval()
    shape = (4, 64, 32, 56, 56) if dims == 3 else (4, 64, 160, 160)
    layout = torch.channels_last_3d if dims == 3 else torch.channels_last
    x = torch.rand(shape).contiguous(memory_format=layout)
    conv = conv.to(memory_format=layout)
    flop = 2 * 64 * 64 * 3**dims * int(np.prod(shape[2:])) * shape[0]
    best = float("inf")
    with torch.inference_mode():
        conv(x)
        for _ in range(5):
            t0 = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - t0)
    return {"gflop_s": flop / best / 1e9}


def child_cli(args: dict) -> dict:
    """``spoco segment`` as a user runs it; wall time and the command's peak memory; scores of what it wrote."""
    from spoco_bundle.metrics import ap50

    image, label = args["inputs"][0]
    out = tempfile.mkdtemp(prefix="spoco_speed_")
    folder = os.path.join(out, "in")
    os.makedirs(folder)
    os.symlink(image, os.path.join(folder, os.path.basename(image)))
    cmd = [sys.executable, "-m", "spoco_bundle", "segment", folder, os.path.join(out, "out"), "--model", args["model"]]
    cmd += [f"--{k}={v}" for k, v in args["settings"].items()]
    env = {**os.environ, "OMP_NUM_THREADS": str(args["threads"])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    stem = os.path.basename(image).rsplit(".", 1)[0]
    seg = _read(os.path.join(out, "out", f"{stem}_instances.tif"))
    result = {"seconds": seconds, "peak_gb": peak, "voxels": int(seg.size), "ap50": ap50(_read(label), seg)}
    result["route"] = "blockwise" if " blocks of " in proc.stderr + proc.stdout else "whole"
    result["log_tail"] = (proc.stderr + proc.stdout)[-1500:]
    result["agreement"] = {name: ap50(np.load(path), seg) for name, path in args.get("references", {}).items()}
    shutil.rmtree(out, ignore_errors=True)
    return result


def child_stardist(args: dict) -> dict:
    """StarDist (the accuracy benchmark's peer, research/methods/stardist_peer.py, in ``.venv-bench``) trained on the
    case's training split with every label for ``budget_s`` CPU-s, then timed predicting the same images (network
    and its non-maximum suppression, TensorFlow on ``threads`` threads)."""
    from research.data import load_benchmark
    from research.methods.stardist_peer import fit_predict
    from research.settings import RunSettings
    from spoco_bundle.metrics import ap50

    split = load_benchmark(args["dataset"], args.get("data_dir"))[0]
    run = RunSettings(budget_s=args["budget_s"], clock="cpu", threads=args["threads"], data_dir=args.get("data_dir"))
    result = fit_predict(split, 1.0, run)
    scores = [ap50(item.labels, pred) for item, pred in zip(split.test, result.predictions)]
    voxels = sum(int(item.labels.size) for item in split.test)
    return {
        "seconds": float(result.info["predict_seconds"]),
        "voxels": voxels,
        "ap50": float(np.mean(scores)),
        "train_steps": result.iterations,
        "budget_s": args["budget_s"],
        "peak_gb": float("nan"),  # the prediction runs in StarDist's own process, not measured
    }


CHILDREN = {
    "bundle": child_bundle,
    "plain": child_plain,
    "conv_peak": child_conv_peak,
    "cli": child_cli,
    "stardist": child_stardist,
}


def _child(mode: str, args: dict) -> None:
    result = CHILDREN[mode](args)
    result.setdefault("peak_gb", _peak_gb())
    print("RESULT " + json.dumps(result), flush=True)


def _run_child(mode: str, args: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args["threads"]), "PYTHONPATH": str(ROOT)}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:  # a file: fire would parse JSON on a command line
        json.dump(args, f)
        f.flush()
        cmd = [sys.executable, "-m", "research.perf.benchmark_inference", "--child", mode, "--args", f.name]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# ------------------------------------------------------------------------------------------------------------ table


def _label(settings: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items()) or "defaults"


def _rows(case: str, results: dict[str, dict]) -> list[list[str]]:
    plain, peak = results.get("plain"), results.get("conv_peak")
    rows = []
    for key, r in results.items():
        kind, _, variant = key.partition(":")
        if kind == "conv_peak":
            continue  # shown in the plain pass's row
        seconds = r.get("seconds", r.get("load", 0) + r.get("network", 0) + r.get("post", 0))
        share = f"{r['network'] / seconds:.0%}" if kind == "bundle" else "–"
        ratio = f"{seconds / plain['network']:.2f}" if plain else "–"
        what = {
            "bundle": f"inference.json chain, {variant}",
            "plain": "plain MONAI pass (network only"
            + (
                f"; {r['gflop_s']:.0f} GFLOP/s = {r['gflop_s'] / peak['gflop_s']:.0%} of a wide convolution's "
                f"{peak['gflop_s']:.0f})"
                if peak and "gflop_s" in r
                else ")"
            ),
            "cli": f"`spoco segment`, {variant} ({r.get('route', '?')})",
            "stardist": f"StarDist 0.9.2 (all labels, {r.get('budget_s', 0):.0f} CPU-s of training): predict_instances",
        }[kind]
        bpv = f"{r['bytes_per_voxel']:.0f}" if kind == "bundle" and CASES[case]["dims"] == 3 else "–"
        agreement = {"defaults": r["agreement_ap50"]} if "agreement_ap50" in r else r.get("agreement", {})
        agree = " / ".join(f"{agreement[k]:.3f}" if k in agreement else "–" for k in ("defaults", "float32"))
        rows.append(
            [
                case,
                what,
                f"{seconds:.1f}",
                f"{r['voxels'] / 1e6 / seconds:.2f}",
                ratio,
                share,
                f"{r['post']:.1f}" if "post" in r else "–",
                f"{r['peak_gb']:.2f}" if r.get("peak_gb") == r.get("peak_gb") else "–",
                bpv,
                f"{r['ap50']:.3f}" if "ap50" in r else "–",
                agree,
            ]
        )
    return rows


HEADER = [
    "case",
    "run",
    "s",
    "Mvoxel/s (2D: Mpixel/s)",
    "x plain pass",
    "network share",
    "post-processing s",
    "peak GB",
    "bytes / voxel",
    "AP50",
    "labels vs defaults / float32 (AP50)",
]


def table(all_results: dict[str, dict[str, dict]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for case, results in all_results.items():
        lines += ["| " + " | ".join(row) + " |" for row in _rows(case, results)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------- main


def main(
    cases: str | tuple = "dsb2018,gonuclear32",
    budgets: str | float | tuple = 2,
    threads: int = 2,
    stardist_budget_s: float = 900,
    data_dir: str | None = None,
    out_dir: str = "eval/inference_speed",
    rerun: bool = False,
    page: bool = False,
    extra_cli: str | list = "",
    child: str | None = None,
    args: str | None = None,
) -> None:
    """Measure what is not cached yet, print the table (and write the page with ``--page``)."""
    from spoco_bundle.backends import openvino_available

    if child:
        return _child(child, json.loads(Path(args).read_text()))
    cases = [c for c in (cases.split(",") if isinstance(cases, str) else cases) if c]
    budgets = [float(b) for b in (str(budgets).split(",") if isinstance(budgets, (str, int, float)) else budgets) if b]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"unknown cases {unknown}; choose from {sorted(CASES)}.")
    data = Path(data_dir) if data_dir else default_data_dir()
    missing = [c for c in cases if not dataset_available("gonuclear" if c == "gonuclear32" else c, data)]
    if missing:
        raise SystemExit(f"error: no data for {missing} in {data} (--data_dir, or SPOCO_DATA_DIR).")
    out = ROOT / out_dir if not os.path.isabs(out_dir) else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    all_results: dict[str, dict[str, dict]] = {}
    openvino = (OPENVINO,) if openvino_available() else ()
    for case in cases:
        spec = CASES[case]
        inputs = case_inputs(case, data, out)
        common = {"model": spec["model"], "threads": threads, "inputs": inputs}
        saved, saved32 = out / f"{case}_labels", out / f"{case}_labels_float32"  # references of the agreement
        runs: list[tuple[str, str, dict]] = [("bundle:defaults", "bundle", {"settings": {}, "save": str(saved)})]
        runs += [("plain", "plain", {}), ("conv_peak", "conv_peak", {"dims": spec["dims"]})]
        for v in (VARIANTS_2D if spec["dims"] == 2 else VARIANTS_3D) + openvino:  # float32 first
            extra = {"settings": v, "references": {"defaults": str(saved)}}
            if v == {"precision": "float32"}:
                extra["save"] = str(saved32)
            else:
                extra["references"]["float32"] = str(saved32)
            runs.append((f"bundle:{_label(v)}", "bundle", extra))
        if spec["dims"] == 2 and stardist_budget_s:
            extra = {"dataset": case, "budget_s": float(stardist_budget_s), "data_dir": str(data)}
            runs.append(("stardist", "stardist", extra))
        if spec["dims"] == 3:
            references = {"defaults": str(saved / "0.npy"), "float32": str(saved32 / "0.npy")}
            cli = [{}, *openvino] + [{"max_memory_gb": b} for b in budgets]
            # screens: more `spoco segment` options (fire hands a JSON list over already parsed)
            cli += json.loads(extra_cli) if isinstance(extra_cli, str) and extra_cli else list(extra_cli or [])
            runs += [(f"cli:{_label(v)}", "cli", {"settings": v, "references": references}) for v in cli]
        results: dict[str, dict] = {}
        for key, mode, extra in runs:
            cache = out / f"{case}__{key.replace(':', '__').replace(' ', '_').replace(',', '')}.json"
            if cache.exists() and not rerun:
                results[key] = json.loads(cache.read_text())
                continue
            if "save" in extra:
                Path(extra["save"]).mkdir(exist_ok=True)
            _log(f"{case}: {key} ...")
            load = os.getloadavg()[0]
            r = _run_child(mode, {**common, **extra})
            r["load_before"] = round(load, 2)
            r["machine"] = _machine()
            r["threads"] = threads
            cache.write_text(json.dumps(r, indent=1))
            results[key] = r
            _log(f"{case}: {key}: {json.dumps(r)}")
        all_results[case] = results
    text = table(all_results)
    print(text)
    if page:
        _write_page(all_results, text, cases, budgets, threads)


def _write_page(all_results: dict, text: str, cases: list[str], budgets: list[float], threads: int) -> None:
    first = next(iter(next(iter(all_results.values())).values()))
    loads = sorted({r.get("load_before", 0) for res in all_results.values() for r in res.values()})
    command = (
        f"python -m research.perf.benchmark_inference --cases {','.join(cases)} "
        f"--budgets {','.join(f'{b:g}' for b in budgets)} --threads {threads} --page"
    )
    setup = (
        f"Machine: {first['machine']}, {threads} torch threads, no GPU; one benchmark at a time, nothing else running "
        f"(the load average before each row, {loads[0]:.2f}-{loads[-1]:.2f}, is mostly the previous row's own). "
        f"Command: `{command}`."
    )
    summary = {"command": command, "setup": setup, "table": text, "results": all_results}
    PAGE.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    PAGE.with_suffix(".md").write_text(
        "# Inference speed\n\nGenerated by `research/perf/benchmark_inference.py`; do not edit by hand.\n\n"
        + (__doc__ or "").split("Results are cached")[0].strip()
        + "\n\n"
        + text
        + "\n\n"
        + setup
        + "\n"
    )


if __name__ == "__main__":
    fire.Fire(main)
