"""Back-ends of the network pass in inference: torch, or OpenVINO on a CPU (the optional ``openvino`` extra)."""

from __future__ import annotations

import collections
import threading
import warnings
from typing import Any

import numpy as np
import torch

from spoco_bundle.networks import NetworkWrapper

__all__ = ["BACKENDS", "OpenVINONet", "openvino_available"]

# the values of inference's ``backend``
BACKENDS = ("torch", "openvino")

# compiled models kept per network: one per input shape (a sliding window's batch, its last smaller batch)
_MAX_SHAPES = 8


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _smallest_input(network: torch.nn.Module, ndim: int) -> list[int]:
    """Per axis, the product of the U-Net's strides (``DynUNet.strides``; 16 per axis without them)."""
    size = [1] * ndim
    for stride in getattr(network, "strides", None) or [2] * 4:
        for axis, s in enumerate([stride] * ndim if isinstance(stride, int) else stride):
            size[axis] *= int(s)
    return size


class _Body(torch.nn.Module):
    """The U-Net without its output head: what OpenVINO computes."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.skip_layers(x)


class OpenVINONet(NetworkWrapper):
    """
    An :class:`~spoco_bundle.networks.EmbeddingUNet` whose encoder and decoder run in OpenVINO on the CPU, in
    ``precision`` (``"bf16"``: bfloat16 where the CPU computes it natively; ``"f32"``), and whose 1x1 output head and
    foreground calibration run in torch, in float32: the head's outputs are the embeddings whose distances the
    clustering compares (as in :class:`~spoco_bundle.inferers.ReducedPrecisionNet`).

    The network is converted on the first call (``openvino.convert_model``), and compiled once per input shape
    (at most a few: a sliding window's batches). Calls from several threads are safe (one infer request per thread
    and shape). The weights are those at conversion: load weights before the first call. Pickles without the
    converted model (a dask.distributed worker converts its own). Inference only: gradients do not flow through it.

    Attributes the inferers and the blockwise path read are the wrapped network's.

    Args:
        network: an :class:`~spoco_bundle.networks.EmbeddingUNet` (``skip_layers``, ``output_block`` and
            ``calibrate``), on the CPU.
        precision: OpenVINO's ``INFERENCE_PRECISION_HINT``, ``"bf16"`` or ``"f32"``.
        threads: OpenVINO's ``INFERENCE_NUM_THREADS``; None: torch's thread count at compilation.

    Raises:
        ValueError: a network that is not an EmbeddingUNet, one that is not on the CPU, or an unknown
            precision.
        ImportError: OpenVINO is not installed (``pip install "spoco-bundle[openvino]"``).
    """

    def __init__(self, network: torch.nn.Module, precision: str = "bf16", threads: int | None = None) -> None:
        super().__init__()
        if not all(hasattr(network, name) for name in ("skip_layers", "output_block", "calibrate")):
            raise ValueError(f"backend 'openvino' needs an EmbeddingUNet, got {type(network).__name__}.")
        device = next(network.parameters()).device
        if device.type != "cpu":
            raise ValueError(f"backend 'openvino' runs on the CPU; the network is on {device}.")
        if precision not in ("bf16", "f32"):
            raise ValueError(f"OpenVINO precision must be 'bf16' or 'f32', got {precision!r}.")
        if not openvino_available():
            raise ImportError(
                "backend 'openvino' needs the openvino package: pip install \"spoco-bundle[openvino]\" (or "
                "`pip install openvino`), or use --backend torch."
            )
        self.network = network
        self.precision = precision
        self.threads = threads
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._model: Any = None
        self._compiled: collections.OrderedDict[tuple[int, ...], Any] = collections.OrderedDict()
        self._local = threading.local()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_lock", "_model", "_compiled", "_local"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def _request(self, shape: tuple[int, ...]) -> Any:
        """This thread's infer request for inputs of ``shape``."""
        import openvino as ov

        requests = self._local.__dict__.setdefault("requests", {})
        with self._lock:
            if self._model is None:
                # traced on the smallest input the U-Net takes, converted with free batch and spatial sizes
                example = torch.zeros((1, shape[1], *_smallest_input(self.network, len(shape) - 2)))
                free = ov.PartialShape([-1, shape[1]] + [-1] * (len(shape) - 2))
                with torch.no_grad(), warnings.catch_warnings():
                    # group norm's batch-size check, a Python bool in the trace: true for any shape
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    self._model = ov.convert_model(_Body(self.network).eval(), example_input=example, input=[free])
            compiled = self._compiled.get(shape)
            if compiled is None:
                model = self._model.clone()
                model.reshape(list(shape))
                config = {
                    "INFERENCE_PRECISION_HINT": self.precision,
                    "INFERENCE_NUM_THREADS": int(self.threads or torch.get_num_threads()),
                }
                compiled = ov.Core().compile_model(model, "CPU", config)
                self._compiled[shape] = compiled
                if len(self._compiled) > _MAX_SHAPES:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(shape)
        request = requests.get(shape)
        if request is None or request[0] is not compiled:
            request = requests[shape] = (compiled, compiled.create_infer_request())
        return request[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x).detach()  # a MetaTensor's metadata plays no part in the network
        request = self._request(tuple(int(n) for n in x.shape))
        inputs = np.ascontiguousarray(x.to("cpu", torch.float32).numpy())
        request.infer({0: inputs})
        features = torch.from_numpy(request.get_output_tensor(0).data)  # the request's buffer: read before the next
        # the 1x1 head as one matrix product per item: faster than a 1x1 convolution on this (not channels-last) layout
        conv = self.network.output_block.conv.conv
        weight, bias = conv.weight.detach().flatten(1), conv.bias.detach()[:, None]
        out = torch.empty((features.shape[0], weight.shape[0], *features.shape[2:]))
        with torch.no_grad():
            for item, target in zip(features, out):
                torch.addmm(bias, weight, item.flatten(1), out=target.flatten(1))
            return self.network.calibrate(out)
