"""Background strokes a user paints (``--background_label B``): the foreground head's loss with annotated
background strokes, positive-unlabeled plus a stroke term. (The strokes the accuracy benchmark simulates in dense
ground truth are the lab's: research/recipes/scribbles.py and research/tests/test_scribbles.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spoco_bundle.losses import ForegroundLoss, SpocoLoss


def test_stroke_regime_is_positive_unlabeled_plus_a_stroke_term():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 6, 7, requires_grad=True)
    target = torch.zeros(2, 1, 6, 7, dtype=torch.long)
    target[0, 0, :2] = 1  # image 0: an object and a stroke
    target[0, 0, 5, :3] = -1
    target[1, 0, 3:, 4:] = 2  # image 1: an object, no stroke in this patch
    loss = ForegroundLoss(positive_weight=10.0, strokes=True)(logits, target)
    x, t = logits[:, 0].reshape(2, -1), target[:, 0].reshape(2, -1)
    bce = F.binary_cross_entropy_with_logits(x, (t > 0).float(), reduction="none")
    expected = torch.where(t > 0, 10 * bce, bce).mean() + bce[t < 0].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad != 0)  # every voxel counts: unlabeled ones are the negatives of PU learning
    # without strokes the same target is plain positive-unlabeled learning (image 0 would be supervised otherwise)
    no_strokes = target.clamp_min(0)
    pu = ForegroundLoss(positive_weight=10.0, strokes=True)(logits, no_strokes)
    assert pu.item() == pytest.approx(ForegroundLoss(positive_weight=10.0)(logits, no_strokes).item(), rel=1e-6)


def test_spoco_loss_estimates_the_label_frequency_on_images_with_strokes():
    emb = torch.randn(1, 5, 8, 8)  # 4 embedding channels + foreground logit
    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target[0, 0, :3, :3] = 1
    target[0, 0, 6:, 6:] = 2
    target[0, 0, 4, :5] = -1  # a stroke
    dense = SpocoLoss(embedding_dim=4)  # annotated background taken as dense: the image is supervised, no c
    dense(emb, target)
    assert dense.last_label_frequency[1] == 0
    strokes = SpocoLoss(embedding_dim=4, foreground_strokes=True)
    strokes(emb, target)
    assert strokes.last_label_frequency[1] == 13  # 9 + 4 annotated pixels: c from every image
