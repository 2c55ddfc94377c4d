"""The results of an evaluation and everything read from them: the schema (one row per image ×
ground truth × method), the append-only ``results.csv``, the saved heatmaps, the run record
``run.json`` and the summary tables. :mod:`cxr_explain.evaluation` writes through this package and
:mod:`cxr_explain.report` reads through it; neither imports the other."""
from __future__ import annotations

from .folder import FIGURES_DIR, TABLES_DIR, ResultsFolder
from .maps import load_maps, map_file, save_maps
from .run import RUN_FILE, load_run, record_run
from .schema import HEAD_COLUMNS, RESULTS_NAME, ROW_KEY, TAIL_COLUMNS, iou_column, results_columns, thresholds_of
from .store import ResultsWriter, complete_pairs, merge_results, read_results
from .summary import write_summaries

__all__ = ["FIGURES_DIR", "TABLES_DIR", "ResultsFolder", "load_maps", "map_file", "save_maps", "RUN_FILE",
           "load_run", "record_run", "HEAD_COLUMNS", "RESULTS_NAME", "ROW_KEY", "TAIL_COLUMNS", "iou_column",
           "results_columns", "thresholds_of", "ResultsWriter", "complete_pairs", "merge_results", "read_results",
           "write_summaries"]
