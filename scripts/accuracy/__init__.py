"""Accuracy benchmark of the SPOCO bundle against peers (see ``scripts/benchmark_accuracy.py``)."""
