"""Where an evaluation's time goes: named stage timers the loop fills when asked.

:func:`~cxr_explain.evaluation.evaluate` takes ``timer=StageTimer()`` and adds the wall time of each
stage to it (``decode``, ``explain <method>``, ``resize``, ``metrics``, ``maps``, ``rows``, ...);
``benchmarks/bench_evaluate.py`` prints the table. Without a timer the loop uses :data:`NO_TIMER`,
whose stages are one shared no-op context manager (no clock is read).
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Iterator

__all__ = ["StageTimer", "NullTimer", "NO_TIMER"]


class StageTimer:
    """Seconds and call counts per named stage, in the order stages were first seen."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()  # scoring threads add to the same stages

    def add(self, stage: str, seconds: float, calls: int = 1) -> None:
        """Add ``seconds`` (measured elsewhere, e.g. in a DataLoader worker or a scoring thread) to
        ``stage``; stages timed in parallel threads add up to more than the wall time they took."""
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + float(seconds)
            self.calls[stage] = self.calls.get(stage, 0) + int(calls)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as ``name`` (``time.perf_counter``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    @property
    def enabled(self) -> bool:
        return True

    def as_dict(self) -> dict[str, dict[str, float]]:
        """``{stage: {"seconds": s, "calls": n}}`` (JSON-ready)."""
        return {k: {"seconds": v, "calls": self.calls[k]} for k, v in self.seconds.items()}


class NullTimer:
    """A timer that measures nothing: :meth:`stage` returns one shared ``nullcontext``."""

    _null = nullcontext()

    def add(self, stage: str, seconds: float, calls: int = 1) -> None:
        pass

    def stage(self, name: str) -> nullcontext:
        return self._null

    @property
    def enabled(self) -> bool:
        return False


#: The timer of a run that was not asked to time itself.
NO_TIMER = NullTimer()
