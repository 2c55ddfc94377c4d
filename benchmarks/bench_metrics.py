"""Localisation metrics at dataset scale: milliseconds per map for each metric at 1024².

Run: ``python benchmarks/bench_metrics.py [--n 24] [--size 1024] [--repeat 3]``. Builds ``n`` seeded maps
of four kinds (CAM 4x4 and 32x32, LRP-like 128x128 with heavy tails, full-resolution noise), each with one
ground-truth box (40 to 500 px), and times every public function of
``cxr_explain.metrics.localization`` on the normalised maps, then :func:`localization_scores` on the raw
maps (what ``evaluate`` calls once per region). Each cell is the best of ``repeat`` passes over the
``n`` maps, divided by ``n``. Works on any version of the module (functions it lacks are skipped).
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import numpy as np

from cxr_explain.metrics import localization as L


def make_maps(n: int, size: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (raw map, box mask) pairs: raw maps of four kinds, boxes of 40 to 500 px."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            raw = rng.normal(size=(4, 4))
        elif kind == 1:
            raw = rng.normal(size=(32, 32))
        elif kind == 2:  # LRP-like: sparse, heavy-tailed, signed
            raw = rng.standard_t(2, size=(128, 128)) * (rng.random((128, 128)) < 0.3)
        else:
            raw = rng.normal(size=(size, size))
        raw = raw.astype(np.float32)
        bw, bh = rng.integers(min(40, size // 4), min(500, size // 2), size=2)
        x, y = rng.integers(0, size - bw), rng.integers(0, size - bh)
        gt = np.zeros((size, size), dtype=bool)
        gt[y:y + bh, x:x + bw] = True
        out.append((raw, gt))
    return out


def best_ms(fn: Callable[[np.ndarray, np.ndarray], object], pairs, repeat: int) -> float:
    """Best of ``repeat`` passes over ``pairs``, in ms per pair."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for a, g in pairs:
            fn(a, g)
        best = min(best, time.perf_counter() - t)
    return 1e3 * best / len(pairs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    data = make_maps(a.n, a.size)
    size = (a.size, a.size)
    normed = [(L.normalize_map(raw, resize_to=size), gt) for raw, gt in data]
    cases: list[tuple[str, Callable, list]] = [
        ("normalize_map (resize, clip, /max)", lambda h, g: L.normalize_map(h, resize_to=size), data),
        ("iou_at_thresholds (5 T)", L.iou_at_thresholds, normed),
        ("otsu_threshold", lambda h, g: L.otsu_threshold(h), normed),
        ("otsu_iou", L.otsu_iou, normed),
        ("hit", L.hit, normed),
        ("relevance_mass", L.relevance_mass, normed),
        ("rank_accuracy", L.rank_accuracy, normed),
        ("auprc", L.auprc, normed),
    ]
    if hasattr(L, "SortedHeatmap"):
        cases.append(("SortedHeatmap (the shared sort)", L.SortedHeatmap, normed))
    cases.append(("localization_scores (all of the above, raw map)", L.localization_scores, data))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nlocalisation metrics, {a.n} maps at {a.size}x{a.size}, best of {a.repeat}; "
          f"{os.cpu_count()} CPUs, load average {load:.1f}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    print(f"| {'function':<50} | {'ms / map':>9} |")
    print(f"|{'-' * 52}|{'-' * 11}|")
    for name, fn, pairs in cases:
        print(f"| {name:<50} | {best_ms(fn, pairs, a.repeat):>9.1f} |")


if __name__ == "__main__":
    main()
