"""
Inference over files on MONAI's engine: the datalist of inputs and outputs, a dataset that turns one bad file into a
reported failure instead of a stopped run, and a ``SupervisedEvaluator`` that segments, writes and reports per file.

``configs/inference.json`` chains them (``datalist`` -> ``dataset`` -> ``dataloader`` -> ``evaluator``);
:func:`segment_files` builds the same from Python.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset, decollate_batch
from monai.engines import SupervisedEvaluator
from monai.inferers import Inferer
from monai.utils import convert_to_numpy
from monai.utils.enums import CommonKeys as Keys

from spoco_bundle.blockwise import open_volume
from spoco_bundle.blockwise.volume import segment_volume
from spoco_bundle.data import foreground_mask_file, foreground_mask_index
from spoco_bundle.errors import root_cause
from spoco_bundle.io import is_zarr, partial_path, split_volume_suffix, write_label_image

__all__ = ["inference_datalist", "InferenceDataset", "SegmentationEvaluator", "segment_files"]

logger = logging.getLogger(__name__)

PATH_KEY, OUTPUT_KEY, ERROR_KEY, BLOCKWISE_KEY = "path", "output", "error", "blockwise"
# a blockwise run's suggestions table (rows with rank and geometry), in the evaluator's output
OBJECT_TABLE_KEY = "object_table"


def inference_datalist(
    files: Sequence[str | Mapping[str, Any]] | str,
    output_dir: str,
    output_ext: str | None = None,
    foreground_mask_dir: str | os.PathLike | None = None,
    blockwise: Any = None,
    mask_key: str = "foreground_mask",
) -> list[dict[str, Any]]:
    """
    One item per input to segment: ``{"image": path, "path": path, "output": output_dir/<stem>_instances<ext>}``
    (``ext`` = ``output_ext`` or the input's own suffix; an input given as ``{"image": ..., "label": ...}`` keeps its
    ``"label"``, to be scored against), with ``mask_key``: the image's foreground mask in
    ``foreground_mask_dir`` (the one NIfTI/TIFF file with its stem: :func:`~spoco_bundle.data.foreground_mask_file`),
    ``"blockwise": True`` where ``blockwise`` (a :class:`~spoco_bundle.blockwise.volume.BlockwiseSettings`) wants
    the input segmented block by block (a Zarr store, or a volume over the memory budget), and ``"error"`` (a message
    naming the file) where the input cannot be segmented (no mask or two), to be reported by the evaluator while the
    others go on.

    Run-wide problems are errors before anything is segmented: no inputs, a mask folder that does not exist (or is
    the images' folder), two inputs that would be written to one output (``a.nii.gz`` and ``a.tif`` with
    ``output_ext`` ``.tif``), an output folder that cannot be written. Inputs that are outputs of other inputs
    (``a_instances.tif`` beside ``a.tif``: an earlier run into the input folder) are left out with a warning. The
    hidden partial file of a write killed in an earlier run (:func:`~spoco_bundle.io.partial_path`) is removed for
    this run's outputs.

    Raises:
        ValueError: no inputs (or only earlier outputs), or outputs that clash.
        PermissionError / NotADirectoryError: an output folder that cannot be used.
    """
    entries = [files] if isinstance(files, (str, os.PathLike, Mapping)) else list(files)
    labels = {os.fspath(e["image"]): os.fspath(e["label"]) for e in entries if isinstance(e, Mapping) and "label" in e}
    files = [os.fspath(e["image"] if isinstance(e, Mapping) else e) for e in entries]
    if not files:
        raise ValueError("No input images (.nii, .nii.gz, .tif, .tiff, .zarr) to segment.")
    earlier = _earlier_outputs(files)
    for path, source in earlier.items():
        logger.warning(
            f"skipping {path}: the output of {source} from an earlier run (<stem>_instances beside its input); "
            "to segment it anyway, pass the file itself as --dataset_dir"
        )
    files = [path for path in files if path not in earlier]
    if not files:
        raise ValueError("Every input is the output of an earlier run (<stem>_instances beside its input): none left.")
    out_paths = _output_paths(files, output_dir, output_ext)
    masks = None if foreground_mask_dir is None else foreground_mask_index(foreground_mask_dir, files)
    if masks is not None:
        logger.info(f"foreground masks from {os.path.abspath(foreground_mask_dir)} (in place of --background)")
    _check_writable_folder(output_dir)
    items = []
    for path, out_path in zip(files, out_paths):
        stale = partial_path(out_path)  # a killed earlier run's half-written output (only this run's names)
        if not is_zarr(out_path) and os.path.isfile(stale):
            os.remove(stale)
            logger.warning(f"removed {stale}, a partial output left by an interrupted earlier run")
        item: dict[str, Any] = {"image": path, PATH_KEY: path, OUTPUT_KEY: out_path}
        if path in labels:  # scored against it (configs/evaluate.json)
            item["label"] = labels[path]
        try:
            if blockwise is not None and blockwise.wanted(path):
                item[BLOCKWISE_KEY] = True
                if masks is not None:
                    raise ValueError(
                        "foreground masks (--foreground_mask_dir) are not supported for blockwise segmentation yet; "
                        "segment it without, or raise --max_memory_gb if the whole volume fits."
                    )
            elif masks is not None:
                item[mask_key] = foreground_mask_file(path, masks, os.path.abspath(foreground_mask_dir))
        except Exception as e:
            item[ERROR_KEY] = _message(path, e)
        items.append(item)
    return items


class InferenceDataset(Dataset):
    """
    ``monai.data.Dataset`` over :func:`inference_datalist` items that keeps going past a bad file: an item whose
    ``transform`` (the preprocessing) fails becomes the item with ``"error"``, a message naming the file, which
    :class:`SegmentationEvaluator` reports. Items with ``"error"`` or ``"blockwise"`` are returned untransformed (a
    blockwise volume is read lazily by the evaluator, not loaded here); a Zarr store not marked blockwise is an error.
    """

    def _transform(self, index: int) -> dict[str, Any]:
        item = self.data[index]
        if ERROR_KEY in item or item.get(BLOCKWISE_KEY):
            return dict(item)
        path = item[PATH_KEY]
        if is_zarr(path):
            error = ValueError("a Zarr store, which is segmented blockwise only (blockwise settings).")
            return {**item, ERROR_KEY: _message(path, error)}
        try:
            return super()._transform(index)
        except Exception as e:
            return {**item, ERROR_KEY: _message(path, e)}


class SegmentationEvaluator(SupervisedEvaluator):
    """
    ``SupervisedEvaluator`` that segments one input per iteration: network through ``inferer``, ``postprocessing``
    (the clustering chain), then the instance labels written to the item's ``"output"`` path by ``writer``
    (atomically: :func:`~spoco_bundle.io.write_label_image`), with the input's shape, axis order and voxel geometry.

    Per file, never for the whole run: an input that failed to load (an ``"error"`` item of
    :class:`InferenceDataset`) or whose inference, clustering or write fails is logged by name and skipped; the
    others are still written, and at the end a ``RuntimeError`` lists the failures (so the command exits non-zero).
    A constant image is written as 0 instances with a warning, without a network pass. A ``"blockwise"`` item is
    segmented block by block on dask (:func:`~spoco_bundle.blockwise.volume.segment_volume`, with the ``blockwise``
    settings; written as OME-Zarr for a Zarr input). The paths written are in ``written``.

    Args:
        device: the device the network runs on.
        val_data_loader: a loader of :class:`InferenceDataset` with batch size 1.
        network: the network (``inference_network`` of the config).
        inferer: e.g. :class:`~spoco_bundle.inferers.ScaledInferer` around ``SlidingWindowInferer``.
        postprocessing: embeddings -> instance labels (applied per item, under ``"pred"``).
        blockwise: :class:`~spoco_bundle.blockwise.volume.BlockwiseSettings` for ``"blockwise"`` items.
        writer: ``writer(path, labels (*S), meta)``.
        fail_fast: stop at the first input that fails (scoring, ``configs/evaluate.json``: a score over the inputs
            that worked would look like one over all), instead of going on with the others.
        kwargs: passed on to ``SupervisedEvaluator`` (e.g. ``val_handlers``, ``key_val_metric``: items with a
            ``"label"`` are scored on ``pred`` against it).

    Raises:
        ValueError: a loader with a batch size other than 1.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: DataLoader,
        network: torch.nn.Module,
        inferer: Inferer,
        postprocessing: Callable | None = None,
        blockwise: Any = None,
        writer: Callable[[str, np.ndarray, dict], Any] | None = None,
        fail_fast: bool = False,
        **kwargs: Any,
    ) -> None:
        batch_size = getattr(val_data_loader, "batch_size", 1)
        if batch_size != 1:
            raise ValueError(f"SegmentationEvaluator segments one input per iteration: batch_size 1, got {batch_size}.")
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            inferer=inferer,
            postprocessing=postprocessing,
            **kwargs,
        )
        self.chain = postprocessing
        self.blockwise = blockwise
        self.writer = writer or write_label_image
        self.fail_fast = bool(fail_fast)
        self.written: list[str] = []
        self.failures: list[str] = []
        self.add_event_handler(Events.STARTED, self._reset)
        self.add_event_handler(Events.COMPLETED, self._raise_failures)

    def _reset(self, engine: SegmentationEvaluator) -> None:
        self.written, self.failures = [], []

    def _raise_failures(self, engine: SegmentationEvaluator) -> None:
        if self.failures:
            n = engine.state.epoch_length
            raise RuntimeError(f"{len(self.failures)} of {n} inputs failed:\n" + "\n".join(self.failures))

    def _iteration(self, engine: SegmentationEvaluator, batchdata: dict[str, Any]) -> Any:  # type: ignore[override]
        path, out_path = batchdata[PATH_KEY][0], batchdata[OUTPUT_KEY][0]
        tag = f"[{engine.state.iteration}/{engine.state.epoch_length}]"
        if ERROR_KEY in batchdata:
            return self._fail(tag, path, batchdata[ERROR_KEY][0])
        t0 = time.perf_counter()
        try:
            if BLOCKWISE_KEY in batchdata:
                info = self._segment_blockwise(path, out_path)
                logger.info(f"{tag} {path} -> {out_path}")
                self.written.append(out_path)
                item = {}
                if "object_table" in info:  # spoco suggest: the table, and the volumes for its preview (lazy)
                    channel, time_point = self.blockwise.input_channel, self.blockwise.input_time_point
                    item[OBJECT_TABLE_KEY] = info["object_table"]
                    item["image_volume"] = open_volume(path, channel, time_point)[0]
                    item["labels_volume"] = open_volume(out_path)[0]
                if Keys.LABEL in batchdata:  # scored on the written labels (a score needs the whole volume)
                    pred, label = (open_volume(p)[0].compute() for p in (out_path, batchdata[Keys.LABEL][0]))
                    item.update({Keys.PRED: torch.as_tensor(pred)[None], Keys.LABEL: torch.as_tensor(label)[None]})
                return [item] if item else {}
            image = batchdata[Keys.IMAGE]
            meta = dict(decollate_batch(image, detach=True)[0].meta) if hasattr(image, "meta") else {}
            if bool(image.max() == image.min()):  # nothing to see: no network pass, an empty segmentation
                logger.warning(f"{tag} {path}: the image is constant (no contrast); 0 instances.")
                empty = np.zeros(tuple(image.shape[2:]), dtype=np.int32)
                self.writer(out_path, empty, meta)
                self.written.append(out_path)
                if Keys.LABEL in batchdata:  # scored as what it is: nothing found
                    return [{Keys.PRED: torch.from_numpy(empty)[None], Keys.LABEL: batchdata[Keys.LABEL][0]}]
                return {}
            output = super()._iteration(engine, batchdata)  # network, then postprocessing per (decollated) item
            labels = np.asarray(convert_to_numpy(output[0][Keys.PRED]))[0]
            t1 = time.perf_counter()
            self.writer(out_path, labels, meta)
        except Exception as e:  # report and go on with the other files
            return self._fail(tag, path, _message(path, e))
        note = f" in mask {batchdata['foreground_mask'][0]}" if "foreground_mask" in batchdata else ""
        if getattr(engine.inferer, "auto", False):  # the factor "auto" found for this image
            note += f" at image_scale {', '.join(f'{v:.3g}' for v in engine.inferer.last_scale)} (auto)"
        logger.info(f"{tag} {path}: {int(labels.max())} instances{note} -> {out_path} ({t1 - t0:.1f} s)")
        self.written.append(out_path)
        return output

    def _fail(self, tag: str, path: str, message: str) -> dict:
        logger.error(f"{tag} FAILED {message}")  # message: <path>: <type>: <cause>
        if self.fail_fast:
            raise RuntimeError(message)
        self.failures.append(message)
        return {}

    def _segment_blockwise(self, path: str, out_path: str) -> dict:
        network = self.network
        spatial_dims = int(getattr(getattr(network, "student", network), "spatial_dims", 3))
        t0 = time.perf_counter()
        info = segment_volume(
            path, out_path, network, self.inferer, self.chain, self.blockwise, spatial_dims, self.state.device
        )
        logger.info(
            f"{path}: {info['objects']} instances, blockwise: {info['blocks']} blocks of {list(info['block_shape'])} "
            f"+ halo {list(info['halo'])} / {list(info['halo_hi'])} ({info['resumed_blocks']} from an interrupted "
            f"run), {info['matched']} matches across block borders ({time.perf_counter() - t0:.1f} s)"
        )
        return info


