"""
Clustering benchmark: speed and accuracy of the embedding clusterings on synthetic 3D embedding volumes with known
instances, and the split of an end-to-end 100^3 inference into network and clustering time.

The synthetic embeddings follow the geometry the SPOCO losses train for (E = 16, delta_v = 0.5, delta_d = 2.0):
touching, spatially contiguous objects (Voronoi cells of jittered-grid seeds inside smooth random blobs, ~1000
voxels each, constant density, so the object count grows with the volume), a large background (~60 % of the
voxels), one centre per object with all centres at least 2 delta_d apart (many close to that margin), Gaussian
noise of 0.1 per dimension, 1 % outliers (noise 0.8) and borders blurred over about a voxel (Gaussian, sigma 0.5).

Methods run with their default parameters (as the bundle's inference config uses them); ``hdbscan`` and
``meanshift`` cluster a random subsample (20k / 10k voxels) and assign the rest to the nearest cluster mean.
``consistency`` uses ``fast`` as its base clustering and a teacher embedding = student + N(0, 0.05^2) per dimension.

    .venv/bin/python -m research.perf.benchmark_clustering [--sizes 0.25,1,4,16] [--slow_limit_s 180] [--device cpu]
        [--methods ...] [--real] [--data_dir ../shared/data]

``--real`` adds the inference default on real network outputs: the shipped ``nuclei2d`` model's outputs on the
DSB2018 validation images (computed first, not timed), post-processed as ``configs/inference.json`` does (foreground
head, clustering, shape split, minimum size), against ``fast`` without the split.

The last line printed is ``default: <X> Mvoxel/s at <size> Mvoxels, AP50 <Y>`` for the post-processing
``configs/inference.json`` uses by default (``DEFAULT_METHOD``: its clustering, then its shape split) on the largest
synthetic size.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import fire
import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere: this repository's spoco_bundle (and research)
    sys.path.insert(0, str(ROOT))

from spoco_bundle.clustering import (  # noqa: E402
    cluster_consistency,
    cluster_fast,
    cluster_hdbscan,
    cluster_meanshift,
    cluster_watershed,
    split_by_shape,
)
from spoco_bundle.metrics import segmentation_scores  # noqa: E402

EMBEDDING_DIM = 16
DELTA_V = 0.5
DELTA_D = 2.0
TEACHER_NOISE = 0.05
SLOW_METHODS = ("hdbscan", "meanshift", "consistency")
REPO_ROOT = str(ROOT)


def inference_default() -> tuple[str, float]:
    """The default clustering and shape split of configs/inference.json."""
    with open(os.path.join(REPO_ROOT, "configs", "inference.json")) as f:
        config = json.load(f)
    return str(config["clustering"]), float(config["shape_split"])


DEFAULT_CLUSTERING, DEFAULT_SHAPE_SPLIT = inference_default()
# the method name of the default in the tables: "watershed+split" (the clustering, then the shape split)
DEFAULT_METHOD = DEFAULT_CLUSTERING + ("+split" if DEFAULT_SHAPE_SPLIT > 0 else "")


def _log(msg: str) -> None:
    """Progress goes to stderr so that stdout holds only the report."""
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- synthetic data


def volume_shape(mvoxels: float) -> tuple[int, int, int]:
    """(d, 2d, 2d) with about ``mvoxels`` million voxels, e.g. 0.25 -> 40 x 80 x 80."""
    d = max(4, int(round((mvoxels * 1e6 / 4) ** (1 / 3))))
    return d, 2 * d, 2 * d


def make_labels(
    shape: tuple[int, int, int], cell: float = 10.0, fg_fraction: float = 0.4, min_size: int = 64, seed: int = 0
) -> np.ndarray:
    """Touching objects: Voronoi cells of jittered-grid seeds, cut to smooth random blobs; int32, 0 = background.

    Every object is one 6-connected piece of at least ``min_size`` voxels (other pieces of a cell become
    background), ids 1..n consecutive.
    """
    rng = np.random.default_rng(seed)
    # blobs: threshold of a smooth random field, made at 1/4 resolution and upsampled (cheap for large volumes)
    low = tuple(int(math.ceil(s / 4)) + 1 for s in shape)
    field = ndimage.gaussian_filter(rng.standard_normal(low, dtype=np.float32), sigma=2.5, mode="wrap")
    field = ndimage.zoom(field, 4, order=1)[: shape[0], : shape[1], : shape[2]]
    fg = field > np.quantile(field.reshape(-1)[::31], 1.0 - fg_fraction)
    del field
    # seeds on a jittered grid: cells of similar size (~cell^3 voxels), no slivers from clumped random seeds
    axes = [np.arange(cell / 2, s, cell) for s in shape]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    pts = pts + rng.uniform(-0.35 * cell, 0.35 * cell, pts.shape)
    pts = np.clip(np.round(pts).astype(np.int64), 0, np.array(shape) - 1)
    pts = pts[fg[tuple(pts.T)]]
    seeds = np.zeros(shape, np.int32)
    seeds[tuple(pts.T)] = np.arange(1, len(pts) + 1, dtype=np.int32)
    # Voronoi: label of the nearest seed, via the indices of the Euclidean distance transform
    idx = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
    lab = seeds[idx[0], idx[1], idx[2]]
    del idx, seeds
    lab[~fg] = 0
    del fg
    # a convex cell cut by a blob can fall apart: keep the largest piece of each cell
    keep = np.zeros(int(lab.max()) + 1, bool)
    for k, sl in enumerate(ndimage.find_objects(lab), 1):
        if sl is None:
            continue
        box = lab[sl]
        pieces, n = ndimage.label(box == k)
        if n > 1:
            sizes = np.bincount(pieces.reshape(-1))
            sizes[0] = 0
            box[(pieces > 0) & (pieces != np.argmax(sizes))] = 0
        keep[k] = np.count_nonzero(box == k) >= min_size
    lut = np.cumsum(keep, dtype=np.int64).astype(np.int32)
    lut[~keep] = 0
    return lut[lab]


def make_centres(n: int, dim: int = EMBEDDING_DIM, delta_d: float = DELTA_D, seed: int = 0) -> np.ndarray:
    """n centres (float32), pairwise >= 2 delta_d apart, each placed 2-2.6 delta_d from an earlier one.

    Candidates come in batches and are checked against all accepted centres with one matrix product per batch.
    """
    rng = np.random.default_rng(seed)
    min_d2 = (2.0 * delta_d) ** 2
    cs = np.empty((n, dim), np.float64)
    cs[0] = rng.standard_normal(dim)
    m = 1
    while m < n:
        b = min(2 * (n - m), 1024)
        v = rng.standard_normal((b, dim))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        cand = cs[rng.integers(m, size=b)] + v * rng.uniform(2.0, 2.6, (b, 1)) * delta_d
        old = cs[:m]
        d2 = (cand**2).sum(1)[:, None] + (old**2).sum(1)[None, :] - 2.0 * cand @ old.T
        start = m
        for c in cand[d2.min(1) >= min_d2]:
            if m == n:
                break
            if m > start and ((cs[start:m] - c) ** 2).sum(1).min() < min_d2:
                continue
            cs[m] = c
            m += 1
    return cs.astype(np.float32)


def make_embeddings(
    labels: np.ndarray,
    dim: int = EMBEDDING_DIM,
    noise: float = 0.1,
    outliers: float = 0.01,
    outlier_noise: float = 0.8,
    blur: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Embeddings ``(dim, *S)`` float32: the centre of each voxel's label (row 0 = background), blurred, plus noise."""
    rng = np.random.default_rng(seed)
    cs = make_centres(int(labels.max()) + 1, dim, seed=seed)
    sigma = np.full(labels.shape, noise, np.float32)
    sigma[rng.random(labels.shape, dtype=np.float32) < outliers] = outlier_noise
    emb = np.empty((dim,) + labels.shape, np.float32)
    for c in range(dim):
        centre = cs[:, c][labels]
        if blur:
            ndimage.gaussian_filter(centre, blur, output=emb[c])
        else:
            emb[c] = centre
        del centre
        emb[c] += sigma * rng.standard_normal(labels.shape, dtype=np.float32)
    return emb


