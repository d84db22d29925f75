"""
MONAI Label's server (``monailabel.app:app``) with error responses that say what went wrong.

Stock MONAI Label 0.8.5 answers any failure inside a task (an unknown image id, an unreadable file, a 2D image for a
3D model, a checkpoint that does not fit the network) with a bare ``500 Internal Server Error``; the reason is only
in the server log. Start the server with this app instead to get a JSON ``{"detail": "..."}`` body and a status
that tells the client whose fault it was::

    monailabel start_server --app apps/monaibundle --studies STUDIES --conf models spoco --conf zoo_source github \\
        --uvicorn_app spoco_bundle.monailabel.server:app

- 404: the image is not a study of the datastore: an id the datastore does not know, or a path (absolute or
  relative, ``../..`` included) that does not resolve inside the studies folder, whether or not it exists there;
  also an unknown ``session_id``, or a file that is missing;
- 422: the input cannot be used (the bundle's readers and checks raise ``ValueError`` naming the file and problem),
  or the request names no image (no ``image``, ``session_id`` or uploaded ``file``), or ``params`` is not a JSON
  object;
- 400: MONAI Label rejected the request (e.g. an unknown model);
- 500: anything else (e.g. a checkpoint that does not match ``network_def``), with the exception's message.

Stock MONAI Label runs any path that exists on the server (``POST /infer/<model>?image=/any/file``); here each
``POST /infer/<model>`` is checked first (:func:`run_inference`, which replaces MONAI Label's
``monailabel.endpoints.infer.run_inference`` and then calls it), so the server segments only studies of its
datastore, and a refused path answers like an unknown id: the status does not tell which server paths exist. Client
errors of inference (4xx) are logged as one line each, without a traceback; 500s keep theirs.

The app also gets, for each deployed SPOCO bundle, the active-learning strategy ``<model>_uncertain``
(:class:`~spoco_bundle.monailabel.strategy.UncertainObjects`: the study whose objects the model is least sure of,
with those objects), beside the app's own strategies.

Everything else (routes, datastore, tasks) is MONAI Label's own app object; the server keeps serving after an error.
"""

from __future__ import annotations

import functools
import json
import logging
import os

from fastapi import Request
from fastapi.responses import JSONResponse
from monailabel.app import app
from monailabel.config import settings
from monailabel.endpoints import infer as _infer
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import ImageNotFoundException, MONAILabelException
from monailabel.interfaces.utils.app import app_instance

from spoco_bundle.monailabel.strategy import strategies_for

__all__ = ["app", "run_inference"]

logger = logging.getLogger(__name__)

_MAX_DETAIL = 2000  # characters; long enough for the bundle's messages, short enough for a client's dialog


def _first_lines(text: str, n: int = 3) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return "\n".join(lines[:n])[:_MAX_DETAIL]


def _not_in_datastore(image: str) -> str:
    return f"image '{image}' is not in the datastore (GET /datastore/?output=all lists the image ids)"


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.normcase(path), os.path.normcase(folder)
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


def _is_study(image: str) -> bool:
    """
    Whether MONAI Label's ``infer`` (which runs an existing path as it is and looks anything else up as an id) would
    run a study of the datastore: an existing path inside the studies folder, or an id the datastore knows.
    """
    instance = app_instance()
    if os.path.exists(image):
        studies = str(instance.studies)
        if studies.startswith(("http://", "https://")):
            return False  # a DICOMweb datastore has no local studies folder
        return _inside(os.path.abspath(image), os.path.abspath(studies)) or _inside(
            os.path.realpath(image), os.path.realpath(studies)
        )
    return bool(instance.datastore().get_image_uri(image))


def _missing_image(request: Request) -> str | None:
    """The ``image`` query parameter, if it names neither a file nor an image of the datastore."""
    image = request.query_params.get("image")
    if not image or os.path.exists(image):
        return None
    try:
        if app_instance().datastore().get_image_uri(image):
            return None
    except Exception:  # the datastore itself failed: report the original error instead
        return None
    return image


