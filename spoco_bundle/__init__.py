"""SPOCO: sparse object-level supervision for instance segmentation with pixel embeddings, as a MONAI bundle."""

from spoco_bundle.errors import install_error_summary as _install_error_summary

__version__ = "0.37.0"

_install_error_summary()  # under `python -m monai.bundle` only: the root cause of a failure is printed last
