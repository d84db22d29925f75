"""The training bundle through MONAI's own entry points: config properties, CLI runs in 3D and 2D, resume, bad data."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from _bundle_cli import training_command
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.utils import set_determinism

from spoco_bundle.data import checked_datalist
from spoco_bundle.handlers import UNLIMITED_EPOCHS, TrainingProgressBar
from spoco_bundle.io import read_image, write_label_image
from spoco_bundle.postprocessing import RemoveSmallInstancesd
from spoco_bundle.synthetic import write_synthetic_dataset
from spoco_bundle.training_set import TrainingSet

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "configs" / "train.json")
META = str(ROOT / "metadata.json")


def _training_command(tmp: Path, dataset: Path, *overrides: str) -> list[str]:
    return training_command(tmp / "bundle", dataset, *overrides)


def _network() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"features": [8, 16, 32]})
    return parser.get_parsed_content("network_def")


def _run_training(tmp: Path, dataset: Path, *overrides: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    cmd = _training_command(tmp, dataset, *overrides)
    # run from an unrelated working directory, as a user would
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"training failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _stop_when(
    cmd: list[str], cwd: Path, ready: Callable[[float], bool], sig: int = signal.SIGKILL, timeout_s: float = 300
) -> int:
    """Run ``cmd`` until ``ready(seconds since the start)`` holds, then send it ``sig``; its exit status (negative:
    ended by a signal). Fails when it ends by itself first."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    try:
        while time.monotonic() - start < timeout_s and proc.poll() is None and not ready(time.monotonic() - start):
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(sig)
        return proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def tiny3d(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn3d")
    write_synthetic_dataset(out, n_train=2, n_val=1, n_test=0, shape=(16, 48, 48), seed=1)
    return out


def test_check_properties(tmp_path, tiny3d):
    wf = ConfigWorkflow(
        config_file=TRAIN, meta_file=META, workflow_type="train", bundle_root=str(tmp_path), dataset_dir=str(tiny3d)
    )
    wf.initialize()
    assert wf.check_properties() == []
    wf.finalize()  # closes the log file that initialize opened in output_dir
    parser = ConfigParser()
    parser.read_config(TRAIN)
    for key in (
        "bundle_root",
        "device",
        "dataset_dir",
        "output_dir",
        "network_def",
        "train#trainer",
        "train#trainer#max_epochs",
        "train#trainer#epoch_length",
        "train#dataset#data",
        "train#handlers",
        "epochs",
        "epoch_length",
        "val_interval",
    ):
        assert key in parser, key
    # MONAI's check_properties (and tools that patch the list, like --tracking) read each handler's "_target_"
    assert all(isinstance(h, dict) for h in parser["train#handlers"])


def test_inference_check_properties_and_evaluator_run(tmp_path):
    """configs/inference.json is a MONAI inference workflow: its required properties resolve (dataset, evaluator,
    ...), the evaluator's dataset and post-processing are the config's named steps, and running it writes labels."""
    import numpy as np
    import tifffile

    from spoco_bundle.synthetic import generate_nuclei

    image, _ = generate_nuclei((96, 112), seed=3)
    tifffile.imwrite(tmp_path / "a.tif", image)
    wf = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "inference.json"),
        meta_file=META,
        workflow_type="infer",
        bundle_root=str(ROOT),
        model="nuclei2d",
        dataset_dir=str(tmp_path / "a.tif"),
        output_dir=str(tmp_path / "out"),
    )
    wf.initialize()
    assert wf.check_properties() == []
    for ref, target in (("dataset#transform", "@preprocessing"), ("evaluator#postprocessing", "@postprocessing")):
        assert wf.parser[ref] == target, ref
    wf.run()
    labels = tifffile.imread(tmp_path / "out" / "a_instances.tif")
    assert labels.shape == (96, 112) and labels.max() > 0 and np.unique(labels).size == labels.max() + 1
    wf.finalize()


