"""The method protocol and the one registry.

A method is a small frozen dataclass: its class attributes say what it is (``name``, ``family``,
whether its maps are ``signed`` or CAM-like, whether it is ``conserving``), its dataclass fields are
its options (with a ``help`` text in the field metadata), and :meth:`Method.explain` runs it.
Everything that depends on the kind of method (the API, overlays, figures, evaluation) asks the
method object; nothing switches on a name.

Adding one is one file::

    @register
    @dataclass(frozen=True)
    class XGradCam(GradCamFamily):
        name = "xgradcam"
        description = "XGrad-CAM: α_c = Σ A·g / Σ A"
        def channel_weights(self, A, g):
            return (A * g).sum((2, 3), keepdim=True) / (A.sum((2, 3), keepdim=True) + 1e-7)
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

from ...errors import CxrExplainError

if TYPE_CHECKING:  # torch is imported when a method runs, not when the registry is listed
    import torch.nn as nn
    from torch import Tensor

    from ..explanation import Explanation
    from ..targets import Target


class Family(str, enum.Enum):
    """How a method computes its maps."""

    PROPAGATION = "propagation"  # rules applied backwards through the traced graph (LRP, RAP, RSP)
    GRADIENT = "gradient"  # autograd to the input (gradient, gradient × input, IG)
    CAM = "cam"  # a weighted feature map at low resolution, upsampled (CAM, Grad-CAM)


@dataclass
class Request:
    """What :meth:`Method.explain` receives: the model (eval mode, in the working dtype) and the
    input on its device, the target, the model's label names, and the per-call settings."""

    model: nn.Module
    x: Tensor
    target: Target
    labels: Optional[list[str]] = None
    layer: Optional[str] = None  # feature layer (CAM family)
    keep_relevance: Sequence[str] = ()  # layers whose relevance to return (propagation family)
    check_conservation: bool = True


@dataclass(frozen=True)
class Option:
    """One option of a method, as listed by ``cxr-explain methods`` and set by ``--method-option``."""

    name: str
    type: type
    default: Any
    help: str

    def parse(self, text: str, method: str) -> Any:
        try:
            if self.type is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                return text.lower() in ("true", "1", "yes")
            return self.type(text)
        except ValueError:
            raise CxrExplainError(f"method option {method}.{self.name}={text!r}: expected a {self.type.__name__}") from None


def option(default: Any, help: str) -> Any:
    """A method option: a dataclass field with its help text."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Method:
    """Base class of every explanation method (see the module docstring)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    family: ClassVar[Family]
    signed: ClassVar[bool] = True
    conserving: ClassVar[bool] = False
    aliases: ClassVar[tuple[str, ...]] = ()

    def explain(self, request: Request) -> Explanation:
        raise NotImplementedError

    @classmethod
    def options(cls) -> list[Option]:
        out = []
        for f in dataclasses.fields(cls):
            typ = f.type if isinstance(f.type, type) else {"float": float, "int": int, "bool": bool,
                                                             "str": str}.get(str(f.type), str)
            out.append(Option(f.name, typ, f.default, f.metadata.get("help", "")))
        return out

    def settings(self) -> dict[str, Any]:
        """Name and option values: what a results folder records about how its maps were made."""
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def __str__(self) -> str:
        opts = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{self.name}({opts})" if opts else self.name


_REGISTRY: dict[str, type[Method]] = {}
_ALIASES: dict[str, str] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available by its ``name`` (and ``aliases``) everywhere."""
    if not cls.name:
        raise CxrExplainError(f"method class {cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    for a in cls.aliases:
        _ALIASES[a] = cls.name
    return cls


def unregister(name: str) -> None:
    """Remove a method (and its aliases) from the registry, e.g. to redefine it in a notebook."""
    cls = _REGISTRY.pop(name, None)
    for a in getattr(cls, "aliases", ()):
        _ALIASES.pop(a, None)


def _builtins() -> None:
    from . import builtin  # noqa: F401  (registers the shipped methods on import)


def available_methods() -> list[str]:
    """Every registered method name, in registration order."""
    _builtins()
    return list(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The class registered under ``name`` (or an alias), or a one-line error with the closest names."""
    _builtins()
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, list(_REGISTRY) + list(_ALIASES), n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise CxrExplainError(f"unknown method {name!r}{hint} (available: {', '.join(_REGISTRY)})")


def resolve_method_name(name: str) -> str:
    """Canonical method name, or a one-line error with the closest names."""
    return method_class(name).name


def get_method(method: "str | Method", **options: Any) -> Method:
    """A configured method: ``get_method("lrp-epsilon", epsilon=0.1)``; a :class:`Method` is
    returned as is (options then must be empty)."""
    if isinstance(method, Method):
        if options:
            return dataclasses.replace(method, **options)
        return method
    cls = method_class(method)
    known = {o.name for o in cls.options()}
    unknown = sorted(set(options) - known)
    if unknown:
        have = ", ".join(sorted(known)) or "none"
        raise CxrExplainError(f"method {cls.name!r} has no option {unknown[0]!r} (its options: {have})")
    return cls(**options)


def parse_method_options(methods: Sequence[str], items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--method-option`` values (``NAME=VALUE`` for every listed method that has that option, or
    ``METHOD.NAME=VALUE`` for one) -> ``{method: {option: value}}``; a one-line error for an option
    no listed method takes, before any work is done."""
    names = [resolve_method_name(m) for m in methods]
    out: dict[str, dict[str, Any]] = {m: {} for m in names}
    for item in items:
        if "=" not in item:
            raise CxrExplainError(f"--method-option {item!r}: write NAME=VALUE or METHOD.NAME=VALUE")
        key, value = (s.strip() for s in item.split("=", 1))
        if "." in key:
            m, key = key.rsplit(".", 1)
            targets = [resolve_method_name(m)]
            if targets[0] not in out:
                raise CxrExplainError(f"--method-option {item!r}: method {targets[0]!r} is not among the methods run")
        else:
            targets = names
        hit = False
        for m in targets:
            opts = {o.name: o for o in method_class(m).options()}
            if key in opts:
                out[m][key] = opts[key].parse(value, m)
                hit = True
        if not hit:
            takes = {m: [o.name for o in method_class(m).options()] for m in targets}
            listing = "; ".join(f"{m}: {', '.join(o) or 'none'}" for m, o in takes.items())
            raise CxrExplainError(f"--method-option {item!r}: no method run here has an option {key!r} ({listing})")
    return out
