"""
Back-ends for the network pass, on one sliding-window batch: the shipped ``nuclei3d`` on 4 windows of 64 x 112 x 112
cut from the 200^3 tile of GoNuclear 1135 (``research.perf.benchmark_precision`` builds it in ``eval/precision``),
best of 3 after a warm-up, against eager float32: channels-last input, bfloat16 autocast, a frozen TorchScript
trace, ONNX Runtime and OpenVINO (float32 and bfloat16) from a torch.onnx (dynamo) export; the largest difference
of the outputs from eager float32.

ONNX Runtime and OpenVINO are not dependencies of the bundle; run this in an environment that has them, e.g.
``python -m venv /tmp/rt && echo $PWD/.venv/lib/python3.11/site-packages > /tmp/rt/lib/python3.11/site-packages/
bundle.pth && /tmp/rt/bin/pip install onnxruntime openvino onnx onnxscript``, then
``/tmp/rt/bin/python -m research.perf.benchmark_backends``. A back-end that is missing or fails is reported as such.
Prints a table; one benchmark at a time on a 2-core machine.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import fire
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from anywhere: the repository's package
    sys.path.insert(0, str(ROOT))

from research.data import default_data_dir  # noqa: E402
from research.perf import cpu_model  # noqa: E402
from research.perf.benchmark_inference import _parser  # noqa: E402
from research.perf.benchmark_precision import case_inputs  # noqa: E402


def _best(f, n: int = 3):
    f()
    times, out = [], None
    for _ in range(n):
        t = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t)
    return min(times), out


def main(threads: int = 2, data_dir: str | None = None, batch: int = 4) -> None:
    import tifffile
    import torch

    torch.set_num_threads(threads)
    data = Path(data_dir) if data_dir else default_data_dir()
    image = case_inputs("gonuclear1135", data, Path("eval/precision"))[0][0]
    net = _parser("nuclei3d", {}).get_parsed_content("network").eval()
    img = tifffile.imread(image).astype(np.float32)
    lo, hi = np.percentile(img, (1, 99.8))
    img = ((img - lo) / (hi - lo)).astype(np.float32)
    x = torch.from_numpy(
        np.stack([img[i * 40 : i * 40 + 64, 20 + i * 10 : 132 + i * 10, 30:142] for i in range(batch)])[:, None].copy()
    )
    with torch.inference_mode():
        base, ref = _best(lambda: net(x))
    rows = [("eager float32", base, 0.0)]

    def add(name, make):
        try:
            seconds, out = _best(make())
            out = out.float() if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out)).float()
            rows.append((name, seconds, float((out - ref).abs().max())))
        except Exception as e:  # a back-end that is missing or cannot take the network
            rows.append((f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:80]}", float("nan"), float("nan")))

    def channels_last():
        cl = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)
        xc = x.to(memory_format=torch.channels_last_3d)
        return lambda: _no_grad(cl, xc)

    def bf16():
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return net(x)

        return run

    def torchscript():
        with torch.inference_mode():
            traced = torch.jit.freeze(torch.jit.trace(net, x[:1], check_trace=False).eval())
        return lambda: _no_grad(traced, x)

    onnx_path = os.path.join(tempfile.mkdtemp(), "net.onnx")

    def export():
        if not os.path.exists(onnx_path):
            torch.onnx.export(
                net, (x[:1],), onnx_path, input_names=["x"], output_names=["y"],
                dynamic_shapes={"x": {0: torch.export.Dim("b")}}, dynamo=True,
            )  # fmt: skip

    def onnxruntime():
        import onnxruntime as ort

        export()
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        return lambda: session.run(None, {"x": x.numpy()})[0]

    def openvino(precision):
        def make():
            import openvino as ov

            export()
            config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads}
            request = ov.Core().compile_model(onnx_path, "CPU", config).create_infer_request()
            return lambda: request.infer({0: x.numpy()})[0].copy()

        return make

    add("channels-last input", channels_last)
    add("bfloat16 autocast", bf16)
    add("TorchScript trace, frozen", torchscript)
    add("ONNX Runtime float32", onnxruntime)
    add("OpenVINO float32", openvino("f32"))
    add("OpenVINO bfloat16", openvino("bf16"))
    print(f"| back-end | s per batch of {batch} | x eager float32 | max abs. output difference |")
    print("|---|---|---|---|")
    for name, seconds, diff in rows:
        print(f"| {name} | {seconds:.2f} | {base / seconds:.2f} | {diff:.2g} |")
    print(f"\nMachine: {cpu_model()}, {os.cpu_count()} cores, {threads} torch threads; load average before "
          f"{os.getloadavg()[0]:.2f}; output values up to {float(ref.abs().max()):.1f}.")  # fmt: skip


def _no_grad(module, x):
    import torch

    with torch.inference_mode():
        return module(x)


if __name__ == "__main__":
    fire.Fire(main)
