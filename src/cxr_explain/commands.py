"""Command-line glue for ``cxr-explain evaluate``, ``report`` and ``demo``: argument definitions
and the functions the CLI calls (the CLI itself stays thin). These commands chain packages that
do not know each other: :mod:`.evaluation` writes a results folder, :mod:`.report` reads it."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .errors import CxrExplainError
from .metrics.localization import EMPTY_REGION_MODES, OPTIONAL_SCORES, PAPER_THRESHOLDS, RESIZE_MODES, check_scores

LAYOUTS = ("auto", "nih", "rsna", "chexlocalize", "chexpert", "mimic", "folder")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``cxr-explain evaluate``."""
    p.add_argument("--data", required=True,
                   help="dataset folder (NIH, RSNA, CheXlocalize, CheXpert, MIMIC-CXR-JPG layout or a folder of images)")
    p.add_argument("--layout", choices=list(LAYOUTS), default="auto",
                   help="dataset layout (default: detected from the files)")
    p.add_argument("--uncertain", choices=["ones", "zeros", "ignore"], default="ones",
                   help="CheXpert / MIMIC uncertain labels (-1): U-Ones, U-Zeros or ignored (NaN)")
    p.add_argument("--labels-csv", default=None, help="folder layout: CSV with image,labels,finding,x,y,w,h")
    p.add_argument("--checkpoint", default=None, help="model checkpoint (default: the shipped model)")
    p.add_argument("--arch", default=None, help="architecture of the checkpoint (default: detected)")
    p.add_argument("--trust-pickle", action="store_true", help="allow pickled checkpoints (jrzech, xrv)")
    p.add_argument("--methods", nargs="+", default=["cam", "lrp", "rap"], help="explanation methods")
    p.add_argument("--method-option", action="append", metavar="NAME=VALUE",
                   help="a method option, e.g. epsilon=0.1 or lrp-epsilon.epsilon=0.1 (repeatable)")
    p.add_argument("--versus", default=None, metavar="FINDING",
                   help="explain each box's finding against this output (logit difference, e.g. 'No Finding')")
    p.add_argument("--thresholds", nargs="+", type=float, default=list(PAPER_THRESHOLDS), help="IoU thresholds T")
    p.add_argument("--out", default="cxr-explain-eval", help="results folder (a rerun resumes it)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes for decoding (default: none for under 8 batches, "
                        "else 1 on the CPU, up to 4 on a GPU)")
    p.add_argument("--split", default=None, help="evaluate only this split (train/val/test); default all")
    p.add_argument("--resize", choices=list(RESIZE_MODES), default="bilinear",
                   help="how maps are resized to the original image (same for every method)")
    p.add_argument("--empty-region", choices=list(EMPTY_REGION_MODES), default="zero",
                   help="IoU of a threshold whose region is empty: 0 (default) or NaN (excluded)")
    p.add_argument("--no-masks", action="store_true", help="score boxes only, not exact masks")
    p.add_argument("--metrics", nargs="+", default=list(OPTIONAL_SCORES), metavar="NAME",
                   help=f"scores besides IoU at each T ({' '.join(OPTIONAL_SCORES)}; default all). "
                        "Without rank and auprc no map is sorted: scoring takes about half the time")
    p.add_argument("--no-maps", action="store_true", help="do not save heatmaps (no figures / gallery)")
    p.add_argument("--max-images", type=int, default=None, help="only the first N images with ground truth")
    p.add_argument("--faithfulness", action="store_true",
                   help="deletion/insertion + randomisation check (docs/evaluation.md §4)")
    p.add_argument("--faithfulness-images", type=int, default=8, help="images for --faithfulness (default 8)")
    p.add_argument("--intention", default=None, metavar="FINDING",
                   help="also run the relevance-share analysis (docs/evaluation.md §6) for FINDING "
                        "(e.g. Pneumonia) on the images --split / --max-images select")
    g = p.add_argument_group("CheXlocalize protocol (docs/chexlocalize.md; always run with --layout chexlocalize)")
    g.add_argument("--chexlocalize", action="store_true", help="also run it on another layout (NIH boxes, masks)")
    g.add_argument("--chexlocalize-segmentation", choices=["otsu", "tuned"], default="otsu",
                   help="Otsu per map (default) or a threshold tuned per pathology on the val split")
    g.add_argument("--chexlocalize-cutoffs", choices=["none", "tune"], default="none",
                   help="probability cut-off per pathology tuned on the val split (scores every finding of every image)")
    g.add_argument("--chexlocalize-iou", choices=["true_positive", "full"], default="true_positive",
                   help="mIoU over the true-positive slice (default, the benchmark's) or the full set")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="float64 gives reference-grade LRP/RAP (slower)")
    p.add_argument("--stop-on-error", action="store_true",
                   help="stop at the first film that fails (default: record it in failures.csv and go on)")
    p.add_argument("--no-report", action="store_true", help="skip tables, figures and report.html")
    p.add_argument("--no-progress", action="store_true")
    return p


