"""Loss functions of SPOCO (Wolny et al., CVPR 2022): sparse object-level supervision with pixel embeddings.

Label convention of every loss here (:mod:`spoco_bundle.labels`): an integer target where ``0`` is *unlabeled*
(background plus every object nobody annotated; never treated as background), ``1..K`` are the annotated objects of
that image (gaps in the ids are allowed) and negative values (``-1``) are annotated background.

- :mod:`.embedding`: the terms on the annotated objects (pull, push, regulariser, instance Dice, unlabeled push);
- :mod:`.consistency`: the student / momentum-teacher term on the unlabeled region;
- :mod:`.foreground`: the foreground head's term and what it trains on;
- :mod:`.spoco`: :class:`SpocoLoss`, all of them in one pass.
"""

from spoco_bundle.losses._core import kernel_scale, object_means
from spoco_bundle.losses.consistency import EmbeddingConsistencyLoss, select_consistency_anchors
from spoco_bundle.losses.embedding import (
    InstanceDiceLoss,
    MeanNormRegularizer,
    PullLoss,
    PushLoss,
    UnlabeledPushLoss,
    sample_object_voxels,
)
from spoco_bundle.losses.foreground import (
    AUTO_RING_MAX_OBJECTS,
    LOGIT_BINS,
    LOGIT_RANGE,
    ForegroundLoss,
    auto_foreground_ring,
    foreground_histograms,
    labelled_foreground_probability,
    object_rings,
    object_surfaces,
)
from spoco_bundle.losses.spoco import LossStatistics, SpocoLoss

__all__ = [
    "kernel_scale",
    "object_means",
    "sample_object_voxels",
    "select_consistency_anchors",
    "PullLoss",
    "PushLoss",
    "MeanNormRegularizer",
    "InstanceDiceLoss",
    "UnlabeledPushLoss",
    "EmbeddingConsistencyLoss",
    "AUTO_RING_MAX_OBJECTS",
    "LOGIT_BINS",
    "LOGIT_RANGE",
    "auto_foreground_ring",
    "object_rings",
    "object_surfaces",
    "labelled_foreground_probability",
    "foreground_histograms",
    "ForegroundLoss",
    "LossStatistics",
    "SpocoLoss",
]
