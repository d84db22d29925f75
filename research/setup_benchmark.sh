#!/usr/bin/env bash
# Set up what the accuracy benchmark (python -m research.accuracy) needs beyond the project:
#   .venv        the project with its test extras (scripts/setup_env.sh): SPOCO, the classical baseline, scoring;
#   .venv-bench  StarDist + TensorFlow CPU (research/requirements.txt), a separate environment because TensorFlow
#                in .venv would be imported by every `import monai`. The StarDist peer runs there as a subprocess.
# Neither is a project dependency: without .venv-bench the benchmark reports StarDist as "not run".
# Re-running is cheap (a stamp records what was installed). Usage: bash research/setup_benchmark.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh" test
venv="$root/.venv-bench"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment $venv"
    "$py" -m venv "$venv"
fi
stamp="$venv/.spoco-benchmark-installed"
want="$(cat "$root/requirements/constraints.txt" "$root/research/requirements.txt" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "[setup] installing the StarDist peer (research/requirements.txt) into $venv"
# the project's pins minus TensorBoard's: TensorFlow 2.15 brings its own tensorboard 2.15 and needs protobuf < 5
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
grep -v -i -E '^(tensorboard|tensorboard-data-server|protobuf)==' "$root/requirements/constraints.txt" >"$constraints"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -c "$constraints" -r "$root/research/requirements.txt"
echo "$want" > "$stamp"
