"""``--workers``' default: no worker process for short runs or one core, one on the CPU, more on a GPU."""
from __future__ import annotations

import pytest

import cxr_explain.runtime as runtime
from cxr_explain.errors import CxrExplainError
from cxr_explain.runtime import AUTO_WORKERS_MIN_BATCHES, loader_workers


@pytest.mark.parametrize("cores, batches, device, want", [
    (2, AUTO_WORKERS_MIN_BATCHES - 1, "cpu", 0),   # a short run decodes in its own thread
    (2, AUTO_WORKERS_MIN_BATCHES, "cpu", 1),       # one worker beside the engine's threads
    (16, 1000, "cpu", 1),
    (1, 1000, "cpu", 0),                           # one core: a worker would only take it from the engine
    (16, 1000, "cuda:0", 4),                       # a GPU waits for decoding: several workers, at most 4
    (3, 1000, "cuda", 2),
])
def test_default_workers(monkeypatch, cores, batches, device, want):
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: cores)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(None, batches, device) == want


def test_ranks_on_one_node_share_its_cores(monkeypatch):
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun --nproc_per_node 8: two cores a rank
    assert loader_workers(None, 1000, "cuda") == 1
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on the 2-core CPU: one core each
    assert loader_workers(None, 1000, "cpu") == 0


def test_an_explicit_count_is_kept_and_a_negative_one_refused():
    assert loader_workers(0, 10_000, "cuda") == 0
    assert loader_workers(3, 1, "cpu") == 3
    with pytest.raises(CxrExplainError, match="--workers -1"):
        loader_workers(-1, 10, "cpu")
