"""The HTML report and the figures: self-contained, renders in headless Chromium without console errors."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from cxr_explain.data.nih import NIHDataset
from cxr_explain.data.phantom import generate
from cxr_explain.evaluation import evaluate
from cxr_explain.evaluation.auroc import evaluated_auroc
from cxr_explain.evaluation.describe import describe_run
from cxr_explain.results import read_results
from cxr_explain.models.zoo import BENCHMARK_LABELS, ModelSpec
from cxr_explain.report.figures import methods_grid, select_regions
from cxr_explain.report.html import write_report
from cxr_explain.results.run import record_about

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _model() -> nn.Module:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, len(BENCHMARK_LABELS)))
    m.cxr_spec = ModelSpec(arch="tiny-cnn", labels=list(BENCHMARK_LABELS), preprocessing="gray", input_size=64)
    return m.eval()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ph")
    generate(root, 12, seed=7, size=64, workers=1, progress=False)
    ds = NIHDataset(root, boxed_only=True, findings=BENCHMARK_LABELS)
    out = tmp_path_factory.mktemp("res")
    model = _model()
    evaluate(model, ds, ("cam", "lrp", "rap"), out_dir=out, progress=False)
    record_about(out, describe_run(model, ds, notes=["a warning about /tmp/somewhere/film.png"]))
    evaluated_auroc(model, ds, out, n_boot=100)
    return out


@pytest.fixture(scope="module")
def report(results) -> Path:
    return write_report(results, gallery_per_finding=3, thumb=96)


def test_report_is_self_contained(report, results):
    text = report.read_text()
    assert report.name == "report.html"
    assert not re.search(r"""(src|href)\s*=\s*['"](?!data:)""", text), "external resource referenced"
    assert "http://" not in text and "https://" not in text
    imgs = re.findall(r"<img [^>]*src='data:image/png;base64,", text)
    df = read_results(results / "results.csv")
    n_findings = df[df["gt"] == "box"]["finding"].nunique()
    assert len(imgs) >= n_findings * 4  # gallery rows: X-ray + 3 methods (+ curves, grids)
    assert "Protocol: docs/evaluation.md §1" in text and "<table class='t'>" in text
    for f in set(df["finding"]):
        assert f"<summary>{f} (" in text


def test_report_header_is_a_readable_table_without_machine_paths(report, results):
    text = report.read_text()
    head = text[:text.index("<h2>")]
    assert "<h3>What was evaluated</h3>" in head and "<table class='kv'>" in head
    for want in ("<td>model</td><td>tiny-cnn; 8 outputs (multi-label logits): Atelectasis, Cardiomegaly",
                 "<td>synthetic benchmark films (cxr-explain phantom, seed 7, 64 px); not real radiographs; ",
                 "<td>input</td><td>64 × 64 px; gray (1 channel, intensities scaled to [0, 1])",
                 "<td>checkpoint</td><td>no checkpoint file recorded",
                 "<td>warning</td><td>a warning about film.png</td>",
                 "<h3>Model AUROC on the evaluated films</h3>"):
        assert want in head, want
    assert "{&#39;" not in text and "{'" not in text and "NIHDataset" not in text  # no raw dict, no class name
    assert str(results.parent) not in text and "/tmp/" not in text  # no machine path anywhere in the page
    assert (results / "tables" / "header.md").read_text().startswith("### What was evaluated")
    assert (results / "tables" / "auroc.csv").is_file()


def test_header_of_a_folder_without_description(results, tmp_path):
    import json
    import shutil as sh

    from cxr_explain.results.header import header_table

    folder = tmp_path / "plain"
    sh.copytree(results, folder)
    run = json.loads((folder / "run.json").read_text())
    run.pop("about")
    run["model"]["provenance"] = {"file": "/home/someone/ckpts/best.pt", "sha256": "0123456789abcdef" * 4}
    (folder / "run.json").write_text(json.dumps(run))
    rows = dict(header_table(folder).frame.itertuples(index=False))
    assert rows["checkpoint"] == "best.pt; SHA-256 0123456789ab…"
    assert rows["films evaluated"].startswith(f"NIH ChestX-ray14 layout, folder '{Path(run['dataset']['root']).name}'")
    assert rows["training data"] == "not recorded in the checkpoint" and "warning" not in rows


def test_figures_written_as_png_and_pdf(report, results):
    fig = results / "figures"
    for name in ("iou_curves_all_box", "fig3_best", "fig3_worst", "fig3_random", "fig56_tuples"):
        assert (fig / f"{name}.png").stat().st_size > 2000 and (fig / f"{name}.pdf").stat().st_size > 2000
    df = read_results(results / "results.csv")
    best = select_regions(df, ["cam", "lrp", "rap"], n=3, how="best")
    worst = select_regions(df, ["cam", "lrp", "rap"], n=3, how="worst")
    assert best["_rank"].min() >= worst["_rank"].max()
    paths = methods_grid(results, results / "one", ["lrp", "rap"], n=2, finding=best.iloc[0]["finding"])
    w, h = Image.open(paths[0]).size
    assert w > h * 0.8  # one X-ray column + 2 method columns, at most 2 rows


def test_one_writer_renders_a_table_to_markdown_html_csv_and_json(tmp_path):
    import json

    import pandas as pd

    from cxr_explain.results.tables import Table

    frame = pd.DataFrame([["CAM", "0.500 [0.400, 0.600]", "a|b"], ["n", "3", "<y>"]], columns=["method", "All", "x"])
    data = pd.DataFrame({"method": ["cam"], "mean": [0.5], "ci_low": [0.4], "ci_high": [0.6]})
    t = Table("t1", "T & co", frame, data, "Protocol: x <y>", {"subset": "all"}, notes="n = regions")
    md = t.to_markdown()
    assert md.splitlines()[:6] == ["### T & co", "", "Protocol: x <y>", "", "| method | All | x |", "|---|---|---|"]
    assert "| CAM | 0.500 [0.400, 0.600] | a\\|b |" in md and md.rstrip().endswith("n = regions")
    html = t.to_html()
    assert "<h3>T &amp; co</h3>" in html and "<p class='protocol'>Protocol: x &lt;y&gt;</p>" in html
    assert "<table class='t'>" in html and html.count("<td>") == 6 and "<th>All</th>" in html
    assert "<td>&lt;y&gt;</td>" in html and "<td>a|b</td>" in html  # escaped, not parsed
    paths = t.write(tmp_path)
    assert paths["md"].read_text() == md
    csv = pd.read_csv(paths["csv"])
    assert list(csv.columns) == ["subset", "method", "mean", "ci_low", "ci_high", "protocol"]
    assert csv["mean"].tolist() == [0.5] and csv["protocol"].tolist() == ["Protocol: x <y>"]
    doc = json.loads(paths["json"].read_text())
    assert doc["subset"] == "all" and doc["rows"] == [{"method": "cam", "mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}]


def test_report_tables_come_from_the_written_tables(report, results):
    text = report.read_text()
    from cxr_explain.results.summary import summary_tables

    for t in summary_tables(results):
        assert t.to_html() in text  # the page holds exactly the tables the writer renders
        assert (results / "tables" / f"{t.name}.md").read_text() == t.to_markdown()


def test_report_reads_results_csv_once(results, monkeypatch, tmp_path):
    import shutil as sh

    folder = tmp_path / "copy"
    sh.copytree(results, folder)
    reads = []
    orig = Path.read_text

    def counting(self, *a, **k):
        if self.name == "results.csv":
            reads.append(self)
        return orig(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", counting)
    write_report(folder, gallery_per_finding=1, thumb=48)
    assert len(reads) == 1  # tables, figures and gallery share one ResultsFolder


def _chromium(args, timeout=60):
    return subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr",
                           "--v=0", *args], capture_output=True, text=True, timeout=timeout)


def _console(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln or "Refused to" in ln]


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium on PATH (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    # the console check must be able to fail: a page with an error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom')</script></body></html>")
    assert any("boom" in ln for ln in _console(_chromium(["--dump-dom", bad.as_uri()]).stderr))

    r = _chromium(["--dump-dom", report.as_uri()])
    assert r.returncode == 0, r.stderr[-1500:]
    dom = r.stdout
    assert dom.count("<table class=\"t\">") >= 2 and "Table 2" in dom
    assert dom.count("<img") >= 10
    assert _console(r.stderr) == []

    shot = tmp_path / "shot.png"
    r = _chromium([f"--screenshot={shot}", "--window-size=1200,12000", "--hide-scrollbars", report.as_uri()])
    assert shot.is_file(), r.stderr[-1500:]
    assert _console(r.stderr) == []
    a = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    reddish = (a[..., 0] > 150) & (a[..., 1] < 110) & (a[..., 2] < 110)
    assert reddish.sum() > 200  # embedded images (red lesion boxes, heatmaps) were decoded and painted
