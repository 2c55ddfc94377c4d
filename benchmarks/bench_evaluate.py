"""``evaluate`` at dataset scale: the whole pipeline against the explanations it computes.

On a synthetic NIH-layout set (the phantom generator, seeded, written once into ``--cache`` and
reused) the script measures, on the same films:

1. **pipeline**: ``cxr-explain evaluate … --no-report`` as the CLI runs it, in a fresh process
   (interpreter start-up, imports, model loading, decoding, explaining, resizing, scoring, writing
   maps and rows, the summary tables): films/s of the whole run, and the time per stage from the
   runner's stage timers (``cxr_explain.evaluation.StageTimer``);
2. **explanations alone**: in one process, a freshly loaded copy of the same model explains the
   same films, already decoded, in the same batches with the same targets
   (``cxr_explain.evaluation.runner.batch_plan`` and ``explain_targets``), method by method, without
   a warm-up (its first call traces the model, as the pipeline's does): films/s;

and prints their ratio (pipeline time / explanations time). Both use ``--threads`` torch threads.

Without ``--checkpoint`` the model is a ``--arch`` with random weights (seed 0) at ``--input-size``
and the 14 NIH labels, saved once into the cache folder (random weights are fine for timing).

    python benchmarks/bench_evaluate.py --cache bench_eval_cache --n 48
    python benchmarks/bench_evaluate.py --cache bench_eval_cache --n 300 --no-masks --repeats 2

Load matters on a shared machine: the script prints the load average before and after; run it
without ``nice`` and repeat.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from evalbench_common import add_common_arguments, checkpoint, evaluate_argv, load_average  # noqa: E402


def _child(timings: str, argv: list[str]) -> int:
    """Run the CLI in this process with a stage timer handed to ``evaluate``; dump the timer as JSON."""
    t0 = time.perf_counter()
    import functools

    import cxr_explain.evaluation as ev
    from cxr_explain.cli import main

    timer = ev.StageTimer()
    ev.evaluate = functools.partial(ev.evaluate, timer=timer)  # the CLI imports it at call time
    t_import = time.perf_counter() - t0
    rc = main(argv)
    timer.add("imports (CLI)", t_import)
    Path(timings).write_text(json.dumps({"rc": rc, "stages": timer.as_dict(),
                                         "in_process_s": time.perf_counter() - t0}))
    return rc


def prepare(args) -> tuple[Path, Path]:
    """The phantom folder and the checkpoint (generated / built once, then reused)."""
    from cxr_explain.data.phantom import generate

    data = Path(args.cache) / f"phantom_{args.size}_seed{args.seed}"
    generate(data, args.generate or args.n, seed=args.seed, size=args.size, workers=args.gen_workers, progress=False)
    return data, checkpoint(args)


def run_pipeline(args, data: Path, ckpt: Path, k: int) -> dict:
    """One ``cxr-explain evaluate`` run in a fresh process (a fresh output folder)."""
    import shutil

    out = Path(args.cache) / f"eval_out_{k}"
    shutil.rmtree(out, ignore_errors=True)
    timings = Path(args.cache) / f"timings_{k}.json"
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(timings), "--",
           *evaluate_argv(args, data, ckpt, out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-3000:])
        raise SystemExit(f"evaluate failed with exit code {r.returncode}")
    info = json.loads(timings.read_text())
    info["wall_s"] = wall
    info["out"] = str(out)
    return info


def run_explanations(args, data: Path, ckpt: Path) -> dict:
    """The same films, decoded beforehand, explained in the runner's batches with its targets."""
    import torch

    from cxr_explain.attribution import explain
    from cxr_explain.attribution.methods import get_method, resolve_method_name
    from cxr_explain.data.images import get_preprocessing
    from cxr_explain.data.nih import NIHDataset
    from cxr_explain.evaluation.runner import batch_plan, explain_targets, select_images
    from cxr_explain.models.checkpoints import load_checkpoint

    torch.set_num_threads(args.threads)
    model, _, _ = load_checkpoint(ckpt)  # fresh: its first explanation traces it, as in the pipeline
    model.eval()
    spec = model.cxr_spec
    labels = list(spec.labels)
    ds = NIHDataset(data, boxed_only=True, findings=[f for f in labels if f in
                                                     ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration",
                                                      "Mass", "Nodule", "Pneumonia", "Pneumothorax")])
    gts = select_images(ds, labels, use_masks=args.masks, max_images=args.n)
    pre = get_preprocessing(spec.preprocessing, spec.input_size)
    xs = {i: pre(ds.read_image(i))[0] for i in gts}
    plan = batch_plan(sorted(gts), gts, args.batch_size)
    methods = [get_method(resolve_method_name(m)) for m in args.methods]
    per_method = {}
    for m in methods:  # no warm-up: the pipeline's first batch pays for tracing too
        t0 = time.perf_counter()
        for b in plan:
            explain(model, torch.stack([xs[i] for i in b]), method=m,
                    target=[explain_targets(gts[i], labels) for i in b], check_conservation=False)
        per_method[m.name] = time.perf_counter() - t0
    n_regions = sum(len(g) for g in gts.values())
    n_targets = sum(len(explain_targets(g, labels)) for g in gts.values())
    return {"films": len(gts), "regions": n_regions, "targets": n_targets, "batches": len(plan),
            "seconds": per_method}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        return _child(argv[1], argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p, n=48, methods=["cam", "lrp", "rap"])
    p.add_argument("--generate", type=int, default=None, help="films to generate (default: --n; more if some lack boxes)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each side, alternated (the best of each is reported)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more evaluate options")
    args = p.parse_args(argv)

    data, ckpt = prepare(args)
    print(f"# bench_evaluate: {args.arch} at {args.input_size} px, methods {' '.join(args.methods)}, "
          f"batch {args.batch_size}, {args.n} films of {args.size}² ({'boxes + masks' if args.masks else 'boxes'}), "
          f"{args.threads} threads, workers {'default' if args.workers is None else args.workers}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"load average before: {load_average()}")
    pipes, exps = [], []
    for k in range(args.repeats):
        pipes.append(run_pipeline(args, data, ckpt, k))
        exps.append(run_explanations(args, data, ckpt))
    pipe = min(pipes, key=lambda r: r["wall_s"])
    exp_s = {m: min(e["seconds"][m] for e in exps) for m in exps[0]["seconds"]}
    e0 = exps[0]
    films = e0["films"]
    t_exp = sum(exp_s.values())
    print(f"# {films} films, {e0['regions']} regions, {e0['targets']} (film, finding) targets, {e0['batches']} batches; "
          f"load average after: {load_average()}")
    print()
    print("| measure | seconds | films/s |")
    print("|---|---:|---:|")
    print(f"| whole `evaluate` (CLI, fresh process) | {pipe['wall_s']:.1f} | {films / pipe['wall_s']:.3f} |")
    print(f"| explanations alone ({' + '.join(exp_s)}) | {t_exp:.1f} | {films / t_exp:.3f} |")
    for m, s in exp_s.items():
        print(f"| · {m} alone | {s:.1f} | {films / s:.3f} |")
    print(f"| **ratio pipeline / explanations** | **{pipe['wall_s'] / t_exp:.3f}** | |")
    print()
    print("Stages of the pipeline run (runner timers). decode = time spent decoding films, in the main process "
          "(--workers 0, then inside 'wait for data') or in DataLoader workers (overlapped with the rest); "
          "maps and metrics run in the scoring threads (one per torch thread; on the CPU the engine waits for them, "
          "'wait for scoring'): their seconds add up the threads' time and are not part of the wall time.")
    print()
    print("| stage | seconds | calls | share of wall |")
    print("|---|---:|---:|---:|")
    stages = pipe["stages"]
    for name, v in stages.items():
        print(f"| {name} | {v['seconds']:.2f} | {v['calls']} | {100 * v['seconds'] / pipe['wall_s']:.1f} % |")
    timed = sum(v["seconds"] for k, v in stages.items() if k not in ("decode", "maps", "metrics"))
    rest = pipe["in_process_s"] - timed
    print(f"| other in-process (model and dataset loading, summary tables) | {rest:.2f} | 1 | "
          f"{100 * rest / pipe['wall_s']:.1f} % |")
    outside = pipe["wall_s"] - pipe["in_process_s"]
    print(f"| interpreter start-up (outside the timers) | {outside:.2f} | 1 | {100 * outside / pipe['wall_s']:.1f} % |")
    engine = sum(v["seconds"] for k, v in stages.items() if k.startswith("explain "))
    print()
    print(f"Engine inside the pipeline run: {engine:.1f} s; the run is {pipe['wall_s'] / engine:.3f} × that "
          "(the same ratio without the run-to-run noise of comparing two processes).")
    if len(pipes) > 1:
        ratios = [p_["wall_s"] / sum(e["seconds"].values()) for p_, e in zip(pipes, exps)]
        print()
        print("All runs (pipeline s / explanations s = ratio): " + ", ".join(
            f"{p_['wall_s']:.1f} / {sum(e['seconds'].values()):.1f} = {r:.3f}" for p_, e, r in zip(pipes, exps, ratios))
              + f"; median ratio {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
