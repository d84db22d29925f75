"""How unsure the model is about each object it found: the scores behind ``spoco suggest`` (what to outline next)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_numpy
from scipy.special import expit

from spoco_bundle.postprocessing._common import _check_labels, _check_method, check_network_output, embedding_channels
from spoco_bundle.postprocessing.resize import ResizeToMatch

__all__ = ["AXES", "SCORE_COLUMNS", "ObjectScores", "ObjectScoresd", "score_rows", "ranked_table"]

# the per-object columns ObjectScores returns, in order
SCORE_COLUMNS = ("id", "voxels", "score", "head_uncertainty", "embedding_spread")
# axis names of the centroid and bounding-box columns
AXES = {2: ("y", "x"), 3: ("z", "y", "x")}


class ObjectScores(Transform):
    """
    Per predicted object, how unsure the model is about it, from the network output it was clustered from:

    - ``head_uncertainty``: the mean over the object's voxels of ``1 - |2 p - 1|``, ``p`` the foreground head's
      probability: 0 where the head is sure, 1 where it says 1/2 (faint, unusual or half-seen objects);
    - ``embedding_spread``: the share of the object's voxels whose embedding lies farther than ``2 delta_v`` from the
      object's mean embedding (the distance at which the watershed clustering keeps two regions apart): 0 for a
      tight cluster as training shapes them, high for two objects merged into one or an object the embeddings do
      not hold together;
    - ``score``: the larger of the two (the spread alone for a network without the head): each flags its own way of
      being wrong, the object's extent or its split. Higher = more worth outlining next.

    Args:
        embedding_dim: E, the embedding channels.
        delta_v: the pull margin of training (the bundle's 0.5); the spread counts voxels beyond twice it.
        method: the clustering the output was made for (``"consistency"`` outputs hold 2 E embedding channels; the
            student's, the first E, are scored).

    Input: the network output ``(C, *S)`` and the instance labels ``(1, *S')``: on the output's grid or on the
    image's (``S'``, when the network ran on a resampled grid; see :meth:`maps`). The means are taken over the
    labels' voxels, so that the scores, ``voxels`` and the objects' geometry are on one grid.

    Output: one dict per object (:data:`SCORE_COLUMNS`), in id order.

    Raises:
        ValueError: an output or labels of the wrong shape.
    """

    def __init__(self, embedding_dim: int = 16, delta_v: float = 0.5, method: str = "watershed") -> None:
        if not delta_v > 0:
            raise ValueError(f"delta_v must be positive, got {delta_v!r}.")
        self.embedding_dim = int(embedding_dim)
        self.method = _check_method(method)
        self.n_emb = embedding_channels(embedding_dim, method)
        self.delta_v = float(delta_v)

    def maps(self, pred: NdarrayOrTensor, labels: NdarrayOrTensor) -> dict[str, np.ndarray]:
        """
        The scores per voxel of ``labels``, 0 outside objects: ``embedding_spread`` (1 where the voxel's embedding
        lies farther than ``2 delta_v`` from its object's mean embedding, else 0) and, for a network with the head,
        ``head_uncertainty`` (``1 - |2 p - 1|``). An object's scores are their means over its voxels; as sums they
        add up over the parts of an object (a blockwise run scores each block's part and merges the sums).

        Labels on another grid than the output (the image's, when the network ran on a resampled one) are resized
        onto the output's for the maps (nearest neighbour), and the maps back onto the labels' grid.

        Returns:
            float32 arrays of the labels' spatial shape.
        """
        shape = check_network_output(pred, self.embedding_dim, self.method, "ObjectScores")
        lab = _check_labels(labels, "ObjectScores")
        if lab.ndim != len(shape):
            raise ValueError(
                f"ObjectScores needs labels (1, *S) of the network output's {len(shape) - 1} spatial axes, got "
                f"{tuple(lab.shape)}."
            )
        own = tuple(lab.shape[1:])
        if own != shape[1:]:
            lab = np.asarray(ResizeToMatch()(lab, shape[1:]))
        flat = lab.reshape(-1).astype(np.int64)
        out = np.asarray(convert_to_numpy(pred), dtype=np.float32).reshape(shape[0], -1)
        n = int(flat.max()) if flat.size else 0
        counts = np.maximum(np.bincount(flat, minlength=n + 1), 1).astype(np.float64)
        inside = flat > 0
        # squared distance to the object's mean, one channel at a time (no copy of the embeddings)
        dist2 = np.zeros(flat.shape, dtype=np.float32)
        for c in out[: self.embedding_dim]:
            mean = (np.bincount(flat, weights=c, minlength=n + 1) / counts).astype(np.float32)
            dist2 += np.square(c - mean[flat])
        result = {"embedding_spread": ((dist2 > (2.0 * self.delta_v) ** 2) & inside).astype(np.float32)}
        if shape[0] == self.n_emb + 1:
            unsure = (1.0 - np.abs(2.0 * expit(out[-1]) - 1.0)).astype(np.float32)
            result["head_uncertainty"] = np.where(inside, unsure, np.float32(0))
        maps = {k: v.reshape(1, *shape[1:]) for k, v in result.items()}
        if own != shape[1:]:
            maps = {k: ResizeToMatch()(v, own) for k, v in maps.items()}
        return {k: np.asarray(v)[0] for k, v in maps.items()}

    def __call__(self, pred: NdarrayOrTensor, labels: NdarrayOrTensor) -> list[dict[str, float]]:
        maps = self.maps(pred, labels)
        flat = np.asarray(convert_to_numpy(labels)).reshape(-1).astype(np.int64)
        n = int(flat.max()) if flat.size else 0
        if n == 0:
            return []
        voxels = np.bincount(flat, minlength=n + 1)
        sums = {k: np.bincount(flat, weights=m.reshape(-1), minlength=n + 1) for k, m in maps.items()}
        return score_rows(voxels, sums)


def score_rows(voxels: np.ndarray, sums: Mapping[str, np.ndarray]) -> list[dict[str, float]]:
    """
    The rows of :class:`ObjectScores` (:data:`SCORE_COLUMNS`, in id order) from per-object sums of its
    :meth:`~ObjectScores.maps`: ``voxels[k]`` and ``sums[name][k]`` for object id ``k`` (index 0 unused; objects of
    no voxels skipped). ``head_uncertainty`` is NaN and the score the spread alone without the head's map.
    """
    voxels = np.asarray(voxels)
    spread = np.asarray(sums["embedding_spread"], dtype=np.float64) / np.maximum(voxels, 1)
    head = sums.get("head_uncertainty")
    head = None if head is None else np.asarray(head, dtype=np.float64) / np.maximum(voxels, 1)
    rows = []
    for k in np.flatnonzero(voxels[1:] > 0) + 1:
        unsure = float(head[k]) if head is not None else float("nan")
        rows.append(
            {
                "id": int(k),
                "voxels": int(voxels[k]),
                "score": max(unsure, float(spread[k])) if head is not None else float(spread[k]),
                "head_uncertainty": unsure,
                "embedding_spread": float(spread[k]),
            }
        )
    return rows


def ranked_table(
    scores: Sequence[Mapping[str, Any]], geometry: Mapping[int, tuple[Sequence[float], Sequence[int], Sequence[int]]]
) -> list[dict[str, Any]]:
    """
    The scored objects that have a ``geometry`` (id -> centroid, first and last voxel per axis, in the image's
    voxels), most unsure first: each row with its ``rank``, its scores (floats to 4 digits), ``centroid_<axis>``
    and the inclusive bounding box ``<axis>_min`` / ``<axis>_max`` (:data:`AXES`).
    """
    rows: list[dict[str, Any]] = []
    for r in sorted((r for r in scores if r["id"] in geometry), key=lambda r: -r["score"]):
        centre, lo, hi = geometry[r["id"]]
        axes = AXES[len(centre)]
        row = {"rank": len(rows) + 1, **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}}
        row.update({f"centroid_{a}": round(float(c), 1) for a, c in zip(axes, centre)})
        for a, first, last in zip(axes, lo, hi):
            row[f"{a}_min"], row[f"{a}_max"] = int(first), int(last)
        rows.append(row)
    return rows


class ObjectScoresd(MapTransform):
    """
    Dictionary version of :class:`ObjectScores`: scores the objects of the labels under ``keys`` with the network
    output kept under ``output_key`` (MONAI's ``CopyItemsd`` before the clustering) and puts the rows under
    ``scores_key``; the kept output is dropped (it is as large as the output itself).

    Args:
        keys: the instance labels (one key; ``"pred"`` after the clustering).
        output_key: the network output kept before the clustering.
        scores_key: where the rows go.
        kwargs: :class:`ObjectScores`'s arguments.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_key: str = "network_output",
        scores_key: str = "object_scores",
        **kwargs: Any,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"ObjectScoresd scores one label image, got keys {self.keys}.")
        self.output_key, self.scores_key = output_key, scores_key
        self.scores = ObjectScores(**kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.output_key not in d:
            raise KeyError(
                f"ObjectScoresd needs the network output under '{self.output_key}' (CopyItemsd of 'pred' before the "
                "clustering)."
            )
        output = d.pop(self.output_key)
        for key in self.key_iterator(d):
            d[self.scores_key] = self.scores(output, d[key])
        return d
