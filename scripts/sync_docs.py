"""
One source for every number on the front pages: copies the measured figures that ``README.md``, the model card
(``docs/README.md``) and ``metadata.json`` show from the files the measuring scripts write, so no figure there is
typed by hand and none can drift.

- Block ``results`` (model card; docs/results.md): the accuracy table, from the summaries ``research/pages/<page>.json``
  that ``python -m research.accuracy ... --docs research/pages/<page>.md`` writes beside each benchmark page
  (:data:`PAGES`).
- Block ``results-short`` (README): one row per data set at 10 % labelled, SPOCO's protocols beside the best peer
  trained on every object, from the same summaries.
- Block ``shipped-models`` (README and model card): one row per shipped model, from ``models/<name>/model.json``
  (written by ``scripts/shipped_models.py``).
- ``docs/results.md``, whole (never edited by hand): what is measured, the full results table, the shipped models and
  how they were measured, with links to the lab's pages and the commands that regenerate them.
- ``metadata.json`` ``eval_metrics``: the shipped models' held-out scores, from the same cards
  (:func:`spoco_bundle.cards.eval_metrics`; a zoo package made from one model reports that model's alone).

    .venv/bin/python scripts/sync_docs.py           # rewrite what is out of date
    .venv/bin/python scripts/sync_docs.py --check   # only list it (exit 1); the test suite runs this

A block is the text between ``<!-- NAME: begin ... -->`` and ``<!-- NAME: end -->``; everything outside the blocks
is prose and stays as written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from spoco_bundle.cards import eval_metrics  # noqa: E402

# benchmark summaries the results table reads (research/pages/<page>.json beside its page); the figures of a (data set,
# method, ratio) come from the last page that holds it (a later page re-measured it with newer settings)
PAGES = ("benchmarks_protocols", "benchmarks_beyond_nuclei", "benchmarks_tissue")
# the lab's pages, where the summaries are (relative to the repository)
RESEARCH_PAGES = "research/pages"
# pages with blocks, the path from each to the repository root (for links) and its blocks
FRONT_PAGES = {"README.md": "", "docs/README.md": "../"}
PAGE_BLOCKS = {"README.md": ("results-short", "shipped-models"), "docs/README.md": ("results", "shipped-models")}
# rows of the results table: (data set, its label, ratio)
ROWS = (
    ("dsb2018", "DSB2018 nuclei 2D (66 validation images)", 0.1),
    ("dsb2018", "DSB2018 nuclei 2D (66 validation images)", 1.0),
    ("gonuclear", "GoNuclear nuclei 3D (mean of both directions)", 0.1),
    ("gonuclear", "GoNuclear nuclei 3D (mean of both directions)", 1.0),
    ("usiigaci", "Usiigaci phase-contrast cells 2D", 0.1),
    ("usiigaci", "Usiigaci phase-contrast cells 2D", 1.0),
    ("isbi2012", "ISBI 2012 EM neurites 2D", 0.1),
    ("isbi2012", "ISBI 2012 EM neurites 2D", 1.0),
    ("plant3d", "plant tissue 3D, no background", 0.1),
    ("plant3d", "plant tissue 3D, no background", 1.0),
)
# columns: (method in the benchmark, header)
COLUMNS = (
    ("spoco", "SPOCO, objects only"),
    ("spoco_scribbles", "SPOCO + background strokes"),
    ("spoco_mask", "SPOCO, foreground mask given"),
    ("stardist", "StarDist"),
    ("classical", "Otsu + watershed"),
    ("classical_membrane", "membrane watershed"),
)
# data whose usual score is a partition score: ARAND shown beside AP50
PARTITION = ("isbi2012", "plant3d")
# methods that do not train within the budget (the budget words leave them out)
UNTRAINED = ("classical", "classical_membrane")
# the README's short table: SPOCO's protocols at this labelled fraction, beside the best of these peers at 100 %
SHORT_RATIO = 0.1
SHORT_COLUMNS = (
    ("spoco", "SPOCO, objects only"),
    ("spoco_scribbles", "+ background strokes"),
    ("spoco_mask", "foreground mask given"),
)
PEERS = (("stardist", "StarDist"), ("classical", "Otsu + watershed"), ("classical_membrane", "membrane watershed"))
# the user page written whole from the summaries and the shipped models' cards
RESULTS_PAGE = "docs/results.md"
# the inference speed benchmark's summary (research/perf/benchmark_inference.py --page), copied into RESULTS_PAGE
SPEED_PAGE = "benchmark_inference"
ANNOTATION_LOOP_PAGE = "annotation_loop"  # research/pages/annotation_loop_<data set>.json


def _block(text: str, name: str, content: str, where: str) -> str:
    begin, end = f"<!-- {name}: begin", f"<!-- {name}: end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"error: {where} has no '{begin} ... -->' ... '{end}' block.")
    head, rest = text.split(begin, 1)
    marker, rest = rest.split("-->", 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}{marker}-->\n{content}\n{end}{tail}"


def _fmt(v: Any, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "–"


# ------------------------------------------------------------------------------------------------ results table


def load_summaries(pages: Path = REPO_ROOT / RESEARCH_PAGES) -> list[dict[str, Any]]:
    """The benchmark summaries of :data:`PAGES`, each with its ``page`` name added."""
    out = []
    for page in PAGES:
        path = pages / f"{page}.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing: regenerate it with the command in {RESEARCH_PAGES}/{page}.md")
        out.append({**json.loads(path.read_text()), "page": page})
    return out


def _cell(rows: Sequence[Mapping[str, Any]], dataset: str) -> str:
    """AP50 of a (data set, method, ratio), the mean over its splits (GoNuclear's two directions), with ARAND where
    that is the usual score."""
    ok = [r for r in rows if r.get("status") == "ok" and isinstance(r.get("ap50"), (int, float))]
    if not ok:
        return "–"
    ap50 = sum(r["ap50"] for r in ok) / len(ok)
    arand = [r["arand"] for r in ok if isinstance(r.get("arand"), (int, float))]
    return _fmt(ap50) + (f" (ARAND {_fmt(sum(arand) / len(arand))})" if dataset in PARTITION and arand else "")


def _current(summaries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The summaries' rows, each with its ``page``; a (data set, method, ratio) on two pages from the later page only
    (which re-measured it)."""

    def key(r: Mapping[str, Any]) -> tuple:
        return r.get("dataset"), r.get("method"), r.get("ratio")

    newest = {key(r): s["page"] for s in summaries for r in s["rows"]}
    return [dict(r, page=s["page"]) for s in summaries for r in s["rows"] if newest[key(r)] == s["page"]]


def _at(rows: Sequence[Mapping[str, Any]], dataset: str, ratio: float) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("dataset") == dataset and abs(float(r.get("ratio", -1)) - ratio) < 1e-9]


