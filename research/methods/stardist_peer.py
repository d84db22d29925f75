"""
StarDist peer of the accuracy benchmark: StarDist2D / StarDist3D (stardist 0.9.2, TensorFlow CPU) trained from
scratch on the same sparse labels as every other method. StarDist has no notion of "unlabeled": the objects that
were not kept are background to it (the handicap SPOCO removes).

It runs in its own environment ``.venv-bench`` (``bash research/setup_benchmark.sh``; another interpreter with the
benchmark's ``--stardist_python``), as a subprocess: :func:`fit_predict` (benchmark side, project ``.venv``) writes
the raw training images, their sparse labels and the test images to a temporary folder, runs this file with ``--worker``
there, and reads the predictions back. The worker imports only numpy, TensorFlow and StarDist (``.venv-bench`` does
not install this repository); run by path, its folder comes first on the worker's ``sys.path``, which is why this
module is not called ``stardist``: it would shadow the package.

Training (worker):

- images normalised to their 1-99.8 percentiles (csbdeep ``normalize``), augmentation: random flips, 90-degree
  rotations in the YX plane and intensity scale/shift (the StarDist example notebooks' augmenter);
- 2D: ``Config2D(n_rays=32, grid=(2, 2), train_patch_size=(128, 128), train_batch_size=4)`` (the DSB2018 example's
  configuration with half the patch side, see ``PATCH_2D``); 10 % of the training images (at least 1, fixed by
  ``seed``) are held out as StarDist's validation set (learning-rate schedule and threshold optimisation), as in
  StarDist's own examples;
- images (and sparse labels, nearest neighbour) resampled by the data set's SPOCO ``image_scale``
  (:func:`research.methods.spoco.settings_for`; 1 for every data set today), predictions resized back to
  the test image's grid, so both learners see objects of the same size;
- 3D: ``Config3D`` with 96 rays on a golden spiral, anisotropy from the (sparse) training labels' extents, grid
  ``(1, 2, 2)`` where z is coarser, ``train_patch_size=(48, 96, 96)``, ``train_batch_size=2`` (the 3D example's
  configuration); only one training volume exists, so it is also the validation volume;
- training stops when its time reaches ``budget_s`` (wall or process CPU time, the run's ``clock``; a Keras
  callback checks after every step); the validation loss is computed every ``STEPS_PER_EPOCH`` steps (inside the
  budget) and, as StarDist does by default when it has a model folder, the weights with the lowest validation loss
  are the ones used (``weights_best.h5``; with a constant learning rate the last weights are a noisy iterate: two
  900 CPU-s runs that used them gave AP50 0.72 and 0.53 with all DSB2018 labels); then
  ``optimize_thresholds`` on the validation images (their sparse labels: training data only) and prediction of the
  test images. The threshold optimisation and prediction are not part of the budget (reported separately).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the worker runs in .venv-bench, which has neither this repository nor its packages
    from research.settings import RunSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 50  # validation (on the held-out images) after every 50 steps
VAL_FRACTION = 0.1
# 2D patch: the DSB example uses 256; 128 is 4x cheaper per step (0.96 vs 3.8 CPU s per step of 4 patches on one
# thread of the benchmark machine) and still holds many ~8 px-radius nuclei, so a CPU budget buys 4x more steps.
PATCH_2D = 128


def bench_python(path: str | os.PathLike | None = None) -> Path:
    """The interpreter of the StarDist environment: ``path`` when given, else ``.venv-bench/bin/python``."""
    return Path(path) if path else REPO_ROOT / ".venv-bench" / "bin" / "python"


def available(settings: RunSettings) -> tuple[bool, str]:
    """(usable, reason if not): whether the StarDist interpreter of ``settings`` (:func:`bench_python`) exists."""
    py = bench_python(settings.stardist_python)
    if not (py.is_file() and os.access(py, os.X_OK)):
        return False, f"{py} not found: run `bash research/setup_benchmark.sh` to install StarDist + TensorFlow CPU"
    return True, ""


def _rescale(array: np.ndarray, scale: float, order: int) -> np.ndarray:
    """``array`` resampled by ``scale`` per axis (``order`` 1: images, 0: labels); unchanged at scale 1."""
    if scale == 1.0:
        return array
    from scipy import ndimage as ndi

    return ndi.zoom(array, scale, order=order, mode="nearest", grid_mode=True)


def _resize_labels(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``shape`` (predictions back to the test image's grid)."""
    if labels.shape == tuple(shape):
        return labels
    from scipy import ndimage as ndi

    factors = [t / s for t, s in zip(shape, labels.shape)]
    out = ndi.zoom(labels, factors, order=0, mode="nearest", grid_mode=True)
    if out.shape != tuple(shape):  # zoom rounds the output size: pad / crop the last pixel
        out = np.pad(out, [(0, max(t - o, 0)) for t, o in zip(shape, out.shape)], mode="edge")
        out = out[tuple(slice(0, t) for t in shape)]
    return out


