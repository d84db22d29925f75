#!/usr/bin/env bash
# A virtual display for the napari plugin's viewer tests (tests/test_napari.py): Xvfb with `xvfb-run`, and the X
# libraries Qt's xcb platform loads (Qt's `offscreen` platform gives napari's vispy canvas no OpenGL context). Installs
# what is missing with apt-get where this runs as root; else says what to install. Exit 0: `xvfb-run` is ready.
set -euo pipefail
packages=(xvfb xauth libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0
    libxcb-xkb1 libxkbcommon-x11-0 libxcb-shape0 libxcb-cursor0 libgl1 libegl1 libfontconfig1 libdbus-1-3)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "[setup_display] installing ${missing[*]} (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${missing[@]}" >/dev/null; } \
            || { echo "[setup_display] apt-get could not install: ${missing[*]}"; exit 1; }
    else
        echo "[setup_display] missing Debian packages: ${missing[*]} (as root: apt-get install ${missing[*]})"
        exit 1
    fi
fi
command -v xvfb-run >/dev/null || { echo "[setup_display] no xvfb-run after installing xvfb"; exit 1; }
