#!/usr/bin/env bash
# End-to-end demo on built-in synthetic data: set up .venv, generate synthetic 3D nuclei volumes, train SPOCO
# on CPU with labels thinned to 10 % of the objects, segment the held-back volumes, print metrics and write a
# preview PNG. Training: 4 epochs of 50 iterations, validated after each (200 iterations, about what 35 passes over
# the 6 volumes were before epochs had a fixed length). Extra arguments go to the training command (e.g.
# `bash scripts/demo.sh --epochs 10` for 500 iterations).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
py="$root/.venv/bin/python"
data="$root/data/synthetic3d"
out="$root/eval/synthetic3d"

echo "[demo] 1/4 synthetic data -> $data"
"$py" -m spoco_bundle.synthetic --out_dir "$data"

echo "[demo] 2/4 training with 10 % of the objects labelled -> $root/models/model.pt"
"$root/.venv/bin/spoco" train "$data" --instance_ratio 0.1 --epochs 4 --epoch_length 50 --val_interval 1 "$@"

echo "[demo] 3/4 segmenting the held-back volumes -> $out"
"$root/.venv/bin/spoco" segment "$data/imagesTs" "$out"

echo "[demo] 4/4 scores against the dense ground truth"
"$py" -m spoco_bundle.report --images "$data/imagesTs" --labels "$data/labelsTs" --predictions "$out"