def fit_predict(split: Any, ratio: float, run: RunSettings) -> Any:
    """
    Train StarDist on ``split``'s training images with the sparse labels of ``ratio`` / ``run.seed`` for
    ``run.budget_s`` seconds (on ``run.clock``, ``run.threads`` threads) and predict its test images (see the module
    docstring).

    Args:
        split: :class:`research.data.Split`.
        ratio: fraction of objects kept per training image.
        run: :class:`research.settings.RunSettings`; ``seed`` also seeds TensorFlow, numpy and the validation
            hold-out; only the ``cpu`` device is supported (tensorflow-cpu), another is recorded and ignored.
    """
    from research.data import MethodUnavailable, Result, sparsify
    from research.methods.spoco import settings_for
    from research.settings import run_timeout, thread_env

    ok, reason = available(run)
    if not ok:
        raise MethodUnavailable(reason)
    threads, seed, budget_s = run.threads, run.seed, run.budget_s
    scale = float(settings_for(split)["image_scale"])  # the image scale SPOCO gets on this data set, for a fair match
    with tempfile.TemporaryDirectory(prefix="stardist_peer_") as tmp:
        arrays: dict[str, np.ndarray] = {}
        for i, item in enumerate(split.train):
            arrays[f"x_train_{i}"] = _rescale(item.image.astype(np.float32), scale, order=1)
            sparse = _rescale(sparsify(item, ratio, seed), scale, order=0)
            arrays[f"y_train_{i}"] = sparse.astype(np.uint16 if sparse.max() < 65536 else np.uint32)
        for i, item in enumerate(split.test):
            arrays[f"x_test_{i}"] = _rescale(item.image.astype(np.float32), scale, order=1)
        np.savez(os.path.join(tmp, "input.npz"), **arrays)
        config = {
            "spatial_dims": split.spatial_dims,
            "n_train": len(split.train),
            "n_test": len(split.test),
            "budget_s": float(budget_s),
            "seed": int(seed),
            "threads": threads,
            "clock": run.clock,
            "spacing": list(split.train[0].spacing) if split.train[0].spacing else None,
        }
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f)
        env = {
            **os.environ,
            **thread_env(threads),
            "TF_NUM_INTRAOP_THREADS": str(threads),
            "TF_NUM_INTEROP_THREADS": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "CUDA_VISIBLE_DEVICES": "",
        }
        env.pop("PYTHONPATH", None)  # the worker must not see the project's .venv packages
        # the whole run's limit, less a margin: this one fires first, so the TensorFlow worker is not orphaned
        timeout = run_timeout(budget_s, run.clock, run.timeout_s)
        timeout = None if timeout is None else max(timeout - 300, float(budget_s))
        proc = subprocess.run(
            [str(bench_python(run.stardist_python)), os.path.abspath(__file__), "--worker", tmp],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"StarDist worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(os.path.join(tmp, "result.json")) as f:
            result = json.load(f)
        with np.load(os.path.join(tmp, "output.npz")) as out:
            predictions = [
                _resize_labels(out[f"pred_{i}"].astype(np.int32), item.image.shape) for i, item in enumerate(split.test)
            ]
    result["device_requested"] = run.device
    result["image_scale"] = scale
    result["log_tail"] = proc.stdout[-2000:]
    return Result(
        predictions=predictions,
        train_seconds=float(result.pop("train_seconds")),
        iterations=int(result.pop("steps")),
        info=result,
    )


# ------------------------------------------------------------------------------------------------ worker


def _augmenter(spatial_dims: int, rng: np.random.Generator):
    """Random flips and 90-degree rotations in YX (never mixing z in 3D) and intensity scale/shift."""

    def augment(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        yx = (x.ndim - 2, x.ndim - 1)
        k = int(rng.integers(4))
        x, y = np.rot90(x, k, axes=yx), np.rot90(y, k, axes=yx)
        for ax in range(x.ndim):
            if rng.random() < 0.5:
                x, y = np.flip(x, ax), np.flip(y, ax)
        x = x * rng.uniform(0.6, 2.0) + rng.uniform(-0.2, 0.2)
        return np.ascontiguousarray(x), np.ascontiguousarray(y)

    return augment


def _worker(folder: str) -> None:
    import tensorflow as tf

    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    threads = int(cfg["threads"])
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.keras.utils.set_random_seed(int(cfg["seed"]))

    from csbdeep.utils import normalize
    from stardist import calculate_extents, fill_label_holes

    data = np.load(os.path.join(folder, "input.npz"))
    x_train = [normalize(data[f"x_train_{i}"], 1, 99.8) for i in range(cfg["n_train"])]
    y_train = [fill_label_holes(data[f"y_train_{i}"]) for i in range(cfg["n_train"])]
    x_test = [normalize(data[f"x_test_{i}"], 1, 99.8) for i in range(cfg["n_test"])]
    rng = np.random.default_rng(int(cfg["seed"]))
    ndim = int(cfg["spatial_dims"])
    info: dict[str, Any] = {"tensorflow": tf.__version__, "threads": threads, "budget_clock": cfg["clock"]}

    if ndim == 2:
        from stardist.models import Config2D, StarDist2D

        order = rng.permutation(len(x_train))
        n_val = max(1, int(round(VAL_FRACTION * len(x_train))))
        val = sorted(order[:n_val])
        trn = sorted(order[n_val:]) if len(x_train) > 1 else val
        patch = tuple(min(PATCH_2D, s - s % 16) for s in x_train[0].shape)
        conf = Config2D(
            n_rays=32,
            grid=(2, 2),
            n_channel_in=1,
            train_patch_size=patch,
            train_batch_size=4,
            train_tensorboard=False,
            use_gpu=False,
        )
        model = StarDist2D(conf, name="stardist", basedir=folder)
    else:
        from stardist import Rays_GoldenSpiral
        from stardist.models import Config3D, StarDist3D

        extents = calculate_extents(y_train)
        anisotropy = tuple(float(a) for a in np.max(extents) / extents)
        grid = tuple(1 if a > 1.5 else 2 for a in anisotropy)
        rays = Rays_GoldenSpiral(96, anisotropy=anisotropy)
        shape = x_train[0].shape
        patch = tuple(min(p, s - s % 8) for p, s in zip((48, 96, 96), shape))
        conf = Config3D(
            rays=rays,
            grid=grid,
            anisotropy=anisotropy,
            n_channel_in=1,
            train_patch_size=patch,
            train_batch_size=2,
            train_tensorboard=False,
            use_gpu=False,
        )
        model = StarDist3D(conf, name="stardist", basedir=folder)
        val = trn = list(range(len(x_train)))  # a single training volume: it is also the validation volume
        info.update(anisotropy=anisotropy, grid=grid)

    class TimeLimit(tf.keras.callbacks.Callback):
        """Stop training once the loop's wall time reaches the budget; count the steps."""

        def __init__(self, budget_s: float, clock: str) -> None:
            super().__init__()
            self.budget_s = budget_s
            self.now = time.process_time if clock == "cpu" else time.perf_counter
            self.steps = 0
            self.t0 = self.now()

        def on_train_begin(self, logs=None):
            self.t0 = self.now()

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            if self.now() - self.t0 >= self.budget_s:
                self.model.stop_training = True

    model.prepare_for_training()
    limit = TimeLimit(float(cfg["budget_s"]), cfg["clock"])
    model.callbacks.append(limit)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    model.train(
        [x_train[i] for i in trn],
        [y_train[i] for i in trn],
        validation_data=([x_train[i] for i in val], [y_train[i] for i in val]),
        augmenter=_augmenter(ndim, rng),
        epochs=100000,
        steps_per_epoch=STEPS_PER_EPOCH,
    )
    train_seconds, train_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    t = time.perf_counter()
    thresholds = model.optimize_thresholds([x_train[i] for i in val], [y_train[i] for i in val], save_to_json=False)
    thresholds_seconds = time.perf_counter() - t
    t = time.perf_counter()
    preds = {}
    for i, x in enumerate(x_test):
        labels, _ = model.predict_instances(x, n_tiles=model._guess_n_tiles(x), show_tile_progress=False)
        preds[f"pred_{i}"] = labels.astype(np.int32)
    predict_seconds = time.perf_counter() - t
    np.savez_compressed(os.path.join(folder, "output.npz"), **preds)
    info.update(
        train_seconds=train_seconds,
        train_cpu_seconds=train_cpu,
        steps=limit.steps,
        weights="lowest validation loss (weights_best.h5)",
        thresholds=thresholds,
        thresholds_seconds=thresholds_seconds,
        predict_seconds=predict_seconds,
        n_train_images=len(trn),
        n_val_images=len(val),
        config={
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in vars(conf).items()
            if isinstance(v, (int, float, str, bool, tuple, list, type(None)))
        },
    )
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump(info, f, default=str)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        print("usage: stardist_peer.py --worker FOLDER (started by research/methods/stardist_peer.py:fit_predict)")
        sys.exit(2)
