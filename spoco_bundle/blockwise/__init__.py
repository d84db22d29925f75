"""
Segmentation of volumes larger than memory, block by block on dask (local threads or a dask.distributed cluster).

- :mod:`~spoco_bundle.blockwise.grid`: the blocks, their halos and the faces between them.
- :mod:`~spoco_bundle.blockwise.stitch`: objects matched across block borders by IoU in the overlap, global ids.
- :mod:`~spoco_bundle.blockwise.segment`: :func:`segment_blockwise`, the passes over the blocks, resumable.
- :mod:`~spoco_bundle.blockwise.blocks`: what runs on one block (network + post-processing, or clustering alone).
- :mod:`~spoco_bundle.blockwise.store`: lazy Zarr / OME-Zarr / TIFF / NIfTI readers, label writers.
- :mod:`~spoco_bundle.blockwise.volume`: one image file or store end to end, as ``segment_files`` runs it, and
  :class:`BlockwiseSettings` (the ``blockwise`` of configs/inference.json: when and how).
"""

from spoco_bundle.blockwise.blocks import ClusterBlock, NetworkBlock
from spoco_bundle.blockwise.grid import (
    BlockGrid,
    choose_block_shape,
    receptive_field,
    window_halo,
    window_tail,
)
from spoco_bundle.blockwise.segment import compute, segment_blockwise, work_path
from spoco_bundle.blockwise.stitch import match_overlap, merge_ids
from spoco_bundle.blockwise.store import open_volume

__all__ = [
    "BlockGrid",
    "ClusterBlock",
    "NetworkBlock",
    "choose_block_shape",
    "compute",
    "match_overlap",
    "merge_ids",
    "open_volume",
    "receptive_field",
    "segment_blockwise",
    "window_halo",
    "window_tail",
    "work_path",
]
