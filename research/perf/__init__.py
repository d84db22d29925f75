"""
Speed and memory benchmarks of the bundle's pieces (not accuracy): each module runs as ``python -m
research.perf.<name>`` from the repository root, or as a script (``python research/perf/<name>.py``).

- :mod:`research.perf.benchmark_clustering`: time and peak memory of every clustering method on synthetic
  embeddings of growing size (and on the shipped nuclei2d model's outputs for DSB2018);
- :mod:`research.perf.benchmark_blockwise`: blockwise (dask) segmentation of volumes larger than memory against
  whole-volume inference;
- :mod:`research.perf.benchmark_training_step`: the cost of one training step, piece by piece;
- :mod:`research.perf.benchmark_data_loading`: training batches per second with and without loader workers;
- :mod:`research.perf.benchmark_short_training`: what a short training reaches (iterations, AP50) at small budgets;
- :mod:`research.perf.benchmark_inference`: inference end to end beside a plain MONAI pass and StarDist.
"""

import platform


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows, for the benchmarks' machine lines."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        return cpu
