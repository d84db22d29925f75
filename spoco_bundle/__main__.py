"""
``python -m spoco_bundle COMMAND``: the same commands as the ``spoco`` console script (:mod:`spoco_bundle.cli`):
``train``, ``segment``, ``evaluate`` and ``package``, e.g.

    python -m spoco_bundle package --ckpt models/model.pt --output_dir dist [--teacher models/teacher.pt]
"""

from spoco_bundle.cli import main

if __name__ == "__main__":
    main()
