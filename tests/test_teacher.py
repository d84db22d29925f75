"""Momentum teacher: EMA with m = 0.999, sync on a fresh start, no gradients into the teacher."""

import copy
import math
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver
from monai.transforms import Compose, RandGaussianNoised

from spoco_bundle.handlers import (
    UNLIMITED_EPOCHS,
    BestCheckpointState,
    ForegroundCalibration,
    ForegroundRegimeHandler,
    LossTermsLogger,
    LossWeightWarmup,
    MomentumTeacherHandler,
    ResumeCheckpointLoader,
    ResumeCheckpointSaver,
    TrainingLengthLogger,
    TrainingTimeLimit,
    ValidateOnTerminate,
    lee_liu_threshold,
    resume_state,
)
from spoco_bundle.inferers import TwoViewInferer
from spoco_bundle.losses import ForegroundLoss, LossStatistics, SpocoLoss
from spoco_bundle.networks import EmbeddingUNet, make_teacher
from spoco_bundle.training_set import TrainingSet

STROKES = 65535  # a background_label other than 0: the annotated background is a few painted strokes


def _nets():
    torch.manual_seed(0)
    student = EmbeddingUNet(spatial_dims=2, embedding_dim=4, features=(8, 16, 16))
    teacher = make_teacher(student)
    return student, teacher


def test_ema_update_follows_momentum():
    student, teacher = _nets()
    with torch.no_grad():  # make the two differ
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    g0 = {n: p.detach().double().clone() for n, p in teacher.named_parameters()}
    f = {n: p.detach().double().clone() for n, p in student.named_parameters()}
    handler = MomentumTeacherHandler(teacher, student, momentum=0.999)
    handler()
    for n, p in teacher.named_parameters():
        expected = 0.999 * g0[n] + 0.001 * f[n]
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-6)
    # many steps with a fixed student: g_t - f = m^t (g_0 - f)
    for _ in range(99):
        handler()
    for n, p in teacher.named_parameters():
        expected = f[n] + 0.999**100 * (g0[n] - f[n])
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-5)


def test_sync_on_fresh_start_only():
    student, teacher = _nets()
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(7.0)
    engine = Engine(lambda e, b: None)
    engine.network = student
    MomentumTeacherHandler(teacher, momentum=0.999).attach(engine)
    seen = {}
    engine.add_event_handler(
        Events.ITERATION_STARTED(once=1), lambda e: seen.update({n: p.clone() for n, p in teacher.named_parameters()})
    )
    engine.run([0, 1], max_epochs=1)
    for n, p in student.named_parameters():  # synced at start, then EMA of an unchanged student = student
        assert torch.equal(seen[n], p.detach())
        torch.testing.assert_close(dict(teacher.named_parameters())[n], p.detach())

    # resuming (iteration > 0): the loaded teacher is kept
    student2, teacher2 = _nets()
    with torch.no_grad():
        for p in teacher2.parameters():
            p.fill_(7.0)
    engine2 = Engine(lambda e, b: None)
    engine2.network = student2
    MomentumTeacherHandler(teacher2, momentum=1.0).attach(engine2)
    engine2.state.iteration, engine2.state.epoch, engine2.state.epoch_length, engine2.state.max_epochs = 2, 1, 2, 2
    engine2.run([0, 1], max_epochs=2)
    assert all(torch.all(p == 7.0) for p in teacher2.parameters())


def test_gradients_reach_student_not_teacher():
    student, teacher = _nets()
    inferer = TwoViewInferer(teacher)
    x = torch.randn(2, 1, 32, 32)
    x_g = x + 0.1 * torch.randn_like(x)
    s, t = inferer(x, student, x_g)
    assert s.requires_grad and not t.requires_grad
    (s * t).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # student-only call (no second view) returns a single tensor
    assert isinstance(inferer(x, student), torch.Tensor)


def test_metatensor_batches_reach_the_networks_as_plain_tensors():
    # the training DataLoader collates MetaTensors; their per-operation dispatch is what the inferer strips (the
    # networks must see plain tensors, and the outputs must be those of the same data as plain tensors)
    from monai.data import MetaTensor

    student, teacher = _nets()
    seen = []
    hooks = [n.register_forward_pre_hook(lambda m, args: seen.append(type(args[0]))) for n in (student, teacher)]
    inferer = TwoViewInferer(teacher)
    x = torch.randn(2, 1, 32, 32)
    x_g = x + 0.1 * torch.randn_like(x)
    s, t = inferer(MetaTensor(x, meta={"filename_or_obj": "a.tif"}), student, MetaTensor(x_g))
    for h in hooks:
        h.remove()
    assert seen == [torch.Tensor, torch.Tensor]
    assert type(s) is torch.Tensor and type(t) is torch.Tensor and s.requires_grad
    s_plain, t_plain = inferer(x, student, x_g)
    assert torch.equal(s, s_plain) and torch.equal(t, t_plain)


