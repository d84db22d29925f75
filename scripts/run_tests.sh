#!/usr/bin/env bash
# Set up .venv (with test and lint extras), check the code style (scripts/lint.sh: black, isort, flake8 at 120, the
# model zoo's rule) and run the test suite (tests/, and research/tests/: the lab's harness). Arguments are passed on
# to pytest.
# Then the MONAI Label tests (tests/test_monailabel_{tasks,server}.py, skipped in .venv) run in .venv-monailabel
# (scripts/setup_monailabel.sh), without network access where this machine allows a private network namespace.
# SPOCO_MONAILABEL_TESTS=0 leaves that second part out (quick local runs).
# The napari plugin's viewer tests need a display: without one, the suite runs under a virtual X server (xvfb-run,
# set up by scripts/setup_display.sh); where that cannot be set up they are skipped, and the run says so at its end.
# --fast (first argument): the everyday tier only: unit tests and one tiny end-to-end training, no tests marked
# slow, packaging, distributed, monailabel or benchmark (markers in pyproject.toml, tiers in docs/development.md).
# Without it (CI, .ci/run) everything runs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
fast=0
if [ "${1:-}" = "--fast" ]; then
    fast=1
    shift
fi
bash scripts/setup_env.sh test,test-gui,lint,napari,openvino
export MPLBACKEND="${MPLBACKEND:-Agg}"  # under the virtual display matplotlib would pick Qt
status=0
display=()
no_display=""
if [ -z "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
    if out="$(bash scripts/setup_display.sh 2>&1)"; then
        display=(xvfb-run -a -s "-screen 0 1280x1024x24")
    else
        no_display="$out"
    fi
    [ -z "$out" ] || echo "$out"
fi
say_display() {
    [ -z "$no_display" ] || echo "[run_tests] the napari viewer tests (tests/test_napari.py) were NOT run: no display ($no_display)"
}
bash scripts/lint.sh || status=$?
if [ "$fast" = 1 ]; then
    "${display[@]}" "$root/.venv/bin/python" -m pytest tests research/tests \
        -m "not (slow or packaging or distributed or monailabel or benchmark)" "$@" || status=$?
    say_display
    exit "$status"
fi
"${display[@]}" "$root/.venv/bin/python" -m pytest tests research/tests "$@" || status=$?
say_display
if [ "${SPOCO_MONAILABEL_TESTS:-1}" != 0 ]; then
    bash scripts/setup_monailabel.sh
    ml_tests=(tests/test_monailabel_tasks.py tests/test_monailabel_server.py)
    echo "[run_tests] MONAI Label tests in .venv-monailabel: ${ml_tests[*]}"
    ml_status=0
    if command -v unshare >/dev/null && command -v ip >/dev/null && unshare -n true 2>/dev/null; then
        # a new network namespace with only loopback: the server must work with no network at all
        SPOCO_OFFLINE=1 unshare -n sh -c 'ip link set lo up && exec "$@"' sh \
            "$root/.venv-monailabel/bin/python" -m pytest "${ml_tests[@]}" "$@" || ml_status=$?
    else
        echo "[run_tests] (no private network namespace here: running them with the machine's network)"
        "$root/.venv-monailabel/bin/python" -m pytest "${ml_tests[@]}" "$@" || ml_status=$?
    fi
    [ "$status" -ne 0 ] || status=$ml_status
fi
exit "$status"
