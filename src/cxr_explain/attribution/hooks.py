"""Gradient methods on the model itself: plain autograd, no trace.

Used when torch.fx cannot trace a model (data-dependent control flow).

* :func:`model_logits` runs the model and returns the tensor a final ``sigmoid`` / ``softmax`` /
  ``log_softmax`` read (module or function, seen through a :class:`~torch.overrides.TorchFunctionMode`),
  so the explained outputs are logits, as on the traced graph.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import CxrExplainError

Tensor = torch.Tensor

#: Functions whose output, when it is the model's output, is stripped to get the logits.
OUTPUT_ACTIVATIONS = {
    torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid, torch.special.expit,
    torch.softmax, torch.Tensor.softmax, F.softmax, torch.special.softmax,
    torch.log_softmax, torch.Tensor.log_softmax, F.log_softmax, torch.special.log_softmax,
}


class _ActivationInputs(TorchFunctionMode):
    """Remembers, for every sigmoid / softmax / log-softmax output of a forward, the tensor it read."""

    def __init__(self) -> None:
        super().__init__()
        self.read: dict[int, tuple[Tensor, Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in OUTPUT_ACTIVATIONS and isinstance(out, Tensor) and args and isinstance(args[0], Tensor):
            self.read[id(out)] = (out, args[0])
        return out

    def logits(self, out: Any, model: nn.Module) -> Tensor:
        if not isinstance(out, Tensor):
            raise CxrExplainError(
                f"{type(model).__name__} returns a {type(out).__name__}, not a tensor of logits; wrap it in an "
                "nn.Module whose forward returns the logits tensor")
        while id(out) in self.read and self.read[id(out)][0] is out:
            out = self.read[id(out)][1]
        if out.dim() != 2:
            raise CxrExplainError(f"the model's logits have shape {tuple(out.shape)}; expected (batch, classes)")
        return out


def model_logits(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` with a final sigmoid / softmax / log-softmax skipped: the logits (B, n)."""
    mode = _ActivationInputs()
    with mode:
        out = model(x)
    return mode.logits(out, model)