def test_teacher_lags_student_during_training():
    student, teacher = _nets()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    handler = MomentumTeacherHandler(teacher, student, momentum=0.999)
    start = copy.deepcopy(student.state_dict())
    x = torch.randn(2, 1, 32, 32)
    for _ in range(3):
        opt.zero_grad()
        student(x).pow(2).mean().backward()
        opt.step()
        handler()
    moved_s = sum((p - start[n]).abs().sum() for n, p in student.named_parameters())
    moved_t = sum((p - start[n]).abs().sum() for n, p in teacher.named_parameters())
    assert 0 < moved_t < 0.01 * moved_s


def test_foreground_calibration_handler_tracks_label_frequency():
    # the handler averages sigmoid(fg logit) over annotated voxels of images without annotated background, as
    # measured by the loss in the iteration
    net = EmbeddingUNet(spatial_dims=2, embedding_dim=2, features=(8, 8, 8))
    loss = SpocoLoss(embedding_dim=2, foreground=ForegroundLoss(positive_weight=4.0))
    label = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    label[0, 0, :2] = 1  # image 0: 8 annotated voxels, no annotated background -> counts
    label[1, 0, 0] = -1  # image 1: annotated background -> left out, whatever its logits
    label[1, 0, 1] = 2
    probs = [0.2, 0.4, 0.3]

    def step(engine, _):
        pred = torch.full((2, 3, 4, 4), 7.0)
        p = probs[engine.state.iteration - 1]
        pred[0, 2] = math.log(p / (1 - p)) + math.log(4.0)  # a head trained with weight 4 has 4 times the odds
        return {"loss": loss(pred, label).item()}

    engine = Engine(step)
    engine.network = net
    engine.loss_function = loss
    ForegroundCalibration("label_frequency", momentum=0.5).attach(engine)
    seen = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(float(net.fg_label_frequency)))
    engine.run(range(3), max_epochs=1)
    # bias-corrected EMA with momentum 0.5: weights 1; 1, 2 (normalised); 1, 2, 4
    expected = [0.2, (0.2 + 2 * 0.4) / 3, (0.2 + 2 * 0.4 + 4 * 0.3) / 7]
    assert seen == [pytest.approx(v, rel=1e-6) for v in expected]
    assert float(net.fg_positive_weight) == 4.0  # the loss's weight, for the network to undo at inference


def test_foreground_calibration_auto_follows_the_ring():
    # "auto": Lee & Liu on the training images for a ring head, the label frequency otherwise; a ring "auto" is off
    # until training sets it, and the method follows whenever it is set. A method given is never changed
    loss = SpocoLoss(foreground=ForegroundLoss(ring="auto", background_label=STROKES))
    auto = ForegroundCalibration("auto", loss=loss)
    assert auto.method_in_use() == "label_frequency"
    loss.foreground.set_ring((1, 2, 2))
    assert auto.method_in_use() == "lee_liu_images"
    loss.foreground.set_ring(0)
    assert auto.method_in_use() == "label_frequency"
    ring = SpocoLoss(foreground=ForegroundLoss(ring=2))
    assert ForegroundCalibration("auto").method_in_use(ring) == "lee_liu_images"
    fixed = ForegroundCalibration("label_frequency", loss=loss)
    loss.foreground.set_ring(2)
    assert fixed.method_in_use() == "label_frequency" and auto.method_in_use() == "lee_liu_images"
    assert ForegroundCalibration("lee_liu_images").method_in_use(SpocoLoss()) == "lee_liu_images"


def _logit_hist(values) -> np.ndarray:
    from spoco_bundle.losses import LOGIT_BINS, LOGIT_RANGE

    return np.histogram(np.clip(values, -LOGIT_RANGE, LOGIT_RANGE), LOGIT_BINS, (-LOGIT_RANGE, LOGIT_RANGE))[0]


def test_lee_liu_threshold_maximises_precision_times_recall():
    # head logits: foreground N(1, 1), background N(-3, 1), 1 : 4; a tenth of the foreground annotated. The criterion
    # r^2 / P(g > t) = precision * recall / P(fg) for annotated voxels drawn at random, so its threshold is where the
    # product of the (unknown) precision and recall peaks, without the label frequency
    rng = np.random.default_rng(0)
    fg, bg = rng.normal(1.0, 1.0, 20000), rng.normal(-3.0, 1.0, 80000)
    t = lee_liu_threshold(_logit_hist(fg[:2000]), _logit_hist(np.concatenate([fg, bg])))
    grid = np.linspace(-4, 3, 71)
    pr = [((fg > x).sum() / max((fg > x).sum() + (bg > x).sum(), 1)) * (fg > x).mean() for x in grid]
    assert math.log(t / (1 - t)) == pytest.approx(grid[int(np.argmax(pr))], abs=0.25)
    # a label frequency of 0.1 does not move it: the same threshold from a fifth of those annotated voxels
    t_fewer = lee_liu_threshold(_logit_hist(fg[:400]), _logit_hist(np.concatenate([fg, bg])))
    assert math.log(t_fewer / (1 - t_fewer)) == pytest.approx(math.log(t / (1 - t)), abs=0.3)
    assert lee_liu_threshold(np.zeros(240), _logit_hist(bg)) == 0.5  # nothing annotated: no decision
    with pytest.raises(ValueError, match="histograms"):
        lee_liu_threshold(np.zeros(3), np.zeros(4))


