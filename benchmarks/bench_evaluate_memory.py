"""Memory of ``evaluate`` against the number of films it has done: does the run stream?

On a synthetic NIH-layout set (the phantom generator, seeded, written once into ``--cache`` and
reused) the script runs ``cxr-explain evaluate … --no-report`` as the CLI does
(``python -m cxr_explain.cli evaluate`` in a child process) on the first ``--n`` films with a box,
and every ``--interval`` seconds samples

* the resident memory of the child's process tree (the sum of ``VmRSS`` over the CLI process and its
  DataLoader workers, from ``/proc/<pid>/status``; psutil when it is installed), the CLI process's
  own ``VmRSS`` and its high-water mark ``VmHWM``;
* the films done: the distinct ``image_id`` of the complete rows already in ``results.csv`` (the
  runner appends and flushes them batch by batch).

It prints the RSS when 10 %, 20 %, …, 100 % of the films are done, the peak, and the slope in MB per
1,000 films: a least-squares line through the samples of the second half of the run
(``n/2 ≤ films done < n``), so that start-up (imports, model, first batch, tracing) is excluded. A
streaming run has a slope near 0; a run that keeps something per film grows linearly. ``evaluate``
batches films by their number of findings, one group after the other (``batch_plan``), and a batch of
3-finding films holds more maps and masks than one of 1-finding films, so the working set steps up
where the group changes whatever the films done: the script also prints the slope within each long
stretch of films with the same number of findings. Every sample goes to
``<cache>/memory_samples.csv``.

Without ``--checkpoint`` the model is a ``--arch`` with random weights (seed 0) at ``--input-size``
and the 14 NIH labels, saved once into the cache folder (random weights explain and score the same
amount of data as trained ones).

    python benchmarks/bench_evaluate_memory.py --cache bench_mem_cache --n 2000
    python benchmarks/bench_evaluate_memory.py --cache bench_mem_cache --n 300 --no-masks --workers 2

The tree's sum counts pages shared between the CLI process and its workers once per process, so
with ``--workers`` it overstates the memory in use; the CLI process's own columns do not.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from evalbench_common import add_common_arguments, checkpoint, evaluate_argv, load_average  # noqa: E402

try:
    import psutil
except ImportError:  # /proc is enough on Linux
    psutil = None


# --------------------------------------------------------------------------- memory of a process tree
def _status_kb(pid: int, keys: tuple[str, ...] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """``VmRSS`` etc. of ``/proc/<pid>/status`` in kB (missing keys absent: a zombie has none)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _descendants(pid: int) -> list[int]:
    """The descendants of ``pid``: psutil when installed, else the parent links of ``/proc/*/stat``."""
    if psutil is not None:
        try:
            return [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    parent: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])  # fields after "(comm)": state ppid …
        parent.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        kids = parent.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def tree_memory(pid: int) -> tuple[float, float, float]:
    """(RSS of ``pid`` and its descendants, RSS of ``pid``, VmHWM of ``pid``) in MB."""
    own = _status_kb(pid)
    tree = own.get("VmRSS", 0) + sum(_status_kb(c, ("VmRSS",)).get("VmRSS", 0) for c in _descendants(pid))
    return tree / 1024, own.get("VmRSS", 0) / 1024, own.get("VmHWM", 0) / 1024


# --------------------------------------------------------------------------- progress from results.csv
class FilmCounter:
    """The distinct films of the complete lines of a growing results CSV, read incrementally, in the
    order they were written, with the findings of each."""

    def __init__(self, path: Path):
        self.path, self.offset, self.header = path, 0, None
        self.films: dict[str, set[str]] = {}  # image_id -> its findings (dicts keep the order)

    def update(self) -> int:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return len(self.films)
        end = chunk.rfind(b"\n") + 1  # complete lines only
        if end:
            self.offset += end
            for row in csv.reader(io.StringIO(chunk[:end].decode("utf-8"))):
                if self.header is None:
                    self.header = row
                elif row:
                    self.films.setdefault(row[0], set()).add(row[1])  # image_id, finding: the first columns
        return len(self.films)