def _budgets(rows: Sequence[Mapping[str, Any]]) -> tuple[str, list[str]]:
    """The learners' training budgets (budget, clock, threads, device) in words, and their machines."""
    learned = [r for r in rows if r.get("method") not in UNTRAINED and r.get("status") == "ok"]
    budgets = sorted({(r.get("budget_s"), r.get("clock"), r.get("threads"), r.get("device")) for r in learned}, key=str)
    machines = sorted({str(r.get("machine")) for r in learned if r.get("machine")})
    how = "; ".join(
        f"{b:g} s of {'process CPU' if clock == 'cpu' else 'wall'} time, {threads} thread{'s' * (threads != 1)}, "
        f"device {device}"
        for b, clock, threads, device in budgets
        if b is not None
    )
    return how, machines


def _page_links(summaries: Sequence[Mapping[str, Any]], root_link: str) -> str:
    return ", ".join(
        f"[{RESEARCH_PAGES}/{s['page']}.md]({root_link}{RESEARCH_PAGES}/{s['page']}.md)" for s in summaries
    )


def results_table(summaries: Sequence[Mapping[str, Any]], root_link: str = "") -> str:
    """The full results table (the model card, docs/results.md): AP50 per data set, labelled fraction and method,
    from the summaries; ``root_link``: the path from the page to the repository root."""
    rows = _current(summaries)
    how, machines = _budgets(rows)
    header = "| data (held-out images) | labelled | " + " | ".join(h for _, h in COLUMNS) + " |"
    lines = [header, "|---|---|" + "---|" * len(COLUMNS)]
    for dataset, label, ratio in ROWS:
        here = _at(rows, dataset, ratio)
        if not here:
            continue
        cells = [_cell([r for r in here if r.get("method") == m], dataset) for m, _ in COLUMNS]
        lines.append(f"| {label} | {ratio * 100:g} % | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"AP50 on held-out images (ARAND, lower is better, where it is the usual score); every learner trained for "
        f"the same budget per run ({how}; {' / '.join(machines)}) on the same kept objects; – = not run. Written by "
        f"`scripts/sync_docs.py` from the benchmark's summaries (a run on two pages: the later one's, which "
        f"re-measured it); full tables, commands and machine load: {_page_links(summaries, root_link)}.",
    ]
    return "\n".join(lines)


