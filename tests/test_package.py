"""
Model-zoo packaging: ``python -m spoco_bundle package`` -> zip -> unpack elsewhere -> inference, verify_net_in_out
and ckpt_export in a virtual environment holding only the packages the metadata names, compared with the
repository's own inference on the same input.

The environment: by default a new venv whose site-packages links exactly the distributions of ``monai``,
``torch``, ``numpy`` and ``required_packages_version`` plus their declared dependencies (resolved from their
installed metadata, markers evaluated) out of this test's environment: nothing else, in particular not this
repository's editable ``spoco_bundle``, and no download (CI allows none at test time). With
``SPOCO_FRESH_VENV=pip`` the venv is instead built by ``pip install`` of the pinned versions from the package index
(slow, network): ``SPOCO_FRESH_VENV=pip .venv/bin/python -m pytest tests/test_package.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from importlib import metadata as importlib_metadata
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from packaging.requirements import Requirement

from spoco_bundle import cards
from spoco_bundle.clustering import cluster_embeddings
from spoco_bundle.io import read_image
from spoco_bundle.losses import SpocoLoss
from spoco_bundle.package import check_metadata, model_section, package_bundle, torchscript_parity
from spoco_bundle.synthetic import generate_nuclei

# builds, unpacks and runs zoo packages: the packaging tier (docs/testing.md)
pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[1]
NAME = "spoco_test_bundle"
FEATURES = [8, 16, 32]
# one thread everywhere for identical floats; NUMBA_NUM_THREADS=1 because `fast` clustering's parallel growth sweep
# is not deterministic with several threads when the embedding margins are not met (as with this barely trained
# network): the same embeddings gave 4 objects with 1 thread and 6 (varying by 1880 voxels between calls) with 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "PYTHONPATH": ""}


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    print(f"[{time.perf_counter() - t0:.1f} s] {' '.join(str(c) for c in cmd[1:5])}")
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed in {cwd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def _network(seed: int) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"features": FEATURES})
    torch.manual_seed(seed)
    return parser.get_parsed_content("network_def")


def _trained_network(
    image: np.ndarray, labels: np.ndarray, min_objects: int = 4, max_iterations: int = 150
) -> torch.nn.Module:
    """Full-volume SPOCO steps until clustering with the inference defaults (background removed by the foreground
    head) finds ``min_objects`` objects (a random network gives one smooth blob or nothing), so that comparing two
    inference runs compares a real segmentation; checked every 10 iterations."""
    net = _network(0)
    loss_fn = SpocoLoss(embedding_dim=16)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    lo, hi = np.percentile(image, (1, 99.8))
    x = torch.from_numpy(((image - lo) / (hi - lo))[None, None].astype(np.float32))
    y = torch.from_numpy(labels[None, None].astype(np.int64))
    found = 0
    for it in range(1, max_iterations + 1):
        net.train()
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
        if it % 10 == 0:
            with torch.no_grad():
                out = net.eval()(x)[0].numpy()
            seg = cluster_embeddings(out[:16], method="fast", fg_mask=out[16] > 0, background="none", min_size=16)
            found = int(seg.max())
            if found >= min_objects:
                print(f"trained for {it} iterations: {found} objects")
                return net
    raise AssertionError(f"{found} objects after {max_iterations} training iterations on 6 nuclei")


def _closure(names: list[str]) -> list[importlib_metadata.Distribution]:
    """Installed distributions of ``names`` and, recursively, their declared (non-extra) dependencies."""
    seen: dict[str, importlib_metadata.Distribution] = {}
    queue = list(names)
    while queue:
        name = queue.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        dist = importlib_metadata.distribution(name)  # raises when a dependency is not installed
        seen[key] = dist
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                queue.append(r.name)
    return list(seen.values())


def _linked_venv(path: Path, names: list[str]) -> Path:
    """A venv whose site-packages links only the files of the closure of ``names`` from this environment."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    site = Path(
        subprocess.check_output(
            [path / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    dists = _closure(names)
    tops = set()
    for dist in dists:
        for f in dist.files or []:
            top = Path(str(f)).parts[0]
            if top not in ("..", "__pycache__") and not top.endswith(".pth"):
                tops.add(top)
    src_site = Path(dists[0].locate_file(""))
    for top in sorted(tops):
        if (src_site / top).exists():
            os.symlink(src_site / top, site / top)
    return path / "bin" / "python"


def _pip_venv(path: Path, pins: dict[str, str]) -> Path:
    subprocess.run([sys._base_executable, "-m", "venv", str(path)], check=True, timeout=300)
    py = path / "bin" / "python"
    reqs = [f"{k}=={v}" for k, v in pins.items()]
    subprocess.run([py, "-m", "pip", "install", "-q", *reqs], check=True, timeout=3000)
    return py


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    d = tmp_path_factory.mktemp("input")
    image, labels = generate_nuclei(shape=(20, 48, 40), n_objects=6, radius_range=(6.0, 9.0), seed=3)
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([2.0, 1.0, 1.0, 1.0])), d / "vol.nii.gz")
    return {"path": d / "vol.nii.gz", "image": image, "labels": labels}