def test_train_image_scale_resamples_images_and_labels_together(tiny3d):
    # the training pipeline up to the random crops, with and without image_scale: the shape follows the factors,
    # every kept object survives, and they still lie on the bright nuclei (no misalignment between the resamplings)
    def prepared(scale):
        parser = ConfigParser()
        parser.read_config(TRAIN)
        parser.update({"dataset_dir": str(tiny3d), "image_scale": scale, "instance_ratio": 1.0})
        steps = parser.get_parsed_content("load_transforms") + parser.get_parsed_content(
            "train#deterministic_transforms"
        )
        item = parser.get_parsed_content("train#dataset#data")[0]
        for t in steps[:-1]:  # without the final padding to the patch size
            item = t(item)
        return item["image"], item["label"]

    full_image, full_label = prepared(1.0)
    image, label = prepared([1, 0.5, 0.5])
    assert tuple(full_image.shape) == (1, 16, 48, 48)
    assert tuple(image.shape) == (1, 16, 24, 24) and tuple(label.shape) == (1, 16, 24, 24)
    assert label.dtype == torch.int64
    assert set(label.unique().tolist()) == set(full_label.unique().tolist()) and int(label.max()) >= 2
    inside, outside = image[label > 0].mean().item(), image[label == 0].mean().item()
    assert inside > outside + 0.2, (inside, outside)


