"""Progress bars write a few whole lines when their stream is not a terminal."""
from __future__ import annotations

import io

from cxr_explain import progress
from cxr_explain.progress import progress_bar


def test_plain_lines_off_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)  # every tenth of the work is due at once
    out = io.StringIO()
    for _ in progress_bar(range(1000), desc="films", unit="img", file=out):
        pass
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert 2 <= len(lines) <= 12, lines  # start, at most one per tenth, end; no repeat of the last count
    assert lines[0].startswith("films:   0%") and "1000/1000" in lines[-1]
    assert all(line.startswith("films:") for line in lines)


def test_default_interval_gives_start_and_end_only_for_a_quick_run():
    out = io.StringIO()
    bar = progress_bar(total=50, desc="x", leave=False, file=out)
    for _ in range(50):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "0/50" in lines[0] and "50/50" in lines[1], lines
