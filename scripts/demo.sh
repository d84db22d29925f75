#!/usr/bin/env bash
# End-to-end demo on built-in synthetic data: set up .venv, generate synthetic 3D nuclei volumes, train SPOCO
# on CPU with labels thinned to 10 % of the objects, write models/model.pt. Extra arguments are passed on to
# `monai.bundle run` (e.g. `bash scripts/demo.sh --epochs 5`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
py="$root/.venv/bin/python"
data="$root/data/synthetic3d"

echo "[demo] 1/2 synthetic data -> $data"
"$py" -m spoco_bundle.synthetic --out_dir "$data"

echo "[demo] 2/2 training (10 % of the objects labelled) -> $root/models/model.pt"
"$py" -m monai.bundle run training \
    --config_file configs/train.json --meta_file metadata.json --logging_file configs/logging.conf \
    --bundle_root "$root" --dataset_dir "$data" --instance_ratio 0.1 "$@"
echo "[demo] done: weights in $root/models/model.pt, log above"
