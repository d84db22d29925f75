"""
A napari plugin (``napari.yaml``, an npe2 manifest; the ``napari`` extra installs napari and Qt): one dock widget,
*SPOCO*, to segment the active image with a shipped model or a checkpoint, fine-tune it on sparse annotations painted
in a Labels layer, and show which objects to outline next. The runs are the bundle's own workflows
(:mod:`spoco_bundle.napari.runs`, no Qt), in a worker thread (:mod:`spoco_bundle.napari.widget`).
"""
