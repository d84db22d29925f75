"""How unsure the model is about each object it found: the scores behind ``spoco suggest`` (what to outline next)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_numpy
from scipy.special import expit

from spoco_bundle.postprocessing._common import _check_labels, _check_method, check_network_output, embedding_channels

__all__ = ["SCORE_COLUMNS", "ObjectScores", "ObjectScoresd"]

# the per-object columns ObjectScores returns, in order
SCORE_COLUMNS = ("id", "voxels", "score", "head_uncertainty", "embedding_spread")


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

    Input: the network output ``(C, *S)`` and the instance labels ``(1, *S)`` on the same grid.

    Output: one dict per object (:data:`SCORE_COLUMNS`), in id order.

    Raises:
        ValueError: an output or labels of the wrong shape, or labels on another grid than the output.
    """

    def __init__(self, embedding_dim: int = 16, delta_v: float = 0.5, method: str = "watershed") -> None:
        if not delta_v > 0:
            raise ValueError(f"delta_v must be positive, got {delta_v!r}.")
        self.embedding_dim = int(embedding_dim)
        self.method = _check_method(method)
        self.n_emb = embedding_channels(embedding_dim, method)
        self.delta_v = float(delta_v)

    def __call__(self, pred: NdarrayOrTensor, labels: NdarrayOrTensor) -> list[dict[str, float]]:
        shape = check_network_output(pred, self.embedding_dim, self.method, "ObjectScores")
        lab = _check_labels(labels, "ObjectScores")
        if tuple(lab.shape[1:]) != shape[1:]:
            raise ValueError(
                f"ObjectScores needs the labels on the network output's grid {shape[1:]}, got {tuple(lab.shape[1:])}."
            )
        flat = lab.reshape(-1).astype(np.int64)
        n = int(flat.max()) if flat.size else 0
        if n == 0:
            return []
        out = np.asarray(convert_to_numpy(pred), dtype=np.float32).reshape(shape[0], -1)
        counts = np.bincount(flat, minlength=n + 1).astype(np.float64)
        inside = flat > 0
        ids, emb = flat[inside], out[: self.embedding_dim, inside]
        means = np.stack([np.bincount(ids, weights=c, minlength=n + 1) for c in emb]) / np.maximum(counts, 1)
        far = np.linalg.norm(emb - means[:, ids], axis=0) > 2.0 * self.delta_v
        spread = np.bincount(ids, weights=far, minlength=n + 1) / np.maximum(counts, 1)
        has_head = shape[0] == self.n_emb + 1
        if has_head:
            p = expit(out[-1, inside])
            unsure = np.bincount(ids, weights=1.0 - np.abs(2.0 * p - 1.0), minlength=n + 1) / np.maximum(counts, 1)
        rows = []
        for k in np.flatnonzero(counts[1:]) + 1:
            head = float(unsure[k]) if has_head else float("nan")
            score = max(head, float(spread[k])) if has_head else float(spread[k])
            rows.append(
                {
                    "id": int(k),
                    "voxels": int(counts[k]),
                    "score": score,
                    "head_uncertainty": head,
                    "embedding_spread": float(spread[k]),
                }
            )
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