def make_teacher(emb: np.ndarray, noise: float = TEACHER_NOISE, seed: int = 1) -> np.ndarray:
    """Teacher embeddings: the student's plus independent Gaussian noise, channel by channel (bounded memory)."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(emb)
    for c in range(emb.shape[0]):
        out[c] = emb[c] + noise * rng.standard_normal(emb.shape[1:], dtype=np.float32)
    return out


# ------------------------------------------------------------------------------------------------ helpers


def _parse_sizes(sizes) -> list[float]:
    if isinstance(sizes, (int, float)):
        return [float(sizes)]
    if isinstance(sizes, str):
        sizes = [s for s in sizes.replace(" ", "").split(",") if s]
    out = sorted(float(s) for s in sizes)
    if not out or min(out) <= 0:
        raise ValueError(f"sizes must be positive Mvoxel counts, got {sizes!r}.")
    return out


def _machine_info() -> list[str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    import numba

    nb = f"yes ({numba.__version__})"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"- CPU: {cpu}",
        f"- cores: {os.cpu_count()} logical, {usable} usable by this process; load average (1/5/15 min) {load}",
        f"- torch threads: {torch.get_num_threads()} (torch {torch.__version__}); numpy {np.__version__}",
        f"- numba available: {nb}",
        f"- python {platform.python_version()}, {platform.platform()}",
    ]


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: ``5`` into ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_gb() -> float | None:
    """Peak resident memory of this process since the last reset (``VmHWM``), in GB; None where not readable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except (OSError, ValueError, IndexError):
        pass
    return None


