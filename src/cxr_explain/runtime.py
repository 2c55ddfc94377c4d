"""Where and how computations run: the ``--device`` and ``--threads`` options, checked up front."""
from __future__ import annotations

from typing import Optional

from .errors import CxrExplainError


def check_device(name: Optional[str]):
    """``torch.device(name)`` if this machine has it, else a one-line error saying what it has.

    Accepts ``cpu``, ``cuda``, ``cuda:N`` (N below the number of visible GPUs) and ``mps``."""
    import torch

    text = (name or "cpu").strip()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise CxrExplainError(f"--device {text!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CxrExplainError(f"--device {text}: CUDA is not available on this machine (no GPU visible to "
                                  f"torch {torch.__version__}); use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise CxrExplainError(f"--device {text}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CxrExplainError(f"--device {text}: Apple MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise CxrExplainError(f"--device {text}: unsupported device type {dev.type!r}; use cpu or cuda")
    return dev


def set_threads(n: Optional[int]) -> None:
    """``torch.set_num_threads(n)`` (``--threads``); None keeps torch's default (one per core)."""
    if n is None:
        return
    if int(n) < 1:
        raise CxrExplainError(f"--threads {n}: give 1 or more CPU threads")
    import torch

    torch.set_num_threads(int(n))


__all__ = ["check_device", "set_threads"]
