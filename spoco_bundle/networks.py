"""Embedding U-Net: MONAI's DynUNet with a linear 1x1 head producing SPOCO pixel embeddings."""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import DynUNet

from spoco_bundle.cards import available, bundle_root, check_network, checkpoint, flag_value

logger = logging.getLogger(__name__)

__all__ = [
    "EmbeddingUNet",
    "NetworkWrapper",
    "make_teacher",
    "default_patch_size",
    "default_strides",
    "downsampling",
    "read_state_dict",
    "load_weights",
    "architecture",
    "with_pretrained",
    "unwrap",
    "recorded_object_diameter",
    "RecordedObjectDiameter",
    "NetworkObjectDiameter",
]


class EmbeddingUNet(DynUNet):
    """
    U-Net mapping an image to per-voxel embeddings (SPOCO's ``f``), built on :class:`monai.networks.nets.DynUNet`.

    Each level has two 3x3(x3) convolutions with group norm (8 groups, as the reference U-Net) and leaky ReLU; the head
    is a 1x1 convolution with no activation, as SPOCO requires (a bounded head would distort the distance margins of
    the losses). When ``foreground_head`` is True, one extra output channel (the last) carries a foreground logit
    (see :class:`~spoco_bundle.losses.ForegroundLoss`); the embedding channels are unaffected by it. In eval mode that
    logit is calibrated with the buffers ``fg_label_frequency`` (the label frequency ``c`` of positive-unlabeled
    training, 1 when background was annotated) and ``fg_positive_weight`` (the weight ``w`` of annotated voxels in that
    training): the logit is shifted by ``-(logit(c / 2) + log w)``, so that ``sigmoid > 0.5`` means "more likely
    foreground than not". Both are set by :class:`~spoco_bundle.handlers.ForegroundCalibration`.

    Args:
        spatial_dims: 2 or 3.
        in_channels: number of image channels.
        embedding_dim: embedding size E (16 in the paper).
        features: feature maps per level, e.g. ``(16, 32, 64, 128)``; the number of levels is ``len(features)``
            (at least 3).
        strides: per-level down-sampling strides (first entry applies to the input level and is normally 1). Use
            per-axis strides such as ``[[1, 1, 1], [1, 2, 2], [2, 2, 2]]`` for anisotropic volumes. Defaults to
            ``[1, 2, 2, ...]``.
        foreground_head: add the foreground logit channel.
        norm_name: normalisation, as accepted by DynUNet. Group norm is the default: per-sample like instance
            norm, but ~20 % faster on CPU with channels-last tensors (instance norm forces layout copies).
        strict_load: refuse any ``load_state_dict`` whose keys do not match this network exactly, even when the
            caller passes ``strict=False`` (MONAI Label and MONAI's ``CheckpointLoader`` do by default, which would
            silently keep random weights on a mismatch). Set False to allow partial loads.

    Shapes:
        input ``(B, in_channels, *S)``; output ``(B, embedding_dim + foreground_head, *S)``. Every spatial size must be
        divisible by the product of the strides along that axis (sliding-window inference takes care of it).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        embedding_dim: int = 16,
        features: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[Sequence[int] | int] | None = None,
        foreground_head: bool = True,
        norm_name: tuple | str = ("group", {"num_groups": 8}),
        strict_load: bool = True,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}.")
        features = [int(f) for f in features]
        if len(features) < 3:  # DynUNet's minimum: input level, one down-sampling, bottleneck
            raise ValueError(f"features needs at least three levels, got {features}.")
        if strides is None:
            strides = default_strides(features)
        if len(strides) != len(features):
            raise ValueError(f"strides ({len(strides)} levels) and features ({len(features)} levels) must match.")
        self.spatial_dims = spatial_dims
        self.embedding_dim = embedding_dim
        self.foreground_head = foreground_head
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=embedding_dim + int(foreground_head),
            kernel_size=[3] * len(features),
            strides=list(strides),
            upsample_kernel_size=list(strides[1:]),
            filters=features,
            norm_name=norm_name,
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            deep_supervision=False,
            res_block=False,
        )
        # fraction of the foreground that was annotated (label frequency c, see spoco_bundle.losses.ForegroundLoss),
        # estimated during positive-unlabeled training; 1.0 = the head was trained with annotated background
        self.register_buffer("fg_label_frequency", torch.ones(()))
        # weight of annotated voxels in that training (ForegroundLoss positive_weight); 1.0 = unweighted
        self.register_buffer("fg_positive_weight", torch.ones(()))
        # the size of what the model was trained on, recorded by spoco_bundle.handlers.TrainingSetRecorder (0 =
        # unknown): the median diameter of the annotated objects, and the 10th / 50th / 90th percentile of the
        # training images' blob size (spoco_bundle.measure.blob_scale), both in voxels of the network's grid;
        # inference with image_scale "auto" resamples images whose blob size lies outside that range
        self.register_buffer("object_diameter", torch.zeros(()))
        self.register_buffer("image_blob_scale", torch.zeros(3))
        if foreground_head:
            # start the foreground logit at P = 0.12 instead of 0.5: foreground is the minority class, and Adam moves a
            # bias by about the learning rate per step, too slowly for CPU-length runs to get there on their own
            with torch.no_grad():
                self.output_block.conv.conv.bias[-1].fill_(-2.0)
        # channels-last convolutions are faster in the backward pass on CPU (oneDNN) and neutral on GPU
        self.memory_format = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
        self.to(memory_format=self.memory_format)
        # checkpoints of earlier versions: buffers they predate get their neutral value, retired ones go
        self.register_load_state_dict_pre_hook(_earlier_versions)
        if strict_load:
            self.register_load_state_dict_pre_hook(_refuse_partial_state_dict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # DynUNet.forward without deep supervision, spelled out (and the layout picked by a branch): TorchScript,
        # which ckpt_export uses, supports neither super() nor a torch.memory_format attribute
        if self.spatial_dims == 3:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        else:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.skip_layers(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The 1x1 output convolution on the last decoder level's ``features`` ``(B, features[0], *S)``, then
        :meth:`calibrate`: the rest of :meth:`forward` after ``skip_layers``."""
        return self.calibrate(self.output_block(features).contiguous())  # standard layout for losses and clustering

    def calibrate(self, out: torch.Tensor) -> torch.Tensor:
        """In eval mode, the foreground logit (the last channel of the head's output ``out``) calibrated in place."""
        if self.foreground_head and not self.training:
            # calibrate the positive-unlabeled head: g > c/2  <=>  P(foreground) > 1/2, where the weighted head's odds
            # are w times g's (a no-op for c = w = 1)
            half_c = (0.5 * self.fg_label_frequency).clamp(1e-6, 1 - 1e-6)
            shift = torch.log(half_c) - torch.log1p(-half_c) + torch.log(self.fg_positive_weight.clamp_min(1e-6))
            out[:, -1:] -= shift.to(out.dtype)
        return out