def _format_row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ benchmark


def benchmark_clustering(
    sizes: list[float], slow_limit_s: float, only: Sequence[str] | None = None
) -> tuple[list[str], list[str], dict]:
    """Return (data table rows, results table rows, {size: (Mvoxel/s, AP50)} of the inference default)."""
    methods: dict[str, Callable[..., np.ndarray]] = {
        "fast": cluster_fast,
        "watershed": cluster_watershed,
        # watershed, then objects shaped like joined round ones split (the inference default: DEFAULT_METHOD)
        "watershed+split": lambda emb: split_by_shape(
            cluster_watershed(emb), h=DEFAULT_SHAPE_SPLIT or 0.1, min_size=16
        ),
        "fast+split": lambda emb: split_by_shape(cluster_fast(emb), h=DEFAULT_SHAPE_SPLIT or 0.1, min_size=16),
        "hdbscan": cluster_hdbscan,
        "meanshift": cluster_meanshift,
        "consistency": lambda emb, emb_g: cluster_consistency(emb, emb_g),
    }
    if only is not None:
        methods = {name: fn for name, fn in methods.items() if name in only or name == DEFAULT_METHOD}
    data_rows, rows, default = [], [], {}
    history: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}  # (voxels, seconds) of finished runs
    stopped: dict[str, bool] = {m: False for m in methods}
    for i, size in enumerate(sizes):
        shape = volume_shape(size)
        n_vox = int(np.prod(shape))
        _log(f"[{time.strftime('%H:%M:%S')}] generating {shape} ({n_vox / 1e6:.2f} Mvoxel) ...")
        t0 = time.perf_counter()
        gt = make_labels(shape, seed=i)
        emb = make_embeddings(gt, seed=100 + i)
        t_gen = time.perf_counter() - t0
        n_obj = int(gt.max())
        fg = float(np.count_nonzero(gt)) / n_vox
        data_rows.append(
            _format_row(
                [
                    f"{size:g}",
                    "x".join(map(str, shape)),
                    f"{n_vox / 1e6:.2f}",
                    n_obj,
                    f"{fg:.2f}",
                    f"{emb.nbytes / 1e9:.2f}",
                    f"{t_gen:.1f}",
                ]
            )
        )
        emb_g = None
        for name, fn in methods.items():
            label = f"{size:g} Mvoxel, {name}"
            hist = history[name]
            if name != DEFAULT_METHOD and hist:
                # linear extrapolation from the last finished size, or the growth measured between the last two
                # sizes when that is steeper (e.g. consistency's voxels x clusters cost at constant object density)
                v1, t1 = hist[-1]
                power = 1.0
                if len(hist) > 1:
                    v0, t0_ = hist[-2]
                    if t1 > 0 and t0_ > 0 and v1 > v0:
                        power = max(1.0, math.log(t1 / t0_) / math.log(v1 / v0))
                expected = t1 * (n_vox / v1) ** power
                if stopped[name] or expected > slow_limit_s:
                    rows.append(
                        _format_row([f"{size:g}", name, f"skipped (> {expected:.0f} s expected)", "", "", "", "", ""])
                    )
                    _log(f"  {label}: skipped (> {expected:.0f} s expected)")
                    continue
            if name == "consistency":
                if emb_g is None:
                    emb_g = make_teacher(emb, seed=200 + i)
                args = (emb, emb_g)
            else:
                args = (emb,)
            _log(f"  [{time.strftime('%H:%M:%S')}] {label} ...")
            # the peak covers the inputs already in memory (embeddings, labels): what a caller needs free
            tracked = _reset_peak_rss()
            t0 = time.perf_counter()
            seg = fn(*args)
            dt = time.perf_counter() - t0
            peak = _peak_rss_gb() if tracked else None
            scores = segmentation_scores(gt, seg)
            hist.append((n_vox, dt))
            if name != DEFAULT_METHOD and dt > slow_limit_s:
                stopped[name] = True
            rate = n_vox / dt / 1e6
            rows.append(
                _format_row(
                    [
                        f"{size:g}",
                        name,
                        f"{dt:.2f}",
                        f"{rate:.3g}",
                        f"{scores['ap50']:.3f}",
                        f"{scores['map']:.3f}",
                        f"{int(seg.max())} / {n_obj}",
                        "-" if peak is None else f"{peak:.2f}",
                    ]
                )
            )
            mem = "" if peak is None else f", peak RSS {peak:.2f} GB"
            _log(
                f"  {label}: {dt:.2f} s, {rate:.3g} Mvoxel/s, AP50 {scores['ap50']:.3f}, {int(seg.max())} objects{mem}"
            )
            if name == DEFAULT_METHOD:
                default[size] = (rate, scores["ap50"])
            del seg
        del emb, emb_g, gt
    return data_rows, rows, default