def segment_files(
    files: Sequence[str] | str,
    preprocessing: Callable,
    network: torch.nn.Module,
    inferer: Inferer,
    postprocessing: Callable,
    output_dir: str,
    output_ext: str | None = None,
    device: str | torch.device = "cpu",
    foreground_mask_dir: str | os.PathLike | None = None,
    mask_key: str = "foreground_mask",
    blockwise: Any = None,
) -> list[str]:
    """
    Segment every file as ``configs/inference.json`` does: :func:`inference_datalist` -> :class:`InferenceDataset`
    (``preprocessing``) -> :class:`SegmentationEvaluator` (``network``, ``inferer``, ``postprocessing``, written to
    ``output_dir``). Per-file failures are reported and raised at the end (see :class:`SegmentationEvaluator`).

    Returns:
        the written paths.
    """
    data = inference_datalist(files, output_dir, output_ext, foreground_mask_dir, blockwise, mask_key)
    loader = DataLoader(InferenceDataset(data, preprocessing), batch_size=1, shuffle=False, num_workers=0)
    evaluator = SegmentationEvaluator(device, loader, network, inferer, postprocessing, blockwise=blockwise)
    evaluator.run()
    return evaluator.written


def _check_writable_folder(output_dir: str) -> None:
    """Create ``output_dir`` if needed and write (and remove) a hidden file there, so that a read-only or otherwise
    unwritable output folder fails before any image is segmented, not after each one is computed.

    Raises:
        PermissionError: naming the folder and the system's reason.
    """
    import tempfile

    folder = os.path.abspath(output_dir)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"Output folder {folder} is a file: choose another --output_dir.")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_check_", dir=folder)
    except OSError as e:
        raise PermissionError(
            f"Output folder {folder} is not writable ({e.strerror or e}): choose another --output_dir or make it "
            "writable. Nothing was segmented."
        ) from e
    os.close(fd)
    os.remove(probe)


