"""The report header: what was evaluated with what, as a readable two-column table.

:func:`header_table` reads ``run.json`` (its ``model`` and ``dataset`` entries and the ``about``
description :mod:`cxr_explain.evaluation.describe` adds) and ``results.csv`` of a folder and says,
one row each: the model (architecture, outputs), the checkpoint (file name, short SHA-256), what it
was trained on, its input, the films (in words, "synthetic benchmark films ..." for the phantom),
methods and counts, the run's warnings. :func:`header_tables` adds the model's AUROC on those films
(:func:`~.auroc.auroc_table`). No absolute path is shown: names only
(:func:`~cxr_explain.models.provenance.strip_machine_paths`).
"""
from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any, Optional

import pandas as pd

from ..models.provenance import strip_machine_paths, training_data_text
from .auroc import auroc_table
from .folder import ResultsFolder
from .run import ABOUT
from .tables import Table

__all__ = ["HEADER_NAME", "arch_text", "model_text", "checkpoint_text", "input_text", "films_text", "header_table",
           "header_tables"]

HEADER_NAME = "header"
#: The preprocessing names of docs/data_formats.md §3, in words.
PREPROCESSING_TEXT = {
    "imagenet-rgb": "grey film repeated to 3 channels, ImageNet mean / std",
    "xrv": "torchxrayvision: 1 channel, centre crop, intensities scaled to [-1024, 1024]",
    "gray": "1 channel, intensities scaled to [0, 1]",
}
_FAMILIES = {"densenet": "DenseNet", "resnet": "ResNet", "vgg": "VGG"}
#: Dataset readers (run.json's dataset type) and the layouts they read, for films that are not synthetic.
READERS = {"NIHDataset": "NIH ChestX-ray14 layout", "NIH dataset": "NIH ChestX-ray14 layout",
           "RSNADataset": "RSNA Pneumonia layout", "RSNA dataset": "RSNA Pneumonia layout",
           "CheXlocalizeDataset": "CheXlocalize layout", "CheXlocalize dataset": "CheXlocalize layout",
           "CheXpertDataset": "CheXpert layout", "CheXpert dataset": "CheXpert layout",
           "MIMICDataset": "MIMIC-CXR-JPG layout", "MIMIC-CXR-JPG dataset": "MIMIC-CXR-JPG layout",
           "FolderDataset": "a folder of images", "folder dataset": "a folder of images"}


def arch_text(arch: str) -> str:
    """``densenet121`` → ``DenseNet-121``, ``vgg16_bn`` → ``VGG-16 (BN)``; other names unchanged."""
    m = re.fullmatch(r"(densenet|resnet|vgg)(\d+)(_bn)?", str(arch))
    if not m:
        return str(arch)
    return f"{_FAMILIES[m.group(1)]}-{m.group(2)}" + (" (BN)" if m.group(3) else "")


def model_text(model: dict[str, Any]) -> str:
    """``DenseNet-121 (torchvision densenet121), 8 outputs (logits): Atelectasis, ...``."""
    arch = str(model.get("arch", "?"))
    labels = list(model.get("labels", []))
    pretty = arch_text(arch)
    name = f"{pretty} ({arch})" if pretty != arch else arch
    kind = "multi-label logits" if model.get("multilabel", True) else "logits"
    return f"{name}; {len(labels)} outputs ({kind}): {', '.join(map(str, labels))}"


def checkpoint_text(about: dict[str, Any], model: dict[str, Any]) -> str:
    """``default_densenet121.pt (shipped with cxr-explain); SHA-256 8f9e6240443a…``, from the run's
    description, else the model's provenance; says so when no file is known."""
    ck = dict(about.get("checkpoint") or {})
    prov = dict(model.get("provenance") or {})
    name = ck.get("file") or PurePath(strip_machine_paths(str(prov.get("file") or prov.get("path") or ""))).name
    digest = str(ck.get("sha256") or prov.get("sha256") or "")
    if not name and not digest:
        weights = prov.get("weights") or prov.get("source")
        return f"no checkpoint file recorded ({strip_machine_paths(str(weights))})" if weights else \
            "no checkpoint file recorded (a model built in Python)"
    text = name or "unnamed checkpoint"
    if ck.get("shipped"):
        text += " (shipped with cxr-explain)"
    return text + (f"; SHA-256 {digest[:12]}…" if digest else "")


