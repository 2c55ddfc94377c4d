"""What a results folder was made from, in words, for the report header (``run.json`` → ``about``).

:func:`describe_run` names the checkpoint file (no folder) and its SHA-256, what the model was
trained on (:func:`~cxr_explain.models.provenance.training_data_text`), which films were evaluated
(:func:`films_info`: the synthetic benchmark with its seed and size, or the dataset's layout and
folder name) and the run's warnings; :func:`~cxr_explain.results.run.record_about` stores it.
Nothing here holds an absolute path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from ..data.phantom import benchmark_info
from ..models.provenance import strip_machine_paths, training_data_text

__all__ = ["films_info", "checkpoint_info", "describe_run"]


def films_info(dataset: Any) -> dict[str, Any]:
    """``reader`` (the reader class's name, e.g. "NIH dataset"), ``folder`` (the data folder's name),
    ``synthetic`` and, for the synthetic benchmark (or a CheXlocalize-style copy of it), its
    ``seed``, ``size``, ``n``, ``generator``, ``shortcut`` and ``export``."""
    root = getattr(dataset, "root", None)
    info: dict[str, Any] = {"reader": str(getattr(type(dataset), "name", type(dataset).__name__)),
                            "folder": Path(root).resolve().name if root else "", "synthetic": False}
    bench = benchmark_info(root) if root else None
    if bench:
        info.update({"synthetic": True, "seed": bench.get("seed"), "size": bench.get("size"), "n": bench.get("n"),
                     "generator": bench.get("generator"), "shortcut": bench.get("shortcut"),
                     "export": bool(bench.get("export"))})
    return info


def checkpoint_info(model: nn.Module, checkpoint: Optional[str | os.PathLike[str]] = None,
                    shipped: bool = False) -> dict[str, Any]:
    """``file`` (name only), ``sha256`` (64 hex digits) and ``shipped`` of the checkpoint the model
    was loaded from: ``checkpoint`` when given, the shipped asset when ``shipped``, else what the
    model's provenance records (``file`` / ``sha256`` of a foreign checkpoint); empty strings when
    unknown (a model built in Python)."""
    from ..models.checkpoints import file_sha256

    if checkpoint is None and shipped:
        from ..models.default import default_checkpoint_path

        checkpoint = default_checkpoint_path()
    if checkpoint is not None and Path(checkpoint).is_file():
        return {"file": Path(checkpoint).name, "sha256": file_sha256(checkpoint), "shipped": bool(shipped)}
    prov = dict(getattr(getattr(model, "cxr_spec", None), "provenance", None) or {})
    name = strip_machine_paths(str(prov.get("file") or prov.get("path") or ""))
    return {"file": name, "sha256": str(prov.get("sha256") or ""), "shipped": bool(shipped)}


def describe_run(model: nn.Module, dataset: Any, checkpoint: Optional[str | os.PathLike[str]] = None,
                 shipped: bool = False, notes: Sequence[str] = ()) -> dict[str, Any]:
    """The ``about`` record: ``checkpoint`` (:func:`checkpoint_info`), ``training_data`` (words),
    ``films`` (:func:`films_info`) and ``notes`` (the run's warnings, one line each)."""
    prov = dict(getattr(getattr(model, "cxr_spec", None), "provenance", None) or {})
    return {"checkpoint": checkpoint_info(model, checkpoint, shipped), "training_data": training_data_text(prov),
            "films": films_info(dataset), "notes": [strip_machine_paths(str(n)) for n in notes if n]}
