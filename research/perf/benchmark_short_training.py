"""
Short-training check: does a training run of a few iterations from random weights already find objects?

MONAI Label users train for a couple of epochs on their first few annotated volumes and look at the result, so a
default that needs hundreds of iterations before it segments anything is a bad default even when it wins the
long-run benchmark. This script trains the bundle (``configs/train.json`` through ``python -m monai.bundle run``,
as a user runs it) from random weights on 2 small synthetic 3D volumes with a third of their objects labelled,
for each foreground weight / warm-up setting and epoch count, segments a held-back volume with
``configs/inference.json`` and prints a table (objects found vs true, AP50).

    .venv/bin/python -m research.perf.benchmark_short_training [--settings 20:0,100:0,300:0,300:300] [--epochs 2,25]
        [--out_dir eval/short_training] [--threads 1]

A setting ``W:N`` is ``loss#foreground_weight`` W with ``foreground_warmup_iterations`` N (0: no warm-up).
One epoch is 2 iterations here (``--epoch_length 2``: one pass over the 2 volumes, batch of 2 patches from one
volume, as an epoch was before ``epoch_length`` existed, so earlier results stay comparable). Results are written to
``<out_dir>/results.json``. CPU only; ~0.5-1.5 min per run on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere: this repository's spoco_bundle
    sys.path.insert(0, str(REPO_ROOT))
SHAPE = (32, 64, 48)  # the size of the MONAI Label test's volumes
RATIO = 0.33  # about a third of the objects labelled, as in tests/test_monailabel_server.py
EPOCH_LENGTH = 2  # iterations per epoch: one pass over the 2 training volumes


def _bundle(args: list[str], cwd: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args, "--device", "$torch.device('cpu')"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def run_one(data: Path, run: Path, weight: float, warmup: int, epochs: int, threads: int) -> dict:
    """Train (fresh, seed 0) and segment the held-back volume; returns the scores of that volume."""
    from spoco_bundle.io import read_image
    from spoco_bundle.metrics import ap50

    run.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    common = ["--meta_file", str(REPO_ROOT / "configs" / "metadata.json"), "--bundle_root", str(run)]
    _bundle(
        ["training", "--config_file", str(REPO_ROOT / "configs" / "train.json"), *common]
        + ["--dataset_dir", str(data), "--epochs", str(epochs), "--epoch_length", str(EPOCH_LENGTH)]
        + ["--instance_ratio", str(RATIO)]
        + ["--loss#foreground_weight", str(weight), "--foreground_warmup_iterations", str(warmup)],
        run,
        threads,
    )
    _bundle(
        ["--config_file", str(REPO_ROOT / "configs" / "inference.json"), *common]
        + ["--dataset_dir", str(data / "imagesTs"), "--output_dir", str(run / "eval")],
        run,
        threads,
    )
    (truth_path,) = sorted((data / "labelsTs").iterdir())
    (pred_path,) = sorted((run / "eval").glob("*_instances*"))
    truth = np.asarray(read_image(str(truth_path))[0])
    pred = np.asarray(read_image(str(pred_path))[0])
    return {
        "weight": weight,
        "warmup": warmup,
        "epochs": epochs,
        "objects": int(len(np.unique(pred[pred > 0]))),
        "true_objects": int(len(np.unique(truth[truth > 0]))),
        "ap50": float(ap50(truth, pred)),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--settings", default="20:0,100:0,300:0,300:300", help="W:N pairs, comma separated")
    parser.add_argument("--epochs", default="2,25", help="epoch counts, comma separated")
    parser.add_argument("--out_dir", default=str(REPO_ROOT / "eval" / "short_training"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        settings = [(float(w), int(n)) for w, n in (s.split(":") for s in args.settings.split(","))]
        epochs = [int(e) for e in args.epochs.split(",")]
    except ValueError:
        parser.error(f"--settings must be W:N pairs and --epochs integers, got {args.settings!r} / {args.epochs!r}")

    from spoco_bundle.synthetic import write_synthetic_dataset

    out = Path(args.out_dir).resolve()
    data = out / "data"
    write_synthetic_dataset(data, n_train=2, n_val=0, n_test=1, shape=SHAPE, seed=1)
    results = []
    for weight, warmup in settings:
        for n in epochs:
            r = run_one(data, out / f"w{weight:g}_warmup{warmup}_e{n}", weight, warmup, n, args.threads)
            print(
                f"[short] weight {weight:g} warm-up {warmup} epochs {n}: {r['objects']} objects, AP50 {r['ap50']:.3f}"
            )
            results.append(r)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(
        f"\nHeld-back synthetic volume {SHAPE}, {results[0]['true_objects']} true objects; training from random "
        f"weights on 2 volumes with {RATIO:.0%} of the objects labelled (seed 0, CPU, {args.threads} thread(s)).\n"
    )
    print("| foreground weight | warm-up iterations | epochs (iterations) | objects found | AP50 |")
    print("|---|---|---|---|---|")
    for r in results:
        cells = [
            f"{r['weight']:g}",
            r["warmup"],
            f"{r['epochs']} ({EPOCH_LENGTH * r['epochs']})",
            r["objects"],
            f"{r['ap50']:.3f}",
        ]
        print("| " + " | ".join(map(str, cells)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
