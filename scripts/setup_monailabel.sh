#!/usr/bin/env bash
# Create (or reuse) .venv-monailabel at the repository root: MONAI Label 0.8.5 beside this bundle (installed
# editable, with test extras), pinned by requirements/monailabel.txt + requirements/constraints.txt (minus its torch
# line). A separate environment because monailabel needs torchvision, and no torchvision loads beside the main
# .venv's CPU torch 2.13.0 (see docs/monailabel.md). About 5.5 GB (torch 2.14.1 is a CUDA build; it runs on CPU).
# Re-running is cheap: it reinstalls only when the pins, pyproject.toml or this script changed.
# Usage: bash scripts/setup_monailabel.sh   (then: source .venv-monailabel/bin/activate; monailabel --help)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-monailabel"

# torch 2.14.1 / torchvision 0.29.1 are provided for CPython 3.11 here
py="${PYTHON311:-}"
if [ -z "$py" ]; then
    for cand in python3.11 python3; do
        if command -v "$cand" >/dev/null && [ "$("$cand" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" = True ]; then
            py="$cand"
            break
        fi
    done
fi
if [ -z "$py" ]; then
    echo "[setup_monailabel] needs Python 3.11 (python3.11 on PATH, or PYTHON311=/path/to/python3.11)" >&2
    exit 1
fi

stamp="$venv/.spoco-monailabel-installed"
want="$(cat "$root/pyproject.toml" "$root/requirements/constraints.txt" "$root/requirements/monailabel.txt" \
    "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup_monailabel] creating virtual environment $venv"
    "$py" -m venv "$venv"
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
# the pins of requirements/monailabel.txt win over .venv's (torch, and packages both environments use, e.g. pydantic)
awk -F'==' 'NR == FNR { if ($0 ~ /==/) own[tolower($1)] = 1; next }
    !($0 ~ /==/) || !(tolower($1) in own)' "$root/requirements/monailabel.txt" "$root/requirements/constraints.txt" \
    >"$constraints"
cat "$root/requirements/monailabel.txt" >>"$constraints"

echo "[setup_monailabel] installing monailabel 0.8.5, torch 2.14.1 + torchvision 0.29.1 and spoco_bundle[test] into $venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# monailabel's own requirement list includes sam2 (built from source, pulls a second torch): install it without
# dependencies, then its dependencies minus sam2 and minus monai extras it does not use here (mlflow: experiment
# tracking, tensorboard: DeepEdit handlers, openslide: pathology, lmdb/gdown: datasets)
"${pip[@]}" -c "$constraints" --no-deps monailabel
"${pip[@]}" -c "$constraints" \
    torch torchvision "monai[fire,ignite,itk,nibabel,pillow,psutil,skimage,tqdm]" \
    uvicorn pydantic pydantic-settings python-dotenv fastapi python-multipart httpx schedule "dicomweb-client[gcp]" \
    timeloop expiringdict expiring_dict cachetools watchdog pydicom pydicom-seg pynetdicom pynrrd numpymaxflow \
    girder-client ninja einops pyyaml filelock passlib pyjwt bcrypt shapely requests requests-toolbelt urllib3 \
    scikit-learn scipy google-auth \
    -e "$root[test]"
"$venv/bin/python" -c "import torchvision, monailabel.tasks.infer.bundle" 2>/dev/null \
    || { echo "[setup_monailabel] the environment does not import monailabel/torchvision" >&2; exit 1; }
echo "$want" >"$stamp"
echo "[setup_monailabel] done: source $venv/bin/activate"
