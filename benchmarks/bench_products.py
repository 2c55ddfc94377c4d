"""How much of an explanation is layer products: the floor no element-wise tuning goes under.

For each architecture the script profiles (``torch.profiler``, CPU) one batch of the plain
input-gradient pass (forward + backward to the input, parameters frozen: the ``baseline`` of
``bench_attribution.py``) and of each method, and splits each run's operator time into the layer
products (convolutions, their input gradients, matrix products) and everything else. It prints per
run: the number of product calls and their time, the rest, and two ratios to the baseline's whole
time: the method's whole time and its products alone. The second is a lower bound of the first for
this implementation of the rule: element-wise work can be cut, products cannot without changing
what the rule computes. Times come from the profiler (its overhead inflates small operators), so
the whole-time ratio differs a little from ``bench_attribution.py``'s wall-clock one.

    python benchmarks/bench_products.py --archs efficientnet_b0,convnext_tiny,vit_b_16 --methods lrp,rap
"""
from __future__ import annotations

import argparse
import os
import platform

import torch
from torch.profiler import ProfilerActivity, profile

from bench_attribution import build, runner

#: operators that are a layer's product (forward, transposed or input-gradient), whatever backend runs them
PRODUCTS = ("conv", "mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "_scaled_dot_product")


def _is_product(name: str) -> bool:
    op = name.split("::")[-1]
    return any(op == p or op.startswith(p) or op.endswith(p) for p in PRODUCTS) or "convolution" in op


def split_time(fn, warmup: int = 1) -> tuple[float, float, int]:
    """(total ms, products ms, product calls) of one call of ``fn``: self CPU time of every operator,
    products being the innermost convolution / matrix-product kernels (self time, so a wrapper such
    as ``aten::conv2d`` is not counted twice)."""
    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    total = products = 0.0
    calls = 0
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total / 1000.0
        total += t
        if _is_product(ev.key) and t > 0:
            products += t
            calls += ev.count
    return total, products, calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="efficientnet_b0,convnext_tiny,vit_b_16")
    p.add_argument("--methods", default="lrp,rap")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_products: batch {args.batch}, {args.size}², {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs")
    print("| model | method | product calls | products (ms) | rest (ms) | × baseline | products alone × baseline |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for arch in args.archs.split(","):
        model = build(arch)
        torch.manual_seed(1)
        x = torch.randn(args.batch, 3, args.size, args.size)
        base_total = None
        for name in ["baseline", *args.methods.split(",")]:
            fn = runner(name, model, arch, x)
            if fn is None:
                continue
            total, prod, calls = split_time(fn)
            if base_total is None:
                base_total = total
            print(f"| {arch} | {name} | {calls} | {prod:.0f} | {total - prod:.0f} | {total / base_total:.2f} | "
                  f"{prod / base_total:.2f} |", flush=True)


if __name__ == "__main__":
    main()
