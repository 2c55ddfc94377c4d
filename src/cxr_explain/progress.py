"""Progress bars that suit where they are shown.

On a terminal, :func:`progress_bar` is an ordinary tqdm bar (in a notebook, tqdm's widget). Anywhere else (a log file, CI, a pipe)
carriage-return updates would pile up as hundreds of fragments, so it writes plain lines instead:
one when it starts, then at most one per tenth of the work and never more often than every
:data:`PLAIN_INTERVAL` seconds, and one when it ends.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Optional, TextIO

#: Seconds between two plain progress lines (non-terminal output).
PLAIN_INTERVAL = 30.0


class _Lines:
    """A text stream that turns tqdm's ``\\r``-redrawn status into whole lines; blank lines and a
    repeat of the same count (the closing redraw) are dropped."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> int:
        for part in text.replace("\r", "\n").split("\n"):
            count = part.split("[", 1)[0]  # "desc: 40%|####  | 20/50 " without the rates
            if part.strip() and count != self.last:
                self.stream.write(part.rstrip() + "\n")
                self.last = count
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream: Optional[TextIO] = None) -> bool:
    """Whether ``stream`` (default: stderr) is an interactive terminal."""
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real file
        return False


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[float] = None, desc: Optional[str] = None,
                 unit: str = "it", initial: int = 0, leave: bool = True, disable: bool = False,
                 file: Optional[TextIO] = None, **kwargs: Any):
    """A tqdm bar on a terminal, plain lines elsewhere (module docstring). Same use as ``tqdm``."""
    if "ipykernel" in sys.modules:  # a notebook: tqdm's widget
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    stream = file if file is not None else sys.stderr
    if disable or is_terminal(stream) or "ipykernel" in sys.modules:
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, disable=disable,
                    file=stream, dynamic_ncols=True, **kwargs)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    step = max(1, int(total) // 10) if total else 1
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=True, file=_Lines(stream),
                ascii=True, ncols=80, mininterval=PLAIN_INTERVAL, maxinterval=float("inf"), miniters=step, **kwargs)


__all__ = ["PLAIN_INTERVAL", "is_terminal", "progress_bar"]
