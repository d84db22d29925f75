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
    for rel in [*sync_docs.FRONT_PAGES, "metadata.json"] + [
        f"{sync_docs.RESEARCH_PAGES}/{p}.json" for p in sync_docs.PAGES
    ]:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp / rel)
    shutil.copytree(ROOT / "models", tmp / "models", ignore=shutil.ignore_patterns("*.pt", "*.ts"))
    return tmp


def test_hand_edits_and_new_measurements_are_caught(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    assert all(path.read_text() == text for path, text in sync_docs.planned(root).items())
    # a figure typed into the README's results block is overwritten by the summary's
    readme = root / "README.md"
    text = readme.read_text()
    block = text.split("<!-- results: begin")[1].split("<!-- results: end -->")[0]
    readme.write_text(text.replace(block, block.replace("| 0.", "| 9.", 1)))
    assert sync_docs.planned(root)[readme] == text
    # a new score in a shipped model's card reaches the tables and metadata.json's eval_metrics
    card_path = sorted((root / "models").glob("*/model.json"))[0]
    card = json.loads(card_path.read_text())
    card["scores"]["default_inference"]["ap50"] = 0.987654
    card_path.write_text(json.dumps(card))
    plan = sync_docs.planned(root)
    assert "0.988 / " in plan[readme] and "0.988 / " in plan[root / "docs" / "README.md"]
    meta = json.loads(plan[root / "metadata.json"])
    assert meta["eval_metrics"][card_path.parent.name]["ap50"] == 0.988


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
