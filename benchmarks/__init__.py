"""
The accuracy benchmark of the SPOCO bundle and the studies built on it (a repository tool, not part of the installed
``spoco_bundle``; run from the repository root):

- ``python -m benchmarks.accuracy``: SPOCO against StarDist and classical baselines on the same sparse labels of real
  microscopy data (:mod:`benchmarks.data`, :mod:`benchmarks.settings`, :mod:`benchmarks.runner`,
  :mod:`benchmarks.records`, :mod:`benchmarks.report`; the methods in :mod:`benchmarks.methods`);
- ``python -m benchmarks.learning_speed``: training recipes screened on training images;
- ``python -m benchmarks.foreground``, ``python -m benchmarks.threshold``, ``python -m benchmarks.scale``: error
  breakdown, foreground threshold rules and scale robustness of a finished run's model;
- ``python -m benchmarks.pixel_classifier``: a positive-unlabeled random-forest pixel classifier as the foreground
  (screened against the head; not part of the bundle).
"""
