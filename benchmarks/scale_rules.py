"""
Where ``image_scale "auto"`` resamples an image whose blob size lies outside the training images' range, chosen on
*training* images: the learning-speed protocol's held-back training images (``--tune``, never trained on; the
benchmark's validation images are not used) resampled by each factor (image linear, labels nearest), segmented
in-process with ``configs/inference.json`` (its preprocessing, network and post-processing chain) with each rule:

- ``none``: ``image_scale`` 1 (the model alone); ``matched``: the true factor ``1 / factor`` (a reference: what a
  user who knows the magnification gives);
- ``median`` / ``edge`` / ``halfway``: ``auto`` with :class:`~spoco_bundle.inferers.ScaledInferer` ``rule`` (see
  docs/object_scale.md).

    .venv/bin/python -m benchmarks.scale_rules --run_dir eval/learning_speed/dsb2018/default/ratio_0.10_900s[,...]
        [--factors 0.5,0.75,1,1.5,2,3] [--rules none,matched,asymmetric,halfway,median,edge] [--threads 1]
        [--docs docs/scale_rules.md] [--no_run]

Each checkpoint is ``<run_dir>/models/model.pt`` (a ``python -m benchmarks.learning_speed`` run, which trained on
the same split's other training images; several, comma-separated, for several models). Results are cached per
factor in ``<run_dir>/scale_rules.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy import ndimage

from benchmarks.data import REPO_ROOT, default_data_dir, load_benchmark, score
from benchmarks.learning_speed import tune_split
from benchmarks.records import git_commit, loadavg, machine_info
from spoco_bundle.inferers import AUTO_RULES

RULES = ("none", "matched") + AUTO_RULES


def _pipeline(ckpt: Path):
    """``(preprocessing, network, sliding window inferer, post-processing)`` of configs/inference.json."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(REPO_ROOT), "ckpt_path": str(ckpt), "device": "$torch.device('cpu')"})
    return (
        parser.get_parsed_content("preprocessing"),
        parser.get_parsed_content("network").eval(),
        parser.get_parsed_content("sliding_window_inferer"),
        parser.get_parsed_content("postprocessing"),
    )


def _inferer(window, rule: str, factor: float):
    from spoco_bundle.inferers import ScaledInferer

    if rule == "none":
        return ScaledInferer(window, 1.0, output_grid="network")
    if rule == "matched":
        return ScaledInferer(window, 1.0 / factor, output_grid="network")
    return ScaledInferer(window, "auto", output_grid="network", rule=rule)


def _segment(pipeline, inferer, path: str) -> np.ndarray:
    pre, network, _, post = pipeline
    data = pre({"image": path})
    with torch.no_grad():
        pred = inferer(data["image"][None], network)[0]
    return np.asarray(post({"image": data["image"], "pred": pred})["pred"])[0]


