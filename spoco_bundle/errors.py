"""The root cause of a command-line error, printed last.

MONAI's bundle runner wraps every error of a config expression in ``RuntimeError("Failed to evaluate
ConfigExpression: ...")`` (and transforms' in ``RuntimeError("applying transform ...")``), so a failed
``python -m monai.bundle run`` ends on that generic line, with the specific message far above it in a long
traceback. Importing ``spoco_bundle`` under ``python -m monai.bundle`` (the bundle's configs import it) installs
:func:`print_error_summary` as ``sys.excepthook``: Python's traceback is printed as before, then one
``error: <type>: <message>`` summary of the root cause, so that it is the last thing the user reads.

:func:`check_flag` is the check of the configs' boolean ids: on the command line only ``True`` / ``False`` become
booleans, ``false`` arrives as text, which Python counts as true.
"""

from __future__ import annotations

import sys
from types import TracebackType

__all__ = ["root_cause", "print_error_summary", "install_error_summary", "check_flag"]

# messages of MONAI's wrappers around the real error (raised ``from`` it)
_WRAPPERS = ("Failed to evaluate", "Failed to instantiate", "applying transform")


def check_flag(value: object, name: str) -> bool:
    """
    ``value`` of the boolean config id ``name`` as a ``bool``.

    Raises:
        ValueError: anything but a boolean (numpy's included), e.g. the text ``'false'`` that ``--name false`` gives,
            naming the id and how to write it.
    """
    import numpy as np

    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a boolean (on the command line: --{name} True or False), got {value!r}.")
    return bool(value)


def root_cause(error: BaseException) -> BaseException:
    """``error`` without MONAI's wrappers: the exception a config expression, component or transform raised."""
    seen = set()
    while (
        isinstance(error, RuntimeError)
        and str(error).startswith(_WRAPPERS)
        and error.__cause__ is not None
        and id(error) not in seen
    ):
        seen.add(id(error))
        error = error.__cause__
    return error


def print_error_summary(
    exc_type: type[BaseException], error: BaseException, tb: TracebackType | None, hook=sys.__excepthook__
) -> None:
    """``sys.excepthook``: the traceback (by ``hook``), then ``error: <root cause>`` when MONAI wrapped it."""
    hook(exc_type, error, tb)
    try:
        cause = root_cause(error)
        if cause is not error:
            sys.stderr.write(f"\nerror: {type(cause).__name__}: {cause}\n")
            sys.stderr.flush()
    except Exception:  # never let the summary hide the traceback's exit
        pass


def _run_by_monai_bundle() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) in ("monai.bundle.__main__", "monai.bundle")


def install_error_summary(force: bool = False) -> bool:
    """Install :func:`print_error_summary` as ``sys.excepthook`` (chaining the current hook), once, and only in a
    ``python -m monai.bundle`` process unless ``force``. Returns whether it is installed."""
    current = sys.excepthook
    if getattr(current, "_spoco_error_summary", False):
        return True
    if not (force or _run_by_monai_bundle()):
        return False

    def hook(exc_type: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        print_error_summary(exc_type, error, tb, hook=current)

    hook._spoco_error_summary = True  # type: ignore[attr-defined]
    sys.excepthook = hook
    return True
