"""
Segmenting with the shape branch (:mod:`research.recipes.shape_branch`): one object per peak of the learned
in-object distance map, grown by a seeded watershed inside the foreground head's mask. The transforms here replace
the clustering step of ``configs/inference.json``'s chain through the overlay
``research/configs/shape_branch_inference.json``:

- :class:`SplitShapeBranchd` takes the branch's channels out of the network output (the chain's later steps see the
  bundle's ``[embeddings, head]``) and keeps them under their own key;
- :class:`ShapeSeedsd` labels the head's mask: ``seeds="distance"`` puts one seed per connected region of the
  distance map above ``seed_threshold`` and floods ``edges`` (the distance map's complement, the affinities'
  boundary map, or the embeddings' edge map) from them; ``seeds="embeddings"`` is the bundle's own clustering
  (:class:`~spoco_bundle.postprocessing.ClusterInstances`) on the same network, for the comparison.

    .venv/bin/python -m monai.bundle run --config_file "['configs/inference.json',
        'research/configs/shape_branch_inference.json']" --ckpt_path RUN/models/model.pt --dataset_dir IMAGES
        [--shape_seeds distance|embeddings] [--shape_edges distance|affinity|embeddings] [--seed_threshold 0.6]

The screen: ``python -m research.learning_speed --recipes default,shape_branch`` (training images only), then
``python -m research.shape_seeds --run_dir RUN`` for the post-processing variants on one checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_data_type, convert_to_dst_type
from scipy import ndimage
from scipy.special import expit

from research.recipes.shape_branch import DEFAULT_OFFSETS, branch_channels, split_branch
from spoco_bundle.clustering._common import _label_unseeded
from spoco_bundle.clustering._morphology import h_minima, watershed
from spoco_bundle.clustering.watershed import _edge_strength
from spoco_bundle.postprocessing import ClusterInstances
from spoco_bundle.postprocessing._common import _given_mask, _mask_from

__all__ = ["SplitShapeBranchd", "ShapeSeedsd", "seeded_labels", "affinity_boundaries", "VARIANTS"]

SEEDS = ("distance", "embeddings")
EDGES = ("distance", "affinity", "embeddings")


class SplitShapeBranchd(MapTransform):
    """
    Moves the shape branch's channels of the network output ``keys`` (``(E + K + 1, *S)``, :class:`~research.recipes.
    shape_branch.ShapeBranchUNet`) to ``branch_key`` (``(K, *S)``: distance logit, affinity logits), leaving the
    bundle's ``(E + 1, *S)`` under ``keys``.

    Args:
        keys: the network output (one key).
        branch_key: where the branch goes.
        embedding_dim: E.
        offsets: the network's offsets (their number sets K); default the data's dimensionality's.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        branch_key: str = "shape_branch",
        embedding_dim: int = 16,
        offsets: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__(keys)
        self.branch_key = branch_key
        self.embedding_dim = int(embedding_dim)
        self.offsets = offsets

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            offsets = self.offsets or DEFAULT_OFFSETS[pred.ndim - 1]
            d[key], d[self.branch_key] = split_branch(pred, self.embedding_dim, branch_channels(offsets))
        return d


def affinity_boundaries(affinity_prob: np.ndarray, offsets: Sequence[Sequence[int]]) -> np.ndarray:
    """Per pixel the largest "different" probability ``1 - a`` of the face-neighbour pairs it is part of (either
    end), from the affinities ``(K, *S)`` of ``offsets`` (pairs of longer range are left out)."""
    spatial = affinity_prob.shape[1:]
    out = np.zeros(spatial, np.float32)
    for k, offset in enumerate(offsets):
        if sum(offset) != 1:
            continue
        axis = int(np.argmax(offset))
        n = spatial[axis]
        cut = [slice(None)] * len(spatial)
        cut[axis] = slice(0, n - 1)
        apart = 1.0 - affinity_prob[k][tuple(cut)]
        here = tuple(cut)
        there = list(cut)
        there[axis] = slice(1, n)
        there = tuple(there)
        out[here] = np.maximum(out[here], apart)
        out[there] = np.maximum(out[there], apart)
    return out


def seeded_labels(
    distance: np.ndarray,
    region: np.ndarray,
    edges: np.ndarray | None = None,
    seed_threshold: float = 0.6,
    seed_depth: float | None = None,
) -> np.ndarray:
    """
    One object per connected part of ``distance > seed_threshold`` inside ``region`` (with ``seed_depth``: per peak
    of ``distance`` inside ``region`` that rises more than ``seed_depth`` above the saddle to any higher peak, and
    above ``seed_threshold``), grown over ``edges`` (default ``1 - distance``) by a watershed inside ``region``;
    parts of ``region`` that hold no seed are objects of their own. Returns int32 labels ``S``, 0 outside
    ``region``.
    """
    region = np.asarray(region, bool)
    if not region.any():
        return np.zeros(region.shape, np.int32)
    markers, n = ndimage.label(_peak_seeds(distance, region, seed_threshold, seed_depth))
    surface = (1.0 - distance) if edges is None else edges
    labels = watershed(surface.astype(np.float32), markers, mask=region).astype(np.int32)
    _label_unseeded(labels, region, n)
    return labels


def _peak_seeds(distance: np.ndarray, region: np.ndarray, seed_threshold: float, seed_depth: float | None):
    """Seed pixels: ``distance > seed_threshold`` inside ``region``, with ``seed_depth`` only at peaks that deep."""
    seeds = (distance > seed_threshold) & region
    if seed_depth is not None:
        seeds &= h_minima(np.where(region, 1.0 - distance, 1.0).astype(np.float32), float(seed_depth)).astype(bool)
    return seeds


def split_by_peaks(
    labels: np.ndarray, distance: np.ndarray, seed_threshold: float = 0.3, seed_depth: float = 0.1
) -> np.ndarray:
    """Each object of ``labels`` that holds two or more peaks of ``distance`` (:func:`seeded_labels`'s seeds) cut
    among them by a watershed over ``1 - distance`` inside the object; the others as they are. Returns int32 labels,
    consecutive."""
    out = np.zeros(labels.shape, np.int32)
    n = 0
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        obj = labels[box] == k
        markers, count = ndimage.label(_peak_seeds(distance[box], obj, seed_threshold, seed_depth))
        if count < 2:
            out[box][obj] = n + 1
            n += 1
            continue
        parts = watershed((1.0 - distance[box]).astype(np.float32), markers, mask=obj).astype(np.int32)
        parts[obj & (parts == 0)] = count + 1  # pixels no seed reached (a separate piece of the object)
        ids = np.unique(parts[obj])
        lut = np.zeros(count + 2, np.int32)
        lut[ids] = np.arange(n + 1, n + 1 + len(ids))
        out[box][obj] = lut[parts[obj]]
        n += len(ids)
    return out


class ShapeSeedsd(MapTransform):
    """
    Instance labels of the head's mask from the shape branch (replaces :class:`~spoco_bundle.postprocessing.
    ClusterInstancesd` in the chain): ``pred`` ``(E + 1, *S)`` becomes int32 labels ``(1, *S)``.

    Args:
        keys: the network output (after :class:`SplitShapeBranchd`).
        branch_key: the branch's channels.
        mask_key: the foreground mask (:class:`~spoco_bundle.postprocessing.ForegroundMaskd`).
        seeds: ``"distance"`` (seeds from the distance map) or ``"embeddings"`` (the bundle's clustering; then
            ``cluster`` are its arguments).
        edges: what the watershed floods: ``"distance"`` (``1 - distance``), ``"affinity"`` (the mean of that and
            the face-neighbour affinities' boundary map) or ``"embeddings"`` (the embeddings' edge map, in units of
            ``2 delta_v``, plus ``1 - distance`` in equal parts).
        seed_threshold: distance above which pixels are seeds.
        seed_depth: seeds only at peaks of the distance map this deep (:func:`seeded_labels`); None: every region
            above ``seed_threshold``.
        embedding_dim: E.
        offsets: the network's offsets.
        cluster: :class:`~spoco_bundle.postprocessing.ClusterInstances`'s arguments for ``seeds="embeddings"``.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        branch_key: str = "shape_branch",
        mask_key: str = "foreground_mask",
        seeds: str = "distance",
        edges: str = "distance",
        seed_threshold: float = 0.6,
        seed_depth: float | None = None,
        embedding_dim: int = 16,
        offsets: Sequence[Sequence[int]] | None = None,
        delta_v: float = 0.5,
        **cluster: Any,
    ) -> None:
        super().__init__(keys)
        if seeds not in SEEDS or edges not in EDGES:
            raise ValueError(f"seeds must be one of {SEEDS} and edges one of {EDGES}, got {seeds!r}, {edges!r}.")
        if not 0 < float(seed_threshold) < 1:
            raise ValueError(f"seed_threshold must lie in (0, 1), got {seed_threshold!r}.")
        self.branch_key, self.mask_key = branch_key, mask_key
        self.seeds, self.edges, self.seed_threshold = seeds, edges, float(seed_threshold)
        self.seed_depth = None if seed_depth is None else float(seed_depth)
        self.embedding_dim, self.offsets, self.delta_v = int(embedding_dim), offsets, float(delta_v)
        self.cluster = (
            ClusterInstances(embedding_dim=embedding_dim, delta_v=delta_v, **cluster) if seeds == "embeddings" else None
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = _mask_from(d, self.mask_key)
        for key in self.key_iterator(d):
            pred = d[key]
            if self.cluster is not None:
                d[key] = self.cluster(pred, mask)
                if self.seed_depth is not None:  # objects with two or more peaks of the distance map are cut
                    branch = np.asarray(convert_data_type(d[self.branch_key], np.ndarray, dtype=np.float32)[0])
                    labels = np.asarray(convert_data_type(d[key], np.ndarray)[0])[0].astype(np.int32)
                    cut = split_by_peaks(labels, expit(branch[0]), self.seed_threshold, self.seed_depth)
                    d[key] = convert_to_dst_type(cut[None], d[key], dtype=torch.int32)[0]
                continue
            arr = np.asarray(convert_data_type(pred, np.ndarray, dtype=np.float32)[0])
            branch = np.asarray(convert_data_type(d[self.branch_key], np.ndarray, dtype=np.float32)[0])
            distance = expit(branch[0])
            region = np.ones(arr.shape[1:], bool) if mask is None else _given_mask(mask, arr.shape[1:])
            edges = None
            if self.edges == "affinity":
                offsets = self.offsets or DEFAULT_OFFSETS[arr.ndim - 1]
                edges = 0.5 * (1.0 - distance) + 0.5 * affinity_boundaries(expit(branch[1:]), offsets)
            elif self.edges == "embeddings":
                emb_edges = ndimage.gaussian_filter(_edge_strength(arr[: self.embedding_dim]), 1.0)
                edges = 0.5 * (1.0 - distance) + 0.5 * np.clip(emb_edges / (2 * self.delta_v), 0, 1)
            labels = seeded_labels(distance, region, edges, self.seed_threshold, self.seed_depth)
            d[key] = convert_to_dst_type(labels[None], pred, dtype=torch.int32)[0]
        return d


# post-processing variants scored on one checkpoint: inference.json ids (with the overlay)
VARIANTS: dict[str, dict] = {
    "embeddings": {"shape_seeds": "embeddings"},
    "distance0.5": {"shape_seeds": "distance", "shape_edges": "distance", "seed_threshold": 0.5, "shape_split": 0.0},
    "distance0.6": {"shape_seeds": "distance", "shape_edges": "distance", "seed_threshold": 0.6, "shape_split": 0.0},
    "distance0.7": {"shape_seeds": "distance", "shape_edges": "distance", "seed_threshold": 0.7, "shape_split": 0.0},
    "affinity0.6": {"shape_seeds": "distance", "shape_edges": "affinity", "seed_threshold": 0.6, "shape_split": 0.0},
    "embeddings_edges0.6": {
        "shape_seeds": "distance",
        "shape_edges": "embeddings",
        "seed_threshold": 0.6,
        "shape_split": 0.0,
    },
    "peaks0.1": {"shape_seeds": "distance", "seed_threshold": 0.3, "seed_depth": 0.1, "shape_split": 0.0},
    "peaks0.05": {"shape_seeds": "distance", "seed_threshold": 0.3, "seed_depth": 0.05, "shape_split": 0.0},
    "peaks0.2": {"shape_seeds": "distance", "seed_threshold": 0.3, "seed_depth": 0.2, "shape_split": 0.0},
    "peaks0.1_embeddings_edges": {
        "shape_seeds": "distance",
        "shape_edges": "embeddings",
        "seed_threshold": 0.3,
        "seed_depth": 0.1,
        "shape_split": 0.0,
    },
    "embeddings_peaks0.1": {"shape_seeds": "embeddings", "seed_threshold": 0.3, "seed_depth": 0.1},
    "embeddings_peaks0.2": {"shape_seeds": "embeddings", "seed_threshold": 0.3, "seed_depth": 0.2},
    "embeddings_peaks0.1_nosplit": {
        "shape_seeds": "embeddings",
        "seed_threshold": 0.3,
        "seed_depth": 0.1,
        "shape_split": 0.0,
    },
    "distance0.6_split": {"shape_seeds": "distance", "shape_edges": "distance", "seed_threshold": 0.6},
}


def _record(run_dir: Path) -> dict:
    """A learning-speed run's record, ``<run_dir>.json`` beside its folder."""
    return json.loads((run_dir.parent / f"{run_dir.name}.json").read_text())


def _screen_split(record: dict, data_dir: str | None):
    """The learning-speed split a record was scored on (its name: ``tune_<split>_<n_train>_<n_tune>`` or
    ``tune_<split>_halves``)."""
    from research.learning_speed import screen_split

    name = record["split"]
    if name.endswith("_halves"):
        return screen_split(record["dataset"], data_dir, name[len("tune_") : -len("_halves")], 1)
    base, _, n_tune = name[len("tune_") :].rsplit("_", 2)
    return screen_split(record["dataset"], data_dir, base, int(n_tune))


def score_variants(run_dir: Path, variants: Sequence[str], threads: int, data_dir: str | None = None) -> dict:
    """Segment a learning-speed run's held-back images with each post-processing variant (cached in
    ``<run_dir>/shape_seeds.json``); returns {variant: scores}."""
    from research.data import score
    from research.methods.spoco import predict, run_ids

    record = _record(run_dir)
    split = _screen_split(record, data_dir)
    cache_path = run_dir / "shape_seeds.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    truth = [item.labels for item in split.test]
    for variant in variants:
        if variant in cache:
            continue
        t0 = time.perf_counter()
        ids = {**run_ids(record), **VARIANTS[variant]}
        predictions = predict(
            run_dir / "models" / "model.pt",
            split,
            run_dir,
            threads=threads,
            tag=f"_seeds_{variant}",
            overrides=ids,
            configs=(OVERLAY,),
        )
        s = score(predictions, truth, split.spatial_dims, split.dataset)
        cache[variant] = {k: s[k] for k in ("ap50", "map", "sbd", "fg_precision", "fg_recall", "tp50", "fp50", "fn50")}
        cache[variant]["ap50_per_image"] = float(np.mean([p["ap50"] for p in s["per_image"]]))
        cache[variant]["seconds"] = round(time.perf_counter() - t0, 1)
        cache_path.write_text(json.dumps(cache, indent=1))
        print(f"{run_dir}: {variant} AP50 {s['ap50']:.3f}", flush=True)
    return {v: cache[v] for v in variants}


OVERLAY = "research/configs/shape_branch_inference.json"


def report(rows: list[tuple[str, str, dict]], command: str, baselines: list[dict]) -> str:
    from research.records import machine_info

    machine = machine_info()
    lines = [
        "# Seeds from a learned distance map (the shape branch), on training images",
        "",
        "Generated by `python -m research.shape_seeds`; do not edit by hand.",
        "",
        "```bash",
        command,
        "```",
        "",
        "- **Models**: learning-speed runs (`python -m research.learning_speed`, 900 CPU-s, 1 thread, two side by "
        "side): `default` is the bundle as it ships; `shape_branch` adds the branch of "
        "`research/recipes/shape_branch.py` (in-object distance and affinities from the sparse masks); "
        "`shape_branch_agree` also makes the embeddings follow the teacher's confident affinities on the unlabeled "
        "region.",
        "- **Variants** (`VARIANTS` in `research/shape_seeds.py`, inference.json ids with the overlay "
        f"`{OVERLAY}`): `embeddings` = the bundle's own clustering (watershed on the embeddings + shape split) of the "
        "same network; `distanceT` = one seed per region of the distance map above T inside the head's mask, "
        "flooded over 1 - distance, no shape split; `affinityT` = flooded over that and the affinities' boundary "
        "map; `embeddings_edgesT` = over that and the embeddings' edge map; `_split` = with the shape split.",
        "- **Scores**: on the run's held-back training images (never trained on); AP50 pooled (TP / (TP + FP + FN) "
        "over all images) and per image (mean).",
        f"- **Machine**: {machine.get('cpu')}, {machine.get('nproc')} cores, torch {machine.get('torch')}, no GPU.",
        "",
        "| run | iterations | variant | AP50 | AP50 per image | mAP | head pixels P / R | TP / FP / FN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in baselines:
        h = b["head"]
        lines.append(
            f"| {b['recipe']} | {b['iterations']} | as recorded (inference.json) | {h['ap50']:.3f} | - | "
            f"{h['map']:.3f} | {h['fg_precision']:.2f} / {h['fg_recall']:.2f} | - |"
        )
    for name, iterations, variant, s in rows:
        lines.append(
            f"| {name} | {iterations} | {variant} | {s['ap50']:.3f} | {s['ap50_per_image']:.3f} | {s['map']:.3f} | "
            f"{s['fg_precision']:.2f} / {s['fg_recall']:.2f} | {s['tp50']} / {s['fp50']} / {s['fn50']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", required=True, help="learning-speed runs with the shape branch, comma-separated")
    p.add_argument("--baseline", default="", help="learning-speed runs listed as recorded (e.g. the default recipe)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--docs", default="")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    rows = []
    for run in [Path(r) for r in args.run_dir.split(",") if r]:
        record = _record(run)
        for variant, s in score_variants(run, variants, args.threads, args.data_dir).items():
            rows.append((record["recipe"], record["iterations"], variant, s))
    baselines = [_record(Path(b)) for b in args.baseline.split(",") if b]
    command = (
        f".venv/bin/python -m research.shape_seeds --run_dir {args.run_dir}"
        + (f" --baseline {args.baseline}" if args.baseline else "")
        + f" --variants {','.join(variants)} --threads {args.threads}"
        + (f" --docs {args.docs}" if args.docs else "")
    )
    text = report(rows, command, baselines)
    print(text)
    if args.docs:
        Path(args.docs).write_text(text)


if __name__ == "__main__":
    main()
