"""One source for every number: the front pages' measured figures are what ``scripts/sync_docs.py`` copies from
the benchmark summaries and the shipped models' cards; a number typed by hand into a generated block is caught."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from scripts import sync_docs

ROOT = Path(__file__).resolve().parents[1]


def test_front_pages_are_in_sync_with_their_sources(capsys) -> None:
    assert sync_docs.main(["--check"]) == 0, capsys.readouterr().out


def _copy(tmp: Path) -> Path:
    summaries = [f"{sync_docs.RESEARCH_PAGES}/{p}.json" for p in (*sync_docs.PAGES, sync_docs.SPEED_PAGE)]
    summaries += [
        p.relative_to(ROOT).as_posix() for p in sync_docs.annotation_loop_pages(ROOT / sync_docs.RESEARCH_PAGES)
    ]
    for rel in [*sync_docs.FRONT_PAGES, sync_docs.RESULTS_PAGE, "metadata.json", *summaries]:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp / rel)
    shutil.copytree(ROOT / "models", tmp / "models", ignore=shutil.ignore_patterns("*.pt", "*.ts"))
    return tmp


def _block(text: str, name: str) -> str:
    return text.split(f"<!-- {name}: begin")[1].split(f"<!-- {name}: end -->")[0]


def test_hand_edits_and_new_measurements_are_caught(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    assert all(path.read_text() == text for path, text in sync_docs.planned(root).items())
    # a figure typed into the README's short results block, or anywhere into docs/results.md (written whole), is
    # overwritten by the summary's
    readme, card, results = root / "README.md", root / "docs" / "README.md", root / sync_docs.RESULTS_PAGE
    text = readme.read_text()
    block = _block(text, "results-short")
    readme.write_text(text.replace(block, block.replace("| 0.", "| 9.", 1)))
    assert sync_docs.planned(root)[readme] == text
    page = results.read_text()
    results.write_text(page.replace("| 0.", "| 9.", 1).replace("What is measured", "What we measured"))
    assert sync_docs.planned(root)[results] == page
    results.unlink()  # a missing page is written again (and --check would list it)
    assert sync_docs.planned(root)[results] == page
    # a new measurement in a benchmark summary reaches the short table, the model card's table and docs/results.md
    summary_path = root / sync_docs.RESEARCH_PAGES / "benchmarks_protocols.json"
    summary = json.loads(summary_path.read_text())
    row = next(r for r in summary["rows"] if (r["dataset"], r["method"], r["ratio"]) == ("dsb2018", "spoco", 0.1))
    row["ap50"] = 0.987654
    summary_path.write_text(json.dumps(summary))
    plan = sync_docs.planned(root)
    dsb = next(line for line in _block(plan[readme], "results-short").splitlines() if line.startswith("| DSB2018"))
    assert dsb.split(" | ")[1] == "0.99"
    for path in (card, results):
        assert "| DSB2018 nuclei 2D (66 validation images) | 10 % | 0.99 |" in plan[path]
    # a new score in a shipped model's card reaches the tables and metadata.json's eval_metrics
    card_path = sorted((root / "models").glob("*/model.json"))[0]
    model = json.loads(card_path.read_text())
    model["scores"]["default_inference"]["ap50"] = 0.987654
    card_path.write_text(json.dumps(model))
    plan = sync_docs.planned(root)
    assert all("0.988 / " in plan[path] for path in (readme, card, results))
    meta = json.loads(plan[root / "metadata.json"])
    assert meta["eval_metrics"][card_path.parent.name]["ap50"] == 0.988


def test_results_page_states_what_was_measured_and_how() -> None:
    """docs/results.md is written whole from the summaries: the budget, clock, threads, device and machine of the
    runs, links to the lab's pages and the commands that regenerate them."""
    summaries = sync_docs.load_summaries()
    page = sync_docs.results_page(summaries, sync_docs.shipped_cards())
    assert "10 % of the objects of each training image annotated" in page and "held-out images" in page
    for s in summaries:
        assert f"](../research/pages/{s['page']}.md)" in page and s["command"] in page
    assert "900 s of process CPU time, 1 thread, device cpu" in page and "AMD EPYC, 2 cores" in page
    assert "## Shipped models" in page and "`nuclei2d`" in page
    assert page.rstrip().endswith("```") and ".venv/bin/python scripts/sync_docs.py" in page


