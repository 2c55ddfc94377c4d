"""`cxr-explain --help` and `cxr-explain methods` answer without importing torch (the slow part).

Their speed is measured in BENCHMARKS.md; here the cause of slowness is asserted absent."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PROBE = """
import sys
from cxr_explain.cli import main
try:
    code = main({argv!r})
except SystemExit as exc:  # --help exits after printing
    code = exc.code
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'pandas', 'matplotlib'))
print('HEAVY', heavy, 'CODE', code)
"""


@pytest.mark.parametrize("argv", [["--help"], ["methods"], []])
def test_listing_commands_import_no_torch(argv):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert "HEAVY [] CODE" in proc.stdout, proc.stdout[-500:] + proc.stderr[-2000:]
    if argv == ["methods"]:
        for name in ("lrp", "rap", "cam", "gradcam", "integrated-gradients"):
            assert f"\n{name} " in proc.stdout


def test_a_delegated_command_gets_its_options_when_run():
    from cxr_explain.cli import build_parser

    args = build_parser("report").parse_args(["report", "some/folder", "--threads", "2"])
    assert args.results == "some/folder" and args.threads == 2 and callable(args.func)