def add_report_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``cxr-explain report``."""
    p.add_argument("results", help="folder written by `cxr-explain evaluate`")
    p.add_argument("--gallery", type=int, default=6, help="regions per finding in the gallery")
    p.add_argument("--no-grids", action="store_true", help="skip the Fig. 3/5/6 grids (faster)")
    return p


def add_demo_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``cxr-explain demo``."""
    p.add_argument("--out", default="cxr-explain-demo", help="output folder (benchmark + results)")
    p.add_argument("--full", action="store_true", help="the whole benchmark, every test image, faithfulness checks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=None, help="processes for generating / decoding")
    p.add_argument("--chexlocalize", action="store_true",
                   help="evaluate the benchmark's CheXlocalize-style copy instead (written to "
                        "OUT/phantom_chexlocalize): Table 2 on its masks and the CheXlocalize protocol's mIoU / hit rate per pathology, "
                        "in OUT/results_chexlocalize")
    p.add_argument("--checkpoint", help="another model than the shipped one (its films default to its input size)")
    p.add_argument("--films", type=int, help="films to generate (default: 1000, or the benchmark's n with --full)")
    p.add_argument("--size", type=int, help="film size in px, at least 32 (default: the model's benchmark)")
    p.add_argument("--seed", type=int, help="benchmark seed (default: the model's benchmark, else 0)")
    p.add_argument("--max-images", type=int, help="test films to evaluate (default 150)")
    p.add_argument("--no-progress", action="store_true")
    return p


def add_export_chexlocalize_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``cxr-explain export-chexlocalize``."""
    p.add_argument("--data", required=True, help="a synthetic benchmark folder (NIH layout, `cxr-explain phantom`)")
    p.add_argument("--out", required=True, help="folder for the CheXpert / CheXlocalize-style copy")
    p.add_argument("--uncertain-fraction", type=float, default=0.1,
                   help="share of training label cells written as -1 (uncertain), in [0, 1] (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training labels' uncertainty (default 0)")
    p.add_argument("--image-format", choices=["png", "jpg"], default="png",
                   help="png: byte-for-byte copies (default); jpg: re-encoded, quality 95 (lossy)")
    return p


def load_model_from_args(args) -> object:
    """The checkpoint named by ``--checkpoint`` (strict load), else the shipped model."""
    if getattr(args, "checkpoint", None):
        from .models.checkpoints import load_checkpoint

        model, _, _ = load_checkpoint(args.checkpoint, arch=getattr(args, "arch", None),
                                      trust_pickle=bool(getattr(args, "trust_pickle", False)))
        return model
    from .demo import shipped_model

    return shipped_model()


def load_dataset_from_args(args, labels) -> object:
    """The dataset at ``--data`` (``--layout``, default detected by
    :func:`cxr_explain.data.layout.detect_layout`); NIH / RSNA readers keep the findings the model
    outputs."""
    from .data.labels import CHEXNET_FINDINGS, RSNA_FINDINGS
    from .data.layout import open_dataset

    root = Path(args.data)
    layout = resolve_layout(args)
    uncertain = getattr(args, "uncertain", "ones") or "ones"
    if layout == "nih":
        findings = [f for f in CHEXNET_FINDINGS if f in labels]
        if not findings:
            raise CxrExplainError(f"the model's outputs ({', '.join(labels)}) include no NIH finding")
        # the CheXlocalize full set / cut-off tuning also scores images without boxes
        return open_dataset(root, "nih", boxed_only=not _chexlocalize_all_pairs(args), findings=findings)
    if layout == "rsna":
        findings = [f for f in RSNA_FINDINGS if f in labels] or ["Pneumonia"]
        return open_dataset(root, "rsna", findings=findings)
    return open_dataset(root, layout, labels_csv=getattr(args, "labels_csv", None), uncertain=uncertain)


def resolve_layout(args) -> str:
    """``--layout``, or the one :func:`cxr_explain.data.layout.detect_layout` finds at ``--data``
    (a DataError when ``--data`` is not a folder)."""
    from .data.layout import detect_layout

    root = Path(args.data)
    layout = getattr(args, "layout", "auto") or "auto"
    if layout == "auto":
        return detect_layout(root)
    if not root.is_dir():
        raise CxrExplainError(f"{root}: dataset folder not found; pass --data with an existing folder")
    return layout


def _chexlocalize_all_pairs(args) -> bool:
    return (getattr(args, "chexlocalize_cutoffs", "none") == "tune"
            or getattr(args, "chexlocalize_iou", "true_positive") == "full")


def check_evaluate_options(args) -> dict:
    """Every check of ``cxr-explain evaluate``'s options that needs no model (run before it is
    loaded, so that a bad option costs no loading): the data folder and its layout, methods and
    their options, thresholds, batch size, ``--out`` (a folder), ``--checkpoint`` (a file
    ``torch.load`` could read), ``--device``. Returns the parsed method options."""
    from .attribution.methods import get_method, parse_method_options
    from .runtime import check_device

    layout = resolve_layout(args)
    if layout in ("chexpert", "mimic"):
        raise CxrExplainError(
            f"{args.data}: {layout} label files have no lesion masks or boxes to score heat maps "
            "against; for localisation use CheXlocalize (its gt_segmentations_*.json beside the CheXpert files)")
    if not args.methods:
        raise CxrExplainError("no explanation method given; pass e.g. --methods cam lrp rap")
    method_options = parse_method_options(args.methods, getattr(args, "method_option", None) or [])
    for name, opts in method_options.items():
        get_method(name, **opts)
    if not args.thresholds or any(not 0.0 <= t < 1.0 for t in args.thresholds):
        raise CxrExplainError(f"--thresholds {args.thresholds} must lie in [0, 1)")
    if args.batch_size < 1:
        raise CxrExplainError("--batch-size must be at least 1")
    args.metrics = list(check_scores(args.metrics))
    if getattr(args, "workers", None) is not None and args.workers < 0:
        raise CxrExplainError(f"--workers {args.workers}: give 0 (decode in the main process) or more")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CxrExplainError(f"--out {out} is a file; give a folder for the results (it is created if missing)")
    if getattr(args, "checkpoint", None):
        from .models.checkpoints import checkpoint_container

        checkpoint_container(args.checkpoint)
    check_device(args.device)
    _check_earlier_run(out, args)
    return method_options


def _check_earlier_run(out: Path, args) -> None:
    """A rerun into ``--out`` must keep the scoring settings its ``run.json`` records; those the
    options alone fix are compared here, before the model loads (the model itself is compared
    when the run is recorded, :func:`cxr_explain.results.run.record_run`)."""
    from .results.run import FIXED_DEFAULTS, load_run

    old = load_run(out) if out.is_dir() else {}
    now = {"thresholds": [float(t) for t in args.thresholds], "resize": args.resize,
           "empty_region": args.empty_region, "masks": not args.no_masks, "versus": getattr(args, "versus", None),
           "metrics": args.metrics}
    for k, v in now.items():
        was = old.get(k, FIXED_DEFAULTS.get(k))  # a record older than the setting: its default
        if old and (k in old or k in FIXED_DEFAULTS) and was != v:
            raise CxrExplainError(f"{out} holds results made with another {k} ({was!r}, now {v!r}); "
                                  "evaluate into a new --out folder or delete it")


def evaluate_cli(args) -> int:
    """``cxr-explain evaluate``: :func:`~.evaluation.evaluate` (with the CheXlocalize protocol and the
    intention analysis when asked), the run's description and the model's AUROC on the evaluated
    films (:mod:`~.evaluation.describe`, :mod:`~.evaluation.auroc`), then the report
    (:func:`~.report.html.write_report`, or only the tables with ``--no-report``); prints Table 2 (and
    the CheXlocalize table). Exit status: 0 when every film was scored, 1 when some failed
    (``failures.csv``)."""
    from .evaluation import evaluate
    from .results.csvlog import FAILURES_COLUMNS, FAILURES_FILE, read_rows
    from .results.schema import RESULTS_NAME
    from .results.store import read_results
    from .results.summary import table2_text, write_summaries

    method_options = check_evaluate_options(args)
    model = load_model_from_args(args)
    from .models.default import synthetic_model_warning

    note = synthetic_model_warning(model, [args.data], shipped=not getattr(args, "checkpoint", None))
    if note:
        warnings.warn(note, UserWarning, stacklevel=2)
    ds = load_dataset_from_args(args, list(model.cxr_spec.labels))
    cxl = bool(getattr(args, "chexlocalize", False)) or resolve_layout(args) == "chexlocalize"
    out = evaluate(model, ds, methods=args.methods, thresholds=args.thresholds, out_dir=args.out,
                   batch_size=args.batch_size, device=args.device, workers=args.workers, split=args.split,
                   resize=args.resize, empty_region=args.empty_region, save_maps=not args.no_maps,
                   faithfulness=args.faithfulness, progress=not args.no_progress, use_masks=not args.no_masks,
                   faithfulness_images=args.faithfulness_images, max_images=args.max_images,
                   method_options=method_options, versus=getattr(args, "versus", None),
                   stop_on_error=bool(getattr(args, "stop_on_error", False)),
                   dtype=getattr(args, "dtype", "float32") or "float32", notes=[note] if note else [],
                   metrics=getattr(args, "metrics", None))
    from .runtime import current_dist

    if current_dist().rank != 0:
        # under torchrun the ranks shared the films; evaluate merged their rows behind a barrier.
        # Rank 0 alone runs the whole-set analyses and writes the tables and the report: two
        # writers of one file race on its atomic rename.
        return 0
    unreadable = [f["file"] for f in read_rows(Path(out) / FAILURES_FILE, FAILURES_COLUMNS) if f["stage"] == "read"]
    cxl_table = None
    if cxl:
        from .evaluation.chexlocalize import run_chexlocalize

        cxl_table = run_chexlocalize(
            model, ds, args.methods, out, segmentation=args.chexlocalize_segmentation,
            cutoffs=args.chexlocalize_cutoffs, mode=args.chexlocalize_iou, split=args.split,
            max_images=args.max_images, batch_size=args.batch_size, device=args.device, workers=args.workers,
            progress=not args.no_progress, method_options=method_options,
            exclude=unreadable)
    if getattr(args, "intention", None):
        from .evaluation.intention import intention_analysis

        intention_analysis(model, ds, methods=args.methods, finding=args.intention, out_dir=out,
                           batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
                           split=args.split, max_images=args.max_images, exclude=unreadable)
    failed = read_rows(Path(out) / FAILURES_FILE, FAILURES_COLUMNS)
    if failed:
        print(f"cxr-explain evaluate: {len(failed)} failure(s) recorded in {(Path(out) / FAILURES_FILE).resolve()}",
              file=sys.stderr)
    if failed and not len(read_results(Path(out) / RESULTS_NAME)):
        return 1  # every film failed: nothing to summarise
    from .evaluation.describe import describe_run
    from .results.run import record_about

    record_about(out, describe_run(model, ds, getattr(args, "checkpoint", None),
                                   shipped=not getattr(args, "checkpoint", None), notes=[note] if note else []))
    from .evaluation.auroc import evaluated_auroc

    evaluated_auroc(model, ds, out, batch_size=args.batch_size, device=args.device, workers=args.workers,
                    progress=not args.no_progress)
    no_report = bool(getattr(args, "no_report", False))
    if no_report:
        write_summaries(out)
    else:
        from .report.html import write_report

        write_report(out)
    print(table2_text(out, "all", "box" if (out / "tables" / "table2_all_box.md").is_file() else "mask"))
    if cxl_table is not None:
        print(cxl_table.read_text(encoding="utf-8"))
    if not no_report:
        print(f"report: {(Path(out) / 'report.html').resolve()}")
    return 1 if failed else 0


def report_cli(args) -> Path:
    """``cxr-explain report RESULTS``: rewrite tables, figures and ``report.html``; print its path."""
    from .report.html import write_report

    p = write_report(args.results, gallery_per_finding=args.gallery, grids=not args.no_grids)
    print(f"report: {p.resolve()}")
    return p


def demo_cli(args) -> Path:
    """``cxr-explain demo``."""
    from .demo import demo

    model = load_model_from_args(args) if getattr(args, "checkpoint", None) else None
    return demo(args.out, full=args.full, device=args.device, workers=args.workers, progress=not args.no_progress,
                model=model, seed=args.seed, size=args.size, n_generate=args.films, max_images=args.max_images,
                chexlocalize=args.chexlocalize, checkpoint=getattr(args, "checkpoint", None))


def export_chexlocalize_cli(args) -> Path:
    """``cxr-explain export-chexlocalize``: :func:`~.data.phantom_export.export_chexlocalize`; prints the folder."""
    from .data.phantom_export import export_chexlocalize

    if not Path(args.data).is_dir():
        raise CxrExplainError(f"--data {args.data}: folder not found; pass a benchmark written by `cxr-explain phantom`")
    out = export_chexlocalize(args.data, args.out, uncertain_fraction=args.uncertain_fraction, seed=args.seed,
                              image_format=args.image_format)
    print(f"CheXlocalize-style copy written to {Path(out).resolve()}")
    return out
