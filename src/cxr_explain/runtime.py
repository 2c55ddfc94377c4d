"""Where and how computations run: ``--device`` and ``--threads`` (checked up front) and, under
``torchrun``, the process group.

One place for what explain, evaluation and training all need: :func:`check_device` says whether
this machine has a device, :func:`resolve_device` turns a ``--device`` string into a checked
``torch.device`` (``auto`` = CUDA when present; plain ``cuda`` under ``torchrun`` = the rank's own
GPU, ``LOCAL_RANK`` modulo the GPU count), :func:`set_threads` applies ``--threads``,
:func:`init_distributed` joins the process group a ``torchrun`` launch expects (``WORLD_SIZE`` > 1:
NCCL on CUDA, Gloo otherwise, ``init_method="env://"``), and :class:`Dist` carries rank and world
size with the few collective calls the jobs use (barrier, gather of Python objects, broadcast of
buffers). torch is imported inside the functions, so the CLI can check options without it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Optional

from .errors import CxrExplainError

if TYPE_CHECKING:
    import torch

__all__ = ["check_device", "set_threads", "Dist", "resolve_device", "init_distributed", "current_dist",
           "world_size_from_env"]


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as ``torchrun`` sets it (1 when absent or empty)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


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


def resolve_device(name: str = "cpu") -> "torch.device":
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` as a :func:`check_device`-checked ``torch.device``.

    ``auto`` is ``cuda`` when a GPU is visible, else ``cpu``. Plain ``cuda`` is
    ``cuda:(LOCAL_RANK mod #GPUs)``: rank-local under ``torchrun``, ``cuda:0`` otherwise.
    """
    import torch

    name = str(name or "cpu").strip()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = check_device(name)
    if dev.type == "cuda" and dev.index is None:
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        return torch.device("cuda", local % max(1, torch.cuda.device_count()))
    return dev


def set_threads(n: Optional[int]) -> None:
    """``torch.set_num_threads(n)`` (``--threads``); None keeps torch's default (one per core)."""
    if n is None:
        return
    if int(n) < 1:
        raise CxrExplainError(f"--threads {n}: give 1 or more CPU threads")
    import torch

    torch.set_num_threads(int(n))


#: A run of fewer batches decodes in its own thread: starting a worker process costs more than it saves.
AUTO_WORKERS_MIN_BATCHES = 8


def loader_workers(requested: Optional[int], n_batches: int, device: "torch.device | str" = "cpu") -> int:
    """DataLoader worker processes for decoding films (``--workers``); ``requested`` when given.

    The default (None) is none for a run of fewer than :data:`AUTO_WORKERS_MIN_BATCHES` batches or on
    one core; otherwise one on the CPU, where the engine's threads need the cores and one worker
    keeps decoding off their path (measured on 2 cores, 300 films: the whole ``evaluate`` 1.20 →
    1.10–1.16 × the explanations alone, BENCHMARKS.md), and on a GPU one per core but one, at most 4.
    Under ``torchrun`` the cores are shared among the node's ranks (``LOCAL_WORLD_SIZE``).
    """
    if requested is not None:
        if int(requested) < 0:
            raise CxrExplainError(f"--workers {requested}: give 0 (decode in the main process) or more")
        return int(requested)
    cores = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if n_batches < AUTO_WORKERS_MIN_BATCHES or cores < 2:
        return 0
    kind = device if isinstance(device, str) else device.type
    return min(4, cores - 1) if str(kind).startswith("cuda") else 1


@dataclass
class Dist:
    """Rank and world size of this process; ``started_here`` when :func:`init_distributed` created
    the process group (and so :meth:`close` destroys it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes shared files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, ..., obj of rank world-1]`` on every rank (``all_gather_object``)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, tensor: "torch.Tensor", src: int = 0) -> None:
        """Overwrite ``tensor`` on every rank with rank ``src``'s values (in place)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast(tensor, src=src)

    def close(self) -> None:
        """Destroy the process group if this :class:`Dist` created it."""
        if self.started_here:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.started_here = False


def current_dist() -> Dist:
    """The already initialised process group as a :class:`Dist`, else a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0))
    return Dist()


def init_distributed(device: "torch.device | str", timeout: Optional[timedelta] = None) -> Dist:
    """Join ``torchrun``'s process group: an initialised group is reused; with ``WORLD_SIZE`` > 1 in
    the environment one is created (``env://``; NCCL on a CUDA device, else Gloo; ``timeout``
    defaults to torch's); otherwise a single process ``Dist()``."""
    import torch
    import torch.distributed as dist

    have = current_dist()
    if have.world > 1 or (dist.is_available() and dist.is_initialized()):
        return have
    world = world_size_from_env()
    if world <= 1:
        return Dist()
    if not dist.is_available():
        raise CxrExplainError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or rank)
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    backend = "nccl" if dev.type == "cuda" and torch.cuda.is_available() else "gloo"
    kw: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, **kw)
    return Dist(dist.get_rank(), dist.get_world_size(), local, started_here=True)
