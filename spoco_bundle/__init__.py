"""SPOCO: sparse object-level supervision for instance segmentation with pixel embeddings, as a MONAI bundle.

The package's modules load on first use (``spoco_bundle.networks`` after ``import spoco_bundle``), so that a bundle
config needs one ``$import spoco_bundle`` and a command pays only for what it runs.
"""

import importlib

from spoco_bundle.errors import install_error_summary as _install_error_summary

__version__ = "0.45.0"

_SUBMODULES = (
    "blockwise",
    "bundle",
    "cards",
    "cli",
    "clustering",
    "data",
    "distributed",
    "engines",
    "errors",
    "handlers",
    "inferers",
    "io",
    "labels",
    "losses",
    "measure",
    "metrics",
    "monailabel",
    "networks",
    "package",
    "postprocessing",
    "report",
    "synthetic",
    "training_set",
    "transforms",
)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_install_error_summary()  # under `python -m monai.bundle` only: the root cause of a failure is printed last
