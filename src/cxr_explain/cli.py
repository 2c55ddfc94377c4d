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
    p.add_argument("images", nargs="+", help="PNG / JPEG / DICOM files")
    _add_model_arguments(p)
    p.add_argument("--method", default="lrp,rap,cam",
                   help="comma list of methods (see `cxr-explain methods`); default: lrp,rap,cam")
    p.add_argument("--method-option", action="append", metavar="NAME=VALUE",
                   help="a method option, e.g. epsilon=0.1 (every listed method that has it) or "
                        "lrp-epsilon.epsilon=0.1; repeatable; `cxr-explain methods` lists the options")
    p.add_argument("--target", default="predicted",
                   help="class index, finding name, 'A-vs-B' (contrast: logit A − logit B), 'prob:NAME', "
                        "a comma list of them, or 'predicted' (default)")
    p.add_argument("--out", default="cxr_explain_out", help="output folder (default: cxr_explain_out)")
    p.add_argument("--preprocessing", help="imagenet-rgb | xrv | gray (default: the checkpoint's)")
    p.add_argument("--size", type=int, help="model input size (default: the checkpoint's, else 224)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="float64 gives reference-grade LRP/RAP (ResNet RAP drifts in float32; see README)")
    p.add_argument("--layer", help="feature layer for gradcam / gradcam++ (module path, e.g. layer4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    _add_threads(p)


def _explain_command(args: argparse.Namespace) -> int:
    import torch
    from .api import load_images, load_model, save_explanation
    from .attribution import explain
    from .attribution.explain import model_labels
    from .attribution.methods import get_method, parse_method_options
    from .attribution.targets import as_target

    names_given = [m for m in args.method.split(",") if m.strip()]
    options = parse_method_options(names_given, args.method_option or [])
    methods = [get_method(name, **opts) for name, opts in options.items()]
    target = as_target(_parse_target(args.target))
    labels = args.labels.split(",") if args.labels and "," in args.labels else args.labels
    model = load_model(args.checkpoint, arch=args.arch, num_classes=args.num_classes, labels=labels,
                       trust_pickle=args.trust_pickle, verbose=args.checkpoint is not None)
    model = model.to(args.device)
    dtype = torch.float64 if args.dtype == "float64" else None
    names = model_labels(model)
    written, skipped, stated = [], 0, set()
    from .progress import progress_bar

    for path in progress_bar(args.images, desc="explaining", unit="image", disable=len(args.images) < 2):
        todo = [m for m in methods if not _done(path, m.name, target, names, args.out)]
        if not todo:  # a rerun resumes: outputs of finished images are kept, not recomputed
            skipped += 1
            continue
        (img,) = load_images([path], model, args.preprocessing, args.size)
        x = img.tensor.unsqueeze(0)
        for method in todo:
            e = explain(model, x, method, target=target, dtype=dtype, layer=args.layer)
            if e.feature_layer and method.name not in stated:  # CAM family: which map was read, once
                stated.add(method.name)
                print(f"{method.name}: feature map of layer {e.feature_layer} ({e.feature_layout})")
            maps = e.maps[0].reshape(-1, *e.maps.shape[-2:])
            labels_0 = e.target_names[0] if isinstance(e.target_names[0], list) else [e.target_names[0]]
            for h, label in zip(maps, labels_0):
                if not label:
                    continue
                npy, png = save_explanation(img, h, args.out, method.name, label, signed=method.signed)
                written.append(png)
    note = f" ({skipped} images already done)" if skipped else ""
    print(f"wrote {len(written)} maps (.npy) and overlays (.png) to {Path(args.out).resolve()}{note}")
    return 0


def _done(path: str, method: str, target, names, out: str) -> bool:
    """Whether ``explain`` already wrote this image's outputs for ``method`` (targets known before
    the forward only: a 'predicted' target is known only after it)."""
    import torch

    from .api import output_stem
    from .attribution.targets import Predicted, Target

    if isinstance(target, Predicted) or not names:
        return False
    try:  # the names a target resolves to need no model output, except for 'predicted'
        sel = target.select(torch.zeros(1, len(names)), names)
    except Exception:  # noqa: BLE001 - resolution errors surface on the real run
        return False
    stems = [Path(out) / output_stem(Path(path), label, method) for label in sel.names[0] if label]
    return bool(stems) and all(s.with_suffix(".npy").is_file() and s.with_suffix(".png").is_file() for s in stems)


def _parse_target(text: str):
    """``--target``: one target, or a comma list of targets explained together for each image."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if len(parts) == 1:
        return parts[0]
    return [parts]  # one list per image: the CLI explains one image at a time


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
    "train": ("cxr_explain.training", "add_train_arguments", "train_cli", "train a classifier (NIH or RSNA layout)"),
    "auroc": ("cxr_explain.training", "add_auroc_arguments", "auroc_cli", "per-class AUROC with bootstrap CIs (Table 1)"),
    "evaluate": ("cxr_explain.evaluation", "add_evaluate_arguments", "evaluate_cli",
                 "localisation metrics per box and method (Table 2)"),
    "report": ("cxr_explain.evaluation", "add_report_arguments", "report_cli", "figures and the HTML report"),
    "demo": ("cxr_explain.evaluation", "add_demo_arguments", "demo_cli",
             "the main job on the built-in synthetic benchmark and the shipped model"),
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
    p = sub.add_parser("explain", help="heatmaps and overlays for images")
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
