"""Tests of spoco_bundle.losses against slow, independent references.

The references below are written from the formulas in the method notes with explicit Python loops over images,
objects and anchors (plain float64 torch ops, so autograd also gives reference gradients). They share no code with
the module. Random choices (random instance anchors, consistency anchors) follow the documented rule of the module:
one ``torch.rand(B, N, dtype=torch.float64, generator=...)`` draw over the flattened voxels; an object's anchor is
its voxel with the largest draw, and each consistency anchor is the remaining pool voxel with the largest draw. The
references re-draw the same numbers from an identically seeded generator and apply the rule with per-image loops,
so the anchor search (pool bookkeeping, stopping rule) is checked too, not only the loss given the anchors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spoco_bundle.losses import (
    AUTO_RING_MAX_OBJECTS,
    EmbeddingConsistencyLoss,
    ForegroundLoss,
    InstanceDiceLoss,
    MeanNormRegularizer,
    PullLoss,
    PushLoss,
    SpocoLoss,
    UnlabeledPushLoss,
    auto_foreground_ring,
    kernel_scale,
    labelled_foreground_probability,
    object_means,
    object_rings,
    object_surfaces,
    sample_object_voxels,
    select_consistency_anchors,
)

RTOL, ATOL = 1e-6, 1e-9  # float64 module vs float64 reference


@pytest.fixture(autouse=True)
def single_thread():
    # the references run thousands of tiny ops: one thread keeps them fast, also on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DV, DD, T, EPS = 0.5, 2.0, 0.5, 1e-6
STROKES = 65535  # a background_label other than 0: the annotated background is a few painted strokes
SCALE = DV**2 / -math.log(T)  # 2 sigma^2 with phi(delta_v) = t


# ---------------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------------


def make_case(spatial, batch=2, emb_dim=5, ids=(1, 2, 3, 4), p_unlabeled=0.35, p_background=0.15, seed=0):
    """Random labels (objects need not be connected for a loss) and embeddings clustered loosely around a random
    centre per object, so every hinge is active for some voxels/pairs and inactive for others."""
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(spatial))
    u = torch.rand(batch, n, generator=g, dtype=torch.float64)
    choice = torch.randint(0, len(ids), (batch, n), generator=g) if ids else torch.zeros(batch, n, dtype=torch.long)
    obj = torch.tensor(list(ids) or [0], dtype=torch.long)[choice]
    labels = torch.where(u < p_background, -1, torch.where(u < p_background + p_unlabeled, 0, obj))
    if not ids:
        labels = labels.clamp(max=0)
    kmax = max(ids) if ids else 0
    centres = 1.3 * torch.randn(batch, kmax + 1, emb_dim, generator=g, dtype=torch.float64)
    # voxels outside annotated objects sit near a random centre (like unannotated objects) or anywhere
    centre_of = torch.where(labels > 0, labels, torch.randint(0, kmax + 1, (batch, n), generator=g))
    emb = centres.gather(1, centre_of.unsqueeze(-1).expand(batch, n, emb_dim)).transpose(1, 2)
    spread = torch.where(labels > 0, 0.45, 0.9).unsqueeze(1)
    emb = emb + spread * torch.randn(batch, emb_dim, n, generator=g, dtype=torch.float64)
    return emb.reshape(batch, emb_dim, *spatial).contiguous(), labels.reshape(batch, 1, *spatial)


# ---------------------------------------------------------------------------------------------------------------------
# references: explicit loops over images / objects / anchors
# ---------------------------------------------------------------------------------------------------------------------


def _flat(emb, target):
    return emb.reshape(emb.shape[0], emb.shape[1], -1), target.reshape(target.shape[0], -1)


def _ids(lab):
    return [int(k) for k in torch.unique(lab).tolist() if k > 0]


def ref_pull(emb, target, dv=DV):
    x, lab = _flat(emb, target)
    out = []
    for b in range(x.shape[0]):
        vals = []
        for k in _ids(lab[b]):
            pts = x[b][:, lab[b] == k]
            mu = pts.mean(1, keepdim=True)
            vals.append((F.relu(torch.linalg.norm(pts - mu, dim=0) - dv) ** 2).mean())
        out.append(torch.stack(vals).mean() if vals else x.sum() * 0)
    return torch.stack(out)


def ref_push(emb, target, dd=DD):
    x, lab = _flat(emb, target)
    out = []
    for b in range(x.shape[0]):
        mus = [x[b][:, lab[b] == k].mean(1) for k in _ids(lab[b])]
        k = len(mus)
        total = x.sum() * 0
        for i in range(k):
            for j in range(k):
                if i != j:
                    total = total + F.relu(2 * dd - torch.linalg.norm(mus[i] - mus[j])) ** 2
        out.append(total / (k * (k - 1)) if k > 1 else total)
    return torch.stack(out)


def ref_reg(emb, target):
    x, lab = _flat(emb, target)
    out = []
    for b in range(x.shape[0]):
        norms = [torch.linalg.norm(x[b][:, lab[b] == k].mean(1)) for k in _ids(lab[b])]
        out.append(torch.stack(norms).mean() if norms else x.sum() * 0)
    return torch.stack(out)


def ref_instance(emb, target, anchor_voxels=None, dv=DV, t=T, eps=EPS):
    """anchor_voxels: None (object means) or {(b, k): flat voxel index}."""
    scale = dv**2 / -math.log(t)
    x, lab = _flat(emb, target)
    out = []
    for b in range(x.shape[0]):
        vals = []
        for k in _ids(lab[b]):
            y = (lab[b] == k).to(x.dtype)
            a = x[b][:, lab[b] == k].mean(1) if anchor_voxels is None else x[b][:, anchor_voxels[(b, k)]]
            p = torch.exp(-(torch.linalg.norm(x[b] - a[:, None], dim=0) ** 2) / scale)
            vals.append(1 - 2 * (p * y).sum() / ((p * p).sum() + (y * y).sum() + eps))
        out.append(torch.stack(vals).mean() if vals else x.sum() * 0)
    return torch.stack(out)


def ref_unlabeled(emb, target, dd=DD):
    x, lab = _flat(emb, target)
    out = []
    for b in range(x.shape[0]):
        unl = lab[b] <= 0
        vals = []
        for k in _ids(lab[b]):
            mu = x[b][:, lab[b] == k].mean(1)
            if unl.any():
                vals.append((F.relu(dd - torch.linalg.norm(x[b][:, unl] - mu[:, None], dim=0)) ** 2).mean())
        out.append(torch.stack(vals).mean() if vals else x.sum() * 0)
    return torch.stack(out)


def ref_random_anchors(target, seed):
    """{(b, k): voxel of object k with the largest draw of torch.rand(B, N, float64) from a generator seeded seed}."""
    lab = target.reshape(target.shape[0], -1)
    u = torch.rand(lab.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    anchors = {}
    for b in range(lab.shape[0]):
        for k in _ids(lab[b]):
            members = torch.nonzero(lab[b] == k).flatten().tolist()
            anchors[(b, k)] = max(members, key=lambda i: u[b, i].item())
    return anchors


def ref_consistency_anchors(student, teacher, target, seed, dv=DV, max_anchors=20, min_fraction=0.05):
    """Per image: anchors in drawing order, with a sequential pool exactly as described in the method notes."""
    f, lab = _flat(student.detach(), target)
    g, _ = _flat(teacher.detach(), target)
    n = lab.shape[1]
    u = torch.rand(lab.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    result = []
    for b in range(lab.shape[0]):
        pool = lab[b] <= 0
        chosen = []
        while len(chosen) < max_anchors and pool.sum().item() >= max(min_fraction * n, 1):
            j = int(torch.where(pool, u[b], torch.full_like(u[b], -1.0)).argmax())  # uniform draw from the pool
            chosen.append(j)
            df = torch.linalg.norm(f[b] - f[b][:, j : j + 1], dim=0)
            dg = torch.linalg.norm(g[b] - g[b][:, j : j + 1], dim=0)
            pool = pool & (df >= dv) & (dg >= dv)
            pool[j] = False
        result.append(chosen)
    return result


def ref_consistency(student, teacher, target, seed, dv=DV, t=T, eps=EPS, max_anchors=20, min_fraction=0.05):
    scale = dv**2 / -math.log(t)
    anchors = ref_consistency_anchors(student, teacher, target, seed, dv, max_anchors, min_fraction)
    f, _ = _flat(student, target)
    g, _ = _flat(teacher.detach(), target)
    vals = []
    for b, chosen in enumerate(anchors):
        for j in chosen:
            q = torch.exp(-(torch.linalg.norm(f[b] - f[b][:, j : j + 1], dim=0) ** 2) / scale)
            r = torch.exp(-(torch.linalg.norm(g[b] - g[b][:, j : j + 1], dim=0) ** 2) / scale)
            vals.append(1 - 2 * (q * r).sum() / ((q * q).sum() + (r * r).sum() + eps))
    return torch.stack(vals).mean() if vals else student.sum() * 0


def ref_foreground(logits, target, positive_weight=10.0):
    # per image: annotated background -> BCE on labelled voxels; none -> positive-unlabeled, BCE on every voxel with
    # the annotated ones weighted positive_weight; the mean is over the voxels that count
    x, lab = _flat(logits, target)
    xs, ys, ws = [], [], []
    for b in range(x.shape[0]):
        pu = not (lab[b] == -1).any()
        known = torch.ones_like(lab[b], dtype=torch.bool) if pu else lab[b] != 0
        y = (lab[b][known] > 0).to(x.dtype)
        xs.append(x[b, 0][known])
        ys.append(y)
        ws.append(1 + (positive_weight - 1) * y if pu else torch.ones_like(y))
    if not sum(len(v) for v in xs):
        return logits.sum() * 0
    bce = F.binary_cross_entropy_with_logits(torch.cat(xs), torch.cat(ys), reduction="none")
    return (torch.cat(ws) * bce).mean()


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=rtol, atol=atol)


def value_and_grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value.sum(), x, allow_unused=True)
    return value.detach(), (torch.zeros_like(x) if grad is None else grad)


SHAPES = [(9, 11), (4, 6, 5)]


# ---------------------------------------------------------------------------------------------------------------------
# per-term checks against the references (values and gradients), 2D and 3D, batch 2
# ---------------------------------------------------------------------------------------------------------------------

PER_IMAGE_TERMS = [
    (lambda: PullLoss(DV, reduction="none"), ref_pull),
    (lambda: PushLoss(DD, reduction="none"), ref_push),
    (lambda: MeanNormRegularizer(reduction="none"), ref_reg),
    (lambda: InstanceDiceLoss(DV, T, reduction="none"), ref_instance),
    (lambda: UnlabeledPushLoss(DD, reduction="none"), ref_unlabeled),
]


@pytest.mark.parametrize("spatial", SHAPES)
@pytest.mark.parametrize("make_loss, reference", PER_IMAGE_TERMS)
def test_term_matches_reference(spatial, make_loss, reference):
    emb, target = make_case(spatial, seed=len(spatial))
    loss = make_loss()
    value, grad = value_and_grad(lambda x: loss(x, target), emb)
    ref_value, ref_grad = value_and_grad(lambda x: reference(x, target), emb)
    assert value.shape == (2,)
    assert (ref_value > 1e-3).all(), "test data should make every term non-trivial"
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("reduction, combine", [("mean", torch.mean), ("sum", torch.sum)])
def test_reductions(reduction, combine):
    emb, target = make_case((7, 8), seed=3)
    for cls, ref in ((PullLoss, ref_pull), (UnlabeledPushLoss, ref_unlabeled), (InstanceDiceLoss, ref_instance)):
        assert_close(cls(reduction=reduction)(emb, target), combine(ref(emb, target)))


@pytest.mark.parametrize("spatial", SHAPES)
def test_instance_random_anchor_matches_reference(spatial):
    emb, target = make_case(spatial, seed=5)
    loss = InstanceDiceLoss(DV, T, anchor="random", reduction="none", generator=torch.Generator().manual_seed(11))
    value, grad = value_and_grad(lambda x: loss(x, target), emb)
    anchors = ref_random_anchors(target, 11)
    ref_value, ref_grad = value_and_grad(lambda x: ref_instance(x, target, anchors), emb)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


def test_sample_object_voxels_rule_and_membership():
    _, target = make_case((10, 12), ids=(2, 5, 9), seed=6)
    index, present = sample_object_voxels(target, torch.Generator().manual_seed(4))
    expected = ref_random_anchors(target, 4)
    lab = target.reshape(2, -1)
    for b in range(2):
        ids = _ids(lab[b])
        assert present[b].tolist() == [True] * len(ids) + [False] * (present.shape[1] - len(ids))
        for slot, k in enumerate(ids):  # slot j holds the j-th smallest id
            assert index[b, slot].item() == expected[(b, k)]
            assert lab[b, index[b, slot]].item() == k
    # the draw is uniform over the object: over many draws every voxel of a 3-voxel object is hit about equally
    tiny = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    tiny[0, 0, 1, 1:4] = 1
    gen = torch.Generator().manual_seed(0)
    hits = [sample_object_voxels(tiny, gen)[0].item() for _ in range(600)]
    counts = np.bincount(hits, minlength=16)[[5, 6, 7]]
    assert counts.sum() == 600 and counts.min() > 150


@pytest.mark.parametrize("spatial", SHAPES)
@pytest.mark.parametrize("p_unlabeled", [0.35, 0.8])  # dense and sparse annotations (two code paths)
def test_object_means(spatial, p_unlabeled):
    emb, target = make_case(spatial, ids=(1, 3, 4), p_unlabeled=p_unlabeled, p_background=0.1, seed=2)
    means, counts, present = object_means(emb, target)
    x, lab = _flat(emb, target)
    assert means.shape == (2, 4, emb.shape[1])
    for b in range(2):
        for k in range(1, 5):
            mask = lab[b] == k
            assert present[b, k - 1].item() == bool(mask.any())
            assert counts[b, k - 1].item() == mask.sum().item()
            if mask.any():
                assert_close(means[b, k - 1], x[b][:, mask].mean(1))
            else:
                assert (means[b, k - 1] == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# consistency
# ---------------------------------------------------------------------------------------------------------------------


def make_teacher(student, seed):
    g = torch.Generator().manual_seed(seed)
    return student + 0.3 * torch.randn(student.shape, generator=g, dtype=student.dtype)


@pytest.mark.parametrize("spatial, max_anchors", [((12, 13), 20), ((5, 6, 7), 20), ((12, 13), 3)])
def test_consistency_matches_reference(spatial, max_anchors):
    student, target = make_case(spatial, seed=7)
    teacher = make_teacher(student, 8)
    loss = EmbeddingConsistencyLoss(DV, T, max_anchors=max_anchors, generator=torch.Generator().manual_seed(21))
    value, grad = value_and_grad(lambda x: loss(x, teacher, target), student)

    expected_anchors = ref_consistency_anchors(student, teacher, target, 21, max_anchors=max_anchors)
    idx, valid = loss.last_anchors
    assert [idx[b][valid[b]].tolist() for b in range(2)] == expected_anchors
    assert all(len(a) >= 2 for a in expected_anchors), "test data should give several anchors per image"
    if max_anchors == 3:
        assert all(len(a) == 3 for a in expected_anchors)

    ref_value, ref_grad = value_and_grad(
        lambda x: ref_consistency(x, teacher, target, 21, max_anchors=max_anchors), student
    )
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)
    # the public helper reproduces the same anchors from the same generator state
    idx2, valid2 = select_consistency_anchors(
        student, teacher, target, max_anchors=max_anchors, generator=torch.Generator().manual_seed(21)
    )
    assert [idx2[b][valid2[b]].tolist() for b in range(2)] == expected_anchors


def test_consistency_many_anchors_large_image():
    # more anchors than one candidate block (32) and images large enough for several voxel blocks
    student, target = make_case((60, 70), emb_dim=4, seed=15)
    teacher = make_teacher(student, 16)
    loss = EmbeddingConsistencyLoss(DV, T, max_anchors=40, generator=torch.Generator().manual_seed(3))
    value, grad = value_and_grad(lambda x: loss(x, teacher, target), student)
    expected_anchors = ref_consistency_anchors(student, teacher, target, 3, max_anchors=40)
    assert all(len(a) > 32 for a in expected_anchors)
    idx, valid = loss.last_anchors
    assert [idx[b][valid[b]].tolist() for b in range(2)] == expected_anchors
    ref_value, ref_grad = value_and_grad(lambda x: ref_consistency(x, teacher, target, 3, max_anchors=40), student)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


def test_consistency_stops_at_min_pool_fraction():
    # a large min_pool_fraction stops the search early; the reference applies the same rule
    student, target = make_case((12, 13), seed=9)
    teacher = make_teacher(student, 10)
    loss = EmbeddingConsistencyLoss(DV, T, min_pool_fraction=0.3, generator=torch.Generator().manual_seed(1))
    value = loss(student, teacher, target)
    ref_anchors = ref_consistency_anchors(student, teacher, target, 1, min_fraction=0.3)
    idx, valid = loss.last_anchors
    assert [idx[b][valid[b]].tolist() for b in range(2)] == ref_anchors
    assert_close(value, ref_consistency(student, teacher, target, 1, min_fraction=0.3))


def test_consistency_teacher_gets_no_gradient():
    student, target = make_case((8, 9), seed=12)
    student.requires_grad_(True)
    teacher = make_teacher(student.detach(), 3).requires_grad_(True)
    loss = EmbeddingConsistencyLoss(generator=torch.Generator().manual_seed(0))(student, teacher, target)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_consistency_without_pool_is_zero_with_graph():
    student, _ = make_case((6, 7), seed=1)
    target = torch.ones(2, 1, 6, 7, dtype=torch.long)  # every voxel annotated: no anchor can be drawn
    student.requires_grad_(True)
    loss = EmbeddingConsistencyLoss()(student, make_teacher(student.detach(), 0), target)
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad is not None and (student.grad == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# foreground
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positive_weight", [1.0, 10.0])
def test_foreground_matches_reference(positive_weight):
    _, target = make_case((9, 10), seed=4)
    target[1][target[1] == -1] = 0  # image 1 has no annotated background: positive-unlabeled, every voxel counts
    logits = torch.randn(2, 1, 9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    value, grad = value_and_grad(lambda x: ForegroundLoss(positive_weight)(x, target), logits)
    ref_value, ref_grad = value_and_grad(lambda x: ref_foreground(x, target, positive_weight), logits)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)
    # image 0 (annotated background): unlabeled voxels get no gradient; image 1: every voxel does
    assert (grad[0][target[0] == 0] == 0).all() and (grad[0][target[0] != 0] != 0).all()
    assert (grad[1] != 0).all()


def test_foreground_positive_unlabeled_values():
    # without annotated background, unlabeled voxels are the negatives of a labelled-vs-unlabeled classifier
    target = torch.tensor([[[0, 0, 1, 2]]])
    logits = torch.tensor([[[0.0, 1.0, 2.0, -1.0]]], dtype=torch.float64)
    expected = (
        -math.log(1 - torch.sigmoid(torch.tensor(0.0)).item())
        - math.log(1 - torch.sigmoid(torch.tensor(1.0)).item())
        - math.log(torch.sigmoid(torch.tensor(2.0)).item())
        - math.log(torch.sigmoid(torch.tensor(-1.0)).item())
    ) / 4
    loss = ForegroundLoss(positive_weight=1.0)
    assert loss(logits[:, None, None], target[:, None, None]).item() == pytest.approx(expected)
    # a positive weight of 3 counts the annotated voxels' terms three times
    weighted = (
        expected
        + 2
        * (-math.log(torch.sigmoid(torch.tensor(2.0)).item()) - math.log(torch.sigmoid(torch.tensor(-1.0)).item()))
        / 4
    )
    loss = ForegroundLoss(positive_weight=3.0)
    assert loss(logits[:, None, None], target[:, None, None]).item() == pytest.approx(weighted)


@pytest.mark.parametrize("bad", [0.5, float("nan"), float("inf")])
def test_foreground_positive_weight_is_checked(bad):
    with pytest.raises(ValueError, match="positive_weight"):
        ForegroundLoss(bad)
    with pytest.raises(ValueError, match="positive_weight"):
        SpocoLoss(foreground=ForegroundLoss(positive_weight=bad))


def test_labelled_foreground_probability():
    target = torch.tensor([[0, 1, 1, 2], [-1, 1, 1, 0]])  # image 1 has annotated background: left out
    logits = torch.tensor([[5.0, 0.0, math.log(3.0), -math.log(3.0)], [0.0, 9.0, 9.0, 9.0]])
    mean, count = labelled_foreground_probability(logits, target)
    assert count == 3 and mean == pytest.approx((0.5 + 0.75 + 0.25) / 3)
    assert labelled_foreground_probability(logits, -target.abs())[1] == 0


@pytest.mark.parametrize("positive_weight", [1.0, 10.0])
def test_positive_unlabeled_head_is_calibrated_by_label_frequency(positive_weight):
    # Elkan & Noto: trained labelled-vs-unlabeled, g(x) -> c * P(fg | x); g / c then separates fg from bg. With the
    # annotated voxels weighted w the head's odds are w times g's, and the same holds after shifting by -log(w).
    # Pixels: background intensity 0, foreground intensity 1; 20 % of the foreground is annotated.
    gen = torch.Generator().manual_seed(0)
    n = 4000
    fg = torch.rand(n, generator=gen) < 0.3
    x = fg.double() + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    labels = torch.where(fg & (torch.rand(n, generator=gen) < 0.2), 1, 0)
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.1)
    for _ in range(600):
        opt.zero_grad()
        loss = ForegroundLoss(positive_weight)((w[0] * x + w[1])[None, None, None], labels[None, None, None])
        loss.backward()
        opt.step()
    logits = (w[0] * x + w[1]).detach()
    c, _ = labelled_foreground_probability(logits[None], labels[None], positive_weight)
    assert c == pytest.approx(0.2, abs=0.03)
    g = torch.sigmoid(logits - math.log(positive_weight))
    assert g[fg].mean().item() == pytest.approx(0.2, abs=0.03)  # uncalibrated, every fg voxel looks like bg
    calibrated = g / c > 0.5
    # (logistic in x is only approximately the form of c * P(fg | x), so the weighted fit is slightly worse)
    assert (calibrated == fg).double().mean().item() > (0.99 if positive_weight == 1.0 else 0.97)


def test_stroke_regime_is_positive_unlabeled_plus_a_stroke_term():
    # painted strokes (a background_label other than 0, by hand here): every voxel counts as in positive-unlabeled
    # learning, and the strokes add a BCE term of their own
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 6, 7, requires_grad=True)
    target = torch.zeros(2, 1, 6, 7, dtype=torch.long)
    target[0, 0, :2] = 1  # image 0: an object and a stroke
    target[0, 0, 5, :3] = -1
    target[1, 0, 3:, 4:] = 2  # image 1: an object, no stroke in this patch
    loss = ForegroundLoss(positive_weight=10.0, background_label=STROKES)(logits, target)
    x, t = logits[:, 0].reshape(2, -1), target[:, 0].reshape(2, -1)
    bce = F.binary_cross_entropy_with_logits(x, (t > 0).float(), reduction="none")
    expected = torch.where(t > 0, 10 * bce, bce).mean() + bce[t < 0].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad != 0)  # every voxel counts: unlabeled ones are the negatives of PU learning
    # without strokes the same target is plain positive-unlabeled learning (image 0 would be supervised otherwise)
    no_strokes = target.clamp_min(0)
    pu = ForegroundLoss(positive_weight=10.0, background_label=STROKES)(logits, no_strokes)
    assert pu.item() == pytest.approx(ForegroundLoss(positive_weight=10.0)(logits, no_strokes).item(), rel=1e-6)


def test_spoco_loss_estimates_the_label_frequency_on_images_with_strokes():
    emb = torch.randn(1, 5, 8, 8)  # 4 embedding channels + foreground logit
    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target[0, 0, :3, :3] = 1
    target[0, 0, 6:, 6:] = 2
    target[0, 0, 4, :5] = -1  # a stroke
    dense = SpocoLoss(embedding_dim=4)  # annotated background taken as dense: the image is supervised, no c
    dense(emb, target)
    assert dense.statistics.label_frequency[1] == 0
    strokes = SpocoLoss(embedding_dim=4, foreground=ForegroundLoss(background_label=STROKES))
    strokes(emb, target)
    assert strokes.statistics.label_frequency[1] == 13  # 9 + 4 annotated pixels: c from every image


def ref_surfaces(labels: np.ndarray, radius: int) -> np.ndarray:
    """Per object voxel, loops: another label (object, 0 or -1) within Chebyshev distance ``radius``."""
    out = np.zeros(labels.shape, bool)
    for idx in np.ndindex(labels.shape):
        if labels[idx] > 0:
            box = tuple(slice(max(i - radius, 0), i + radius + 1) for i in idx)
            out[idx] = bool((labels[box] != labels[idx]).any())
    return out


@pytest.mark.parametrize("spatial,radius", [((9, 11), 1), ((9, 11), 2), ((5, 6, 7), 1)])
def test_object_surfaces_match_reference(spatial, radius):
    rng = np.random.default_rng(4)
    labels = np.zeros((2, *spatial), np.int64)
    for b in range(2):  # random boxes of 3-5 voxels a side, some overlapping (the later wins)
        for k in range(1, 5):
            lo = [int(rng.integers(0, s - 3)) for s in spatial]
            labels[b][tuple(slice(a, a + int(rng.integers(3, 6))) for a in lo)] = k
    labels[0][(slice(0, 1),) * len(spatial)] = -1
    got = object_surfaces(torch.as_tensor(labels).reshape(2, -1), spatial, radius)
    for b in range(2):
        ref = ref_surfaces(labels[b], radius)
        assert ref.any() and (radius > 1 or (~ref & (labels[b] > 0)).any())  # radius 1 leaves interiors
        np.testing.assert_array_equal(got[b].reshape(spatial).numpy(), ref)
    # one object filling the patch has no surface: the patch border is not an edge
    assert not object_surfaces(torch.ones(1, 20, dtype=torch.long), (4, 5), 1).any()


def test_surface_is_annotated_background():
    # tissue: two cells tile the image, cell 1 annotated; without the option the head trains positive-unlabeled
    # (every voxel counts), with it on cell 1's interior against its outer layer only (the other cell says nothing)
    lab = torch.zeros(1, 6, 8, dtype=torch.long)
    lab[:, :, :4] = 1
    logits = torch.randn(1, 1, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    surface = object_surfaces(lab.reshape(1, -1), (6, 8), 1).reshape(1, 6, 8)
    assert surface[:, :, 3].all() and surface.sum() == 6  # the column next to the other label, nothing else
    head = torch.where(surface, -1, lab)
    loss = SpocoLoss(1, alpha=0, beta=0, gamma=0, instance_weight=0, unlabeled_weight=0, consistency_weight=0,
                     foreground=ForegroundLoss(10.0, surface=1))  # fmt: skip
    value, grad = value_and_grad(lambda v: loss(torch.cat([torch.zeros_like(v), v], 1), lab), logits)
    ref_value, ref_grad = value_and_grad(lambda v: ForegroundLoss(10.0)(v, head), logits)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)
    assert (grad[0, 0][lab[0] == 0] == 0).all() and (grad[0, 0][lab[0] == 1] != 0).all()
    assert loss.statistics.label_frequency[1] == 0  # a supervised image calibrates nothing
    with pytest.raises(ValueError, match="foreground_surface"):
        ForegroundLoss(surface=-1)


def ref_rings(labels: np.ndarray, radius: tuple[int, ...]) -> np.ndarray:
    """Per unlabeled voxel, loops: an object voxel within ``radius[axis]`` voxels along every axis."""
    out = np.zeros(labels.shape, bool)
    for idx in np.ndindex(labels.shape):
        if labels[idx] == 0:
            box = tuple(slice(max(i - r, 0), i + r + 1) for i, r in zip(idx, radius))
            out[idx] = bool((labels[box] > 0).any())
    return out


@pytest.mark.parametrize("spatial,radius", [((9, 11), 1), ((9, 11), 2), ((5, 6, 7), (1, 2, 2)), ((5, 6, 7), 0)])
def test_object_rings_match_reference(spatial, radius):
    rng = np.random.default_rng(7)
    labels = np.zeros((2, *spatial), np.int64)
    for b in range(2):
        for k in range(1, 4):
            lo = [int(rng.integers(0, s - 2)) for s in spatial]
            labels[b][tuple(slice(a, a + int(rng.integers(1, 3))) for a in lo)] = k
    labels[0][(slice(0, 1),) * len(spatial)] = -1  # annotated background is not unlabeled: never part of a ring
    got = object_rings(torch.as_tensor(labels).reshape(2, -1), spatial, radius)
    r = (radius,) * len(spatial) if isinstance(radius, int) else radius
    for b in range(2):
        ref = ref_rings(labels[b], r)
        assert ref.any() == (max(r) > 0)
        np.testing.assert_array_equal(got[b].reshape(spatial).numpy(), ref)
    with pytest.raises(ValueError, match="radius"):
        object_rings(torch.as_tensor(labels).reshape(2, -1), spatial, (1, 2, 2, 2))


def test_ring_is_annotated_background():
    # image 0: one annotated object on an unlabeled image; image 1: no annotated object at all. With the ring the
    # head trains on the object against the 1-voxel ring around it, nothing else; image 1 is left out (as a
    # positive-unlabeled image it would teach that all of it is background)
    lab = torch.zeros(2, 7, 8, dtype=torch.long)
    lab[0, 2:5, 2:5] = 1
    logits = torch.randn(2, 1, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    ring = object_rings(lab.reshape(2, -1), (7, 8), 1).reshape(2, 7, 8)
    assert ring[0].sum() == 25 - 9 and not ring[1].any()
    head = torch.where(ring, -1, lab)[:1]
    loss = SpocoLoss(1, alpha=0, beta=0, gamma=0, instance_weight=0, unlabeled_weight=0, consistency_weight=0,
                     foreground=ForegroundLoss(10.0, ring=1))  # fmt: skip
    value, grad = value_and_grad(lambda v: loss(torch.cat([torch.zeros_like(v), v], 1), lab), logits)
    ref_value, ref_grad = value_and_grad(lambda v: ForegroundLoss(10.0)(v, head), logits[:1])
    assert_close(value, ref_value)
    assert_close(grad[:1], ref_grad)
    assert (grad[1] == 0).all()
    assert (grad[0, 0][ring[0] | (lab[0] > 0)] != 0).all() and (grad[0, 0][~ring[0] & (lab[0] == 0)] == 0).all()
    assert loss.statistics.label_frequency[1] == 0  # supervised: the head's 0.5 is its threshold
    # a patch inside one object has no ring: it trains the head but does not calibrate it
    loss(torch.zeros(1, 2, 7, 8), torch.ones(1, 7, 8, dtype=torch.long))
    assert loss.statistics.label_frequency[1] == 0
    for bad in (-1, 1.5, [1, -2]):
        with pytest.raises(ValueError, match="foreground_ring"):
            ForegroundLoss(ring=bad)


def test_ring_with_strokes_is_supervised():
    # strokes (-1) join the ring as the head's annotated background: image 0 (an object and a stroke far from it) and
    # image 1 (a stroke alone) train supervised, unlabeled voxels beyond the ring say nothing; image 2 (nothing
    # annotated) is left out
    lab = torch.zeros(3, 7, 8, dtype=torch.long)
    lab[0, 2:5, 2:5] = 1
    lab[:2, 6, 5:] = -1
    logits = torch.randn(3, 1, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    ring = object_rings(lab.reshape(3, -1), (7, 8), 1).reshape(3, 7, 8)
    head = torch.where(ring, -1, lab)[:2]
    loss = SpocoLoss(1, alpha=0, beta=0, gamma=0, instance_weight=0, unlabeled_weight=0, consistency_weight=0,
                     foreground=ForegroundLoss(10.0, background_label=STROKES, ring=1))  # fmt: skip
    value, grad = value_and_grad(lambda v: loss(torch.cat([torch.zeros_like(v), v], 1), lab), logits)
    ref_value, ref_grad = value_and_grad(lambda v: ForegroundLoss(10.0)(v, head), logits[:2])
    assert_close(value, ref_value)
    assert_close(grad[:2], ref_grad)
    assert (grad[:2, 0][head != 0] != 0).all() and (grad[:2, 0][head == 0] == 0).all()
    assert (grad[2] == 0).all()
    assert loss.statistics.label_frequency[1] == 0


def test_surface_and_ring_together():
    # both widenings at once (foreground_surface 1 with foreground_ring 1, a setting of docs/benchmark_findings.md):
    # the objects' outer layer and the unlabeled voxels within the ring of an annotated object (the whole object, as
    # object_rings and the ring's documentation measure it) are the head's annotated background
    lab = torch.zeros(1, 9, 10, dtype=torch.long)
    lab[0, 2:6, 2:6] = 1
    logits = torch.randn(1, 1, 9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    surface = torch.as_tensor(ref_surfaces(lab[0].numpy(), 1))
    ring = torch.as_tensor(ref_rings(lab[0].numpy(), (1, 1)))
    assert surface.sum() == 12 and ring.sum() == 36 - 16
    head = torch.where(surface | ring, -1, lab)
    loss = SpocoLoss(1, alpha=0, beta=0, gamma=0, instance_weight=0, unlabeled_weight=0, consistency_weight=0,
                     foreground=ForegroundLoss(10.0, surface=1, ring=1))  # fmt: skip
    value, grad = value_and_grad(lambda v: loss(torch.cat([torch.zeros_like(v), v], 1), lab), logits)
    ref_value, ref_grad = value_and_grad(lambda v: ForegroundLoss(10.0)(v, head), logits)
    assert (grad[0, 0][ring] != 0).all(), "the ring around the objects trains the head"
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


def test_auto_ring_for_a_few_annotated_objects():
    # 2 voxels along the finest axis, as thick in physical length along the others (at least 1); off for many
    # objects, none, or no voxel size
    assert auto_foreground_ring(5, [0.28, 0.127, 0.127]) == (1, 2, 2)  # GoNuclear's grid
    assert auto_foreground_ring(5, [1.0, 1.0]) == 2 and auto_foreground_ring(5, [1.0, 1.0, 1.0]) == 2
    assert auto_foreground_ring(5, [5.0, 1.0, 1.0]) == (1, 2, 2) and auto_foreground_ring(5, [0.5, 1.0]) == (2, 1)
    assert auto_foreground_ring(AUTO_RING_MAX_OBJECTS, [1.0, 1.0]) == 2
    assert auto_foreground_ring(AUTO_RING_MAX_OBJECTS + 1, [1.0, 1.0]) == 0
    assert auto_foreground_ring(0, [1.0, 1.0]) == 0 and auto_foreground_ring(3, [math.nan] * 3) == 0


def test_auto_ring_is_off_until_set():
    # ring "auto": off (a positive-unlabeled head, strokes its own term) until training sets it; strokes then join
    # the ring (how the threshold follows the ring: tests/test_teacher.py)
    head = ForegroundLoss(ring="auto", background_label=STROKES)
    assert head.ring == 0 and head.ring_auto and not head.ring_on and head.strokes and head.head_strokes
    head.set_ring((1, 2, 2))
    assert head.ring == (1, 2, 2) and head.ring_on and not head.head_strokes
    head.set_ring(0)
    assert not head.ring_on and head.head_strokes
    fixed = ForegroundLoss(ring=3)
    assert fixed.ring == 3 and fixed.ring_on and not fixed.ring_auto
    with pytest.raises(ValueError, match="foreground_ring"):
        ForegroundLoss(ring="wide")
    with pytest.raises(ValueError, match="foreground_ring"):
        head.set_ring([1, -1])


# ---------------------------------------------------------------------------------------------------------------------
# the full loss
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", SHAPES)
@pytest.mark.parametrize("foreground", [False, True])
def test_spoco_loss_matches_sum_of_references(spatial, foreground):
    emb_dim = 5
    student, target = make_case(spatial, emb_dim=emb_dim, seed=13)
    teacher = make_teacher(student, 14)
    if foreground:
        fg = torch.randn(2, 1, *spatial, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        student = torch.cat([student, fg], 1)
        teacher = torch.cat([teacher, fg], 1)
    weights = dict(alpha=1.3, beta=0.7, gamma=0.01, instance_weight=0.9, unlabeled_weight=1.1)
    weights.update(consistency_weight=0.8, foreground_weight=0.6)
    loss = SpocoLoss(embedding_dim=emb_dim, generator=torch.Generator().manual_seed(5), **weights)
    value, grad = value_and_grad(lambda x: loss((x, teacher), target), student)

    def reference(x):
        e = x[:, :emb_dim]
        per_image = (
            weights["alpha"] * ref_pull(e, target)
            + weights["beta"] * ref_push(e, target)
            + weights["gamma"] * ref_reg(e, target)
            + weights["instance_weight"] * ref_instance(e, target)
            + weights["unlabeled_weight"] * ref_unlabeled(e, target)
        )
        total = per_image.mean() + weights["consistency_weight"] * ref_consistency(e, teacher[:, :emb_dim], target, 5)
        if foreground:
            total = total + weights["foreground_weight"] * ref_foreground(x[:, emb_dim:], target)
        return total

    ref_value, ref_grad = value_and_grad(reference, student)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)

    terms = loss.statistics.terms
    assert set(terms) == {"pull", "push", "reg", "instance", "unlabeled", "consistency", "foreground", "total"}
    assert all(isinstance(v, float) for v in terms.values())
    e = student[:, :emb_dim]
    for name, ref in (("pull", ref_pull), ("push", ref_push), ("reg", ref_reg), ("instance", ref_instance)):
        assert terms[name] == pytest.approx(ref(e, target).mean().item(), rel=1e-6)
    assert terms["consistency"] == pytest.approx(ref_consistency(e, teacher[:, :emb_dim], target, 5).item(), rel=1e-6)
    assert terms["foreground"] == (
        pytest.approx(ref_foreground(student[:, emb_dim:], target).item()) if foreground else 0
    )
    assert terms["total"] == pytest.approx(ref_value.item(), rel=1e-6)


@pytest.mark.parametrize("spatial", SHAPES)
def test_sparse_annotations_match_reference(spatial):
    # ~10 % annotated voxels: the object sums take the gather path for sparse labels
    student, target = make_case(spatial, emb_dim=6, p_unlabeled=0.8, p_background=0.1, seed=19)
    assert 0 < (target > 0).float().mean() < 0.15
    teacher = make_teacher(student, 20)
    loss = SpocoLoss(embedding_dim=6, gamma=0.2, generator=torch.Generator().manual_seed(8))
    value, grad = value_and_grad(lambda x: loss((x, teacher), target), student)

    def reference(x):
        per_image = ref_pull(x, target) + ref_push(x, target) + 0.2 * ref_reg(x, target)
        per_image = per_image + ref_instance(x, target) + ref_unlabeled(x, target)
        return per_image.mean() + ref_consistency(x, teacher, target, 8)

    ref_value, ref_grad = value_and_grad(reference, student)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


def test_spoco_loss_student_only_skips_consistency():
    student, target = make_case((8, 9), emb_dim=16, seed=1)
    loss = SpocoLoss()
    value = loss(student, target)
    expected = (ref_pull(student, target) + ref_push(student, target) + 0.001 * ref_reg(student, target)).mean()
    expected = expected + (ref_instance(student, target) + ref_unlabeled(student, target)).mean()
    assert_close(value, expected)
    assert loss.statistics.terms["consistency"] == 0.0
    assert_close(loss([student, None], target), expected)


def test_zero_weights_skip_terms():
    student, target = make_case((8, 9), emb_dim=16, seed=2)
    teacher = make_teacher(student, 1)
    loss = SpocoLoss(beta=0, instance_weight=0, consistency_weight=0, gamma=0)
    value = loss((student, teacher), target)
    assert_close(value, (ref_pull(student, target) + ref_unlabeled(student, target)).mean())
    for name in ("push", "instance", "consistency", "reg"):
        assert loss.statistics.terms[name] == 0.0
    all_off = SpocoLoss(alpha=0, beta=0, gamma=0, instance_weight=0, unlabeled_weight=0, consistency_weight=0)
    x = student.clone().requires_grad_(True)
    out = all_off((x, teacher), target)
    out.backward()
    assert out.item() == 0.0 and (x.grad == 0).all()


def test_float32_agrees_with_float64_far_from_origin():
    # embeddings offset far from the origin: the centred distance expansion must stay accurate in float32
    student, target = make_case((10, 12), emb_dim=16, seed=3)
    student = student + 30.0
    teacher = make_teacher(student, 2)
    gen = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    v64 = SpocoLoss(generator=gen())((student, teacher), target)
    v32 = SpocoLoss(generator=gen())((student.float(), teacher.float()), target)
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), v64, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------------------------------


def _all_terms(student, target, teacher=None, emb_dim=None):
    emb_dim = student.shape[1] if emb_dim is None else emb_dim
    loss = SpocoLoss(embedding_dim=emb_dim, generator=torch.Generator().manual_seed(0))
    x = student.detach().clone().requires_grad_(True)
    value = loss((x, teacher) if teacher is not None else x, target)
    value.backward()
    assert torch.isfinite(x.grad).all()
    return value, loss.statistics.terms, x.grad


@pytest.mark.parametrize("spatial", SHAPES)
def test_no_objects(spatial):
    student, target = make_case(spatial, ids=(), seed=1)
    assert (target <= 0).all()
    value, terms, _ = _all_terms(student, target, make_teacher(student, 0))
    for name in ("pull", "push", "reg", "instance", "unlabeled"):
        assert terms[name] == 0.0
    assert terms["consistency"] > 0  # the unlabeled region still feeds the consistency term
    for cls in (PullLoss, PushLoss, MeanNormRegularizer, InstanceDiceLoss, UnlabeledPushLoss):
        assert cls()(student, target).item() == 0.0


def test_one_object():
    student, target = make_case((9, 10), ids=(1,), seed=2)
    value, terms, _ = _all_terms(student, target)
    assert terms["push"] == 0.0
    assert terms["pull"] == pytest.approx(ref_pull(student, target).mean().item(), rel=1e-6)
    assert terms["instance"] == pytest.approx(ref_instance(student, target).mean().item(), rel=1e-6)
    assert terms["unlabeled"] == pytest.approx(ref_unlabeled(student, target).mean().item(), rel=1e-6)


def test_mixed_batch_one_image_without_objects():
    student, target = make_case((9, 10), seed=3)
    target[1] = target[1].clamp(max=0)
    for cls, ref in ((PullLoss, ref_pull), (InstanceDiceLoss, ref_instance), (UnlabeledPushLoss, ref_unlabeled)):
        value = cls(reduction="none")(student, target)
        assert value[1].item() == 0.0
        assert_close(value, ref(student, target))


def test_no_unlabeled_voxels():
    student, target = make_case((9, 10), p_unlabeled=0.0, p_background=0.0, seed=4)
    assert (target > 0).all()
    value, terms, _ = _all_terms(student, target, make_teacher(student, 1))
    assert terms["unlabeled"] == 0.0 and terms["consistency"] == 0.0
    assert terms["instance"] == pytest.approx(ref_instance(student, target).mean().item(), rel=1e-6)


def test_ids_with_gaps_equal_consecutive_ids():
    student, target = make_case((9, 10), ids=(3, 17, 40), seed=5)
    consecutive = target.clone()
    for new, old in enumerate((3, 17, 40), start=1):
        consecutive[target == old] = new
    teacher = make_teacher(student, 2)
    v_gap, t_gap, g_gap = _all_terms(student, target, teacher)
    v_con, t_con, g_con = _all_terms(student, consecutive, teacher)
    assert_close(v_gap, v_con)
    assert_close(g_gap, g_con)
    assert t_gap["pull"] == pytest.approx(ref_pull(student, target).mean().item(), rel=1e-6)
    # huge raw ids take the sort-based relabelling path
    huge = target.clone()
    huge[target == 40] = 10**9
    assert_close(_all_terms(student, huge, teacher)[0], v_con)


def test_all_annotated_background():
    student, _ = make_case((6, 7), seed=6)
    target = -torch.ones(2, 1, 6, 7, dtype=torch.long)
    fg = torch.randn(2, 1, 6, 7, dtype=torch.float64)
    teacher = torch.cat([make_teacher(student, 0), fg], 1)
    value, terms, _ = _all_terms(torch.cat([student, fg], 1), target, teacher, emb_dim=student.shape[1])
    for name in ("pull", "push", "reg", "instance", "unlabeled"):
        assert terms[name] == 0.0
    assert terms["foreground"] == pytest.approx(F.binary_cross_entropy_with_logits(fg, torch.zeros_like(fg)).item())
    assert terms["consistency"] > 0


def test_target_without_channel_dim_and_int32():
    student, target = make_case((7, 8), seed=7)
    a = PullLoss()(student, target)
    b = PullLoss()(student, target[:, 0].int())
    assert_close(a, b)


def test_metatensor_inputs():
    from monai.data import MetaTensor

    student, target = make_case((7, 8), emb_dim=16, seed=8)
    plain = SpocoLoss()(student, target)
    meta = SpocoLoss()(MetaTensor(student), MetaTensor(target))
    assert type(meta) is torch.Tensor
    assert_close(meta, plain)


# ---------------------------------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------------------------------


def test_invalid_inputs():
    student, target = make_case((6, 7), emb_dim=16, seed=0)
    loss = SpocoLoss(embedding_dim=16)
    with pytest.raises(ValueError, match="channels"):
        loss(student[:, :15], target)
    with pytest.raises(ValueError, match="channels"):
        loss((student, student[:, :10]), target)
    with pytest.raises(ValueError, match="does not match"):
        loss(student, target[:, :, :5])
    with pytest.raises(ValueError, match="does not match"):
        loss(student, target[:1])
    with pytest.raises(ValueError, match="integer"):
        loss(student, target.double())
    with pytest.raises(ValueError, match="pair"):
        loss((student, student, student), target)
    with pytest.raises(ValueError, match="1 channel"):
        loss(student, torch.cat([target, target], 1))
    with pytest.raises(ValueError, match="shape"):
        loss(student[:, :, 0], target)
    with pytest.raises(ValueError, match="kernel_threshold"):
        SpocoLoss(kernel_threshold=1.0)
    with pytest.raises(ValueError, match="differs"):
        EmbeddingConsistencyLoss()(student, student[:, :, :5], target)


# ---------------------------------------------------------------------------------------------------------------------
# gradients through real networks
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreground", [False, True])
def test_gradients_reach_student_not_teacher(foreground):
    torch.manual_seed(0)
    emb_dim = 8
    channels = emb_dim + int(foreground)
    student_net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, channels, 1)
    )
    teacher_net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, channels, 1)
    )
    image = torch.randn(2, 1, 6, 10, 10)
    _, target = make_case((6, 10, 10), ids=(1, 2, 3), seed=1)
    teacher_input = (image + 0.1 * torch.randn_like(image)).requires_grad_(True)
    student_out = student_net(image)
    teacher_out = teacher_net(teacher_input)  # built with grad on purpose: the loss must not backpropagate into it
    loss = SpocoLoss(embedding_dim=emb_dim)((student_out, teacher_out), target)
    loss.backward()
    assert torch.isfinite(loss)
    for p in student_net.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert sum(p.grad.abs().sum() for p in student_net.parameters()) > 0
    assert all(p.grad is None for p in teacher_net.parameters())
    assert teacher_input.grad is None


def test_gradcheck_small():
    # numerical vs analytical gradients of the whole loss, float64, fixed anchors through a reseeded generator
    student, target = make_case((4, 5), emb_dim=3, seed=3)
    teacher = make_teacher(student, 4)

    def fn(x):
        loss = SpocoLoss(embedding_dim=3, gamma=0.1, generator=torch.Generator().manual_seed(2))
        return loss((x, teacher), target)

    assert torch.autograd.gradcheck(fn, (student.clone().requires_grad_(True),), eps=1e-6, atol=1e-6, fast_mode=True)


# ---------------------------------------------------------------------------------------------------------------------
# vectorisation: many objects in one 3D patch
# ---------------------------------------------------------------------------------------------------------------------


def test_many_objects_3d():
    # 200 objects in one 3D patch: the module has no loop over objects, so this is quick; the references are numpy
    # loops over the objects (values only; gradients are compared in the tests above)
    spatial = (12, 20, 20)
    student, target = make_case(spatial, batch=1, emb_dim=8, ids=tuple(range(1, 201)), p_unlabeled=0.3, seed=10)
    x, lab = (t.numpy() for t in _flat(student, target))
    x, lab = x[0], lab[0]
    ids = [k for k in np.unique(lab) if k > 0]
    assert len(ids) == 200
    masks = [lab == k for k in ids]
    mus = [x[:, m].mean(1) for m in masks]
    unl = lab <= 0
    pull = np.mean(
        [np.mean(np.maximum(np.linalg.norm(x[:, m] - mu[:, None], axis=0) - DV, 0) ** 2) for m, mu in zip(masks, mus)]
    )
    push = np.mean(
        [max(2 * DD - np.linalg.norm(a - b), 0.0) ** 2 for i, a in enumerate(mus) for j, b in enumerate(mus) if i != j]
    )
    reg = np.mean([np.linalg.norm(mu) for mu in mus])
    inst, unlabeled = [], []
    for m, mu in zip(masks, mus):
        d = np.linalg.norm(x - mu[:, None], axis=0)
        p = np.exp(-(d**2) / SCALE)
        inst.append(1 - 2 * p[m].sum() / ((p**2).sum() + m.sum() + EPS))
        unlabeled.append(np.mean(np.maximum(DD - d[unl], 0) ** 2))
    expected = {"pull": pull, "push": push, "reg": reg, "instance": np.mean(inst), "unlabeled": np.mean(unlabeled)}

    loss = SpocoLoss(embedding_dim=8, gamma=0.5)
    value = loss(student.clone().requires_grad_(True), target)
    value.backward()
    for name, ref in expected.items():
        assert loss.statistics.terms[name] == pytest.approx(ref, rel=1e-6), name
    total = pull + push + 0.5 * reg + expected["instance"] + expected["unlabeled"]
    assert value.item() == pytest.approx(total, rel=1e-6)


def test_small_blocks_and_recomputed_backward(monkeypatch):
    # force many voxel blocks and the memory-saving backward that recomputes every block instead of storing terms
    from spoco_bundle.losses import _core

    monkeypatch.setattr(_core, "_BLOCK_ELEMENTS_CPU", 2**9)
    monkeypatch.setattr(_core, "_STORE_ELEMENTS", 0)
    student, target = make_case((5, 9, 8), emb_dim=4, seed=17)
    teacher = make_teacher(student, 18)
    loss = SpocoLoss(embedding_dim=4, generator=torch.Generator().manual_seed(6))
    value, grad = value_and_grad(lambda x: loss((x, teacher), target), student)

    def reference(x):
        per_image = ref_pull(x, target) + ref_push(x, target) + 0.001 * ref_reg(x, target)
        per_image = per_image + ref_instance(x, target) + ref_unlabeled(x, target)
        return per_image.mean() + ref_consistency(x, teacher, target, 6)

    ref_value, ref_grad = value_and_grad(reference, student)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)
    random_anchor = InstanceDiceLoss(anchor="random", reduction="none", generator=torch.Generator().manual_seed(2))
    value, grad = value_and_grad(lambda x: random_anchor(x, target), student)
    anchors = ref_random_anchors(target, 2)
    ref_value, ref_grad = value_and_grad(lambda x: ref_instance(x, target, anchors), student)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


def test_kernel_scale():
    assert kernel_scale(DV, T) == pytest.approx(SCALE)
    assert math.exp(-(DV**2) / kernel_scale(DV, 0.3)) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        kernel_scale(0.0, 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# the CUDA path (other block sizes, GPU kernels) against the CPU one; skipped without a CUDA device
# ---------------------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _loss_on(device: str, student, teacher, target, dtype=torch.float64, seed: int = 5):
    # a CPU generator on both devices: the same random anchors (see losses._uniform)
    loss = SpocoLoss(embedding_dim=student.shape[1] - 1, generator=torch.Generator().manual_seed(seed))
    x = student.to(device, dtype).detach().requires_grad_(True)
    value = loss((x, teacher.to(device, dtype)), target.to(device))
    value.backward()
    return value.detach().cpu(), x.grad.cpu(), loss.statistics.terms


@needs_cuda
@pytest.mark.parametrize("spatial", SHAPES)
def test_spoco_loss_on_cuda_matches_cpu(spatial):
    student, target = make_case(spatial, emb_dim=5, seed=13)
    teacher = make_teacher(student, 14)
    fg = torch.randn(2, 1, *spatial, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    student, teacher = torch.cat([student, fg], 1), torch.cat([teacher, fg], 1)
    v_cpu, g_cpu, t_cpu = _loss_on("cpu", student, teacher, target)
    v_gpu, g_gpu, t_gpu = _loss_on("cuda", student, teacher, target)
    assert v_cpu.item() > 0 and g_cpu.abs().sum() > 0
    assert_close(v_gpu, v_cpu)
    assert_close(g_gpu, g_cpu)
    assert t_gpu == pytest.approx(t_cpu, rel=1e-6, abs=1e-9)


@needs_cuda
def test_spoco_loss_on_cuda_matches_cpu_at_training_size():
    # a 3D training patch in float32 with 30 objects: the CPU sums run in several voxel blocks, the GPU's in one
    student, target = make_case((32, 64, 64), emb_dim=16, ids=tuple(range(1, 31)), seed=4)
    teacher = make_teacher(student, 5)
    fg = torch.randn(2, 1, 32, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    student, teacher = torch.cat([student, fg], 1), torch.cat([teacher, fg], 1)
    v_cpu, g_cpu, _ = _loss_on("cpu", student, teacher, target, torch.float32)
    v_gpu, g_gpu, _ = _loss_on("cuda", student, teacher, target, torch.float32)
    torch.testing.assert_close(v_gpu, v_cpu, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-3, atol=1e-7)
