"""Image IO for the SPOCO bundle: NIfTI and TIFF volumes in their own storage order.

Axis convention (one convention end to end): arrays are used in the order the file stores them.

- NIfTI is read by MONAI's :class:`~monai.data.NibabelReader`: on-disk ``(i, j, k)`` order, affine from the header.
- TIFF is read by :class:`TiffReader` (tifffile): ``(Z, Y, X)`` for stacks, ``(Y, X)`` for single images, and an
  affine ``diag(spacing..., 1)`` whose spacings follow the array axes. MONAI's own TIFF path (ITKReader) transposes
  to ``(X, Y, Z)`` and ignores the ImageJ z-spacing, and PILReader silently reads only the first page, which is why
  the bundle never relies on MONAI's reader auto-selection for TIFF.

Nothing is registered globally. Use :class:`LoadVolumed` (a :class:`~monai.transforms.LoadImaged` with the right
reader and ``dtype=None``) or pass :func:`image_readers` to ``LoadImaged(reader=...)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import tifffile
from monai.data import ImageReader, ImageWriter, NibabelReader
from monai.data.utils import affine_to_spacing
from monai.transforms import LoadImaged
from monai.utils import MetaKeys, SpaceKeys, convert_data_type, ensure_tuple

__all__ = [
    "NIFTI_SUFFIXES",
    "TIFF_SUFFIXES",
    "IMAGE_SUFFIXES",
    "ZARR_SUFFIXES",
    "VOLUME_SUFFIXES",
    "split_image_suffix",
    "split_volume_suffix",
    "is_zarr",
    "filename_of",
    "stem_of",
    "TiffReader",
    "NiftiTiffReader",
    "TiffWriter",
    "image_readers",
    "read_image",
    "read_spacing",
    "select_non_spatial",
    "LoadVolumed",
    "label_dtype",
    "write_label_image",
    "partial_path",
]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
TIFF_SUFFIXES = (".tiff", ".tif")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + TIFF_SUFFIXES
ZARR_SUFFIXES = (".ome.zarr", ".zarr")
VOLUME_SUFFIXES = ZARR_SUFFIXES + IMAGE_SUFFIXES
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")

# tifffile axis codes that are not spatial; anything else besides Y/X is taken as the stack (Z) axis
# non-spatial axes of which the user picks one index, with the option that picks it
NON_SPATIAL_OPTIONS = {"channel": "input_channel", "time": "input_time_point"}
# ImageJ writes no standard unit spelling; map the usual micrometre spellings to one string
_MICRON_UNITS = {"micron", "microns", "um", "\\u00b5m", "\u00b5m", "\u03bcm", "micrometer", "micrometre"}
# ImageJ-compatible sample types (ImageJ cannot open 32-bit integer stacks)
_IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


def split_image_suffix(path: str | os.PathLike) -> tuple[str, str]:
    """Split a file name into ``(stem, suffix)`` for the supported suffixes (case-insensitive).

    Returns ``(basename, "")`` when the suffix is not one of :data:`IMAGE_SUFFIXES`.
    """
    name = os.path.basename(os.fspath(path))
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)], name[len(name) - len(suffix) :]
    return name, ""


def split_volume_suffix(name: str | os.PathLike) -> tuple[str, str]:
    """``(stem, suffix)`` like :func:`split_image_suffix`, also for ``.zarr`` / ``.ome.zarr``."""
    name = os.path.basename(os.fspath(name).rstrip("/\\"))
    for suffix in ZARR_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], name[len(name) - len(suffix) :]
    return split_image_suffix(name)


def is_zarr(path: str | os.PathLike) -> bool:
    """A Zarr store: a folder named ``*.zarr`` or holding Zarr metadata."""
    path = os.fspath(path)
    if path.rstrip("/\\").lower().endswith(".zarr"):
        return True
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in _ZARR_MARKERS)


def filename_of(data: Any, meta: Mapping | None = None) -> str | None:
    """The file a loaded array came from: ``filename_or_obj`` of a MetaTensor, or of its meta dict; None if unknown."""
    if hasattr(data, "meta") and isinstance(data.meta, Mapping):
        meta = data.meta
    name = (meta or {}).get("filename_or_obj")
    return None if name is None else str(name)


def stem_of(data: Mapping, key: Any) -> str:
    """The file name of ``data[key]`` without folder and suffix (from its MetaTensor or ``{key}_meta_dict``): what
    per-image choices (the sparse selection) are seeded with, so that a file gives the same choice wherever it is
    stored; "" when unknown."""
    name = filename_of(data.get(key), data.get(f"{key}_meta_dict"))
    return "" if not name else split_image_suffix(name)[0]


def _is_tiff(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(TIFF_SUFFIXES)


def _is_nifti(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(NIFTI_SUFFIXES)


def _normalise_unit(unit: Any) -> str:
    unit = str(unit or "").strip()
    return "um" if unit.lower() in _MICRON_UNITS else unit


def _rational_to_spacing(value: Any) -> float | None:
    """TIFF X/YResolution is pixels per unit as a rational (num, den); the pixel size is den / num."""
    try:
        num, den = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if num <= 0 or den <= 0 or not np.isfinite(num) or not np.isfinite(den):
        return None
    return den / num


def _valid_spacing(value: Any, default: float = 1.0) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return default
    return value if np.isfinite(value) and value > 0 else default


def _ome_spacing(ome_xml: str) -> tuple[dict[str, float], str] | None:
    """Physical sizes from OME-XML ``Pixels`` (first image), or None when absent."""
    try:
        pixels = tifffile.xml2dict(ome_xml)["OME"]["Image"]
        pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
    except Exception:  # malformed OME-XML: fall back to the TIFF tags
        return None
    sizes = {ax: pixels.get(f"PhysicalSize{ax}") for ax in "XYZ"}
    if all(v is None for v in sizes.values()):
        return None
    unit = pixels.get("PhysicalSizeXUnit", "\u00b5m")  # OME default unit is micrometre
    return {ax: _valid_spacing(v) for ax, v in sizes.items() if v is not None}, _normalise_unit(unit)


def select_non_spatial(
    source: str,
    names: Sequence[str],
    kinds: Sequence[str],
    shape: Sequence[int],
    input_channel: int | None = None,
    input_time_point: int | None = None,
    hint: str = "",
) -> tuple[tuple[Any, ...], list[int]]:
    """
    The index that keeps the spatial axes of an array and one position along each channel / time axis.

    Args:
        source: what the array is, for the errors (e.g. ``"TIFF file /data/a.tif"``).
        names: the axes' names (``"C"``, ``"t"``, ...), for the errors.
        kinds: per axis ``"channel"``, ``"time"`` or anything else for a spatial axis.
        shape: the array's shape.
        input_channel, input_time_point: the chosen positions; None is allowed where the axis has one position.
        hint: appended to the error for a channel axis without a choice.

    Returns:
        ``(index, spatial_axes)``: an index of ints and ``slice(None)`` for ``array[index]``, and the kept axes.

    Raises:
        ValueError: naming ``source``, the axis and the option, for several positions without a choice or a choice
            outside the axis.
    """
    index: list[Any] = []
    spatial: list[int] = []
    for ax, (name, kind, size) in enumerate(zip(names, kinds, shape)):
        if kind not in NON_SPATIAL_OPTIONS:
            index.append(slice(None))
            spatial.append(ax)
            continue
        option = NON_SPATIAL_OPTIONS[kind]
        choice = input_channel if kind == "channel" else input_time_point
        what = ("time point" if kind == "time" else "channel") + ("s" if size != 1 else "")
        if choice is None and size > 1:
            raise ValueError(
                f"{source} has {size} {what} (axis {name!r}, shape {tuple(shape)}): choose one with --{option} "
                f"(0..{size - 1}).{hint if kind == 'channel' else ''}"
            )
        choice = 0 if choice is None else int(choice)
        if not 0 <= choice < size:
            raise ValueError(
                f"{source} has {size} {what} (axis {name!r}): --{option} {choice} is outside 0..{size - 1}."
            )
        index.append(choice)
    return tuple(index), spatial


def tiff_axis_kinds(axes: str, input_time_point: int | None = None) -> list[str]:
    """
    ``"channel"``, ``"time"`` or ``"space"`` for each of tifffile's series axes. ``C`` is a channel axis; ``T`` is
    time when the file also has Z (or another stack axis) or a time point is chosen, else frames are read as the
    stack's Z (as ImageJ files without axes metadata store z-stacks).
    """
    stack_axes = [a for a in axes if a not in "CTSYX"]
    time_is_time = input_time_point is not None or bool(stack_axes)
    return ["channel" if a == "C" else "time" if a == "T" and time_is_time else "space" for a in axes]


def nifti_axis_kinds(ndim: int) -> list[str]:
    """The NIfTI standard's axes: ``(i, j, k)`` space, the 4th time, the 5th the components (read as channels)."""
    return ["space"] * min(ndim, 3) + ["time", "channel", "other"][: max(0, ndim - 3)] + ["other"] * max(0, ndim - 6)


