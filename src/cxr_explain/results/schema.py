"""The results schema: one row per (image, ground truth, method), its columns and its key.

Written by :mod:`cxr_explain.evaluation` (``results.csv``, docs/evaluation.md §7), read by the
summaries and :mod:`cxr_explain.report`. Columns, in file order: :data:`HEAD_COLUMNS` (identity,
the explained logit and probability, the image's number of boxes), one ``iou@T`` per threshold
(:func:`iou_column`), :data:`TAIL_COLUMNS` (the §2/§3 scores, the image's split, the saved map,
the image and its size, the ground-truth box or the bounding box of the mask, and the explanation's
conservation error |Σ map − explained| / |explained| for propagation methods, empty for the others).
"""
from __future__ import annotations

from typing import Iterable, Sequence

RESULTS_NAME = "results.csv"
#: Columns before the per-threshold IoUs.
HEAD_COLUMNS = ["image_id", "finding", "method", "gt", "gt_index", "logit", "prob", "n_boxes"]
#: Columns after the per-threshold IoUs.
TAIL_COLUMNS = ["otsu_t", "iou_otsu", "hit", "mass", "rank_acc", "auprc", "split", "map_file",
                "image_path", "height", "width", "box_x", "box_y", "box_w", "box_h", "conservation_error"]
#: A row's identity; the results file never holds two rows with the same key.
ROW_KEY = ["image_id", "method", "finding", "gt", "gt_index"]


def iou_column(t: float) -> str:
    """Column name of the IoU at threshold ``t`` (``iou@0.1``), as ``localization_scores`` names it."""
    return f"iou@{format(float(t), 'g')}"


def results_columns(thresholds: Sequence[float]) -> list[str]:
    """All columns of a results file for these thresholds, in file order."""
    return HEAD_COLUMNS + [iou_column(t) for t in thresholds] + TAIL_COLUMNS


def thresholds_of(columns: Iterable[str]) -> list[float]:
    """The IoU thresholds present as ``iou@T`` columns (of a results frame or a column list), in order."""
    return [float(c[4:]) for c in columns if str(c).startswith("iou@")]