def _best_peer(rows: Sequence[Mapping[str, Any]], dataset: str) -> str:
    """The peer with the highest AP50 on ``rows`` (one data set and ratio): its name and figure, "–" for none."""
    best = None
    for method, name in PEERS:
        ok = [r for r in rows if r.get("method") == method and r.get("status") == "ok"]
        ok = [r for r in ok if isinstance(r.get("ap50"), (int, float))]
        if ok and (best is None or sum(r["ap50"] for r in ok) / len(ok) > best[0]):
            best = (sum(r["ap50"] for r in ok) / len(ok), name, ok)
    return "–" if best is None else f"{best[1]} {_cell(best[2], dataset)}"


def short_table(summaries: Sequence[Mapping[str, Any]], root_link: str = "") -> str:
    """The README's short results table: one row per data set at 10 % labelled, SPOCO's three protocols beside the
    best peer trained on every object (100 %); ``root_link``: the path from the page to the repository root."""
    rows = _current(summaries)
    header = (
        "| data (held-out images), 10 % of the objects labelled | "
        + " | ".join(h for _, h in SHORT_COLUMNS)
        + " | best peer, 100 % labelled |"
    )
    lines = [header, "|---|" + "---|" * (len(SHORT_COLUMNS) + 1)]
    for dataset, label in dict((d, label) for d, label, _ in ROWS).items():
        sparse, dense = _at(rows, dataset, SHORT_RATIO), _at(rows, dataset, 1.0)
        if not sparse and not dense:
            continue
        cells = [_cell([r for r in sparse if r.get("method") == m], dataset) for m, _ in SHORT_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_best_peer(dense, dataset)} |")
    lines += [
        "",
        "AP50 on held-out images (ARAND, lower is better, where it is the usual score); peers (StarDist, Otsu + "
        "watershed, membrane watershed) trained for the same budget; – = not run. The full table (every method at "
        f"10 % and 100 %), the shipped models and how all of it was measured: [docs/results.md]({root_link}"
        f"{RESULTS_PAGE}).",
    ]
    return "\n".join(lines)


def load_speed(pages: Path = REPO_ROOT / RESEARCH_PAGES) -> dict[str, Any] | None:
    """The inference speed benchmark's summary, None before it has run."""
    path = pages / f"{SPEED_PAGE}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def speed_section(speed: Mapping[str, Any] | None) -> list[str]:
    """The results page's speed section: the benchmark's table as it wrote it, with its machine and command."""
    if not speed:
        return []
    return [
        "## Speed",
        "",
        "Inference with the shipped models and `configs/inference.json`'s defaults, end to end (reading, network, "
        "post-processing; `spoco segment`: the whole command, writing included), beside a plain MONAI "
        "`SlidingWindowInferer` pass of the same network over the same inputs (x plain pass: time / its time). "
        "AP50 per image, averaged over images; labels vs defaults / float32: a row's labels scored against the "
        "defaults' chain and the float32 chain's (AP50: 1 = the same objects). "
        f"{speed['setup']} How it works: "
        f"[research/pages/{SPEED_PAGE}.md](../research/pages/{SPEED_PAGE}.md).",
        "",
        speed["table"],
        "",
    ]


def annotation_loop_pages(pages: Path = REPO_ROOT / RESEARCH_PAGES) -> list[Path]:
    """The simulated annotator's summaries (``research/annotation_loop.py --docs``), one per data set."""
    return sorted(pages.glob(f"{ANNOTATION_LOOP_PAGE}_*.json"))