def run_factor(pipeline, split, factor: float, rules: list[str]) -> dict:
    """AP50 / mAP of each rule on the held-back images resampled by ``factor``."""
    work = Path(tempfile.mkdtemp(prefix="spoco_scale_rules_"))
    paths, labels = [], []
    for item in split.test:
        image = item.image.astype(np.float32)
        lab = item.labels
        if factor != 1.0:
            image, lab = ndimage.zoom(image, factor, order=1), ndimage.zoom(lab, factor, order=0)
        path = work / f"{item.name}.tif"
        tifffile.imwrite(path, image)
        paths.append(str(path))
        labels.append(lab)
    row: dict = {"factor": factor, "load_start": loadavg()}
    for rule in rules:
        t0 = time.perf_counter()
        inferer = _inferer(pipeline[2], rule, factor)
        scales, preds = [], []
        for path in paths:
            preds.append(_segment(pipeline, inferer, path))
            scales.append(float(np.prod(inferer.last_scale)) ** (1 / len(inferer.last_scale)))
        s = score(preds, labels, split.spatial_dims, split.dataset)
        row[rule] = {
            "ap50": s["ap50"],
            "map": s["map"],
            "median_factor": float(np.median(scales)),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(f"[scale_rules] factor {factor:g} {rule}: AP50 {s['ap50']:.3f} (median factor {np.median(scales):.3g})")
    row["load_end"] = loadavg()
    return row


def report(records: list[dict], rules: list[str]) -> str:
    """The markdown report: set-up, then one AP50 table per model (with means over the factors below and above 1)."""
    m = records[0]["machine"]
    loads = [v for rec in records for r in rec["rows"].values() for v in (r.get("load_start"), r.get("load_end")) if v]
    load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"
    dirs = ",".join(rec["run_dir"] for rec in records)
    text = (
        "# `image_scale auto`: where to resample an image outside the training range\n\n"
        "Generated by `python -m benchmarks.scale_rules` from its cache; do not edit by hand.\n\n"
        f"```bash\n.venv/bin/python -m benchmarks.scale_rules --run_dir {dirs} --rules {','.join(rules)}\n```\n\n"
        f"- **Data**: {records[0]['split']}: the {records[0]['n_test']} held-back *training* images of the "
        "learning-speed protocol (never trained on), resampled by each factor (image linear, labels nearest), scored "
        "against the resampled labels. The benchmark's validation images are not used.\n"
        "- **Models**: the checkpoints of the runs below (`python -m benchmarks.learning_speed`, 10 % of the objects, "
        "900 CPU-s, the bundle's training defaults of the run's commit with the `train.json` overrides named per "
        "model); inference with `configs/inference.json` (clustering on the network's grid).\n"
        f"- **Machine**: {m.get('cpu', '?')}, {m.get('nproc', '?')} cores, torch {m.get('torch', '?')}, no GPU; "
        f"1-minute load average {load} (inference only, times not compared).\n"
        "- **Rules**: `none` = `--image_scale 1`; `matched` = the true factor (a reference); `median` / `edge` / "
        "`halfway` = `--image_scale auto` with `ScaledInferer(rule=...)`: an image outside the training range is "
        "resampled to the training median, to the range's nearer end, or halfway (geometrically) between them; "
        "`asymmetric` (the default): to the range's end when the image would be enlarged, halfway when shrunk.\n"
    )
    head = "| factor | " + " | ".join(rules) + " |\n|---|" + "---|" * len(rules) + "\n"
    for rec in records:
        rows = sorted(rec["rows"].values(), key=lambda r: r["factor"])
        body = ""
        for r in rows:
            cells = [f"{r[k]['ap50']:.3f}" if k in r else "-" for k in rules]
            body += f"| {r['factor']:g} | " + " | ".join(cells) + " |\n"
        trained = rec.get("training", {})
        how = f"trained at {trained.get('commit', '?')}, overrides {json.dumps(trained.get('overrides', {}))}; "
        text += (
            f"\n## `{rec['run_dir']}` ({how if trained else ''}inference at {rec['commit']})\n\nAP50:\n\n"
            + head
            + body
            + _means(rows, rules)
        )
    return text


def _means(rows: list[dict], rules: list[str]) -> str:
    """Mean AP50 per rule over the factors below 1 and above 1 (images enlarged / shrunk by ``auto``)."""
    out = ""
    for name, keep in (("factors < 1", lambda f: f < 1), ("factors > 1", lambda f: f > 1)):
        part = [r for r in rows if keep(r["factor"])]
        if not part:
            continue
        cells = [f"{np.mean([r[k]['ap50'] for r in part]):.3f}" if all(k in r for r in part) else "-" for k in rules]
        out += f"| mean, {name} | " + " | ".join(cells) + " |\n"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", required=True, help="a learning-speed run folder (its models/model.pt)")
    p.add_argument("--dataset", default="dsb2018")
    p.add_argument("--data_dir", default=str(default_data_dir()))
    p.add_argument("--tune", type=int, default=40, help="last N training images (as benchmarks.learning_speed)")
    p.add_argument("--factors", default="0.5,0.75,1,1.5,2,3")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--docs", default="", help="also write the report to this markdown file")
    p.add_argument("--no_run", action="store_true", help="only print the report of the cached factors")
    args = p.parse_args()
    rules = [r for r in args.rules.split(",") if r]
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        p.error(f"unknown rules {unknown}; known: {list(RULES)}")
    torch.set_num_threads(args.threads)
    (split,) = load_benchmark(args.dataset, args.data_dir)[:1]
    split = tune_split(split, args.tune)
    records = []
    for run_dir in (Path(v) for v in args.run_dir.split(",") if v):
        ckpt = run_dir / "models" / "model.pt"
        if not ckpt.is_file():
            p.error(f"{ckpt} not found: train it with python -m benchmarks.learning_speed first.")
        cache = run_dir / "scale_rules.json"
        record = json.loads(cache.read_text()) if cache.is_file() else {"rows": {}}
        run_record = Path(f"{run_dir}.json")  # the learning-speed run's record: what the model was trained with
        if run_record.is_file():
            trained = json.loads(run_record.read_text())
            record["training"] = {k: trained.get(k) for k in ("commit", "overrides", "seed", "iterations")}
        factors = [float(v) for v in args.factors.split(",")]
        todo = {f: [r for r in rules if r not in record["rows"].get(f"{f:g}", {})] for f in factors}
        if not args.no_run and any(todo.values()):
            # the set-up of the last run that added rows (the commit: the inference code that ran)
            record.update(
                run_dir=os.path.relpath(run_dir, REPO_ROOT) if run_dir.is_absolute() else str(run_dir),
                split=split.name,
                n_test=len(split.test),
                machine=machine_info(),
                commit=git_commit() or "unknown",
            )
            pipeline = _pipeline(ckpt)
            for factor, missing in todo.items():
                if missing:
                    key = f"{factor:g}"
                    new = run_factor(pipeline, split, factor, missing)
                    record["rows"][key] = {**record["rows"].get(key, {}), **new}
                    cache.write_text(json.dumps(record, indent=1))
        records.append(record)
    text = report(records, rules)
    print(text)
    if args.docs:
        Path(args.docs).write_text(text)


if __name__ == "__main__":
    main()
