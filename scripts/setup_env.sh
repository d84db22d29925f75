#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv at the repository root and install the project into it with its
# optional features (the extras of pyproject.toml: `cluster`, a dask.distributed scheduler for large volumes), pinned
# by requirements/constraints.txt (torch included). Re-running is cheap: it reinstalls only when pyproject.toml or the
# constraints changed. Usage: `bash scripts/setup_env.sh [more extras, e.g. test,lint]`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="cluster${1:+,$1}"
venv="$root/.venv"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment $venv"
    "$py" -m venv "$venv"
fi
stamp="$venv/.spoco-installed${extras:+-$extras}"
want="$(cat "$root/pyproject.toml" "$root/requirements/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "[setup] installing spoco_bundle${extras:+[$extras]} into $venv (pinned by requirements/constraints.txt)"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -c "$root/requirements/constraints.txt" -e "$root${extras:+[$extras]}"
echo "$want" > "$stamp"
