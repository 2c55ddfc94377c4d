"""``cxr-explain``: a thin command line over the API. Each sub-command parses its arguments and
calls one API function; user errors print one line and exit with status 2."""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import CxrExplainError


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", help="weights file (CheXNet model.pth.tar, jrzech checkpoint, torchxrayvision, "
                   "torchvision state dict or cxr-explain); default: the shipped synthetic-benchmark model")
    g.add_argument("--arch", help="architecture (densenet121, resnet50, resnet18, resnet34, vgg16, vgg16_bn); "
                   "inferred from the checkpoint when omitted; without a checkpoint: random weights")
    g.add_argument("--num-classes", type=int, help="number of outputs (when the checkpoint cannot tell)")
    g.add_argument("--labels", help="label set name (chexnet, xrv, pneumonia, benchmark) or a comma list")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints that pickle whole Python objects (runs code from the file)")


def _explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="PNG / JPEG / DICOM files, or folders (every image under them, recursively)")
    _add_model_arguments(p)
    p.add_argument("--method", default="lrp,rap,cam",
                   help="comma list of methods (see `cxr-explain methods`); default: lrp,rap,cam")
    p.add_argument("--method-option", action="append", metavar="NAME=VALUE",
                   help="a method option, e.g. epsilon=0.1 (every listed method that has it) or "
                        "lrp-epsilon.epsilon=0.1; repeatable; `cxr-explain methods` lists the options")
    p.add_argument("--target", default="predicted",
                   help="class index, finding name, 'A-vs-B' (contrast: logit A − logit B), 'prob:NAME', "
                        "a comma list of them, or 'predicted' (default)")
    p.add_argument("--out", default="cxr_explain_out",
                   help="output folder (default: cxr_explain_out); a rerun with the same settings resumes it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out holds from an earlier run (needed when the settings differ)")
    p.add_argument("--stop-on-error", action="store_true",
                   help="stop at the first file that fails (default: record it in failures.csv and go on)")
    p.add_argument("--boxes", metavar="CSV",
                   help="lesion boxes to draw on the overlays (NIH BBox_List_2017.csv format, matched by file name)")
    p.add_argument("--preprocessing", help="imagenet-rgb | xrv | gray (default: the checkpoint's)")
    p.add_argument("--size", type=int, help="model input size, at least 32 (default: the checkpoint's, else 224)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="float64 gives reference-grade LRP/RAP (ResNet RAP drifts in float32; see README)")
    p.add_argument("--layer", help="feature layer for gradcam / gradcam++ (module path, e.g. layer4)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_threads(p)


def _explain_command(args: argparse.Namespace) -> int:
    """Explain every readable input; exit status 1 when some failed (listed in failures.csv)."""
    from .batch import ExplainOptions, explain_batch

    opts = ExplainOptions(
        inputs=args.images, out=args.out, checkpoint=args.checkpoint, arch=args.arch,
        num_classes=args.num_classes, labels=args.labels, trust_pickle=args.trust_pickle, methods=args.method,
        method_options=args.method_option or [], target=args.target, preprocessing=args.preprocessing,
        size=args.size, dtype=args.dtype, layer=args.layer, device=args.device, boxes=args.boxes,
        overwrite=args.overwrite, stop_on_error=args.stop_on_error, progress=not args.no_progress)
    res = explain_batch(opts)
    out = res.out.resolve()
    parts = [f"wrote {res.maps} maps (.npy) and overlays (.png) for {res.images} images to {out}"]
    if res.already_done:
        parts.append(f"{res.already_done} images already done")
    if res.failures:
        parts.append(f"{len(res.failures)} failed (see {out / 'failures.csv'})")
    print("; ".join(parts))
    return res.exit_code


def _methods_command(args: argparse.Namespace) -> int:
    from .attribution.methods import available_methods, method_class

    print(f"{'method':22s} {'family':12s} {'maps':7s} {'Σ = y':6s} description")
    for name in available_methods():
        cls = method_class(name)
        default = cls()
        opts = ", ".join(f"{o.name}={o.default}" for o in cls.options())
        line = (f"{name:22s} {cls.family.value:12s} {'signed' if cls.signed else 'CAM':7s} "
                f"{'yes' if default.conserving else 'no':6s} {cls.description}")
        print(line + (f" [options: {opts}]" if opts else ""))
    return 0


def _phantom_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=200, help="number of images (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["nih", "rsna"], default="nih")
    p.add_argument("--size", type=int, default=1024, help="image size in pixels (default 1024)")
    p.add_argument("--shortcut", choices=["marker"], help="plant a label-correlated cue in the train split")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true")


def _phantom_command(args: argparse.Namespace) -> int:
    from .data.phantom import phantom_cli

    out = phantom_cli(args)
    print(f"synthetic benchmark written to {Path(out).resolve()}")
    return 0


# Sub-commands whose argument definitions and entry points live beside their API.
# (module, add-arguments function, command function)
_DELEGATED: dict[str, tuple[str, str, str, str]] = {
    "train": ("cxr_explain.training.commands", "add_train_arguments", "train_cli",
              "train a classifier (NIH or RSNA layout)"),
    "auroc": ("cxr_explain.training.auroc", "add_auroc_arguments", "auroc_cli",
              "per-class AUROC with bootstrap CIs (Table 1)"),
    "evaluate": ("cxr_explain.commands", "add_evaluate_arguments", "evaluate_cli",
                 "localisation metrics per box and method (Table 2)"),
    "report": ("cxr_explain.commands", "add_report_arguments", "report_cli", "figures and the HTML report"),
    "demo": ("cxr_explain.commands", "add_demo_arguments", "demo_cli",
             "the main job on the built-in synthetic benchmark and the shipped model"),
    "export-chexlocalize": ("cxr_explain.commands", "add_export_chexlocalize_arguments", "export_chexlocalize_cli",
                            "copy a synthetic benchmark into CheXpert / CheXlocalize's layout"),
}


def _add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads`` on a sub-command that does not define it itself."""
    try:
        p.add_argument("--threads", type=int, metavar="N",
                       help="torch CPU threads (default: torch's, one per core; 1 is fastest on a busy machine)")
    except argparse.ArgumentError:
        pass  # the sub-command has its own --threads


def _delegate(name: str) -> tuple[Callable, Callable]:
    """Import a delegated sub-command's module: its add-arguments and command functions."""
    module, add_args, func, _ = _DELEGATED[name]
    try:
        mod = importlib.import_module(module)
        return getattr(mod, add_args), getattr(mod, func)
    except (ImportError, AttributeError) as exc:
        raise CxrExplainError(f"`cxr-explain {name}` is not available in this build ({module}: {exc})") from None


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``cxr-explain`` parser. A delegated sub-command's module is imported, and its options
    added, only when ``command`` names it: listing the commands (``--help``) imports neither torch
    nor the trainer."""
    parser = argparse.ArgumentParser(
        prog="cxr-explain",
        description="Explain chest X-ray classifiers (CAM, Grad-CAM, LRP, RAP, gradients) and measure "
                    "whether the explanation is the lesion.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"cxr-explain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "explain", help="heatmaps and overlays for images",
        description="Explain every readable image. --out receives per map <name>_<target>_<method>.npy "
                    "(model resolution) and .png (annotated overlay), and maps.csv, predictions.csv, "
                    "failures.csv and run.json (the settings: a rerun with the same settings resumes). "
                    "Exit status: 0 all explained, 1 some inputs failed (failures.csv), 2 an option or "
                    "setting was refused before any image was read.")
    _explain_arguments(p)
    p.set_defaults(func=_explain_command)
    p = sub.add_parser("methods", help="list the explanation methods")
    p.set_defaults(func=_methods_command)
    p = sub.add_parser("phantom", help="generate the synthetic chest X-ray benchmark")
    _phantom_arguments(p)
    p.set_defaults(func=_phantom_command)
    for name, (_, _, _, help_text) in _DELEGATED.items():
        p = sub.add_parser(name, help=help_text)
        if name == command:
            adder, runner = _delegate(name)
            adder(p)
            _add_threads(p)
            p.set_defaults(func=runner)
    return parser


def _command_name(argv: Sequence[str]) -> Optional[str]:
    """The sub-command in ``argv``: its first word that is not an option (top-level options take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"cxr-explain: {category.__name__}: {message}\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    warnings.formatwarning = _one_line_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_name(argv)
    try:
        parser = build_parser(command)
    except CxrExplainError as exc:
        print(f"cxr-explain {command}: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            if getattr(args, "threads", None) is not None:
                from .runtime import set_threads

                set_threads(args.threads)
            result = args.func(args)
        return int(result or 0) if not isinstance(result, (str, Path)) else 0
    except CxrExplainError as exc:
        print(f"cxr-explain {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cxr-explain {args.command}: interrupted; finished results are kept, rerun to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
