"""
Do ``spoco suggest``'s suggestions help? A simulated annotator on training images, dense labels as the oracle.

Round 0 trains the bundle on a pool of training images with a few of their objects annotated (``--start``: the
objects :class:`~spoco_bundle.transforms.SparseInstanceLabel` keeps, seed 0). Each later round adds ``--add`` of the
pool's objects in one of two ways and fine-tunes the previous round's model on the enlarged annotation for the same
budget (``--budget_s``):

- ``suggest``: ``spoco suggest`` (``configs/suggest.json``) with the previous model on every pool image; going down
  its objects by score (all images together), the annotator outlines the true objects a suggestion stands for (IoU
  above 0.5, or at least half of the true object inside it: both nuclei of a merged pair; those not yet annotated)
  and paints a false suggestion (no such object, at least half of it on true background) as background (its pixels
  outside every true object, id 65535, ``--background_label 65535``), until the round's count of new objects is
  reached;
- ``suggest_objects``: the same without painting background (only objects are outlined: the head keeps its
  objects-only training);
- ``random``: the same number of unannotated true objects, drawn at random.

Every model is scored on the held-back training images (``--tune``; AP50 pooled and per image), never on the
validation images. Records are cached per (arm, round) under ``--out_dir``, so the loop runs in pieces.

    .venv/bin/python -m research.annotation_loop [--dataset dsb2018] [--tune 40] [--pool 100] [--start 0.05]
        [--add 0.05] [--rounds 3] [--first_budget_s 450] [--budget_s 240] [--arms suggest,random] [--jobs 2]
        [--out_dir eval/annotation_loop] [--docs research/pages/annotation_loop_dsb.md]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from research.data import Item, Split, kept_ids, score
from research.learning_speed import screen_split
from research.methods import spoco as runner
from research.records import git_commit, machine_info
from research.settings import RunSettings
from spoco_bundle.io import split_image_suffix, write_label_image

BACKGROUND = 65535  # the painted-background id (no object of the data sets uses it)
ARMS = ("suggest", "suggest_objects", "random")
SUGGEST = "configs/suggest.json"


def _annotation_path(work: Path, item: Item) -> Path:
    return work / "labels" / f"{split_image_suffix(os.path.basename(item.label_path))[0]}.tif"


def _write_annotations(work: Path, pool: list[Item], chosen: dict[str, set[int]], painted: dict[str, np.ndarray]):
    """The annotator's label files: the chosen true objects with their ids, painted background 65535, else 0."""
    (work / "labels").mkdir(parents=True, exist_ok=True)
    items = []
    for item in pool:
        ann = np.where(np.isin(item.labels, sorted(chosen[item.name])), item.labels, 0).astype(np.uint16)
        if item.name in painted:
            ann[painted[item.name] & (item.labels == 0)] = BACKGROUND
        path = _annotation_path(work.resolve(), item)  # dataset.json resolves relative paths against itself
        write_label_image(path, ann)
        items.append(replace(item, label_path=str(path)))
    return items


def _matches(pred: np.ndarray, truth: np.ndarray, k: int) -> tuple[list[int], bool]:
    """What an annotator does with suggested object ``k``: the true objects it stands for (IoU above 0.5, or at least
    half of a true object inside it: both nuclei of a merged pair), and whether it is a false object (none of those,
    and at least half of it on true background), whose background the annotator paints."""
    obj = pred == k
    ids, overlap = np.unique(truth[obj], return_counts=True)
    size = obj.sum()
    hits = []
    for t, n in zip(ids, overlap):
        if t:
            area = int((truth == t).sum())
            if n / (size + area - n) > 0.5 or n >= 0.5 * area:
                hits.append(int(t))
    background = int(overlap[ids == 0].sum()) if (ids == 0).any() else 0
    return hits, not hits and background >= 0.5 * size


