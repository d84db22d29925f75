import copy
import math

import pytest
import torch

from spoco_bundle.networks import EmbeddingUNet, default_patch_size, make_teacher


@pytest.mark.parametrize("spatial_dims,shape", [(2, (2, 1, 64, 48)), (3, (2, 1, 16, 32, 24))])
@pytest.mark.parametrize("fg", [True, False])
def test_output_shape_and_channels(spatial_dims, shape, fg):
    net = EmbeddingUNet(spatial_dims=spatial_dims, embedding_dim=8, features=(8, 16, 32), foreground_head=fg)
    out = net(torch.randn(shape))
    assert out.shape == (shape[0], 8 + int(fg), *shape[2:])


def test_head_is_linear():
    # scaling the head's weights and bias scales the output exactly: no activation after the 1x1 conv
    torch.manual_seed(0)
    net = EmbeddingUNet(spatial_dims=2, embedding_dim=4, features=(8, 16, 16), foreground_head=False).eval()
    x = torch.randn(1, 1, 32, 32)
    y1 = net(x)
    head = net.output_block.conv.conv
    assert head.kernel_size == (1, 1)
    with torch.no_grad():
        head.weight.mul_(-3.0)
        head.bias.mul_(-3.0)
    torch.testing.assert_close(net(x), -3.0 * y1, rtol=1e-5, atol=1e-5)
    assert (y1 < 0).any() and (y1 > 0).any()


def test_anisotropic_strides():
    net = EmbeddingUNet(spatial_dims=3, embedding_dim=4, features=(8, 16, 32), strides=[1, [1, 2, 2], 2])
    assert net(torch.randn(1, 1, 8, 32, 32)).shape == (1, 5, 8, 32, 32)


def test_state_dict_roundtrip_strict(tmp_path):
    net = EmbeddingUNet(spatial_dims=3, embedding_dim=16, features=(8, 16, 16))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    other = EmbeddingUNet(spatial_dims=3, embedding_dim=16, features=(8, 16, 16))
    other.load_state_dict(torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True), strict=True)
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_teacher_is_frozen_copy():
    net = EmbeddingUNet(spatial_dims=2, embedding_dim=4, features=(8, 16, 16))
    teacher = make_teacher(net)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in net.parameters())
    for (n1, a), (n2, b) in zip(net.named_parameters(), teacher.named_parameters()):
        assert n1 == n2 and torch.equal(a, b) and a.data_ptr() != b.data_ptr()


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"features": (8, 16)}, "three levels"),
        ({"features": (8, 16, 32), "strides": [1, 2]}, "must match"),
    ],
)
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        EmbeddingUNet(**kwargs)


def test_default_patch_size():
    assert len(default_patch_size(2)) == 2 and len(default_patch_size(3)) == 3
    with pytest.raises(ValueError):
        default_patch_size(1)


