"""Try every method once on a random input before a batch run, so that what a model cannot take
stops the run with one line instead of failing on every film."""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import CxrExplainError
from .explain import explain


def probe_methods(model: nn.Module, methods: Sequence[Any], channels: int, size: int, device: Any,
                  dtype: torch.dtype, target: Any = ((0,),), **options: Any) -> None:
    """Explain one random (1, channels, s, s) input with each method, at s = 32 px first (what fails
    is the model's structure, not its input size: cheap) and, if that fails, at ``size`` to confirm;
    raise the full-size error as one ``CxrExplainError`` starting with the method's name."""
    from ..models.zoo import MIN_INPUT_SIZE

    def attempt(method: Any, side: int) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, channels, side, side, generator=g).to(device=device, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            explain(model, x, method, target=[list(t) for t in target] if isinstance(target, tuple) else target,
                    check_conservation=False, **options)

    for method in methods:
        try:
            attempt(method, min(size, MIN_INPUT_SIZE))
        except CxrExplainError:
            try:
                attempt(method, size)
            except CxrExplainError as exc:
                name = getattr(method, "name", str(method))
                msg = str(exc)
                raise CxrExplainError(msg if msg.startswith(name) else f"{name}: {msg}") from None