def _pass_data(n: int = 3) -> list[dict]:
    """Images with a bright top-left square object (annotated, id 1) and a bright bottom-right one (unlabeled)."""
    gen = torch.Generator().manual_seed(1)
    items = []
    for _ in range(n):
        image = 0.1 * torch.rand(1, 32, 32, generator=gen)
        image[0, 4:12, 4:12] += 1.0
        image[0, 20:28, 20:28] += 1.0
        label = torch.zeros(1, 32, 32, dtype=torch.long)
        label[0, 4:12, 4:12] = 1
        items.append({"image": image, "label": label})
    return items


def _head_logits(net: EmbeddingUNet, images: list[torch.Tensor]) -> list[np.ndarray]:
    # log(g / (1 - g)) of the head: the eval-mode output of a copy calibrated at c = 1, weighting undone
    ref = copy.deepcopy(net).eval()
    ref.fg_label_frequency.fill_(1.0)
    with torch.no_grad():
        return [ref(im[None])[0, -1].numpy() for im in images]


def test_foreground_threshold_pass_sets_c_from_whole_training_images():
    from monai.inferers import SimpleInferer

    torch.manual_seed(0)
    net = EmbeddingUNet(spatial_dims=2, embedding_dim=2, features=(8, 8, 8))
    net.fg_positive_weight.fill_(4.0)
    net.fg_label_frequency.fill_(0.7)  # what training left: replaced
    state = {k: v.clone() for k, v in net.state_dict().items()}
    data = _pass_data()
    loss = SpocoLoss(embedding_dim=2, foreground=ForegroundLoss(positive_weight=4.0))
    trainer = Engine(lambda e, b: None)
    trainer.network, trainer.loss_function = net, loss
    # the pass loads each item with the training preprocessing up to its first random transform: not the noise
    preprocessing = Compose([RandGaussianNoised("image", prob=1.0, std=1.0)])
    handler = ForegroundCalibration("lee_liu_images", data, preprocessing, SimpleInferer())
    handler.attach(trainer)
    net.train()
    trainer.run(range(1), max_epochs=1)  # runs at COMPLETED (no evaluator)
    logits = _head_logits(net, [d["image"] for d in data])
    annotated = sum(_logit_hist(lg[d["label"][0].numpy() > 0]) for lg, d in zip(logits, data))
    everything = sum(_logit_hist(lg.ravel()) for lg in logits)
    t = lee_liu_threshold(annotated, everything)
    assert handler.threshold == pytest.approx(t) and float(net.fg_label_frequency) == pytest.approx(2 * t)
    assert net.training  # the pass left the network's mode as it found it, and its weights alone
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items() if k != "fg_label_frequency")
    # the network's calibrated 0.5 now sits at g = t
    net.eval()
    with torch.no_grad():
        calibrated = net(data[0]["image"][None])[0, -1].numpy()
    edge = math.log(t / (1 - t))
    away = np.abs(logits[0] - edge) > 1e-3
    assert np.array_equal((calibrated > 0)[away], (logits[0] > edge)[away])


