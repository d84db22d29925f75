"""
Blockwise segmentation benchmark: wall time, throughput and peak memory of spoco_bundle.blockwise over volume size,
objects split at block borders, and agreement with whole-volume segmentation where that fits.

Synthetic mode (default): embedding volumes with known instances (spoco_bundle.blockwise.synthetic: E = 16 plus a
foreground logit, objects about 1100 voxels, generated region by region, so no size needs the whole volume in
memory) are clustered block by block (configs/inference.json's post-processing chain, ``--clustering``) and
stitched into an OME-Zarr; then the result is scored against the ground truth block by block: objects, AP50, and
ground-truth objects split into parts of at least 10 % each, at a block border (two parts in disjoint sets of blocks:
a stitching failure) or inside a block (a clustering error, also made on the whole volume).

End-to-end mode (``--ckpt``: a model with its model.json; 3D, e.g. ``models/model.pt`` from ``bash scripts/demo.sh``,
or 2D with ``--dims 2``, e.g. the shipped ``models/nuclei2d/model.pt``): synthetic nuclei images
(spoco_bundle.synthetic.generate_nuclei, tiled into an OME-Zarr store tile by tile, with their ground truth) are
segmented as ``monai.bundle run`` / ``spoco segment`` does it (``segment_files`` with the ``blockwise`` settings of
configs/inference.json, ``--max_memory_gb``), and scored against the ground truth (AP50) and, up to ``--whole_max``,
against the same input segmented in one block.

Every size runs in its own child process; its peak resident memory (``ru_maxrss`` of that process, interpreter and
libraries included) is reported. Scoring and the whole-volume run for AP50 blockwise vs whole (sizes up to
``--whole_max`` Mvoxel) run in other children, not part of the blockwise row's time or memory.

    .venv/bin/python -m research.perf.benchmark_blockwise --sizes 1,4 [--block 128 --halo 16 --workers 2
        --clustering fast]
    .venv/bin/python -m research.perf.benchmark_blockwise --sizes 67,1000 --whole_max 0 --clustering fast
    .venv/bin/python -m research.perf.benchmark_blockwise --ckpt models/model.pt --sizes 4,16 --max_memory_gb 3
    .venv/bin/python -m research.perf.benchmark_blockwise --ckpt models/nuclei2d/model.pt --dims 2 --sizes 16,128

Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from anywhere: the repository's package
    sys.path.insert(0, str(ROOT))

from research.perf import cpu_model  # noqa: E402
from spoco_bundle.blockwise import BlockGrid, ClusterBlock, open_volume  # noqa: E402
from spoco_bundle.blockwise.segment import segment_blockwise  # noqa: E402
from spoco_bundle.blockwise.synthetic import SyntheticEmbeddings  # noqa: E402
from spoco_bundle.bundle import inference_postprocessing  # noqa: E402


def _chain(clustering: str, shape_split: float):
    """inference.json's post-processing with the benchmark's clustering and split, min_size 16 and no size filter
    relative to a model (the synthetic embeddings come from none)."""
    return inference_postprocessing(
        embedding_dim=16, clustering=clustering, shape_split=shape_split, min_size=16, min_diameter_ratio=0
    )


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def volume_shape(mvoxels: float, dims: int = 3) -> tuple[int, ...]:
    """(d, 2d, 2d) with about ``mvoxels`` million voxels (as research/perf/benchmark_clustering.py): 67 -> 256 x 512
    x 512; in 2D a square: 128 -> 11314 x 11314."""
    if dims == 2:
        side = max(64, int(round(math.sqrt(mvoxels * 1e6))))
        return side, side
    d = max(8, int(round((mvoxels * 1e6 / 4) ** (1 / 3))))
    return d, 2 * d, 2 * d


def _per_axis(value: int | str | tuple, n: int = 3) -> tuple[int, ...]:
    if isinstance(value, str):  # "64,128,128" (fire gives a tuple for it)
        value = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    value = (int(value),) * n if isinstance(value, (int, float)) else tuple(int(v) for v in value)
    return value * n if len(value) == 1 else value


# ------------------------------------------------------------------------------------------------ scoring


def _pair_counts(gt_blocks, pred_blocks) -> tuple[np.ndarray, np.ndarray, dict, dict, dict]:
    """Contingency of two label volumes read block by block: ``(pairs (k, 2), counts, gt sizes, pred sizes, blocks)``
    with ``blocks[(gt, pred)]`` the set of blocks where that pair of objects overlaps."""
    pairs, counts, gt_sizes, pred_sizes, where = [], [], {}, {}, {}
    for k, (gt, pred) in enumerate(zip(gt_blocks, pred_blocks)):
        gt, pred = gt.reshape(-1).astype(np.int64), pred.reshape(-1).astype(np.int64)
        for lab, sizes in ((gt, gt_sizes), (pred, pred_sizes)):
            ids, n = np.unique(lab[lab > 0], return_counts=True)
            for i, c in zip(ids.tolist(), n.tolist()):
                sizes[i] = sizes.get(i, 0) + c
        both = (gt > 0) & (pred > 0)
        p, c = np.unique(np.stack([gt[both], pred[both]], 1), axis=0, return_counts=True)
        for g, q in p.reshape(-1, 2).tolist():
            where.setdefault((g, q), set()).add(k)
        pairs.append(p.reshape(-1, 2))
        counts.append(c)
    pairs_all = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    counts_all = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    if len(pairs_all):
        uniq, inverse = np.unique(pairs_all, axis=0, return_inverse=True)
        counts_all = np.bincount(inverse.reshape(-1), weights=counts_all).astype(np.int64)
        pairs_all = uniq
    return pairs_all, counts_all, gt_sizes, pred_sizes, where


def _scores(pairs: np.ndarray, counts: np.ndarray, gt_sizes: dict, pred_sizes: dict, where: dict) -> dict:
    """AP50 (TP / (TP + FP + FN) at IoU 0.5, as spoco_bundle.metrics); the ground-truth objects split into two or
    more predicted parts of at least 10 % each, and those of them split at a block border: two of the parts lie in
    disjoint sets of blocks (the cut between them follows the border, not a clustering error inside a block)."""
    gs = np.array([gt_sizes[g] for g in pairs[:, 0]]) if len(pairs) else np.zeros(0)
    ps = np.array([pred_sizes[p] for p in pairs[:, 1]]) if len(pairs) else np.zeros(0)
    iou = counts / np.maximum(gs + ps - counts, 1)
    tp = int((iou > 0.5).sum())
    fp, fn = len(pred_sizes) - tp, len(gt_sizes) - tp
    big = counts / np.maximum(gs, 1) >= 0.1
    parts: dict[int, list[int]] = {}
    for g, q in pairs[big].tolist():
        parts.setdefault(g, []).append(q)
    split = {g for g, qs in parts.items() if len(qs) > 1}
    at_border = {
        g
        for g in split
        if any(not (where[(g, a)] & where[(g, b)]) for i, a in enumerate(parts[g]) for b in parts[g][i + 1 :])
    }
    return {"ap50": tp / max(1, tp + fp + fn), "split": split, "at_border": at_border, "gt_objects": len(gt_sizes)}


def _crossing_ids(grid: BlockGrid, label_of) -> set:
    """Ground-truth ids with voxels in more than one block core (read block by block)."""
    seen: dict[int, int] = {}
    crossing = set()
    for k, index in enumerate(grid.blocks()):
        for i in np.unique(label_of(grid.core(index))).tolist():
            if i and seen.setdefault(i, k) != k:
                crossing.add(i)
    return crossing


# ------------------------------------------------------------------------------------------------ children


def _child_synthetic(args: dict) -> dict:
    """One blockwise run on a synthetic embedding volume (its peak memory is the row's)."""
    shape, block, halo = tuple(args["shape"]), tuple(args["block"]), tuple(args["halo"])
    syn = SyntheticEmbeddings(shape, seed=args["seed"])
    segment = ClusterBlock(_chain(args["clustering"], args["shape_split"]))
    out = os.path.join(args["work"], "blockwise.ome.zarr")
    shutil.rmtree(out, ignore_errors=True)
    info: dict = {}
    t0 = time.perf_counter()
    segment_blockwise(syn, segment, out, block, halo, spatial_dims=3, min_size=16, workers=args["workers"], info=info)
    return {"wall_s": time.perf_counter() - t0, "objects": info["objects"], "blocks": info["blocks"]}


def _child_score(args: dict) -> dict:
    """The blockwise result against the ground truth, read block by block (a process of its own: its memory is not
    the segmentation's)."""
    import zarr

    shape, block, halo = tuple(args["shape"]), tuple(args["block"]), tuple(args["halo"])
    syn = SyntheticEmbeddings(shape, seed=args["seed"])
    pred = zarr.open_array(os.path.join(args["work"], "blockwise.ome.zarr", "0"), mode="r")
    grid = BlockGrid(shape, block, halo)
    regions = list(grid.core(i) for i in grid.blocks())
    pairs, counts, gs, ps, where = _pair_counts(
        (syn.labels(r) for r in regions), (np.asarray(pred[r]) for r in regions)
    )
    scores = _scores(pairs, counts, gs, ps, where)
    return {
        "gt_objects": scores["gt_objects"],
        "ap50_gt": scores["ap50"],
        "crossing": len(_crossing_ids(grid, syn.labels)),
        "split_at_border": len(scores["at_border"]),
        "split_elsewhere": len(scores["split"] - scores["at_border"]),
    }


def _child_whole(args: dict) -> dict:
    """The same volume segmented whole (one block), saved for AP50 blockwise vs whole."""
    shape = tuple(args["shape"])
    syn = SyntheticEmbeddings(shape, seed=args["seed"])
    segment = ClusterBlock(_chain(args["clustering"], args["shape_split"]))
    t0 = time.perf_counter()
    labels = segment(syn[tuple(slice(0, s) for s in shape)])
    np.save(os.path.join(args["work"], "whole.npy"), labels)
    return {"wall_s": time.perf_counter() - t0}


def _write_nuclei_zarr(path: str, shape: tuple[int, ...], tile: tuple[int, ...], seed: int) -> None:
    """Synthetic nuclei images, tile by tile (each tile its own generate_nuclei image), into an OME-Zarr, and their
    ground truth (ids unique over the whole image) into ``<path>.gt.zarr``."""
    from spoco_bundle.blockwise.store import create_label_store
    from spoco_bundle.synthetic import generate_nuclei

    spacing = (2.0, 1.0, 1.0)[-len(shape) :] if len(shape) == 3 else (1.0, 1.0)
    out = create_label_store(path, shape, tile, np.uint16, {"spacing": spacing, "unit": "um"})
    gt = create_label_store(path + ".gt.zarr", shape, tile, np.uint32, {"spacing": spacing, "unit": "um"})
    grid = BlockGrid(shape, tile, 1)
    top = 0
    for k, index in enumerate(grid.blocks()):
        core = grid.core(index)
        image, labels = generate_nuclei(tuple(s.stop - s.start for s in core), seed=seed + k)
        out[core] = np.clip(image * 1000, 0, 65535).astype(np.uint16)
        gt[core] = np.where(labels > 0, labels.astype(np.uint32) + top, 0)
        top += int(labels.max())


def _child_network(args: dict) -> dict:
    """segment_files on an OME-Zarr of synthetic nuclei, as ``spoco segment IN OUT --max_memory_gb G`` runs it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT), "ckpt_path": args["ckpt"], "output_dir": args["work"]})
    parser.update({"dataset_dir": args["input"], "max_memory_gb": args["max_memory_gb"]})
    if args.get("block"):
        parser.update({"block_shape": list(args["block"])})
    if args.get("e2e_halo"):
        parser.update({"halo": args["e2e_halo"]})
    if args.get("image_scale") is not None:
        parser.update({"image_scale": args["image_scale"]})
    t0 = time.perf_counter()
    parser.get_parsed_content("run")
    wall = time.perf_counter() - t0
    labels, _ = open_volume(
        os.path.join(args["work"], Path(args["input"]).name.replace(".ome.zarr", "_instances.ome.zarr"))
    )
    blocks = math.prod(len(c) for c in labels.chunks)  # the output's chunks are the blocks the bundle chose
    return {"wall_s": wall, "objects": int(labels.max().compute()), "blocks": blocks}


def _run_child(mode: str, args: dict) -> tuple[dict, float]:
    """Run a child in its own process; returns its result and its peak resident memory in GiB."""
    cmd = [sys.executable, __file__, "_child", mode, json.dumps(args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed (exit {proc.returncode}): {out[-2000:]}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss * 1024 / 2**30


def _machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu_model()}, {os.cpu_count()} cores, load average {load}; python {platform.python_version()}"


def main(
    sizes: str | float = "1,4",
    block: str | int = 128,
    halo: str | int = 16,
    workers: int = 2,
    clustering: str = "fast",
    shape_split: float = 0.0,
    whole_max: float = 16,
    seed: int = 0,
    ckpt: str | None = None,
    max_memory_gb: float = 3.0,
    tile: str | int | None = None,
    dims: int = 3,
    e2e_block: str | int | None = None,
    e2e_halo: int | None = None,
    e2e_image_scale: float | str = "auto",
    work_dir: str | None = None,
) -> None:
    """
    Args:
        sizes: volume sizes in Mvoxel, comma-separated (shape (d, 2d, 2d)).
        block: core block per axis (one value or z,y,x); synthetic mode (end-to-end mode: from ``max_memory_gb``).
        halo: context per side (synthetic mode).
        workers: blocks at once (local threads).
        clustering: the clustering method (``fast`` for large volumes).
        shape_split: the shape split (0: off; the synthetic objects are convex).
        whole_max: largest size (Mvoxel) also segmented whole, for AP50 blockwise vs whole.
        ckpt: end-to-end mode: a 3D model (``model.pt`` with its ``model.json``).
        max_memory_gb: end-to-end mode: the memory budget given to the bundle.
        tile: end-to-end mode: the generate_nuclei tile the input is made of (default 64,256,256; 2D 512,512).
        dims: end-to-end mode: 3 (volumes of shape (d, 2d, 2d)) or 2 (square images, e.g. for ``--ckpt
            models/nuclei2d/model.pt``).
        e2e_block: end-to-end mode: the block shape (default: from ``max_memory_gb``); sizes up to ``whole_max`` are
            also segmented in one block, for AP50 blockwise vs whole.
        e2e_halo: end-to-end mode: the ``halo`` id of configs/inference.json (default: from the network).
        e2e_image_scale: end-to-end mode: the ``image_scale`` id (default ``auto``, as configs/inference.json).
        work_dir: where the stores are written (default: a temporary folder, removed at the end).
    """
    # fire turns "1,4" into a tuple
    size_list = sorted(float(s) for s in (sizes if isinstance(sizes, (tuple, list)) else str(sizes).split(",")) if s)
    work_root = work_dir or tempfile.mkdtemp(prefix="spoco_blockwise_")
    os.makedirs(work_root, exist_ok=True)
    rows = []
    try:
        for size in size_list:
            shape = volume_shape(size, dims if ckpt is not None else 3)
            n = math.prod(shape)
            work = os.path.join(work_root, f"{size:g}")
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work)
            if ckpt is None:
                args = dict(shape=shape, block=_per_axis(block), halo=_per_axis(halo), workers=workers, seed=seed)
                args.update(clustering=clustering, shape_split=shape_split, work=work)
                _log(f"{size:g} Mvoxel {shape}: blockwise, blocks {args['block']} + halo {args['halo']} ...")
                res, peak = _run_child("synthetic", args)
                _log(f"{size:g} Mvoxel: scoring against the ground truth ...")
                res.update(_run_child("score", args)[0])
                vs_whole = "-"
                if size <= whole_max:
                    _log(f"{size:g} Mvoxel: whole volume ...")
                    _run_child("whole", args)
                    import zarr

                    from spoco_bundle.metrics import ap50

                    whole = np.load(os.path.join(work, "whole.npy"))
                    blockwise = np.asarray(zarr.open_array(os.path.join(work, "blockwise.ome.zarr", "0"), mode="r")[:])
                    vs_whole = f"{ap50(whole, blockwise):.4f}"
                rows.append(
                    [
                        f"{n / 1e6:.1f}",
                        "x".join(map(str, shape)),
                        "x".join(map(str, args["block"])) + f" + {max(args['halo'])}",
                        res["blocks"],
                        f"{res['wall_s']:.1f}",
                        f"{n / 1e6 / res['wall_s']:.2f}",
                        f"{peak:.2f}",
                        res["gt_objects"],
                        res["objects"],
                        res["crossing"],
                        res["split_at_border"],
                        res["split_elsewhere"],
                        f"{res['ap50_gt']:.4f}",
                        vs_whole,
                    ]
                )
            else:
                path = os.path.join(work, "nuclei.ome.zarr")
                _log(f"{size:g} Mvoxel {shape}: writing synthetic nuclei tiles ...")
                tile = tile or ("512,512" if dims == 2 else "64,256,256")
                _write_nuclei_zarr(path, shape, _per_axis(tile, dims), seed)
                args = dict(ckpt=os.path.abspath(ckpt), input=path, work=work, max_memory_gb=max_memory_gb)
                if e2e_block:
                    args["block"] = _per_axis(e2e_block, dims)
                if e2e_halo:
                    args["e2e_halo"] = int(e2e_halo)
                if e2e_image_scale != "auto":
                    args["image_scale"] = float(e2e_image_scale)
                _log(f"{size:g} Mvoxel: segment_files blockwise, max_memory_gb {max_memory_gb} ...")
                res, peak = _run_child("network", args)
                from spoco_bundle.metrics import ap50

                name = "nuclei_instances.ome.zarr"
                _log(f"{size:g} Mvoxel: scoring against the ground truth ...")
                gt = np.asarray(open_volume(path + ".gt.zarr")[0])
                a = np.asarray(open_volume(os.path.join(work, name))[0])
                gt_score, whole_gt, vs_whole = f"{ap50(gt, a):.4f}", "-", "-"
                if size <= whole_max:  # the same input in one block (the whole-volume segmentation)
                    whole_work = os.path.join(work, "whole")
                    os.makedirs(whole_work)
                    _log(f"{size:g} Mvoxel: the same in one block ...")
                    _run_child("network", dict(args, work=whole_work, max_memory_gb=1000.0, block=None))
                    b = np.asarray(open_volume(os.path.join(whole_work, name))[0])
                    vs_whole, whole_gt = f"{ap50(b, a):.4f}", f"{ap50(gt, b):.4f}"
                del gt, a
                rows.append(
                    [
                        f"{n / 1e6:.1f}",
                        "x".join(map(str, shape)),
                        f"max_memory_gb {max_memory_gb}"
                        + (f", blocks {e2e_block}" if e2e_block else "")
                        + (f", halo {e2e_halo}" if e2e_halo else "")
                        + (f", image_scale {e2e_image_scale}" if e2e_image_scale != "auto" else ""),
                        res["blocks"],
                        f"{res['wall_s']:.1f}",
                        f"{n / 1e6 / res['wall_s']:.3f}",
                        f"{peak:.2f}",
                        res["objects"],
                        gt_score,
                        whole_gt,
                        vs_whole,
                    ]
                )
            _log("| " + " | ".join(map(str, rows[-1])) + " |")
    finally:
        if work_dir is None:
            shutil.rmtree(work_root, ignore_errors=True)
    if ckpt is None:
        head = [
            "Mvoxel",
            "shape",
            "block + halo",
            "blocks",
            "wall s",
            "Mvoxel/s",
            "peak RSS GiB",
            "GT objects",
            "objects",
            "GT objects across borders",
            "split at a block border",
            "split inside a block",
            "AP50 vs GT",
            "AP50 blockwise vs whole",
        ]
        what = f"synthetic embeddings (E=16 + foreground logit), clustering {clustering}, {workers} worker threads"
    else:
        head = ["Mvoxel", "shape", "settings", "blocks", "wall s", "Mvoxel/s", "peak RSS GiB", "objects"]
        head += ["AP50 vs GT", "AP50 vs GT, one block", "AP50 blockwise vs one block"]
        what = (
            f"end to end: network ({ckpt}) + post-processing, segment_files on an OME-Zarr of synthetic nuclei "
            f"({dims}D, tiles of {tile})"
        )
    print(f"Blockwise segmentation: {what}.\nMachine: {_machine()}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_child":
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
        children = {"synthetic": _child_synthetic, "score": _child_score, "whole": _child_whole}
        children["network"] = _child_network
        print(json.dumps(children[sys.argv[2]](json.loads(sys.argv[3]))))
    else:
        fire.Fire(main)