class _TiffImage(NamedTuple):
    """What :meth:`TiffReader.read` returns: the array and metadata, or the error that prevented reading."""

    filename: str
    array: np.ndarray | None
    meta: dict | None
    error: str | None


class TiffReader(ImageReader):
    """
    Load single-channel 2D images and 3D stacks from TIFF files with tifffile, in tifffile's axis order.

    The array is ``(Y, X)`` for a single image and ``(Z, Y, X)`` for a stack (any one non-channel axis in front of
    ``Y, X``: ImageJ slices or frames, OME Z, or a plain multi-page file). Singleton axes are dropped (tifffile's
    default). The metadata follows MONAI's reader conventions: ``affine`` and ``original_affine`` are
    ``diag(spacing_0, spacing_1, [spacing_2,] 1)`` as a 4x4 matrix with the spacings in array axis order
    (for 2D: ``diag(sy, sx, 1, 1)``, like NibabelReader for 2D NIfTI), ``spatial_shape`` is the array shape,
    ``original_channel_dim`` is ``float("nan")`` (no channel, the value NibabelReader/ITKReader use), ``space`` is
    RAS as in NibabelReader; additionally ``spacing`` (array order), ``spacing_unit`` and ``tiff_axes``.

    Spacing sources, first match wins:

    - ImageJ metadata: X/YResolution tags (pixels per unit, so spacing = den / num), ``spacing`` for Z, ``unit``.
    - OME-XML: ``PhysicalSizeX/Y/Z``.
    - Plain TIFF: X/YResolution with ResolutionUnit NONE (taken as is) or CENTIMETER (converted to um);
      ``spacing``/``unit`` from tifffile's JSON description (as written by :class:`TiffWriter` for non-ImageJ
      types). Resolution in inches (the TIFF default unit) is a print DPI written by generic image software,
      not a pixel size, so it is ignored.
    - Otherwise 1.0.

    A grayscale image stored as colour (RGB / RGBA / gray + alpha samples with equal colour channels and one alpha
    value, as image software often exports it) is read as its one channel (:func:`gray_from_colour`, logged).
    A file with several channels (axis ``C``) or time points (``T`` beside a Z axis) gives the one that
    ``input_channel`` / ``input_time_point`` choose (:func:`tiff_axis_kinds`). Several channels or time points without
    a choice, colour images and 4D+ stacks raise a ValueError naming the file, the reason and the option (from
    :meth:`get_data`, so that ``LoadImage`` does not fall back to another reader that would load them silently).

    Args:
        series: index of the tifffile series to read (0: the first image/stack of the file).
        input_channel: the channel to read from a multi-channel file.
        input_time_point: the time point to read from a time series.
        kwargs: additional args for ``tifffile.TiffPageSeries.asarray``.
    """

    def __init__(
        self, series: int = 0, input_channel: int | None = None, input_time_point: int | None = None, **kwargs
    ):
        super().__init__()
        self.series = series
        self.input_channel = input_channel
        self.input_time_point = input_time_point
        self.kwargs = kwargs

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        """True if every file name ends with ``.tif`` or ``.tiff`` (case-insensitive)."""
        return all(_is_tiff(f) for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs) -> _TiffImage | list[_TiffImage]:
        """
        Read TIFF file(s). Raises ValueError for names without a TIFF suffix (so ``LoadImage`` tries its next
        reader); problems with an actual TIFF file are deferred to :meth:`get_data`.
        """
        filenames = [os.fspath(f) for f in ensure_tuple(data)]
        if not self.verify_suffix(filenames):
            raise ValueError(f"TiffReader reads only {TIFF_SUFFIXES} files, got {filenames}.")
        kwargs_ = {**self.kwargs, **kwargs}
        images = [self._read_one(name, **kwargs_) for name in filenames]
        return images if len(images) > 1 else images[0]

    def _read_one(self, filename: str, **kwargs) -> _TiffImage:
        try:
            array, meta = self._read_array_and_meta(filename, **kwargs)
        except Exception as e:  # keep the cause; get_data raises it with the file name
            return _TiffImage(filename, None, None, f"{type(e).__name__}: {e}")
        return _TiffImage(filename, array, meta, None)

    def _read_array_and_meta(self, filename: str, **kwargs) -> tuple[np.ndarray | None, dict]:
        with tifffile.TiffFile(filename) as tif:
            if self.series >= len(tif.series):
                raise ValueError(f"the file has {len(tif.series)} image series, series {self.series} requested")
            series = tif.series[self.series]
            axes, shape = series.axes, tuple(series.shape)
            samples = axes.index("S") if "S" in axes and "C" not in axes else None
            if samples is not None:  # RGB(A): accepted below when it is a grayscale image stored as colour
                layout = colour_layout(series.keyframe, shape[samples])
                if isinstance(layout, str):
                    return None, {"reject": layout}
                axes, shape = axes.replace("S", ""), shape[:samples] + shape[samples + 1 :]
            if samples is None and "S" in axes:
                return None, {
                    "reject": f"has colour samples per pixel (RGB) (axes {axes!r}, shape {shape}); only "
                    "single-channel grayscale images are supported, convert it to one channel first"
                }
            hint = (
                " If the file is a z-stack mislabelled as channels (tifffile's imagej=True without axes "
                "does this), save it again with metadata={'axes': 'ZYX'}."
            )
            kinds = tiff_axis_kinds(axes, self.input_time_point)
            try:
                index, kept = select_non_spatial(
                    f"TIFF file {filename}", axes, kinds, shape, self.input_channel, self.input_time_point, hint
                )
            except ValueError as e:
                return None, {"reject": str(e).replace(f"TIFF file {filename} ", "", 1)}
            axes, shape = "".join(axes[i] for i in kept), tuple(shape[i] for i in kept)
            if len(shape) not in (2, 3) or axes[-2:] != "YX":
                return None, {
                    "reject": f"has axes {axes!r} with shape {shape}; only 2D (Y, X) images and 3D (Z, Y, X) "
                    "single-channel stacks are supported"
                }
            array = series.asarray(**kwargs)
            if samples is not None:
                array, problem = gray_from_colour(np.moveaxis(array, samples, -1), *layout)
                if problem:
                    return None, {"reject": problem}
                logger.info(f"{filename}: a grayscale image stored as colour (equal colour channels), read as one")
            array = np.ascontiguousarray(array[index])
            spacing, unit = self._spacing(tif, series, len(shape))
        if not array.dtype.isnative:  # torch has no big-endian dtypes
            array = array.astype(array.dtype.newbyteorder("="))
        affine = np.eye(4, dtype=np.float64)
        affine[range(len(spacing)), range(len(spacing))] = spacing
        meta = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            MetaKeys.SPACE: SpaceKeys.RAS,
            "spacing": np.asarray(spacing, dtype=np.float64),
            "spacing_unit": unit,
            "tiff_axes": axes,
        }
        return array, meta

    @staticmethod
    def _spacing(tif: tifffile.TiffFile, series: Any, ndim: int) -> tuple[list[float], str]:
        page = series.keyframe
        tags = page.tags
        xres = _rational_to_spacing(tags["XResolution"].value) if "XResolution" in tags else None
        yres = _rational_to_spacing(tags["YResolution"].value) if "YResolution" in tags else None
        res_unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2  # TIFF default: inch
        sx = sy = sz = 1.0
        unit = ""
        ij = tif.imagej_metadata if tif.is_imagej else None
        ome = _ome_spacing(tif.ome_metadata) if tif.is_ome and tif.ome_metadata else None
        if ij is not None:
            # ImageJ stores the calibration in the resolution tags with ResolutionUnit NONE and the unit in its text
            sx, sy = _valid_spacing(xres), _valid_spacing(yres if yres is not None else xres)
            sz = _valid_spacing(ij.get("spacing", 1.0))
            unit = _normalise_unit(ij.get("unit", ""))
        elif ome is not None:
            sizes, unit = ome
            sx, sy, sz = sizes.get("X", 1.0), sizes.get("Y", sizes.get("X", 1.0)), sizes.get("Z", 1.0)
        else:
            shaped = tif.shaped_metadata[0] if tif.is_shaped and tif.shaped_metadata else {}
            if res_unit == 1:  # NONE: calibration in an unnamed (or described) unit
                sx, sy = _valid_spacing(xres), _valid_spacing(yres if yres is not None else xres)
                unit = _normalise_unit(shaped.get("unit", ""))
            elif res_unit == 3:  # CENTIMETER -> micrometre
                if xres is not None:
                    sx = xres * 1e4
                    sy = (yres if yres is not None else xres) * 1e4
                    unit = "um"
            # res_unit == 2 (INCH, also the default): a print DPI, not a pixel size -> keep 1.0
            sz = _valid_spacing(shaped.get("spacing", 1.0))
        return ([sz, sy, sx] if ndim == 3 else [sy, sx]), unit

    def get_data(self, img: _TiffImage | Sequence[_TiffImage]) -> tuple[np.ndarray, dict]:
        """
        Return ``(array, meta)``. Several files are stacked on a new first axis (``original_channel_dim`` 0), as
        MONAI's readers do; they must have the same shape and affine.

        Raises:
            ValueError: naming the file, when it could not be read or is multi-channel / not 2D or 3D.
        """
        images = [img] if isinstance(img, _TiffImage) else list(img)
        arrays, metas = [], []
        for image in images:
            if image.error is not None:
                raise ValueError(f"Cannot read TIFF file {image.filename}: {image.error}")
            if image.array is None:
                reject = image.meta["reject"].rstrip(".")  # type: ignore[index]
                raise ValueError(f"TIFF file {image.filename} {reject}.")
            arrays.append(image.array)
            metas.append(image.meta)
        meta = dict(metas[0])
        if len(arrays) == 1:
            return arrays[0], meta
        for image, other in zip(images[1:], metas[1:]):
            if tuple(other[MetaKeys.SPATIAL_SHAPE]) != tuple(meta[MetaKeys.SPATIAL_SHAPE]) or not np.allclose(
                other[MetaKeys.AFFINE], meta[MetaKeys.AFFINE]
            ):
                raise ValueError(
                    f"TIFF file {image.filename} differs in shape or spacing from {images[0].filename}; "
                    "files stacked as channels must match."
                )
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays, axis=0), meta