def load_annotation_loops(pages: Path = REPO_ROOT / RESEARCH_PAGES) -> list[dict[str, Any]]:
    """The contents of :func:`annotation_loop_pages`."""
    return [json.loads(p.read_text()) for p in annotation_loop_pages(pages)]


def _verdict(arm: str, v: Mapping[str, Any]) -> str:
    share = v.get("share_to_reach_random")
    reach = f"reaches it with {share:.0%} of the added objects" if share is not None else "never reaches it"
    return f"`{arm}` {v['ahead_of_random']:+.3f} AP50 against random after the last round, and {reach}"


def annotation_loop_section(loops: Sequence[Mapping[str, Any]]) -> list[str]:
    """The results page's section on ``spoco suggest``: does annotating the suggested objects train better than
    annotating as many random ones? Each data set's table, the goal's two tests, setup and command."""
    if not loops:
        return []
    lines = [
        "## What to outline next: suggestions against random objects",
        "",
        "A simulated annotator, dense labels as the oracle, on training images only "
        "([research/annotation_loop.py](../research/annotation_loop.py)): round 0 trains on a few objects, each "
        "round adds as many objects again, either those `spoco suggest` ranks first with the previous model "
        "(`suggest`: a suggestion matching no true object painted as background; `suggest_objects`: objects only) "
        "or random ones, and fine-tunes the previous model for the same budget. AP50 (pooled) on held-back training "
        "images. The goal: at equal annotated counts, suggestions ahead of random by at least 0.03 after the last "
        "round, or at random's final score with at most 60 % of the added objects.",
        "",
    ]
    for loop in loops:
        verdicts = "; ".join(_verdict(a, v) for a, v in loop.get("verdicts", {}).items())
        lines += [f"**{loop['dataset']}**: {loop['setup']}", "", loop["table"], "", f"{verdicts}.", ""]
        lines += ["```bash", loop["command"], "```", ""]
    return lines


