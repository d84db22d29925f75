"""MONAI Label: the bundle deployed into a stock ``monaibundle`` app (:mod:`.deploy`) and served with error responses
that say what went wrong (:mod:`.server`, run with ``--uvicorn_app spoco_bundle.monailabel.server:app``; it needs
MONAI Label installed)."""

from spoco_bundle.monailabel.deploy import (
    MONAILABEL_IMAGE_PATH_KEY,
    MONAILABEL_POSTPROCESSING,
    MonaiLabelWriterOrderd,
    add_monailabel_postprocessing,
    deploy_bundle,
)

__all__ = [
    "MonaiLabelWriterOrderd",
    "MONAILABEL_IMAGE_PATH_KEY",
    "MONAILABEL_POSTPROCESSING",
    "add_monailabel_postprocessing",
    "deploy_bundle",
]