class NiftiTiffReader(ImageReader):
    """
    One reader for the bundle's two formats, chosen by suffix: ``.nii``/``.nii.gz`` with MONAI's
    :class:`~monai.data.NibabelReader` (on-disk order, default arguments) and ``.tif``/``.tiff`` with
    :class:`TiffReader`.

    A single dispatching reader (rather than ``reader=[NibabelReader(), TiffReader()]``) matters because
    ``LoadImage`` with user readers does not check suffixes: it calls ``read`` on each reader, newest first, and
    logs an INFO line for every failure, which would print one line per loaded NIfTI file during training.
    Other suffixes raise in :meth:`read`, so ``LoadImage`` goes on to MONAI's default readers for them.

    Channel and time-point choice: a NIfTI file's 4th axis is time and its 5th the components (channels), as the
    NIfTI standard has it; TIFF as :class:`TiffReader`. Several of them without a choice raise a ValueError naming
    the file and the option.

    Args:
        nibabel_kwargs: arguments for :class:`~monai.data.NibabelReader`.
        tiff_kwargs: arguments for :class:`TiffReader`.
        input_channel: the channel to read from a multi-channel file.
        input_time_point: the time point to read from a time series.
    """

    def __init__(
        self,
        nibabel_kwargs: Mapping | None = None,
        tiff_kwargs: Mapping | None = None,
        input_channel: int | None = None,
        input_time_point: int | None = None,
    ):
        super().__init__()
        self.input_channel, self.input_time_point = input_channel, input_time_point
        self.nifti_reader = NibabelReader(**dict(nibabel_kwargs or {}))
        choice = {"input_channel": input_channel, "input_time_point": input_time_point}
        self.tiff_reader = TiffReader(**{**choice, **dict(tiff_kwargs or {})})

    def _reader_for(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> ImageReader | None:
        names = ensure_tuple(filename)
        if all(_is_nifti(f) for f in names):
            return self.nifti_reader
        if all(_is_tiff(f) for f in names):
            return self.tiff_reader
        return None

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        """True for ``.nii``, ``.nii.gz``, ``.tif``, ``.tiff`` (case-insensitive; all files of one kind)."""
        return self._reader_for(filename) is not None

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs) -> tuple[ImageReader, Any]:
        reader = self._reader_for(data)
        if reader is None:
            raise ValueError(f"NiftiTiffReader reads only {IMAGE_SUFFIXES} files (all of one kind), got {data}.")
        if reader is self.nifti_reader:
            try:
                return reader, reader.read(data, **kwargs)
            except Exception as e:  # a broken .nii(.gz): say so in get_data instead of LoadImage trying other readers
                names = [os.fspath(f) for f in ensure_tuple(data)]
                return reader, ValueError(f"Cannot read NIfTI file {', '.join(names)}: {type(e).__name__}: {e}")
        return reader, reader.read(data, **kwargs)

    def get_data(self, img: tuple[ImageReader, Any]) -> tuple[np.ndarray, dict]:
        reader, obj = img
        if isinstance(obj, ValueError):
            raise obj
        if reader is not self.nifti_reader:
            return reader.get_data(obj)
        images = obj if isinstance(obj, (list, tuple)) else [obj]
        name = ", ".join(getattr(i, "get_filename", lambda: None)() or "(unknown file)" for i in images)
        if len(images) == 1 and len(images[0].shape) > 3:  # time points / channels: pick one (several files: stacked)
            index, _ = select_non_spatial(
                f"NIfTI file {name}",
                ["i", "j", "k", "t", "c", "u", "v"][: len(images[0].shape)],
                nifti_axis_kinds(len(images[0].shape)),
                images[0].shape,
                self.input_channel,
                self.input_time_point,
            )
        try:
            array, meta = reader.get_data(obj)
        except Exception as e:  # nibabel reads lazily: truncated data only fails here
            raise ValueError(f"Cannot read NIfTI file {name}: {type(e).__name__}: {e}") from e
        if len(images) == 1 and len(images[0].shape) > 3:
            array = array[index]
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan")
        return array, meta