def results_page(
    summaries: Sequence[Mapping[str, Any]],
    cards: Mapping[str, Mapping[str, Any]],
    speed: Mapping[str, Any] | None = None,
    loops: Sequence[Mapping[str, Any]] = (),
) -> str:
    """``docs/results.md``, whole: what is measured, the full results table, the shipped models, inference speed and
    how they were measured (budgets, machines, the pages and the commands that wrote them)."""
    rows = _current(summaries)
    how, machines = _budgets(rows)
    commands = [s["command"] for s in summaries if s.get("command")]
    lines = [
        "# Results: the bundle on real microscopy",
        "",
        "<!-- Written by scripts/sync_docs.py from research/pages/*.json and models/*/model.json; do not edit by hand:",
        "     run .venv/bin/python scripts/sync_docs.py -->",
        "",
        "What is measured: **AP50** (a predicted object matches a true one at IoU 0.5; TP / (TP + FP + FN), counted "
        "over all test images) on **held-out images** with every object labelled, never seen in training; for EM "
        "neurites and tissue, where a partition score is the usual one, ARAND (lower is better) beside it. "
        "**Sparse labels**: 10 % of the objects of each training image annotated (chosen by a fixed hash of the "
        "file name and object id), everything else unlabeled; 100 %: every object. SPOCO is this bundle with its "
        "defaults (and the documented settings for cells, EM and tissue, [data_kinds.md](data_kinds.md)), trained "
        "from the annotated objects only, with a few background strokes added (simulated in the true background, as "
        "`--background_label` strokes), and, as a reference, clustered inside the true foreground mask. The **peers** "
        "(StarDist trained from scratch, Otsu + watershed, a membrane watershed) are trained on the same labelled "
        "objects for the same budget; objects not kept are background to them.",
        "",
        "## Accuracy",
        "",
        results_table(summaries, "../"),
        "",
        "## Shipped models",
        "",
        "Trained with every object labelled, scored with `configs/inference.json`'s defaults (`--model <name>`):",
        "",
        shipped_table(cards),
        "",
        *speed_section(speed),
        *annotation_loop_section(loops),
        "## How these were measured",
        "",
        f"Every learner trained for the same budget per run ({how}) on {' / '.join(machines)}; prediction and "
        "clustering are outside the budget, and the classical baselines choose their parameters on the training "
        "images' kept objects. Each figure is the mean over a data set's splits (GoNuclear: both directions). The "
        f"runs, with their commits, machine load and every other score, are on the lab's pages "
        f"{_page_links(summaries, '../')}; what they show: [research/findings.md](../research/findings.md); how the "
        "benchmark works: [research/README.md](../research/README.md). Each page states the command of its grid, "
        "which measures the runs again (hours on 2 cores; every run is cached under `eval/`, so a grid can run in "
        "pieces; `bash research/setup_benchmark.sh` first, for StarDist). From the cached runs, these commands "
        "rewrite the pages and their summaries, then this page, the README's table and the model card's:",
        "",
        "```bash",
        *commands,
        ".venv/bin/python scripts/sync_docs.py",
        "```",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ shipped models


def shipped_cards(models: Path = REPO_ROOT / "models") -> dict[str, dict[str, Any]]:
    """The cards of the shipped models, ``models/<name>/model.json``, by name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(models.glob("*/model.json"))}


def shipped_table(cards: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [
        "| `--model` | what | AP50 / mAP on held-out images (default inference) | training |",
        "|---|---|---|---|",
    ]
    for name, card in cards.items():
        sc = (card.get("scores") or {}).get("default_inference", {})
        tr = card.get("training", {})
        machine = tr.get("machine", {})
        score_cell = f"{sc['ap50']:.3f} / {sc['map']:.3f} ({sc['images']})" if sc else "not scored"
        if tr.get("device", "cpu") != "cpu":  # a GPU run's budget is wall time
            spent = f"{tr.get('train_wall_s', 0):.0f} s wall on one {machine.get('cuda') or 'GPU'}"
        else:
            spent = f"{tr.get('train_cpu_s', 0):.0f} CPU-s on {machine.get('nproc')} {machine.get('cpu', 'CPU')} cores"
        train_cell = f"{tr.get('iterations')} iterations, {spent}: `{tr.get('command')}`"
        lines.append(f"| `{name}` | {card.get('description', '')} | {score_cell} | {train_cell} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ files


def planned(root: Path = REPO_ROOT) -> dict[Path, str]:
    """Every file this script owns a part of, with the text it should have."""
    cards = shipped_cards(root / "models")
    summaries = load_summaries(root / RESEARCH_PAGES)
    blocks: dict[str, Callable[[str], str]] = {
        "results": lambda link: results_table(summaries, link),
        "results-short": lambda link: short_table(summaries, link),
        "shipped-models": lambda link: shipped_table(cards),
    }
    out: dict[Path, str] = {}
    for rel, link in FRONT_PAGES.items():
        path = root / rel
        text = path.read_text()
        for name in PAGE_BLOCKS[rel]:
            text = _block(text, name, blocks[name](link), rel)
        out[path] = text
    out[root / RESULTS_PAGE] = results_page(
        summaries, cards, load_speed(root / RESEARCH_PAGES), load_annotation_loops(root / RESEARCH_PAGES)
    )
    # metadata.json keeps its hand-kept layout: only the eval_metrics line is written (as one line)
    meta_path = root / "metadata.json"
    metrics = json.dumps({name: eval_metrics(card) for name, card in cards.items()})
    text, n = re.subn(r'^(\s*"eval_metrics": ).*?,$', lambda m: m.group(1) + metrics + ",", meta_path.read_text(),
                      count=1, flags=re.M)  # fmt: skip
    if n != 1:
        raise SystemExit(f'error: {meta_path} has no one-line "eval_metrics" entry to write.')
    out[meta_path] = text
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only list the files that are out of date (exit 1 if any)")
    args = p.parse_args(argv)
    plan = planned()
    stale = [path for path, text in plan.items() if not path.is_file() or path.read_text() != text]
    for path in stale:
        rel = path.relative_to(REPO_ROOT)
        print(f"{rel}: out of date" if args.check else f"wrote {rel}")
        if not args.check:
            path.write_text(plan[path])
    if args.check and stale:
        print("run: .venv/bin/python scripts/sync_docs.py")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