def _suggested(work: Path, split: Split, ckpt: Path, chosen: dict, n_add: int, threads: int):
    """Objects the previous model's suggestions on the pool (``split.train``) lead the annotator to outline, the
    pixels painted as background, and the number of suggestions that matched no true object."""
    pool = split.train
    preds = runner.predict(ckpt, split, work, items=pool, threads=threads, tag="_suggest", configs=(SUGGEST,))
    queue = []
    for item, pred in zip(pool, preds):
        stem = split_image_suffix(os.path.basename(item.path))[0]
        with open(work / "pred_suggest" / f"{stem}_suggestions.csv") as f:
            queue += [(float(r["score"]), item.name, int(r["id"])) for r in csv.DictReader(f)]
    by_name = {item.name: (item, pred) for item, pred in zip(pool, preds)}
    added: dict[str, set[int]] = {name: set() for name in chosen}
    painted: dict[str, np.ndarray] = {}
    count = false = 0
    for _, name, k in sorted(queue, reverse=True):
        if count >= n_add:
            break
        item, pred = by_name[name]
        hits, is_false = _matches(pred, item.labels, k)
        if is_false:
            painted[name] = painted.get(name, np.zeros(pred.shape, bool)) | (pred == k)
            false += 1
        for t in hits:
            if t not in chosen[name] and t not in added[name] and count < n_add:
                added[name].add(t)
                count += 1
    return added, painted, false


def _random(pool: list[Item], chosen: dict, n_add: int, seed: int) -> dict[str, set[int]]:
    rest = [(item.name, int(t)) for item in pool for t in np.unique(item.labels) if t and t not in chosen[item.name]]
    rng = np.random.default_rng(seed)
    added: dict[str, set[int]] = {item.name: set() for item in pool}
    for i in rng.choice(len(rest), size=min(n_add, len(rest)), replace=False):
        added[rest[i][0]].add(rest[i][1])
    return added


def run_arm(args: argparse.Namespace, arm: str) -> list[dict]:
    """Rounds 1..N of one arm (round 0 shared); returns their records."""
    split = _split(args)
    pool, out = split.train, Path(args.out_dir)
    total = sum(len(np.unique(i.labels)) - 1 for i in pool)
    n_add = int(round(args.add * total))
    base = _round_zero(args, split)
    chosen = {k: set(v) for k, v in base["chosen"].items()}
    painted: dict[str, np.ndarray] = {}
    ckpt = Path(base["work"]) / "models" / "model.pt"
    records = [dict(base, arm=arm)]
    for r in range(1, args.rounds + 1):
        path = out / arm / f"round_{r}.json"
        work = path.with_suffix("")
        if path.is_file():
            record = json.loads(path.read_text())
            chosen = {k: set(v) for k, v in record["chosen"].items()}
            painted = {k: np.load(work / "painted.npz")[k] for k in record.get("painted", [])}
            ckpt = work / "models" / "model.pt"
            records.append(record)
            continue
        t0 = time.perf_counter()
        false = 0
        if arm in ("suggest", "suggest_objects"):
            added, new_paint, false = _suggested(work, split, ckpt, chosen, n_add, args.threads)
            for k, v in new_paint.items() if arm == "suggest" else ():
                painted[k] = painted.get(k, np.zeros(v.shape, bool)) | v
        else:
            added = _random(pool, chosen, n_add, seed=r)
        for k, v in added.items():
            chosen[k] |= v
        record = _train_and_score(args, split, work, chosen, painted, pretrained=ckpt, budget=args.budget_s)
        record.update(arm=arm, round=r, added=sum(len(v) for v in added.values()), false_suggestions=false)
        record["loop_s"] = round(time.perf_counter() - t0, 1)
        if painted:
            np.savez_compressed(work / "painted.npz", **painted)
        record["painted"] = sorted(painted)
        path.write_text(json.dumps(record, indent=1))
        ckpt = work / "models" / "model.pt"
        records.append(record)
        print(f"{arm} round {r}: AP50 {record['ap50']:.3f} ({record['annotated']} objects)", flush=True)
    return records


