#!/usr/bin/env bash
# The model zoo's code style: black, isort (profile black) and flake8, all at line length 120 (settings in
# pyproject.toml and .flake8), and the package's layers (import-linter contracts in pyproject.toml: no import circle,
# apps over workflow over transforms / post-processing / losses over the core, never the lab). `bash scripts/lint.sh`
# checks; `bash scripts/lint.sh --fix` runs isort and black on the files first. Uses .venv with the `lint` extra
# (scripts/setup_env.sh test,lint installs it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin="$root/.venv/bin"
paths=(spoco_bundle tests scripts research)
if [ "${1:-}" = "--fix" ]; then
    "$bin/isort" -q "${paths[@]}"
    "$bin/black" -q "${paths[@]}"
fi
status=0
if ! out="$("$bin/black" --check "${paths[@]}" 2>&1)"; then
    echo "$out" | grep "^would reformat" || echo "$out"
    echo "[lint] black: run bash scripts/lint.sh --fix"
    status=1
fi
"$bin/isort" --check-only -q "${paths[@]}" || { echo "[lint] isort: run bash scripts/lint.sh --fix"; status=1; }
"$bin/flake8" "${paths[@]}" || { echo "[lint] flake8: fix the lines above"; status=1; }
if ! out="$("$bin/lint-imports" --no-cache 2>&1)"; then
    echo "$out" | sed -n '/Broken contracts/,$p'
    echo "[lint] import-linter: a module imports across the layers of pyproject.toml [tool.importlinter]"
    status=1
fi
[ "$status" -ne 0 ] || echo "[lint] black, isort, flake8 (line length 120), import layers: clean"
exit "$status"
