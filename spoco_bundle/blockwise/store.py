"""Volumes larger than memory on disk: lazy readers of Zarr / OME-Zarr, TIFF and NIfTI as dask arrays, and writers
of instance labels to OME-Zarr, TIFF and NIfTI from a chunked label store, one slab at a time.

Every reader gives a dask array whose chunks read only their own part of the file, and which pickles as a path (so
that a dask.distributed worker re-opens the file itself). Errors name the path."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import dask.array as da
import nibabel as nib
import numpy as np
import tifffile

from spoco_bundle.io import (
    VOLUME_SUFFIXES,
    TiffReader,
    _is_nifti,
    _is_tiff,
    is_zarr,
    label_dtype,
    nifti_axis_kinds,
    partial_path,
    read_spacing,
    select_non_spatial,
    tiff_axis_kinds,
    write_label_image,
)

__all__ = [
    "open_volume",
    "create_label_store",
    "write_label_file",
    "remove_store",
]


class _LazyFile:
    """Array-like view of a TIFF series or NIfTI file for ``dask.array.from_array``: each ``[...]`` opens the file and
    reads only that region (tifffile's Zarr view of the pages / nibabel's array proxy); pickles as its path."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype, self.ndim = path, shape, np.dtype(dtype), len(shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        if _is_tiff(self.path):
            import zarr

            with tifffile.TiffFile(self.path) as tif:
                return np.asarray(zarr.open(tif.series[0].aszarr(), mode="r")[key])
        return np.asarray(nib.load(self.path).dataobj[key])


def _open_file(path: str, input_channel: int | None, input_time_point: int | None) -> tuple[da.Array, dict]:
    """A NIfTI / TIFF file as a lazy array in storage order (one channel / time point of files with several), with
    the metadata the label writers need."""
    shape, spacing, unit = read_spacing(path, input_channel, input_time_point)  # the header; errors name the file
    meta: dict[str, Any] = {"filename_or_obj": path, "spacing": spacing, "unit": unit}
    if _is_tiff(path):
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, full_shape, dtype = series.axes, tuple(series.shape), series.dtype
        if "S" in axes and "C" not in axes:  # the reader checks colour samples on the whole image, not by blocks
            raise ValueError(
                f"TIFF file {path} stores colour samples per pixel (axes {axes!r}); a large image is read in blocks, "
                "which needs a single-channel file: save it as one channel (grayscale) first."
            )
        kinds = tiff_axis_kinds(axes, input_time_point)
        index, kept = select_non_spatial(f"TIFF file {path}", axes, kinds, full_shape, input_channel, input_time_point)
        if "S" in axes or len(kept) not in (2, 3) or "".join(axes[i] for i in kept)[-2:] != "YX":
            reader = TiffReader(input_channel=input_channel, input_time_point=input_time_point)
            reader.get_data(reader.read(path))  # its error, naming the file and the axes
        affine = np.eye(4)
        affine[range(len(spacing)), range(len(spacing))] = spacing
        meta.update(affine=affine, spacing_unit=unit)
        # tifffile decodes whole pages (or tiles): chunks of a few pages, cut across so that a block's read holds
        # its own region only (a page is then decoded once per chunk across it: more reading, flat memory)
        spatial_chunks = iter((32, 512, 512) if len(kept) == 3 else (2048, 2048))
    else:
        img = nib.load(path)
        dtype, full_shape = img.get_data_dtype(), tuple(img.shape)
        kinds = nifti_axis_kinds(len(full_shape))
        index, kept = select_non_spatial(
            f"NIfTI file {path}", "ijktcuv"[: len(full_shape)], kinds, full_shape, input_channel, input_time_point
        )
        if len(kept) not in (2, 3):
            raise ValueError(
                f"NIfTI file {path} has shape {full_shape}; only 2D and 3D single-channel images are supported."
            )
        meta.update(affine=np.asarray(img.affine, dtype=np.float64), xyzt_units=int(img.header["xyzt_units"]))
        spatial_chunks = iter((128, 128, 128))
    # one chunk per channel / time point, so that the choice reads only its own
    chunks = tuple(min(size, next(spatial_chunks)) if ax in kept else 1 for ax, size in enumerate(full_shape))
    if not np.dtype(dtype).isnative:
        dtype = np.dtype(dtype).newbyteorder("=")
    array = da.from_array(_LazyFile(path, full_shape, dtype), chunks=chunks, asarray=True, fancy=False)
    return array[index], meta


