"""Loading and label transforms of the SPOCO bundle (array and dictionary versions, MONAI style).

Label convention after :class:`SparseInstanceLabel`: int64, 0 = unlabeled (never background), 1..K = annotated
objects (consecutive), -1 = annotated background (only when a background id is configured).

Loading in a config (the entries of :func:`load_transforms`; keep ``LoadVolumed`` a top-level entry so that
MONAI Label can swap it for its own loader)::

    {"_target_": "spoco_bundle.io.LoadVolumed", "keys": ["image", "label"]},
    {"_target_": "EnsureChannelFirstd", "keys": ["image", "label"], "channel_dim": "no_channel"},
    {"_target_": "spoco_bundle.transforms.EnsureSpatialDimsd", "keys": ["image", "label"], "spatial_dims": 3},
    {"_target_": "spoco_bundle.transforms.CheckImageLabeld", "keys": ["image", "label"], "spatial_dims": 3},
    {"_target_": "CastToTyped", "keys": "image", "dtype": "$np.float32"},
    {"_target_": "CastToTyped", "keys": "label", "dtype": "$torch.int64"},
    {"_target_": "spoco_bundle.transforms.SparseInstanceLabeld", "keys": "label", "instance_ratio": 0.1}

No Orientation or Spacing transform: arrays stay in the file's storage order (see :mod:`spoco_bundle.io`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import CastToTyped, EnsureChannelFirst, EnsureChannelFirstd, MapTransform, Resize, Transform
from monai.utils import (
    MetaKeys,
    TransformBackends,
    convert_to_dst_type,
    convert_to_numpy,
    ensure_tuple,
)

from spoco_bundle.data import (
    check_image_array,
    check_label_array,
    check_same_shape,
    spatial_squeeze_axes,
)
from spoco_bundle.io import LoadVolumed, split_image_suffix
from spoco_bundle.postprocessing import (
    ClusterInstances,
    ForegroundMask,
    RemoveSmallInstances,
    SplitByShape,
    check_network_output,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ClusterEmbeddings",
    "ClusterEmbeddingsd",
    "LoadForegroundMaskd",
    "object_priority",
    "smooth_field_grid",
    "SparseInstanceLabel",
    "SparseInstanceLabeld",
    "EnsureSpatialDims",
    "EnsureSpatialDimsd",
    "CheckImageLabel",
    "CheckImageLabeld",
    "load_transforms",
    "check_scale",
    "Rescale",
    "Rescaled",
    "tophat_background",
    "TopHat",
    "TopHatd",
]


def _filename(data: Any, meta: Mapping | None = None) -> str | None:
    """``filename_or_obj`` from a MetaTensor or a meta dict, if any."""
    if isinstance(data, MetaTensor):
        meta = data.meta
    name = (meta or {}).get("filename_or_obj")
    return None if name is None else str(name)


# ----------------------------------------------------------------------------------------------------------------
# sparse instance labels
# ----------------------------------------------------------------------------------------------------------------

_M64 = np.uint64


# ids above this mark calibration objects (SparseInstanceLabel calibration_holdout; read by SpocoLoss). Below 2**24 by
# a margin: spatial transforms may carry labels as float32, which holds integers exactly only up to 2**24
CALIBRATION_ID_OFFSET = 1 << 20
# ids above this are copies pasted by spoco_bundle.copy_paste: objects for the embedding terms, left out of the
# foreground head's loss and of its label frequency (a head trained on copies of the annotated objects memorises them);
# the per-batch Lee & Liu histograms and the self-training fraction still count them as unlabeled voxels
PASTED_ID_OFFSET = 1 << 21


def object_priority(ids: np.ndarray, seed: int, name: str = "") -> np.ndarray:
    """
    A pseudo-random uint64 key per object id that depends only on ``(seed, name, id)``.

    Objects with the smallest keys are kept. Because each key ignores the other ids and the call order, the kept
    set is the same in every epoch, worker and method, and a smaller ``instance_ratio`` keeps a subset of the
    objects a larger one keeps. ``name`` is the image's file name without folder and suffix, so the same file gives
    the same choice wherever it is stored. The hash is splitmix64 over the id xor a SHA-256 salt (Python's
    ``hash`` is salted per process, so it would not be reproducible).
    """
    salt = int.from_bytes(hashlib.sha256(f"{int(seed)}|{name}".encode()).digest()[:8], "little")
    z = np.asarray(ids).astype(np.int64).astype(_M64) ^ _M64(salt)
    with np.errstate(over="ignore"):
        z = z + _M64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _M64(30))) * _M64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _M64(27))) * _M64(0x94D049BB133111EB)
    return z ^ (z >> _M64(31))


def _label_name(filename: str | None) -> str:
    return "" if not filename else split_image_suffix(filename)[0]


def item_name(data: Mapping, key: Hashable) -> str:
    """The file name (folder and suffix stripped) of ``data[key]`` that seeds per-image choices, from its
    MetaTensor or ``{key}_meta_dict``; "" when there is none."""
    return _label_name(_filename(data.get(key), data.get(f"{key}_meta_dict")))


class SparseInstanceLabel(Transform):
    """
    Simulate sparse annotation: keep a reproducible subset of the objects of a dense instance label map and
    relabel them ``1..K``; every other object becomes 0 (unlabeled).

    Objects are the nonzero ids other than ``background_label``. ``n_keep = floor(instance_ratio * n + 0.5)``
    (round half up), at least 1 when ``n > 0`` and ``instance_ratio > 0``. Which objects are kept depends only on
    ``seed``, the file name (``filename_or_obj`` of a MetaTensor, folder and suffix stripped, or ``name``) and the
    ids (see :func:`object_priority`), never on call order; so the transform is deterministic on purpose (not
    ``Randomizable``) and can be cached. Kept objects are renumbered ``1..K`` in increasing order of their
    original ids.

    With ``calibration_holdout`` f > 0, each kept object is, independently with probability f (a hash of
    ``(seed, name, id)`` again, so the choice is fixed), a *calibration object*: relabelled
    ``CALIBRATION_ID_OFFSET + 1..`` instead of ``1..``. It is an annotated object like any other for the embedding
    terms, but the foreground head is not trained on it and the label frequency ``c`` is estimated on these alone
    (:class:`~spoco_bundle.losses.SpocoLoss` ``foreground_calibration_holdout``): on the objects a head fits, its
    mean overstates ``c``.

    With ``background_label`` set, voxels with that id become -1 (annotated background). ``background_label=0``
    is for dense ground truth whose 0 is true background: 0 becomes -1 and the dropped objects become 0, which is
    then the only unlabeled region. With ``background_label=None``, 0 stays 0 (unlabeled).

    Args:
        instance_ratio: fraction of objects to keep, in [0, 1]; 1.0 keeps all (dense labels, relabelled).
        background_label: id of annotated background, or None.
        seed: selection seed.
        calibration_holdout: probability that a kept object becomes a calibration object, in [0, 1).

    Input: integer label map of any shape, typically ``(1, *spatial)``; numpy array, tensor or MetaTensor.
    Floating input is accepted only when every value is a whole number; negative ids raise ValueError.

    Output: int64 of the same kind (numpy array / tensor / MetaTensor with its meta), same shape and device.
    """

    backend = [np.ndarray, torch.Tensor]

    def __init__(
        self,
        instance_ratio: float = 1.0,
        background_label: int | None = None,
        seed: int = 0,
        calibration_holdout: float = 0.0,
    ) -> None:
        if not 0.0 <= float(instance_ratio) <= 1.0:
            raise ValueError(f"instance_ratio must be in [0, 1], got {instance_ratio}.")
        if not 0.0 <= float(calibration_holdout) < 1.0:
            raise ValueError(f"calibration_holdout must be in [0, 1), got {calibration_holdout}.")
        self.instance_ratio = float(instance_ratio)
        self.background_label = None if background_label is None else int(background_label)
        self.seed = int(seed)
        self.calibration_holdout = float(calibration_holdout)

    def calibration_ids(self, kept: np.ndarray, name: str = "") -> np.ndarray:
        """Which of the ``kept`` ids are calibration objects (a bool per id)."""
        if self.calibration_holdout <= 0 or len(kept) == 0:
            return np.zeros(len(kept), dtype=bool)
        keys = object_priority(kept, self.seed, f"calibration|{name}")
        return keys.astype(np.float64) / 2.0**64 < self.calibration_holdout

    def num_kept(self, num_objects: int) -> int:
        """Number of objects kept out of ``num_objects``."""
        if num_objects == 0 or self.instance_ratio == 0.0:
            return 0
        return min(num_objects, max(1, int(np.floor(self.instance_ratio * num_objects + 0.5))))

    def kept_ids(self, ids: Sequence[int] | np.ndarray, name: str = "") -> np.ndarray:
        """The sorted object ids kept from ``ids`` (object ids only: no 0, no background) for image ``name``."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        n_keep = self.num_kept(len(ids))
        order = np.argsort(object_priority(ids, self.seed, name), kind="stable")
        return np.sort(ids[order[:n_keep]])

    def __call__(self, label: Any, name: str | None = None) -> Any:
        """
        Args:
            label: dense integer instance labels.
            name: image name for the selection; default: the MetaTensor's ``filename_or_obj``, else "".
        """
        filename = _filename(label)
        if name is None:
            name = _label_name(filename)
        arr = convert_to_numpy(label)
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
                raise ValueError(f"{filename or 'label'}: labels must be integer ids, got non-integer float values.")
        arr = arr.astype(np.int64, copy=False)
        if arr.size and arr.min() < 0:
            raise ValueError(
                f"{filename or 'label'}: labels contain negative values (min {arr.min()}); expected dense ids >= 0."
            )
        max_id = int(arr.max()) if arr.size else 0
        if max_id < max(2**20, 4 * arr.size):  # small ids: bincount + lookup table, O(N)
            present = np.flatnonzero(np.bincount(arr.ravel(), minlength=max_id + 1))
            inverse = None
        else:  # huge ids (e.g. uint32 hashes): sort-based
            present, inverse = np.unique(arr, return_inverse=True)
        is_object = present != 0
        if self.background_label is not None:
            is_object &= present != self.background_label
        kept = self.kept_ids(present[is_object], name)
        if self.calibration_holdout > 0 and len(kept) >= CALIBRATION_ID_OFFSET:
            raise ValueError(
                f"{filename or 'label'}: {len(kept)} objects kept, too many for calibration_holdout (at most "
                f"{CALIBRATION_ID_OFFSET - 1})."
            )
        new_values = np.zeros(len(present), dtype=np.int64)
        held = self.calibration_ids(kept, name)
        new_values[np.searchsorted(present, kept[~held])] = np.arange(1, int((~held).sum()) + 1)
        new_values[np.searchsorted(present, kept[held])] = CALIBRATION_ID_OFFSET + np.arange(1, int(held.sum()) + 1)
        if self.background_label is not None:
            new_values[present == self.background_label] = -1
        if inverse is None:
            lut = np.zeros(max_id + 1, dtype=np.int64)
            lut[present] = new_values
            out = lut[arr]
        else:
            out = new_values[inverse.reshape(arr.shape)]
        return convert_to_dst_type(out, dst=label, dtype=torch.int64 if isinstance(label, torch.Tensor) else np.int64)[
            0
        ]