# --------------------------------------------------------------------------- setup and the run
def prepare(args) -> tuple[Path, Path]:
    """The phantom folder and the checkpoint (generated / built once, then reused)."""
    from cxr_explain.data.phantom import generate

    ckpt = checkpoint(args)
    data = Path(args.cache) / f"phantom_{args.size}_seed{args.seed}"
    total = args.generate or args.n
    while True:  # about a third of the phantom films have no box: generate until N of them have one
        generate(data, total, seed=args.seed, size=args.size, workers=args.gen_workers, progress=False)
        scored = scored_films(data, ckpt, args.masks)
        if scored >= args.n or args.generate:
            break
        total = math.ceil(total * 1.05 * args.n / max(scored, 1))
    if scored < args.n:
        raise SystemExit(f"{data}: only {scored} of {total} films have a region to score; raise --generate")
    return data, ckpt


def scored_films(data: Path, ckpt: Path, masks: bool) -> int:
    """How many films of ``data`` ``evaluate`` would score (those with a box or mask of the model's findings)."""
    from cxr_explain.data.labels import CHEXNET_FINDINGS
    from cxr_explain.data.layout import open_dataset
    from cxr_explain.evaluation.runner import select_images
    from cxr_explain.models.checkpoints import load_checkpoint

    labels = list(load_checkpoint(ckpt)[0].cxr_spec.labels)
    ds = open_dataset(data, "nih", boxed_only=True, findings=[f for f in CHEXNET_FINDINGS if f in labels])
    return len(select_images(ds, labels, use_masks=masks))


def run_sampled(args, data: Path, ckpt: Path) -> tuple[list[tuple[float, int, float, float, float]], float, list[int]]:
    """Run ``evaluate`` in a child process, sampling (seconds, films done, tree MB, own MB, own HWM MB);
    also the number of findings of each film, in the order the films were written."""
    out = Path(args.cache) / "eval_out"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "cxr_explain.cli", *evaluate_argv(args, data, ckpt, out)]
    print("# child: " + " ".join(cmd[1:]))
    log = open(Path(args.cache) / "evaluate_stderr.txt", "w")
    counter = FilmCounter(out / "results.csv")
    samples = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    while proc.poll() is None:
        tree, own, hwm = tree_memory(proc.pid)
        films = counter.update()
        if own:  # zero once the process has exited (between poll and the read)
            samples.append((time.perf_counter() - t0, films, tree, own, hwm))
        time.sleep(args.interval)
    wall = time.perf_counter() - t0
    log.close()
    if proc.returncode != 0:
        sys.stderr.write((Path(args.cache) / "evaluate_stderr.txt").read_text()[-3000:])
        raise SystemExit(f"evaluate failed with exit code {proc.returncode}")
    counter.update()
    if len(counter.films) != args.n:
        print(f"# warning: results.csv holds {len(counter.films)} films, not {args.n} "
              "(fewer films with a box than --n? raise --generate)")
    return samples, wall, [len(f) for f in counter.films.values()]


def slope_per_1000(samples, n: int, col: int) -> tuple[float, int]:
    """Least-squares slope of column ``col`` (MB) against films done, in MB per 1,000 films, over the
    samples with ``n/2 ≤ films done < n``; and the number of samples used."""
    pts = [(s[1], s[col]) for s in samples if n / 2 <= s[1] < n]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return float("nan"), len(pts)
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    sxy = sum((x - mx) * (y - my) for x, y in pts)
    return 1000 * sxy / sxx, len(pts)