def input_text(model: dict[str, Any]) -> str:
    """``128 × 128 px; imagenet-rgb (grey film repeated to 3 channels, ImageNet mean / std)``."""
    size = model.get("input_size", "?")
    pre = str(model.get("preprocessing", "?"))
    words = PREPROCESSING_TEXT.get(pre)
    return f"{size} × {size} px; {pre}" + (f" ({words})" if words else "") + "; see docs/data_formats.md §3"


def films_text(about: dict[str, Any], dataset: dict[str, Any]) -> str:
    """The films in words: ``synthetic benchmark films (cxr-explain phantom, seed 0, 128 px)`` for the
    phantom (and ``, CheXlocalize-style copy`` for an export), else the layout and the folder's name."""
    films = dict(about.get("films") or {})
    if films.get("synthetic"):
        bits = [f"seed {films['seed']}" if films.get("seed") is not None else "",
                f"{films['size']} px" if films.get("size") else ""]
        bits = ", ".join(b for b in bits if b)
        extra = ", planted '" + str(films["shortcut"]) + "' shortcut" if films.get("shortcut") else ""
        copy = " in the CheXlocalize layout (a copy made by cxr-explain)" if films.get("export") else ""
        return f"synthetic benchmark films (cxr-explain phantom, {bits}{extra}){copy}; not real radiographs"
    reader = str(films.get("reader") or dataset.get("type") or "")
    folder = films.get("folder") or PurePath(strip_machine_paths(str(dataset.get("root", "")))).name
    layout = READERS.get(reader, reader or "unknown layout")
    return f"{layout}, folder '{folder}'" if folder else layout


def header_table(folder: ResultsFolder | str) -> Table:
    """The two-column header (``item``, ``value``) of a results folder."""
    folder = ResultsFolder.of(folder)
    run, df = folder.run, folder.results
    model, ds = dict(run.get("model") or {}), dict(run.get("dataset") or {})
    about = dict(run.get(ABOUT) or {})
    training = about.get("training_data") or training_data_text(model.get("provenance") or {})
    n_img = df["image_id"].nunique() if len(df) else 0
    split = run.get("split_filter")
    where = f" of the {split} split" if split else ""
    methods = ", ".join(dict.fromkeys(df["method"])) if len(df) else ", ".join(run.get("methods", []))
    gts = ", ".join(f"{g} ({int((df['gt'] == g).sum())} rows)" for g in dict.fromkeys(df["gt"])) if len(df) else "–"
    rows = [["model", model_text(model)],
            ["checkpoint", checkpoint_text(about, model)],
            ["training data", training],
            ["input", input_text(model)],
            ["films evaluated", f"{films_text(about, ds)}; {n_img} films{where} with a box or mask"],
            ["methods", methods],
            ["ground truth", gts]]
    rows += [["warning", strip_machine_paths(str(n))] for n in about.get("notes", []) if n]
    frame = pd.DataFrame(rows, columns=["item", "value"])
    return Table(HEADER_NAME, "What was evaluated", frame, frame.copy(), html_class="kv")


def header_tables(folder: ResultsFolder | str) -> list[Table]:
    """:func:`header_table` and, when the folder has one, the model's AUROC table (:func:`~.auroc.auroc_table`)."""
    folder = ResultsFolder.of(folder)
    au: Optional[Table] = auroc_table(folder)
    return [header_table(folder)] + ([au] if au is not None else [])