def test_foreground_threshold_pass_budget_strokes_and_evaluator():
    from monai.inferers import SimpleInferer

    torch.manual_seed(0)
    net = EmbeddingUNet(spatial_dims=2, embedding_dim=2, features=(8, 8, 8))
    data = _pass_data(2)
    loss = SpocoLoss(embedding_dim=2)
    seen = []

    def inferer(x, network):
        seen.append(tuple(x.shape[2:]))
        return SimpleInferer()(x, network)

    # max_voxels below one image: a centre crop of the first image in the pass's order, nothing else
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    trainer.network, trainer.loss_function = net, loss
    handler = ForegroundCalibration("lee_liu_images", data, (), inferer, evaluator=evaluator, max_voxels=16 * 16)
    handler.attach(trainer)
    trainer.run(range(1), max_epochs=1)
    assert seen == [] and float(net.fg_label_frequency) == 1.0  # with an evaluator: not at COMPLETED
    evaluator.run(range(1), max_epochs=1)
    assert seen == [(16, 16)] and float(net.fg_label_frequency) == pytest.approx(2 * handler.threshold)
    # annotated background in every image: a supervised head, left as it is
    painted = [{"image": d["image"], "label": torch.where(d["label"] > 0, d["label"], -1)} for d in data]
    net.fg_label_frequency.fill_(0.3)
    supervised = ForegroundCalibration("lee_liu_images", painted, (), SimpleInferer(), network=net, loss=loss)
    supervised.threshold_pass(trainer)
    assert float(net.fg_label_frequency) == pytest.approx(0.3) and supervised.threshold is None
    # ... unless the background is strokes in a positive-unlabeled image
    strokes = SpocoLoss(embedding_dim=2, foreground=ForegroundLoss(background_label=STROKES))
    ForegroundCalibration("lee_liu_images", painted, (), SimpleInferer(), network=net, loss=strokes).threshold_pass(
        trainer
    )
    assert float(net.fg_label_frequency) != pytest.approx(0.3)
    # foreground_calibration "auto": the pass acts only once the loss has a ring (the threshold of a ring head)
    auto = SpocoLoss(embedding_dim=2, foreground=ForegroundLoss(ring="auto"))
    net.fg_label_frequency.fill_(0.3)
    ForegroundCalibration("auto", data, (), SimpleInferer(), network=net, loss=auto).threshold_pass(trainer)
    assert float(net.fg_label_frequency) == pytest.approx(0.3)
    auto.foreground.set_ring(1)
    ForegroundCalibration("auto", data, (), SimpleInferer(), network=net, loss=auto).threshold_pass(trainer)
    assert float(net.fg_label_frequency) != pytest.approx(0.3)
    with pytest.raises(ValueError, match="max_voxels"):
        ForegroundCalibration("lee_liu_images", data, (), SimpleInferer(), max_voxels=0)
    for retired in ("median", "lee_liu"):  # per-patch Lee & Liu is retired: a setting asking for it is refused
        with pytest.raises(ValueError, match="foreground_calibration"):
            ForegroundCalibration(retired)


def test_training_time_limit_stops_and_anneals():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    lrs = []

    def step(engine, _):
        lrs.append(opt.param_groups[0]["lr"])
        time.sleep(0.002)

    # the budget ends the run long before its 5000 iterations (10 s of sleeping)
    engine = Engine(step)
    limit = TrainingTimeLimit(max_seconds=0.2, optimizer=opt)
    limit.attach(engine)
    engine.run(range(5000), max_epochs=1)
    assert 1 < engine.state.iteration < 5000 and limit.elapsed >= 0.2
    assert lrs[0] == pytest.approx(0.1, rel=0.05) and all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.01

    # a budget that is never reached: the cosine follows the iterations, 0.1 * (1 + cos(pi * k / 10)) / 2
    lrs.clear()
    opt.param_groups[0]["lr"] = 0.1
    engine = Engine(step)
    TrainingTimeLimit(max_seconds=1000.0, optimizer=opt).attach(engine)
    engine.run(range(10), max_epochs=1)
    assert engine.state.iteration == 10
    assert lrs == [pytest.approx(0.05 * (1 + math.cos(math.pi * k / 10))) for k in range(10)]


def test_training_time_limit_disabled_and_bad_arguments():
    engine = Engine(lambda e, b: None)
    TrainingTimeLimit(None).attach(engine)  # no budget: attaches nothing
    engine.run(range(3), max_epochs=2)
    assert engine.state.iteration == 6
    with pytest.raises(ValueError, match="clock"):
        TrainingTimeLimit(10, clock="gpu")
    with pytest.raises(ValueError, match="positive"):
        TrainingTimeLimit(0)


def test_validate_on_terminate_scores_the_weights_the_time_limit_stopped_at():
    class Validator:
        def __init__(self):
            self.epochs = []

        def run(self, epoch):
            self.epochs.append(epoch)

    # the budget ends the run in epoch 1 of 1000-iteration epochs, before any epoch-level validation
    engine = Engine(lambda e, b: time.sleep(0.002))
    limit = TrainingTimeLimit(max_seconds=0.05)
    limit.attach(engine)
    assert engine.state.max_epochs == UNLIMITED_EPOCHS  # set by the time limit: the budget alone ends the run
    validator = Validator()
    ValidateOnTerminate(validator, limit.max_seconds).attach(engine)
    engine.run(range(3), epoch_length=1000)
    assert 1 < engine.state.iteration < 1000 and validator.epochs == [1]
    # a run that ends by its epochs is not terminated: the epoch-level validation is all there is
    validator.epochs.clear()
    engine = Engine(lambda e, b: None)
    ValidateOnTerminate(validator, 1000.0).attach(engine)
    engine.run(range(3), max_epochs=2)
    assert validator.epochs == []
    # without a time budget (or without validation) nothing is attached: a run terminated otherwise is not scored
    for validate_on_terminate in (ValidateOnTerminate(validator), ValidateOnTerminate(None, limit.max_seconds)):
        engine = Engine(lambda e, b: None)
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda e: e.terminate())
        validate_on_terminate.attach(engine)
        engine.run(range(3), max_epochs=2)
        assert engine.state.iteration == 2 and validator.epochs == []