def image_readers(input_channel: int | None = None, input_time_point: int | None = None) -> list[ImageReader]:
    """
    Readers for ``LoadImaged(keys, reader=image_readers())``: NIfTI -> NibabelReader, TIFF -> TiffReader, reading
    the chosen channel / time point of files with several.
    """
    return [NiftiTiffReader(input_channel=input_channel, input_time_point=input_time_point)]


def read_image(
    filename: str | os.PathLike, input_channel: int | None = None, input_time_point: int | None = None
) -> tuple[np.ndarray, dict]:
    """Read one NIfTI or TIFF file as ``(array, meta)`` in storage order, with the file's own dtype (the chosen
    channel / time point of a file with several).

    Raises:
        ValueError: naming the file, for an unsupported suffix or a file that cannot be read.
    """
    filename = os.fspath(filename)
    reader = NiftiTiffReader(input_channel=input_channel, input_time_point=input_time_point)
    if not reader.verify_suffix(filename):
        raise ValueError(f"Unsupported image file {filename}: expected one of {IMAGE_SUFFIXES}.")
    try:
        array, meta = reader.get_data(reader.read(filename))
        array = np.asarray(array)
    except ValueError as e:
        if filename in str(e):
            raise
        raise ValueError(f"Cannot read image file {filename}: {e}") from e
    except Exception as e:  # nibabel / gzip / OS errors
        raise ValueError(f"Cannot read image file {filename}: {type(e).__name__}: {e}") from e
    meta = dict(meta)
    meta["filename_or_obj"] = filename
    return array, meta