def _train_and_score(
    args, split: Split, work: Path, chosen, painted, pretrained: Path | None, budget: float, threads: int = 0
) -> dict:
    items = _write_annotations(work, split.train, chosen, painted)
    overrides = {"background_label": BACKGROUND} if painted else {}
    if pretrained is not None:
        overrides["pretrained"] = str(pretrained)
    threads = threads or args.threads
    run = RunSettings(budget_s=budget, clock="cpu", threads=threads, overrides=overrides)
    fit = runner.fit(replace(split, train=items), 1.0, run, work_dir=work)
    preds = runner.predict(work / "models" / "model.pt", split, work, threads=threads)
    s = score(preds, [i.labels for i in split.test], split.spatial_dims, split.dataset)
    return {
        "work": str(work),
        "annotated": sum(len(v) for v in chosen.values()),
        "chosen": {k: sorted(int(t) for t in v) for k, v in chosen.items()},
        "iterations": fit.iterations,
        "train_cpu_s": round(fit.cpu_s, 1),
        "ap50": s["ap50"],
        "ap50_per_image": float(np.mean([p["ap50"] for p in s["per_image"]])),
        "map": s["map"],
        "fg_precision": s["fg_precision"],
        "fg_recall": s["fg_recall"],
        "commit": git_commit() or "unknown",
        "loadavg": round(os.getloadavg()[0], 2),
    }


def _split(args: argparse.Namespace) -> Split:
    split = screen_split(args.dataset, args.data_dir, "", args.tune)
    return replace(split, train=split.train[: args.pool] if args.pool else split.train)


