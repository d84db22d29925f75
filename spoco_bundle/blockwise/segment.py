"""
Blockwise segmentation of a dask array: every block is segmented with a halo of context, and the per-block labels are
stitched into one label volume with ids unique over the whole volume.

Four passes, each a set of independent dask tasks (so memory is a few blocks per worker, whatever the volume size):

1. segment: each block's extended region (core + halo) is read from the input and segmented by ``segment_block``;
   its core labels (local ids) and its overlap slabs with its face neighbours go to a scratch Zarr store, then a
   marker with the sizes of its objects. A resumed run skips the blocks that have a marker.
2. match: for each face, the two blocks' slabs of their shared overlap are compared; objects with IoU above
   ``iou_threshold`` there are the same object.
3. merge (on the client, a few numbers per object): union of matched objects, objects under ``min_size`` voxels
   dropped, ids 1..n.
4. write: each block's core labels mapped to the final ids into the output store.

The output is built under a temporary name beside it (``.<name>.partial``) and renamed when complete: a store
with the output's name is always finished, and an interrupted run leaves only the temporary folder, from which the
next run with the same settings resumes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
from scipy import ndimage

from spoco_bundle.blockwise.grid import BlockGrid
from spoco_bundle.blockwise.stitch import match_overlap, merge_ids, offsets
from spoco_bundle.blockwise.store import create_label_store, open_volume, read_json, remove_store, write_label_file
from spoco_bundle.clustering import relabel_consecutive
from spoco_bundle.io import is_zarr, split_volume_suffix

__all__ = ["segment_blockwise", "check_output", "work_path", "compute"]

logger = logging.getLogger(__name__)


def check_output(output: str | os.PathLike) -> str:
    """The absolute output path, after checking that it has a supported suffix and is no existing store.

    Raises:
        ValueError: naming the path.
    """
    output = os.path.abspath(os.fspath(output))
    if not split_volume_suffix(output)[1]:
        raise ValueError(f"Unsupported output {output}: expected .zarr, .ome.zarr, .tif, .tiff, .nii or .nii.gz.")
    if os.path.exists(output) and is_zarr(output):
        raise ValueError(f"The output store {output} exists: remove it or choose another output folder.")
    return output


def work_path(output: str | os.PathLike) -> str:
    """The temporary folder a blockwise run builds ``output`` in: ``<folder>/.<name>.partial`` (hidden, so that it is
    never taken for an input or a finished output)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(output)).rstrip("/\\"))
    return os.path.join(folder, f".{name}.partial")


# ---------------------------------------------------------------------------------------------------- scheduler


def compute(tasks: Sequence[Any], scheduler: Any = None, workers: int | None = None, what: str = "") -> list[Any]:
    """
    Run dask ``tasks`` and return their results, with a progress bar on a terminal.

    Args:
        scheduler: None or ``"threads"``: the local threaded scheduler (``workers`` threads, default one per core);
            ``"synchronous"``: one at a time in this thread; ``"tcp://host:port"`` (any dask.distributed address):
            that cluster's workers; or a ``distributed.Client``.
        what: what the tasks do, for the log.
    """
    if not tasks:
        return []
    t0 = time.perf_counter()
    terminal = sys.stderr.isatty()
    if scheduler is None or scheduler in ("threads", "synchronous", "sync"):
        from dask.diagnostics import ProgressBar  # dask's own submodule: imported when a run needs it

        kw: dict[str, Any] = {"scheduler": "threads" if scheduler is None else scheduler}
        if workers and kw["scheduler"] == "threads":
            kw["num_workers"] = int(workers)
        if terminal:
            with ProgressBar(out=sys.stderr):
                results = dask.compute(*tasks, **kw)
        else:
            results = dask.compute(*tasks, **kw)
    else:
        results = _compute_distributed(tasks, scheduler, terminal)
    logger.info(f"{what or 'blockwise'}: {len(tasks)} tasks in {time.perf_counter() - t0:.1f} s")
    return list(results)


def _compute_distributed(tasks: Sequence[Any], scheduler: Any, terminal: bool) -> list[Any]:
    try:  # the optional `cluster` extra, and slow to import: only when a scheduler address is given
        from distributed import Client, progress
    except ImportError as e:
        raise ImportError(
            f"--scheduler {scheduler}: a dask.distributed cluster needs the `distributed` package, the bundle's "
            "`cluster` extra (pip install -e '.[cluster]'; scripts/setup_env.sh installs it)."
        ) from e

    own = not isinstance(scheduler, Client)
    try:
        client = Client(scheduler, set_as_default=False) if own else scheduler
    except Exception as e:  # OSError / TimeoutError: no scheduler at that address
        raise ValueError(f"Cannot connect to the dask scheduler at {scheduler}: {type(e).__name__}: {e}") from e
    try:
        futures = client.compute(list(tasks))
        if terminal:
            progress(futures)
        return client.gather(futures)
    finally:
        if own:
            client.close()