def test_foreground_logit_calibrated_in_eval_mode_only():
    torch.manual_seed(0)
    net = EmbeddingUNet(spatial_dims=2, embedding_dim=4, features=(8, 16, 16))
    x = torch.randn(1, 1, 32, 32)
    assert float(net.fg_label_frequency) == 1.0 and "fg_label_frequency" in net.state_dict()
    raw = net.train()(x).detach()  # group norm: train and eval outputs agree, so any difference is the shift
    torch.testing.assert_close(net.eval()(x), raw)  # c = 1: logit(1/2) = 0, nothing changes
    net.fg_label_frequency.fill_(0.2)
    out = net(x)
    torch.testing.assert_close(out[:, :4], raw[:, :4])
    # sigmoid(out) > 1/2 exactly where sigmoid(raw) > c/2 = 0.1
    torch.testing.assert_close(out[:, 4], raw[:, 4] - math.log(0.1 / 0.9), rtol=1e-5, atol=1e-5)
    # a head trained with annotated voxels weighted w has w times the odds: the shift also removes log(w)
    net.fg_positive_weight.fill_(10.0)
    out = net(x)
    torch.testing.assert_close(out[:, 4], raw[:, 4] - math.log(0.1 / 0.9) - math.log(10.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.train()(x), raw)


def test_checkpoint_without_label_frequency_loads_with_c_1(tmp_path):
    # model.pt files of bundle 0.1 have neither buffer, those of 0.2 no fg_positive_weight (unweighted heads);
    # everything else must still match strictly
    net = EmbeddingUNet(spatial_dims=2, embedding_dim=4, features=(8, 16, 16))
    state = net.state_dict()
    del state["fg_positive_weight"]
    other = EmbeddingUNet(spatial_dims=2, embedding_dim=4, features=(8, 16, 16))
    other.fg_positive_weight.fill_(10.0)
    state["fg_label_frequency"] = torch.tensor(0.2)
    other.load_state_dict(state, strict=True)
    assert float(other.fg_positive_weight) == 1.0 and float(other.fg_label_frequency) == pytest.approx(0.2)
    del state["fg_label_frequency"]
    other.fg_label_frequency.fill_(0.3)
    other.load_state_dict(state, strict=True)
    assert float(other.fg_label_frequency) == 1.0
    # those before 0.9 record no training sizes: unknown (0), so image_scale "auto" leaves images as they are
    del state["object_diameter"], state["image_blob_scale"]
    other.object_diameter.fill_(12.0)
    other.image_blob_scale.fill_(3.0)
    other.load_state_dict(state, strict=True)
    assert float(other.object_diameter) == 0.0 and other.image_blob_scale.tolist() == [0.0, 0.0, 0.0]
    del state["output_block.conv.conv.bias"]
    with pytest.raises(RuntimeError):
        other.load_state_dict(state, strict=True)


def test_a_checkpoint_with_a_retired_buffer_loads_only_at_its_neutral_value():
    # checkpoints of earlier versions hold input_gamma (a power law on the input, retired): at 1 the weights saw the
    # input as this version gives it, so the buffer is dropped and the rest loads strictly; another value is refused
    from spoco_bundle.networks import RETIRED_BUFFERS

    assert RETIRED_BUFFERS == {"input_gamma": 1.0}
    kwargs = {"spatial_dims": 2, "embedding_dim": 4, "features": (8, 16, 16)}
    torch.manual_seed(0)
    net = EmbeddingUNet(**kwargs)
    old = {**net.state_dict(), "input_gamma": torch.tensor(1.0)}
    other = EmbeddingUNet(**kwargs)
    other.load_state_dict(old, strict=True)
    assert "input_gamma" not in other.state_dict() and not hasattr(other, "input_gamma")
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in other.state_dict().items())
    # a non-strict load (MONAI Label, CheckpointLoader) and a teacher inside a parent module the same
    make_teacher(other).load_state_dict(old, strict=False)
    parent = torch.nn.ModuleDict({"net": EmbeddingUNet(**kwargs)})
    parent.load_state_dict({f"net.{k}": v for k, v in old.items()}, strict=True)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError) as info:
        other.load_state_dict({**net.state_dict(), "input_gamma": torch.tensor(0.5)}, strict=True)
    assert str(info.value) == (
        "the checkpoint was trained with input_gamma 0.5, an option this version of the bundle no longer has: "
        "segment with the bundle version that trained it, or retrain."
    )
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # nothing loaded


def test_a_retired_buffer_away_from_its_neutral_value_is_refused_by_load_weights(tmp_path):
    from spoco_bundle.networks import load_weights, with_pretrained

    kwargs = {"spatial_dims": 2, "embedding_dim": 4, "features": (8, 16, 16)}
    path = tmp_path / "model.pt"
    torch.save({**EmbeddingUNet(**kwargs).state_dict(), "input_gamma": torch.tensor(1.0)}, path)
    load_weights(EmbeddingUNet(**kwargs), str(path))  # inference, packaging, MONAI Label deployment
    with_pretrained(EmbeddingUNet(**kwargs), str(path))  # fine-tuning
    torch.save({**EmbeddingUNet(**kwargs).state_dict(), "input_gamma": torch.tensor(2.0)}, path)
    for load in (load_weights, with_pretrained):
        with pytest.raises(ValueError) as info:
            load(EmbeddingUNet(**kwargs), str(path))
        assert str(info.value) == (
            f"Checkpoint {path}: the checkpoint was trained with input_gamma 2, an option this version of the bundle "
            "no longer has: segment with the bundle version that trained it, or retrain."
        )
