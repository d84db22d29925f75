"""
End to end through a real MONAI Label server: ``monailabel apps --download --name monaibundle`` (the stock sample
app, copied from the installed wheel), the bundle deployed into it, ``monailabel start_server`` on 127.0.0.1 with
``--conf zoo_source github`` (no zoo look-up), then over HTTP: /info/, inference on NIfTI and TIFF studies, sparse
labels saved through the datastore API, training on CPU, inference with the new weights, bad inputs.

Needs monailabel (.venv-monailabel); skipped elsewhere. The server is always stopped (its whole process group,
training subprocess included) by the fixture's finalizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _monailabel_helpers import (
    LABELLED,
    NIFTI_IDS,
    SHAPE,
    TIFF_ID,
    cli_segmentation,
    load_strict,
    read_result,
    requires_monailabel,
    set_epoch_length,
    write_bad_inputs,
    write_studies,
)

from spoco_bundle.monailabel import deploy_bundle

pytestmark = [requires_monailabel, pytest.mark.monailabel]

MODEL = "spoco"
START_TIMEOUT_S = 300
TRAIN_TIMEOUT_S = 900
EPOCHS = 2
EPOCH_LENGTH = 2  # 4 iterations in all, as when an epoch was one pass over the 2 labelled images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


class Server:
    """A running ``monailabel start_server`` process and a tiny HTTP client for it."""

    def __init__(self, root: Path, app: Path, studies: Path, port: int, log: Path, proc: subprocess.Popen):
        self.root, self.app, self.studies, self.port, self.log, self.proc = root, app, studies, port, log, proc
        self.url = f"http://127.0.0.1:{port}"
        self.bundle = app / "model" / MODEL

    def request(self, method: str, path: str, timeout: float = 600, **kwargs):
        import requests

        assert self.proc.poll() is None, f"the server died:\n{_log_tail(self.log)}"
        return requests.request(method, self.url + path, timeout=timeout, **kwargs)

    def infer(self, image_id: str, out_dir: Path):
        """POST /infer/<model>?image=<id>&output=image; returns (response, saved file or None)."""
        r = self.request("POST", f"/infer/{MODEL}", params={"image": image_id, "output": "image"})
        if r.status_code != 200:
            return r, None
        ext = ".tif" if image_id == TIFF_ID else ".nii.gz"
        out = out_dir / f"{image_id}_result{ext}"
        out.write_bytes(r.content)
        return r, out


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel_server")
    studies = write_studies(root)
    write_bad_inputs(studies["studies"])  # corrupt_000.nii.gz and flat_000.tif are studies too
    # the environment a user gets from `source .venv-monailabel/bin/activate`: the monailabel launcher runs `python`
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    apps = root / "apps"
    subprocess.run(
        [_bin("monailabel"), "apps", "--download", "--name", "monaibundle", "--output", str(apps)],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    app = apps / "monaibundle"
    assert (app / "main.py").is_file(), "monailabel apps --download did not copy the monaibundle sample app"
    deploy_bundle(app, name=MODEL)  # initial (untrained) weights: the model is listed and can be trained
    set_epoch_length(app / "model" / MODEL, EPOCH_LENGTH)
    port = _free_port()
    log = root / "server.log"
    cmd = [
        _bin("monailabel"),
        "start_server",
        "--app",
        str(app),
        "--studies",
        str(studies["studies"]),
        "--conf",
        "models",
        MODEL,
        "--conf",
        "zoo_source",
        "github",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--uvicorn_app",
        "spoco_bundle.monailabel.server:app",
    ]
    with open(log, "wb") as fh:
        # own process group, so the finalizer also stops the training subprocess the server starts
        proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(root, app, studies["studies"], port, log, proc)
    srv.images, srv.sparse = studies["images"], studies["sparse"]
    try:
        import requests

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"monailabel start_server exited with {proc.returncode}:\n{_log_tail(log)}")
            try:
                if requests.get(srv.url + "/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /info/ within {START_TIMEOUT_S} s:\n{_log_tail(log)}")
            time.sleep(1)
        yield srv
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass


def test_info_lists_the_bundle_from_the_local_folder(server):
    info = server.request("GET", "/info/").json()
    assert MODEL in info["models"] and MODEL in info["trainers"]
    model = info["models"][MODEL]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["version"] == json.loads((server.bundle / "configs" / "metadata.json").read_text())["version"]
    log = server.log.read_text(errors="replace")
    assert f"Adding Bundle from Local: {MODEL}" in log  # the local copy, no zoo download
    assert "Adding Bundle from NGC" not in log


def test_the_server_needs_no_network(server):
    """scripts/run_tests.sh runs this module in a network namespace with only loopback (SPOCO_OFFLINE=1): every
    test here then shows that no step of MONAI Label or the bundle needs the network (no zoo look-up, no download)."""
    if os.environ.get("SPOCO_OFFLINE") != "1":
        pytest.skip("not run in a private network namespace (scripts/run_tests.sh does that where the machine allows)")
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
    assert server.request("GET", "/info/").status_code == 200


@pytest.mark.parametrize("image_id", [NIFTI_IDS[0], TIFF_ID])
def test_infer_returns_an_instance_volume_of_the_image_shape(server, image_id, tmp_path):
    r, out = server.infer(image_id, tmp_path)
    assert r.status_code == 200, r.text
    labels = read_result(out)
    assert labels.shape == SHAPE
    assert np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0
    np.testing.assert_array_equal(labels, cli_segmentation(server.bundle, server.images[image_id], tmp_path))


def _log_size(server) -> int:
    return server.log.stat().st_size


def _log_since(server, offset: int) -> str:
    time.sleep(0.5)  # the server writes its log lines after sending the response
    with open(server.log, "rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def test_bad_inputs_get_clear_http_errors_and_the_server_keeps_serving(server, tmp_path):
    start = _log_size(server)
    cases = {
        "no_such_image": (404, "image 'no_such_image' is not in the datastore"),
        "corrupt_000": (422, "Cannot read NIfTI file"),
        "flat_000": (422, "image has 2 dimension(s) (64, 48), but spatial_dims=3 needs 3D"),
    }
    for image_id, (status, message) in cases.items():
        r, _ = server.infer(image_id, tmp_path)
        assert r.status_code == status, (image_id, r.status_code, r.text)
        assert message in r.json()["detail"], (image_id, r.text)
    r = server.request("POST", "/infer/no_such_model", params={"image": NIFTI_IDS[0]})
    assert r.status_code == 400 and "no_such_model" in r.json()["detail"]
    log = _log_since(server, start)
    assert "-> HTTP 422" in log and "Traceback" not in log, log  # a client error is one line, not a traceback
    r, out = server.infer(NIFTI_IDS[1], tmp_path)
    assert r.status_code == 200 and read_result(out).shape == SHAPE


def test_only_studies_of_the_datastore_are_segmented(server, tmp_path):
    """Any other server path is refused like an unknown id (same status and message: whether a path exists is not
    revealed), before it is read; a study given by its path inside the studies folder is still served."""
    outside = tmp_path / "outside_000.nii.gz"  # a readable image, outside the studies folder
    shutil.copy(server.images[NIFTI_IDS[0]], outside)
    start = _log_size(server)
    refused = [
        str(outside),
        os.path.relpath(outside, server.root),  # relative to the server's working folder
        str(server.studies / ".." / "syn_nii" / "imagesTr" / "nuclei_000.nii.gz"),  # .. out of the studies folder
        "../../etc/passwd",
        "/etc/passwd",
        "no_such_image",
        str(server.studies / "no_such_image.nii.gz"),
    ]
    for image in refused:
        r, _ = server.infer(image, tmp_path)
        assert r.status_code == 404, (image, r.status_code, r.text)
        assert f"image '{image}' is not in the datastore" in r.json()["detail"], (image, r.text)
    # MONAI Label lets params["image"] replace ?image=
    r = server.request(
        "POST",
        f"/infer/{MODEL}",
        params={"image": NIFTI_IDS[0], "output": "image"},
        files={"params": (None, json.dumps({"image": str(outside)}))},
    )
    assert r.status_code == 404 and f"image '{outside}' is not in the datastore" in r.json()["detail"], r.text
    r = server.request("POST", f"/infer/{MODEL}", params={"image": NIFTI_IDS[0], "session_id": "no_such_session"})
    assert r.status_code == 404 and "session 'no_such_session' does not exist" in r.json()["detail"], r.text
    for params in ({}, {"image": ""}):  # no image at all
        r = server.request("POST", f"/infer/{MODEL}", params=params)
        assert r.status_code == 422 and "no image given" in r.json()["detail"], (params, r.status_code, r.text)
    log = _log_since(server, start)
    assert "Traceback" not in log, log
    assert log.count("-> HTTP 404") == len(refused) + 2 and log.count("-> HTTP 422") == 2, log
    study = server.studies / f"{NIFTI_IDS[1]}.nii.gz"  # a study by its path
    r = server.request("POST", f"/infer/{MODEL}", params={"image": str(study), "output": "image"})
    assert r.status_code == 200, r.text
    (tmp_path / "study_result.nii.gz").write_bytes(r.content)
    assert read_result(tmp_path / "study_result.nii.gz").shape == SHAPE
    with open(outside, "rb") as fh:  # an image the client uploads is its own: still segmented
        r = server.request("POST", f"/infer/{MODEL}", params={"output": "image"}, files={"file": ("upload.nii.gz", fh)})
    assert r.status_code == 200, r.text
    (tmp_path / "upload_result.nii.gz").write_bytes(r.content)
    assert read_result(tmp_path / "upload_result.nii.gz").shape == SHAPE


def test_train_from_sparse_labels_then_infer_with_the_new_weights(server, tmp_path):
    model_pt = server.bundle / "models" / "model.pt"
    before = hashlib.sha256(model_pt.read_bytes()).hexdigest()
    untrained = cli_segmentation(server.bundle, server.images[NIFTI_IDS[2]], tmp_path / "before")
    for image_id in LABELLED:  # what a client's "Submit Label" sends
        with open(server.sparse[image_id], "rb") as fh:
            r = server.request(
                "PUT", "/datastore/label", params={"image": image_id, "tag": "final"}, files={"label": fh}
            )
        assert r.status_code == 200, r.text
    stats = server.request("GET", "/datastore/", params={"output": "stats"}).json()
    assert stats["label_tags"] == {"final": len(LABELLED)}

    r = server.request("POST", f"/train/{MODEL}", json={"max_epochs": EPOCHS, "device": "cpu"})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while True:
        status = server.request("GET", "/train/").json()
        if status["status"] in ("DONE", "ERROR"):
            break
        assert time.monotonic() < deadline, f"training did not finish in {TRAIN_TIMEOUT_S} s: {status}"
        time.sleep(3)
    assert status["status"] == "DONE", "\n".join(status.get("details", [])) + "\n" + _log_tail(server.log)

    assert hashlib.sha256(model_pt.read_bytes()).hexdigest() != before
    resume = torch.load(server.bundle / "models" / "resume.pt", map_location="cpu", weights_only=True)
    assert resume["trainer"]["iteration"] == EPOCHS * EPOCH_LENGTH  # max_epochs epochs of the copy's epoch_length
    load_strict(server.bundle)  # the new model.pt is the plain student state dict of network_def
    trained = cli_segmentation(server.bundle, server.images[NIFTI_IDS[2]], tmp_path / "after")
    assert trained.max() >= 1, "the model trained for two epochs (4 iterations) finds no object"
    assert not np.array_equal(trained, untrained), "training did not change the segmentation"
    for image_id in (NIFTI_IDS[2], TIFF_ID):
        r, out = server.infer(image_id, tmp_path)
        assert r.status_code == 200, r.text
        reference = (
            trained
            if image_id == NIFTI_IDS[2]
            else cli_segmentation(server.bundle, server.images[image_id], tmp_path / "after")
        )
        assert reference.max() >= 1, f"no object in {image_id}: the comparison would not test the axis order"
        np.testing.assert_array_equal(read_result(out), reference)  # the server uses the new weights


def test_the_uncertain_strategy_serves_the_least_sure_unlabeled_study(server, tmp_path):
    """``<model>_uncertain`` (after the training above: two studies are labelled): every unlabeled study that can be
    segmented is scored with the current weights, the one with the highest score is served with its most unsure
    objects, its ``spoco_suggestions`` label holds those objects by rank, and labelled studies are never served."""
    strategy = f"{MODEL}_uncertain"
    assert strategy in server.request("GET", "/info/").json()["strategies"]
    r = server.request("POST", f"/activelearning/{strategy}")
    assert r.status_code == 200, r.text
    served = r.json()
    assert served["id"] not in LABELLED and served["id"] in (NIFTI_IDS[2], TIFF_ID), served

    infos = {}
    for image_id in (NIFTI_IDS[2], TIFF_ID, "corrupt_000", "flat_000", *LABELLED):
        r = server.request("GET", "/datastore/image/info", params={"image": image_id})
        assert r.status_code == 200, r.text
        infos[image_id] = r.json().get("spoco_uncertainty")
    assert all(infos[i] is None for i in LABELLED)  # labelled studies are not scored
    assert "error" in infos["corrupt_000"] and "error" in infos["flat_000"]  # bad studies are kept out, not fatal
    scored = {i: infos[i] for i in (NIFTI_IDS[2], TIFF_ID)}
    assert served["id"] == max(scored, key=lambda i: scored[i]["score"])
    assert served["spoco_uncertainty"]["score"] == scored[served["id"]]["score"]  # the client gets the objects too
    objects = served["spoco_uncertainty"]["objects"]
    assert 1 <= len(objects) <= 10 and [o["rank"] for o in objects] == list(range(1, len(objects) + 1))
    assert [o["score"] for o in objects] == sorted((o["score"] for o in objects), reverse=True)

    # the label the client can show: the served study's segmentation, its most unsure objects by rank
    r = server.request("GET", "/datastore/label", params={"label": served["id"], "tag": "spoco_suggestions"})
    assert r.status_code == 200, r.text
    ext = ".tif" if served["id"] == TIFF_ID else ".nii.gz"
    (tmp_path / f"suggestions{ext}").write_bytes(r.content)
    ranks = read_result(str(tmp_path / f"suggestions{ext}"))
    assert ranks.shape == SHAPE and set(np.unique(ranks)) == {0, *range(1, len(objects) + 1)}
    # the strategy runs the bundle's own inference workflow in-process: its defaults, precision auto included
    segmentation = cli_segmentation(server.bundle, server.images[served["id"]], tmp_path / "cli", precision="auto")
    for o in objects:  # each ranked region is exactly the object of the command line's segmentation
        np.testing.assert_array_equal(ranks == o["rank"], segmentation == o["id"])

    # the scores are kept: asking again serves from them, the stored scores unchanged
    again = server.request("POST", f"/activelearning/{strategy}").json()
    assert again["spoco_uncertainty"] == served["spoco_uncertainty"]
    stats = server.request("GET", "/datastore/", params={"output": "stats"}).json()
    assert stats["label_tags"]["final"] == len(LABELLED)  # the suggestions label is no annotation


def test_a_mismatched_checkpoint_is_an_error_not_random_weights(server, tmp_path):
    model_pt = server.bundle / "models" / "model.pt"
    good = model_pt.read_bytes()
    try:
        state = torch.load(model_pt, weights_only=True)
        torch.save({f"module.{k}": v for k, v in state.items()}, model_pt)  # e.g. saved from a DDP wrapper
        r, _ = server.infer(NIFTI_IDS[0], tmp_path)
        assert r.status_code == 500
        assert "does not match EmbeddingUNet" in r.json()["detail"], r.text
    finally:
        model_pt.write_bytes(good)
    r, out = server.infer(NIFTI_IDS[0], tmp_path)  # the restored weights are picked up again
    assert r.status_code == 200 and read_result(out).shape == SHAPE