def benchmark_real(data_dir: str | None) -> list[str]:
    """The inference default and ``fast`` on the shipped nuclei2d model's outputs for the DSB2018 validation images
    (the accuracy benchmark's data); rows of a markdown table."""
    from research.chain import ClusterEmbeddings
    from research.data import load_benchmark, score
    from research.foreground import network_outputs
    from spoco_bundle.cards import inference_settings

    ckpt = os.path.join(REPO_ROOT, "models", "nuclei2d", "model.pt")
    min_size = int(inference_settings(ckpt).get("min_size", 16))
    split = load_benchmark("dsb2018", data_dir)[0]
    _log(f"  network outputs of nuclei2d on {len(split.test)} DSB2018 validation images (not timed) ...")
    outputs = network_outputs(ckpt, split, split.test, "cpu", {"image_scale": 1.0})
    n_vox = sum(int(np.prod(o.shape[1:])) for o in outputs)
    rows = []
    for name, method, shape_split in ((DEFAULT_METHOD, DEFAULT_CLUSTERING, DEFAULT_SHAPE_SPLIT), ("fast", "fast", 0)):
        post = ClusterEmbeddings(method=method, shape_split=shape_split, background="head", min_size=min_size)
        post(outputs[0][:, :32, :32])  # compiled kernels loaded, not timed
        t0 = time.perf_counter()
        seg = [np.asarray(post(o))[0] for o in outputs]
        dt = time.perf_counter() - t0
        ap = score(seg, [i.labels for i in split.test], 2, "dsb2018")["ap50"]
        _log(f"  real {name}: {dt:.2f} s, {n_vox / dt / 1e6:.3g} Mvoxel/s, AP50 {ap:.3f}")
        rows.append(
            _format_row([name, len(outputs), f"{n_vox / 1e6:.2f}", f"{dt:.2f}", f"{n_vox / dt / 1e6:.3g}", f"{ap:.3f}"])
        )
    return rows