def test_short_table_sets_spoco_beside_the_best_peer_with_all_labels() -> None:
    def row(dataset: str, method: str, ratio: float, ap50: float, **extra) -> dict:
        return {"dataset": dataset, "method": method, "ratio": ratio, "status": "ok", "ap50": ap50, **extra}

    rows = [row("dsb2018", "spoco", 0.1, 0.7), row("dsb2018", "spoco_mask", 0.1, 0.9)]
    rows += [row("dsb2018", "stardist", 1.0, 0.75), row("dsb2018", "classical", 1.0, 0.71)]
    rows += [row("dsb2018", "stardist", 0.1, 0.99)]  # a peer at 10 %: not the reference
    rows += [row("plant3d", "spoco", 0.1, 0.27, arand=0.32), row("plant3d", "classical_membrane", 1.0, 0.23, arand=0.3)]
    rows += [row("plant3d", "classical", 1.0, 0.0, arand=0.9), row("plant3d", "spoco", 1.0, 0.39)]  # SPOCO: no peer
    table = sync_docs.short_table([{"page": "p", "rows": rows}])
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert lines["| DSB2018 nuclei 2D (66 validation images)"].endswith("| 0.70 | – | 0.90 | StarDist 0.75 |")
    assert lines["| plant tissue 3D, no background"].endswith(
        "| 0.27 (ARAND 0.32) | – | – | membrane watershed 0.23 (ARAND 0.30) |"
    )
    assert not any(line.startswith("| GoNuclear") for line in lines.values())  # no runs, no row
    assert "[docs/results.md](docs/results.md)" in table


def test_a_later_page_replaces_an_earlier_pages_figures_for_its_runs() -> None:
    def row(dataset: str, ap50: float, method: str = "spoco") -> dict:
        return {"dataset": dataset, "method": method, "ratio": 0.1, "status": "ok", "ap50": ap50, "arand": 0.5}

    old = {"page": "old", "rows": [row("plant3d", 0.111), row("isbi2012", 0.222), row("plant3d", 0.444, "stardist")]}
    new = {"page": "new", "rows": [row("plant3d", 0.333)]}
    table = sync_docs.results_table([old, new])
    plant = next(line for line in table.splitlines() if line.startswith("| plant tissue"))
    assert "0.33" in plant and "0.11" not in plant  # not the mean of both pages (0.22)
    assert "0.44" in plant  # a method only the earlier page ran keeps its figure
    assert "0.22" in next(line for line in table.splitlines() if line.startswith("| ISBI"))


def test_results_page_copies_the_speed_benchmarks_table_with_its_machine_and_command() -> None:
    speed = sync_docs.load_speed()
    assert speed is not None, "research/pages/benchmark_inference.json is missing: run the speed benchmark --page"
    page = sync_docs.results_page(sync_docs.load_summaries(), sync_docs.shipped_cards(), speed)
    assert "## Speed" in page and speed["table"] in page and speed["command"] in page and "no GPU" in page
    assert "](../research/pages/benchmark_inference.md)" in page
    assert "## Speed" not in sync_docs.results_page(sync_docs.load_summaries(), sync_docs.shipped_cards(), None)


def test_results_page_copies_each_annotation_loop_with_its_verdict_and_command() -> None:
    loops = sync_docs.load_annotation_loops()
    assert loops, "research/pages/annotation_loop_*.json are missing: run research/annotation_loop.py --docs"
    page = sync_docs.results_page(sync_docs.load_summaries(), sync_docs.shipped_cards(), None, loops)
    for loop in loops:
        assert loop["table"] in page and loop["command"] in page and loop["setup"] in page
        for arm in loop["verdicts"]:
            assert f"`{arm}` " in page