class SparseInstanceLabeld(MapTransform):
    """
    Dictionary version of :class:`SparseInstanceLabel`.

    Args:
        keys: label keys.
        instance_ratio: fraction of objects to keep, in [0, 1].
        background_label: id of annotated background (becomes -1), or None.
        seed: selection seed.
        name_key: key whose file name drives the selection (e.g. ``"image"``); default: each label's own file name
            (``filename_or_obj`` of the MetaTensor or of ``{key}_meta_dict``).
        allow_missing_keys: don't raise for missing keys.
        calibration_holdout: see :class:`SparseInstanceLabel`.
    """

    backend = SparseInstanceLabel.backend

    def __init__(
        self,
        keys: KeysCollection,
        instance_ratio: float = 1.0,
        background_label: int | None = None,
        seed: int = 0,
        name_key: str | None = None,
        allow_missing_keys: bool = False,
        calibration_holdout: float = 0.0,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.sparsify = SparseInstanceLabel(instance_ratio, background_label, seed, calibration_holdout)
        self.name_key = name_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.sparsify(d[key], name=item_name(d, self.name_key if self.name_key is not None else key))
        return d


# ----------------------------------------------------------------------------------------------------------------
# dimensionality and sanity checks after loading
# ----------------------------------------------------------------------------------------------------------------


def _drop_affine_axes(affine: Any, axes: Sequence[int]) -> Any:
    """Remove spatial ``axes`` (descending) from a homogeneous affine, keeping its size (identity fills in)."""
    a = convert_to_numpy(affine, wrap_sequence=True).astype(np.float64)
    rank = a.shape[0] - 1
    r = rank
    for ax in axes:
        if ax < r:  # axes beyond the affine's rank (e.g. NIfTI dim 4) have no geometry
            keep = [i for i in range(r + 1) if i != ax]
            a = a[np.ix_(keep, keep)]
            r -= 1
    if r < rank:
        a = to_affine_nd(rank, a)
    return convert_to_dst_type(a, dst=affine)[0]


class EnsureSpatialDims(Transform):
    """
    Drop singleton axes of a channel-first ``(C, *S)`` array so that it has exactly ``spatial_dims`` spatial axes,
    with the rule of :func:`spoco_bundle.data.spatial_squeeze_axes` (trailing singletons first, then leading).
    E.g. a 2D NIfTI stored as ``(H, W, 1)`` loads as ``(1, H, W, 1)`` and becomes ``(1, H, W)``.

    For a MetaTensor, ``affine``, ``original_affine`` (rows/columns of dropped axes removed, size kept) and
    ``spatial_shape`` are updated, so that writers see a consistent image.

    Args:
        spatial_dims: 2 or 3.

    Raises:
        ValueError: naming ``filename_or_obj`` when the spatial axes cannot be reduced to ``spatial_dims``.
    """

    backend = [np.ndarray, torch.Tensor]

    def __init__(self, spatial_dims: int = 3) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.spatial_dims = spatial_dims

    def __call__(self, img: Any) -> Any:
        axes = spatial_squeeze_axes(img.shape[1:], self.spatial_dims, _filename(img) or "image")
        if not axes:
            return img
        out = img
        for ax in axes:  # descending, so indices stay valid
            out = out.squeeze(ax + 1) if isinstance(out, torch.Tensor) else np.squeeze(out, axis=ax + 1)
        if isinstance(out, MetaTensor):
            out.affine = _drop_affine_axes(out.affine, axes)
            if MetaKeys.ORIGINAL_AFFINE in out.meta:
                out.meta[MetaKeys.ORIGINAL_AFFINE] = _drop_affine_axes(out.meta[MetaKeys.ORIGINAL_AFFINE], axes)
            out.meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(out.shape[1:])
            if hasattr(type(out), "spatial_ndim"):  # monai >= 1.6 caches it; the affine setter may miscount it
                out.spatial_ndim = out.ndim - 1
        return out


class EnsureSpatialDimsd(MapTransform):
    """Dictionary version of :class:`EnsureSpatialDims`."""

    backend = EnsureSpatialDims.backend

    def __init__(self, keys: KeysCollection, spatial_dims: int = 3, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.squeeze = EnsureSpatialDims(spatial_dims)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.squeeze(d[key])
        return d


class CheckImageLabel(Transform):
    """
    Cheap runtime guard after loading, with the rules of :func:`spoco_bundle.data.validate_datalist`:
    single channel, ``spatial_dims`` spatial axes, finite image values, integer (non-float) and non-negative
    labels, equal image/label spatial shapes. Returns its inputs unchanged.

    Labels must still have their file type here: load with ``dtype=None``
    (:class:`~spoco_bundle.io.LoadVolumed`) and cast after this check.

    Args:
        spatial_dims: 2 or 3.

    Raises:
        ValueError: naming ``filename_or_obj`` of the offending MetaTensor.
    """

    backend = [np.ndarray, torch.Tensor]

    def __init__(self, spatial_dims: int = 3) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.spatial_dims = spatial_dims

    def _channel(self, x: Any, name: str, what: str) -> Any:
        if x.ndim != self.spatial_dims + 1 or x.shape[0] != 1:
            raise ValueError(
                f"{name}: {what} has shape {tuple(x.shape)}, expected (1, *spatial) with {self.spatial_dims} "
                f"spatial dimensions (single channel, spatial_dims={self.spatial_dims})."
            )
        return x[0]

    def __call__(
        self, image: Any, label: Any = None, image_name: str | None = None, label_name: str | None = None
    ) -> tuple[Any, Any]:
        """
        Args:
            image: ``(1, *spatial)``.
            label: ``(1, *spatial)`` or None.
            image_name: name for messages; default ``filename_or_obj`` of the MetaTensor.
            label_name: likewise for the label.
        """
        image_name = image_name or _filename(image) or "image"
        img = self._channel(image, image_name, "image")
        check_image_array(img, self.spatial_dims, image_name)
        if label is not None:
            label_name = label_name or _filename(label) or "label"
            lab = self._channel(label, label_name, "label")
            check_label_array(lab, self.spatial_dims, label_name)
            check_same_shape(img.shape, lab.shape, image_name, label_name)
        return image, label


class CheckImageLabeld(MapTransform):
    """
    Dictionary version of :class:`CheckImageLabel`.

    Args:
        keys: the image key first, then any label keys (e.g. ``("image", "label")``; ``"image"`` alone checks the
            image only).
        spatial_dims: 2 or 3.
        allow_missing_keys: don't raise for missing keys (e.g. no label at inference).
    """

    backend = CheckImageLabel.backend

    def __init__(
        self, keys: KeysCollection = ("image", "label"), spatial_dims: int = 3, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.check = CheckImageLabel(spatial_dims)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_key, *label_keys = self.keys
        if image_key not in d:
            if not self.allow_missing_keys:
                raise KeyError(f"Key {image_key!r} not found in the data; available: {list(d)}.")
            return d
        image = d[image_key]
        image_name = _filename(image, d.get(f"{image_key}_meta_dict"))
        for key in label_keys:
            if key not in d:
                if not self.allow_missing_keys:
                    raise KeyError(f"Key {key!r} not found in the data (image {image_name}).")
                continue
            self.check(image, d[key], image_name, _filename(d[key], d.get(f"{key}_meta_dict")))
        if not label_keys or all(k not in d for k in label_keys):
            self.check(image, None, image_name)
        return d


def check_scale(scale: float | Sequence[float]) -> tuple[float, ...]:
    """``scale`` as a tuple of positive finite floats (one, or one per spatial axis); ValueError otherwise."""
    message = f"image_scale must be a positive number (or one per spatial axis), got {scale!r}."
    try:  # a string is a Sequence too: convert it whole, not per character
        values = tuple(
            float(s) for s in (scale if isinstance(scale, Sequence) and not isinstance(scale, str) else (scale,))
        )
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not values or not all(np.isfinite(s) and s > 0 for s in values):
        raise ValueError(message)
    return values


class Rescale(Transform):
    """
    Resamples a channel-first image by ``scale`` along each spatial axis (new size ``round(n * s)``, at least 1), so
    that training sees the objects at another size than the files have them: e.g. ``(1, 0.5, 0.5)`` turns voxels
    of 0.28 x 0.127 x 0.127 um into nearly isotropic ones of 0.28 x 0.25 x 0.25 um and the volume 4x smaller, so a
    training step covers 4x the tissue. Segment with the same factor (``image_scale`` in ``inference.json``,
    :class:`~spoco_bundle.inferers.ScaledInferer`), which writes the labels back on the input's grid.

    Images are resampled linearly (bilinear / trilinear) with Gaussian anti-aliasing where they shrink, labels with
    nearest neighbour ("nearest-exact", the same grid alignment as the linear mode), keeping their ids and dtype;
    objects smaller than a voxel of the new grid can disappear. MetaTensor affines are updated (MONAI ``Resize``).

    Args:
        scale: one factor for every spatial axis, or one per axis (``(D, H, W)`` order for 3D); 1 returns the input.
        mode: ``"linear"`` (images) or ``"nearest"`` (labels).

    Shapes:
        ``(C, *S)`` -> ``(C, *round(S * scale))``.

    Raises:
        ValueError: a non-positive or non-finite scale, an unknown mode, or one factor per axis that does not match
            the input's spatial axes (naming the file when the input is a MetaTensor).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, scale: float | Sequence[float] = 1.0, mode: str = "linear") -> None:
        if mode not in ("linear", "nearest"):
            raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}.")
        self.scale = check_scale(scale)
        self.mode = mode

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        spatial = tuple(int(n) for n in img.shape[1:])
        scale = self.scale * len(spatial) if len(self.scale) == 1 else self.scale
        if len(scale) != len(spatial):
            raise ValueError(
                f"{_filename(img) or 'image'}: image_scale has {len(scale)} factors but the image has "
                f"{len(spatial)} spatial axes {spatial}."
            )
        if all(s == 1.0 for s in scale):
            return img
        size = [max(1, round(n * s)) for n, s in zip(spatial, scale)]
        if self.mode == "nearest":
            resize = Resize(size, mode="nearest-exact", anti_aliasing=False)
        else:
            resize = Resize(size, mode="bilinear" if len(spatial) == 2 else "trilinear", anti_aliasing=True)
        out = resize(img)
        # Resize computes in float; labels get their integer type back (nearest values are exact ids)
        out, *_ = convert_to_dst_type(out, img, dtype=img.dtype)
        return out


class Rescaled(MapTransform):
    """
    Dictionary version of :class:`Rescale`.

    Args:
        keys: keys to resample.
        scale: one factor for every spatial axis, or one per axis.
        mode: one mode per key (``"linear"`` for images, ``"nearest"`` for labels), or one for all.
        allow_missing_keys: don't raise for missing keys.
    """

    backend = Rescale.backend

    def __init__(
        self,
        keys: KeysCollection,
        scale: float | Sequence[float] = 1.0,
        mode: str | Sequence[str] = "linear",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        modes = ensure_tuple(mode)
        if len(modes) == 1:
            modes = modes * len(self.keys)
        if len(modes) != len(self.keys):
            raise ValueError(f"{len(modes)} modes given for {len(self.keys)} keys {self.keys}.")
        self.rescalers = {key: Rescale(scale, m) for key, m in zip(self.keys, modes)}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.rescalers[key](d[key])
        return d


def tophat_background(image: np.ndarray, size: float) -> np.ndarray:
    """
    The slowly varying background of a 2D / 3D image: a grey opening with a box of about ``size`` voxels per side
    (bright structures narrower than the box disappear), smoothed by a Gaussian of a quarter of the box.

    Computed on a block-averaged copy (factor ``k = size // 8``; the image edge-padded to whole blocks) with a box of
    an odd number of blocks (so up to about 12 % wider than ``size``), resampled back linearly. The copy is continued
    past its border by odd reflection (a ramp goes on rising), bounded below by the mirrored opening (objects at the
    border leave no dark copies), so the background follows a rising ramp closer to the border than a plain
    reflection lets an opening do.

    Args:
        image: ``(H, W)`` or ``(D, H, W)``.
        size: box side in voxels.

    Returns:
        float32 array of the image's shape.
    """
    from scipy import ndimage
    from skimage.measure import block_reduce

    img = np.asarray(image, dtype=np.float32)
    k = max(1, int(size // 8))
    padded = np.pad(img, [(0, -n % k) for n in img.shape], mode="edge")
    small = padded if k == 1 else block_reduce(padded, (k,) * img.ndim, np.mean)
    box = max(3, int(round(size / k)) | 1)
    # continued linearly past the border (odd reflection): an opening cuts the crest a plain reflection makes of a
    # ramp, and the background would then run low along the border it rises towards. The odd reflection turns a
    # bright object at the border into a dark one outside, which an opening keeps: never below the mirrored
    # opening of the copy itself (objects gone). By at most the axis' length less one: no runaway extrapolation.
    pads = [(p, p) for p in (min(box, n - 1) for n in small.shape)]
    mirrored = np.pad(ndimage.grey_opening(small, size=(box,) * img.ndim, mode="reflect"), pads, mode="symmetric")
    ext = np.maximum(np.pad(small, pads, mode="reflect", reflect_type="odd"), mirrored)
    opened = ndimage.grey_opening(ext, size=(box,) * img.ndim, mode="reflect")
    smooth = ndimage.gaussian_filter(opened, sigma=box / 4.0, mode="reflect")
    smooth = smooth[tuple(slice(p, p + n) for (p, _), n in zip(pads, small.shape))]
    if k > 1:  # block centres -> voxel centres: a whole-number factor, corners not aligned
        back = Resize(padded.shape, mode="bilinear" if img.ndim == 2 else "trilinear", align_corners=False)
        smooth = np.asarray(back(torch.from_numpy(smooth)[None])[0], dtype=np.float32)
    return smooth[tuple(slice(0, n) for n in img.shape)]


class TopHat(Transform):
    """
    White top-hat background subtraction, like Fiji's "Subtract Background" (which rolls a ball instead of a box):
    removes a slowly varying background (uneven illumination, a brighter side of a volume, autofluorescent tissue
    around nuclei) so that a bright object means the same intensity everywhere in the image. Apply it before the
    intensity normalisation, with the same ``size_ratio`` in training and inference (``tophat`` in the configs; the
    model card records it and inference takes it from there).

    The box of :func:`tophat_background` is ``size_ratio`` times the image's blob scale
    (:func:`~spoco_bundle.object_size.blob_scale`, the Gaussian sigma at which its blobs respond most, measured after
    a coarse top-hat whose box is a third of the measured crop's longest side: a steep ramp would otherwise set it), at
    least 3 voxels. It follows the magnification, so one setting serves images of other sizes, as long as one factor
    relates them (``image_scale`` per axis changes the objects' shape in voxels, and the box stays a cube). Objects
    wider than the box lose their inside (they become rings); objects wider than a third of the image are not what
    this is for. An image without structure to measure (e.g. a constant) keeps its background.

    Args:
        size_ratio: box side in blob scales (about 5 puts it at 1.5-2 nucleus diameters); 0 returns the input.

    Shapes:
        ``(C, *S)`` -> ``(C, *S)``, float32 (the input itself when ``size_ratio`` is 0); each channel separately.

    Raises:
        ValueError: a negative or non-finite ``size_ratio``.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, size_ratio: float = 0.0) -> None:
        try:
            ratio = float(size_ratio)
        except (TypeError, ValueError):
            ratio = float("nan")
        if not (np.isfinite(ratio) and ratio >= 0):
            raise ValueError(f"tophat size_ratio must be a number >= 0, got {size_ratio!r}.")
        self.size_ratio = ratio

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        if self.size_ratio == 0:
            return img
        from spoco_bundle.object_size import blob_scale

        arr = convert_to_numpy(img, dtype=np.float32)
        out = arr.copy()
        for c in range(arr.shape[0]):
            scale = blob_scale(arr[c])  # measured with the coarse background (a ramp) taken off
            if np.isfinite(scale):
                out[c] = arr[c] - tophat_background(arr[c], max(3.0, self.size_ratio * scale))
        result, *_ = convert_to_dst_type(out, img, dtype=np.float32)
        return result


class TopHatd(MapTransform):
    """
    Dictionary version of :class:`TopHat`.

    Args:
        keys: image keys.
        size_ratio: box side in blob scales; 0 leaves the images alone.
        allow_missing_keys: don't raise for missing keys.
    """

    backend = TopHat.backend

    def __init__(self, keys: KeysCollection, size_ratio: float = 0.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.tophat = TopHat(size_ratio)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.tophat(d[key])
        return d


def smooth_field_grid(patch_size: Sequence[int], voxels_per_point: int = 32, minimum: int = 3) -> list[int]:
    """The coarse grid of a MONAI smooth field (``RandSmoothField*``'s ``rand_size``) for a patch: about one point
    per ``voxels_per_point`` voxels along each axis, at least ``minimum`` (at most the side).

    MONAI upsamples the grid by the factor side / points, and for some pairs (e.g. 230 voxels from 7 points) the
    upsampled field comes out one voxel short and the transform fails; the nearest point count whose factor
    reproduces the side exactly is taken instead.

    Raises:
        ValueError: a side below 1 voxel, or ``voxels_per_point`` / ``minimum`` below 1.
    """
    if voxels_per_point < 1 or minimum < 1:
        raise ValueError(f"voxels_per_point and minimum must be >= 1, got {voxels_per_point} and {minimum}.")
    grid = []
    for side in (int(s) for s in patch_size):
        if side < 1:
            raise ValueError(f"patch sides must be >= 1 voxel, got {list(patch_size)}.")
        target = min(side, max(minimum, side // voxels_per_point))
        # torch's interpolate: floor(points * (side / points)) in double precision; points == side always works
        exact = [n for n in range(1, side + 1) if int(n * (side / n)) == side]
        grid.append(min(exact, key=lambda n: (abs(n - target), -n)))
    return grid


def load_transforms(
    keys: KeysCollection = ("image", "label"),
    spatial_dims: int = 3,
    image_dtype: Any = np.float32,
    label_dtype: Any = torch.int64,
    allow_missing_keys: bool = False,
) -> list[Transform]:
    """
    The loading steps, in storage order (no Orientation, no Spacing):
    ``LoadVolumed`` (file dtype) -> ``EnsureChannelFirstd("no_channel")`` -> :class:`EnsureSpatialDimsd` ->
    :class:`CheckImageLabeld` -> cast image to ``image_dtype`` and labels to ``label_dtype``.

    Args:
        keys: the image key first, then label keys; ``"image"`` alone for inference.
        spatial_dims: 2 or 3.
        image_dtype: type of the image after the checks.
        label_dtype: type of the labels after the checks.
        allow_missing_keys: e.g. to let one list serve data with and without labels.

    Returns:
        a list of transforms, to be placed first in a ``Compose`` (as separate entries, so that MONAI Label can
        replace the ``LoadImaged``).
    """
    keys = ensure_tuple(keys)
    image_key, label_keys = keys[0], keys[1:]
    transforms: list[Transform] = [
        LoadVolumed(keys, allow_missing_keys=allow_missing_keys),
        EnsureChannelFirstd(keys, channel_dim="no_channel", allow_missing_keys=allow_missing_keys),
        EnsureSpatialDimsd(keys, spatial_dims, allow_missing_keys=allow_missing_keys),
        CheckImageLabeld(keys, spatial_dims, allow_missing_keys=allow_missing_keys),
        CastToTyped(image_key, dtype=image_dtype, allow_missing_keys=allow_missing_keys),
    ]
    if label_keys:
        transforms.append(CastToTyped(label_keys, dtype=label_dtype, allow_missing_keys=allow_missing_keys))
    return transforms


class ClusterEmbeddings(Transform):
    """
    Post-processing in one transform: a network output ``(C, *S)`` to an instance label map ``(1, *S)`` (int32,
    0 = background, 1..n instances). It is the chain of ``configs/inference.json``'s ``postprocessing``
    (:mod:`spoco_bundle.postprocessing`): :class:`~spoco_bundle.postprocessing.ForegroundMask` ->
    :class:`~spoco_bundle.postprocessing.ClusterInstances` -> :class:`~spoco_bundle.postprocessing.SplitByShape` ->
    :class:`~spoco_bundle.postprocessing.RemoveSmallInstances`, with the same labels.

    The first ``embedding_dim`` channels are the embeddings; a further channel, if present, is the foreground logit
    of :class:`~spoco_bundle.networks.EmbeddingUNet`.

    Args:
        method: ``"fast"`` (default), ``"watershed"``, ``"hdbscan"``, ``"meanshift"``, ``"consistency"`` (then
            the input holds ``2 * embedding_dim`` (+1) channels: student embeddings, teacher embeddings, see
            :class:`~spoco_bundle.inferers.StudentTeacherNet`) or ``"boundary"`` (needs the foreground head).
        embedding_dim: E.
        background: ``"largest"``: drop the largest cluster (for models trained without annotated background);
            ``"head"``: keep only voxels with foreground probability > ``foreground_threshold`` (models trained with
            ``background_label``); ``"none"``: keep every cluster. A ``fg_mask`` given to the call (a foreground
            mask file, :class:`LoadForegroundMaskd`) replaces it: then only voxels inside that mask are clustered.
        min_size: objects smaller than this many voxels are set to 0.
        delta_v, delta_d: the training margins, passed to every method (see
            :class:`~spoco_bundle.postprocessing.ClusterInstances`).
        foreground_threshold: probability threshold of the foreground head, or ``"otsu"``: per image, from the head's
            own probability map (:func:`~spoco_bundle.clustering.head_threshold`).
        shape_split: after clustering, split objects shaped like two joined round objects
            (:func:`~spoco_bundle.clustering.split_by_shape` with ``h=shape_split``); 0: off.
        kwargs: further arguments of the clustering function.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self,
        method: str = "fast",
        embedding_dim: int = 16,
        background: str = "largest",
        min_size: int = 16,
        delta_v: float = 0.5,
        delta_d: float = 2.0,
        foreground_threshold: float | str = 0.5,
        shape_split: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not 0 <= shape_split < 1:
            raise ValueError(f"shape_split must be in [0, 1) (0: off), got {shape_split!r}.")
        self.foreground = ForegroundMask(background, foreground_threshold, embedding_dim, method)
        self.cluster = ClusterInstances(method, embedding_dim, background, delta_v, delta_d, min_size, **kwargs)
        self.split = SplitByShape(shape_split, min_size=min_size)
        self.remove_small = RemoveSmallInstances(min_size)
        self.method = method
        self.embedding_dim = embedding_dim
        self.background = background
        self.min_size = min_size
        self.delta_v = delta_v
        self.delta_d = delta_d
        self.foreground_threshold = self.foreground.threshold
        self.shape_split = shape_split
        self.kwargs = kwargs

    def __call__(
        self, pred: NdarrayOrTensor, spacing: Sequence[float] | None = None, fg_mask: Any = None
    ) -> NdarrayOrTensor:
        """
        Args:
            pred: network output ``(C, *S)``.
            spacing: voxel size per spatial axis, for ``shape_split`` (default: the MetaTensor's, else isotropic).
            fg_mask: a given foreground mask ``S`` or ``(1, *S)`` (nonzero = foreground), used in place of
                ``background`` (the head is then not needed); None: ``background`` decides.
        """
        check_network_output(pred, self.embedding_dim, self.method, "ClusterEmbeddings")
        labels = self.cluster(pred, self.foreground(pred, fg_mask))
        return self.remove_small(self.split(labels, spacing))


class ClusterEmbeddingsd(MapTransform):
    """Dictionary version of :class:`ClusterEmbeddings` (replaces ``pred`` by instance labels).

    Args:
        keys: the network outputs.
        allow_missing_keys: don't raise for missing keys.
        image_key: the input image, a MetaTensor whose voxel size ``shape_split`` uses (the output of a
            :class:`~spoco_bundle.inferers.ScaledInferer` is a plain tensor on the image's grid); None: the output's.
        mask_key: key of a given foreground mask ``(1, *S)`` on the output's grid (:class:`LoadForegroundMaskd`);
            when the data holds it, clustering keeps to that mask instead of ``background`` (the head); when it
            does not, ``background`` decides. None: never look for one.
        kwargs: arguments of :class:`ClusterEmbeddings`.
    """

    backend = ClusterEmbeddings.backend

    def __init__(
        self,
        keys: KeysCollection = "pred",
        allow_missing_keys: bool = False,
        image_key: str | None = "image",
        mask_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.mask_key = mask_key
        self.cluster = ClusterEmbeddings(**kwargs)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        image = d.get(self.image_key) if self.image_key is not None else None
        spacing = [float(v) for v in image.pixdim] if isinstance(image, MetaTensor) else None
        fg_mask = d.get(self.mask_key) if self.mask_key is not None else None
        if isinstance(fg_mask, (str, os.PathLike)):
            raise TypeError(
                f"'{self.mask_key}' is still a file name ({os.fspath(fg_mask)}): load it first "
                "(spoco_bundle.transforms.LoadForegroundMaskd in the preprocessing)."
            )
        for key in self.key_iterator(d):
            d[key] = self.cluster(d[key], spacing=spacing, fg_mask=fg_mask)
        return d


class LoadForegroundMaskd(MapTransform):
    """
    Loads a given foreground mask for clustering (inference's ``foreground_mask_dir``): the file named under
    ``keys`` (put there by :func:`~spoco_bundle.engines.segment_files`) is read like the images (NIfTI/TIFF in
    storage order, :class:`~spoco_bundle.io.LoadVolumed`), its singleton axes dropped like the image's
    (:class:`EnsureSpatialDims`), checked against the already loaded image ``image_key`` and turned into a bool
    ``(1, *S)`` MetaTensor, nonzero = foreground, which :class:`~spoco_bundle.postprocessing.ForegroundMaskd` and
    :class:`ClusterEmbeddingsd` (``mask_key``) then use in
    place of the foreground head. The mask stays on the image's grid, where clustering runs (also with
    ``image_scale`` != 1: :class:`~spoco_bundle.inferers.ScaledInferer` resamples the network's output back onto it).

    A missing key is skipped by default (no mask given: nothing happens), so the transform can stay in the
    inference preprocessing. Logs a warning for an empty mask, a mask that is foreground everywhere, and a
    non-integer (probability) mask, where every nonzero value counts as foreground.

    Args:
        keys: keys holding the mask file names.
        image_key: the loaded image ``(1, *S)`` the masks must match.
        spatial_dims: 2 or 3.
        allow_missing_keys: skip absent keys (default True).

    Raises:
        ValueError: naming the mask and the image, for an unreadable mask, one whose spatial shape differs from the
            image's or that cannot be reduced to ``spatial_dims`` axes, or NaN values.
    """

    def __init__(
        self,
        keys: KeysCollection = "foreground_mask",
        image_key: str = "image",
        spatial_dims: int = 3,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.squeeze = EnsureSpatialDims(spatial_dims)
        self.channel_first = EnsureChannelFirst(channel_dim="no_channel")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d.get(self.image_key)
        image_name = _filename(image, d.get(f"{self.image_key}_meta_dict")) or self.image_key
        for key in self.key_iterator(d):
            path = d[key]
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"'{key}' must name a mask file for image {image_name}, got {type(path).__name__}.")
            path = os.fspath(path)
            if image is None:
                raise KeyError(f"load the image '{self.image_key}' before its foreground mask {path}.")
            try:
                mask = LoadVolumed(key)({key: path})[key]
            except Exception as e:
                cause = e.__cause__ if isinstance(e, RuntimeError) and e.__cause__ is not None else e
                raise ValueError(f"Cannot read foreground mask {path} (for image {image_name}): {cause}") from e
            try:
                mask = self.squeeze(self.channel_first(mask))
            except ValueError as e:
                raise ValueError(f"foreground mask for image {image_name}: {e}") from None
            if tuple(mask.shape[1:]) != tuple(image.shape[1:]):
                raise ValueError(
                    f"foreground mask {path} has spatial shape {tuple(mask.shape[1:])}, but image {image_name} has "
                    f"{tuple(image.shape[1:])}: a mask must have its image's shape (in the files' storage order)."
                )
            if mask.is_floating_point():
                if bool(torch.isnan(mask).any()):
                    raise ValueError(f"foreground mask {path} (for image {image_name}) contains NaN values.")
                if not bool(torch.equal(mask, torch.round(mask))):
                    logger.warning(
                        f"foreground mask {path} holds non-integer values (a probability map?): every nonzero value "
                        "counts as foreground; threshold it first."
                    )
            mask = mask != 0
            n = int(mask.sum())
            if n == 0:
                logger.warning(f"foreground mask {path} is empty: no objects in {image_name}.")
            elif n == mask.numel():
                logger.warning(f"foreground mask {path} is nonzero everywhere: all of {image_name} is foreground.")
            d[key] = mask
        return d