def _response(request: Request, status: int, exc: BaseException) -> JSONResponse:
    message = getattr(exc, "msg", None) or str(exc)  # MONAILabelException keeps its text in .msg
    detail = f"{request.method} {request.url.path}: {type(exc).__name__}: {_first_lines(message)}"
    (logger.warning if status < 500 else logger.error)(f"-> HTTP {status}: {detail}")
    return JSONResponse(status_code=status, content={"detail": detail})


@app.exception_handler(ImageNotFoundException)
@app.exception_handler(FileNotFoundError)
async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return _response(request, 404, exc)


@app.exception_handler(MONAILabelException)
async def _rejected(request: Request, exc: MONAILabelException) -> JSONResponse:
    return _response(request, 400, exc)


@app.exception_handler(ValueError)  # handled here, not by ServerErrorMiddleware, which logs a traceback
async def _unusable(request: Request, exc: ValueError) -> JSONResponse:
    return _response(request, 422, exc)


@app.exception_handler(Exception)  # Starlette routes this one to ServerErrorMiddleware: every other exception
async def _failed(request: Request, exc: Exception) -> JSONResponse:
    image = _missing_image(request)
    if image is not None:
        return _response(request, 404, FileNotFoundError(_not_in_datastore(image)))
    return _response(request, 500, exc)


def _refuse(model: str, status: int, message: str) -> JSONResponse:
    detail = f"POST /infer/{model}: {_first_lines(message)}"
    logger.warning(f"-> HTTP {status}: {detail}")
    return JSONResponse(status_code=status, content={"detail": detail})


def run_inference(background_tasks, model, image="", session_id="", params="{}", file=None, label=None, output=None):
    """
    MONAI Label's ``run_inference`` (what ``POST /infer/{model}`` calls, same arguments), after checking which image
    it would run: the session's image for a known ``session_id``; else ``params["image"]`` (MONAI Label lets it
    replace the others); else the uploaded ``file``; else ``image``. A client-named image must be a study of the
    datastore (:func:`_is_study`).
    """
    try:
        extra = json.loads(params) if params else {}
    except ValueError as e:
        return _refuse(model, 422, f"params is not valid JSON: {e}")
    if not isinstance(extra, dict):
        return _refuse(model, 422, f"params must be a JSON object, not {type(extra).__name__}")
    if session_id:
        sessions = app_instance().sessions()
        if not sessions or not sessions.get_session(session_id):
            return _refuse(model, 404, f"session '{session_id}' does not exist (or has expired)")
    elif "image" in extra or not file:
        named = extra.get("image", image)
        if not named:
            return _refuse(
                model,
                422,
                "no image given: pass ?image=<id> (GET /datastore/?output=all lists the image ids), "
                "a session_id, or upload a file",
            )
        if not isinstance(named, str) or not _is_study(named):
            return _refuse(model, 404, _not_in_datastore(str(named)))
    return _stock_run_inference(background_tasks, model, image, session_id, params, file, label, output)


# MONAI Label's route handler (monailabel.endpoints.infer.api_run_inference) calls the module's run_inference
_stock_run_inference = getattr(_infer.run_inference, "__wrapped__", _infer.run_inference)
run_inference.__wrapped__ = _stock_run_inference
_infer.run_inference = run_inference


def _with_uncertain_objects(init):
    """``MONAILabelApp.__init__``, then the app's SPOCO bundles' strategies added to its own (where the server runs
    strategies at all: ``MONAI_LABEL_TASKS_STRATEGY``)."""

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if settings.MONAI_LABEL_TASKS_STRATEGY:
            for name, strategy in strategies_for(getattr(self, "models", {})).items():
                self._strategies.setdefault(name, strategy)
                logger.info(f"+++ Adding Strategy:: {name} (the image whose objects the model is least sure of)")

    return wrapped


# the stock monaibundle app builds its strategies in its own main.py; the server adds this bundle's when the app
# object is created (on the server's first request, after this module is imported)
if not getattr(MONAILabelApp.__init__, "__wrapped__", None):
    MONAILabelApp.__init__ = _with_uncertain_objects(MONAILabelApp.__init__)
