"""Shared pieces of the MONAI Label tests: the skip rule, synthetic studies with sparse labels, the CLI reference."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch

from spoco_bundle.io import read_image

# MONAI Label needs torchvision, which does not load beside the main .venv's CPU torch 2.13.0; the tests run in
# .venv-monailabel (scripts/setup_monailabel.sh), which scripts/run_tests.sh sets up and uses for them
SKIP_REASON = (
    "monailabel is not installed in this environment (it needs torchvision, which does not load beside the main "
    ".venv's CPU torch 2.13.0): scripts/run_tests.sh runs these tests in .venv-monailabel, "
    "created by scripts/setup_monailabel.sh"
)
requires_monailabel = pytest.mark.skipif(importlib.util.find_spec("monailabel") is None, reason=SKIP_REASON)

SHAPE = (32, 64, 48)  # (z, y, x): every axis different, so a transposed result cannot pass a shape check
NIFTI_IDS = ["cell_000", "cell_001", "cell_002"]
TIFF_ID = "stack_000"
LABELLED = NIFTI_IDS[:2]  # images that get sparse annotations


def write_studies(root: Path) -> dict:
    """
    Write a MONAI Label studies folder: 3 NIfTI volumes and 1 ImageJ TIFF stack of synthetic nuclei, shape SHAPE,
    plus (outside the studies folder) sparse label files for LABELLED: about a third of the objects of each image,
    renumbered to arbitrary ids (x7 + 100), everything else 0 = unlabeled.

    Returns:
        {"studies": folder, "images": {id: path}, "sparse": {id: label path}, "dense": {id: label path}}
    """
    from spoco_bundle.synthetic import write_synthetic_dataset

    root = Path(root)
    write_synthetic_dataset(root / "syn_nii", n_train=len(NIFTI_IDS), n_val=0, n_test=0, shape=SHAPE, seed=1)
    write_synthetic_dataset(root / "syn_tif", n_train=1, n_val=0, n_test=0, shape=SHAPE, seed=2, ext=".tif")
    studies = root / "studies"
    studies.mkdir()
    images, dense, sparse = {}, {}, {}
    for i, image_id in enumerate(NIFTI_IDS):
        src = root / "syn_nii" / "imagesTr" / f"nuclei_{i:03d}.nii.gz"
        images[image_id] = str(shutil.copy(src, studies / f"{image_id}.nii.gz"))
        dense[image_id] = str(root / "syn_nii" / "labelsTr" / f"nuclei_{i:03d}.nii.gz")
    images[TIFF_ID] = str(shutil.copy(root / "syn_tif" / "imagesTr" / "nuclei_000.tif", studies / f"{TIFF_ID}.tif"))
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir()
    for image_id in LABELLED:
        img = nib.load(dense[image_id])
        lab = np.asarray(img.dataobj)
        ids = np.unique(lab[lab > 0])
        keep = rng.choice(ids, max(2, len(ids) // 3), replace=False)
        labels = np.where(np.isin(lab, keep), lab.astype(np.int64) * 7 + 100, 0).astype(np.uint16)
        sparse[image_id] = str(root / "annotations" / f"{image_id}.nii.gz")
        nib.save(nib.Nifti1Image(labels, img.affine), sparse[image_id])
    return {"studies": studies, "images": images, "sparse": sparse, "dense": dense}


def set_epoch_length(bundle: Path, iterations: int) -> None:
    """
    Set ``epoch_length`` in a deployed bundle's ``configs/train.json``, where a user would: MONAI Label's training
    request sets only ``max_epochs``, so its epochs are epochs of this many iterations (100 by default, too many
    for a test on CPU).
    """
    path = Path(bundle) / "configs" / "train.json"
    config = json.loads(path.read_text())
    config["epoch_length"] = int(iterations)
    path.write_text(json.dumps(config, indent=4))


def write_bad_inputs(folder: Path) -> dict:
    """A corrupt .nii.gz and a 2D TIFF (for the 3D model). Returns {id: path}."""
    folder = Path(folder)
    corrupt = folder / "corrupt_000.nii.gz"
    corrupt.write_bytes(b"this is not a NIfTI file\n" * 8)
    flat = folder / "flat_000.tif"
    tifffile.imwrite(flat, (np.random.default_rng(0).random((64, 48)) * 1000).astype(np.uint16))
    return {"corrupt_000": str(corrupt), "flat_000": str(flat)}


def cli_segmentation(bundle: Path, image: str, out_dir: Path, precision: str = "float32") -> np.ndarray:
    """
    The reference: the bundle's own inference (``segment_files`` of configs/inference.json, as ``monai.bundle run``
    calls it) on ``bundle/models/model.pt``, read back in the input's storage order; by default in float32, as MONAI
    Label runs ``network_def`` (``precision auto`` computes in bfloat16 on a CPU that has it: the same objects, not
    the same voxels); ``"auto"`` for what runs the bundle's own workflow (the ``<model>_uncertain`` strategy).
    """
    from monai.bundle import ConfigParser

    from spoco_bundle.engines import segment_files

    parser = ConfigParser()
    parser.read_config(str(Path(bundle) / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')", "precision": precision})
    written = segment_files(
        [image],
        parser.get_parsed_content("preprocessing"),
        parser.get_parsed_content("inference_network"),
        parser.get_parsed_content("inferer"),
        parser.get_parsed_content("postprocessing"),
        str(out_dir),
        None,
        "cpu",
    )
    return read_image(written[0])[0]


def read_result(path: str) -> np.ndarray:
    """A label volume as MONAI Label returned it, in storage order (nibabel (i, j, k) / tifffile (z, y, x))."""
    if str(path).endswith(".tif") or str(path).endswith(".tiff"):
        return tifffile.imread(path)
    return np.asarray(nib.load(path).dataobj)


def load_strict(bundle: Path) -> torch.nn.Module:
    """network_def of the bundle with models/model.pt loaded strictly (raises if they do not match)."""
    from monai.bundle import ConfigParser

    from spoco_bundle.networks import load_weights

    parser = ConfigParser()
    parser.read_config(str(Path(bundle) / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    return load_weights(parser.get_parsed_content("network_def"), str(Path(bundle) / "models" / "model.pt"))