def test_training_length_is_logged_once(caplog):
    engine = Engine(lambda e, b: None)
    TrainingLengthLogger().attach(engine)
    with caplog.at_level("INFO", logger="spoco"):
        engine.run(range(5), max_epochs=2, epoch_length=3)
    assert [r.getMessage() for r in caplog.records if r.name == "spoco"] == [
        "training 2 epochs x 3 iterations = 6 iterations"
    ]

    # a run only its budget ends: the budget is logged, and the epochs are counted without "of 1000000000"
    caplog.clear()
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: e.terminate())  # as the budget would
    TrainingLengthLogger(time_limit_s=1800, clock="cpu").attach(engine)
    LossTermsLogger(SpocoLoss()).attach(engine)
    with caplog.at_level("INFO", logger="spoco"):
        engine.run(range(5), max_epochs=UNLIMITED_EPOCHS, epoch_length=2)
    messages = [r.getMessage() for r in caplog.records if r.name == "spoco"]
    assert len(messages) == 2, messages
    assert messages[0].startswith("training until the time limit of 1800 s (cpu) is spent (epochs of 2 iterations")
    assert messages[1].startswith("Epoch 1 loss terms")


def test_the_expected_duration_is_logged_from_the_first_iterations(caplog):
    engine = Engine(lambda e, b: time.sleep(0.05))
    TrainingLengthLogger(measure=4).attach(engine)
    LossTermsLogger(SpocoLoss()).attach(engine)
    with caplog.at_level("INFO", logger="spoco"):
        engine.run(range(5), max_epochs=3, epoch_length=4)
    messages = [r.getMessage() for r in caplog.records if r.name == "spoco"]
    assert messages[0] == "training 3 epochs x 4 iterations = 12 iterations"
    # measured over iterations 2-5 (the first warms up): 7 iterations left, the clock time they end
    (speed,) = [m for m in messages if "per iteration" in m]
    assert re.fullmatch(
        r"0\.0\d s per iteration: 7 more iterations take about 0 s, done about \d\d:\d\d \(validation not counted\)",
        speed,
    ), speed
    # each epoch's line says how long the rest takes, the last epoch's does not
    epochs = [m for m in messages if m.startswith("Epoch ")]
    assert [re.search(r"; about \d+ s left$", m) is not None for m in epochs] == [True, True, False], epochs


def test_loss_weight_warmup_ramps_to_the_loss_weight():
    loss = SpocoLoss(embedding_dim=2, foreground_weight=300.0)
    warmup = LossWeightWarmup(loss, "foreground", start=20.0, iterations=4)
    seen = []
    engine = Engine(lambda e, b: seen.append(loss.weights["foreground"]))
    warmup.attach(engine)
    engine.run(range(3), max_epochs=2)
    # linear from 20 (iteration 1) to 300 (iteration 5), then constant; other terms untouched
    assert seen == pytest.approx([20.0, 90.0, 160.0, 230.0, 300.0, 300.0])
    assert loss.weights["pull"] == 1.0

    # resuming at iteration 2 continues the ramp instead of restarting it
    seen.clear()
    engine = Engine(lambda e, b: seen.append(loss.weights["foreground"]))
    warmup.attach(engine)
    engine.load_state_dict({"iteration": 2, "epoch_length": 2, "max_epochs": 2})  # as CheckpointLoader restores
    engine.run(range(2))
    assert seen == pytest.approx([160.0, 230.0])


def test_loss_weight_warmup_edge_cases():
    # a target below start is not ramped down to; a skipped term (0) stays skipped; 0 iterations: no schedule
    assert LossWeightWarmup(SpocoLoss(foreground_weight=5.0), start=20.0, iterations=10).value(1) == 5.0
    assert LossWeightWarmup(SpocoLoss(foreground_weight=0.0), start=20.0, iterations=10).value(3) == 0.0
    loss = SpocoLoss(foreground_weight=100.0)
    engine = Engine(lambda e, b: None)
    LossWeightWarmup(loss, start=20.0, iterations=0).attach(engine)
    engine.run(range(2), max_epochs=1)
    assert loss.weights["foreground"] == 100.0
    with pytest.raises(ValueError, match="no weight named 'dice'"):
        LossWeightWarmup(loss, "dice")
    with pytest.raises(ValueError, match="start"):
        LossWeightWarmup(loss, start=float("nan"))
    with pytest.raises(ValueError, match="iterations"):
        LossWeightWarmup(loss, iterations=-1)


def test_foreground_calibration_state_continues_the_average():
    # a run stopped after iteration 1 and resumed with the handler's state gives the same estimates as one run
    net = EmbeddingUNet(spatial_dims=2, embedding_dim=2, features=(8, 8, 8))
    loss = SpocoLoss(embedding_dim=2)
    stats = [(0.2, 8), (0.4, 8), (0.3, 8)]

    def run(handler, iterations):
        def step(engine, i):
            loss.statistics = LossStatistics(label_frequency=stats[i])  # as the loss measured it
            return {"loss": 0.0}

        engine = Engine(step)
        engine.network, engine.loss_function = net, loss
        handler.attach(engine)
        seen = []
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(float(net.fg_label_frequency)))
        engine.run(iterations, max_epochs=1)
        return seen

    whole = run(ForegroundCalibration("label_frequency", momentum=0.5), [0, 1, 2])
    first = ForegroundCalibration("label_frequency", momentum=0.5)
    run(first, [0])
    resumed = ForegroundCalibration("label_frequency", momentum=0.5)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    assert run(resumed, [1, 2]) == pytest.approx(whole[1:], rel=1e-12)


