"""Shipped models: ``--model <name>`` selects ``models/<name>/`` with the settings of its ``model.json``; each shipped
model loads strictly and carries what inference needs and how it was made."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _bundle_cli import training_command
from monai.bundle import ConfigParser

from scripts.shipped_models import MODELS
from spoco_bundle import cards
from spoco_bundle.postprocessing import FEW_INSTANCES

ROOT = Path(__file__).resolve().parents[1]
INFER = str(ROOT / "configs" / "inference.json")
META = str(ROOT / "configs" / "metadata.json")
DATA = Path(os.environ.get("SPOCO_DATA_DIR", ROOT.parent / "shared" / "data"))


def test_selection_by_name(tmp_path):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "model.json").write_text(json.dumps({"inference": {"spatial_dims": 2}}))
    assert cards.available(tmp_path) == ["tiny"]
    assert cards.checkpoint(tmp_path, None) == str(tmp_path / "models" / "model.pt")
    assert cards.checkpoint(tmp_path, "tiny") == str(tmp_path / "models" / "tiny" / "model.pt")
    assert cards.settings(tmp_path, "tiny") == {"spatial_dims": 2} and cards.settings(tmp_path, None) == {}
    with pytest.raises(ValueError, match=r"no shipped model 'nuclei' in .*\(shipped: tiny\)"):
        cards.checkpoint(tmp_path, "nuclei")
    (tmp_path / "models" / "tiny" / "model.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read .*model.json"):
        cards.settings(tmp_path, "tiny")


# every recipe of scripts/shipped_models.py that is shipped
SHIPPED = cards.available(ROOT)


def test_nuclei2d_and_nuclei3d_are_shipped():
    for name in ("nuclei2d", "nuclei3d"):
        assert name in SHIPPED, f"models/{name} is missing: python scripts/shipped_models.py train {name}"
    assert set(SHIPPED) <= set(MODELS)  # every shipped model has its recipe


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_with_its_settings_and_records_its_training(name):
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"bundle_root": str(ROOT), "model": name, "device": "$torch.device('cpu')"})
    card = cards.card(ROOT, name)
    assert parser.get_parsed_content("spatial_dims") == card["inference"]["spatial_dims"]
    net = parser.get_parsed_content("network")  # a strict load of models/<name>/model.pt
    assert float(net.object_diameter) > 0 and bool((net.image_blob_scale > 0).all())
    assert float(net.fg_label_frequency) == 1.0  # dense labels: a supervised head, no calibration needed
    assert (ROOT / "models" / name / "model.pt").stat().st_size < 10 * 2**20  # a few MB in the repository
    assert card["training"]["command"].startswith(f"python scripts/shipped_models.py train {name}")
    assert {"ap50", "map", "sbd"} <= set(card["scores"]["default_inference"])


def _pooled_ap50(predictions: list[np.ndarray], truths: list[np.ndarray]) -> float:
    """AP50 = TP / (TP + FP + FN) with the counts summed over the images before dividing (as the benchmark pools,
    ``stardist.matching.matching_dataset``), from the per-image AP50 of ``spoco_bundle.metrics``: TP of an image is
    AP * (n_true + n_predicted) / (1 + AP)."""
    from spoco_bundle.metrics import ap50

    tp = total = 0.0
    for pred, truth in zip(predictions, truths):
        n = sum(len(np.unique(x[x > 0])) for x in (truth, pred))
        ap = ap50(truth, pred)
        tp += ap * n / (1 + ap)
        total += n
    return tp / (total - tp) if total > tp else 1.0


def _rescale(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """An image resampled linearly and its labels by nearest neighbour, by ``factor`` along every axis."""
    from scipy import ndimage

    return ndimage.zoom(image.astype(np.float32), factor, order=1), ndimage.zoom(labels, factor, order=0)


def _dsb_validation(n: int) -> list[str]:
    split = json.loads((DATA / "dsb2018" / "split.json").read_text())
    return sorted(split["validation"])[:n]


@pytest.mark.skipif(not (DATA / "dsb2018" / "split.json").is_file(), reason="needs ../shared/data/dsb2018")
@pytest.mark.slow
def test_nuclei2d_segments_dsb_validation_images_through_the_cli(tmp_path):
    """``--model nuclei2d`` as a user runs it, on real validation images it never saw, at twice their size too
    (``--image_scale auto``, the default, finds the factor); an unknown name is one clear line."""
    import tifffile

    from spoco_bundle.io import read_image

    ids = _dsb_validation(4)
    images = tmp_path / "in"
    images.mkdir()
    labels = {}
    for i in ids:
        img = np.asarray(read_image(DATA / "dsb2018" / "images" / f"{i}.tif")[0])
        lab = np.asarray(read_image(DATA / "dsb2018" / "labels" / f"{i}.tif")[0])
        shutil.copy(DATA / "dsb2018" / "images" / f"{i}.tif", images / f"{i}.tif")
        labels[i] = lab
        big_img, big_lab = _rescale(img, lab, 2.0)
        tifffile.imwrite(images / f"{i}_x2.tif", big_img.astype(np.float32))
        labels[f"{i}_x2"] = big_lab
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", INFER, "--meta_file", META]
    cmd += ["--bundle_root", str(ROOT), "--dataset_dir", str(images), "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd + ["--model", "nuclei2d"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    assert log.count("(auto)") == len(labels)
    assert FEW_INSTANCES not in log  # the object count check stays quiet on a good segmentation
    preds = {k: np.asarray(read_image(tmp_path / "out" / f"{k}_instances.tif")[0]) for k in labels}
    one = _pooled_ap50([preds[i] for i in ids], [labels[i] for i in ids])
    two = _pooled_ap50([preds[f"{i}_x2"] for i in ids], [labels[f"{i}_x2"] for i in ids])
    assert one > 0.6 and two > 0.5, (one, two)
    bad = subprocess.run(cmd + ["--model", "nucleus"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    last = (bad.stdout + bad.stderr).strip().splitlines()[-1]
    assert bad.returncode != 0 and "no shipped model 'nucleus'" in last and "nuclei2d" in last
    # no --model and no trained models/model.pt: the error points to the shipped models
    root = tmp_path / "bundle"
    shutil.copytree(ROOT / "configs", root / "configs")
    shutil.copytree(ROOT / "models" / "nuclei2d", root / "models" / "nuclei2d")
    none = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(root / "configs" / "inference.json")]
        + ["--bundle_root", str(root), "--dataset_dir", str(images), "--output_dir", str(tmp_path / "o2")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    last = (none.stdout + none.stderr).strip().splitlines()[-1]
    assert none.returncode != 0 and "not found" in last and "--model nuclei2d" in last, last


@pytest.mark.skipif(not (DATA / "dsb2018" / "split.json").is_file(), reason="needs ../shared/data/dsb2018")
@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [{"precision": "bfloat16"}, {"backend": "openvino", "precision": "auto"}],
    ids=["bfloat16", "openvino"],
)
def test_reduced_precision_and_openvino_give_the_float32_labels_of_the_shipped_nuclei2d(settings):
    """``precision`` bfloat16 (what ``auto`` takes on a CPU with native bfloat16), and the OpenVINO back-end, on real
    training images with the whole chain (flips, clustering): the objects of torch in float32, AP50 agreement >= 0.99
    over the images."""
    import torch

    from spoco_bundle.io import read_image

    if settings.get("backend") == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra (scripts/run_tests.sh installs it)")
    ids = json.loads((DATA / "dsb2018" / "split.json").read_text())["training"][:12]
    labels: dict[str, list[np.ndarray]] = {}
    for name, ids_ in (("float32", {"precision": "float32"}), ("tried", settings)):
        parser = ConfigParser()
        parser.read_config(str(ROOT / "configs" / "inference.json"))
        parser.update({"bundle_root": str(ROOT), "model": "nuclei2d", **ids_})
        network = parser.get_parsed_content("inference_network").eval()
        pre, inferer, post = (parser.get_parsed_content(k) for k in ("preprocessing", "inferer", "postprocessing"))
        labels[name] = []
        for i in ids:
            item = pre({"image": str(DATA / "dsb2018" / "images" / f"{i}.tif")})
            with torch.inference_mode():
                item["pred"] = inferer(item["image"][None], network)[0]
            labels[name].append(np.asarray(post(item)["pred"])[0])
    assert sum(int(x.max()) for x in labels["float32"]) > 100  # enough objects to tell 1 %
    assert _pooled_ap50(labels["tried"], labels["float32"]) >= 0.99
    truth = [np.asarray(read_image(DATA / "dsb2018" / "labels" / f"{i}.tif")[0]) for i in ids]
    assert _pooled_ap50(labels["tried"], truth) >= _pooled_ap50(labels["float32"], truth) - 0.01


@pytest.mark.slow
def test_pretrained_fine_tunes_from_a_shipped_model_and_refuses_other_architectures(tmp_path):
    """``--pretrained nuclei2d`` starts training (student and momentum teacher) from the shipped weights; an unknown
    name or weights of another architecture are one clear line, never a run from random weights."""
    import torch

    from spoco_bundle.synthetic import write_synthetic_dataset

    data = tmp_path / "syn2d"
    write_synthetic_dataset(data, n_train=2, n_val=0, n_test=0, shape=(64, 64), seed=4, ext=".tif", spatial_dims=2)
    bundle = tmp_path / "bundle"
    for name in ("nuclei2d", "nuclei3d"):
        shutil.copytree(ROOT / "models" / name, bundle / "models" / name)
    cmd = training_command(
        bundle, data, "--epochs", "1", "--epoch_length", "2", "--patch_size", "[48,48]", features=None
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run(
        cmd + ["--spatial_dims", "2", "--pretrained", "nuclei2d", "--instance_ratio", "0.5"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    start = torch.load(ROOT / "models" / "nuclei2d" / "model.pt", weights_only=True)
    student = torch.load(bundle / "models" / "model.pt", weights_only=True)
    teacher = torch.load(bundle / "models" / "teacher.pt", weights_only=True)
    key = "input_block.conv1.conv.weight"
    moved = float((student[key] - start[key]).abs().mean())
    scale = float(start[key].abs().mean())
    assert 0 < moved < 0.2 * scale  # two steps away from the shipped weights, not from a random start
    assert float((teacher[key] - start[key]).abs().mean()) < moved  # the momentum teacher started there too
    written = (bundle / "models" / "model.pt").stat().st_mtime_ns
    for bad, message in (
        (["--spatial_dims", "2", "--pretrained", "nucleus"], "no shipped model 'nucleus'"),
        (
            ["--spatial_dims", "2", "--pretrained", "nuclei2d", "--features", "[8,16,32]"],
            "--features [8,16,32] contradicts its features [16,32,64,128]",  # its model.json says so, in one line
        ),
        (["--spatial_dims", "2", "--pretrained", str(tmp_path / "none.pt")], "none.pt not found"),
        (["--spatial_dims", "2", "--pretrained", "nuclei3d"], "--spatial_dims 2 contradicts its spatial_dims 3"),
    ):
        proc = subprocess.run(cmd + bad, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
        # the summary line after the traceback (a checkpoint mismatch lists torch's details below it)
        summary = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
        assert proc.returncode != 0 and summary and message in summary[-1], summary
        assert (bundle / "models" / "model.pt").stat().st_mtime_ns == written  # nothing trained, nothing saved


def test_packaging_a_shipped_model_reports_its_held_out_scores(tmp_path):
    """The zoo package of ``nuclei2d`` fills ``eval_metrics`` and the model card's section from ``model.json``."""
    from spoco_bundle.package import package_bundle

    card = cards.card(ROOT, "nuclei2d")
    scores = card["scores"]["default_inference"]
    ckpt = cards.checkpoint(ROOT, "nuclei2d")
    bundle = Path(package_bundle(ckpt, str(tmp_path / "dist"), torchscript=False, make_zip=False))
    metrics = json.loads((bundle / "configs" / "metadata.json").read_text())["eval_metrics"]
    assert metrics["ap50"] == round(scores["ap50"], 3) and metrics["map"] == round(scores["map"], 3)
    assert metrics["images"] == scores["images"]
    section = (bundle / "docs" / "README.md").read_text().split("## This package's model")[-1]
    assert card["training"]["command"] in section and f"{scores['ap50']:.3f}" in section


