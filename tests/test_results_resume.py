"""Reopening a results file to resume it leaves no file handle behind (no ResourceWarning)."""
from __future__ import annotations

import gc
import warnings

from cxr_explain.results import ResultsWriter, read_results

COLUMNS = ["image_id", "finding", "method", "gt", "gt_index", "logit"]


def _row(image: str, method: str) -> dict:
    return {"image_id": image, "finding": "Mass", "method": method, "gt": "box", "gt_index": 0, "logit": 1.5}


def test_resumed_results_file_opens_no_stray_handle(tmp_path):
    path = tmp_path / "results.csv"
    with ResultsWriter(path, COLUMNS, fsync=False) as w:
        w.write_group([_row("a", "lrp")])
        w.write_group([_row("b", "lrp")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ResultsWriter(path, COLUMNS, expected={("a", "lrp"): 1, ("b", "lrp"): 1}, fsync=False) as w:
            assert w.done == {("a", "lrp"), ("b", "lrp")}
        gc.collect()
    assert not [c for c in caught if issubclass(c.category, ResourceWarning)], [str(c.message) for c in caught]
    assert list(read_results(path, COLUMNS)["image_id"]) == ["a", "b"]


def test_a_run_record_from_before_the_metrics_setting_means_every_metric(tmp_path):
    """``run.json`` written before ``--metrics`` existed computed every score: a rerun with the
    default goes on, one with fewer scores is refused."""
    import pytest

    from cxr_explain.errors import CxrExplainError
    from cxr_explain.metrics.localization import OPTIONAL_SCORES
    from cxr_explain.results.run import FIXED_DEFAULTS, record_run

    assert FIXED_DEFAULTS["metrics"] == list(OPTIONAL_SCORES)
    old = {"thresholds": [0.1], "model": {"arch": "x"}, "methods": ["cam"]}
    record_run(tmp_path, dict(old))
    record_run(tmp_path, {**old, "metrics": list(OPTIONAL_SCORES)})
    with pytest.raises(CxrExplainError, match="another metrics"):
        record_run(tmp_path, {**old, "metrics": ["hit"]})