@pytest.fixture(scope="module")
def packaged(tmp_path_factory, volume):
    tmp = tmp_path_factory.mktemp("package")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.save(_trained_network(volume["image"], volume["labels"]).state_dict(), tmp / "ckpt.pt")
    print(f"training took {time.perf_counter() - t0:.1f} s")
    torch.save(_network(1).state_dict(), tmp / "teacher.pt")
    t0 = time.perf_counter()
    _run(
        [sys.executable, "-m", "spoco_bundle", "package", "--checkpoint", "ckpt.pt", "--teacher", "teacher.pt",
         "--output_dir", "dist", "--name", NAME, "--features", json.dumps(FEATURES)],
        cwd=tmp,
    )  # fmt: skip
    print(f"packaging took {time.perf_counter() - t0:.1f} s")
    bundle = tmp / "dist" / NAME
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    return {"tmp": tmp, "bundle": bundle, "zip": tmp / "dist" / f"{NAME}_v{meta['version']}.zip", "meta": meta}


@pytest.fixture(scope="module")
def unpacked(packaged, tmp_path_factory):
    dest = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(packaged["zip"]) as zf:
        zf.extractall(dest)
    return dest / NAME


@pytest.fixture(scope="module")
def bundle_python(packaged, tmp_path_factory):
    """Python of a venv with only the packages the packaged metadata names (see the module docstring)."""
    meta = packaged["meta"]
    pins = {"torch": meta["pytorch_version"], "monai": meta["monai_version"], "numpy": meta["numpy_version"]}
    pins.update(meta["required_packages_version"])
    path = tmp_path_factory.mktemp("venv") / "bundle-venv"
    t0 = time.perf_counter()
    if os.environ.get("SPOCO_FRESH_VENV") == "pip":
        py = _pip_venv(path, pins)
    else:
        py = _linked_venv(path, list(pins))
    print(f"venv ({os.environ.get('SPOCO_FRESH_VENV', 'linked')}) took {time.perf_counter() - t0:.1f} s")
    # the pinned versions are what the venv holds
    out = _run(
        [
            py,
            "-c",
            f"import importlib.metadata as m, json; print(json.dumps({{k: m.version(k) for k in {list(pins)}}}))",
        ],
        cwd=path,
    )
    versions = json.loads(out.stdout)
    assert {k: v.split("+")[0] for k, v in versions.items()} == pins
    return py


