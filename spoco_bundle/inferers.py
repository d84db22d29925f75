"""Inference helpers: two-view training inferer, student+teacher net for consistency clustering, file runner."""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer

from spoco_bundle.transforms import Rescale, check_scale

__all__ = ["TwoViewInferer", "ScaledInferer", "StudentTeacherNet", "network_for_clustering", "segment_files"]

logger = logging.getLogger(__name__)


class TwoViewInferer(Inferer):
    """
    Runs the student on the first view with gradients and the momentum teacher on the second view without.

    Used with ``monai.engines.SupervisedTrainer`` and ``PrepareBatchExtraInput(extra_keys="image_g")``, so the
    trainer calls ``inferer(image, network, image_g)``. The returned pair is what ``SpocoLoss`` expects; keeping the
    trainer's ``network`` the plain student means ``model.pt`` holds only the student's weights.

    Args:
        teacher: the momentum teacher network (same architecture as the student).

    Shapes:
        ``inputs`` and ``second_view``: ``(B, C, *S)``; returns ``(student(inputs), teacher(second_view))``, each
        ``(B, C_out, *S)``. Without a second view (e.g. a plain supervised call) only the student output is returned.
    """

    def __init__(self, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: torch.nn.Module, second_view: torch.Tensor | None = None, *args: Any
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        student_out = network(inputs)
        if second_view is None:
            return student_out
        if second_view.shape != inputs.shape:
            raise ValueError(f"second view shape {tuple(second_view.shape)} != first view {tuple(inputs.shape)}.")
        with torch.no_grad():
            teacher_out = self.teacher(second_view)
        return student_out, teacher_out.detach()


class ScaledInferer(Inferer):
    """
    Runs ``inferer`` on the input resampled by ``scale`` and resamples the output back onto the input's grid, so
    that a model trained on objects of one size can segment images taken at another magnification. Clustering,
    ``min_size`` and the written labels stay on the input's own grid.

    A number: (object size in the training images) / (object size in these images): nuclei twice as large as in
    training -> 0.5. Resampling is linear (bilinear / trilinear), with Gaussian anti-aliasing where it shrinks
    (MONAI's ``Resize``); the output (embeddings and foreground logit) is resampled back the same way. ``scale`` 1
    runs ``inferer`` unchanged.

    ``"auto"``: the factor is found per image, without a model pass: the image's characteristic blob size
    (:func:`~spoco_bundle.object_size.blob_scale`) is compared with the same measure on the training images
    (``blob_scales``: their 10th, 50th and 90th percentiles, by default the network's ``image_blob_scale`` buffer
    recorded by :class:`~spoco_bundle.handlers.ObjectSizeHandler`). An image within the training images' range
    (widened to at least the median / ``min_band`` to the median x ``min_band``) is segmented as it is (1); one
    outside it is resampled so that its blob size becomes the training median (factor limited to ``limits``). A
    model that recorded no training images' blob size is run at 1, with a warning. The factor used for the last
    input is ``last_scale``.

    Args:
        inferer: the inferer to wrap, e.g. ``SlidingWindowInferer``.
        scale: one factor for every spatial axis, one per axis (``(D, H, W)`` order for 3D), or ``"auto"``.
        blob_scales: for ``"auto"``: low, middle and high blob size of the training images (voxels of the
            network's grid); None: the network's record.
        limits: for ``"auto"``: smallest and largest factor.
        min_band: for ``"auto"``: the range in which images are left alone spans at least this factor either side
            of the training median.

    Shapes:
        ``inputs``: ``(B, C, *S)``; returns ``(B, C_out, *S)``, the wrapped inferer's output at the input's size.

    Raises:
        ValueError: a non-positive or non-finite scale, or one per axis that does not match the input's axes;
            ``blob_scales`` that are not three increasing positive numbers.
    """

    def __init__(
        self,
        inferer: Inferer,
        scale: float | Sequence[float] | str = 1.0,
        blob_scales: Sequence[float] | None = None,
        limits: tuple[float, float] = (0.2, 5.0),
        min_band: float = 1.25,
    ) -> None:
        super().__init__()
        self.inferer = inferer
        self.auto = isinstance(scale, str) and scale.strip().lower() == "auto"
        self.scale = (1.0,) if self.auto else check_scale(scale)
        self.blob_scales = None if blob_scales is None else _check_blob_scales(blob_scales)
        if not 0 < limits[0] <= 1 <= limits[1]:
            raise ValueError(f"limits must be (lo, hi) with 0 < lo <= 1 <= hi, got {limits}.")
        self.limits = (float(limits[0]), float(limits[1]))
        if not min_band >= 1:
            raise ValueError(f"min_band must be >= 1, got {min_band}.")
        self.min_band = float(min_band)
        self.last_scale: tuple[float, ...] = self.scale
        self._warned = False

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.auto:
            outs = [self._auto(item[None], network, *args, **kwargs) for item in inputs]
            return torch.cat(outs)
        self.last_scale = self.scale
        return self._run(inputs, network, self.scale, *args, **kwargs)

    def _run(self, inputs: torch.Tensor, network: Callable, scale: tuple[float, ...], *args: Any, **kw) -> torch.Tensor:
        """The wrapped inferer on ``inputs`` resampled by ``scale``, its output back on the input grid."""
        if all(s == 1.0 for s in scale):
            return self.inferer(inputs, network, *args, **kw)
        spatial = tuple(int(n) for n in inputs.shape[2:])
        scale = scale * len(spatial) if len(scale) == 1 else scale
        if len(scale) != len(spatial):
            raise ValueError(
                f"image_scale has {len(scale)} factors but the input has {len(spatial)} spatial axes {spatial}."
            )
        # the training-side resampling (Rescale) in, the same interpolation back onto the input's grid
        to_scaled = Rescale(scale, mode="linear")
        x = torch.stack([_plain(to_scaled(item)) for item in _plain(inputs)])
        return _resize_to(_plain(self.inferer(x, network, *args, **kw)), spatial)

    def _training_blob_scales(self, network: Callable) -> tuple[float, float, float] | None:
        if self.blob_scales is not None:
            return self.blob_scales
        from spoco_bundle.distributed import unwrap

        net = unwrap(network.student if isinstance(network, StudentTeacherNet) else network)
        buf = getattr(net, "image_blob_scale", None)
        if buf is None or not bool((buf > 0).all()):
            return None
        return _check_blob_scales(buf.tolist())

    def find_scale(self, image: np.ndarray, network: Callable) -> float:
        """The factor ``"auto"`` uses for ``image`` ``(C, *S)`` (1 when the model has no record)."""
        from spoco_bundle.object_size import blob_scale

        trained = self._training_blob_scales(network)
        if trained is None:
            if not self._warned:
                logger.warning(
                    "image_scale 'auto': the model records no blob size of its training images (trained before "
                    "bundle 0.9); images are segmented at scale 1. Give a number as --image_scale to resample them."
                )
                self._warned = True
            return 1.0
        lo, mid, hi = trained
        # at least the zoom range a model tolerates anyway (about 0.8-1.25x), also when the training images all
        # had one blob size (a single training volume)
        lo, hi = min(lo, mid / self.min_band), max(hi, mid * self.min_band)
        found = blob_scale(image[0])
        if not np.isfinite(found):
            logger.warning("image_scale 'auto': the image has no structure to measure (constant?); scale 1.")
            return 1.0
        if lo <= found <= hi:
            return 1.0  # within what the model was trained on: leave the image as it is
        return float(np.clip(mid / found, *self.limits))

    def _auto(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        scale = self.find_scale(_plain(inputs[0]).detach().cpu().numpy(), network)
        self.last_scale = (scale,)
        return self._run(inputs, network, (scale,), *args, **kwargs)


def _check_blob_scales(values: Sequence[float]) -> tuple[float, float, float]:
    v = tuple(float(x) for x in values)
    if len(v) != 3 or not all(np.isfinite(x) and x > 0 for x in v) or not v[0] <= v[1] <= v[2]:
        raise ValueError(f"blob_scales must be three increasing positive numbers (low, middle, high), got {values!r}.")
    return v  # type: ignore[return-value]


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: resampled copies must not carry (and later be written with) a rescaled affine."""
    from monai.data import MetaTensor

    return t.as_tensor() if isinstance(t, MetaTensor) else t


def _resize_to(out: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """``(B, C, *S')`` resampled (linear, anti-aliased) to ``(B, C, *spatial)``."""
    from monai.transforms import Resize

    if tuple(out.shape[2:]) == tuple(spatial):
        return out
    to_input = Resize(spatial, mode="bilinear" if len(spatial) == 2 else "trilinear", anti_aliasing=True)
    return torch.stack([_plain(to_input(item)) for item in out]).to(out.dtype)


class StudentTeacherNet(torch.nn.Module):
    """
    Student and teacher side by side, for consistency clustering: output channels are the student's E embeddings,
    the teacher's E embeddings, then the student's foreground logit (if any).

    Args:
        student: trained network ``f``.
        teacher: its momentum teacher ``g`` (same architecture).
        embedding_dim: E.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, embedding_dim: int = 16) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.embedding_dim = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.student(x)
        g = self.teacher(x)
        e = self.embedding_dim
        return torch.cat([f[:, :e], g[:, :e], f[:, e:]], dim=1)


def segment_files(
    files: Sequence[str],
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
    Segment every file: preprocessing -> inferer(network) -> postprocessing (clustering) -> write
    ``output_dir/<stem>_instances<ext>`` (``ext`` = ``output_ext`` or the input's own suffix) with the input's
    shape, axis order and voxel geometry.

    With ``foreground_mask_dir``, each image's mask there (the one NIfTI/TIFF file with the image's stem, any of
    the suffixes: :func:`~spoco_bundle.data.foreground_mask_file`) is passed to ``preprocessing`` under
    ``mask_key`` beside the image (``{"image": path, mask_key: mask_path}``), for
    :class:`~spoco_bundle.transforms.LoadForegroundMaskd` and :class:`~spoco_bundle.postprocessing.ForegroundMaskd`.

    A file that fails (unreadable, wrong dimensionality, no or two masks, a mask of another shape, ...) is reported
    by name and skipped; the others are still written; at the end a ``RuntimeError`` lists the failures (so the
    command exits non-zero). Outputs are written atomically, so no partial file is left behind; the hidden
    ``.<stem>_instances.partial<ext>`` of a run killed during a write is removed when a run writes that output
    again. A mask folder that does not exist (or is the images' own folder) is an error before anything is done, and
    so are two inputs that would be written to one output (same stem: ``a.nii.gz`` and ``a.tif`` with ``output_ext``
    ``.tif``). Inputs that are the outputs of other inputs (``a_instances.tif`` beside ``a.tif``: an earlier run
    into the input folder) are skipped with a warning.

    With ``blockwise`` (a :class:`~spoco_bundle.blockwise.volume.BlockwiseSettings`), a Zarr / OME-Zarr input, or an
    image whose whole-volume segmentation would need more than its memory budget, is segmented block by block on
    dask instead (:func:`~spoco_bundle.blockwise.volume.segment_volume`; ``preprocessing`` is not used for it: the
    image is read lazily and normalised by the whole volume's percentiles). A Zarr input is written as OME-Zarr
    (``<stem>_instances.ome.zarr`` / ``.zarr``), built under a hidden temporary name that an interrupted run resumes
    from; an output store that exists is an error for that input (never overwritten).

    Returns:
        the written paths.
    """
    from spoco_bundle.blockwise.store import is_zarr
    from spoco_bundle.data import foreground_mask_file, foreground_mask_index
    from spoco_bundle.io import partial_path, write_label_image

    if not files:
        raise ValueError("No input images (.nii, .nii.gz, .tif, .tiff, .zarr) to segment.")
    earlier = _earlier_outputs(files)
    for path, source in earlier.items():
        logger.warning(
            f"skipping {path}: the output of {source} from an earlier run (<stem>_instances beside its input); "
            "to segment it anyway, pass the file itself as --dataset_dir"
        )
    files = [path for path in files if path not in earlier]
    out_paths = _output_paths(files, output_dir, output_ext)
    masks = None if foreground_mask_dir is None else foreground_mask_index(foreground_mask_dir, files)
    if masks is not None:
        logger.info(f"foreground masks from {os.path.abspath(foreground_mask_dir)} (in place of --background)")
    _check_writable_folder(output_dir)
    for out_path in out_paths:  # a killed earlier run's half-written output (only this run's names: see docs)
        stale = partial_path(out_path)
        if not is_zarr(out_path) and os.path.isfile(stale):
            os.remove(stale)
            logger.warning(f"removed {stale}, a partial output left by an interrupted earlier run")
    network.eval()
    written, failed = [], []
    for i, (path, out_path) in enumerate(zip(files, out_paths)):
        try:
            if blockwise is not None and blockwise.wanted(path):
                _segment_blockwise(path, out_path, network, inferer, postprocessing, blockwise, masks, device)
                logger.info(f"[{i + 1}/{len(files)}] {path} -> {out_path}")
                written.append(out_path)
                continue
            if is_zarr(path):
                raise ValueError(f"{path} is a Zarr store, which is segmented blockwise only (blockwise settings).")
            t0 = time.perf_counter()
            item = {"image": path}
            if masks is not None:
                item[mask_key] = foreground_mask_file(path, masks, os.path.abspath(foreground_mask_dir))
            data = preprocessing(item)
            image = data["image"]
            constant = bool(image.max() == image.min())
            if constant:  # nothing to see: no network pass, an empty segmentation
                logger.warning(f"[{i + 1}/{len(files)}] {path}: the image is constant (no contrast); 0 instances.")
                t1 = t2 = time.perf_counter()
                labels = np.zeros((1, *image.shape[1:]), dtype=np.int32)
            else:
                with torch.no_grad():
                    pred = inferer(image[None].to(device), network)[0].cpu()
                t1 = time.perf_counter()
                data["pred"] = pred
                labels = postprocessing(data)["pred"]
                t2 = time.perf_counter()
            meta = dict(getattr(image, "meta", {}))
            write_label_image(out_path, np.asarray(labels)[0], meta)
            n = int(np.asarray(labels).max())
            mask_note = f" in mask {item[mask_key]}" if masks is not None else ""
            if getattr(inferer, "auto", False) and not constant:  # the factor "auto" found for this image
                mask_note += f" at image_scale {', '.join(f'{v:.3g}' for v in inferer.last_scale)} (auto)"
            logger.info(
                f"[{i + 1}/{len(files)}] {path}: {n} instances{mask_note} -> {out_path} "
                f"(network {t1 - t0:.1f} s, clustering {t2 - t1:.1f} s)"
            )
            written.append(out_path)
        except Exception as e:  # report and go on with the other files
            e = _transform_error(e)
            logger.error(f"[{i + 1}/{len(files)}] FAILED {path}: {type(e).__name__}: {e}")
            failed.append(str(e) if str(e).startswith(path) else f"{path}: {e}")  # the path once
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(files)} inputs failed:\n" + "\n".join(failed))
    return written


def _segment_blockwise(
    path: str,
    out_path: str,
    network: torch.nn.Module,
    inferer: Inferer,
    postprocessing: Callable,
    settings: Any,
    masks: dict | None,
    device: str | torch.device,
) -> None:
    """One input of :func:`segment_files`, blockwise (:func:`spoco_bundle.blockwise.volume.segment_volume`)."""
    from spoco_bundle.blockwise.volume import segment_volume

    if masks is not None:
        raise ValueError(
            f"{path}: foreground masks (--foreground_mask_dir) are not supported for blockwise segmentation yet; "
            "segment it without, or raise --max_memory_gb if the whole volume fits."
        )
    spatial_dims = int(getattr(getattr(network, "student", network), "spatial_dims", 3))
    t0 = time.perf_counter()
    info = segment_volume(path, out_path, network, inferer, postprocessing, settings, spatial_dims, device)
    logger.info(
        f"{path}: {info['objects']} instances, blockwise: {info['blocks']} blocks of {list(info['block_shape'])} "
        f"+ halo {list(info['halo'])} / {list(info['halo_hi'])} ({info['resumed_blocks']} from an interrupted run), "
        f"{info['matched']} matches "
        f"across block borders ({time.perf_counter() - t0:.1f} s)"
    )


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
    from spoco_bundle.blockwise.store import split_volume_suffix

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
    from spoco_bundle.blockwise.store import split_volume_suffix

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


def _transform_error(e: BaseException) -> BaseException:
    """The error a transform raised, not MONAI's ``RuntimeError("applying transform ...")`` wrapper(s) around it,
    whose message names only the transform object."""
    while isinstance(e, RuntimeError) and str(e).startswith("applying transform") and e.__cause__ is not None:
        e = e.__cause__
    return e


def network_for_clustering(
    network: torch.nn.Module, clustering: str, teacher_ckpt_path: str, embedding_dim: int = 16
) -> torch.nn.Module:
    """
    The network inference runs: the student alone, or, for ``clustering="consistency"``, the student beside its
    teacher loaded (strictly) from ``teacher_ckpt_path`` (written by training as ``teacher.pt``).
    """
    if clustering != "consistency":
        return network
    from spoco_bundle.networks import load_weights

    teacher = load_weights(copy.deepcopy(network), teacher_ckpt_path, map_location=next(network.parameters()).device)
    return StudentTeacherNet(network, teacher, embedding_dim)
