"""
A positive-unlabeled random-forest pixel classifier as the foreground (issue 20; screened, not part of the bundle):
ilastik's recipe of filter features (:func:`skimage.feature.multiscale_basic_features`: intensity, edges, texture)
and a random forest, trained on the kept objects' pixels against unlabelled pixels, thresholded as the bundle's head
is: at half the label frequency ``c`` (Elkan & Noto), estimated on the annotated pixels' out-of-bag scores so that
the forest's memory of its own training pixels does not inflate it.

Trained on a learning-speed split's training images (:func:`research.learning_speed.screen_split`) and scored on
its held-back training images by the pixels' precision / recall against the true foreground, the figures the
learning-speed pages give for the bundle's head. A table of other thresholds is printed beside it (read off the
scored images: a reference for how well the forest ranks pixels, not a method).

    .venv/bin/python -m research.pixel_classifier --dataset usiigaci --tune 4 [--ratio 0.1] [--sigma_max 16]
        [--samples 40000] [--trees 100] [--out_dir eval/pixel_classifier]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from research.data import REPO_ROOT, Split, normalize_image, sparsify
from research.learning_speed import screen_split
from research.records import machine_info

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)


def features(image: np.ndarray, sigma_max: float) -> np.ndarray:
    """Filter features ``(*S, F)`` of the percentile-normalised image: intensity, edges and Hessian eigenvalues at 6
    scales from 1 to ``sigma_max`` (4 scales when ``sigma_max`` <= 8)."""
    from skimage.feature import multiscale_basic_features

    return multiscale_basic_features(
        normalize_image(image),
        intensity=True,
        edges=True,
        texture=True,
        sigma_min=1,
        sigma_max=sigma_max,
        num_sigma=6 if sigma_max > 8 else 4,
        channel_axis=None,
    )


def fit(split: Split, ratio: float, sigma_max: float, samples: int, trees: int, seed: int = 0):
    """The forest and ``c`` (mean out-of-bag score of the annotated pixels). Per training image ``samples / 2``
    annotated pixels (or all, if fewer) against ``samples`` unlabelled ones."""
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for item in split.train:
        sparse = sparsify(item, ratio, seed).ravel()
        pos, unl = np.flatnonzero(sparse > 0), np.flatnonzero(sparse == 0)
        if not pos.size:
            continue
        f = features(item.image, sigma_max)
        f = f.reshape(-1, f.shape[-1])
        pos = rng.choice(pos, min(pos.size, samples // 2), replace=False)
        unl = rng.choice(unl, min(unl.size, samples), replace=False)
        xs += [f[pos], f[unl]]
        ys += [np.ones(pos.size), np.zeros(unl.size)]
    if not xs:
        raise ValueError(f"{split.name}: no annotated object in any training image at ratio {ratio}.")
    x, y = np.concatenate(xs), np.concatenate(ys)
    forest = RandomForestClassifier(
        n_estimators=trees, min_samples_leaf=5, max_features="sqrt", oob_score=True, n_jobs=1, random_state=seed
    ).fit(x, y)
    c = float(np.nanmean(forest.oob_decision_function_[y == 1, 1]))
    return forest, c, x.shape


def predict(forest, items: list, sigma_max: float) -> list[np.ndarray]:
    """The forest's foreground score of every pixel of each item (the image's shape)."""
    out = []
    for item in items:
        f = features(item.image, sigma_max)
        out.append(forest.predict_proba(f.reshape(-1, f.shape[-1]))[:, 1].reshape(item.image.shape))
    return out


def pixel_scores(probabilities: list[np.ndarray], truths: list[np.ndarray], threshold: float) -> tuple[float, float]:
    """Pooled pixel precision and recall of ``probability > threshold`` against the true foreground."""
    tp = fp = fn = 0
    for prob, true in zip(probabilities, truths):
        mask = prob > threshold
        tp += int((mask & true).sum())
        fp += int((mask & ~true).sum())
        fn += int((~mask & true).sum())
    return tp / max(tp + fp, 1), tp / max(tp + fn, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="usiigaci")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--split", default="", help="the data set's split (default: its first), as learning_speed --split")
    p.add_argument("--tune", type=int, default=4, help="last N training images held out for scoring")
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--sigma_max", type=float, default=16.0)
    p.add_argument("--samples", type=int, default=40000, help="unlabelled pixels per image (half as many annotated)")
    p.add_argument("--trees", type=int, default=100)
    p.add_argument("--out_dir", default=str(REPO_ROOT / "eval" / "pixel_classifier"))
    args = p.parse_args(argv)
    split = screen_split(args.dataset, args.data_dir, args.split, args.tune)
    start = time.process_time()
    forest, c, shape = fit(split, args.ratio, args.sigma_max, args.samples, args.trees)
    fitted = time.process_time() - start
    probabilities = predict(forest, split.test, args.sigma_max)
    truths = [item.labels > 0 for item in split.test]
    rows = [("c / 2 (the head's rule)", c / 2, *pixel_scores(probabilities, truths, c / 2))]
    rows += [(f"{t:g} (read off the scored images)", t, *pixel_scores(probabilities, truths, t)) for t in THRESHOLDS]
    total = time.process_time() - start
    info = machine_info()
    print(
        f"{split.name}, {args.ratio:.0%} of the objects, {shape[0]} training pixels x {shape[1]} features, "
        f"{args.trees} trees; c (out-of-bag) {c:.3f}; fit {fitted:.0f} CPU-s, in all {total:.0f} CPU-s; "
        f"{info.get('cpu', '')} ({info.get('cpu_detail', '')}), {info.get('nproc')} cores"
    )
    print("| threshold | pixel precision | pixel recall |\n|---|---|---|")
    for name, _, precision, recall in rows:
        print(f"| {name} | {precision:.2f} | {recall:.2f} |")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"split": split.name, "ratio": args.ratio, "c": c, "cpu_s": total, "args": vars(args), "rows": rows}
    record["machine"] = info
    (out / f"{args.dataset}_{args.ratio:.2f}.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