def benchmark_inference(device: torch.device, shape=(100, 100, 100)) -> list[str]:
    """Sliding-window network inference + cluster_fast on one volume; rows of a markdown table."""
    from monai.inferers import SlidingWindowInferer

    from spoco_bundle.networks import EmbeddingUNet

    torch.manual_seed(0)
    net = EmbeddingUNet(spatial_dims=3, embedding_dim=EMBEDDING_DIM, features=(16, 32, 64, 128)).to(device).eval()
    inferer = SlidingWindowInferer(roi_size=(32, 64, 64), sw_batch_size=4, overlap=0.25, mode="gaussian")
    image = torch.rand((1, 1) + tuple(shape), device=device)
    with torch.no_grad():
        # warm-up on one window (allocator, oneDNN kernel selection), not timed
        net(torch.rand((1, 1, 32, 64, 64), device=device))
        _sync(device)
        t0 = time.perf_counter()
        out = inferer(image, net)
        _sync(device)
        t_net = time.perf_counter() - t0
    emb = out[0, :EMBEDDING_DIM].float().cpu().numpy()
    t0 = time.perf_counter()
    seg = cluster_fast(emb)
    t_clu = time.perf_counter() - t0
    n_vox = int(np.prod(shape))
    total = t_net + t_clu
    _log(f"  inference: network {t_net:.2f} s, clustering {t_clu:.2f} s ({int(seg.max())} objects)")
    return [
        _format_row(["network (sliding window)", f"{t_net:.2f}", f"{100 * t_net / total:.0f} %", tuple(out.shape)]),
        _format_row(["clustering (cluster_fast)", f"{t_clu:.2f}", f"{100 * t_clu / total:.0f} %", f"{n_vox / 1e6:g}"]),
        _format_row(["total", f"{total:.2f}", "100 %", ""]),
    ]