def colour_layout(page: Any, samples: int) -> tuple[int, bool] | str:
    """
    ``(colour channels, alpha)`` of a TIFF page with ``samples`` samples per pixel that may be a grayscale image
    stored as colour: RGB (3), RGB + alpha (4) or gray + alpha (2); else why it is refused (from the header alone).
    """
    alpha = {tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA}
    extras = tuple(page.extrasamples)
    photometric = tifffile.PHOTOMETRIC(page.photometric)
    if photometric == tifffile.PHOTOMETRIC.RGB and samples == 3 + len(extras) and len(extras) <= 1:
        if not extras or extras[0] in alpha:
            return 3, bool(extras)
    if photometric == tifffile.PHOTOMETRIC.MINISBLACK and samples == 2 and len(extras) == 1 and extras[0] in alpha:
        return 1, True
    return (
        f"has {samples} samples per pixel (photometric {photometric.name}, extra samples "
        f"{[tifffile.EXTRASAMPLE(e).name for e in extras]}); only single-channel grayscale images (or grayscale "
        "saved as RGB / RGBA) are supported, convert it to one channel first"
    )


def gray_from_colour(array: np.ndarray, colour: int, alpha: bool) -> tuple[np.ndarray | None, str]:
    """
    One channel of ``array`` ``(*S, samples)`` (``colour`` colour channels, then an alpha channel if ``alpha``; see
    :func:`colour_layout`) when it is a grayscale image stored as colour: equal colour channels and one alpha value.
    Else ``(None, reason)``.
    """
    kind = {(1, True): "gray + alpha", (3, False): "RGB", (3, True): "RGBA"}[(colour, alpha)]
    what = f"{array.shape[-1]} colour samples per pixel ({kind})"
    if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, colour)):
        return None, (
            f"has {what} with different colour channels (a colour image); only single-channel grayscale images are "
            "supported: save the stain's channel as its own image (e.g. Fiji: Image > Color > Split Channels)"
        )
    if alpha and array[..., -1].min() != array[..., -1].max():
        return None, f"has {what} with a varying transparency (alpha); save it without transparency first"
    return np.ascontiguousarray(array[..., 0]), ""


