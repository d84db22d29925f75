"""
Simulated background scribbles, for the accuracy benchmark's *+ background strokes* protocol (``spoco_scribbles``).

An annotator who outlines a few objects in napari, Fiji or 3D Slicer can add a few strokes on background in seconds;
with them (``--background_label B``, the bundle's own option) the foreground head learns from the painted background
too. The benchmark starts from fully labelled images, so it simulates those strokes: :class:`SimulateScribbles` paints
thin, smooth random paths inside the true background of *dense* ground truth, away from the objects, covering a small
fraction of it; in 3D on a few slices, as people annotate volumes. The strokes get the id ``background_label``, which
the training's :class:`~spoco_bundle.transforms.SparseInstanceLabel` then turns into annotated background (-1),
exactly as for strokes a user painted.

It is the lab's, not the bundle's (copied from ``spoco_bundle/scribbles.py`` as of commit 7c97b4b): the overlay
``research/configs/scribbles.json`` puts :class:`SimulateScribblesd` in front of ``configs/train.json``'s
transforms::

    python -m monai.bundle run training --config_file "['configs/train.json','research/configs/scribbles.json']" \
        --background_label 65535 ...
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_numpy
from scipy import ndimage

from spoco_bundle.io import split_image_suffix

__all__ = ["SimulateScribbles", "SimulateScribblesd", "scribble_slice"]


def _filename(data: Any, meta: Mapping | None = None) -> str | None:
    """``filename_or_obj`` from a MetaTensor or a meta dict, if any."""
    if isinstance(data, MetaTensor):
        meta = data.meta
    name = (meta or {}).get("filename_or_obj")
    return None if name is None else str(name)


def _label_name(filename: str | None) -> str:
    """The file name with its folder and image suffix stripped ("" for none): what seeds the strokes."""
    return "" if not filename else split_image_suffix(filename)[0]


def item_name(data: Mapping, key: Hashable) -> str:
    """The file name (folder and suffix stripped) of ``data[key]``, from its MetaTensor or ``{key}_meta_dict``; ""
    when there is none."""
    return _label_name(_filename(data.get(key), data.get(f"{key}_meta_dict")))


def _rng(seed: int, name: str) -> np.random.Generator:
    # a stable seed from (seed, file name): Python's hash() is salted per process
    digest = hashlib.sha256(f"scribbles|{int(seed)}|{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2


def scribble_slice(
    background: np.ndarray,
    strokes: int,
    rng: np.random.Generator,
    width: int = 3,
    length: float = 0.25,
    margin: int = 2,
    max_pixels: int | None = None,
) -> np.ndarray:
    """
    Thin random strokes inside the background of one 2D slice.

    Each stroke starts at a random pixel at least ``margin + width // 2`` pixels away from any object, walks with a
    slowly turning direction (a smooth path, as drawn by hand) for up to ``length * min(H, W)`` pixels, stops where
    it would come closer to an object than that, and is widened to ``width`` pixels. Strokes stop once
    ``max_pixels`` are painted.

    Args:
        background: ``(H, W)`` bool, the true background.
        strokes: number of strokes.
        rng: random generator (the caller seeds it per image).
        width: stroke width in pixels.
        length: stroke length as a fraction of the slice's smaller side.
        margin: minimum distance in pixels between a stroke's edge and an object.
        max_pixels: cap on the painted pixels (None: no cap).

    Returns:
        ``(H, W)`` bool mask of the stroke pixels (a subset of ``background``).
    """
    if background.ndim != 2:
        raise ValueError(f"background must be 2D, got shape {background.shape}.")
    out = np.zeros(background.shape, dtype=bool)
    if strokes <= 0 or not background.any():
        return out
    radius = max(int(width) // 2, 0)
    # the pixels a stroke's centre line may visit: far enough from every object (and from unknown borders)
    allowed = ndimage.distance_transform_edt(np.pad(background, 1, constant_values=True))[1:-1, 1:-1]
    allowed = allowed > margin + radius
    starts = np.flatnonzero(allowed)
    if starts.size == 0:
        return out
    h, w = background.shape
    steps = max(int(length * min(h, w)), 1)
    brush = _disk(radius)
    cap = np.inf if max_pixels is None else int(max_pixels)
    for _ in range(int(strokes)):
        y, x = np.unravel_index(starts[rng.integers(starts.size)], background.shape)
        pos = np.array([y, x], dtype=np.float64)
        angle = rng.uniform(0, 2 * np.pi)
        line = np.zeros_like(out)
        line[y, x] = True
        for _ in range(steps):
            angle += rng.normal(0.0, 0.25)
            nxt = pos + (np.sin(angle), np.cos(angle))
            iy, ix = int(round(nxt[0])), int(round(nxt[1]))
            if not (0 <= iy < h and 0 <= ix < w and allowed[iy, ix]):
                break
            pos = nxt
            line[iy, ix] = True
        stroke = ndimage.binary_dilation(line, structure=brush) & background if radius else line
        new = stroke & ~out
        if out.sum() + new.sum() > cap:
            break
        out |= new
    return out


class SimulateScribbles(Transform):
    """
    Paint simulated background scribbles into a dense instance label map (see the module docstring).

    In 2D the image gets ``strokes`` strokes; in 3D, ``slices`` slices along the first spatial axis (evenly spread
    over the slices that have background) get ``strokes`` strokes each, as people annotate volumes slice by slice.
    At most ``max_fraction`` of the background is painted. The strokes depend only on ``seed`` and the file name
    (``filename_or_obj`` of a MetaTensor, or ``name``), so the transform is deterministic and can be cached.
    ``strokes=0`` returns the labels unchanged.

    Args:
        strokes: strokes per image (2D) or per annotated slice (3D); 0 = off.
        background_label: the id the strokes get; must not be an object id of the image. Use the same id as
            ``background_label`` of :class:`~spoco_bundle.transforms.SparseInstanceLabel` (training's
            ``background_label``), which makes it annotated background.
        width: stroke width in pixels.
        length: stroke length as a fraction of the slice's smaller side.
        max_fraction: cap on the painted fraction of the background.
        slices: annotated slices per 3D volume.
        margin: minimum distance in pixels between a stroke and an object.
        seed: stroke seed.

    Input: dense integer labels ``(1, *spatial)`` or ``(*spatial)`` with 0 = background (numpy array, tensor or
    MetaTensor), 2 or 3 spatial dimensions. Output: same kind, shape and dtype, strokes set to ``background_label``.
    """

    backend = [np.ndarray, torch.Tensor]

    def __init__(
        self,
        strokes: int = 4,
        background_label: int | None = None,
        width: int = 3,
        length: float = 0.25,
        max_fraction: float = 0.02,
        slices: int = 3,
        margin: int = 2,
        seed: int = 0,
    ) -> None:
        if int(strokes) < 0:
            raise ValueError(f"strokes must be >= 0, got {strokes}.")
        if int(strokes) > 0 and background_label is None:
            raise ValueError(
                "scribbles need a background_label: the id the strokes get, one that no object uses "
                "(e.g. --background_label 65535)."
            )
        if int(strokes) > 0 and int(background_label) <= 0:
            raise ValueError(f"background_label for scribbles must be a positive id, got {background_label}.")
        if not 0.0 < float(max_fraction) <= 1.0:
            raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}.")
        if int(width) < 1 or float(length) <= 0 or int(slices) < 1 or int(margin) < 0:
            raise ValueError(
                f"width >= 1, length > 0, slices >= 1 and margin >= 0 needed, got {width}, {length}, {slices}, "
                f"{margin}."
            )
        self.strokes = int(strokes)
        self.background_label = None if background_label is None else int(background_label)
        self.width, self.length, self.margin = int(width), float(length), int(margin)
        self.max_fraction, self.slices, self.seed = float(max_fraction), int(slices), int(seed)

    def mask(self, labels: np.ndarray, name: str = "") -> np.ndarray:
        """The stroke pixels (bool, shape of ``labels``) for spatial labels ``(H, W)`` or ``(D, H, W)``."""
        if labels.ndim not in (2, 3):
            raise ValueError(f"labels must have 2 or 3 spatial dimensions, got shape {labels.shape}.")
        background = labels == 0
        rng = _rng(self.seed, name)
        cap = int(self.max_fraction * background.sum())
        kw = dict(width=self.width, length=self.length, margin=self.margin)
        if labels.ndim == 2:
            return scribble_slice(background, self.strokes, rng, max_pixels=cap, **kw)
        out = np.zeros(labels.shape, dtype=bool)
        candidates = np.flatnonzero(background.reshape(background.shape[0], -1).any(1))
        if candidates.size == 0:
            return out
        n = min(self.slices, candidates.size)
        chosen = candidates[np.round(np.linspace(0, candidates.size - 1, n + 2)[1:-1]).astype(int)]
        for z in np.unique(chosen):
            out[z] = scribble_slice(background[z], self.strokes, rng, max_pixels=max(cap // n, 1), **kw)
        return out

    def __call__(self, label: Any, name: str | None = None) -> Any:
        """
        Args:
            label: dense integer instance labels, 0 = background.
            name: image name for the strokes' seed; default: the MetaTensor's ``filename_or_obj``, else "".
        """
        if self.strokes == 0:
            return label
        filename = _filename(label)
        if name is None:
            name = _label_name(filename)
        arr = convert_to_numpy(label)
        squeeze = arr.ndim in (3, 4) and arr.shape[0] == 1
        spatial = arr[0] if squeeze else arr
        if spatial.ndim not in (2, 3):
            raise ValueError(f"{filename or 'label'}: expected a 2D or 3D label image, got shape {arr.shape}.")
        if np.any(spatial == self.background_label):
            raise ValueError(
                f"{filename or 'label'}: background_label {self.background_label} is already used in this label "
                "image; scribbles are simulated on dense ground truth only. Pick an id no object uses."
            )
        strokes = self.mask(spatial, name)
        out = np.array(arr, copy=True)
        (out[0] if squeeze else out)[strokes] = self.background_label
        return convert_to_dst_type(out, dst=label, dtype=arr.dtype)[0]


class SimulateScribblesd(MapTransform):
    """
    Dictionary version of :class:`SimulateScribbles`.

    Args:
        keys: label keys (dense labels, 0 = background).
        strokes, background_label, width, length, max_fraction, slices, margin, seed: see :class:`SimulateScribbles`.
        name_key: key whose file name seeds the strokes (default: each label's own file name).
        allow_missing_keys: don't raise for missing keys.
    """

    backend = SimulateScribbles.backend

    def __init__(
        self,
        keys: KeysCollection,
        strokes: int = 4,
        background_label: int | None = None,
        width: int = 3,
        length: float = 0.25,
        max_fraction: float = 0.02,
        slices: int = 3,
        margin: int = 2,
        seed: int = 0,
        name_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.simulate = SimulateScribbles(strokes, background_label, width, length, max_fraction, slices, margin, seed)
        self.name_key = name_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.simulate(d[key], name=item_name(d, self.name_key if self.name_key is not None else key))
        return d