def test_bundle_layout_metadata_and_zip(packaged):
    bundle, meta = packaged["bundle"], packaged["meta"]
    expected = ["LICENSE", "configs/inference.json", "configs/train.json", "configs/evaluate.json"]
    expected += ["configs/logging.conf", "configs/metadata.json", "models/model.pt", "models/model.ts"]
    expected += ["models/teacher.pt", "docs/README.md", "docs/data_license.txt", "spoco_bundle/__init__.py"]
    code = [p for p in (ROOT / "spoco_bundle").rglob("*.py") if "__pycache__" not in p.parts]  # subpackages too
    expected += [p.relative_to(ROOT).as_posix() for p in code]
    expected += [f"configs/{p.name}" for p in (ROOT / "configs").glob("*.json")]  # multi_gpu_train.json when present
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert set(expected) <= set(files), sorted(set(expected) - set(files))
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert not (bundle / "large_files.yml").exists()  # every file is far below 25 MB
    assert not (bundle / "configs" / "metadata.json").is_symlink()
    # the zip holds exactly the folder, under the bundle name, byte for byte
    with zipfile.ZipFile(packaged["zip"]) as zf:
        names = sorted(n for n in zf.namelist() if not n.endswith("/"))
        assert names == [f"{NAME}/{f}" for f in files]
        assert zf.read(f"{NAME}/models/model.pt") == (bundle / "models" / "model.pt").read_bytes()
    # metadata: valid, the repository's own except network_data_format, which follows the packaged network, and
    # eval_metrics, which are the packaged model's own (from its card), not the shipped models' of the repository
    assert check_metadata(meta) == []
    repo_meta = json.loads((ROOT / "metadata.json").read_text())
    own = ("network_data_format", "eval_metrics")
    assert {k: v for k, v in meta.items() if k not in own} == {k: v for k, v in repo_meta.items() if k not in own}
    assert meta["eval_metrics"] == cards.eval_metrics(cards.read_card(bundle / "models" / "model.pt"))
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 17
    # configs: the repository's, with the override written into those that define it
    for cfg in (ROOT / "configs").glob("*.json"):
        if cfg.name == "metadata.json":
            continue
        repo_cfg = json.loads(cfg.read_text())
        packed_cfg = json.loads((bundle / "configs" / cfg.name).read_text())
        if "features" in repo_cfg:
            assert packed_cfg.pop("features") == FEATURES
            repo_cfg.pop("features")
        assert packed_cfg == repo_cfg, cfg.name
    for doc in (ROOT / "docs").iterdir():  # copied as they are; the model card gains its packaged-model section
        if doc.is_file() and doc.name != "README.md":
            assert (bundle / "docs" / doc.name).read_bytes() == doc.read_bytes()
    card = (bundle / "docs" / "README.md").read_text()
    assert card.startswith((ROOT / "docs" / "README.md").read_text().rstrip("\n"))
    assert card.endswith(model_section(cards.read_card(bundle / "models" / "model.pt")))
    # weights: plain CPU state dicts equal to the inputs
    for name, src in (("model.pt", "ckpt.pt"), ("teacher.pt", "teacher.pt")):
        saved = torch.load(bundle / "models" / name, map_location="cpu", weights_only=True)
        original = torch.load(packaged["tmp"] / src, map_location="cpu", weights_only=True)
        assert saved.keys() == original.keys()
        assert all(torch.equal(saved[k], original[k]) and saved[k].device.type == "cpu" for k in saved)