def read_spacing(
    filename: str | os.PathLike, input_channel: int | None = None, input_time_point: int | None = None
) -> tuple[tuple[int, ...], tuple[float, ...], str]:
    """
    The shape, voxel size and its unit of a NIfTI or TIFF file from its header alone (the voxels are not read):
    what :func:`read_image` would give as the array's shape (with the same channel / time-point choice) and the norms
    of its affine's columns (array order).

    Returns:
        ``(shape, spacing, unit)``; ``unit`` as the file states it (NIfTI: ``"mm"``, ``"micron"``, ...; TIFF: as
        :class:`TiffReader` normalises it), ``""`` when it states none.

    Raises:
        ValueError: naming the file, for an unsupported suffix or a file that cannot be read.
    """
    filename = os.fspath(filename)
    try:
        if _is_tiff(filename):
            with tifffile.TiffFile(filename) as tif:
                series = tif.series[0]
                axes = series.axes.replace("S", "")  # colour samples: read_image reads one channel or refuses
                full = tuple(int(v) for i, v in enumerate(series.shape) if series.axes[i] != "S")
                kinds = tiff_axis_kinds(axes, input_time_point)
                _, kept = select_non_spatial(
                    f"TIFF file {filename}", axes, kinds, full, input_channel, input_time_point
                )
                shape = tuple(full[i] for i in kept)
                spacing, unit = TiffReader._spacing(tif, series, len(shape))
            return shape, tuple(float(v) for v in spacing), unit
        if _is_nifti(filename):
            img = nib.load(filename)
            full = tuple(int(v) for v in img.shape)
            _, kept = select_non_spatial(
                f"NIfTI file {filename}",
                "ijktcuv"[: len(full)],
                nifti_axis_kinds(len(full)),
                full,
                input_channel,
                input_time_point,
            )
            shape = tuple(full[i] for i in kept)
            affine = np.asarray(img.affine, dtype=np.float64)
            spacing = affine_to_spacing(affine, r=3).tolist() + [1.0] * max(0, len(shape) - 3)
            unit = img.header.get_xyzt_units()[0]
            return shape, tuple(float(v) for v in spacing[: len(shape)]), "" if unit == "unknown" else str(unit)
    except ValueError as e:
        if os.fspath(filename) in str(e):
            raise
        raise ValueError(f"Cannot read the header of image file {filename}: {type(e).__name__}: {e}") from e
    except Exception as e:
        raise ValueError(f"Cannot read the header of image file {filename}: {type(e).__name__}: {e}") from e
    raise ValueError(f"Unsupported image file {filename}: expected one of {IMAGE_SUFFIXES}.")


class LoadVolumed(LoadImaged):
    """
    :class:`~monai.transforms.LoadImaged` preset for this bundle: reader :class:`NiftiTiffReader` (storage order,
    ImageJ spacing) and ``dtype=None`` so that label files keep their integer type (LoadImaged's default float32
    would hide float-stored labels from :class:`~spoco_bundle.transforms.CheckImageLabeld`). uint16 becomes int32
    and uint32 becomes int64 in torch. Being a LoadImaged subclass, MONAI Label still recognises it.

    Args:
        keys: keys of the file names to load.
        reader: defaults to :func:`image_readers`.
        dtype: defaults to None (keep the file's type).
        input_channel: the channel to read from multi-channel files (with the default reader).
        input_time_point: the time point to read from time series (with the default reader).
        kwargs: other :class:`~monai.transforms.LoadImaged` arguments.
    """

    def __init__(
        self,
        keys,
        reader: Any = None,
        dtype: Any = None,
        input_channel: int | None = None,
        input_time_point: int | None = None,
        **kwargs,
    ):
        if reader is None:
            reader = image_readers(input_channel, input_time_point)
        super().__init__(keys, reader=reader, dtype=dtype, **kwargs)


