"""The configs hold one definition of each thing: training's validation runs inference's post-processing chain with
inference's defaults, and the threshold pass sees training items as training does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser
from monai.transforms import CastToTyped, RandFlipd, SpatialPadd

from spoco_bundle.bundle import config_parser, inference_postprocessing
from spoco_bundle.errors import root_cause
from spoco_bundle.handlers import deterministic_part
from spoco_bundle.networks import EmbeddingUNet, NetworkObjectDiameter

ROOT = Path(__file__).resolve().parents[1]
TRAIN, INFERENCE = ROOT / "configs" / "train.json", ROOT / "configs" / "inference.json"


def _validation_chain_ids() -> dict:
    """The inference ids train.json passes to validation's chain, with train.json's values."""
    ids = json.loads(TRAIN.read_text())["validate"]["postprocessing"]
    return {k: v for k, v in ids.items() if not k.startswith("_") and k not in ("root", "network")}


def test_validation_forwards_inference_ids_with_inference_defaults():
    train, inference = json.loads(TRAIN.read_text()), json.loads(INFERENCE.read_text())
    forwarded = _validation_chain_ids()
    assert {"clustering", "shape_split", "min_diameter_ratio", "embedding_dim"} <= set(forwarded)
    for key, ref in forwarded.items():
        assert ref == f"@{key}", (key, ref)  # passed under its own name
        assert key in inference, key
        if not str(inference[key]).startswith("$"):  # literal defaults (embedding_dim, min_size come from the card)
            assert train[key] == inference[key], (key, train[key], inference[key])


def test_validation_runs_the_chain_of_inference_json():
    parser = config_parser(TRAIN)
    parser["spatial_dims"], parser["features"] = 2, [8, 16, 32]
    validation = parser.get_parsed_content("validate#postprocessing")
    inference = config_parser(INFERENCE).get_parsed_content("postprocessing")
    assert [type(t) for t in validation.transforms] == [type(t) for t in inference.transforms]
    # the size filter of validation reads the student's recorded object size while it trains
    sizes = [t for t in validation.transforms if type(t).__name__ == "RemoveSmallInstancesd"]
    assert isinstance(sizes[0].remove.object_diameter, NetworkObjectDiameter)
    assert float(sizes[0].remove.object_diameter) == 0.0  # nothing recorded before training starts


def test_inference_postprocessing_sets_ids_and_refuses_unknown_ones():
    net = EmbeddingUNet(spatial_dims=2, embedding_dim=4, features=(8, 16, 16))
    net.object_diameter.fill_(12.0)
    chain = inference_postprocessing(ROOT, network=net, embedding_dim=4, clustering="fast", min_size=7)
    cluster = next(t for t in chain.transforms if type(t).__name__ == "ClusterInstancesd")
    assert cluster.cluster.method == "fast" and cluster.cluster.embedding_dim == 4
    size = next(t for t in chain.transforms if type(t).__name__ == "RemoveSmallInstancesd")
    assert size.remove.min_size == 7 and float(size.remove.object_diameter) == 12.0
    with pytest.raises(ValueError, match="clusterin"):
        inference_postprocessing(ROOT, clusterin="fast")


def test_threshold_pass_takes_the_deterministic_training_steps_without_padding():
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser["bundle_root"] = str(ROOT)
    preprocessing = parser.get_parsed_content("train#preprocessing")
    part = deterministic_part(preprocessing)
    names = [type(t).__name__ for t in part.transforms]
    assert names[0] == "LoadVolumed" and "SparseInstanceLabeld" in names and "Rescaled" in names
    assert "SpatialPadd" not in names and not any(n.startswith("Rand") for n in names)
    # a plain list works too, and stops at the first random step
    cast, pad, flip = CastToTyped("image", "float32"), SpatialPadd("image", (4, 4)), RandFlipd("image", prob=1.0)
    assert list(deterministic_part([cast, pad, flip, cast]).transforms) == [cast]
    assert list(deterministic_part([flip, cast]).transforms) == []


def test_training_from_a_pretrained_model_takes_its_cards_settings(tmp_path):
    import shutil

    card = json.loads((ROOT / "models" / "nuclei2d" / "model.json").read_text())
    ids = ("spatial_dims", "features", "embedding_dim", "patch_size", "intensity_percentiles")

    def resolved(**update) -> dict:
        parser = config_parser(TRAIN)
        parser.update(update)
        return {k: parser.get_parsed_content(k) for k in ids}

    # a shipped model by name: a 2D network without --spatial_dims 2
    assert resolved(pretrained="nuclei2d") == {k: card["inference"][k] for k in ids}
    assert resolved()["spatial_dims"] == 3  # without one: the bundle's defaults
    # a model.pt of one's own: its card, and a flag given explicitly still wins
    own = tmp_path / "own"
    own.mkdir()
    shutil.copy(ROOT / "models" / "nuclei2d" / "model.pt", own / "model.pt")
    card["inference"].update(patch_size=[96, 96], intensity_percentiles=[2, 99.5])
    (own / "model.json").write_text(json.dumps(card))
    assert resolved(pretrained=str(own / "model.pt"))["patch_size"] == [96, 96]
    assert resolved(pretrained=str(own / "model.pt"), patch_size=[128, 128])["patch_size"] == [128, 128]
    parser = config_parser(TRAIN)
    parser.update({"pretrained": str(own / "model.pt")})
    network = parser.get_parsed_content("network")  # the weights load into the network the card describes
    assert network.spatial_dims == 2
    # a contradicting flag is one clear error naming it
    parser = config_parser(TRAIN)
    parser.update({"pretrained": "nuclei2d", "spatial_dims": 3})
    with pytest.raises(Exception) as error:
        parser.get_parsed_content("network")
    assert "--spatial_dims 3 contradicts its spatial_dims 2" in str(root_cause(error.value))