def test_unpacked_bundle_runs_inference_with_only_required_packages(
    packaged, unpacked, bundle_python, volume, tmp_path
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the venv really lacks this repository's package: only the bundle's own copy can serve the configs
    proc = subprocess.run([bundle_python, "-c", "import spoco_bundle"], cwd=elsewhere, env=ENV, capture_output=True)
    assert proc.returncode != 0 and b"No module named 'spoco_bundle'" in proc.stderr
    args = ["--dataset_dir", volume["path"], "--device", "cpu"]
    # 1. the model card's command, from the bundle root
    cmd = [bundle_python, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    cmd += ["--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]
    _run([*cmd, "--output_dir", tmp_path / "out_root", *args], cwd=unpacked)
    # 2. from another working directory, with absolute paths
    cmd = [bundle_python, "-m", "monai.bundle", "run", "--config_file", unpacked / "configs" / "inference.json"]
    cmd += ["--meta_file", unpacked / "configs" / "metadata.json", "--bundle_root", unpacked]
    _run([*cmd, "--output_dir", tmp_path / "out_elsewhere", *args], cwd=elsewhere)
    # 3. the repository's own inference on the same input and weights
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", ROOT / "configs" / "inference.json"]
    cmd += ["--meta_file", ROOT / "metadata.json", "--ckpt_path", packaged["tmp"] / "ckpt.pt"]
    _run([*cmd, "--features", json.dumps(FEATURES), "--output_dir", tmp_path / "out_repo", *args], cwd=elsewhere)

    labels = {
        k: read_image(tmp_path / k / "vol_instances.nii.gz")[0] for k in ("out_root", "out_elsewhere", "out_repo")
    }
    assert labels["out_repo"].shape == (20, 48, 40)
    assert labels["out_repo"].max() >= 2  # a real segmentation to compare (the volume has 6 nuclei)
    np.testing.assert_array_equal(labels["out_root"], labels["out_repo"])
    np.testing.assert_array_equal(labels["out_elsewhere"], labels["out_repo"])


def test_verify_net_in_out_and_ckpt_export_in_unpacked_bundle(unpacked, bundle_python, tmp_path):
    # the model card's command, from the bundle root
    cmd = [bundle_python, "-m", "monai.bundle", "verify_net_in_out", "network_def"]
    proc = _run([*cmd, "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"], cwd=unpacked)
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr
    # from another directory with --bundle_root, as the model zoo's CI calls it (network_def puts the bundle root
    # on sys.path through its _requires_)
    ts_path = unpacked / "models" / "export.ts"
    cmd = [bundle_python, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", ts_path]
    cmd += ["--ckpt_file", unpacked / "models/model.pt", "--meta_file", unpacked / "configs/metadata.json"]
    _run([*cmd, "--config_file", unpacked / "configs/inference.json", "--bundle_root", unpacked], cwd=tmp_path)
    # TorchScript from the CLI and the packaged model.ts give the eager network's embeddings (TS_ATOL/TS_RTOL)
    eager = _network(0)
    eager.load_state_dict(torch.load(unpacked / "models" / "model.pt", map_location="cpu", weights_only=True))
    for ts in ("export.ts", "model.ts"):
        scripted = torch.jit.load(str(unpacked / "models" / ts), map_location="cpu")
        assert torchscript_parity(eager, scripted, [16, 48, 40]) <= 1e-5
    extra = {"metadata.json": ""}  # ckpt_export stores the metadata in the TorchScript file
    torch.jit.load(str(ts_path), _extra_files=extra)
    stored = json.loads(extra["metadata.json"])  # plus MONAI's own version keys and a timestamp
    assert all(stored[k] == v for k, v in json.loads((unpacked / "configs" / "metadata.json").read_text()).items())


def test_large_files_are_listed_with_md5(tmp_path):
    torch.save(_network(0).state_dict(), tmp_path / "ckpt.pt")
    bundle = Path(
        package_bundle(
            str(tmp_path / "ckpt.pt"), str(tmp_path / "dist"), name="b", torchscript=False, make_zip=False,
            large_file_mb=0.05, large_files_url="https://example.org/spoco/", features=FEATURES,
        )
    )  # fmt: skip
    text = (bundle / "large_files.yml").read_text()
    big = sorted(p for p in bundle.rglob("*") if p.is_file() and p.stat().st_size > 0.05 * 1024 * 1024)
    assert Path(bundle / "models" / "model.pt") in big
    assert text.count("- path:") == len(big)
    for p in big:
        rel = p.relative_to(bundle).as_posix()
        md5 = hashlib.md5(p.read_bytes()).hexdigest()
        assert (
            f'  - path: "{rel}"\n    url: "https://example.org/spoco/{rel}"\n    hash_val: "{md5}"\n'
            '    hash_type: "md5"' in text
        )


def test_packaging_errors_name_the_problem(tmp_path):
    torch.save(_network(0).state_dict(), tmp_path / "ckpt.pt")
    ckpt, out = str(tmp_path / "ckpt.pt"), str(tmp_path / "dist")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        package_bundle(str(tmp_path / "missing.pt"), out)
    with pytest.raises(ValueError, match="ckpt.pt.*does not match network_def"):  # checkpoint has features 8-16-32
        package_bundle(ckpt, out, torchscript=False, make_zip=False)
    with pytest.raises(ValueError, match="not_an_id"):
        package_bundle(ckpt, out, torchscript=False, make_zip=False, features=FEATURES, not_an_id=3)
    package_bundle(ckpt, out, name="b", torchscript=False, make_zip=False, features=FEATURES)
    with pytest.raises(ValueError, match="exists"):
        package_bundle(ckpt, out, name="b", torchscript=False, make_zip=False, features=FEATURES)
    package_bundle(ckpt, out, name="b", torchscript=False, make_zip=False, overwrite=True, features=FEATURES)
    assert sorted(p.name for p in Path(out).iterdir()) == ["b"]  # no staging leftovers