def main(
    sizes="0.25,1,4,16",
    slow_limit_s: float = 180.0,
    device: str = "cpu",
    inference_size: int = 100,
    methods: str = "fast,fast+split,watershed,watershed+split,hdbscan,meanshift,consistency",
    real: bool = False,
    data_dir: str | None = None,
) -> None:
    """Print the clustering benchmark as markdown; the last line summarises the inference default on the largest
    size.

    Args:
        sizes: embedding volume sizes in Mvoxels (comma-separated).
        slow_limit_s: seconds a slow method (hdbscan, meanshift, consistency) may take per volume; larger volumes
            are skipped once it took longer or would by extrapolation.
        device: torch device of the network in the end-to-end part (clustering always runs on the CPU).
        methods: comma-separated methods to time (the inference default always runs: the last line reports it).
        real: also time the default on real network outputs (shipped nuclei2d, DSB2018 validation).
        data_dir: folder of the data sets for ``real`` (default: SPOCO_DATA_DIR, else ../shared/data).
        inference_size: edge length of the cubic volume of the end-to-end part.
    """
    size_list = _parse_sizes(sizes)
    dev = torch.device(device)
    t_start = time.perf_counter()
    print("# Clustering benchmark\n")
    command = " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT), *sys.argv[1:]])  # -m or a script
    print(f"Run at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; command: `{command}`\n")
    print("## Machine\n")
    print("\n".join(_machine_info()))

    # numba kernels compile (or load from the on-disk cache) on the first call: keep that out of the timings;
    # the tiny calls of the other methods keep their imports (hdbscan, sklearn) out of the timings too
    t0 = time.perf_counter()
    warm_lab = make_labels((6, 12, 12), cell=5.0, min_size=8, seed=7)
    warm = make_embeddings(warm_lab, seed=7)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    cluster_fast(warm)
    split_by_shape(cluster_watershed(warm), h=0.1)  # the default's compiled kernels
    t_warm = time.perf_counter() - t0
    cluster_hdbscan(warm)
    cluster_meanshift(warm)
    cluster_consistency(warm, make_teacher(warm))
    print(
        f"\nWarm-up (not timed below): one tiny call of cluster_fast ({warm_lab.size} voxels) took {t_warm:.1f} s "
        f"(numba compile / cache load); tiny calls of the other methods "
        f"load their modules (synthetic warm-up data: {t_data:.1f} s)."
    )

    _log("clustering benchmark ...")
    method_list = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods)]
    data_rows, rows, default = benchmark_clustering(size_list, slow_limit_s, method_list)
    print("\n## Synthetic embedding volumes\n")
    print(
        f"E = {EMBEDDING_DIM}, delta_v = {DELTA_V}, delta_d = {DELTA_D}: Voronoi cells of jittered-grid seeds (spacing "
        "10) inside smooth random blobs, objects >= 64 voxels, centres >= 2 delta_d apart, noise 0.1 per dimension, "
        "1 % outliers (0.8), borders blurred (sigma 0.5 voxel). Generation time is not part of any timing.\n"
    )
    print(
        _format_row(
            [
                "size (Mvoxel)",
                "shape",
                "voxels (M)",
                "objects",
                "foreground fraction",
                "embeddings (GB)",
                "generation (s)",
            ]
        )
    )
    print(_format_row(["---"] * 7))
    print("\n".join(data_rows))
    print(f"\n## Clustering (slow methods limited to {slow_limit_s:g} s per volume)\n")
    print(
        _format_row(
            ["size (Mvoxel)", "method", "time (s)", "Mvoxel/s", "AP50", "mAP", "objects found / true", "peak RSS (GB)"]
        )
    )
    print(_format_row(["---"] * 8))
    print("\n".join(rows))
    print(
        "\nmAP = mean AP over IoU 0.50, 0.55, ..., 0.95. All methods with their default parameters and background "
        "removal (largest cluster). hdbscan and "
        "meanshift cluster a random subsample (20k / 10k voxels) and assign the other voxels to the nearest cluster "
        "mean; the subsample does not grow with the volume, so it holds fewer voxels per object as the object count "
        "grows (about 20k x 0.4 / objects for hdbscan). consistency = cluster_fast on the student, then the paper's "
        f"consistency test against a teacher embedding (student + N(0, {TEACHER_NOISE}^2) per dimension); its "
        "anchors are single voxels, so it keeps a cluster only when two voxels of one object are mostly within "
        "delta_v of each other: with noise 0.1 per dimension their typical distance is sqrt(2 x 16) x 0.1 = 0.57 > "
        "delta_v and the rule drops (nearly) every cluster, even with a noise-free teacher. Mean-shift turns the "
        "blurred borders (embeddings between two centres) into extra clusters of more than min_size voxels (false "
        "positives); without the blur it recovered every object of a small test volume. "
        "Skipped sizes: extrapolated from the last finished size (linearly, or with the growth exponent measured "
        "between the last two sizes when steeper). Peak RSS: the process's peak resident memory during the call "
        "(Linux VmHWM, reset before each call), so it includes the embeddings and labels already in memory; '-' "
        "where the kernel does not offer the reset."
    )

    _log("end-to-end inference ...")
    inf_rows = benchmark_inference(dev, (inference_size,) * 3)
    print(f"\n## End-to-end inference of a {inference_size}^3 volume\n")
    print(
        "EmbeddingUNet(spatial_dims=3, embedding_dim=16, features=(16, 32, 64, 128)) with **random weights** (timing "
        "only), SlidingWindowInferer(roi_size=(32, 64, 64), sw_batch_size=4, overlap=0.25, mode='gaussian') under "
        f"torch.no_grad on device {device} after a one-window warm-up, then cluster_fast on the first 16 channels "
        "(the 17th is the foreground logit). Embeddings of an untrained network are not those of a trained one, so "
        "the clustering time here is indicative; see the table above for trained-like embeddings.\n"
    )
    print(_format_row(["stage", "time (s)", "share", "output shape / Mvoxel"]))
    print(_format_row(["---"] * 4))
    print("\n".join(inf_rows))
    if real:
        _log("real network outputs ...")
        real_rows = benchmark_real(data_dir)
        print("\n## Real network outputs\n")
        print(
            "The shipped nuclei2d model's outputs on the DSB2018 validation images (network time not included), "
            "post-processed like configs/inference.json (foreground head 0.5, then the clustering; the default with "
            f"its shape split {DEFAULT_SHAPE_SPLIT:g}, fast without), min_size of the model card.\n"
        )
        print(_format_row(["post-processing", "images", "voxels (M)", "time (s)", "Mvoxel/s", "AP50"]))
        print(_format_row(["---"] * 6))
        print("\n".join(real_rows))
    print(f"\nTotal benchmark wall time: {time.perf_counter() - t_start:.0f} s\n")
    print(f"The default post-processing of configs/inference.json: {DEFAULT_METHOD}.")
    size = max(default)
    rate, ap = default[size]
    print(f"default: {rate:.1f} Mvoxel/s at {size:g} Mvoxels, AP50 {ap:.3f}")


if __name__ == "__main__":
    fire.Fire(main)