def test_training_time_limit_state_carries_the_time_spent():
    limit = TrainingTimeLimit(max_seconds=100.0)
    engine = Engine(lambda e, b: None)
    limit.attach(engine)
    limit.load_state_dict({"elapsed": 60.0})  # before the run starts (as the resume loader, after STARTED, too)
    engine.run(range(2), max_epochs=1)
    assert 60.0 <= limit.state_dict()["elapsed"] < 70.0
    assert TrainingTimeLimit(None).state_dict() == {"elapsed": 0.0}


def test_resume_checkpoint_saver_keeps_one_complete_file(tmp_path, caplog):
    path = tmp_path / "resume.pt"
    torch.save({"old": 1}, path)  # an earlier run's file
    (tmp_path / ".resume.pt.partial").write_bytes(b"cut short")  # a write a kill interrupted
    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: time.sleep(0.06))
    ResumeCheckpointSaver(str(path), {"model": net}, interval_s=0.1).attach(engine)  # adds the trainer itself
    with caplog.at_level("INFO", logger="spoco"):
        engine.run(range(4), max_epochs=2)  # saves every other iteration or so, and at the end (8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resume.pt"]  # no partial file, no pile-up
    state = torch.load(path, weights_only=True)
    assert state["trainer"]["iteration"] == 8 and set(state) == {"model", "trainer"}
    logged = [r.getMessage() for r in caplog.records if r.name == "spoco"]
    assert 2 < sum("resume state saved" in m for m in logged) < 8 and any("of an earlier run" in m for m in logged)
    assert "saved" in logged[-1] and "(iteration 8)" in logged[-1]

    # an epoch's last iteration is saved after the epoch's own handlers (here: one that counts epochs)
    counted = torch.nn.Module()
    counted.register_buffer("epochs", torch.zeros(()))
    engine = Engine(lambda e, b: time.sleep(0.02))  # every iteration is due
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: counted.epochs.add_(1))
    ResumeCheckpointSaver(str(path), {"counted": counted}, interval_s=0.01, resume=True).attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())
    engine.run(range(4), max_epochs=2)
    state = torch.load(path, weights_only=True)
    assert state["trainer"]["iteration"] == 4 and float(state["counted"]["epochs"]) == 1.0


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_the_run_then_ends_the_process_by_it(tmp_path, sig):
    # a job scheduler's kill (SIGTERM) or Ctrl-C (SIGINT) in iteration 3: the state after it is saved, then the
    # process ends as the signal ends it (no traceback, no later iteration)
    script = f"""
import logging, os, signal, sys, torch
from ignite.engine import Engine
from spoco_bundle.handlers import ResumeCheckpointSaver
logging.basicConfig(level=logging.INFO, stream=sys.stdout)

def step(engine, batch):
    print("iteration", engine.state.iteration, flush=True)
    if engine.state.iteration == 3:
        os.kill(os.getpid(), signal.{sig})

engine = Engine(step)
saver = ResumeCheckpointSaver({str(tmp_path / "resume.pt")!r}, {{"model": torch.nn.Linear(2, 2)}}, interval_s=3600)
saver.attach(engine)
engine.run(range(10), max_epochs=2)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -getattr(signal, sig), done.stderr[-2000:]
    assert "iteration 3" in done.stdout and "iteration 4" not in done.stdout
    assert f"{sig}: stopped after iteration 3; --resume True continues" in done.stdout
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["trainer"]["iteration"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resume.pt"]


def test_resume_checkpoint_loader_restores_or_says_why_not(tmp_path, caplog):
    path = tmp_path / "resume.pt"
    net, engine = torch.nn.Linear(2, 2), Engine(lambda e, b: None)
    engine.state.max_epochs, engine.state.epoch_length = 3, 4
    with pytest.raises(FileNotFoundError, match=f"nothing to resume in {tmp_path}: resume.pt does not exist"):
        ResumeCheckpointLoader(str(path), {"model": net}).attach(engine)
    torch.save({"model": net.state_dict()}, path)
    with pytest.raises(ValueError, match=r"not a resume checkpoint of this bundle \(missing \['trainer'\]\)"):
        ResumeCheckpointLoader(str(path), {"model": net}).attach(engine)
    torch.save({"model": net.state_dict(), "trainer": {"iteration": 12, "epoch_length": 4, "max_epochs": 3}}, path)
    with pytest.raises(ValueError, match=r"is finished \(12 of 12 iterations, 3 epochs of 4\); nothing to resume"):
        ResumeCheckpointLoader(str(path), {"model": net}).attach(engine)
    limit = TrainingTimeLimit(max_seconds=10.0)
    limit.attach(engine)  # as train.json's time_limit, before the loader: a run only its budget ends
    assert engine.state.max_epochs == UNLIMITED_EPOCHS
    torch.save({"trainer": {"iteration": 5, "epoch_length": 4, "max_epochs": 3}, "time_limit": {"elapsed": 11}}, path)
    with pytest.raises(ValueError, match=r"has spent its time budget \(11 s of 10 s\)"):
        ResumeCheckpointLoader(str(path), {"time_limit": limit}).attach(engine)

    # a run stopped after iteration 6 of 3 x 4: restored, with this run's length; a state missing from an older
    # file (here the calibration's) starts afresh with a warning
    saved = torch.nn.Linear(2, 2)
    torch.save({"model": saved.state_dict(), "trainer": {"iteration": 6, "epoch_length": 4, "max_epochs": 1}}, path)
    trainer = Engine(lambda e, b: None)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.iteration))
    calibration = ForegroundCalibration()
    trainer.state.max_epochs, trainer.state.epoch_length = 3, 4
    ResumeCheckpointLoader(str(path), {"model": net, "fg_calibration": calibration}).attach(trainer)
    with caplog.at_level("INFO", logger="spoco"):
        trainer.run(range(4), max_epochs=3, epoch_length=4)
    assert seen == list(range(7, 13)) and torch.equal(net.weight, saved.weight)
    logged = [r.getMessage() for r in caplog.records if r.name == "spoco"]
    assert f"resuming from {path}: iteration 6, epoch 1 of 3 complete, 2 of 4 iterations into epoch 2" in logged
    assert any("holds no 'fg_calibration' state" in m for m in logged)


def test_best_checkpoint_state_keeps_the_best_score_across_a_resume(tmp_path):
    from monai.handlers import CheckpointSaver

    def validate(saver, score, weight):
        net = torch.nn.Linear(1, 1, bias=False)
        net.weight.data.fill_(weight)
        saver.save_dict = {"model": net}
        saver._key_metric_checkpoint.to_save = saver.save_dict
        evaluator = Engine(lambda e, b: None)
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_ap50=score))
        saver.attach(evaluator)
        evaluator.run([0], max_epochs=1)

    def new_saver():
        net = torch.nn.Linear(1, 1, bias=False)
        return CheckpointSaver(
            str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="val_ap50", key_metric_filename="m.pt"
        )

    def best():
        return float(torch.load(tmp_path / "m.pt", weights_only=True)["weight"])

    first = new_saver()
    validate(first, 0.5, 1.0)
    state = copy.deepcopy(BestCheckpointState(first).state_dict())
    assert [p for p, _ in state["saved"]] == [0.5] and best() == 1.0
    resumed = new_saver()
    BestCheckpointState(resumed).load_state_dict(state)
    validate(resumed, 0.3, 2.0)  # worse than before the resume: m.pt stays
    assert best() == 1.0
    validate(resumed, 0.7, 3.0)
    assert best() == 3.0
    (tmp_path / "m.pt").unlink()  # a best file that is gone is forgotten, not removed again
    forgetful = new_saver()
    BestCheckpointState(forgetful).load_state_dict({"saved": [(0.9, "model_key_metric=0.9000.pt")]})
    validate(forgetful, 0.1, 4.0)
    assert best() == 4.0
    assert BestCheckpointState(object()).state_dict() == {"saved": []}


def test_foreground_regime_handler_decides_auto_from_the_annotated_objects(tmp_path):
    # real files: a few annotated objects get a ring as thick in physical length on every axis (the NIfTI header's
    # voxel size; none stated in a plain TIFF: isotropic) and Lee & Liu's threshold; many keep the positive-unlabeled
    # head; dense labels (background_label 0), surface heads and explicit rings are left alone
    import nibabel as nib
    import tifffile

    from spoco_bundle.losses import AUTO_RING_MAX_OBJECTS

    few = np.zeros((16, 48, 48), np.uint16)
    for k, (y, x) in enumerate([(4, 4), (4, 24), (24, 4), (24, 24), (36, 36), (36, 12)], 1):
        few[4:10, y : y + 8, x : x + 8] = k
    affine = np.diag([0.28, 0.127, 0.127, 1.0])  # axes in storage order, as the bundle reads them
    nib.save(nib.Nifti1Image(np.zeros(few.shape, np.float32), affine), str(tmp_path / "few.nii.gz"))
    nib.save(nib.Nifti1Image(few.astype(np.int16), affine), str(tmp_path / "few_labels.nii.gz"))
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros(few.shape, np.uint8))
    tifffile.imwrite(tmp_path / "plain_labels.tif", few)
    many = np.zeros((110, 110), np.uint16)
    for k in range(AUTO_RING_MAX_OBJECTS + 20):
        y, x = divmod(k, 11)
        many[10 * y + 2 : 10 * y + 8, 10 * x + 2 : 10 * x + 8] = k + 1
    tifffile.imwrite(tmp_path / "many.tif", np.zeros(many.shape, np.uint8))
    tifffile.imwrite(tmp_path / "many_labels.tif", many)

    def training_set(name, dims=3, **kwargs) -> TrainingSet:
        ext = ".nii.gz" if name == "few" else ".tif"
        item = {"image": str(tmp_path / f"{name}{ext}"), "label": str(tmp_path / f"{name}_labels{ext}")}
        return TrainingSet([item], dims, **kwargs)

    def new_trainer(loss: SpocoLoss, dims: int = 3) -> Engine:
        trainer = Engine(lambda e, b: None)  # with the network and the loss, as every trainer of the bundle has
        trainer.network = EmbeddingUNet(spatial_dims=dims, embedding_dim=2, features=(8, 8, 8))
        trainer.loss_function = loss
        return trainer

    def decide(name, dims=3, loss=None, **kwargs) -> tuple[ForegroundLoss, str]:
        """The head's ring after the regime handler, and the calibration method "auto" then uses."""
        loss = SpocoLoss(foreground=ForegroundLoss(ring="auto")) if loss is None else loss
        trainer = new_trainer(loss, dims)
        ForegroundRegimeHandler(training_set(name, dims, **kwargs)).attach(trainer)
        calibration = ForegroundCalibration("auto")
        calibration.attach(trainer)
        trainer.run(range(1), max_epochs=1)
        return loss.foreground, calibration.method_in_use()

    head, method = decide("few")
    assert head.ring == (1, 2, 2) and method == "lee_liu_images"
    assert decide("few", image_scale=[2.0, 1.0, 1.0])[0].ring == 2  # z voxels of 0.14 on the network's grid
    assert decide("plain")[0].ring == 2
    head, method = decide("many", dims=2)
    assert head.ring == 0 and method == "label_frequency"
    assert decide("few", background_label=0)[0].ring == 0
    assert decide("few", loss=SpocoLoss(foreground=ForegroundLoss(ring="auto", surface=1)))[0].ring == 0
    assert decide("few", loss=SpocoLoss(foreground=ForegroundLoss(ring=3)))[0].ring == 3
    # the decision is the handler's resume state: a resumed run keeps it, whichever handler fires first
    saved = ForegroundRegimeHandler(training_set("few"))
    trainer = new_trainer(SpocoLoss(foreground=ForegroundLoss(ring="auto")))
    saved.attach(trainer)
    trainer.run(range(1), max_epochs=1)
    assert saved.state_dict() == {"ring": [1, 2, 2]}
    for loaded_first in (True, False):  # the labels have changed since: many objects now, but the run resumes
        resumed = ForegroundRegimeHandler(training_set("many", 2))
        loss = SpocoLoss(foreground=ForegroundLoss(ring="auto"))
        trainer = new_trainer(loss, 2)
        calibration = ForegroundCalibration("auto")
        if loaded_first:
            resumed.load_state_dict({"ring": [1, 2]})
        resumed.attach(trainer)
        calibration.attach(trainer)
        trainer.run(range(1), max_epochs=1)
        if not loaded_first:
            assert loss.foreground.ring == 0
            resumed.load_state_dict({"ring": [1, 2]})
        assert loss.foreground.ring == (1, 2) and calibration.method_in_use() == "lee_liu_images"
    # a ring resets a fine-tuned positive-unlabeled model's weight (here with the loss given to the handler)
    net = EmbeddingUNet(spatial_dims=3, embedding_dim=2, features=(8, 8, 8))
    net.fg_positive_weight.fill_(10.0)
    trainer = Engine(lambda e, b: None)
    trainer.network = net
    loss = SpocoLoss(foreground=ForegroundLoss(ring="auto"))
    ForegroundRegimeHandler(training_set("few"), loss).attach(trainer)
    trainer.run(range(1), max_epochs=1)
    assert float(net.fg_positive_weight) == 1.0 and loss.foreground.ring == (1, 2, 2)


def test_resume_state_names_the_stateful_handlers_by_their_state_key(tmp_path):
    net = torch.nn.Linear(2, 2)
    limit, calibration = TrainingTimeLimit(max_seconds=10.0), ForegroundCalibration("label_frequency")
    handlers = [LossWeightWarmup(SpocoLoss(), iterations=0), limit, calibration, MomentumTeacherHandler(net)]
    state = resume_state({"model": net}, handlers)
    assert state == {"model": net, "time_limit": limit, "fg_calibration": calibration}  # the others keep no state
    saver = CheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True)
    assert isinstance(resume_state({}, [], best_saver=saver)["best_model"], BestCheckpointState)
    with pytest.raises(ValueError, match="'time_limit'"):
        resume_state({}, [limit, TrainingTimeLimit(max_seconds=5.0)])
