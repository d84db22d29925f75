"""
Scale robustness of a trained SPOCO model from the accuracy benchmark: the held-back 2D images (and their dense
labels) are resampled by each factor in ``--scales`` (users' images come at other magnifications), segmented with
the bundle's inference config as a user runs it, and scored against the resampled labels: once with the defaults
(how robust the model itself is: ``--image_scale 1``), once with the matching ``--image_scale 1/factor`` (what a
user who knows the magnification gives: the network sees objects at their training size, labels come back on the
image's grid), and once with ``--image_scale auto`` (the default: the bundle finds the factor per image, no
knowledge of the magnification).

``auto`` compares each image's blob size with the training images'. Models trained since bundle 0.9 record it
(:class:`~spoco_bundle.handlers.TrainingSetRecorder`); for an older checkpoint it is computed here the same way
(``blob_scales`` of :class:`spoco_bundle.training_set.TrainingSet` on the run's training images and image scale)
and passed as ``--inferer#blob_scales``; the record says which.

    .venv/bin/python -m research.scale [--dataset dsb2018] [--ratio 0.1] [--scales 0.5,0.75,1,1.5,2,3]
        [--method spoco] [--out_dir eval/benchmark] [--threads 2] [--max_test N] [--no_matched] [--no_auto]
        [--auto_only]

It reads the checkpoint of a finished benchmark run (``<out_dir>/<dataset>/<split>/<method>/ratio_<r>.json`` names
its work folder) and writes ``scale_ratio_<r>.json`` beside it; ``python -m research.accuracy --no_run`` puts the
table into ``research/pages/benchmarks.md``. Images: linear interpolation (``scipy.ndimage.zoom`` order 1), labels:
nearest.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from research.data import REPO_ROOT, cached_checkpoint, default_data_dir, score
from research.methods.spoco import predict
from research.records import git_commit


@dataclass
class _Scaled:
    path: str
    labels: np.ndarray


def rescale(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample an image (linear) and its labels (nearest) by ``factor`` along every axis."""
    if factor == 1.0:
        return image, labels
    img = ndimage.zoom(image.astype(np.float32), factor, order=1)
    lab = ndimage.zoom(labels, factor, order=0)
    return img, lab


def scale_check(args: argparse.Namespace) -> Path:
    split, run_dir, run, ckpt = cached_checkpoint(
        args.dataset, args.split, args.method, args.ratio, args.out_dir, args.data_dir
    )
    test = split.test[: args.max_test] if args.max_test else split.test
    work = Path(tempfile.mkdtemp(prefix=f"spoco_scale_{args.dataset}_"))
    blobs, blobs_source = _training_blob_scales(ckpt, split, run)
    out = run_dir / f"scale_ratio_{args.ratio:.2f}.json"
    same = {"split": split.name, "checkpoint_run": run.get("info", {}).get("work_dir"), "n_test": len(test)}
    earlier = _earlier_rows(out, args, same) if args.auto_only else {}
    # what every auto result of this run used, and whether only that column was segmented again
    auto_run = {"rule": _default_rule(), "commit": git_commit(), "auto_only": bool(args.auto_only)}
    rows = []
    for factor in args.scales:
        items = []
        for item in test:
            img, lab = rescale(item.image, item.labels, factor)
            path = work / f"in_{factor:g}" / f"{item.name}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_image(img, path)
            items.append(_Scaled(str(path), lab))
        if args.auto_only:
            row = {k: v for k, v in earlier[factor].items() if k != "auto"}
        else:
            t0 = time.perf_counter()
            preds = predict(ckpt, split, work, items=items, threads=args.threads, tag=f"_{factor:g}")
            scores = score(preds, [i.labels for i in items], split.spatial_dims)
            row = {"scale": factor, "inference_s": round(time.perf_counter() - t0, 1), **scores}
        msg = f"[scale] {args.dataset} {args.method} ratio {args.ratio:g} scale {factor:g}: AP50 {row['ap50']:.3f}"
        if factor != 1.0 and not args.no_matched and not args.auto_only:
            ids = {"image_scale": 1.0 / factor}
            preds = predict(ckpt, split, work, items=items, threads=args.threads, tag=f"_{factor:g}_m", overrides=ids)
            matched = score(preds, [i.labels for i in items], split.spatial_dims)
            row["matched"] = {"image_scale": 1.0 / factor, **matched}
            msg += f", with --image_scale {1.0 / factor:.3g}: {matched['ap50']:.3f}"
        if not args.no_auto:
            ids: dict = {"image_scale": "auto"}
            if blobs_source == "computed":
                ids["inferer#blob_scales"] = list(blobs)
            tag = f"_{factor:g}_auto"
            preds = predict(ckpt, split, work, items=items, threads=args.threads, tag=tag, overrides=ids)
            found = _found_scales(work / f"inference{tag}.log")
            auto = score(preds, [i.labels for i in items], split.spatial_dims)
            row["auto"] = {
                "found_median": float(np.median(found)) if found else None,
                **auto_run,
                **auto,
            }
            msg += f", auto: {auto['ap50']:.3f} (median factor {row['auto']['found_median']})"
        rows.append(row)
        print(msg)
    if args.auto_only:  # the earlier record's other scales stay
        merged = {**earlier, **{r["scale"]: r for r in rows}}
        rows = [merged[f] for f in sorted(merged)]
    out.write_text(
        json.dumps(
            {
                "dataset": args.dataset,
                "split": split.name,
                "method": args.method,
                "ratio": args.ratio,
                "checkpoint_run": run.get("info", {}).get("work_dir"),
                "n_test": len(test),
                "blob_scales": list(blobs),
                "blob_scales_source": blobs_source,
                "rows": rows,
            },
            indent=1,
            default=float,
        )
    )
    return out


