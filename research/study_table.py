"""
A study of the accuracy benchmark (:mod:`research.accuracy` runs with ``--overrides`` and ``--seed``, one
``--out_dir`` per arm and seed) as one markdown table: every run's scores side by side, and per arm the mean over
its seeds, so that an option is compared with the default on the same splits, kept objects and budget.

    .venv/bin/python -m research.study_table --title "..." \\
        --arms default=eval/s20/acc_default,eval/s20/acc_default_s1 \\
        --arms lee_liu_images=eval/s20/acc_lee,eval/s20/acc_lee_s1 [--docs research/pages/X.md] [--command "..."]

Each arm is ``name=out_dir[,out_dir...]``; every record under those folders is a row (its data set, split, seed,
ratio, iterations, scores and the head's pixel precision / recall on the test images).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from research.records import collect


def _rows(arms: list[tuple[str, list[str]]], datasets: set[str] | None = None) -> list[dict]:
    """The finished runs under each arm's folders (of ``datasets`` only, when given)."""
    rows = []
    for name, dirs in arms:
        for out_dir in dirs:
            found = [r for r in collect(out_dir) if r.get("status") == "ok"]
            if not found:
                raise SystemExit(f"{out_dir}: no finished run records.")
            for rec in found:
                if datasets and rec["dataset"] not in datasets:
                    continue
                m = rec["metrics"]
                rows.append(
                    {
                        "arm": name,
                        "dataset": rec["dataset"],
                        "split": rec["split"],
                        "ratio": rec["ratio"],
                        "seed": rec.get("seed", 0),
                        "iterations": rec.get("iterations"),
                        "cpu": rec.get("train_cpu_seconds"),
                        "commit": _short_commit(rec.get("commit") or ""),
                        **{k: m.get(k) for k in ("ap50", "map", "sbd", "fg_precision", "fg_recall")},
                    }
                )
    return rows


def _short_commit(commit: str) -> str:
    """The commit's short hash, keeping a ``+dirty`` mark (uncommitted changes when the run started)."""
    sha, plus, rest = commit.partition("+")
    return sha[:7] + plus + rest


def _cell(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| arm | data | split | labelled | seed | iterations | AP50 | mAP | SBD | head pixel P / R | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r["dataset"], r["split"], r["ratio"], r["arm"], r["seed"])  # noqa: E731
    for r in sorted(rows, key=key):
        lines.append(
            f"| {r['arm']} | {r['dataset']} | {r['split']} | {r['ratio']:.0%} | {r['seed']} | {r['iterations']} "
            f"| {_cell(r['ap50'])} | {_cell(r['map'])} | {_cell(r['sbd'])} "
            f"| {_cell(r['fg_precision'], 2)} / {_cell(r['fg_recall'], 2)} | {r['commit']} |"
        )
    lines += ["", "Mean over seeds and splits:", ""] + _means(rows)
    # arms run on different seeds: their means are compared on the runs every arm of the data and ratio has
    runs: dict[tuple, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for r in rows:
        runs[(r["dataset"], r["ratio"])][r["arm"]].add((r["split"], r["seed"]))
    shared = {key: set.intersection(*arms.values()) for key, arms in runs.items()}
    common = [r for r in rows if (r["split"], r["seed"]) in shared[(r["dataset"], r["ratio"])]]
    if len(common) < len(rows):
        lines += ["", "Mean over the runs every arm has (the same splits and seeds):", ""] + _means(common)
    return lines


def _means(rows: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["ratio"], r["arm"])].append(r)
    lines = ["| arm | data | labelled | runs | AP50 | mAP | SBD |", "|---|---|---|---|---|---|---|"]
    for (dataset, ratio, arm), rs in sorted(groups.items()):
        mean = {k: float(np.mean([r[k] for r in rs])) for k in ("ap50", "map", "sbd")}
        lines.append(
            f"| {arm} | {dataset} | {ratio:.0%} | {len(rs)} | {mean['ap50']:.3f} | {mean['map']:.3f} "
            f"| {mean['sbd']:.3f} |"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", action="append", required=True, help="name=out_dir[,out_dir...] (repeat per arm)")
    p.add_argument("--title", default="Accuracy benchmark study")
    p.add_argument("--datasets", default="", help="comma-separated data sets to keep (default: every run's)")
    p.add_argument("--command", action="append", default=[], help="the benchmark commands that made the runs")
    p.add_argument("--note", action="append", default=[], help="a line of set-up (data, machine, load)")
    p.add_argument("--docs", default="", help="markdown file to write ('' = print only)")
    args = p.parse_args(argv)
    arms = []
    for spec in args.arms:
        name, _, dirs = spec.partition("=")
        if not name or not dirs:
            p.error(f"--arms takes name=out_dir[,out_dir...], got {spec!r}")
        arms.append((name, dirs.split(",")))
    datasets = {d for d in args.datasets.split(",") if d}
    rows = _rows(arms, datasets)
    if not rows:
        raise SystemExit(f"no finished runs of {sorted(datasets)} under the arms' folders.")
    me = "python -m research.study_table " + " ".join(f"--arms {spec}" for spec in args.arms)
    me += f" --datasets {args.datasets}" if datasets else ""
    text = [f"# {args.title}", "", "Generated by `research.study_table`; do not edit by hand.", "", "```bash"]
    text += [*args.command, me, "```", ""]
    text += [f"- {line}" for line in args.note] + ([""] if args.note else [])
    text += table(rows) + [""]
    print("\n".join(text))
    if args.docs:
        Path(args.docs).write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