def _earlier_outputs(files: Sequence[str]) -> dict[str, str]:
    """The inputs that are outputs of another input, ``{output: its input}``: ``<stem>_instances.<any suffix>`` in
    the folder of an input ``<stem>.<any suffix>`` of ``files`` (what a run with the output folder = the input folder
    leaves there; a second run would otherwise segment them as images)."""
    by_stem = {}
    for path in files:
        folder, name = os.path.split(os.path.abspath(path))
        by_stem.setdefault((folder, split_volume_suffix(name)[0]), path)
    earlier = {}
    for path in files:
        folder, name = os.path.split(os.path.abspath(path))
        stem = split_volume_suffix(name)[0]
        source = by_stem.get((folder, stem[: -len("_instances")])) if stem.endswith("_instances") else None
        if source is not None and source != path:
            earlier[path] = source
    return earlier


def _output_paths(files: Sequence[str], output_dir: str, output_ext: str | None) -> list[str]:
    """``output_dir/<stem>_instances<ext>`` for each input, in order.

    Raises:
        ValueError: naming the inputs, when two of them would be written to one output (same stem: ``a.nii.gz`` and
            ``a.tif`` with ``output_ext`` ``.tif``, ``a.tif`` and ``a.tiff`` with ``.tif``, ...), before any work.
    """
    out_paths, by_output = [], {}
    for path in files:
        stem, ext = split_volume_suffix(os.path.basename(path))
        out_path = os.path.join(output_dir, f"{stem}_instances{output_ext or ext}")
        out_paths.append(out_path)
        by_output.setdefault(os.path.normcase(os.path.abspath(out_path)), []).append(path)
    clashes = [(out, ins) for out, ins in by_output.items() if len(ins) > 1]
    if clashes:
        hint = ", or leave out --output_ext (each input keeps its own suffix)" if output_ext else ""
        raise ValueError(
            "Inputs with the same name stem would be written to the same output file, the later replacing the "
            f"earlier: rename one of each, or segment them into separate output folders{hint}. Nothing was "
            "segmented.\n" + "\n".join(f"{' and '.join(ins)} would both be written to {out}" for out, ins in clashes)
        )
    return out_paths


def _message(path: str, error: BaseException) -> str:
    """``<path>: <type>: <the error a transform raised>``, the path once (many of our errors start with it)."""
    error = root_cause(error)
    text = str(error)
    text = text[len(path) :].lstrip(":").lstrip() if text.startswith(path) else text
    return f"{path}: {type(error).__name__}: {text}"