# ---------------------------------------------------------------------------------------------------- the passes


class _Scratch:
    """Paths and arrays of a run's temporary folder (opened by path in each task: pickles as a path)."""

    def __init__(self, work: str) -> None:
        self.work = work
        self.store = os.path.join(work, "scratch.zarr")
        self.markers = os.path.join(work, "blocks")
        self.result = os.path.join(work, "result.ome.zarr")

    def marker(self, index: Sequence[int]) -> str:
        return os.path.join(self.markers, "_".join(map(str, index)) + ".npy")

    def sums(self, index: Sequence[int]) -> str:
        """The block's per-object sums (written before its marker)."""
        return os.path.join(self.markers, "_".join(map(str, index)) + ".sums.npz")

    def create(self, grid: BlockGrid) -> None:
        import zarr

        group = zarr.open_group(self.store, mode="w", zarr_format=2)
        group.create_array("core", shape=grid.shape, chunks=grid.block_shape, dtype=np.int32, fill_value=0)
        for ax, n in enumerate(grid.grid_shape):
            if n > 1:
                chunks = grid.slab_shape(ax)
                shape = tuple(c * m for c, m in zip(chunks, grid.grid_shape))
                for side in ("lo", "hi"):
                    group.create_array(f"face{ax}_{side}", shape=shape, chunks=chunks, dtype=np.int32, fill_value=0)
        os.makedirs(self.markers, exist_ok=True)

    def array(self, name: str) -> Any:
        import zarr

        return zarr.open_array(os.path.join(self.store, name), mode="r+")


def _chunk(index: Sequence[int], chunks: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks))


def _segment_one(
    source: Any,
    segment_block: Callable[[np.ndarray], np.ndarray],
    grid: BlockGrid,
    index: tuple[int, ...],
    scratch: _Scratch,
) -> np.ndarray:
    """Pass 1 for one block; returns the voxel count of each local id in its core (index 0: background)."""
    ext = grid.extended(index)
    read_margin = getattr(segment_block, "read_margin", None)
    if read_margin is None:
        result = segment_block(source.read(ext))
    else:  # more context for the block's resampling (NetworkBlock): read with a margin, labels without it
        wide = tuple(slice(max(0, e.start - m), min(n, e.stop + m)) for e, m, n in zip(ext, read_margin, grid.shape))
        margin = (
            tuple(e.start - w.start for e, w in zip(ext, wide)),
            tuple(w.stop - e.stop for e, w in zip(ext, wide)),
        )
        result = segment_block(source.read(wide), margin=margin)
    labels, maps = result if isinstance(result, tuple) else (result, None)
    labels = np.asarray(labels)
    want = tuple(s.stop - s.start for s in ext)
    if labels.shape != want or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"segment_block returned {labels.dtype} {labels.shape} for a block {want}; integer labels of "
            "the block's spatial shape are needed."
        )
    labels = relabel_consecutive(labels)  # local ids 1..n (int32)
    inner = grid.core_in_extended(index)
    core = labels[inner]
    scratch.array("core")[grid.core(index)] = core
    for ax, n in enumerate(grid.grid_shape):
        for side, upper, has in (("lo", False, index[ax] > 0), ("hi", True, index[ax] + 1 < n)):
            if has:
                slab = grid.face_slab(labels, index, ax, upper_face=upper)
                scratch.array(f"face{ax}_{side}")[_chunk(index, slab.shape)] = slab
    counts = np.bincount(core.reshape(-1), minlength=int(labels.max()) + 1).astype(np.int64)
    if maps is not None:
        origin = [c.start for c in grid.core(index)]
        sums = object_sums(core, {k: np.asarray(m)[inner] for k, m in maps.items()}, origin, len(counts))
        tmp = scratch.sums(index) + ".tmp.npz"
        np.savez(tmp, **sums)
        os.replace(tmp, scratch.sums(index))
    tmp = scratch.marker(index) + ".tmp.npy"
    np.save(tmp, counts)
    os.replace(tmp, scratch.marker(index))  # the block is done: written last, atomically
    return counts