class TiffWriter(ImageWriter):
    """
    Write a single-channel 2D or 3D array as TIFF with tifffile, in array order (the inverse of
    :class:`TiffReader`: ``(Y, X)`` or ``(Z, Y, X)`` pages), with the spacing from the affine.

    - uint8, uint16 and float32 are written as ImageJ hyperstacks (``imagej=True``): X/YResolution tags, ``spacing``
      (Z) and ``unit`` in the ImageJ description, so Fiji shows the calibration.
    - Other types (notably uint32 instance ids, which ImageJ cannot store, and int8/int16/int32/float64) are written
      as plain TIFF with X/YResolution tags (ResolutionUnit NONE) and ``spacing``/``unit`` in tifffile's JSON
      description; :class:`TiffReader` reads both back, other software sees the X/Y calibration only.

    With ``output_dtype=None`` the data's type is kept, except: bool -> uint8, float16/float64 -> float32 and 64-bit
    integers -> the smallest of uint8/uint16/uint32 (or int16/int32 when negative) holding the values.
    ``SaveImage`` passes ``output_dtype=float32`` by default: set ``output_dtype`` (e.g. ``np.uint16``/``np.uint32``)
    for label maps. Integer outputs are rounded and range-checked, never wrapped.

    Usage: ``SaveImaged(keys="pred", writer=TiffWriter, output_ext=".tif", output_dtype=np.uint32)`` or, in a config,
    ``"writer": "spoco_bundle.io.TiffWriter"``.

    Args:
        output_dtype: sample type of the file, None: see above.
        imagej: write ImageJ hyperstacks when the type allows it.
        compression: tifffile compression, e.g. ``"zlib"``; None for uncompressed.
        kwargs: stored as attributes (``ImageWriter`` convention; ``SaveImage`` passes ``scale``).
    """

    output_dtype: Any = None

    def __init__(self, output_dtype: Any = None, imagej: bool = True, compression: str | None = None, **kwargs):
        super().__init__(output_dtype=output_dtype, imagej=imagej, compression=compression, affine=None, **kwargs)
        self.unit = ""
        self.input_dtype: np.dtype | None = None

    def set_data_array(self, data_array: Any, channel_dim: int | None = 0, squeeze_end_dims: bool = True, **kwargs):
        """
        Args:
            data_array: ``(C=1, *spatial)`` with ``channel_dim=0`` (MONAI's channel-first layout) or ``(*spatial)``
                with ``channel_dim=None``; 2 or 3 spatial axes.
            channel_dim: axis of the channel, None if there is none.
            squeeze_end_dims: accepted for ``SaveImage`` compatibility; the single channel is always dropped.
        """
        array = convert_data_type(data_array, np.ndarray)[0]
        if channel_dim is not None:
            if array.shape[channel_dim] != 1:
                raise ValueError(
                    f"TiffWriter writes single-channel images, got {array.shape[channel_dim]} channels "
                    f"(shape {array.shape}, channel_dim={channel_dim})."
                )
            array = np.squeeze(array, axis=channel_dim)
        if array.ndim not in (2, 3):
            raise ValueError(f"TiffWriter writes 2D or 3D images, got spatial shape {array.shape}.")
        self.input_dtype = array.dtype
        self.data_obj = array

    def set_metadata(self, meta_dict: Mapping | None = None, resample: bool = False, **options):
        """
        Take the affine (for the spacing) and unit from ``meta_dict``; optionally resample to ``original_affine``.

        Args:
            meta_dict: metadata with ``affine`` and optionally ``original_affine``, ``spatial_shape``,
                ``spacing_unit`` (TiffReader) or ``xyzt_units`` (NIfTI).
            resample: resample from ``affine`` to ``original_affine``/``spatial_shape`` first (use
                ``mode="nearest"`` for labels). Not needed in this bundle (no Spacing/Orientation transforms).
            options: ``mode``, ``padding_mode``, ``align_corners``, ``dtype`` for the resampling.
        """
        original_affine, affine, spatial_shape = self.get_meta_info(meta_dict)
        if resample and original_affine is not None:
            self.data_obj, affine = self.resample_if_needed(
                data_array=self.data_obj,
                affine=affine,
                target_affine=original_affine,
                output_spatial_shape=spatial_shape,
                mode=options.pop("mode", "bilinear"),
                padding_mode=options.pop("padding_mode", "border"),
                align_corners=options.pop("align_corners", False),
                dtype=options.pop("dtype", np.float64),
            )
        self.affine = None if affine is None else convert_data_type(affine, np.ndarray)[0]
        meta_dict = meta_dict or {}
        unit = meta_dict.get("spacing_unit")
        if unit is None and "xyzt_units" in meta_dict:  # NIfTI: bits 0-2 code the spatial unit
            unit = {1: "m", 2: "mm", 3: "um"}.get(int(np.asarray(meta_dict["xyzt_units"]).reshape(-1)[0]) & 7, "")
        self.unit = _normalise_unit(unit)

    def _resolve_dtype(self, array: np.ndarray) -> np.dtype:
        if self.output_dtype is not None:
            return np.dtype(self.output_dtype)
        dtype = self.input_dtype if self.input_dtype is not None else array.dtype
        if dtype == np.bool_:
            return np.dtype(np.uint8)
        if np.issubdtype(dtype, np.floating):
            return np.dtype(np.float32)
        if np.issubdtype(dtype, np.integer) and dtype.itemsize == 8:
            lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
            for cand in ((np.uint8, np.uint16, np.uint32) if lo >= 0 else (np.int16, np.int32)):
                info = np.iinfo(cand)
                if info.min <= lo and hi <= info.max:
                    return np.dtype(cand)
            return dtype
        return dtype

    def write(self, filename: os.PathLike | str, verbose: bool = False, **kwargs):
        """
        Write ``self.data_obj`` to ``filename``.

        Args:
            filename: output path (parent folders are created).
            verbose: log the file name.
            kwargs: additional ``tifffile.imwrite`` arguments.
        """
        super().write(filename, verbose=verbose)
        array = np.asarray(self.data_obj)
        dtype = self._resolve_dtype(array)
        if np.issubdtype(dtype, np.integer) and not np.issubdtype(array.dtype, np.integer):
            array = np.rint(array)
        if np.issubdtype(dtype, np.integer) and array.size:
            info = np.iinfo(dtype)
            if array.min() < info.min or array.max() > info.max:
                raise ValueError(
                    f"Values in [{array.min()}, {array.max()}] do not fit {dtype} for {filename}; "
                    "choose a larger output_dtype."
                )
        array = np.ascontiguousarray(array.astype(dtype, copy=False))
        ndim = array.ndim
        affine = np.eye(4) if self.affine is None else np.asarray(self.affine, dtype=np.float64)
        spacing = [_valid_spacing(abs(s)) for s in affine_to_spacing(affine, r=min(ndim, affine.shape[0] - 1))]
        spacing += [1.0] * (ndim - len(spacing))
        sy, sx = spacing[-2], spacing[-1]
        resolution = (1.0 / sx, 1.0 / sy)  # pixels per unit; tifffile finds a close uint32 rational
        metadata: dict[str, Any] = {"axes": "ZYX" if ndim == 3 else "YX"}
        if ndim == 3:
            metadata["spacing"] = spacing[0]
        if self.unit:
            metadata["unit"] = self.unit
        os.makedirs(os.path.dirname(os.path.abspath(os.fspath(filename))) or ".", exist_ok=True)
        imagej = bool(self.imagej) and array.dtype in _IMAGEJ_DTYPES  # type: ignore[attr-defined]
        write_kwargs: dict[str, Any] = {"resolution": resolution, "metadata": metadata, **kwargs}
        if self.compression is not None:  # type: ignore[attr-defined]
            write_kwargs.setdefault("compression", self.compression)  # type: ignore[attr-defined]
        if imagej:
            tifffile.imwrite(filename, array, imagej=True, **write_kwargs)
        else:
            tifffile.imwrite(filename, array, resolutionunit="NONE", **write_kwargs)


