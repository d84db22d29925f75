"""
The accuracy benchmark of the SPOCO bundle and the studies built on it (a repository tool, not part of the installed
``spoco_bundle``; run from the repository root):

- ``python -m research.accuracy``: SPOCO against StarDist and classical baselines on the same sparse labels of real
  microscopy data (:mod:`research.data`, :mod:`research.settings`, :mod:`research.runner`,
  :mod:`research.records`, :mod:`research.report`; the methods in :mod:`research.methods`);
- ``python -m research.learning_speed``: training recipes screened on training images;
- ``python -m research.foreground``, ``python -m research.threshold``, ``python -m research.scale``: error
  breakdown, foreground threshold rules and scale robustness of a finished run's model;
- ``python -m research.pixel_classifier``: a positive-unlabeled random-forest pixel classifier as the foreground
  (screened against the head; not part of the bundle).
"""
