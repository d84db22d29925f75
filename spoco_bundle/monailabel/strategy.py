"""
A MONAI Label active-learning strategy that serves the image whose objects the model is least sure of, and shows
which objects those are.

The stock strategies serve images at random or in order. :class:`UncertainObjects` scores every unlabeled study with
the deployed bundle as ``spoco suggest`` does (``configs/inference.json`` + ``configs/suggest.json``: per object, the
foreground head's uncertainty and the embeddings' spread; per image, the mean of its ``top`` most unsure objects) and
serves the study with the highest score. For every scored study it keeps, in the datastore:

- its image info ``spoco_uncertainty``: ``score``, the ``top`` objects (rank, id, score, centroid, bounding box, in
  the image's voxels) and the model it was scored with. MONAI Label returns a served image's info with it, so the
  client receives the objects too;
- the label ``spoco_suggestions`` (a label tag of its own: it never counts as an annotation): the ``top`` objects of
  the segmentation, each with its rank as its value (1 = the most unsure), for the client to show over the image.

Scores are computed when a study has none from the current weights (new studies, or after a training replaced
``models/model.pt``), in the server's process, at the request that needs them; later requests read them back.
:mod:`spoco_bundle.monailabel.server` registers one strategy per deployed SPOCO bundle, named ``<model>_uncertain``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from spoco_bundle.bundle import config_workflow
from spoco_bundle.errors import root_cause
from spoco_bundle.handlers.suggestions import read_suggestions
from spoco_bundle.io import read_image, split_image_suffix, write_label_image

__all__ = ["UncertainObjects", "INFO_KEY", "LABEL_TAG", "is_spoco_bundle", "strategies_for"]

logger = logging.getLogger(__name__)

INFO_KEY = "spoco_uncertainty"
LABEL_TAG = "spoco_suggestions"


def is_spoco_bundle(path: str | os.PathLike) -> bool:
    """Whether the bundle folder ``path`` is this bundle (it has the suggestions overlay and the package)."""
    path = Path(path)
    return (path / "configs" / "suggest.json").is_file() and (path / "spoco_bundle").is_dir()


def strategies_for(models: dict[str, Any], top: int = 10) -> dict[str, "UncertainObjects"]:
    """``{"<model>_uncertain": UncertainObjects}`` for each deployed SPOCO bundle among the app's ``models``
    (``{name: bundle folder}``, as the ``monaibundle`` app keeps them)."""
    return {
        f"{name}_uncertain": UncertainObjects(str(path), top=top)
        for name, path in (models or {}).items()
        if isinstance(path, (str, os.PathLike)) and is_spoco_bundle(path)
    }


class UncertainObjects(Strategy):
    """
    Serves the unlabeled study whose ``top`` most unsure objects score highest (see the module's description).

    Args:
        bundle: the deployed bundle folder (``apps/<app>/model/<name>``); its ``models/model.pt`` is used.
        top: objects per image in the image's score, its info and its ``spoco_suggestions`` label.
    """

    def __init__(self, bundle: str, top: int = 10) -> None:
        super().__init__("The image whose objects the SPOCO model is least sure of (spoco suggest)")
        if top < 1:
            raise ValueError(f"top must be a positive number of objects, got {top}.")
        self.bundle = Path(bundle)
        self.top = int(top)

    @property
    def weights(self) -> Path:
        return self.bundle / "models" / "model.pt"

    def model_stamp(self) -> str:
        """Which weights scores came from: the checkpoint's size and modification time (a training replaces it)."""
        stat = self.weights.stat()
        return f"{stat.st_size}-{stat.st_mtime_ns}"

    def __call__(self, request: dict, datastore: Datastore) -> dict | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        stamp = self.model_stamp()
        stale = [i for i in images if (datastore.get_image_info(i).get(INFO_KEY) or {}).get("model") != stamp]
        if stale:
            self.score(stale, datastore, stamp)
        scores = {}
        for image in images:
            info = datastore.get_image_info(image).get(INFO_KEY) or {}
            if info.get("model") == stamp and "score" in info:
                scores[image] = float(info["score"])
        if not scores:
            return None
        best = max(sorted(scores), key=lambda i: scores[i])
        logger.info(f"{request.get('strategy')}: {best} (score {scores[best]:.3f} of {len(scores)} unlabeled images)")
        return {"id": best, INFO_KEY: datastore.get_image_info(best)[INFO_KEY]}

    def score(self, images: list[str], datastore: Datastore, stamp: str | None = None) -> None:
        """Segment ``images`` (datastore ids) with the bundle and the suggestions overlay, and store each one's score,
        objects and ``spoco_suggestions`` label in the datastore."""
        stamp = stamp or self.model_stamp()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="spoco-uncertain-") as tmp:
            source, out = Path(tmp) / "images", Path(tmp) / "out"
            source.mkdir()
            suffixes = {}
            for image in images:
                uri = datastore.get_image_uri(image)
                suffixes[image] = split_image_suffix(os.path.basename(uri))[1]
                os.symlink(os.path.abspath(uri), source / f"{image}{suffixes[image]}")  # the output is named by id
            workflow = config_workflow(
                ["inference.json", "suggest.json"],
                "infer",
                root=self.bundle,
                ckpt_path=str(self.weights),
                dataset_dir=str(source),
                output_dir=str(out),
                suggest_top=self.top,
            )
            failure = None
            try:
                workflow.initialize()
                workflow.run()
            except Exception as e:  # per-study failures are raised at the end: the other studies are scored
                failure = root_cause(e)
            finally:
                workflow.finalize()
            stored = [image for image in images if self._store(image, out, suffixes[image], datastore, stamp)]
            if failure is not None:
                if not stored:
                    raise failure
                logger.warning(f"{len(images) - len(stored)} of {len(images)} image(s) not scored: {failure}")
        logger.info(f"scored {len(images)} image(s) for what to outline next in {time.perf_counter() - start:.1f} s")

    def _store(self, image: str, out: Path, suffix: str, datastore: Datastore, stamp: str) -> bool:
        """Whether ``image`` was scored; one that was not (it could not be segmented) is kept out until the weights
        change."""
        table, labels_file = out / f"{image}_suggestions.csv", out / f"{image}_instances{suffix}"
        if not table.is_file() or not labels_file.is_file():
            datastore.update_image_info(image, {INFO_KEY: {"model": stamp, "error": "could not be segmented"}})
            return False
        objects = read_suggestions(table)[: self.top]
        score = float(np.mean([o["score"] for o in objects])) if objects else 0.0
        labels, meta = read_image(labels_file)
        ranked = np.zeros(labels.shape, np.uint16)
        for o in objects:
            ranked[labels == o["id"]] = o["rank"]
        path = write_label_image(out / f"{image}_{LABEL_TAG}{suffix}", ranked, meta)
        datastore.save_label(image, path, LABEL_TAG, {"model": stamp, "values": "rank of the object, 1 = most unsure"})
        datastore.update_image_info(
            image, {INFO_KEY: {"score": round(score, 4), "objects": objects, "model": stamp, "top": self.top}}
        )
        return True
