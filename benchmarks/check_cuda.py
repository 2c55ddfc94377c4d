"""Explanations on a GPU against the CPU: agreement, conservation and speed, one table.

For each method and dtype the same batch is explained on the CPU and on CUDA; the table gives the
largest |difference| relative to max|CPU map|, the worst conservation error on CUDA
(|Σ map − logit| / |logit|, propagation methods only) and CUDA ms per image (median of
``--repeats`` after a warm-up, synchronised). Without ``--checkpoint`` the model is a
random-initialised DenseNet-121 with BatchNorm statistics re-estimated on random images (a trained
network's numerics differ: pass a checkpoint where you have one).

    python benchmarks/check_cuda.py --batch 8 --size 224
    python benchmarks/check_cuda.py --checkpoint runs/d121/best.pt --methods lrp,rap
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
import torchvision

from cxr_explain import explain
from cxr_explain.attribution.methods import get_method


def _random_densenet(size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.densenet121(num_classes=14)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
        model.train()
        for _ in range(4):
            model(torch.randn(8, 3, size, size))
    return model.eval()


def _load(args) -> torch.nn.Module:
    if not args.checkpoint:
        return _random_densenet(args.size)
    from cxr_explain.models.checkpoints import load_checkpoint

    model, _, _ = load_checkpoint(args.checkpoint)
    return model.eval()


def _time(fn, repeats: int, device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="a checkpoint load_checkpoint understands")
    ap.add_argument("--methods", default="lrp,rap,cam,gradcam,gradient")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224, help="input side (random model only; a checkpoint uses its own)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU (cpu: a smoke run)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    model = _load(args)
    spec = getattr(model, "cxr_spec", None)
    size = int(spec.input_size) if spec is not None and args.checkpoint else args.size
    channels = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    torch.manual_seed(1)
    x = torch.randn(args.batch, channels, size, size)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
    print(f"device {where}, torch {torch.__version__}, "
          f"{args.checkpoint or 'random DenseNet-121'}, batch {args.batch}, {size} px")
    print(f"| method | dtype | {args.device} vs CPU (max rel) | conservation on {args.device} | {args.device} ms/img |")
    print("|---|---|---|---|---|")
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        for dtype in (torch.float32, torch.float64):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                cpu = explain(model.to("cpu", dtype), x.to(dtype), method=name, target=0)
                gpu_model, xg = model.to(args.device, dtype), x.to(args.device, dtype)
                gpu = explain(gpu_model, xg, method=name, target=0)
                sec = _time(lambda: explain(gpu_model, xg, method=name, target=0), args.repeats, args.device)
            a, b = cpu.maps.double(), gpu.maps.double().cpu()
            rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))
            cons = "–"
            if get_method(name).conserving:
                logit = gpu.explained.double().cpu()
                cons = f"{float(((b.flatten(1).sum(1) - logit).abs() / logit.abs()).max()):.1e}"
            print(f"| {name} | {str(dtype).replace('torch.', '')} | {rel:.1e} | {cons} | "
                  f"{sec * 1000 / args.batch:.2f} |")
    model.to("cpu", torch.float32)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