def object_sums(
    labels: np.ndarray, maps: dict[str, np.ndarray], origin: Sequence[int], n: int
) -> dict[str, np.ndarray]:
    """
    What a block's core contributes to each of its objects' scores and geometry, as quantities that add up (or take
    the minimum / maximum) over the blocks an object spans: ``map:<name>`` the sum of each per-voxel map over the
    object, ``coords`` the sum of its voxels' coordinates ``(n, ndim)``, ``first`` / ``last`` its bounding box
    ``(n, ndim)`` (volume coordinates: ``origin`` is the core's first voxel). Row ``k`` is local id ``k`` (0 and ids
    absent from the core: zero sums, an empty box; the voxels are the block's counts).
    """
    ndim = labels.ndim
    flat = labels.reshape(-1).astype(np.int64)
    out = {f"map:{k}": np.bincount(flat, weights=m.reshape(-1), minlength=n)[:n] for k, m in maps.items()}
    coords = np.zeros((n, ndim))
    for ax in range(ndim):  # sum over an axis' planes: coordinate x voxels of the object in that plane
        planes = np.moveaxis(labels, ax, 0).reshape(labels.shape[ax], -1)
        for i, plane in enumerate(planes):
            coords[:, ax] += (origin[ax] + i) * np.bincount(plane.astype(np.int64), minlength=n)[:n]
    first = np.full((n, ndim), np.iinfo(np.int64).max, dtype=np.int64)
    last = np.full((n, ndim), -1, dtype=np.int64)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is not None and k < n:
            first[k] = [b.start + o for b, o in zip(box, origin)]
            last[k] = [b.stop - 1 + o for b, o in zip(box, origin)]
    return {**out, "coords": coords, "first": first, "last": last}


def _merge_sums(parts: Sequence[Any], lut: np.ndarray, n: int, sizes: np.ndarray) -> dict[str, Any]:
    """The blocks' :func:`object_sums` (in block order, rows = global ids; ``sizes``: their core voxels) merged per
    final object through ``lut``: ``voxels`` and ``maps`` (name -> sum) per id ``0..n``, ``centroid`` and the
    inclusive box ``first`` / ``last`` ``(n + 1, ndim)`` in volume coordinates."""
    glued = {k: np.concatenate([p[k] for p in parts]) for k in parts[0].files} if parts else {}
    ndim = glued["coords"].shape[1]
    ids = np.asarray(lut, dtype=np.int64)
    maps = {k[4:]: np.bincount(ids, weights=v, minlength=n + 1) for k, v in glued.items() if k.startswith("map:")}
    first = np.full((n + 1, ndim), np.iinfo(np.int64).max, dtype=np.int64)
    last = np.full((n + 1, ndim), -1, dtype=np.int64)
    np.minimum.at(first, ids, glued["first"])
    np.maximum.at(last, ids, glued["last"])
    coords = np.stack([np.bincount(ids, weights=c, minlength=n + 1) for c in glued["coords"].T], axis=1)
    voxels = np.bincount(ids, weights=sizes, minlength=n + 1).astype(np.int64)
    centroid = coords / np.maximum(voxels, 1)[:, None]
    return {"voxels": voxels, "maps": maps, "centroid": centroid, "first": first, "last": last}


def _load_counts(scratch: _Scratch, index: tuple[int, ...]) -> np.ndarray:
    return np.load(scratch.marker(index))


def _match_one(
    grid: BlockGrid, axis: int, lower: tuple[int, ...], upper: tuple[int, ...], scratch: _Scratch, iou: float
) -> np.ndarray:
    """Pass 2 for one face: matched ``(local id in lower, local id in upper)`` pairs."""
    chunks = grid.slab_shape(axis)
    a = np.asarray(scratch.array(f"face{axis}_hi")[_chunk(lower, chunks)])
    b = np.asarray(scratch.array(f"face{axis}_lo")[_chunk(upper, chunks)])
    return match_overlap(a, b, iou)


def _write_one(grid: BlockGrid, index: tuple[int, ...], scratch: _Scratch, lut: np.ndarray, dtype: Any) -> None:
    """Pass 4 for one block: its core labels mapped through its part of the lookup table."""
    import zarr

    core = np.asarray(scratch.array("core")[grid.core(index)])
    out = zarr.open_array(os.path.join(scratch.result, "0"), mode="r+")
    out[grid.core(index)] = lut[core].astype(dtype)


