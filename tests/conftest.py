"""Shared fixtures. ``models64`` builds the torchvision test models in float64, one at a time.

Memory: a float64 VGG-16 is 1.1 GB and each modified copy of its weights (z⁺, |W⁻| …) another
0.8 GB, so the suite keeps at most one float64 model alive and drops every traced model's cache of
modified weights after each test (the suite's peak was 20.7 GB when all of them were kept).
"""
from __future__ import annotations

import gc
import os
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))  # tests import the `nets` helpers
sys.path.insert(0, str(ROOT / "src"))  # this checkout's package, also from a git worktree

from nets import build  # noqa: E402

MAX_CACHED_MODELS = 1

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one torch thread per worker, no oversubscription
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models64():
    """``get(arch)`` -> a float64 model with realistic BN statistics at 64 px (shared: don't mutate).
    Built on first use; the least recently used model is dropped when another is built."""
    cache: "OrderedDict[str, torch.nn.Module]" = OrderedDict()

    def get(arch: str):
        if arch in cache:
            cache.move_to_end(arch)
            return cache[arch]
        while len(cache) >= MAX_CACHED_MODELS:
            cache.popitem(last=False)
            gc.collect()
        cache[arch] = build(arch, size=64).to(torch.float64)
        return cache[arch]

    yield get
    cache.clear()


#: a full garbage collection costs ~0.27 s once torch, timm and the report stack are imported (half a
#: million objects): after every test it was a third of the suite's time. The young generations are
#: collected after each test; everything only when the process holds more than this.
FULL_GC_ABOVE_BYTES = 2 * 1024 ** 3


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):  # not Linux: always collect
        return FULL_GC_ABOVE_BYTES + 1


@pytest.fixture(autouse=True)
def _free_engine_caches():
    """After each test: drop the modified-weight caches of every traced model still alive and
    collect garbage (all of it when the process is large)."""
    yield
    from cxr_explain.attribution.graph import clear_trace_caches

    clear_trace_caches()
    gc.collect(1)
    if _resident_bytes() > FULL_GC_ABOVE_BYTES:
        gc.collect()
