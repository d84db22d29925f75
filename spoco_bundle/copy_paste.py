"""Copy-paste of annotated objects within a training patch (array and dictionary versions, MONAI style).

With sparse labels a patch holds a few annotated objects among many unannotated ones, and two annotated objects
rarely touch: the push term of the embedding loss almost never sees the pair that inference must cut, two
touching nuclei. Pasting copies of the patch's own annotated objects (their pixels and masks, flipped at random)
beside annotated objects makes such pairs, with their labels, and adds annotated voxels for the foreground head
(the "simple copy-paste" augmentation of Ghiasi et al., CVPR 2021, here inside one patch so that intensities
match).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Randomizable, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_numpy
from scipy import ndimage

from spoco_bundle.transforms import CALIBRATION_ID_OFFSET, PASTED_ID_OFFSET

__all__ = ["RandPasteObjects", "RandPasteObjectsd"]


class RandPasteObjects(RandomizableTransform):
    """
    Paste copies of a patch's annotated objects into the same patch, each touching an annotated object (with
    probability ``touch_prob``) or anywhere, never over an annotated voxel.

    Sources are the annotated objects (ids 1 .. :data:`~spoco_bundle.transforms.CALIBRATION_ID_OFFSET`; calibration
    objects and annotated background, -1, are not copied) that lie wholly inside the patch, so a copy is a whole
    object. A copy is flipped along every spatial axis with probability 0.5 each, written into the image (all
    channels, its own pixels only) and the label (a new id), over unlabeled (0) or annotated background (-1)
    voxels. A touching copy is centred on a random voxel of a target object's surface and moved away from the
    target's centre one voxel at a time until it overlaps no annotated object voxel; it counts as
    touching when its mask, dilated by ``touch_distance`` voxels, meets the target (a copy that clears other
    annotated objects only further out does not). Positions that fail are
    retried ``max_tries`` times (in the copy's mode: touching or anywhere), then the copy is skipped. Copies get ids
    above :data:`~spoco_bundle.transforms.PASTED_ID_OFFSET`, which :class:`~spoco_bundle.losses.SpocoLoss` keeps out
    of the foreground head.

    Args:
        prob: probability of pasting into a patch at all.
        max_objects: each pasting patch gets 1 .. ``max_objects`` copies (uniform).
        touch_prob: probability that a copy is placed touching an annotated object (else anywhere in the patch).
        touch_distance: the gap, in voxels, up to which a copy counts as touching its target.
        max_tries: positions tried per copy.

    Input: image ``(C, *S)`` and label ``(1, *S)`` (integer ids as after
    :class:`~spoco_bundle.transforms.SparseInstanceLabel`), S of 2 or 3 axes, the same spatial shape.

    Output: both of the input's kind; unchanged when the transform does not fire or the patch has no whole
    annotated object.

    Raises:
        ValueError: bad options; image and label of different spatial shapes; a label type that cannot hold the
            copies' ids (8- or 16-bit integers).
    """

    def __init__(
        self,
        prob: float = 0.5,
        max_objects: int = 2,
        touch_prob: float = 0.75,
        touch_distance: int = 2,
        max_tries: int = 10,
    ) -> None:
        if not 0.0 <= float(prob) <= 1.0 or not 0.0 <= float(touch_prob) <= 1.0:
            raise ValueError(f"prob and touch_prob must be in [0, 1], got {prob} and {touch_prob}.")
        if int(max_objects) < 1 or int(max_tries) < 1 or int(touch_distance) < 0:
            raise ValueError(
                f"need max_objects >= 1, max_tries >= 1, touch_distance >= 0; got {max_objects}, {max_tries}, "
                f"{touch_distance}."
            )
        RandomizableTransform.__init__(self, prob)
        self.max_objects = int(max_objects)
        self.touch_prob = float(touch_prob)
        self.touch_distance = int(touch_distance)
        self.max_tries = int(max_tries)

    def __call__(self, image: NdarrayOrTensor, label: NdarrayOrTensor) -> tuple[NdarrayOrTensor, NdarrayOrTensor]:
        self.randomize(None)
        if not self._do_transform:
            return image, label
        img = convert_to_numpy(image)
        lab = convert_to_numpy(label)
        if lab.ndim != img.ndim or lab.shape[0] != 1 or lab.shape[1:] != img.shape[1:] or lab.ndim not in (3, 4):
            raise ValueError(
                f"RandPasteObjects needs image (C, *S) and label (1, *S) with 2 or 3 spatial axes, got "
                f"{tuple(img.shape)} and {tuple(lab.shape)}."
            )
        if np.issubdtype(lab.dtype, np.integer) and np.iinfo(lab.dtype).max <= PASTED_ID_OFFSET:
            raise ValueError(
                f"RandPasteObjects writes ids above {PASTED_ID_OFFSET}, which a {lab.dtype} label cannot hold: "
                "cast the label to int32 / int64 first."
            )
        lab = lab[0].astype(np.int64, copy=True)
        img = img.copy()
        sources = self._sources(lab)
        if not sources:
            return image, label
        next_id = max(int(lab.max()), PASTED_ID_OFFSET) + 1
        for _ in range(int(self.R.randint(1, self.max_objects + 1))):
            i, box = sources[int(self.R.randint(len(sources)))]
            mask = lab[box] == i
            pixels = img[(slice(None), *box)]
            for axis in range(mask.ndim):
                if self.R.rand() < 0.5:
                    mask, pixels = np.flip(mask, axis), np.flip(pixels, axis + 1)
            corner = self._place(lab, mask)
            if corner is None:
                continue
            target = tuple(slice(c, c + s) for c, s in zip(corner, mask.shape))
            lab[target][mask] = next_id
            img[(slice(None), *target)][:, mask] = pixels[:, mask]
            next_id += 1
        return convert_to_dst_type(img, image)[0], convert_to_dst_type(lab[None], label)[0]

    @staticmethod
    def _sources(lab: np.ndarray) -> list[tuple[int, tuple[slice, ...]]]:
        """Annotated objects whose bounding box does not touch the patch's border, with their boxes."""
        objects = np.where((lab > 0) & (lab <= CALIBRATION_ID_OFFSET), lab, 0)
        found = []
        for i, box in enumerate(ndimage.find_objects(objects), start=1):
            if box is not None and all(s.start > 0 and s.stop < n for s, n in zip(box, lab.shape)):
                found.append((i, box))
        return found

    def _place(self, lab: np.ndarray, mask: np.ndarray) -> tuple[int, ...] | None:
        """A corner where ``mask`` fits inside the patch over no annotated object voxel, or None."""
        shape, size = np.array(lab.shape), np.array(mask.shape)
        if np.any(size > shape):
            return None
        annotated = lab > 0
        half = (size - 1) / 2.0
        touching = self.R.rand() < self.touch_prob  # once per copy: the share of touching copies is touch_prob
        targets = np.unique(lab[annotated]) if touching else None
        for _ in range(self.max_tries):
            if touching:
                t = int(targets[self.R.randint(len(targets))])
                obj = lab == t
                surface = np.argwhere(obj & ~ndimage.binary_erosion(obj))
                start = surface[self.R.randint(len(surface))]
                away = start - np.argwhere(obj).mean(0)
                away = away / max(float(np.linalg.norm(away)), 1e-6)
                centre = start.astype(float)  # the copy's centre on the surface, then outward until it is clear
                for _step in range(int(size.max()) + 2):
                    corner = np.round(centre - half).astype(int)
                    if np.any(corner < 0) or np.any(corner + size > shape):
                        break
                    window = tuple(slice(c, c + s) for c, s in zip(corner, size))
                    if not annotated[window][mask].any():
                        placed = np.zeros(lab.shape, bool)
                        placed[window] = mask
                        if self.touch_distance:
                            placed = ndimage.binary_dilation(placed, iterations=self.touch_distance)
                        if (placed & obj).any():
                            return tuple(int(c) for c in corner)
                        break
                    centre = centre + away
            else:
                corner = np.array([self.R.randint(0, n - s + 1) for n, s in zip(shape, size)])
                window = tuple(slice(c, c + s) for c, s in zip(corner, size))
                if not annotated[window][mask].any():
                    return tuple(int(c) for c in corner)
        return None


class RandPasteObjectsd(Randomizable, MapTransform):
    """Dictionary version of :class:`RandPasteObjects`: pastes into ``image_key`` and the label ``keys`` together.

    Args:
        keys: the label key (one key).
        image_key: the image the copies' pixels come from and go to.
        prob, max_objects, touch_prob, touch_distance, max_tries: see :class:`RandPasteObjects`.
        allow_missing_keys: skip a missing label key instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        prob: float = 0.5,
        max_objects: int = 2,
        touch_prob: float = 0.75,
        touch_distance: int = 2,
        max_tries: int = 10,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"RandPasteObjectsd pastes into one label key, got {self.keys}.")
        # the array transform draws every random choice (whether to paste included): its state is the one to seed
        self.paste = RandPasteObjects(prob, max_objects, touch_prob, touch_distance, max_tries)
        self.image_key = image_key

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandPasteObjectsd:
        super().set_random_state(seed, state)
        self.paste.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.image_key not in d:
                raise KeyError(f"RandPasteObjectsd pastes into image key {self.image_key!r}, which the data lacks.")
            d[self.image_key], d[key] = self.paste(d[self.image_key], d[key])
        return d