@pytest.fixture(scope="module")
def tiny2d(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn2d")
    write_synthetic_dataset(out, n_train=2, n_val=1, n_test=0, shape=(64, 64), seed=1, spatial_dims=2)
    return out


@pytest.mark.parametrize("patch_size", [[16, 32, 32], [8, 40, 24], [48, 40]])
def test_training_batches_for_any_patch_shape(tiny3d, tiny2d, patch_size):
    # a patch that is not square in the rotation plane is not rotated (a quarter turn would change its shape and the
    # batch would not collate); the labels come through as int64 ids
    parser = ConfigParser()
    parser.read_config(TRAIN)
    dims = len(patch_size)
    data = tiny3d if dims == 3 else tiny2d
    parser.update({"dataset_dir": str(data), "spatial_dims": dims, "patch_size": patch_size})
    set_determinism(seed=0)  # the transforms' random states
    try:
        loader = parser.get_parsed_content("train#dataloader")
        batches = list(itertools.islice(loader, 12))
    finally:
        set_determinism(seed=None)
    assert {tuple(b[k].shape) for b in batches for k in ("image", "image_g", "label")} == {(2, 1, *patch_size)}
    assert all(b["label"].dtype == torch.int64 for b in batches)


def test_training_loader_spans_an_epoch_however_few_the_files(tiny3d):
    # two training volumes, epoch_length 5: one pass of the loader covers the epoch (whole reshuffled file lists, so no
    # file a third time before the other's second), and its worker stays for the next pass, instead of ignite
    # re-creating the iterator, and with it the worker processes, every second iteration
    parser = ConfigParser()
    parser.read_config(TRAIN)
    ids = {
        "dataset_dir": str(tiny3d),
        "spatial_dims": 3,
        "patch_size": [16, 32, 32],
        "epoch_length": 5,
        "num_workers": 1,
    }
    parser.update(ids)
    loader = parser.get_parsed_content("train#dataloader")
    assert len(loader) == 6 and loader.persistent_workers
    order = list(loader.sampler)
    assert sorted(order[:2]) == sorted(order[2:4]) == sorted(order[4:]) == [0, 1]
    first = iter(loader)
    try:
        assert len(list(first)) == 6
        assert iter(loader) is first  # the same iterator object and its worker, reset for the next pass
    finally:
        del first, loader  # the persistent worker ends with its iterator
    parser.update({"epoch_length": 1, "num_workers": 0})  # more files than iterations: a pass is the file list
    loader = parser.get_parsed_content("train#dataloader", instantiate=True, lazy=False)
    assert len(loader) == 2 and not loader.persistent_workers


def test_validation_removes_objects_small_next_to_the_recorded_training_objects():
    # the best checkpoint is chosen on what inference will output: the size filter of the objects the student
    # records when training starts (TrainingSetRecorder), min_size alone until then
    parser = ConfigParser()
    parser.read_config(TRAIN)
    ids = {"spatial_dims": 2, "features": [8, 16, 32], "device": "$torch.device('cpu')", "bundle_root": str(ROOT)}
    parser.update(ids)
    inference = ConfigParser()
    inference.read_config(str(ROOT / "configs" / "inference.json"))
    assert parser["min_diameter_ratio"] == inference["min_diameter_ratio"]  # validation scores what inference outputs
    steps = parser.get_parsed_content("validate#postprocessing").transforms
    (remove,) = [t for t in steps if isinstance(t, RemoveSmallInstancesd)]
    network = parser.get_parsed_content("network")
    yy, xx = np.mgrid[:64, :64]
    labels = np.zeros((1, 64, 64), np.int32)
    labels[0][(yy - 20) ** 2 + (xx - 20) ** 2 <= 10**2] = 1  # diameter about 20
    labels[0][(yy - 50) ** 2 + (xx - 50) ** 2 <= 3**2] = 2  # 29 pixels: above min_size 16, diameter about 6
    assert len(np.unique(remove({"pred": labels})["pred"])) == 3  # nothing recorded yet: both kept
    with torch.no_grad():
        network.object_diameter.fill_(20.0)
    kept = remove({"pred": labels})["pred"]
    assert len(np.unique(kept)) == 2 and kept[0, 20, 20] == 1  # under 0.45 x 20 pixels across: removed


@pytest.mark.slow
def test_train_3d_writes_strict_student_checkpoint(tmp_path, tiny3d):
    proc = _run_training(
        tmp_path,
        tiny3d,
        "--epochs",
        "2",
        "--epoch_length",
        "2",
        "--val_interval",
        "1",
        "--instance_ratio",
        "0.5",
        "--patch_size",
        "[16,32,32]",
        "--foreground_ring",
        "0",  # the positive-unlabeled head (a handful of objects would get a ring by default)
    )
    log = proc.stdout + proc.stderr
    assert "loss terms: pull" in log and "consistency" in log
    models = tmp_path / "bundle" / "models"
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"features": [8, 16, 32]})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(state, strict=True)  # the plain student state dict
    # background unlabeled: the foreground head trained positive-unlabeled and its label frequency was estimated
    assert 0.0 < float(state["fg_label_frequency"]) < 1.0
    assert float(state["fg_positive_weight"]) == 10.0  # the loss's default, undone at inference
    # the size of what it was trained on: the kept objects' median diameter and the images' blob size range
    train = TrainingSet(checked_datalist(str(tiny3d), "training", 3), spatial_dims=3, instance_ratio=0.5, seed=0)
    assert float(state["object_diameter"]) == pytest.approx(train.object_diameter, rel=1e-5)
    assert state["image_blob_scale"].tolist() == pytest.approx(list(train.blob_scales), rel=1e-5)
    assert 0 < float(state["image_blob_scale"][0]) <= float(state["image_blob_scale"][2])
    resume = torch.load(models / "resume.pt", map_location="cpu", weights_only=True)
    assert {"model", "teacher", "optimizer", "trainer", "lr_scheduler"} <= set(resume)
    assert resume["trainer"]["iteration"] == 4 and resume["trainer"]["epoch_length"] == 2  # 2 epochs of 2
    teacher = torch.load(models / "teacher.pt", map_location="cpu", weights_only=True)
    assert teacher.keys() == state.keys()
    # the teacher is an EMA of the student: close to, but not equal to, the student after training
    diff = max((teacher[k].float() - resume["model"][k].float()).abs().max().item() for k in state)
    assert 0 < diff

    # evaluation of that checkpoint: inference.json + evaluate.json, MetricsSaver CSVs per image and mean
    evaluate = str(ROOT / "configs" / "evaluate.json")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        f"['{ROOT / 'configs' / 'inference.json'}','{evaluate}']",
        "--meta_file",
        META,
        "--bundle_root",
        str(tmp_path / "bundle"),
        "--dataset_dir",
        str(tiny3d),
        "--output_dir",
        str(tmp_path / "scores"),
        "--device",
        "cpu",
        "--features",
        "[8,16,32]",
        "--patch_size",
        "[16,32,32]",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = (tmp_path / "scores" / "metrics.csv").read_text()
    for name in ("val_ap50", "val_map", "val_sbd", "val_arand", "val_voi_split", "val_voi_merge"):
        assert name in metrics
    raw = (tmp_path / "scores" / "val_ap50_raw.csv").read_text().splitlines()
    assert len(raw) == 2 and "nuclei_" in raw[1]  # header + the one validation volume

    # consistency clustering at inference uses teacher.pt next to model.pt
    infer = str(ROOT / "configs" / "inference.json")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        infer,
        "--meta_file",
        META,
        "--bundle_root",
        str(tmp_path / "bundle"),
        "--dataset_dir",
        str(tiny3d / "imagesTr"),
        "--output_dir",
        str(tmp_path / "seg"),
        "--device",
        "cpu",
        "--features",
        "[8,16,32]",
        "--patch_size",
        "[16,32,32]",
        "--clustering",
        "consistency",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "seg").glob("*_instances.nii.gz"))) == 3