def _ome_multiscales(attrs: Mapping) -> list | None:
    """The ``multiscales`` of OME-NGFF 0.4 (top-level attribute) or 0.5 (under ``ome``)."""
    ms = attrs.get("multiscales", (attrs.get("ome") or {}).get("multiscales"))
    return ms if isinstance(ms, list) and ms else None


def _open_zarr(path: str, input_channel: int | None, input_time_point: int | None) -> tuple[da.Array, dict]:
    import zarr

    try:
        node = zarr.open(path, mode="r")
    except Exception as e:
        raise ValueError(f"Cannot open the Zarr store {path}: {type(e).__name__}: {e}") from e
    meta: dict[str, Any] = {"filename_or_obj": path, "unit": ""}
    names: list[str] | None = None
    types: list[str] = []
    scale = None
    if isinstance(node, zarr.Array):
        array = node
    else:
        ms = _ome_multiscales(dict(node.attrs))
        if ms is None:
            raise ValueError(
                f"The Zarr group {path} has no OME-NGFF 'multiscales' metadata: give the array inside it (e.g. "
                f"{os.path.join(path, '0')}) or an OME-Zarr image."
            )
        dataset = ms[0]["datasets"][0]
        try:
            array = node[dataset["path"]]
        except KeyError as e:
            raise ValueError(f"The OME-Zarr {path} names the array {dataset['path']!r}, which it does not hold.") from e
        axes = ms[0].get("axes") or [{"name": n} for n in "tczyx"[-array.ndim :]]  # NGFF 0.3 and older: tczyx
        names = [a["name"] if isinstance(a, dict) else str(a) for a in axes]
        types = [a.get("type", "") if isinstance(a, dict) else "" for a in axes]
        scale = next(
            (t["scale"] for t in dataset.get("coordinateTransformations", []) if t.get("type") == "scale"), None
        )
        units = [a.get("unit", "") for a in axes if isinstance(a, dict) and a.get("type") == "space"]
        meta["unit"] = {"micrometer": "um"}.get(units[-1], units[-1]) if units else ""
    lazy = da.from_zarr(array)
    names = names or [f"dim_{i}" for i in range(lazy.ndim)]
    kinds = [
        types[ax] if ax < len(types) and types[ax] else {"c": "channel", "t": "time"}.get(name, "space")
        for ax, name in enumerate(names)
    ]
    index, spatial = select_non_spatial(
        f"The OME-Zarr {path}", names, kinds, lazy.shape, input_channel, input_time_point
    )
    lazy = lazy[index]
    if lazy.ndim not in (2, 3):
        raise ValueError(
            f"The Zarr array of {path} has {lazy.ndim} spatial axes {tuple(lazy.shape)}; only 2D and 3D single-channel "
            "images are supported (name channel and time axes in the OME-NGFF 'axes' metadata)."
        )
    spacing = tuple(float(scale[ax]) for ax in spatial) if scale is not None else (1.0,) * lazy.ndim
    affine = np.eye(4)
    affine[range(lazy.ndim), range(lazy.ndim)] = spacing
    meta.update(spacing=spacing, affine=affine, spacing_unit=meta["unit"], axes=[names[ax] for ax in spatial])
    return lazy, meta


def open_volume(
    path: str | os.PathLike, input_channel: int | None = None, input_time_point: int | None = None
) -> tuple[da.Array, dict]:
    """
    A 2D or 3D single-channel image as a lazy dask array in storage order, and its metadata (``spacing``, ``affine``,
    ``unit``, and what the label writers need to give the output the input's geometry).

    - Zarr: an array, or an OME-Zarr image (NGFF 0.4 / 0.5 ``multiscales``; its first, full-resolution level). A
      channel or time axis of more than one index needs ``input_channel`` / ``input_time_point``; singleton ones
      are dropped.
    - TIFF (the first series) and NIfTI, read a few pages / a region per chunk.

    Raises:
        ValueError: naming the path: a store that cannot be opened, a group that is no OME-Zarr image, several
            channels / time points without a choice, not 2D or 3D, an unsupported suffix.
    """
    path = os.path.abspath(os.fspath(path))
    if is_zarr(path):
        if not os.path.exists(path):
            raise ValueError(f"Cannot open the Zarr store {path}: it does not exist.")
        return _open_zarr(path, input_channel, input_time_point)
    if not os.path.isfile(path):
        raise ValueError(f"Input image {path} does not exist.")
    if not (_is_tiff(path) or _is_nifti(path)):
        raise ValueError(f"Unsupported input {path}: expected one of {VOLUME_SUFFIXES}.")
    return _open_file(path, input_channel, input_time_point)


