"""
MONAI Label's server (``monailabel.app:app``) with error responses that say what went wrong.

Stock MONAI Label 0.8.5 answers any failure inside a task (an unknown image id, an unreadable file, a 2D image for a
3D model, a checkpoint that does not fit the network) with a bare ``500 Internal Server Error``; the reason is only
in the server log. Start the server with this app instead to get a JSON ``{"detail": "..."}`` body and a status
that tells the client whose fault it was::

    monailabel start_server --app apps/monaibundle --studies STUDIES --conf models spoco --conf zoo_source github \\
        --uvicorn_app spoco_bundle.monailabel_server:app

- 404: the image id is neither in the datastore nor an existing path, or a file is missing;
- 422: the input cannot be used (the bundle's readers and checks raise ``ValueError`` naming the file and problem);
- 400: MONAI Label rejected the request (e.g. an unknown model);
- 500: anything else (e.g. a checkpoint that does not match ``network_def``), with the exception's message.

Everything else (routes, datastore, tasks) is MONAI Label's own app object; the server keeps serving after an error.
"""

from __future__ import annotations

import logging
import os

from fastapi import Request
from fastapi.responses import JSONResponse
from monailabel.app import app
from monailabel.interfaces.exception import ImageNotFoundException, MONAILabelException
from monailabel.interfaces.utils.app import app_instance

__all__ = ["app"]

logger = logging.getLogger(__name__)

_MAX_DETAIL = 2000  # characters; long enough for the bundle's messages, short enough for a client's dialog


def _first_lines(text: str, n: int = 3) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return "\n".join(lines[:n])[:_MAX_DETAIL]


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
    logger.error(f"-> HTTP {status}: {detail}")
    return JSONResponse(status_code=status, content={"detail": detail})


@app.exception_handler(ImageNotFoundException)
@app.exception_handler(FileNotFoundError)
async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return _response(request, 404, exc)


@app.exception_handler(MONAILabelException)
async def _rejected(request: Request, exc: MONAILabelException) -> JSONResponse:
    return _response(request, 400, exc)


@app.exception_handler(Exception)  # Starlette routes this one to ServerErrorMiddleware: every other exception
async def _failed(request: Request, exc: Exception) -> JSONResponse:
    image = _missing_image(request)
    if image is not None:
        msg = f"image '{image}' is not in the datastore (GET /datastore/?output=all lists the image ids)"
        return _response(request, 404, FileNotFoundError(msg))
    return _response(request, 422 if isinstance(exc, ValueError) else 500, exc)
