"""Table cells: an interval only where there is one (n >= 2), "n = 1" for a single value, "–" for none;
the same cell in Markdown, HTML and the printed Table 2."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from cxr_explain.results.schema import iou_column
from cxr_explain.results.summary import summarize, table2
from cxr_explain.results.tables import ci_cell


def test_ci_cell_by_count():
    assert ci_cell(0.5, 0.4, 0.6, n=20) == "0.500 [0.400, 0.600]"
    assert ci_cell(0.5, 0.4, 0.6) == "0.500 [0.400, 0.600]"  # count unknown: the interval as given
    assert ci_cell(0.011, 0.011, 0.011, n=1) == "0.011 (n = 1)"
    assert ci_cell(0.5, 0.4, 0.6, n=0) == "–" and ci_cell(math.nan, n=3) == "–"
    assert ci_cell(0.25, math.nan, math.nan, n=5) == "0.250"


def _results(values: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for f, vs in values.items():
        for k, v in enumerate(vs):
            rows.append({"image_id": f"{f}{k}", "finding": f, "method": "cam", "gt": "box", "gt_index": 0,
                         iou_column(0.1): v})
    return pd.DataFrame(rows)


def test_table2_single_region_shows_value_and_n_not_an_interval():
    df = _results({"Mass": [0.011], "Nodule": [0.2, 0.4, 0.3, np.nan], "Effusion": [np.nan]})
    long = summarize(df, [iou_column(0.1)], n_boot=200)
    t = table2(long, [0.1], "protocol", "all", "box")
    row = dict(zip(t.frame.columns, t.frame.iloc[0]))
    assert row["Mass"] == "0.011 (n = 1)"
    assert row["Nodu"].startswith("0.300 [") and row["Effu"] == "–"  # NaN only: n = 0
    md, html = t.to_markdown(), t.to_html()
    assert "| 0.011 (n = 1) |" in md and "<td>0.011 (n = 1)</td>" in html
    assert "[0.011, 0.011]" not in md + html
    counts = dict(zip(t.frame.columns, t.frame.iloc[-1]))
    assert counts["Mass"] == "1" and counts["Effu"] == "0" and counts["Nodu"] == "3"
