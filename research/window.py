"""
Which sliding window inference should use (and whether test-time flips help), chosen on *training* images: each
checkpoint segments images it never trained on with windows of several sizes (``configs/inference.json`` through
``monai.bundle run``, as a user does, with ``sliding_window_inferer#roi_size`` / ``#padding_mode`` overridden), scored
against their dense labels.

- ``--run_dir``: learning-speed runs (``python -m research.learning_speed``): their held-back training images
  (``--tune``, never trained on), each alone and as ``--mosaic k`` tiles of k x k of them (larger images with the
  objects at the training size, as a user's larger field of view).
- ``--records``: accuracy-benchmark runs (``python -m research.accuracy``) of other data sets, scored on their
  own *training* images (``--max_images`` of them): in-sample for the objects the run kept, so only the comparison
  between windows means something.

Windows: ``patch`` = the training patch with zero padding (the bundle's window up to 0.17); ``default`` =
``configs/inference.json``'s window; ``N``: an N x N window for 2D runs, ``AxBxC`` one for 3D runs (each skipped for the
other), padded by replicating the border where the image is smaller; all without test-time flips and without the size
filter relative to the training objects (``min_diameter_ratio`` 0). Further inference options on the default window
(:data:`OPTIONS`): ``flips`` = test-time flips of the foreground head (``test_time_flips``); ``sizeR`` (e.g.
``size0.45``) = objects under R times the training objects' median diameter removed (``min_diameter_ratio`` R; ``size0``
is ``default``); ``scaleF`` (e.g. ``scale1.25``) = the image resampled by F before the network and the result back
(``image_scale`` F; the benchmark's runs train and segment at 1, so ``scale1`` is ``default``); ``seedD`` (e.g.
``seed0.5``) = the ``watershed`` clustering's seed depth D, the least depth of a seed's basin in the embedding-edge map
(keyword ``h`` of :func:`~spoco_bundle.clustering.cluster_watershed`; a run clustered otherwise is an error).

    .venv/bin/python -m research.window --run_dir eval/s38/ls/dsb2018/default/ratio_0.10_900s[,...]
        [--records eval/s37/usiigaci/train16_val4/spoco/ratio_0.10.json[,...]] [--windows patch,256,320,384]
        [--mosaic 1,2] [--docs research/pages/inference_window.md]

Results are cached per checkpoint in ``<run_dir or work_dir>/window.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import tifffile

from research.data import REPO_ROOT, default_data_dir, load_benchmark, score
from research.learning_speed import tune_split
from research.methods.spoco import predict, run_ids
from research.records import git_commit, load_record, loadavg, machine_info

METRICS = ("ap50", "map", "sbd", "fg_precision", "fg_recall", "arand")
# inference.json ids of the named options scored like windows (on the default window), each alone
OPTIONS = {"flips": {"test_time_flips": True, "min_diameter_ratio": 0}}
# every window and option without the options it does not name (the defaults since 0.25 / 0.26), so that each
# compares alone and earlier cached results keep their meaning. (The growth windows growP / growPdD, of the retired
# inference option foreground_grow, are in git at commit 7c97b4b: git show 7c97b4b:benchmarks/window.py.)
PINNED = {"test_time_flips": False, "min_diameter_ratio": 0}


@functools.cache
def _inference_config() -> dict:
    """``configs/inference.json``, read once."""
    return json.loads((REPO_ROOT / "configs" / "inference.json").read_text())


def _cluster_kwarg(name: str) -> str:
    """The ``inference.json`` id of keyword ``name`` of its clustering step (``ClusterInstancesd``)."""
    steps = [t["_target_"] for t in _inference_config()["postprocessing"]["transforms"]]
    return f"postprocessing#transforms#{steps.index('spoco_bundle.postprocessing.ClusterInstancesd')}#{name}"


def window_overrides(window: str, spatial_dims: int, patch: list[int]) -> dict | None:
    """``inference.json`` ids for a window name (see the module docstring); None for a window of other dimensions
    (``N`` is a 2D window, ``AxBxC`` a 3D one)."""
    if window in OPTIONS:
        return dict(PINNED, **OPTIONS[window])
    if window.startswith("seed"):
        try:
            return dict(PINNED, **{_cluster_kwarg("h"): float(window[len("seed") :])})
        except ValueError:
            raise ValueError(f"window {window!r}: name it seed and a number, e.g. seed0.5") from None
    for prefix, key, example in (
        ("size", "min_diameter_ratio", "size0.45"),
        ("scale", "image_scale", "scale1.25"),
    ):
        if window.startswith(prefix):
            try:
                value = float(window[len(prefix) :])
            except ValueError:
                raise ValueError(f"window {window!r}: name it {prefix} and a number, e.g. {example}") from None
            return dict(PINNED, **{key: value})
    if window == "default":
        window_ids = {}
    elif window == "patch":
        window_ids = {"sliding_window_inferer#roi_size": list(patch), "sliding_window_inferer#padding_mode": "constant"}
    else:
        try:
            size = [int(v) for v in window.split("x")]
        except ValueError:
            raise ValueError(
                f"unknown window {window!r}: patch, default, N, AxBxC, flips, sizeR, scaleF or seedD"
            ) from None
        size = size * 2 if len(size) == 1 else size
        if len(size) != spatial_dims:
            return None
        window_ids = {"sliding_window_inferer#roi_size": size, "sliding_window_inferer#padding_mode": "replicate"}
    return {**window_ids, **PINNED}


def mosaics(items: list, k: int, folder: Path) -> list:
    """k x k tiles of consecutive ``items`` (same shape) as one image each; labels offset per tile."""
    if k == 1:
        return items
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for m in range(len(items) // (k * k)):
        tiles = items[m * k * k : (m + 1) * k * k]
        images, labels, offset = [], [], 0
        for t in tiles:
            lab = t.labels.astype(np.int32)
            lab = np.where(lab > 0, lab + offset, 0)
            offset = int(lab.max())
            images.append(t.image)
            labels.append(lab)
        image = np.concatenate([np.concatenate(images[r * k : (r + 1) * k], 1) for r in range(k)], 0)
        label = np.concatenate([np.concatenate(labels[r * k : (r + 1) * k], 1) for r in range(k)], 0)
        path = folder / f"mosaic{k}_{m:02d}.tif"
        tifffile.imwrite(path, image)
        out.append(SimpleNamespace(path=str(path), labels=label, name=path.stem))
    return out


def _score_windows(ckpt: Path, split, items, windows, base_ids: dict, patch, cache: Path, key: str, threads: int):
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    work = Path(tempfile.mkdtemp(prefix="spoco_window_"))
    clustering = base_ids.get("clustering") or _inference_config()["clustering"]
    for window in windows:
        if window.startswith("seed") and clustering != "watershed":
            # the seed depth is the watershed's; cluster_boundary has an h of its own (a distance-transform depth)
            raise ValueError(
                f"window {window!r} sets the watershed's seed depth; {cache.parent} clusters with {clustering!r}."
            )
        name = f"{key}/{window}"
        if name in results:
            continue
        overrides = window_overrides(window, split.spatial_dims, patch)
        if overrides is None:
            continue
        ids = dict(base_ids, **overrides)
        load = loadavg()
        preds = predict(ckpt, split, work, items=items, threads=threads, tag=f"_{key}_{window}", overrides=ids)
        s = score(preds, [it.labels for it in items], split.spatial_dims, split.dataset)
        results[name] = {m: s[m] for m in METRICS if m in s}
        results[name].update(n_images=len(items), shape=list(items[0].labels.shape), load=[load, loadavg()])
        print(f"[window] {cache.parent.name} {name}: AP50 {s['ap50']:.3f}", flush=True)
        cache.write_text(json.dumps(results, indent=1))
    return results


def run(args: argparse.Namespace) -> list[dict]:
    windows = args.windows.split(",")
    out = []
    for run_dir in filter(None, args.run_dir.split(",")):
        run_dir = Path(run_dir)
        rec = json.loads(Path(f"{run_dir}.json").read_text())
        splits = load_benchmark(rec["dataset"], args.data_dir)
        base = next(s for s in splits if rec["split"].startswith(f"tune_{s.name}_"))
        # tune_<split>_<n_train>_<n_tune>, or tune_<split>_halves for a volume cut in two
        n_tune = 1 if rec["split"].endswith("_halves") else int(rec["split"].rsplit("_", 1)[1])
        split = tune_split(base, n_tune)
        patch = rec["settings"].get("patch_size") or [192] * split.spatial_dims
        ids = {"image_scale": rec["settings"].get("image_scale", 1.0)}
        results = {}
        for k in (int(v) for v in args.mosaic.split(",")):
            items = mosaics(split.test, k, run_dir / "window_mosaics")
            if not items:
                continue
            results = _score_windows(
                run_dir / "models" / "model.pt",
                split,
                items,
                windows,
                ids,
                patch,
                run_dir / "window.json",
                f"mosaic{k}",
                args.threads,
            )
        out.append({"name": str(run_dir), "kind": "held-back training images", "record": rec, "results": results})
    for path in filter(None, args.records.split(",")):
        rec = load_record(Path(path))
        split = next(s for s in load_benchmark(rec["dataset"], args.data_dir) if s.name == rec["split"])
        items = split.train[: args.max_images]
        work = Path(rec["info"]["work_dir"])
        patch = rec["settings"].get("patch_size") or [192] * split.spatial_dims
        results = _score_windows(
            work / "models" / "model.pt",
            split,
            items,
            windows,
            run_ids(rec),
            patch,
            work / "window.json",
            "train",
            args.threads,
        )
        out.append({"name": path, "kind": "training images (in-sample)", "record": rec, "results": results})
    return out


def report(entries: list[dict], windows: list[str], command: str) -> str:
    m = machine_info()
    loads = [v for e in entries for r in e["results"].values() for v in r.get("load", []) if v is not None]
    load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"
    text = (
        "# Inference options chosen on training images: window, test-time flips, size filter, seed depth\n\n"
        "Generated by `python -m research.window` from its cache; do not edit by hand.\n\n"
        f"```bash\n{command}\n```\n\n"
        "- **Models**: the checkpoints named per table (900 CPU-s each, 1 thread; learning-speed runs trained on the "
        "first training images and scored on the held-back rest, accuracy-benchmark runs scored on their own "
        "training images, in-sample for the objects they kept). Labelled fraction and training commit per table.\n"
        "- **Images**: `mosaic1` = the held-back images as they are; `mosaic2` = 2 x 2 tiles of them as one image "
        "(a larger field of view at the same object size); `train` = the run's training images.\n"
        "- **Windows**: `patch` = the training patch, zero padding (the bundle's window up to 0.17); `N` = an N x N "
        "2D window (`AxBxC` a 3D one), images smaller than it padded by replicating their border; `default` = "
        "`configs/inference.json`'s window; all of these without test-time flips and the size filter "
        "(`min_diameter_ratio` 0); `flips` = the default window with `test_time_flips` true (the head averaged over "
        "the input's mirror images); `sizeR` = the default window with `min_diameter_ratio` R (objects whose "
        "equivalent diameter is under R times the median diameter of the run's annotated training objects removed); "
        "`seedD` = the default window with the `watershed` "
        "clustering's seeds at basins at least D deep in the embedding-edge map (in embedding distance; the default "
        "was 0.4 delta_v = 0.2 up to bundle 0.34, delta_v = 0.5 since). "
        "Overlap 0.25, Gaussian blending, everything else the bundle's inference.\n"
        f"- **Machine**: {m.get('cpu', '?')}, {m.get('nproc', '?')} cores, torch {m.get('torch', '?')}, no GPU; "
        f"1-minute load average {load} (inference only; times not compared). Commit {git_commit()}.\n"
    )
    for e in entries:
        rec = e["record"]
        keys = sorted({k.split("/")[0] for k in e["results"]})
        metric = "arand" if any("arand" in r for r in e["results"].values()) else None
        text += (
            f"\n## `{e['name']}`\n\n{rec['dataset']}, {e['kind']}, {rec['ratio']:.0%} labelled, "
            f"{rec.get('iterations', '?')} iterations, trained at {rec.get('commit', '?')}.\n\n"
        )
        cols = ["AP50", "mAP", "fg precision / recall"] + (["ARAND"] if metric else [])
        text += "| images | window | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols) + "\n"
        for key in keys:
            for w in windows:
                r = e["results"].get(f"{key}/{w}")
                if not r:
                    continue
                shape = "x".join(str(v) for v in r["shape"])
                cells = [f"{r['ap50']:.3f}", f"{r['map']:.3f}", f"{r['fg_precision']:.2f} / {r['fg_recall']:.2f}"]
                cells += [f"{r['arand']:.3f}"] if metric else []
                text += f"| {key} ({r['n_images']} x {shape}) | {w} | " + " | ".join(cells) + " |\n"
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="", help="learning-speed run folders, comma-separated")
    p.add_argument("--records", default="", help="accuracy-benchmark run records (.json), comma-separated")
    p.add_argument("--windows", default="patch,256,320,384")
    p.add_argument("--mosaic", default="1,2", help="k x k mosaics of the held-back images (1: as they are)")
    p.add_argument("--max_images", type=int, default=6, help="training images per --records run")
    p.add_argument("--data_dir", default=str(default_data_dir()))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--docs", default="")
    return p.parse_args(argv)


def main(argv=None) -> None:
    import sys

    args = parse_args(argv)
    entries = run(args)
    command = ".venv/bin/python -m research.window " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(entries, args.windows.split(","), command)
    print(text)
    if args.docs:
        Path(args.docs).write_text(text)


if __name__ == "__main__":
    main()
