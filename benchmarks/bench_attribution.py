"""Speed and memory of the explanation methods, as ratios to a plain input-gradient pass.

For each architecture and batch size the script measures, in one run and on the same inputs:
the baseline (forward + backward to the input, parameters frozen), our ``lrp``, ``rap``, ``rsp``, ``cam``,
``gradcam``, ``lrp`` for 8 targets at once, and peers where they run: zennit (z⁺ composite with
its canonizers), captum's LRP, pytorch-grad-cam's Grad-CAM. Times are medians of ``--repeats``
runs after a warm-up. ``--memory`` measures the peak resident-memory increase of each method in
a fresh subprocess (Linux: VmHWM after resetting it), and its ratio to the baseline's.

    python benchmarks/bench_attribution.py                      # vgg16 resnet50 densenet121, batch 1 and 8
    python benchmarks/bench_attribution.py --archs densenet121 --batches 8 --memory
    python benchmarks/bench_attribution.py --archs efficientnet_b0,convnext_tiny --batches 8 --memory \
        --methods baseline,lrp,rap,gradcam --interleave          # modern CNNs (docs/rules.md §9)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn as nn
import torchvision

OURS = ["lrp", "rap", "rsp", "cam", "gradcam", "attnlrp"]
CLOCK = time.perf_counter
PEERS = ["zennit-lrp", "captum-lrp", "pytorch-grad-cam", "lxt-cp-lrp"]


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=14).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def runner(name: str, model: nn.Module, arch: str, x: torch.Tensor) -> Optional[Callable[[], object]]:
    """A zero-argument callable doing one explanation of the batch, or None if it cannot run."""
    from cxr_explain.attribution import explain

    b = x.shape[0]
    if name == "baseline":
        def base():
            xg = x.detach().requires_grad_(True)
            out = model(xg)
            (g,) = torch.autograd.grad(out[:, 0].sum(), xg)
            return g
        return base
    if name in OURS:
        if (name == "cam" and arch.startswith(("vgg", "convnext", "vit", "swin"))) or \
                (name == "rsp" and not arch.startswith("vgg")) or (name == "attnlrp" and not arch.startswith(("vit", "swin"))):
            return None  # CAM needs a GAP → Linear head; RSP is defined for VGG only; attnlrp for transformers
        return lambda: explain(model, x, name, target=0, check_conservation=False).maps
    if name == "lrp-8-targets":
        return lambda: explain(model, x, "lrp", target=[list(range(8))] * b, check_conservation=False).maps
    if name == "zennit-lrp":
        from zennit.attribution import Gradient
        from zennit.composites import LayerMapComposite
        from zennit.rules import Norm, Pass, ZPlus
        from zennit.torchvision import ResNetCanonizer, VGGCanonizer
        from zennit.types import Activation, AvgPool, BatchNorm, Convolution

        canon = {"vgg16": [VGGCanonizer()], "resnet50": [ResNetCanonizer()]}.get(arch, [])
        comp = LayerMapComposite(
            layer_map=[(Activation, Pass()), (AvgPool, Norm()), (BatchNorm, Pass()),
                       (Convolution, ZPlus(zero_params=["bias"])), (nn.Linear, ZPlus(zero_params=["bias"]))],
            canonizers=canon)
        onehot = torch.zeros(b, 14)
        onehot[:, 0] = 1

        def zen():
            with Gradient(model, comp) as attr:
                return attr(x, onehot)[1]
        return zen
    if name == "captum-lrp":
        try:
            from captum.attr import LRP
        except ImportError:
            return None
        lrp = LRP(model)

        def cap():
            return lrp.attribute(x.clone().requires_grad_(True), target=0)
        return cap
    if name == "pytorch-grad-cam":
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        layer = {"vgg16": lambda: model.features[-1], "resnet50": lambda: model.layer4,
                 "densenet121": lambda: model.features, "efficientnet_b0": lambda: model.features,
                 "convnext_tiny": lambda: model.features}[arch]()
        targets = [ClassifierOutputTarget(0)] * b

        def pgc():  # it backpropagates a loss, so it needs parameters that require grad
            for p in model.parameters():
                p.requires_grad_(True)
            try:
                with GradCAM(model=model, target_layers=[layer]) as cam:
                    return cam(input_tensor=x, targets=targets)
            finally:
                for p in model.parameters():
                    p.requires_grad_(False)
        return pgc
    if name == "lxt-cp-lrp":  # LXT's CP-LRP recipe for torchvision's ViT: gradient × input, patched modules
        if not arch.startswith("vit"):
            return None
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from peers import lxt_vit_patches  # the tests' copy of LXT's recipe

        patches = lxt_vit_patches()
        if patches is None:
            return None

        def lxt_run():
            saved = {cls: cls.__dict__.get("forward") for cls in patches}
            try:
                for cls, patch in patches.items():
                    patch(cls)
                xg = x.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(model(xg)[:, 0].sum(), xg)
                return xg * g
            finally:
                for cls, fwd in saved.items():
                    cls.forward = fwd
                    if "original_forward" in cls.__dict__:
                        delattr(cls, "original_forward")
        return lxt_run
    raise ValueError(name)


def time_it(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (tracing, allocator)
    times = []
    for _ in range(repeats):
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    return statistics.median(times)


def interleaved(model: nn.Module, arch: str, x: torch.Tensor, methods: list[str], repeats: int
                ) -> dict[str, tuple[float, float]]:
    """method -> (median time, median over rounds of time / that round's baseline time); each round
    times the baseline and every method once, after one warm-up call of each."""
    fns = {}
    for method in methods:
        try:
            fn = runner(method, model, arch, x)
            if fn is not None:
                fn()  # warm-up (tracing, allocator)
                fns[method] = fn
        except Exception as exc:  # a peer that does not support the model
            print(f"<!-- {arch} {method}: {type(exc).__name__}: {str(exc)[:80]} -->")
    times: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(repeats):
        for method, fn in fns.items():
            t = CLOCK()
            fn()
            times[method].append(CLOCK() - t)
    base = times.get("baseline")
    return {m: (statistics.median(ts), statistics.median(t / b for t, b in zip(ts, base)) if base else None)
            for m, ts in times.items()}


def peak_memory_mb(arch: str, batch: int, size: int, method: str) -> Optional[float]:
    """Peak RSS increase (MB) of one run of ``method`` in a fresh process."""
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from bench_attribution import build, runner
torch.manual_seed(0)
model = build({arch!r}); x = torch.randn({batch}, 3, {size}, {size})
fn = runner({method!r}, model, {arch!r}, x)
if fn is None: print("nan"); sys.exit()
with torch.no_grad(): model(x)
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key): return int(line.split()[1]) / 1024
open('/proc/self/clear_refs', 'w').write('5')
before = status('VmRSS:')
fn()
print(status('VmHWM:') - before)
"""
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
        return float(out.stdout.strip().splitlines()[-1])
    except Exception:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="vgg16,resnet50,densenet121")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default=",".join(["baseline"] + OURS + ["lrp-8-targets"] + PEERS))
    ap.add_argument("--memory", action="store_true", help="also measure peak memory (a subprocess per cell)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="process: CPU seconds this process used (all its threads) instead of wall time; with "
                         "--threads 1 the work a method does, whatever else the machine runs")
    ap.add_argument("--interleave", action="store_true",
                    help="time the methods in rounds (baseline, method, method …, repeated) and report the median "
                         "of each round's ratio to its own baseline: robust to a shared machine's load drifting")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    methods = args.methods.split(",")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads, {args.size}x{args.size}, median of {args.repeats}, {args.clock} clock"
          + (", interleaved rounds" if args.interleave else ""))
    header = "| arch | batch | method | ms / image | × baseline |" + (" peak MB | × baseline mem |" if args.memory else "")
    print(header)
    print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
    rows = []
    for arch in args.archs.split(","):
        model = build(arch)
        for batch in [int(b) for b in args.batches.split(",")]:
            x = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
            base_t = base_m = None
            rounds = interleaved(model, arch, x, methods, args.repeats) if args.interleave else {}
            for method in methods:
                if method == "lrp-8-targets" and batch != 1:
                    continue
                ratio = None
                if args.interleave:
                    t, ratio = rounds.get(method, (None, None))
                else:
                    try:
                        fn = runner(method, model, arch, x)
                        t = time_it(fn, args.repeats) if fn is not None else None
                    except Exception as exc:  # a peer that does not support the model
                        print(f"<!-- {arch} {method}: {type(exc).__name__}: {str(exc)[:80]} -->")
                        t = None
                mem = peak_memory_mb(arch, batch, args.size, method) if args.memory and t is not None else None
                if method == "baseline":
                    base_t, base_m = t, mem
                if ratio is None and t is not None and base_t:
                    ratio = t / base_t
                row = {"arch": arch, "batch": batch, "method": method,
                       "ms_per_image": None if t is None else 1000 * t / batch,
                       "ratio": ratio,
                       "peak_mb": mem, "mem_ratio": None if mem is None or not base_m else mem / base_m}
                rows.append(row)
                cells = [arch, str(batch), method,
                         "n/a" if t is None else f"{row['ms_per_image']:.0f}",
                         "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}"]
                if args.memory:
                    cells += ["n/a" if mem is None else f"{mem:.0f}",
                              "n/a" if row["mem_ratio"] is None else f"{row['mem_ratio']:.2f}"]
                print("| " + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
