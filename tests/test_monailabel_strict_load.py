"""The strict-load guard of EmbeddingUNet, as MONAI Label and MONAI's CheckpointLoader call it (strict=False).

These run in the main environment: the guard lives in the network, not in MONAI Label. The MONAI Label server and
task tests (tests/test_monailabel_*.py) check the same guard through the real BundleInferTask.
"""

from __future__ import annotations

import copy

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader

from spoco_bundle.networks import EmbeddingUNet, make_teacher

FEATURES = [8, 16, 32]


def _net(**kwargs) -> EmbeddingUNet:
    torch.manual_seed(0)
    return EmbeddingUNet(spatial_dims=3, features=FEATURES, **kwargs)


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_non_strict_load_with_prefixed_keys_is_refused():
    """What MONAI Label does with a DDP-style ('module.'-prefixed) checkpoint: load_state_dict(..., strict=False)."""
    src = _net()
    prefixed = {f"module.{k}": v for k, v in src.state_dict().items()}
    for dst in (EmbeddingUNet(features=FEATURES), copy.deepcopy(src), make_teacher(src)):
        before = copy.deepcopy(dst.state_dict())
        with pytest.raises(RuntimeError, match="does not match EmbeddingUNet .*missing keys.*module.bottleneck"):
            dst.load_state_dict(prefixed, strict=False)
        # nothing half-loaded is left behind unnoticed: the error is raised, the caller cannot go on silently
        assert before.keys() == dst.state_dict().keys()


def test_non_strict_load_with_missing_keys_is_refused():
    src = _net()
    partial = {k: v for k, v in src.state_dict().items() if not k.startswith("output_block")}
    with pytest.raises(RuntimeError, match=r"\d+ missing keys, e.g. \['output_block"):
        EmbeddingUNet(features=FEATURES).load_state_dict(partial, strict=False)


def test_complete_state_dict_loads_with_strict_false():
    src, dst = _net(), EmbeddingUNet(features=FEATURES)
    assert not _weights_equal(src, dst)
    result = dst.load_state_dict(src.state_dict(), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert _weights_equal(src, dst)


def test_guard_can_be_switched_off_for_partial_loads():
    src = _net()
    partial = {k: v for k, v in src.state_dict().items() if not k.startswith("output_block")}
    dst = EmbeddingUNet(features=FEATURES, strict_load=False)
    result = dst.load_state_dict(partial, strict=False)
    assert result.missing_keys and all(k.startswith("output_block") for k in result.missing_keys)


def test_guard_checks_only_its_own_keys_inside_a_parent_module():
    class Parent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = EmbeddingUNet(features=FEATURES)
            self.extra = torch.nn.Linear(2, 2)

    src = _net()
    parent = Parent()
    # the other child's keys may be missing in a non-strict load of the parent ...
    result = parent.load_state_dict({f"net.{k}": v for k, v in src.state_dict().items()}, strict=False)
    assert sorted(result.missing_keys) == ["extra.bias", "extra.weight"]
    assert _weights_equal(parent.net, src)
    # ... but not the network's
    with pytest.raises(RuntimeError, match="does not match EmbeddingUNet"):
        parent.load_state_dict({"extra.weight": torch.zeros(2, 2)}, strict=False)


def test_checkpoint_loader_non_strict(tmp_path):
    """MONAI Label's training inserts CheckpointLoader(strict=False) for models/model.pt: a matching plain state
    dict loads, a mismatching one fails loudly instead of training on from random weights."""
    src = _net()
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save(src.state_dict(), good)
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, bad)
    engine = Engine(lambda e, b: None)

    dst = EmbeddingUNet(features=FEATURES)
    CheckpointLoader(load_path=str(good), load_dict={"model": dst}, strict=False)(engine)
    assert _weights_equal(src, dst)

    dst = EmbeddingUNet(features=FEATURES)
    loader = CheckpointLoader(load_path=str(bad), load_dict={"model": dst}, strict=False)
    with pytest.raises(RuntimeError, match="does not match EmbeddingUNet"):
        loader(engine)