def label_dtype(max_id: int) -> np.dtype:
    """uint16 when the ids fit (ImageJ-readable), else uint32."""
    if max_id < 0 or max_id > np.iinfo(np.uint32).max:
        raise ValueError(f"Instance ids up to {max_id} do not fit uint32.")
    return np.dtype(np.uint16) if max_id <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def partial_path(filename: str | os.PathLike) -> str:
    """The hidden temporary file :func:`write_label_image` writes ``filename`` to before renaming it:
    ``<folder>/.<stem>.partial<suffix>`` (left behind only when the process is killed during the write)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(filename)))
    stem, ext = split_image_suffix(name)
    return os.path.join(folder, f".{stem}.partial{ext}")


def write_label_image(filename: str | os.PathLike, labels: Any, meta: Mapping | None = None) -> str:
    """
    Write an instance label array ``(*S)`` to NIfTI or TIFF (by ``filename``'s suffix) as uint16 (uint32 when the
    ids need it), with the voxel geometry of ``meta`` (``original_affine`` or ``affine``, as produced by our readers),
    in the same axis order as the input was read.

    The file is written under a temporary name in the target folder and renamed at the end, so an interrupted
    or failed write never leaves a partial output behind.

    Returns:
        the path written.
    """
    filename = os.fspath(filename)
    array = np.asarray(convert_data_type(labels, np.ndarray)[0])
    if array.ndim not in (2, 3):
        raise ValueError(f"Label images must be 2D or 3D, got shape {array.shape} for {filename}.")
    dtype = label_dtype(int(array.max()) if array.size else 0)
    array = array.astype(dtype)
    meta = dict(meta or {})
    affine = meta.get("original_affine", meta.get("affine"))
    affine = np.eye(4) if affine is None else np.asarray(convert_data_type(affine, np.ndarray)[0], np.float64)
    os.makedirs(os.path.dirname(os.path.abspath(filename)) or ".", exist_ok=True)
    tmp = partial_path(filename)
    try:
        if _is_nifti(filename):
            img = nib.Nifti1Image(array, affine)
            img.header.set_data_dtype(dtype)
            if "xyzt_units" in meta:  # keep the input's spatial unit (e.g. micron)
                img.header["xyzt_units"] = int(np.asarray(meta["xyzt_units"]).reshape(-1)[0])
            nib.save(img, tmp)
        elif _is_tiff(filename):
            writer = TiffWriter(output_dtype=dtype)
            writer.set_data_array(array, channel_dim=None)
            writer.set_metadata({"affine": affine, "spacing_unit": meta.get("spacing_unit", "")})
            writer.write(tmp)
        else:
            raise ValueError(f"Unsupported output file {filename}: expected one of {IMAGE_SUFFIXES}.")
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return filename
