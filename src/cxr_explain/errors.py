"""User-facing errors.

Every problem a user can cause (a bad file, a missing column, an unknown layer, an unsupported
architecture) raises :class:`CxrExplainError` with a one-line message that names the file / column /
layer and says what to do. The CLI prints the message and exits with status 2, without a traceback.
"""
from __future__ import annotations


class CxrExplainError(Exception):
    """An error caused by user input; its message is one line, fit to show as is."""


class UnsupportedOpError(CxrExplainError):
    """A traced model contains an operation that no rule of the chosen method handles."""


class DataError(CxrExplainError):
    """A data file (image, table, DICOM) is missing, unreadable or malformed."""


class CheckpointError(CxrExplainError):
    """A checkpoint cannot be loaded strictly into the requested architecture."""


class TraceError(CxrExplainError):
    """torch.fx cannot trace the model (data-dependent control flow); propagation methods need the
    trace, gradient- and CAM-family methods run on the model itself instead."""


def failure_reason(exc: BaseException, path: object = None) -> str:
    """The one-line reason a batch command records for a failed input: the error's message on one
    line, without the file name it starts with (``path``), prefixed by the exception type unless it
    is a :class:`CxrExplainError`."""
    from pathlib import Path

    msg = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, CxrExplainError):
        msg = f"{type(exc).__name__}: {msg}"
    if path is not None:
        p = Path(str(path))
        for prefix in (f"{p}: ", f"{p.name}: "):
            if msg.startswith(prefix):
                return msg[len(prefix):]
    return msg