@pytest.mark.slow
def test_resume_extends_a_finished_run(tmp_path, tiny3d):
    # a finished run resumed with more epochs trains the added ones only; with as many, there is nothing to resume
    short = ("--epoch_length", "2", "--val_interval", "5", "--patch_size", "[16,32,32]")
    _run_training(tmp_path, tiny3d, "--epochs", "1", *short)
    proc = _run_training(tmp_path, tiny3d, "--epochs", "2", *short, "--resume", "True")
    log = proc.stdout + proc.stderr
    resume = tmp_path / "bundle" / "models" / "resume.pt"
    assert f"resuming from {resume}: iteration 2, epoch 1 of 2 complete" in log
    assert "Epoch[2] Complete" in log and "Epoch[1] Complete" not in log  # epoch 1 was not trained again
    assert "training 2 epochs x 2 iterations = 4 iterations, resuming after iteration 2" in log
    state = torch.load(resume, map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 4 and state["trainer"]["epoch_length"] == 2
    proc = _run_training(tmp_path, tiny3d, "--epochs", "2", *short, "--resume", "True", expect_ok=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: ValueError: --resume True: the run in {resume} is finished (4 of 4 iterations, 2 epochs of 2); "
        "nothing to resume. Pass a larger --epochs to train it on, or start a new run without --resume."
    )
    assert torch.load(resume, map_location="cpu", weights_only=True)["trainer"]["iteration"] == 4  # untouched


@pytest.mark.slow
def test_resume_after_kill_continues_the_killed_run(tmp_path, tiny3d):
    # a run killed (-9) in the middle continues from its last periodic resume state: the same total of iterations,
    # with the optimizer, the learning-rate schedule, the teacher, the calibration state and the best validation
    # score carried over
    models = tmp_path / "bundle" / "models"
    resume = models / "resume.pt"
    models.mkdir(parents=True)
    torch.save({"trainer": {"iteration": 999}}, resume)  # an earlier run's file: a new run removes it at its start
    args = ["--epochs", "4", "--epoch_length", "10", "--resume_interval_s", "0.5", "--val_interval", "2"]
    args += ["--patch_size", "[16,32,32]", "--foreground_ring", "0"]  # a positive-unlabeled head: calibration state
    cmd = _training_command(tmp_path, tiny3d, *args)

    def ten_iterations_saved(elapsed_s: float) -> bool:
        try:  # the file is replaced by a rename: whenever it exists it is complete
            state = torch.load(resume, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return False
        return 10 <= state["trainer"].get("iteration", 0) < 999

    _stop_when(cmd, tmp_path, ten_iterations_saved)  # SIGKILL: no handler runs
    saved = torch.load(resume, map_location="cpu", weights_only=True)  # the state the killed run left
    done = saved["trainer"]["iteration"]
    assert 10 <= done < 40
    assert {p.name for p in models.iterdir()} <= {"resume.pt", ".resume.pt.partial"}  # one file, no pile-up
    assert saved["fg_calibration"]["weight"] > 0 and saved["time_limit"] == {"elapsed": 0.0}
    assert saved["foreground_regime"] == {"ring": None}  # a ring given, not "auto": nothing decided

    # momentum 1 freezes the teacher: it must stay exactly the saved one (restored, not re-synced to the student)
    proc = _run_training(tmp_path, tiny3d, *args, "--momentum", "1.0", "--resume", "True")
    log = proc.stdout + proc.stderr
    into = f", {done % 10} of 10 iterations into epoch {done // 10 + 1}" if done % 10 else ""
    assert f"resuming from {resume}: iteration {done}, epoch {done // 10} of 4 complete{into}" in log
    assert f"training 4 epochs x 10 iterations = 40 iterations, resuming after iteration {done}" in log
    assert f"Epoch[{done // 10}] Complete" not in log and "Epoch[4] Complete" in log
    assert {p.name for p in models.iterdir()} == {"resume.pt", "model.pt", "model.json", "teacher.pt"}
    final = torch.load(resume, map_location="cpu", weights_only=True)
    assert final["trainer"]["iteration"] == 40
    # Adam counted every iteration of the run, before and after the kill
    assert {float(s["step"]) for s in final["optimizer"]["state"].values()} == {40.0}
    assert final["lr_scheduler"]["last_epoch"] == 4 and final["lr_scheduler"]["T_max"] == 4  # one cosine over 4
    params = {n for n, _ in _network().named_parameters()}
    assert all(torch.equal(final["teacher"][n], saved["teacher"][n]) for n in params)
    assert not all(torch.equal(final["model"][n], saved["model"][n]) for n in params)  # the student trained on
    assert final["fg_calibration"]["weight"] > saved["fg_calibration"]["weight"]  # the average went on
    assert len(final["best_model"]["saved"]) == 1  # validation's best model.pt (epochs 2 and 4), remembered
    teacher = torch.load(models / "teacher.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(teacher[n], saved["teacher"][n]) for n in params)


@pytest.mark.slow
def test_a_3d_run_killed_after_90_s_resumes_and_a_stop_signal_saves(tmp_path, tiny3d):
    # the defaults a user trains with (network, patch, resume interval): a kill -9 after 90 s loses at most a minute
    models, log = tmp_path / "bundle" / "models", tmp_path / "bundle" / "runs" / "train.log"
    cmd = training_command(tmp_path / "bundle", tiny3d, features=None)
    _stop_when(cmd, tmp_path, lambda elapsed_s: elapsed_s >= 90)  # SIGKILL: no handler runs
    done = torch.load(models / "resume.pt", map_location="cpu", weights_only=True)["trainer"]["iteration"]
    assert done > 0

    # resumed, then stopped as a job scheduler stops a job (SIGTERM): the state after the iteration in progress

    def resumed_and_trained(elapsed_s: float) -> bool:
        resumed = log.read_text().split(f"resuming from {models / 'resume.pt'}", 1)[1:]
        return bool(resumed) and "s per iteration" in resumed[0]  # resumed, and 10 iterations (or a minute) since

    assert _stop_when(cmd + ["--resume", "True"], tmp_path, resumed_and_trained, signal.SIGTERM) == -signal.SIGTERM
    text = log.read_text()
    assert f"resuming from {models / 'resume.pt'}: iteration {done}," in text
    stopped = int(text.split("SIGTERM: stopped after iteration ")[1].split(";")[0])
    assert stopped > done
    assert torch.load(models / "resume.pt", map_location="cpu", weights_only=True)["trainer"]["iteration"] == stopped


@pytest.mark.slow
def test_resume_without_a_resume_file_fails_clearly(tmp_path, tiny3d):
    proc = _run_training(tmp_path, tiny3d, "--epochs", "1", "--resume", "True", expect_ok=False)
    assert proc.returncode != 0
    models = tmp_path / "bundle" / "models"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: FileNotFoundError: --resume True: nothing to resume in {models}: resume.pt does not exist (a run "
        "writes it every resume_interval_s seconds, on a stop signal and at its end). Start the run without "
        "--resume, or pass the --ckpt_dir of the run to continue."
    )
    assert list(models.iterdir()) == []  # nothing written


@pytest.fixture(scope="module")
def one3d(tmp_path_factory) -> Path:
    """One training volume (and one validation volume): a few large volumes are the case epoch_length is for."""
    out = tmp_path_factory.mktemp("one3d")
    write_synthetic_dataset(out, n_train=1, n_val=1, n_test=0, shape=(16, 48, 48), seed=1)
    return out


@pytest.mark.slow
def test_epoch_length_is_independent_of_the_number_of_images(tmp_path, one3d):
    # one volume, 2 epochs of 3 iterations: 6 iterations (an epoch is not one pass over the images)
    proc = _run_training(tmp_path, one3d, "--epochs", "2", "--epoch_length", "3", "--patch_size", "[16,32,32]")
    log = proc.stdout + proc.stderr
    assert "training 2 epochs x 3 iterations = 6 iterations" in log
    assert log.count("loss terms: pull") == 2
    resume = torch.load(tmp_path / "bundle" / "models" / "resume.pt", map_location="cpu", weights_only=True)
    assert resume["trainer"]["iteration"] == 6 and resume["trainer"]["epoch_length"] == 3
    assert resume["lr_scheduler"]["T_max"] == 2  # the cosine spans the run's epochs


@pytest.mark.slow
def test_time_limit_ends_the_run_not_epochs(tmp_path, one3d):
    # `--epochs 1` alone would stop after 1 epoch; with a budget the budget ends the run, here in the middle of
    # the first (long) epoch, before any epoch-level validation: the final weights are validated all the same
    proc = _run_training(
        tmp_path,
        one3d,
        "--epochs",
        "1",
        "--epoch_length",
        "1000",
        "--time_limit_s",
        "3",
        "--patch_size",
        "[16,32,32]",
    )
    log = proc.stdout + proc.stderr
    assert "training until the time limit of 3 s (wall) is spent (epochs of 1000 iterations" in log
    assert "time limit of 3 s (wall) reached after" in log
    assert log.count("Metrics -- val_ap50") == 1
    models = tmp_path / "bundle" / "models"
    resume = torch.load(models / "resume.pt", map_location="cpu", weights_only=True)
    assert 1 < resume["trainer"]["iteration"] < 1000 and resume["trainer"]["max_epochs"] == UNLIMITED_EPOCHS
    assert (models / "model.pt").is_file()  # the best (here: only) validated weights


def test_epoch_length_carries_the_data_order_across_epochs():
    # what epoch_length relies on in MONAI's workflow (ignite): an epoch shorter than the loader continues the
    # loader's pass in the next epoch, and an exhausted loader restarts (reshuffled) in the middle of an epoch
    from monai.data import DataLoader
    from monai.engines import Workflow

    class Record(Workflow):
        def _iteration(self, engine, batch):
            seen.append((engine.state.epoch, int(batch)))
            return {}

    seen = []
    torch.manual_seed(0)
    Record(device="cpu", max_epochs=3, data_loader=DataLoader(list(range(5)), shuffle=True), epoch_length=4).run()
    assert [e for e, _ in seen] == [1] * 4 + [2] * 4 + [3] * 4
    items = [i for _, i in seen]
    assert sorted(items[:5]) == sorted(items[5:10]) == list(range(5))  # whole passes, across epoch boundaries


def test_train_2d_tiff_without_validation(tmp_path):
    data = tmp_path / "syn2d"
    write_synthetic_dataset(data, n_train=2, n_val=0, n_test=0, shape=(64, 64), seed=2, ext=".tif", spatial_dims=2)
    _run_training(
        tmp_path,
        data,
        "--spatial_dims",
        "2",
        "--epochs",
        "1",
        "--epoch_length",
        "2",
        "--patch_size",
        "[48,48]",
        "--background_label",
        "0",
        "--instance_ratio",
        "0.5",
    )
    state = torch.load(tmp_path / "bundle" / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state["input_block.conv1.conv.weight"].ndim == 4  # 2D convolutions
    # annotated background: supervised head, no calibration
    assert float(state["fg_label_frequency"]) == 1.0 and float(state["fg_positive_weight"]) == 1.0


@pytest.mark.slow
def test_images_smaller_than_patch_are_padded(tmp_path):
    data = tmp_path / "small"
    write_synthetic_dataset(data, n_train=1, n_val=0, n_test=0, shape=(40, 40), seed=3, spatial_dims=2)
    _run_training(
        tmp_path, data, "--spatial_dims", "2", "--epochs", "1", "--epoch_length", "1", "--patch_size", "[64,64]"
    )
    assert (tmp_path / "bundle" / "models" / "model.pt").is_file()


@pytest.mark.parametrize("problem", ["float_label", "no_objects", "shape_mismatch", "empty"])
@pytest.mark.slow
def test_bad_data_fails_with_file_name(tmp_path, problem):
    import nibabel as nib
    import numpy as np

    data = tmp_path / "bad"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    img = np.random.rand(16, 32, 32).astype(np.float32)
    lab = np.zeros((16, 32, 32), np.uint16)
    lab[4:10, 4:12, 4:12] = 3
    if problem == "float_label":
        lab = lab.astype(np.float32)
    elif problem == "no_objects":
        lab[:] = 0
    elif problem == "shape_mismatch":
        lab = lab[:, :, :30]
    if problem != "empty":
        nib.save(nib.Nifti1Image(img, np.eye(4)), data / "imagesTr" / "vol.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), data / "labelsTr" / "vol.nii.gz")
    proc = _run_training(tmp_path, data, "--epochs", "1", "--patch_size", "[16,32,32]", expect_ok=False)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    expected = {
        "float_label": "vol.nii.gz",
        "no_objects": "annotated",
        "shape_mismatch": "vol.nii.gz",
        "empty": "empty",
    }[problem]
    assert expected in log
    assert not (tmp_path / "bundle" / "models" / "model.pt").exists()


def _paint_strokes(dataset: Path, stroke_id: int) -> int:
    """Paint strokes of background into the training labels of ``dataset``, as an annotator does beside the objects
    they outlined: in each label file, three lines across the middle half of the image (of the middle slice of a
    volume) where they are background more than 3 voxels from any object, set to ``stroke_id``. Returns how many
    voxels were painted."""
    from scipy import ndimage

    painted = 0
    for item in json.loads((dataset / "dataset.json").read_text())["training"]:
        path = dataset / item["label"]
        label, meta = read_image(path)
        label = np.array(label)
        plane = label[label.shape[0] // 2] if label.ndim == 3 else label
        far = ndimage.distance_transform_edt(plane == 0) > 3
        h, w = plane.shape
        for row in (h // 4, h // 2, 3 * h // 4):
            line = far[row, w // 4 : 3 * w // 4]
            plane[row, w // 4 : 3 * w // 4][line] = stroke_id
            painted += int(line.sum())
        write_label_image(path, label, meta)
    return painted


@pytest.mark.slow
def test_scribbles_train_a_calibrated_head_and_runs_repeat_bit_for_bit(tmp_path, monkeypatch):
    # strokes painted into the labels (id --background_label): without a ring the head stays positive-unlabeled, so
    # the model carries a label frequency c < 1; two runs with the same seed and thread count give identical weights
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "syn2d"
    write_synthetic_dataset(data, n_train=2, n_val=0, n_test=0, shape=(64, 64), seed=2, ext=".tif", spatial_dims=2)
    assert _paint_strokes(data, 65535) > 0
    args = ["--spatial_dims", "2", "--epochs", "1", "--epoch_length", "3", "--patch_size", "[48,48]"]
    args += ["--foreground_ring", "0", "--background_label", "65535", "--instance_ratio", "0.5"]
    states = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        _run_training(tmp_path / run, data, *args)
        states.append(torch.load(tmp_path / run / "bundle" / "models" / "model.pt", weights_only=True))
    assert 0.0 < float(states[0]["fg_label_frequency"]) < 1.0 and float(states[0]["fg_positive_weight"]) == 10.0
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    settings = json.loads((tmp_path / "a" / "bundle" / "models" / "model.json").read_text())["training"]["settings"]
    assert settings["foreground_strokes"] is True and settings["background_label"] == 65535


@pytest.mark.parametrize("n_val", [0, 1])
def test_lee_liu_images_calibrates_the_saved_model(tmp_path, n_val):
    # foreground_calibration lee_liu_images: the threshold pass runs before validation (n_val 1: the best-model
    # saver keeps what it set) or at the end before the final saver (n_val 0); model.pt carries c = 2 t
    import re

    data = tmp_path / "syn2d"
    write_synthetic_dataset(data, n_train=2, n_val=n_val, n_test=0, shape=(64, 64), seed=2, ext=".tif", spatial_dims=2)
    args = ["--spatial_dims", "2", "--epochs", "1", "--epoch_length", "2", "--val_interval", "1"]
    args += ["--patch_size", "[48,48]", "--instance_ratio", "0.5", "--foreground_calibration", "lee_liu_images"]
    proc = _run_training(tmp_path, data, *args, "--foreground_ring", "0")  # the positive-unlabeled head
    log = proc.stdout + proc.stderr
    found = re.findall(r"foreground threshold \(Lee & Liu on 2 training image\(s\)\): t = ([0-9.]+)", log)
    assert len(found) == 1, log[-3000:]
    models = tmp_path / "bundle" / "models"
    state = torch.load(models / "model.pt", weights_only=True)
    assert float(state["fg_label_frequency"]) == pytest.approx(2 * float(found[0]), abs=2e-3)
    card = json.loads((models / "model.json").read_text())
    assert card["training"]["settings"]["foreground_calibration"] == "lee_liu_images"


def test_foreground_ring_trains_a_supervised_head_in_3d(tmp_path, tiny3d):
    # --foreground_ring per axis (z first): the head learns the annotated objects against the ring around them, so
    # no image is positive-unlabeled and with the label-frequency calibration the model carries none (c = 1, w = 1:
    # the head's own 0.5)
    import re

    args = ["--epochs", "1", "--epoch_length", "2", "--instance_ratio", "0.5", "--patch_size", "[16,32,32]"]
    _run_training(
        tmp_path, tiny3d, *args, "--foreground_ring", "[1,2,2]", "--foreground_calibration", "label_frequency"
    )
    models = tmp_path / "bundle" / "models"
    state = torch.load(models / "model.pt", weights_only=True)
    assert float(state["fg_label_frequency"]) == 1.0 and float(state["fg_positive_weight"]) == 1.0
    assert json.loads((models / "model.json").read_text())["training"]["settings"]["foreground_ring"] == [1, 2, 2]
    # the defaults ("auto") with a handful of annotated nuclei and painted strokes: the run counts the annotated
    # objects, takes the ring (strokes join it), and the threshold pass sets the ring head's threshold on the
    # training volumes (c = 2 t, still unweighted); the card records what "auto" chose
    strokes = tmp_path / "strokes"
    shutil.copytree(tiny3d, strokes / "data")
    assert _paint_strokes(strokes / "data", 65535) > 0
    args += ["--val_interval", "1", "--background_label", "65535"]
    proc = _run_training(strokes, strokes / "data", *args)
    log = proc.stdout + proc.stderr
    from spoco_bundle.losses import AUTO_RING_MAX_OBJECTS

    pattern = rf"foreground_ring 'auto': (\d+) annotated object\(s\), at most {AUTO_RING_MAX_OBJECTS}, voxel size "
    pattern += r"[0-9.e x]+: (\[[0-9, ]+\]|[0-9]+)$"
    chosen = re.findall(pattern, log, flags=re.MULTILINE)
    assert len(chosen) == 1 and int(chosen[0][0]) > 0, log[-3000:]
    found = re.findall(r"foreground threshold \(Lee & Liu on 2 training image\(s\)\): t = ([0-9.]+)", log)
    assert len(found) == 1, log[-3000:]
    models = tmp_path / "strokes" / "bundle" / "models"
    state = torch.load(models / "model.pt", weights_only=True)
    assert float(state["fg_label_frequency"]) == pytest.approx(2 * float(found[0]), abs=2e-3)
    assert float(state["fg_positive_weight"]) == 1.0
    settings = json.loads((models / "model.json").read_text())["training"]["settings"]
    assert settings["foreground_calibration"] == "lee_liu_images"
    assert settings["foreground_ring"] == json.loads(chosen[0][1]) and settings["foreground_strokes"] is True


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from ignite.engine import Engine, Events

    def handlers() -> int:
        return len(engine._event_handlers[Events.ITERATION_COMPLETED])

    engine = Engine(lambda e, b: {"loss": 0.0})
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file: no carriage-return updates in it
    TrainingProgressBar().attach(engine)
    assert handlers() == 0
    monkeypatch.setattr(sys, "stderr", _Terminal())
    TrainingProgressBar().attach(engine)
    assert handlers() > 0


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["resume", "tensorboard"])
def test_a_boolean_option_given_as_lowercase_text_fails_clearly(tmp_path, tiny3d, flag):
    """`--resume false` arrives as the text 'false', which Python counts as true (it would have resumed, or kept
    TensorBoard on): one error line naming the option, nothing trained or written."""
    proc = _run_training(tmp_path, tiny3d, "--epochs", "1", f"--{flag}", "false", expect_ok=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: ValueError: {flag} must be a boolean (on the command line: --{flag} True or False), got 'false'."
    )
    models = tmp_path / "bundle" / "models"
    assert not models.exists() or list(models.iterdir()) == []
