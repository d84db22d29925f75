"""
Error breakdown of a trained SPOCO model from the accuracy benchmark: how much of the gap to the targets is the
foreground head's, how much the embeddings'. The held-back images are run through the bundle's inference config
(network, preprocessing, sliding-window inferer, as a user runs it) once; the raw output (embeddings + foreground
logit) is then clustered exactly like ``ClusterEmbeddingsd`` does (``fast``, ``min_size`` of the benchmark), with
the foreground mask taken from

- the head (the bundle's default, threshold 0.5 on the calibrated probability), and other head thresholds;
- the head with the false-positive pixels removed (head AND truth): what a head without halos/false blobs would give;
- the head with the missed pixels added (head OR truth);
- the true foreground (oracle): what the embeddings alone can separate;
- and the head's mask clustered with other ``--clustering`` methods of inference (``--clusterings``);
- each clustering followed by ``--shape_split`` (the inference option), and the connected components of the head's
  and of the true mask (no embeddings) with and without it: what the embeddings add over the mask alone.

Also the head's pixel precision / recall against the true foreground (pooled over images), the ratio of
predicted to true foreground area, and where the true objects go with the head's mask and with the true mask
(:func:`object_errors`: matched, missed, merged with a neighbour, other), with the embedding distance between the
means of merged neighbours (the push term asks for at least ``2 delta_d``).

    .venv/bin/python -m research.foreground [--dataset dsb2018] [--ratio 0.1] [--method spoco]
        [--split NAME] [--thresholds 0.2,0.35,0.5,0.65,0.8] [--clusterings fast,watershed] [--shape_split 0.1]
        [--out_dir eval/benchmark]
        [--threads 2]

It reads the checkpoint of a finished benchmark run (``<out_dir>/<dataset>/<split>/<method>/ratio_<r>.json`` names
its work folder) and writes ``foreground_ratio_<r>.json`` beside it; ``python -m research.accuracy --no_run`` puts
the table into ``research/pages/benchmarks.md`` (records of an older checkpoint than the cached run's are left out).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from research.chain import ClusterEmbeddings
from research.data import REPO_ROOT, cached_checkpoint, default_data_dir, device_error, score
from research.methods.spoco import SETTINGS, bundle_ids, run_ids
from spoco_bundle.clustering import CLUSTERING_METHODS, cluster_embeddings, cluster_fast, split_by_shape

DEFAULT_THRESHOLD = 0.5
MASKS = {
    "head": "head (default)",
    "head_and_truth": "head AND truth (false-positive pixels removed)",
    "head_or_truth": "head OR truth (missed pixels added)",
    "truth": "truth (oracle foreground)",
}


OBJECT_FATES = ("matched", "missed", "merged", "other")


def object_errors(pred: np.ndarray, labels: np.ndarray, emb: np.ndarray | None = None) -> dict:
    """
    What became of each true object in a prediction, judged by the predicted object that overlaps it most:

    - ``matched``: that object has IoU > 0.5 with it (the true positives at IoU 0.5, but for ties at exactly 0.5,
      which the benchmark's matching counts);
    - ``missed``: less than half of it is predicted foreground at all;
    - ``merged``: that predicted object also holds at least half of another true object;
    - ``other``: the rest (split into pieces, or delineated too loosely or too tightly).

    Args:
        pred: predicted instance labels ``S`` (0 = background).
        labels: true instance labels ``S`` (0 = background).
        emb: optional embeddings ``(E, *S)``; then the distances between the embedding means of each merged object
            and the true object it was merged with are returned too.

    Returns:
        counts per fate, ``n_gt``, ``merged_distances`` (list) and ``merged_touching`` (list of bools: the two true
        objects touch, 8-/26-neighbourhood).
    """
    if pred.shape != labels.shape:
        raise ValueError(f"prediction shape {pred.shape} != labels shape {labels.shape}.")
    gt, pr = labels.astype(np.int64).ravel(), pred.astype(np.int64).ravel()
    n_gt, n_pr = int(gt.max(initial=0)), int(pr.max(initial=0))
    table = np.bincount(gt * (n_pr + 1) + pr, minlength=(n_gt + 1) * (n_pr + 1)).reshape(n_gt + 1, n_pr + 1)
    gt_size, pr_size = table.sum(1), table.sum(0)
    out: dict = {k: 0 for k in OBJECT_FATES}
    out.update(n_gt=0, merged_distances=[], merged_touching=[])
    means = boxes = None
    for k in np.flatnonzero(gt_size[1:]) + 1:
        out["n_gt"] += 1
        if gt_size[k] - table[k, 0] < 0.5 * gt_size[k]:
            out["missed"] += 1
            continue
        j = int(np.argmax(table[k, 1:])) + 1
        if table[k, j] / (gt_size[k] + pr_size[j] - table[k, j]) > 0.5:
            out["matched"] += 1
            continue
        held = table[1:, j] / np.maximum(gt_size[1:], 1)  # share of each true object inside predicted object j
        held[k - 1] = 0
        if held.max(initial=0) < 0.5:
            out["other"] += 1
            continue
        out["merged"] += 1
        partner = int(np.argmax(held)) + 1
        if emb is not None:
            if means is None:
                ids = np.arange(1, n_gt + 1)
                means = np.stack([ndimage.mean(c, labels, ids) for c in emb], axis=1)
            out["merged_distances"].append(float(np.linalg.norm(means[k - 1] - means[partner - 1])))
        if boxes is None:
            boxes = ndimage.find_objects(labels)
        # object k's bounding box, one voxel wider: all a 3^d dilation of it can reach
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in boxes[k - 1])
        grown = ndimage.binary_dilation(labels[box] == k, np.ones((3,) * labels.ndim, bool))
        out["merged_touching"].append(bool((grown & (labels[box] == partner)).any()))
    return out


def foreground_breakdown(
    outputs: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    spatial_dims: int,
    embedding_dim: int = 16,
    min_size: int = 16,
    thresholds: Sequence[float] = (DEFAULT_THRESHOLD,),
    delta_v: float = 0.5,
    delta_d: float = 2.0,
    clusterings: Sequence[str] = (),
    shape_split: float = 0.0,
    spacings: Sequence[Sequence[float] | None] | None = None,
) -> dict:
    """
    Score the clustering of raw network outputs under different foreground masks.

    Args:
        outputs: per image the network output ``(E + 1, *S)``: embeddings, then the calibrated foreground logit.
        labels: per image the dense instance labels ``S`` (0 = background).
        spatial_dims: 2 or 3 (selects the metrics, as in the benchmark).
        embedding_dim: E.
        min_size: ``min_size`` of the clustering.
        thresholds: head probability thresholds to sweep (the default mask uses 0.5).
        clusterings: further clustering methods (``--clustering`` of inference) to score with the head's mask.
        shape_split: if > 0, each clustering also with ``shape_split`` (:func:`spoco_bundle.clustering.split_by_shape`),
            and, as references without embeddings, the connected components of the head's and of the true mask with
            and without that split, beside the true mask clustered with the clusterings.
        spacings: per image the voxel size (for ``shape_split``; default isotropic).

    Returns:
        ``{"masks": [{"mask", "description", **scores}], "thresholds": [{"threshold", **scores}],
        "objects": [{"mask", "description", **fates}], "clusterings": [{"method", **scores}],
        "pixel": {"precision", "recall", "area_ratio"}}`` with the
        benchmark's pooled scores; ``objects``: :func:`object_errors` pooled over the images for the head's and
        the true mask, with ``merged_distance_median`` and ``merged_touching_share`` of the merged pairs.
    """
    if len(outputs) != len(labels) or not outputs:
        raise ValueError(f"need one output per label image, got {len(outputs)} outputs and {len(labels)} labels.")
    preds: dict[str, list[np.ndarray]] = {k: [] for k in MASKS}
    swept: dict[float, list[np.ndarray]] = {t: [] for t in thresholds}
    # head masks go through the bundle's own post-processing, so the "head" rows are what inference gives
    by_head = {
        t: ClusterEmbeddings("fast", embedding_dim, "head", min_size, delta_v, delta_d, foreground_threshold=t)
        for t in set(thresholds) | {DEFAULT_THRESHOLD}
    }
    by_method = {
        m: ClusterEmbeddings(m, embedding_dim, "head", min_size, delta_v, delta_d) for m in clusterings if m != "fast"
    }
    clustered: dict[str, list[np.ndarray]] = {m: [] for m in by_method}
    split_rows: dict[tuple[str, str], list[np.ndarray]] = {}  # (mask, method) -> predictions
    tp = n_pred = n_true = 0
    fates: dict[str, dict] = {}
    if spacings is not None and len(spacings) != len(outputs):
        raise ValueError(f"need one spacing per image, got {len(spacings)} for {len(outputs)} images.")
    for index, (out, lab) in enumerate(zip(outputs, labels)):
        if out.shape != (embedding_dim + 1,) + lab.shape:
            raise ValueError(f"output shape {out.shape} does not match labels {lab.shape} with E={embedding_dim}.")
        emb, truth = out[:embedding_dim], lab > 0
        head = out[embedding_dim] > np.log(DEFAULT_THRESHOLD / (1 - DEFAULT_THRESHOLD))  # the default head mask
        tp += int((head & truth).sum())
        n_pred += int(head.sum())
        n_true += int(truth.sum())
        by_t = {t: np.asarray(cluster(out))[0] for t, cluster in by_head.items()}

        def seg(mask: np.ndarray) -> np.ndarray:
            return cluster_fast(emb, delta_v, delta_d, min_size=min_size, fg_mask=mask, background="none")

        preds["head"].append(by_t[DEFAULT_THRESHOLD])
        for key, mask in (("head_and_truth", head & truth), ("head_or_truth", head | truth), ("truth", truth)):
            preds[key].append(seg(mask))
        for key in ("head", "truth"):
            fate = object_errors(preds[key][-1], lab, emb)
            pooled = fates.setdefault(key, {k: [] if isinstance(v, list) else 0 for k, v in fate.items()})
            for k, v in fate.items():
                pooled[k] += v
        for t in thresholds:
            swept[t].append(by_t[t])
        for m, cluster in by_method.items():
            clustered[m].append(np.asarray(cluster(out))[0])
        if shape_split > 0:
            spacing = None if spacings is None else spacings[index]
            rows = {("head", "fast"): preds["head"][-1], ("truth", "fast"): preds["truth"][-1]}
            rows.update({("head", m): clustered[m][-1] for m in by_method})
            for m in by_method:
                rows[("truth", m)] = cluster_embeddings(
                    emb, m, delta_v=delta_v, min_size=min_size, fg_mask=truth, background="none"
                )
            for key in ("head", "truth"):
                rows[(key, "components")] = _components(head if key == "head" else truth, min_size)
            for (key, m), lab_ in list(rows.items()):
                split_rows.setdefault((key, m), []).append(lab_)
                parts = split_by_shape(lab_, h=shape_split, spacing=spacing, min_size=max(1, min_size))
                split_rows.setdefault((key, f"{m} + shape_split {shape_split:g}"), []).append(parts)
    labels = list(labels)
    masks = [{"mask": k, "description": MASKS[k], **score(p, labels, spatial_dims)} for k, p in preds.items()]
    head_scores = {k: v for k, v in masks[0].items() if k not in ("mask", "description")}  # the "head" row = fast
    return {
        "masks": masks,
        "thresholds": [{"threshold": t, **score(p, labels, spatial_dims)} for t, p in swept.items()],
        "objects": [{"mask": k, "description": MASKS[k], **_summary(v)} for k, v in fates.items()],
        "clusterings": [{"method": "fast", **head_scores}]
        + [{"method": m, **score(p, labels, spatial_dims)} for m, p in clustered.items()],
        "shape_split": [
            {"mask": key, "method": m, **score(p, labels, spatial_dims)} for (key, m), p in split_rows.items()
        ],
        "pixel": {
            "precision": tp / max(n_pred, 1),
            "recall": tp / max(n_true, 1),
            "area_ratio": n_pred / max(n_true, 1),
        },
    }


def _components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Connected components of a mask (face connectivity), those below ``min_size`` voxels dropped: no embeddings."""
    comp, _ = ndimage.label(mask)
    sizes = np.bincount(comp.reshape(-1))
    comp[(sizes < min_size)[comp]] = 0
    return comp.astype(np.int32)


def _summary(fate: dict) -> dict:
    """Pooled fates with the merged pairs' median embedding distance and touching share (None without pairs)."""
    dist, touching = fate.pop("merged_distances"), fate.pop("merged_touching")
    fate["merged_distance_median"] = float(np.median(dist)) if dist else None
    fate["merged_touching_share"] = float(np.mean(touching)) if touching else None
    return fate


def network_outputs(ckpt: Path, split, items, device: str = "cpu", ids: dict | None = None) -> list[np.ndarray]:
    """Raw outputs ``(E + 1, *S)`` of the checkpoint on ``items``, with the bundle's inference config pieces;
    ``ids``: the run's own inference ids (:func:`~research.methods.spoco.run_ids`: patch size, image scale)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "inference.json"))
    parser.update(dict(bundle_ids(split, device), ckpt_path=str(ckpt), **(ids or {})))
    network, preprocessing, inferer = (parser.get_parsed_content(k) for k in ("network", "preprocessing", "inferer"))
    network.eval()
    outputs = []
    for item in items:
        image = preprocessing({"image": str(item.path)})["image"]
        with torch.no_grad():
            out = inferer(torch.as_tensor(image)[None].to(device), network)[0].cpu().numpy()
        if out.shape[1:] != item.labels.shape:
            raise RuntimeError(f"output for {item.path} has spatial shape {out.shape[1:]}, labels {item.labels.shape}")
        outputs.append(out.astype(np.float32))
    return outputs


def breakdown(args: argparse.Namespace) -> Path:
    split, run_dir, run, ckpt = cached_checkpoint(
        args.dataset, args.split, args.method, args.ratio, args.out_dir, args.data_dir
    )
    torch.set_num_threads(args.threads)
    test = split.test[: args.max_test] if args.max_test else split.test
    t0 = time.perf_counter()
    outputs = network_outputs(ckpt, split, test, args.device, run_ids(run))
    result = foreground_breakdown(
        outputs,
        [i.labels for i in test],
        split.spatial_dims,
        min_size=SETTINGS[split.spatial_dims]["min_size"],
        thresholds=args.thresholds,
        clusterings=args.clusterings,
        shape_split=args.shape_split,
        spacings=[i.spacing for i in test],
    )
    for row in result["masks"]:
        print(f"[foreground] {args.dataset} {split.name} {args.method} {args.ratio:g} {row['mask']}: {row['ap50']:.3f}")
    out = run_dir / f"foreground_ratio_{args.ratio:.2f}.json"
    info = {"dataset": args.dataset, "split": split.name, "method": args.method, "ratio": args.ratio}
    info.update(checkpoint_run=run.get("info", {}).get("work_dir"), n_test=len(test))
    info.update(seconds=round(time.perf_counter() - t0, 1), **result)
    out.write_text(json.dumps(info, indent=1, default=float))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=str(default_data_dir()))
    p.add_argument("--dataset", default="dsb2018", choices=("dsb2018", "gonuclear"))
    p.add_argument("--split", default=None, help="default: the data set's first split")
    p.add_argument("--method", default="spoco")
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--thresholds", default="0.2,0.35,0.5,0.65,0.8", help="head probability thresholds to sweep")
    p.add_argument("--clusterings", default="fast,watershed", help="clustering methods scored with the head's mask")
    p.add_argument("--shape_split", type=float, default=0.1, help="also score with split_by_shape (0: skip)")
    p.add_argument("--out_dir", default=str(REPO_ROOT / "eval" / "benchmark"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max_test", type=int, default=None)
    args = p.parse_args(argv)
    args.clusterings = [m.strip() for m in args.clusterings.split(",") if m.strip()]
    # checked before the network runs; "consistency" needs the teacher's channels, which this breakdown has not;
    # "boundary" cuts along the head, not the embeddings this breakdown compares inside each mask
    valid = sorted(m for m in CLUSTERING_METHODS if m not in ("consistency", "boundary"))
    if any(m not in valid for m in args.clusterings):
        p.error(f"--clusterings must be among {valid}, got {args.clusterings}")
    args.thresholds = sorted({float(t) for t in args.thresholds.split(",") if t.strip()} | {DEFAULT_THRESHOLD})
    if any(not 0 < t < 1 for t in args.thresholds):
        p.error(f"thresholds must lie in (0, 1), got {args.thresholds}")
    if (error := device_error(args.device)) is not None:
        p.error(error)
    return args


if __name__ == "__main__":
    print(breakdown(parse_args()))
