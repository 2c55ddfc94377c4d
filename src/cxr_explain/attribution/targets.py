"""What a map explains: targets turn the model's logits ``y`` (B, n) into the scalars explained.

A :class:`Target` selects, per image, K explained outputs. Linear targets are seed vectors ``s`` over
the outputs, explaining ``s · y``:

* :class:`Index` ``t`` — ``s = e_t`` (the logit ``y_t``); :class:`Finding` — the same, by label name;
* :class:`Predicted` — ``t = argmax y`` per image;
* :class:`Contrast` ``a`` vs ``b`` — ``s = e_a − e_b`` (``y_a − y_b``: "why Pneumonia rather than
  No Finding").

Propagation methods start from them (LRP: ``s ⊙ y``; RAP: ``s``, its first step rescales to the
logits), gradient methods use ``s`` as the backward seed, CAM the seed-weighted classifier rows.
:class:`Callable` targets — any differentiable function of the logits, e.g. :class:`Probability`
``σ(y_t)`` — work with gradient-family methods (gradients, Grad-CAM).

:func:`as_target` turns what users write (``3``, ``"Cardiomegaly"``, ``"predicted"``,
``"Pneumonia-vs-No Finding"``, ``"prob:Pneumonia"``, one target or list per image, a (B, K) tensor
with −1 padding, a function) into a :class:`Target`. Label names are matched by
:func:`cxr_explain.data.labels.label_index` (one alias table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable as CallableType, Optional, Sequence, Union

import torch

from ..data.labels import label_index
from ..errors import CxrExplainError

Tensor = torch.Tensor
CONTRAST_SEPARATOR = "-vs-"
PROBABILITY_PREFIX = "prob:"


@dataclass
class Selection:
    """The K outputs explained for each of B images.

    ``classes`` (B, K): the class each map is named after (a contrast's first class; −1 where the
    slot is padding or the target is a function); ``valid`` (B, K): the slot holds a target;
    ``names``: display names (``""`` for padding); ``per_image``: the caller gave a list per image,
    so maps keep the K axis; ``weights`` (B, K, n): seed vectors of linear targets, else None;
    ``fn``: for function targets, ``logits (B, n) -> (B, K)``.
    """

    classes: Tensor
    valid: Tensor
    names: list[list[str]]
    per_image: bool
    weights: Optional[Tensor] = None
    fn: Optional[CallableType[[Tensor], Tensor]] = None

    @property
    def linear(self) -> bool:
        return self.weights is not None

    @property
    def k(self) -> int:
        return int(self.classes.shape[1])

    def to(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> "Selection":
        w = None if self.weights is None else self.weights.to(device=device, dtype=dtype or self.weights.dtype)
        return Selection(self.classes.to(device), self.valid.to(device), self.names, self.per_image, w, self.fn)

    def repeat(self, n: int) -> "Selection":
        """The same targets for ``n`` stacked copies of the batch (integrated gradients' path points)."""
        w = None if self.weights is None else self.weights.repeat(n, 1, 1)
        return Selection(self.classes.repeat(n, 1), self.valid.repeat(n, 1), self.names * n, self.per_image, w, self.fn)

    def values(self, logits: Tensor) -> Tensor:
        """The explained outputs (B, K), differentiable in ``logits``; 0 in padding slots."""
        if self.fn is not None:
            v = self.fn(logits)
            if v.dim() == 1:
                v = v.unsqueeze(1)
            if v.shape != self.classes.shape:
                raise CxrExplainError(f"the target function returned shape {tuple(v.shape)}; expected "
                                      f"{tuple(self.classes.shape)} (one value per image)")
            return v * self.valid
        return torch.einsum("bkn,bn->bk", self.weights.to(logits.dtype), logits)

    def explained(self, logits: Tensor) -> Tensor:
        """:meth:`values` detached, NaN in padding slots (what :class:`Explanation` reports)."""
        v = self.values(logits.detach()).detach()
        return torch.where(self.valid, v, torch.full_like(v, float("nan")))

    def objective(self, logits: Tensor, k: int) -> Tensor:
        """``Σ_b value[b, k]``: one backward of it gives every image's gradient for slot k."""
        return self.values(logits)[:, k].sum()

    def seeds(self) -> Tensor:
        """Seed vectors laid out (K, B, n) for the propagation engine (linear targets only)."""
        if self.weights is None:
            raise CxrExplainError("propagation methods explain linear targets (a class, a finding, a contrast); "
                                  "function targets such as probabilities work with gradient and gradcam")
        return self.weights.transpose(0, 1)


class Target:
    """Base class: :meth:`select` the explained outputs from a batch's logits."""

    def select(self, logits: Tensor, labels: Optional[Sequence[str]] = None) -> Selection:
        rows = self.rows(logits, labels)
        b = logits.shape[0]
        cls = torch.as_tensor([r[1] for r in rows], dtype=torch.long).view(b, 1)
        if rows and rows[0][0] is None:  # a function target
            return Selection(cls, torch.ones(b, 1, dtype=torch.bool), [[r[2]] for r in rows], False,
                             fn=self.function())
        w = torch.stack([r[0] for r in rows]).unsqueeze(1).to(logits.dtype)
        return Selection(cls, torch.ones(b, 1, dtype=torch.bool), [[r[2]] for r in rows], False, weights=w)

    def rows(self, logits: Tensor, labels: Optional[Sequence[str]]) -> list[tuple[Optional[Tensor], int, str]]:
        """Per image: (seed vector (n,) or None, class index or −1, display name)."""
        raise NotImplementedError

    def function(self) -> Optional[CallableType[[Tensor], Tensor]]:
        return None


def _onehot(i: int, n: int) -> Tensor:
    v = torch.zeros(n)
    v[i] = 1.0
    return v


def _name(i: int, labels: Optional[Sequence[str]]) -> str:
    return labels[i] if labels and 0 <= i < len(labels) and labels[i] else f"class{i}"


def _check_index(i: int, n: int) -> int:
    if not 0 <= i < n:
        raise CxrExplainError(f"target class {i} is out of range: the model has {n} outputs (0..{n - 1})")
    return i


@dataclass(frozen=True)
class Index(Target):
    """The logit of output ``index``."""

    index: int

    def rows(self, logits, labels):
        n = logits.shape[1]
        i = _check_index(int(self.index), n)
        return [(_onehot(i, n), i, _name(i, labels))] * logits.shape[0]


@dataclass(frozen=True)
class Finding(Target):
    """The logit of the output named ``name`` (matched through the label alias table)."""

    name: str

    def resolve(self, labels: Optional[Sequence[str]], n: int) -> int:
        if self.name.lstrip("-").isdigit():
            return _check_index(int(self.name), n)
        if not labels:
            raise CxrExplainError(f"target {self.name!r} is a name but the model has no label names; give a class index")
        return label_index(self.name, labels)

    def rows(self, logits, labels):
        n = logits.shape[1]
        i = self.resolve(labels, n)
        return [(_onehot(i, n), i, _name(i, labels))] * logits.shape[0]


@dataclass(frozen=True)
class Predicted(Target):
    """Each image's arg-max logit."""

    def rows(self, logits, labels):
        n = logits.shape[1]
        return [(_onehot(int(i), n), int(i), _name(int(i), labels)) for i in logits.argmax(1).tolist()]


@dataclass(frozen=True)
class Contrast(Target):
    """``y_a − y_b``: the evidence for ``a`` over ``b`` (e.g. Pneumonia vs No Finding)."""

    a: Union[int, str, Target]
    b: Union[int, str, Target]

    def rows(self, logits, labels):
        ra = as_target(self.a).rows(logits, labels)
        rb = as_target(self.b).rows(logits, labels)
        out = []
        for (wa, ia, na), (wb, ib, nb) in zip(ra, rb):
            if wa is None or wb is None:
                raise CxrExplainError("a contrast is between two classes or findings, not functions")
            if ia == ib:
                raise CxrExplainError(f"a contrast needs two different outputs; got {na!r} twice")
            out.append((wa - wb, ia, f"{na}{CONTRAST_SEPARATOR}{nb}"))
        return out


@dataclass(frozen=True)
class Callable(Target):
    """Any function of the logits, ``fn(logits (B, n)) -> (B,)``, for gradient-family methods."""

    fn: CallableType[[Tensor], Tensor]
    name: str = "custom"

    def rows(self, logits, labels):
        return [(None, -1, self.name)] * logits.shape[0]

    def function(self):
        return self.fn


@dataclass(frozen=True)
class Probability(Target):
    """The model's probability of ``target``: ``σ(y_t)`` (``activation="sigmoid"``, multi-label
    models) or ``softmax(y)_t``; explained by gradient-family methods."""

    target: Union[int, str, Target]
    activation: str = "sigmoid"

    def select(self, logits, labels=None):
        if self.activation not in ("sigmoid", "softmax"):
            raise CxrExplainError(f"probability activation {self.activation!r}: use sigmoid or softmax")
        inner = as_target(self.target).select(logits, labels)
        if not inner.linear:
            raise CxrExplainError("a probability is of a class or finding, not of a function")
        seed, act = inner.weights, self.activation

        def prob(y: Tensor) -> Tensor:
            p = torch.sigmoid(y) if act == "sigmoid" else torch.softmax(y, 1)
            return torch.einsum("bkn,bn->bk", seed.to(y), p)

        names = [[f"p({n})" for n in row] for row in inner.names]
        return Selection(inner.classes, inner.valid, names, inner.per_image, fn=prob)

    def rows(self, logits, labels):
        raise CxrExplainError("probability targets apply to the whole batch; pass one, not a list per image")


@dataclass(frozen=True)
class PerImage(Target):
    """One target, or a list of targets, per image: maps keep a K axis (ragged lists padded)."""

    targets: tuple

    def select(self, logits, labels=None):
        b, n = logits.shape
        if len(self.targets) != b:
            raise CxrExplainError(f"got {len(self.targets)} targets for {b} images: give one target (or one list) per image")
        lists = [list(t) if isinstance(t, (list, tuple)) else [t] for t in self.targets]
        k = max(len(r) for r in lists)
        if k == 0:
            raise CxrExplainError("empty target lists: give at least one class per image")
        classes = torch.full((b, k), -1, dtype=torch.long)
        valid = torch.zeros((b, k), dtype=torch.bool)
        weights = torch.zeros((b, k, n), dtype=logits.dtype)
        names = [[""] * k for _ in range(b)]
        for i, row in enumerate(lists):
            for j, spec in enumerate(row):
                if self.nested and isinstance(spec, int) and spec == -1:  # padding of ragged lists
                    continue
                ((w, c, name),) = as_target(spec).rows(logits[i:i + 1], labels)
                if w is None:
                    raise CxrExplainError("function targets apply to the whole batch; pass the function itself")
                classes[i, j], valid[i, j], names[i][j] = c, True, name
                weights[i, j] = w
        return Selection(classes, valid, names, self.nested, weights)

    @property
    def nested(self) -> bool:
        return any(isinstance(t, (list, tuple)) for t in self.targets)


TargetSpec = Union[int, str, Target, Sequence, Tensor, CallableType[[Tensor], Tensor]]


def parse_target(text: str) -> Target:
    """A target from its written form: ``predicted``, ``3``, ``Cardiomegaly``,
    ``Pneumonia-vs-No Finding`` (a contrast), ``prob:Pneumonia`` (a probability)."""
    text = text.strip()
    if not text:
        raise CxrExplainError("empty target; give a class index, a finding name or 'predicted'")
    if text.lower() == "predicted":
        return Predicted()
    if text.lower().startswith(PROBABILITY_PREFIX):
        return Probability(parse_target(text[len(PROBABILITY_PREFIX):]))
    if CONTRAST_SEPARATOR in text:
        a, b = text.split(CONTRAST_SEPARATOR, 1)
        return Contrast(parse_target(a), parse_target(b))
    if text.lstrip("-").isdigit():
        i = int(text)
        if i < 0:
            raise CxrExplainError(f"target {i} is negative; class indices start at 0")
        return Index(i)
    return Finding(text)


def as_target(spec: TargetSpec) -> Target:
    """The :class:`Target` a user's ``target=`` argument means (module docstring)."""
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, bool):
        raise CxrExplainError(f"target {spec!r} is not a class; give an index, a name or 'predicted'")
    if isinstance(spec, int):
        if spec < 0:
            raise CxrExplainError(f"target {spec} is negative; class indices start at 0")
        return Index(spec)
    if isinstance(spec, str):
        return parse_target(spec)
    if isinstance(spec, Tensor):
        t = spec.detach().cpu().long()
        if t.dim() == 0:
            return as_target(int(t))
        if t.dim() == 1:
            return PerImage(tuple(int(v) for v in t))
        if t.dim() == 2:
            return PerImage(tuple(list(int(v) for v in row) for row in t))
        raise CxrExplainError(f"a target tensor must be (B,) or (B, K); got shape {tuple(t.shape)}")
    if callable(spec):
        return Callable(spec, getattr(spec, "__name__", "custom"))
    if isinstance(spec, (list, tuple)):
        return PerImage(tuple(spec))
    raise CxrExplainError(f"cannot use {type(spec).__name__} as a target; give an index, a name, 'predicted', "
                          "a list per image or a function of the logits")


def select(spec: TargetSpec, logits: Tensor, labels: Optional[Sequence[str]] = None) -> Selection:
    """``as_target(spec).select(logits, labels)`` on the logits' device."""
    sel = as_target(spec).select(logits.detach(), labels)
    return sel.to(logits.device, logits.dtype)


__all__ = ["Callable", "Contrast", "Finding", "Index", "PerImage", "Predicted", "Probability", "Selection", "Target",
           "as_target", "parse_target", "select"]
