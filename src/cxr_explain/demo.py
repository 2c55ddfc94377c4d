"""``demo``: the whole pipeline on the built-in synthetic benchmark with the shipped model.

Default (a few minutes on a 2-core CPU): the first 1000 films of the benchmark the shipped model
was trained on (seed, film size and size n from the model card stored in the asset, e.g. seed 0,
128 px, n = 3000; films are deterministic per index, so they are the same films and the same
patient split) are generated if absent; CAM, LRP and RAP are evaluated on the first 150 boxed
images of its **test** split (patients the model never saw), the report is written and Table 2
printed. ``full=True``: all n films, every boxed test image, plus the faithfulness checks.

``chexlocalize=True``: the same films copied into CheXlocalize's layout
(:func:`~cxr_explain.data.phantom_export.export_chexlocalize`, under ``phantom_chexlocalize/``)
and evaluated there, on its test split, into ``results_chexlocalize/``: Table 2 on the lesion
masks, then the CheXlocalize protocol (Otsu segmentation, true-positive mIoU and hit rate per
pathology with bootstrap CIs; docs/chexlocalize.md) and its report section.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch.nn as nn

from .errors import CxrExplainError

DEMO_N = 1000
DEMO_MAX_IMAGES = 150
FULL_N = 1000


def shipped_model() -> nn.Module:
    """The shipped model (:func:`cxr_explain.models.default.load_default_model`), or a
    CxrExplainError saying how to evaluate another checkpoint when this install lacks it."""
    try:
        from .models.default import load_default_model
    except ImportError:
        raise CxrExplainError(
            "the shipped model is not available in this install (cxr_explain.models.default is missing); "
            "evaluate your own checkpoint with `cxr-explain evaluate --checkpoint FILE --data DIR`") from None
    return load_default_model()


def _benchmark_of_shipped_model(model: nn.Module) -> tuple[int, int, int]:
    """``(benchmark seed, film size, benchmark n)`` the shipped model was trained on, from its card."""
    from .models.default import default_model_info

    try:
        bench = dict(default_model_info().get("card", {}).get("benchmark", {}) or {})
    except Exception:  # an asset without a card: fall back to the generator's defaults
        bench = {}
    size = bench.get("size") or getattr(model.cxr_spec, "input_size", None) or 1024
    return int(bench.get("seed", 0)), int(size), int(bench.get("n") or FULL_N)


def demo(out_dir: str | Path = "cxr-explain-demo", full: bool = False, device: str = "cpu",
         workers: Optional[int] = None, progress: bool = True, *, model: Optional[nn.Module] = None,
         seed: Optional[int] = None, size: Optional[int] = None, n_generate: Optional[int] = None,
         max_images: Optional[int] = None, chexlocalize: bool = False, checkpoint: Optional[str | Path] = None) -> Path:
    """Generate the benchmark (if absent), evaluate CAM / LRP / RAP on its test split, write the
    report, print Table 2 (and with ``chexlocalize`` the CheXlocalize table; see the module
    docstring) and the report's path; returns the path of ``report.html``.
    ``model`` / ``seed`` / ``size`` / ``n_generate`` / ``max_images`` override the defaults (a
    given model's films default to its input size); ``checkpoint``: the file a given ``model`` was
    loaded from, named in the report's header."""
    from .data.labels import CHEXNET_FINDINGS
    from .data.nih import NIHDataset
    from .data.phantom import generate
    from .evaluation import evaluate
    from .report.html import write_report
    from .results.summary import table2_text

    d_full = FULL_N
    shipped = model is None
    if model is None:
        model = shipped_model()
        d_seed, d_size, d_full = _benchmark_of_shipped_model(model)
    else:
        d_seed, d_size = 0, int(getattr(getattr(model, "cxr_spec", None), "input_size", None) or 1024)
    for name, v, low in (("seed", seed, 0), ("size", size, 32), ("n_generate", n_generate, 1),
                         ("max_images", max_images, 1)):
        if v is not None and int(v) < low:
            raise CxrExplainError(f"demo: {name} {v} must be at least {low}")
    seed = d_seed if seed is None else int(seed)
    size = d_size if size is None else int(size)
    n = n_generate or (d_full if full else min(DEMO_N, d_full))
    out = Path(out_dir)
    data = out / "phantom"
    have = 0
    pj = data / "phantom.json"
    if pj.is_file():
        try:
            have = int(json.loads(pj.read_text()).get("n", 0))
        except ValueError:
            have = 0
    if have < n or not (data / "split.csv").is_file():
        print(f"generating the synthetic benchmark ({n} films, seed {seed}, {size} px) in {data} ...")
        generate(data, n, seed=seed, size=size, workers=workers, progress=progress)
    labels = list(model.cxr_spec.labels)
    findings = [f for f in CHEXNET_FINDINGS if f in labels]
    if not findings:
        raise CxrExplainError(f"the model's outputs ({', '.join(labels)}) include no NIH finding; the demo needs one")
    methods = ("cam", "lrp", "rap")
    limit = None if full else (max_images or DEMO_MAX_IMAGES)
    if chexlocalize:
        ds, results_dir, split = _chexlocalize_copy(data, out), out / "results_chexlocalize", None
    else:
        ds, results_dir, split = NIHDataset(data, boxed_only=True, findings=findings), out / "results", "test"
    res = evaluate(model, ds, methods=methods, out_dir=results_dir, split=split,
                   device=device, workers=workers, progress=progress, faithfulness=full,
                   max_images=limit, batch_size=4)
    cxl_table = None
    if chexlocalize:
        from .evaluation.chexlocalize import run_chexlocalize

        cxl_table = run_chexlocalize(model, ds, methods, res, max_images=limit, batch_size=4, device=device,
                                     workers=workers, progress=progress)
    from .evaluation.describe import describe_run
    from .results.run import record_about

    from .evaluation.auroc import evaluated_auroc

    record_about(res, describe_run(model, ds, checkpoint=None if shipped else checkpoint, shipped=shipped))
    evaluated_auroc(model, ds, res, batch_size=16, device=device, workers=workers, progress=progress)
    report = write_report(res)
    print(table2_text(res, "all", "mask" if chexlocalize else "box"))
    if cxl_table is not None:
        print(cxl_table.read_text(encoding="utf-8"))
    print(f"report: {report.resolve()}")
    return report


def _chexlocalize_copy(data: Path, out: Path):
    """The test split of the benchmark at ``data`` in CheXlocalize's layout (written, or rewritten
    identically, into ``out/phantom_chexlocalize``), as a dataset."""
    from .data.chexlocalize import CheXlocalizeDataset
    from .data.phantom_export import export_chexlocalize

    copy = export_chexlocalize(data, out / "phantom_chexlocalize")
    return CheXlocalizeDataset(copy, split="test")
