"""Shared fixtures. ``models64`` builds each torchvision test model once per session, in float64."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests import the `nets` helpers

from nets import build  # noqa: E402


@pytest.fixture(scope="session")
def models64():
    """``get(arch)`` -> a float64 model with realistic BN statistics at 64 px (shared: don't mutate)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = build(arch, size=64).to(torch.float64)
        return cache[arch]

    return get
