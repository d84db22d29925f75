"""
Command line of the bundle's own tools (``fire``):

    python -m spoco_bundle package --checkpoint models/model.pt --output_dir dist [--teacher models/teacher.pt]

``package`` writes a MONAI model-zoo bundle folder and zip (see :func:`spoco_bundle.package.package_bundle`).
"""

from __future__ import annotations

import logging

import fire

from spoco_bundle.package import package_bundle


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fire.Fire({"package": package_bundle}, name="spoco_bundle")


if __name__ == "__main__":
    main()
