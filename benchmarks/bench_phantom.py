"""Phantom generator throughput: images/s for render only and for ``generate`` (files written).

Run: ``python benchmarks/bench_phantom.py [--n 40] [--size 1024] [--workers 2]``. Prints a table and
the projected time for 2,000 images at the given size.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from cxr_explain.data.phantom import generate, render_phantom


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    rows = []
    t = time.perf_counter()
    for i in range(min(a.n, 10)):
        render_phantom(i, 0, a.size)
    dt = time.perf_counter() - t
    rows.append(("render_phantom (1 process)", min(a.n, 10), dt))
    for layout in ("nih", "rsna"):
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            generate(d, a.n, seed=0, layout=layout, size=a.size, workers=a.workers, progress=False)
            dt = time.perf_counter() - t
        rows.append((f"generate {layout} ({a.workers} workers, files written)", a.n, dt))
    print(f"\nphantom throughput at {a.size}x{a.size}, {os.cpu_count()} CPUs")
    print(f"{'what':<44} {'images':>7} {'seconds':>8} {'img/s':>7} {'2000 imgs':>10}")
    for name, n, dt in rows:
        print(f"{name:<44} {n:>7} {dt:>8.2f} {n / dt:>7.2f} {2000 * dt / n / 60:>8.1f} min")


if __name__ == "__main__":
    main()