def _training_blob_scales(ckpt: Path, split, run: dict) -> tuple[tuple[float, ...], str]:
    """The model's recorded training images' blob sizes ("recorded"), else computed from its run ("computed")."""
    from spoco_bundle.networks import read_state_dict

    recorded = read_state_dict(str(ckpt)).get("image_blob_scale")
    if recorded is not None and bool((recorded > 0).all()):
        return tuple(float(v) for v in recorded), "recorded"
    from spoco_bundle.training_set import TrainingSet

    scale = run.get("info", {}).get("overrides", {}).get("image_scale", 1.0)
    data = [{"image": i.path, "label": i.path} for i in split.train]  # only the images are read for blob sizes
    return TrainingSet(data, split.spatial_dims, image_scale=scale).blob_scales, "computed"


def _earlier_rows(out: Path, args: argparse.Namespace, same: dict) -> dict[float, dict]:
    """``--auto_only``: the rows of the earlier run whose ``image_scale 1`` / matched results are kept. It must be
    of the same model and test images (``same``: header fields) and have exactly the scales asked for, so that no
    row keeps an auto result of another rule."""
    if not out.is_file():
        raise SystemExit(f"--auto_only: no earlier run to update ({out} is missing); run without it first.")
    record = json.loads(out.read_text())
    differ = {k: (record.get(k), v) for k, v in same.items() if record.get(k) != v}
    if differ:
        raise SystemExit(f"--auto_only: {out} is of another run (earlier, now): {differ}; run without it.")
    rows = {float(r["scale"]): r for r in record["rows"]}
    if sorted(rows) != sorted(args.scales):
        raise SystemExit(f"--auto_only: {out} has the scales {sorted(rows)}; give exactly those (--scales).")
    return rows


def _default_rule() -> str:
    """The rule ``image_scale auto`` resamples by, recorded with every auto result: ``"halfway"`` (geometrically
    halfway between the image's blob size and the training range's nearer end), the only one left since the other
    rules (``ScaledInferer(rule=...)``, compared by the retired ``scale_rules.py``) were retired. Records written
    before name the rule they used."""
    return "halfway"


def _found_scales(log: Path) -> list[float]:
    """The factors ``image_scale auto`` chose, from the per-file lines of an inference log."""
    import re

    text = log.read_text() if log.is_file() else ""
    return [float(m.split(",")[0]) for m in re.findall(r"at image_scale ([0-9.e+-]+(?:, [0-9.e+-]+)*) \(auto\)", text)]


def _write_image(image: np.ndarray, path: Path) -> None:
    tifffile.imwrite(path, image.astype(np.float32))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=str(default_data_dir()))
    p.add_argument("--dataset", default="dsb2018", choices=("dsb2018",))
    p.add_argument("--split", default=None)
    p.add_argument("--method", default="spoco")
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--scales", default="0.5,0.75,1,1.5,2,3")
    p.add_argument("--out_dir", default=str(REPO_ROOT / "eval" / "benchmark"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max_test", type=int, default=None)
    p.add_argument("--no_matched", action="store_true", help="skip the runs with the matching --image_scale")
    p.add_argument("--no_auto", action="store_true", help="skip the runs with --image_scale auto")
    p.add_argument(
        "--auto_only",
        action="store_true",
        help="rerun only --image_scale auto (e.g. after a change of its rule), keeping the earlier record's other runs",
    )
    args = p.parse_args(argv)
    if args.auto_only and (args.no_auto or args.no_matched):
        p.error("--auto_only reruns the auto column only; it takes neither --no_auto nor --no_matched")
    args.scales = [float(s) for s in args.scales.split(",") if s.strip()]
    if any(s <= 0 for s in args.scales):
        p.error(f"scales must be positive, got {args.scales}")
    return args


if __name__ == "__main__":
    print(scale_check(parse_args()))