class _Source:
    """The input, handed to the tasks as one object (not as a dask collection, which dask would compute whole): a dask
    array, or any array-like that reads a region when indexed (a Zarr array, a generator of synthetic data)."""

    def __init__(self, array: Any) -> None:
        self.array = array

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        part = self.array[(Ellipsis, *region)]
        if isinstance(part, da.Array):  # in this worker thread: the tasks already run in parallel
            part = part.compute(scheduler="synchronous")
        return np.asarray(part)


def _settings(image: da.Array, grid: BlockGrid, iou: float, min_size: int, identity: str | None, scored: bool) -> dict:
    return {
        "scored": scored,
        "input": identity or dask.base.tokenize(image),
        "shape": list(image.shape),
        "block_shape": list(grid.block_shape),
        "halo": list(grid.halo),
        "halo_hi": list(grid.halo_hi),
        "tail": [None if t is None else list(t) for t in grid.tail],
        "iou_threshold": iou,
        "min_size": min_size,
    }


def segment_blockwise(
    image: da.Array | Any,
    segment_block: Callable[[np.ndarray], np.ndarray],
    output: str | os.PathLike,
    block_shape: int | Sequence[int],
    halo: int | Sequence[int],
    spatial_dims: int | None = None,
    halo_hi: int | Sequence[int] | None = None,
    tail: Sequence[tuple[int, int] | None] | None = None,
    iou_threshold: float = 0.5,
    min_size: int = 0,
    scheduler: Any = None,
    workers: int | None = None,
    meta: dict | None = None,
    identity: str | None = None,
    resume: bool = True,
    info: dict | None = None,
) -> da.Array:
    """
    Segment a volume larger than memory block by block and stitch the blocks into one instance label volume.

    Args:
        image: ``(*C, *S)``: the input, any leading non-spatial axes (channels: e.g. an embedding volume) kept whole
            in every block; a lazy dask array (:func:`~spoco_bundle.blockwise.store.open_volume`), or any array-like
            with ``shape`` whose ``[..., region]`` reads that region (a Zarr array).
        segment_block: ``(*C, *S_block) -> (*S_block)`` integer labels (0 = background): the network and
            post-processing of one block with its halo (:class:`~spoco_bundle.blockwise.blocks.NetworkBlock`), or a
            clustering of embeddings (:class:`~spoco_bundle.blockwise.blocks.ClusterBlock`). Must pickle for a
            distributed cluster. One whose ``scores`` attribute is set returns ``(labels, maps)`` (per-voxel float
            maps, name -> ``S_block``), whose sums per object are merged over the blocks (``info["object_sums"]``).
        output: the labels' file: ``.zarr`` / ``.ome.zarr`` (OME-Zarr, chunks = blocks), ``.tif`` / ``.tiff`` or
            ``.nii`` / ``.nii.gz`` (written slab by slab from the finished labels).
        block_shape: the core block (one value or one per spatial axis); blocks hold ``block + 2 halo`` voxels.
        halo: context per side: at least the receptive field's half of a network, and about an object's size, so
            that an object crossing a border is seen whole enough by both blocks to be matched.
        halo_hi: context after a block, when it differs from ``halo`` before it (``grid.window_halo``: sliding
            windows placed as in the whole volume).
        tail: blocks reaching past it extend to the volume's end (:class:`~spoco_bundle.blockwise.grid.BlockGrid`).
        spatial_dims: the number of trailing spatial axes (default: as many as ``block_shape`` has values, all axes for
            a single value).
        iou_threshold: objects of two neighbouring blocks whose IoU in their overlap exceeds it are one object.
        min_size: objects smaller than this (after stitching, in voxels) are removed.
        scheduler: see :func:`compute` (None: local threads; ``"tcp://..."``: a dask.distributed cluster).
        workers: blocks in flight at once on the local threaded scheduler (memory: about that many blocks).
        meta: the input's geometry (``spacing``, ``unit``, ``affine``, ... from ``open_volume``), kept in the output.
        identity: a string identifying the input and settings for resuming (default: dask's token of ``image``).
        resume: reuse the finished blocks of an interrupted run with the same settings.
        info: a dict to fill with what happened: ``objects``, ``blocks``, ``resumed_blocks``, ``pieces`` (objects
            of the blocks' cores), ``matched`` (pairs matched across borders), and for a ``segment_block`` with
            ``scores``, ``object_sums``: per final id ``voxels``, ``maps`` (name -> sum over the object),
            ``centroid`` and the inclusive bounding box ``first`` / ``last`` in volume coordinates.

    Returns:
        the written labels as a lazy dask array (the output's level ``0`` for Zarr).

    Raises:
        ValueError: naming the path, when ``output`` exists (a finished store is never overwritten) or has an
            unsupported suffix; a bad block / halo.
    """
    output = check_output(output)
    suffix = split_volume_suffix(output)[1]
    if spatial_dims is None:  # one block size per spatial axis, else every axis is spatial
        spatial_dims = image.ndim if np.isscalar(block_shape) else len(block_shape)  # type: ignore[arg-type]
    grid = BlockGrid(image.shape[image.ndim - spatial_dims :], block_shape, halo, halo_hi, tail)
    scratch = _Scratch(work_path(output))
    scored = getattr(segment_block, "scores", None) is not None
    settings = _settings(image, grid, iou_threshold, min_size, identity, scored)
    settings_file = os.path.join(scratch.work, "settings.json")
    if os.path.isdir(scratch.work) and not (resume and read_json(settings_file) == settings):
        logger.warning(f"removing {scratch.work}, an interrupted run with other settings or input")
        remove_store(scratch.work)
    if not os.path.isdir(scratch.work):
        os.makedirs(scratch.work)
        scratch.create(grid)
        with open(settings_file, "w") as f:
            json.dump(settings, f)

    blocks = list(grid.blocks())
    done = [i for i in blocks if os.path.isfile(scratch.marker(i))]
    if done:
        logger.info(f"{output}: resuming, {len(done)} of {len(blocks)} blocks done earlier")
    logger.info(
        f"{output}: {len(blocks)} blocks of {grid.block_shape} + halo {grid.halo} before, {grid.halo_hi} after, "
        f"over {grid.shape} "
        f"(scheduler: {scheduler or 'local threads'})"
    )
    # one key each, sent once to every worker; pure=False: no hashing of a network's weights for a key
    source = dask.delayed(_Source(image), pure=False)
    segmenter = dask.delayed(segment_block, pure=False)
    todo = [
        dask.delayed(_segment_one, pure=False)(source, segmenter, grid, i, scratch) for i in blocks if i not in done
    ]
    compute(todo, scheduler, workers, "segment blocks")
    counts = [_load_counts(scratch, i) for i in blocks]
    order = {i: k for k, i in enumerate(blocks)}
    start = offsets([len(c) for c in counts])

    faces = list(grid.faces())
    tasks = [dask.delayed(_match_one, pure=False)(grid, ax, lo, up, scratch, iou_threshold) for ax, lo, up in faces]
    matched = compute(tasks, scheduler, workers, "match block borders")
    pairs = [m + np.array([start[order[lo]], start[order[up]]]) for (_, lo, up), m in zip(faces, matched)]
    pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
    # local id 0 of every block is background: keep it out of the match graph and give it size 0
    sizes = np.concatenate(counts)
    sizes[start] = 0
    lut, n = merge_ids(len(sizes) - 1, pairs, sizes, min_size)
    lut[start] = 0
    dtype = np.uint16 if n <= np.iinfo(np.uint16).max else np.uint32
    logger.info(f"{output}: {n} objects ({int((sizes > 0).sum())} block pieces, {len(pairs)} matched across borders)")

    if info is not None:
        info.update(objects=n, blocks=len(blocks), resumed_blocks=len(done), pieces=int((sizes > 0).sum()))
        info.update(matched=len(pairs), block_shape=grid.block_shape, halo=grid.halo, halo_hi=grid.halo_hi)
        if scored:
            info["object_sums"] = _merge_sums([np.load(scratch.sums(i)) for i in blocks], lut, n, sizes)
    out_meta = dict(meta or {}, max_id=n, name=os.path.basename(output))
    remove_store(scratch.result)
    create_label_store(scratch.result, grid.shape, grid.block_shape, dtype, out_meta)
    tasks = [
        dask.delayed(_write_one, pure=False)(grid, i, scratch, lut[start[k] : start[k] + len(counts[k])], dtype)
        for k, i in enumerate(blocks)
    ]
    compute(tasks, scheduler, workers, "write labels")

    if suffix.lower().endswith(".zarr"):
        os.replace(scratch.result, output)  # complete: the output appears under its name at once
    else:
        import zarr

        write_label_file(zarr.open_array(os.path.join(scratch.result, "0"), mode="r"), output, out_meta)
    remove_store(scratch.work)
    if suffix.lower().endswith(".zarr"):
        return da.from_zarr(output, component="0")
    return open_volume(output)[0]
