"""
The lab behind the SPOCO bundle: the accuracy benchmark, the studies built on it and the perf benchmarks. A repository
tool, never installed and never imported by ``spoco_bundle``; run from the repository root (``research/README.md``:
set-up, commands, pages).

- ``python -m research.accuracy``: SPOCO against StarDist and classical baselines on the same sparse labels of real
  microscopy data (:mod:`research.data`, :mod:`research.settings`, :mod:`research.runner`, :mod:`research.records`,
  :mod:`research.report`; the methods in :mod:`research.methods`);
- ``python -m research.learning_speed``: training recipes screened on training images;
- ``python -m research.foreground``, ``research.scale``, ``research.window``, ``research.pu_threshold``,
  ``research.boundary_grid``, ``research.label_audit``, ``research.study_table``: follow-up studies of finished runs
  (error breakdown, magnifications, inference options, the head's threshold, the boundary clustering, the ground
  truth, arms side by side);
- ``python -m research.pixel_classifier``: a positive-unlabeled random-forest pixel classifier as the foreground
  (screened against the head; not part of the bundle);
- ``python -m research.perf.<name>``: speed and memory benchmarks (:mod:`research.perf`);
- ``research/pages/``: the pages these write (with their JSON summaries), ``research/figures/`` their plots,
  ``research/findings.md`` what they show, ``research/tests/`` the harness's tests.
"""