def group_slopes(samples, findings: list[int], col: int, min_films: int) -> list[tuple[int, int, int, float, float, int]]:
    """The run cut where the films' number of findings changes (``evaluate`` batches films by it,
    one group after the other, so a batch of 3-finding films holds more maps and masks than one of
    1-finding films): per stretch of at least ``min_films`` films with the same number, (findings,
    first film, last film, mean MB, slope in MB per 1,000 films, samples); the samples of the first
    tenth of a stretch (the switch from the previous group) are left out."""
    runs, start = [], 0
    for k in range(1, len(findings) + 1):
        if k == len(findings) or findings[k] != findings[start]:
            runs.append((findings[start], start, k))
            start = k
    out = []
    for nf, a, b in runs:
        if b - a < min_films:
            continue
        lo = a + (b - a) // 10
        pts = [(s[1], s[col]) for s in samples if lo < s[1] <= b and s[1] < len(findings)]
        if len(pts) < 2 or len({x for x, _ in pts}) < 2:
            continue
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        slope = 1000 * sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
        out.append((nf, a + 1, b, my, slope, len(pts)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p, n=2000, methods=["cam"], methods_help="default: cam (cheap; the metrics still run at --size)")
    p.add_argument("--generate", type=int, default=None, help="films to generate (default: as many as it takes for --n of them to have a box or mask)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more evaluate options")
    args = p.parse_args(argv)

    print("# command: python " + " ".join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)]))
    data, ckpt = prepare(args)
    print(f"# bench_evaluate_memory: {args.arch} at {args.input_size} px, methods {' '.join(args.methods)}, "
          f"batch {args.batch_size}, {args.n} films of {args.size}² ({'boxes + masks' if args.masks else 'boxes'}), "
          f"{args.threads} threads, workers {args.workers}, psutil {'yes' if psutil else 'no (/proc)'}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"load average before: {load_average()}")
    samples, wall, findings = run_sampled(args, data, ckpt)
    with open(Path(args.cache) / "memory_samples.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["seconds", "films_done", "tree_rss_mb", "main_rss_mb", "main_hwm_mb"])
        w.writerows([f"{s[0]:.2f}", s[1], f"{s[2]:.1f}", f"{s[3]:.1f}", f"{s[4]:.1f}"] for s in samples)
    print(f"# {len(samples)} samples over {wall:.0f} s ({args.n / wall:.2f} films/s); load average after: {load_average()}")
    print()
    print("| films done | seconds | RSS, process tree (MB) | RSS, CLI process (MB) |")
    print("|---:|---:|---:|---:|")
    for pct in range(10, 101, 10):
        target = math.ceil(args.n * pct / 100)
        s = next((s for s in samples if s[1] >= target), None)
        s = s or samples[-1]  # the last batch and the exit can fall between two samples
        print(f"| {s[1]} ({pct} %) | {s[0]:.0f} | {s[2]:.0f} | {s[3]:.0f} |")
    peak_tree = max(s[2] for s in samples)
    peak_hwm = max(s[4] for s in samples)
    slope_tree, k = slope_per_1000(samples, args.n, 2)
    slope_own, _ = slope_per_1000(samples, args.n, 3)
    print()
    print(f"Peak RSS: {peak_tree:.0f} MB (process tree, sampled); CLI process high-water mark (VmHWM) {peak_hwm:.0f} MB.")
    print(f"Slope over the second half ({k} samples, {args.n // 2}–{args.n} films): "
          f"{slope_tree:+.1f} MB per 1,000 films (process tree), {slope_own:+.1f} MB per 1,000 films (CLI process).")
    print()
    print("Films are batched by their number of findings, one group after the other; within each stretch of "
          f"at least {max(50, args.n // 10)} films with the same number (its first tenth left out):")
    print()
    print("| findings / film | films | samples | mean RSS, process tree (MB) | slope (MB per 1,000 films) |")
    print("|---:|---:|---:|---:|---:|")
    for nf, a, b, mean, slope, k in group_slopes(samples, findings, 2, max(50, args.n // 10)):
        print(f"| {nf} | {a}–{b} | {k} | {mean:.0f} | {slope:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
