"""An evaluation folder as its readers see it: the results frame (read once), the run record and
the saved maps, behind one object that the summaries and the report share."""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CxrExplainError
from .maps import load_maps
from .run import load_run
from .schema import RESULTS_NAME
from .store import read_results

__all__ = ["ResultsFolder", "TABLES_DIR", "FIGURES_DIR"]

TABLES_DIR = "tables"
FIGURES_DIR = "figures"


class ResultsFolder:
    """``results.csv`` (:attr:`results`, read on first use and kept), ``run.json`` (:attr:`run`) and
    ``maps/`` (:meth:`maps`, the last few files kept) of the folder at ``path``."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._maps: dict[str, dict[str, np.ndarray]] = {}

    @classmethod
    def of(cls, where: "str | os.PathLike[str] | ResultsFolder") -> "ResultsFolder":
        """``where`` itself if it is a :class:`ResultsFolder`, else the folder at that path."""
        return where if isinstance(where, ResultsFolder) else cls(where)

    @cached_property
    def results(self) -> pd.DataFrame:
        """Every row of ``results.csv`` (empty frame when there is none)."""
        return read_results(self.path / RESULTS_NAME)

    @cached_property
    def run(self) -> dict:
        """The settings of ``run.json`` ({} when absent)."""
        return load_run(self.path)

    def require_results(self, what: str = "report") -> pd.DataFrame:
        """:attr:`results`, or a CxrExplainError saying there is nothing to ``what``."""
        if not len(self.results):
            raise CxrExplainError(f"{self.path / RESULTS_NAME}: no results to {what}; run evaluate first")
        return self.results

    def maps(self, map_file: str) -> dict[str, np.ndarray]:
        """The maps of one results row's ``map_file`` (``{finding: (H, W) float32}``)."""
        if not map_file:
            raise CxrExplainError(f"{self.path}: maps were not saved (evaluate with save_maps=True) "
                                  "so no figure can be drawn")
        if map_file not in self._maps:
            if len(self._maps) > 64:
                self._maps.clear()
            p = self.path / map_file
            if not p.is_file():
                raise CxrExplainError(f"{p}: heatmap file missing; rerun evaluate into this folder")
            self._maps[map_file] = load_maps(p)
        return self._maps[map_file]

    @property
    def tables_dir(self) -> Path:
        return self.path / TABLES_DIR

    @property
    def figures_dir(self) -> Path:
        return self.path / FIGURES_DIR
