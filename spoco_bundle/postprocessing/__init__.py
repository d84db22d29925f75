"""Post-processing of the network output into instance labels, one small step per transform (array and dictionary
versions, MONAI style); the algorithms behind them are in :mod:`spoco_bundle.clustering`.

``configs/inference.json`` chains them after the inferer, on ``pred`` (the network output ``(C, *S)``: ``E``
embedding channels, ``E`` more of the teacher for ``consistency``, then the foreground logit when the network has
the head); training's validation runs the same chain, read from that file (:mod:`spoco_bundle.bundle`)::

    ForegroundMaskd        the foreground: a given mask file, else the head's probability > foreground_threshold
                           (background "head"), else none                      -> foreground_mask (1, *S) bool
    ClusterInstancesd      cluster the embeddings (clustering) inside foreground_mask; without one, background
                           "largest" drops the largest cluster                  -> pred = labels (1, *S) int32
    SplitByShaped          split objects shaped like joined round objects (shape_split; 0: off)
    RemoveSmallInstancesd  remove objects under min_size voxels or min_diameter_ratio of the training objects'
                           diameter (recorded in the model; min_size alone inside a given mask), ids 1..n
    WarnFewInstancesd      warn (naming the file) when far fewer objects are found than the segmented area holds
                           of the training objects' size: most of them merged
    ResizeToMatchd         the labels onto the image's grid (nearest neighbour), when the network ran on a
                           resampled grid (image_scale; clustering and min_size there, where objects have their
                           training size); 0 outside a given mask
    ObjectScoresd          (spoco suggest only, object_scores true) per object how unsure the model is: the head's
                           uncertainty and the embeddings' spread over its voxels in the image, from the output
                           CopyItemsd kept as network_output before ForegroundMaskd  -> object_scores (a row per
                           object)

A given foreground mask is kept as it is (``given_foreground_mask``, MONAI's ``CopyItemsd``) and resized onto the
output's grid the same way (``ResizeToMatchd`` on ``foreground_mask``) before ``ForegroundMaskd``.
"""

from spoco_bundle.postprocessing._common import BACKGROUND_CHOICES, check_network_output, embedding_channels
from spoco_bundle.postprocessing.cluster import ClusterInstances, ClusterInstancesd
from spoco_bundle.postprocessing.foreground import ForegroundMask, ForegroundMaskd, check_foreground_threshold
from spoco_bundle.postprocessing.resize import ResizeToMatch, ResizeToMatchd
from spoco_bundle.postprocessing.shape import SplitByShape, SplitByShaped
from spoco_bundle.postprocessing.size import (
    FEW_INSTANCES,
    RemoveSmallInstances,
    RemoveSmallInstancesd,
    WarnFewInstances,
    WarnFewInstancesd,
)
from spoco_bundle.postprocessing.suggestions import SCORE_COLUMNS, ObjectScores, ObjectScoresd

__all__ = [
    "BACKGROUND_CHOICES",
    "FEW_INSTANCES",
    "check_foreground_threshold",
    "check_network_output",
    "embedding_channels",
    "ForegroundMask",
    "ForegroundMaskd",
    "ClusterInstances",
    "ClusterInstancesd",
    "SplitByShape",
    "SplitByShaped",
    "RemoveSmallInstances",
    "RemoveSmallInstancesd",
    "WarnFewInstances",
    "WarnFewInstancesd",
    "ResizeToMatch",
    "ResizeToMatchd",
    "SCORE_COLUMNS",
    "ObjectScores",
    "ObjectScoresd",
]