class NetworkWrapper(torch.nn.Module):
    """A module around ``self.network`` whose other attributes are the wrapped network's (what the inferers and the
    blockwise path read: strides, kernel sizes, the recorded object size, ...)."""

    network: torch.nn.Module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("network"), name)


# buffers of earlier versions for options that are gone, with the value that meant "not used"
RETIRED_BUFFERS = {"input_gamma": 1.0}


def _earlier_versions(module: torch.nn.Module, state_dict: Mapping, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: checkpoints of earlier versions still load. Buffers they predate take the value
    that means "nothing recorded" (a head never calibrated: c = w = 1; object and blob size 0 = unknown); buffers of
    retired options (:data:`RETIRED_BUFFERS`) are dropped when they hold their neutral value and refused otherwise
    (the weights were trained for an input this version no longer makes)."""
    if not any(k.startswith(prefix + "output_block.") for k in state_dict):
        return
    for name in ("fg_label_frequency", "fg_positive_weight"):
        state_dict.setdefault(prefix + name, torch.ones(()))  # type: ignore[attr-defined]
    for name, shape in (("object_diameter", ()), ("image_blob_scale", (3,))):
        state_dict.setdefault(prefix + name, torch.zeros(shape))  # type: ignore[attr-defined]
    for name, unused in RETIRED_BUFFERS.items():
        value = state_dict.pop(prefix + name, None)  # type: ignore[attr-defined]
        if value is not None and float(value) != unused:
            raise ValueError(
                f"the checkpoint was trained with {name} {float(value):g}, an option this version of the bundle no "
                "longer has: segment with the bundle version that trained it, or retrain."
            )


def _refuse_partial_state_dict(
    module: torch.nn.Module,
    state_dict: Mapping,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """``load_state_dict`` pre-hook of :class:`EmbeddingUNet`: a load with missing or unexpected keys becomes an error
    even with ``strict=False`` (torch raises on any entry of ``error_msgs``; it always passes ``strict=True`` to
    hooks, so the caller's flag cannot be told apart here)."""
    expected = {prefix + k for k in module.state_dict()}
    given = {k for k in state_dict if k.startswith(prefix)}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        error_msgs.append(
            f"the checkpoint does not match {type(module).__name__} ({len(missing)} missing keys, e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected keys, e.g. {unexpected[:3]}): refusing a non-strict load "
            "that would keep random weights. Check spatial_dims, embedding_dim, features and foreground_head "
            "against the training run, and that the file is a plain state dict (models/model.pt)."
        )


def make_teacher(student: torch.nn.Module) -> torch.nn.Module:
    """
    Momentum teacher ``g``: a frozen deep copy of the student, updated only by :class:`MomentumTeacherHandler`.
    """
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def default_strides(features: Sequence[int]) -> list[int]:
    """The U-Net's stride per level when none are given: the input level keeps its size, every further level halves
    it."""
    return [1] + [2] * (len(features) - 1)


def downsampling(features: Sequence[int]) -> int:
    """How much a U-Net with ``features`` per level and :func:`default_strides` down-samples: every input size must
    be a multiple of it."""
    return math.prod(default_strides(features))


def default_patch_size(spatial_dims: int) -> list[int]:
    """Training patch size used when the config does not set ``patch_size``: sized for CPU training."""
    if spatial_dims == 3:
        return [32, 64, 64]
    if spatial_dims == 2:
        return [192, 192]
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")


def read_state_dict(ckpt_path: str, map_location: str | torch.device = "cpu") -> dict:
    """
    The network state dict in a checkpoint file: a plain ``model.pt``, or the student of a resume checkpoint.

    Raises:
        ValueError: the file cannot be read, or holds no state dict (naming the file).
    """
    try:
        state = torch.load(ckpt_path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"Cannot read checkpoint {ckpt_path}: {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a resume checkpoint: take the student
    if not isinstance(state, dict):
        raise ValueError(f"Checkpoint {ckpt_path} does not hold a state dict (got {type(state).__name__}).")
    return state


def load_weights(network: torch.nn.Module, ckpt_path: str, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """
    Load a plain state dict (``model.pt``) into ``network`` strictly, with an error that says what to fix.

    MONAI's own loaders (and MONAI Label) load non-strictly, which silently keeps random weights on a key mismatch;
    this is the guard against that.

    The checkpoint's card (``model.json`` beside it, :mod:`spoco_bundle.cards`) is checked first: a network whose
    ``spatial_dims``, ``features`` or ``embedding_dim`` contradicts it is refused with one line naming both values.
    Without a card, a network of another shape is refused with the shape read from the weights
    (:func:`architecture`).

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: the file is not a state dict, or its keys/shapes do not match the network or its card.
    """
    if not os.path.isfile(ckpt_path):
        shipped = available(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path))))
        hint = f", or segment with a shipped model: --model {' / '.join(shipped)}" if shipped else ""
        raise FileNotFoundError(
            f"Checkpoint {ckpt_path} not found (train first, or pass --ckpt PATH{hint}; --ckpt_path with monai.bundle "
            "run)."
        )
    state = read_state_dict(ckpt_path, map_location)
    check_network(network, ckpt_path)  # flags that contradict the checkpoint's model.json: one clear line
    try:
        network.load_state_dict(state, strict=True)
    except ValueError as e:  # a retired option the weights were trained with (_earlier_versions)
        raise ValueError(f"Checkpoint {ckpt_path}: {e}") from None
    except RuntimeError as e:
        fg = bool(getattr(network, "foreground_head", True))
        ours, theirs = architecture(network.state_dict(), fg), architecture(state, fg)
        if ours is not None and theirs is not None and ours != theirs:
            differ = [k for k in ours if ours[k] != theirs[k]]
            flags = " ".join(f"--{k} {flag_value(theirs[k])}" for k in differ)
            raise ValueError(
                f"Checkpoint {ckpt_path} does not match network_def: its weights have "
                + ", ".join(f"{k} {theirs[k]}" for k in differ)
                + ", network_def has "
                + ", ".join(f"{k} {ours[k]}" for k in differ)
                + f". Pass {flags} (it has no model.json to take them from)."
            ) from None
        raise ValueError(
            f"Checkpoint {ckpt_path} does not match network_def (check spatial_dims, embedding_dim, features): {e}"
        ) from e
    return network


def architecture(state: Mapping[str, torch.Tensor], foreground_head: bool = True) -> dict | None:
    """
    ``spatial_dims``, ``features`` and ``embedding_dim`` of an :class:`EmbeddingUNet` state dict, read from its
    weight shapes (None when it is not one), to tell what a checkpoint without ``model.json`` was trained with.

    Args:
        state: a state dict of :class:`EmbeddingUNet`.
        foreground_head: whether the network's head has the foreground channel (then embedding_dim is one less than
            the output channels).
    """
    try:
        first = state["input_block.conv1.conv.weight"]
        downs = sorted(
            (int(k.split(".")[1]), v.shape[0])
            for k, v in state.items()
            if k.startswith("downsamples.") and k.endswith(".conv1.conv.weight")
        )
        features = [int(first.shape[0])] + [int(c) for _, c in downs]
        features.append(int(state["bottleneck.conv1.conv.weight"].shape[0]))
        out = int(state["output_block.conv.conv.weight"].shape[0])
    except (KeyError, AttributeError, IndexError, ValueError):
        return None
    return {"spatial_dims": first.ndim - 2, "features": features, "embedding_dim": out - int(foreground_head)}


def with_pretrained(
    network: torch.nn.Module,
    pretrained: str | None = None,
    root: str | os.PathLike | None = None,
    map_location: str | torch.device = "cpu",
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """
    ``network`` with the weights of ``pretrained`` loaded strictly (:func:`load_weights`), the starting point of a
    fine-tuning run (``--pretrained`` in ``train.json``); the network itself for None. Moved to ``device`` if given.

    Args:
        pretrained: a shipped model's name (``models/<name>/model.pt`` of the bundle ``root``, default this one,
            :mod:`spoco_bundle.cards`) or the path of a checkpoint (``model.pt`` of a training run).

    Raises:
        ValueError: an unknown name (listing the shipped models), or weights of another architecture.
        FileNotFoundError: a path that does not exist.
    """
    if pretrained is not None:
        network = _load_pretrained(network, str(pretrained), root if root is not None else bundle_root(), map_location)
    return network if device is None else network.to(device)


def _load_pretrained(
    network: torch.nn.Module, name: str, root: str | os.PathLike, map_location: str | torch.device
) -> torch.nn.Module:
    """The weights of shipped model ``name`` (of the bundle ``root``) or of the file ``name``, loaded strictly."""
    path = checkpoint(root, name) if name in available(root) else name
    if not os.path.isfile(path) and os.sep not in name and not name.endswith(".pt"):
        checkpoint(root, name)  # neither a file nor a shipped model: the error lists the shipped ones
    return load_weights(network, path, map_location)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain network inside ``DistributedDataParallel`` / ``DataParallel`` (the module itself otherwise)."""
    if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return module.module
    return module


def recorded_object_diameter(ckpt_path: str | os.PathLike) -> float:
    """
    The median diameter of the annotated training objects that a checkpoint's network records (its
    ``object_diameter`` buffer, set when training starts), in voxels of the training grid, read from the file without
    building the network.

    Returns:
        the diameter; 0 when unknown: a model that recorded none, or a file that is missing or unreadable (loading
        the weights reports those).
    """
    if not os.path.isfile(ckpt_path):
        return 0.0
    try:
        value = read_state_dict(str(ckpt_path)).get("object_diameter")
        diameter = float(value) if value is not None else 0.0
    except (TypeError, ValueError, RuntimeError):  # not a checkpoint: load_weights says so with the file's name
        return 0.0
    return diameter if math.isfinite(diameter) and diameter > 0 else 0.0


class RecordedObjectDiameter:
    """
    :func:`recorded_object_diameter` of ``ckpt_path`` as a number (``float(...)``), read again whenever the file
    changes: a MONAI Label server retrains the model it segments with, and the new weights record the size of the new
    annotations.
    """

    def __init__(self, ckpt_path: str | os.PathLike) -> None:
        self.ckpt_path = ckpt_path
        self._key: tuple[int, int] | None = None
        self._value = 0.0

    def __float__(self) -> float:
        try:
            stat = os.stat(self.ckpt_path)
        except OSError:
            return 0.0
        key = (stat.st_mtime_ns, stat.st_size)
        if key != self._key:
            self._value, self._key = recorded_object_diameter(self.ckpt_path), key
        return self._value

    def __repr__(self) -> str:
        return f"RecordedObjectDiameter({str(self.ckpt_path)!r})"


class NetworkObjectDiameter:
    """
    The ``object_diameter`` buffer of a network as a number (``float(...)``), read at every call: training's
    validation filters its segmentations by the size recorded in the student when the run starts, as inference will
    with the saved model (0 until recorded: only ``min_size`` applies). A DDP wrapper is unwrapped.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network

    def __float__(self) -> float:
        value = getattr(unwrap(self.network), "object_diameter", None)
        return 0.0 if value is None else float(value)

    def __repr__(self) -> str:
        return f"NetworkObjectDiameter({type(self.network).__name__})"
