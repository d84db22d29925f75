#!/usr/bin/env bash
# Set up .venv (with test extras) and run the test suite. Arguments are passed on to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh test
exec "$root/.venv/bin/python" -m pytest tests "$@"
