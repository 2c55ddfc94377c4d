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


def _cpu() -> float:
    """CPU seconds used by this process and its finished children (user + system)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--figure", action="store_true", help="write docs/phantom_vs_real.png and exit")
    ap.add_argument("--real-dir", default=None, help="--figure: folder holding the four real NIH PNGs it shows")
    a = ap.parse_args()
    if a.figure:
        if not a.real_dir:
            ap.error("--figure needs --real-dir (a folder with the NIH PNGs 00000129_000.png, 00001933_000.png, ...)")
        comparison_figure(real_dir=a.real_dir)
        return
    rows = []
    t, c = time.perf_counter(), _cpu()
    for i in range(min(a.n, 10)):
        render_phantom(i, 0, a.size)
    rows.append(("render_phantom (1 process)", min(a.n, 10), time.perf_counter() - t, _cpu() - c))
    for layout in ("nih", "rsna"):
        with tempfile.TemporaryDirectory() as d:
            t, c = time.perf_counter(), _cpu()
            generate(d, a.n, seed=0, layout=layout, size=a.size, workers=a.workers, progress=False)
            rows.append((f"generate {layout} ({a.workers} workers, files written)", a.n,
                         time.perf_counter() - t, _cpu() - c))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nphantom throughput at {a.size}x{a.size}, {os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"{'what':<44} {'images':>7} {'wall s':>8} {'img/s':>7} {'CPU s/img':>10} {'2000 imgs':>10}")
    for name, n, dt, cpu in rows:
        print(f"{name:<44} {n:>7} {dt:>8.2f} {n / dt:>7.2f} {cpu / n:>10.3f} {2000 * dt / n / 60:>6.1f} min")




def comparison_figure(real_dir: str, out: str = "docs/phantom_vs_real.png", seed: int = 0) -> None:
    """One phantom per finding (box in red) next to 4 real NIH films: ``docs/phantom_vs_real.png``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from pathlib import Path
    from PIL import Image

    from cxr_explain.data.phantom import FINDINGS, PhantomConfig

    real = ["00000129_000.png", "00001933_000.png", "00009745_000.png", "00004387_000.png"]
    fig, axes = plt.subplots(3, 4, figsize=(16, 12.4), dpi=100)
    for j, f in enumerate(FINDINGS):
        cfg = PhantomConfig(prevalence={g: float(g == f) for g in FINDINGS}, p_no_finding=0.0)
        ph = render_phantom(j, seed, 512, cfg)
        ax = axes.flat[j]
        ax.imshow(ph.image, cmap="gray", vmin=0, vmax=255)
        for les in ph.lesions:
            b = les.box
            ax.add_patch(plt.Rectangle((b.x, b.y), b.w, b.h, fill=False, ec="red", lw=1.5))
        ax.set_title(f"phantom: {f}", fontsize=13)
    for k, name in enumerate(real):
        ax = axes.flat[8 + k]
        ax.imshow(np.array(Image.open(Path(real_dir) / name).convert("L").resize((512, 512))), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"real NIH {name[:-4]}", fontsize=13)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