# --------------------------------------------------------------------------------------------------- writing


def create_label_store(
    path: str, shape: Sequence[int], chunks: Sequence[int], dtype: Any, meta: Mapping | None = None
) -> Any:
    """
    An OME-Zarr image (NGFF 0.4, Zarr format 2, read by napari, Fiji's MoBIE / BigDataViewer and ``ome-zarr``) with one
    resolution level ``0`` of ``shape`` for instance labels, voxel size and unit from ``meta``; returns the array.
    """
    import zarr

    meta = dict(meta or {})
    ndim = len(shape)
    names = list(meta.get("axes") or ["z", "y", "x"][-ndim:])
    spacing = [float(s) for s in (meta.get("spacing") or (1.0,) * ndim)]
    unit = {"um": "micrometer", "mm": "millimeter", "nm": "nanometer"}.get(meta.get("unit") or "", "")
    axes = [dict(name=n, type="space", **({"unit": unit} if unit else {})) for n in names]
    group = zarr.open_group(path, mode="w", zarr_format=2)
    array = group.create_array("0", shape=tuple(shape), chunks=tuple(chunks), dtype=dtype, fill_value=0)
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "name": meta.get("name") or os.path.basename(path),
            "axes": axes,
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": spacing}]}],
        }
    ]
    return array


def remove_store(path: str) -> None:
    """Remove a store folder (or file) if it exists."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def _slabs(array: Any, axis: int) -> Any:
    """Slabs of ``array`` one chunk thick along ``axis`` (one read per chunk)."""
    step = array.chunks[axis]
    for start in range(0, array.shape[axis], step):
        index = [slice(None)] * array.ndim
        index[axis] = slice(start, start + step)
        yield np.asarray(array[tuple(index)])


def write_label_file(labels: Any, filename: str, meta: Mapping | None = None) -> str:
    """
    Write the labels of a chunked store (a Zarr array) to a TIFF or NIfTI file, slab by slab (memory: one slab of
    chunks), with the geometry of ``meta`` (as :func:`~spoco_bundle.io.write_label_image` writes whole arrays),
    under a temporary name renamed at the end.
    """
    meta = dict(meta or {})
    shape = tuple(labels.shape)
    if len(shape) == 2:  # a 2D image's labels fit where its network output did not: write it whole
        return write_label_image(filename, np.asarray(labels[:]), meta)
    dtype = np.dtype(labels.dtype)
    dtype = label_dtype(int(meta.get("max_id", np.iinfo(dtype).max)))
    tmp = partial_path(filename)
    try:
        if _is_tiff(filename):
            spacing = [float(s) for s in meta.get("spacing", (1.0, 1.0, 1.0))]
            md: dict[str, Any] = {"axes": "ZYX", "spacing": spacing[0]}
            if meta.get("unit"):
                md["unit"] = meta["unit"]
            pages = (page.astype(dtype) for slab in _slabs(labels, 0) for page in slab)
            kw: dict[str, Any] = {"shape": shape, "dtype": dtype, "resolution": (1 / spacing[2], 1 / spacing[1])}
            if dtype == np.uint16:
                tifffile.imwrite(tmp, pages, imagej=True, metadata=md, **kw)
            else:  # ImageJ has no 32-bit integers: plain TIFF with the calibration in tifffile's description
                tifffile.imwrite(tmp, pages, resolutionunit="NONE", metadata=md, **kw)
        elif _is_nifti(filename):
            affine = np.asarray(meta.get("original_affine", meta.get("affine", np.eye(4))), dtype=np.float64)
            header = nib.Nifti1Header()
            header.set_data_shape(shape)
            header.set_data_dtype(dtype)
            header.set_qform(affine, code=1)
            header.set_sform(affine, code=1)
            if "xyzt_units" in meta:
                header["xyzt_units"] = int(np.asarray(meta["xyzt_units"]).reshape(-1)[0])
            header.set_data_offset(352)
            opener = gzip.open if filename.lower().endswith(".gz") else open
            with opener(tmp, "wb") as f:
                f.write(header.binaryblock)
                f.write(b"\0" * (352 - len(header.binaryblock)))  # no extensions
                # NIfTI stores the first axis fastest: slabs along the last axis, each in Fortran order
                for slab in _slabs(labels, len(shape) - 1):
                    f.write(np.asfortranarray(slab.astype(dtype)).tobytes(order="F"))
        else:
            raise ValueError(f"Unsupported output file {filename}: expected one of {VOLUME_SUFFIXES}.")
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return filename


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
