"""
Bundle metadata against the bundle specification (meta_schema_20240725, checked by ``check_metadata`` because the
schema cannot be downloaded here) and the model zoo's rules, and against what the bundle really needs and runs
with: the installed and pinned versions, the third-party imports of the code and configs, the network's shape.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path

import monai
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from spoco_bundle.package import META_SCHEMA_URL, check_metadata

ROOT = Path(__file__).resolve().parents[1]
META = json.loads((ROOT / "metadata.json").read_text())
# third-party imports that are not needed to train, evaluate or run inference, with the reason
OPTIONAL_IMPORTS = {
    "matplotlib": "only spoco_bundle.report's preview PNG",
    "monailabel": "only spoco_bundle.monailabel.server, which runs inside a MONAI Label installation",
    "fastapi": "only spoco_bundle.monailabel.server (a MONAI Label dependency)",
    "distributed": "only blockwise segmentation on a dask.distributed cluster (--scheduler tcp://...; extra 'cluster')",
    "napari": "only the napari plugin, spoco_bundle.napari.widget (extra 'napari')",
    "magicgui": "only the napari plugin's widget (a napari dependency)",
    "qtpy": "only the napari plugin's widget (a napari dependency)",
    "openvino": "only inference's backend openvino, spoco_bundle.backends (extra 'openvino')",
}


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _third_party_imports() -> set[str]:
    """Top-level modules imported by the bundle's code (anywhere in a file) and by its configs' ``$import``."""
    names = set()
    for f in (ROOT / "spoco_bundle").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    for cfg in (ROOT / "configs").glob("*.json"):
        for m in re.finditer(r'"\$(?:import|from) ([A-Za-z_][\w]*)', cfg.read_text()):
            names.add(m.group(1))
    return {n for n in names if n not in sys.stdlib_module_names and n != "spoco_bundle"}


def test_json_files_have_no_duplicate_keys():
    # json.loads keeps the last of two equal keys silently (MONAI's parser only warns): a changelog entry written
    # twice would hide the first
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        assert not dup, f"duplicate keys {dup}"
        return dict(pairs)

    for path in [ROOT / "metadata.json", *sorted((ROOT / "configs").glob("*.json"))]:
        json.loads(path.read_text(), object_pairs_hook=no_duplicates)


def test_metadata_is_valid_and_versioned():
    assert check_metadata(META) == []
    assert META["schema"] == META_SCHEMA_URL
    assert META["version"] in META["changelog"]
    # the current version is the newest in the changelog
    versions = [tuple(map(int, v.split("."))) for v in META["changelog"]]
    assert tuple(map(int, META["version"].split("."))) == max(versions)
    # configs/metadata.json is what the zoo, MONAI Label and the packager read: the same file
    assert json.loads((ROOT / "configs" / "metadata.json").read_text()) == META


def test_versions_match_the_environment_and_the_pins():
    pins = _pins()
    assert META["monai_version"] == monai.__version__ == pins["monai"]
    assert META["pytorch_version"] == torch.__version__.split("+")[0] == pins["torch"]
    assert META["numpy_version"] == np.__version__ == pins["numpy"]
    for name, version in META["required_packages_version"].items():
        assert importlib_metadata.version(name) == version == pins[name.lower()], name


def test_required_packages_cover_every_import():
    dists = importlib_metadata.packages_distributions()
    declared = {n.lower() for n in META["required_packages_version"]} | {"torch", "monai", "numpy"}
    missing = {}
    for module in sorted(_third_party_imports()):
        if module in OPTIONAL_IMPORTS:
            continue
        owners = {d.lower() for d in dists.get(module, [module])}
        if not owners & declared:
            missing[module] = sorted(owners)
    assert not missing, f"imported but not in required_packages_version: {missing}"
    assert {"numba", "hdbscan", "ignite", "tifffile", "nibabel"} <= _third_party_imports()  # the scan sees them


def test_network_data_format_matches_the_inference_config():
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    patch = parser.get_parsed_content("patch_size")
    fmt = META["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    assert image["num_channels"] == net.in_channels == 1
    assert image["spatial_shape"] == pred["spatial_shape"] == list(patch)
    with torch.no_grad():
        out = net.eval()(torch.zeros(1, image["num_channels"], *image["spatial_shape"]))
    assert pred["num_channels"] == out.shape[1] == net.embedding_dim + 1
    assert str(out.dtype) == f"torch.{pred['dtype']}"
    # one integer key per output channel (MONAI Label reads them as channel indices)
    assert sorted(int(k) for k in pred["channel_def"]) == list(range(pred["num_channels"]))
    post = fmt["post_processed_outputs"]["pred"]
    assert post["num_channels"] == 1 and post["dtype"] == "int32"


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.pop("required_packages_version"), "missing required key 'required_packages_version'"),
        (lambda m: m.pop("changelog"), "missing 'changelog'"),
        (lambda m: m.update(version="0.9.9"), "no entry for version 0.9.9"),
        (lambda m: m.update(version="1.0"), "MAJOR.MINOR.PATCH"),
        (lambda m: m.update(authors=["a", "b"]), "'authors' must be a JSON str"),
        (lambda m: m.update(references="one string"), "'references' must be a JSON list"),
        (lambda m: m.update(schema=META_SCHEMA_URL.replace("20240725", "20220324")), "'schema' must be"),
        (lambda m: m["network_data_format"].pop("outputs"), "network_data_format: missing 'outputs'"),
        (lambda m: m["network_data_format"]["inputs"].pop("image"), "inputs needs 'image'"),
        (lambda m: m["network_data_format"]["outputs"]["pred"].pop("dtype"), "outputs.pred: missing 'dtype'"),
        (lambda m: m["network_data_format"]["outputs"]["pred"].update(num_channels=True), "must be an integer"),
        (lambda m: m["network_data_format"]["outputs"]["pred"].update(value_range=["0"]), "list of numbers"),
        (lambda m: m["network_data_format"]["inputs"]["image"].update(spatial_shape=[1.5]), "integers or strings"),
        (lambda m: m.update(extra_data_format={"inputs": {}}), "extra_data_format: missing 'outputs'"),
    ],
)
def test_check_metadata_reports_each_violation(edit, message):
    meta = copy.deepcopy(META)
    edit(meta)
    errors = check_metadata(meta)
    assert any(message in e for e in errors), errors
