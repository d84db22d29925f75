"""SPOCO: sparse object-level supervision for instance segmentation with pixel embeddings, as a MONAI bundle."""

__version__ = "0.7.1"