@pytest.mark.skipif(not (DATA / "gonuclear" / "1136_image.tif").is_file(), reason="needs ../shared/data/gonuclear")
@pytest.mark.slow
def test_nuclei3d_segments_the_held_out_gonuclear_volume_through_the_cli(tmp_path):
    """``--model nuclei3d`` as a user runs it on the GoNuclear volume it never saw (1136), once as the original TIFF
    and once as NIfTI with the TIFF's voxel size (the auto scale reads it from the header): nuclei come out, as many
    as there are, most of them matched."""
    import nibabel as nib

    from spoco_bundle.io import read_image

    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(DATA / "gonuclear" / "1136_image.tif", images / "g1136.tif")
    image, meta = read_image(DATA / "gonuclear" / "1136_image.tif")
    spacing = [float(v) for v in np.asarray(meta.get("spacing", [1.0, 1.0, 1.0]))[:3]]
    nifti = nib.Nifti1Image(np.asarray(image, np.float32), np.diag(spacing + [1.0]))
    nifti.header.set_xyzt_units("micron")
    nib.save(nifti, images / "g1136n.nii.gz")
    truth = np.asarray(read_image(DATA / "gonuclear" / "1136_labels.tif")[0])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", INFER, "--meta_file", META]
    cmd += ["--bundle_root", str(ROOT), "--dataset_dir", str(images), "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd + ["--model", "nuclei3d"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for stem, suffix in (("g1136", ".tif"), ("g1136n", ".nii.gz")):
        pred = np.asarray(read_image(tmp_path / "out" / f"{stem}_instances{suffix}")[0])
        assert pred.shape == truth.shape
        n_true = len(np.unique(truth)) - 1
        assert 0.5 * n_true < len(np.unique(pred)) - 1 < 2 * n_true
        assert _pooled_ap50([pred], [truth]) > 0.3, stem