def _round_zero(args: argparse.Namespace, split: Split) -> dict:
    path = Path(args.out_dir) / "round_0.json"
    if path.is_file():
        return json.loads(path.read_text())
    chosen = {item.name: set(int(t) for t in kept_ids(item, args.start, 0)) for item in split.train}
    # alone on the machine: as many threads as the arms will run side by side (the budget is CPU time)
    work = path.with_suffix("")
    record = _train_and_score(args, split, work, chosen, {}, None, args.first_budget_s, args.threads * args.jobs)
    record.update(round=0, added=0, false_suggestions=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def report(args: argparse.Namespace, records: list[dict], command: str) -> str:
    machine = machine_info()
    split = _split(args)
    total = sum(len(np.unique(i.labels)) - 1 for i in split.train)
    lines = [
        "# Suggestions against random choice: a simulated annotator",
        "",
        "Generated by `python -m research.annotation_loop`; do not edit by hand.",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- **Data**: {args.dataset}, training split only: a pool of its first {len(split.train)} training images "
        f"({total} objects) is annotated; its last {len(split.test)} training images (never trained on) score every "
        "model. AP50 pooled (TP / (TP + FP + FN) over all images) and per image (mean).",
        f"- **Loop**: round 0 keeps {args.start:.0%} of the pool's objects (seed 0) and trains for "
        f"{args.first_budget_s:g} CPU-s; each round adds {args.add:.0%} of the pool's objects (by `spoco suggest`'s "
        "ranking, a suggestion matching no true object painted as background; or at random) and fine-tunes the "
        f"previous model for {args.budget_s:g} CPU-s (`--pretrained`).",
        f"- **Machine**: {machine.get('cpu')}, {machine.get('nproc')} cores, torch {machine.get('torch')}, no GPU; "
        f"{args.threads} thread per run, the arms side by side.",
        "",
        "| arm | round | annotated objects | false suggestions (painted in suggest) | iterations | AP50 | "
        "AP50 per image | mAP | head pixels P / R | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["round"], r["arm"])):
        arm = r["arm"] if r["round"] else "all arms"
        lines.append(
            f"| {arm} | {r['round']} | {r['annotated']} | {r['false_suggestions']} | "
            f"{r['iterations']} | {r['ap50']:.3f} | {r['ap50_per_image']:.3f} | {r['map']:.3f} | "
            f"{r['fg_precision']:.2f} / {r['fg_recall']:.2f} | {r['loadavg']} |"
        )
    return "\n".join(lines) + "\n"


def summary(args: argparse.Namespace, split: Split, records: list[dict], command: str) -> dict:
    """What docs/results.md shows of a run (``scripts/sync_docs.py`` copies it): AP50 (pooled) per arm and round,
    the annotated count of each round, the goal's two tests after the last round, the setup and the command."""
    first = records[0]  # round 0, shared by the arms
    by = {(r["arm"], r["round"]): r for r in records if r["round"]}
    rounds = sorted({r["round"] for r in records})
    arms = sorted({arm for arm, _ in by}, key=lambda a: (a != "random", a))
    annotated = {n: next(r["annotated"] for r in records if r["round"] == n) for n in rounds}
    counts = " | ".join(f"round {n} ({annotated[n]})" for n in rounds)
    lines = [f"| arm (AP50; annotated objects) | {counts} |", "|---|" + "---|" * len(rounds)]
    for arm in arms:
        cells = [first if n == 0 else by.get((arm, n)) for n in rounds]
        lines.append(f"| {arm} | " + " | ".join(f"{c['ap50']:.3f}" if c else "–" for c in cells) + " |")
    last = rounds[-1]
    random_ap = by[("random", last)]["ap50"] if ("random", last) in by else None
    verdicts = {}
    for arm in arms:
        if arm == "random" or random_ap is None or (arm, last) not in by:
            continue
        ahead = by[(arm, last)]["ap50"] - random_ap
        # the round whose AP50 first reaches random's final score, as a share of the objects added by the last round
        added = annotated[last] - first["annotated"]
        reached = [n for n in rounds[1:] if (arm, n) in by and by[(arm, n)]["ap50"] >= random_ap]
        share = round((annotated[reached[0]] - first["annotated"]) / added, 2) if reached and added else None
        verdicts[arm] = {"ahead_of_random": round(ahead, 3), "share_to_reach_random": share}
    machine = machine_info()
    setup = (
        f"training images only ({len(split.train)} annotated, {len(split.test)} held back for scoring); "
        f"{args.start:.0%} of the objects at round 0 ({args.first_budget_s:g} CPU-s), +{args.add:.0%} per round, each "
        f"round fine-tuning the previous model for {args.budget_s:g} CPU-s; {machine.get('cpu')}, "
        f"{machine.get('nproc')} cores, {args.threads} thread per run, the arms side by side, no GPU."
    )
    return {
        "dataset": args.dataset,
        "setup": setup,
        "table": "\n".join(lines),
        "verdicts": verdicts,
        "command": command,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="dsb2018")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--tune", type=int, default=40, help="last N training images: the held-back scoring images")
    p.add_argument("--pool", type=int, default=100, help="the first N training images are annotated (0: all)")
    p.add_argument("--start", type=float, default=0.05)
    p.add_argument("--add", type=float, default=0.05)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--first_budget_s", type=float, default=450.0)
    p.add_argument("--budget_s", type=float, default=240.0)
    p.add_argument("--arms", default="suggest,random")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out_dir", default="eval/annotation_loop")
    p.add_argument("--docs", default="")
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    if set(arms) - set(ARMS):
        p.error(f"--arms are {', '.join(ARMS)}; got {arms}")
    _round_zero(args, _split(args))
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_arm, [args] * len(arms), arms))
    records = [results[0][0]] + [r for arm in results for r in arm[1:]]
    command = (
        f".venv/bin/python -m research.annotation_loop --dataset {args.dataset} --tune {args.tune} --pool {args.pool} "
        f"--start {args.start:g} --add {args.add:g} --rounds {args.rounds} --first_budget_s {args.first_budget_s:g} "
        f"--budget_s {args.budget_s:g} --arms {args.arms} --out_dir {args.out_dir}"
        + (f" --docs {args.docs}" if args.docs else "")
    )
    text = report(args, records, command)
    print(text)
    if args.docs:
        Path(args.docs).write_text(text)
        Path(args.docs).with_suffix(".json").write_text(
            json.dumps(summary(args, _split(args), records, command), indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
