"""``logits.csv``: every output of the model on each film an evaluation explained.

``results.csv`` keeps one logit per (film, boxed finding), positives only; the model's AUROC on the
evaluated films (:mod:`cxr_explain.evaluation.auroc`) needs every output of every film. The
explanation's forward pass computes them anyway, so ``evaluate`` logs them here as it goes
(one row per film: ``image_id``, ``weights_sha256`` — the first 16 hex digits of
:func:`cxr_explain.models.checkpoints.weights_sha256` of the explained model — then one column per
model output, named by its label), and the AUROC step reads them instead of decoding and running
every film again. Written a batch at a time (:class:`~.csvlog.CsvLog`): a killed run loses at most
one cut line; a film explained again appends a new row, and the last row of a film counts.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .csvlog import CsvLog, merge_logs, read_rows

__all__ = ["LOGITS_NAME", "LogitsLog", "read_logits", "merge_rank_logits"]

LOGITS_NAME = "logits.csv"
DIGEST_CHARS = 16


def logits_columns(labels: Sequence[str]) -> list[str]:
    return ["image_id", "weights_sha256", *labels]


class LogitsLog:
    """Appends films' logits to ``path`` (``logits.csv``, or a rank's part under ``torchrun``)."""

    def __init__(self, path: str | os.PathLike[str], labels: Sequence[str], weights_sha256: str):
        path, cols = Path(path), logits_columns(labels)
        other_outputs = path.is_file() and path.stat().st_size > 0 and _header(path) != cols
        self.log = CsvLog(path, cols, fresh=other_outputs)  # a model with other outputs starts it afresh
        self.digest = weights_sha256[:DIGEST_CHARS]
        self.labels = list(labels)

    def append(self, image_ids: Sequence[str], logits: np.ndarray) -> None:
        """One row per film: ``logits[i]`` holds its ``len(labels)`` outputs."""
        self.log.append({"image_id": iid, "weights_sha256": self.digest,
                         **{lab: float(v) for lab, v in zip(self.labels, row)}}
                        for iid, row in zip(image_ids, np.asarray(logits, dtype=np.float64)))


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        return next(csv.reader(fh), [])


def read_logits(folder: str | os.PathLike[str], labels: Sequence[str], weights_sha256: str) -> dict[str, np.ndarray]:
    """``{image_id: logits (float64, one per label)}`` of the films logged with these weights (the
    last row of each film); {} when the folder has no ``logits.csv`` or one with other outputs."""
    digest = weights_sha256[:DIGEST_CHARS]
    out: dict[str, np.ndarray] = {}
    for r in read_rows(Path(folder) / LOGITS_NAME, logits_columns(labels)):
        if r["weights_sha256"] == digest:
            try:
                out[r["image_id"]] = np.array([float(r[lab]) for lab in labels], dtype=np.float64)
            except ValueError:  # an empty or damaged cell: that film is scored again
                continue
    return out


def merge_rank_logits(folder: str | os.PathLike[str], world: int, labels: Sequence[str]) -> int:
    """Fold the ranks' ``logits.rank{r}.csv`` into ``logits.csv`` after its earlier rows (rank 0,
    after the barrier); returns the number of rows."""
    d = Path(folder)
    return merge_logs(d / LOGITS_NAME, [d / LOGITS_NAME] + [d / f"logits.rank{r}.csv" for r in range(world)],
                      logits_columns(labels))
