"""Turn a training run into the shipped model: ``python -m cxr_explain.training.package
--package RUN/best.pt --data DATA`` writes ``cxr_explain/assets/default_densenet121.pt`` (fp16
weights + the card's numbers + reference logits on a few test films) and its model card.

Loading and checking the shipped model is :mod:`cxr_explain.models.default`; packaging it needs
the trainer's AUROC of the test split, so it lives here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..metrics.classification import auroc_per_class
from ..models.checkpoints import load_checkpoint, save_checkpoint
from ..models.default import CARD_NAME, DEFAULT_ASSET, reference_inputs
from ..models.provenance import strip_machine_paths
from .auroc import checkpoint_identity
from .data import load_split
from .predict import evaluate_auroc

__all__ = ["package_default", "render_card", "main"]


def _test_table(best: Path, data: Path, n_boot: int) -> tuple[Any, int]:
    model, spec, _ = load_checkpoint(best)
    ds = load_split(data, "nih", "test", spec.labels)
    y, s = evaluate_auroc(model, ds, batch_size=32, device="cpu")
    return auroc_per_class(y, s, spec.labels, n_boot=n_boot), len(ds)


def package_default(best: Path, data: Path, out: Path, n_ref: int = 16, n_boot: int = 1000,
                    card_path: Optional[Path] = None, generator_note: str = "", notes: str = "") -> Path:
    """Write ``out`` = ``best``'s weights in fp16 + card numbers + reference logits; write the card.

    Reference logits are computed with the fp16-rounded weights (as loaded back), on the first
    ``n_ref`` test-split films of the benchmark (indices read from its ``records/``).
    """
    best, data, out = Path(best), Path(data), Path(out)
    model, spec, _ = load_checkpoint(best)
    raw = torch.load(best, map_location="cpu", weights_only=True)
    history = raw.get("extra", {}).get("history", [])
    ph = json.loads((data / "phantom.json").read_text())
    test_idx = sorted(int(json.loads(p.read_text())["index"]) for p in (data / "records").glob("*.json")
                      if json.loads(p.read_text())["split"] == "test")[:n_ref]
    df, n_test = _test_table(best, data, n_boot)
    card = {
        "arch": spec.arch, "labels": spec.labels, "input_size": spec.input_size,
        "preprocessing": spec.preprocessing, "benchmark": ph, "command": spec.provenance.get("command"),
        "epochs": spec.provenance.get("epochs"), "best_epoch": spec.provenance.get("best_epoch"),
        "device": spec.provenance.get("device"), "batch_size": spec.provenance.get("batch_size"), "n_train": spec.provenance.get("n_train"),
        "n_val": spec.provenance.get("n_val"), "n_test": n_test,
        "val_auroc": spec.provenance.get("val_auroc"), "mean_val_auroc": spec.provenance.get("mean_val_auroc"),
        "test_auroc": {r.finding: [float(r.auroc), float(r.ci_low), float(r.ci_high), int(r.n_pos), int(r.n_neg)]
                       for r in df.itertuples(index=False)},
        "mean_test_auroc": float(np.nanmean(df["auroc"])),
        "history": history, "reference_indices": test_idx, "generator_note": generator_note, "notes": notes,
    }
    save_checkpoint(out, model, spec, extra={"card": card}, half=True)
    half_model, _, _ = load_checkpoint(out)
    from PIL import Image

    names = {int(json.loads(p.read_text())["index"]): json.loads(p.read_text())["image"]
             for p in (data / "records").glob("*.json")}
    films = np.stack([np.asarray(Image.open(data / names[i])) for i in test_idx]).astype(np.uint8)
    with torch.no_grad():
        z = half_model(reference_inputs(films, spec))
    ref = {"seed": int(ph["seed"]), "size": int(ph["size"]), "indices": test_idx,
           "films": torch.from_numpy(films), "logits": z.tolist()}
    save_checkpoint(out, half_model, half_model.cxr_spec, extra={"card": card, "reference": ref}, half=True)
    if card_path is not None:
        card_path.write_text(render_card(card, out))
    return out


def _f(x: Any) -> str:
    return "n/a" if x is None or not np.isfinite(float(x)) else f"{float(x):.3f}"


def render_card(card: dict[str, Any], asset: Path) -> str:
    """The model card (Markdown) from the stored numbers, without the training machine's paths."""
    card = strip_machine_paths(card)
    labels = card["labels"]
    va, ta = card.get("val_auroc") or {}, card["test_auroc"]
    rows = "\n".join(
        f"| {f} | {_f(va.get(f))} | {_f(ta[f][0])} | {_f(ta[f][1])}–{_f(ta[f][2])} | {ta[f][3]} | {ta[f][4]} |"
        for f in labels)
    b = card["benchmark"]
    hist = "\n".join(f"| {h['epoch']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | {_f(h['mean_val_auroc'])} "
                     f"| {h['lr']:.0e} | {h['seconds']:.0f} |" for h in card.get("history", []))
    return f"""# Model card: `{asset.name}`

Shipped with cxr-explain so that every command runs without user weights; checkpoint identity
`{checkpoint_identity(asset)}`. Load it with `cxr_explain.models.default.load_default_model()`.

## What it is
- **Architecture**: torchvision `{card["arch"]}` (random init, no ImageNet weights), head with
  {len(labels)} outputs, **logits** for the NIH box findings in CheXNet order: {", ".join(labels)}.
  "No Finding" = all eight negative. Apply a sigmoid for probabilities.
- **Input**: `{card["preprocessing"]}` preprocessing (grey film repeated to 3 channels, ImageNet
  mean/std) at **{card["input_size"]}×{card["input_size"]}** px.
- **Weights** stored as float16 (loaded into float32); {asset.stat().st_size / 1e6:.1f} MB with the reference films.

## Training data: the synthetic benchmark only
- `cxr_explain.data.phantom.generate(out, n={b.get("n")}, seed={b.get("seed")}, layout="{b.get("layout")}",
  size={b.get("size")})` with the default `PhantomConfig` (generator `{b.get("generator")}`), no planted shortcut.
- Patient-level split from the generator: {card["n_train"]} train / {card["n_val"]} val / {card["n_test"]} test films.
- **Not trained on any real radiograph. Not a medical device; do not use it on patients.** It exists to
  demonstrate and test explanation methods on films whose lesion masks are exact.

## How it was trained
- Command: `{card["command"]}` (all steps: `scripts/train_default_model.sh`).
- {card["epochs"]} epochs (best mean validation AUROC at epoch {card["best_epoch"]}), batch {card.get("batch_size")}, Adam
  (β = 0.9, 0.999) lr 1e-3, ReduceLROnPlateau ×0.1 on the validation loss (patience 1), BCE-with-logits,
  small random affine (±5°, ±4 % shift, ±5 % scale), no horizontal flips (they swap laterality).
- Device: {card["device"]}.
- Resolution: {card["input_size"]} px, chosen for a CPU budget of about an hour on a shared 2-core machine.
  The benchmark's smallest findings (nodules, median box ≈ 0.5 % of the film, ~70 px of 1024) are still
  ~9 px wide at {card["input_size"]} px, and DenseNet-121's last feature map is
  {card["input_size"] // 32}×{card["input_size"] // 32} (CAM resolution).

## Results (AUROC per finding)
Validation = the benchmark's val split (model selection); test = its test split, 1000-resample
bootstrap 95 % CI (`python -m cxr_explain.training auroc --split test`).

| finding | val AUROC | test AUROC | test 95 % CI | test n pos | test n neg |
|---|---|---|---|---|---|
{rows}
| **mean** | {_f(card["mean_val_auroc"])} | {_f(card["mean_test_auroc"])} | | | |

Training history:

| epoch | train loss | val loss | mean val AUROC | lr | seconds |
|---|---|---|---|---|---|
{hist}

## Reproducibility check
The asset stores the first {len(card.get("reference_indices", []))} test-split films of the benchmark (seed {b.get("seed")},
{b.get("size")} px; phantom indices {card.get("reference_indices")}) and the model's logits on them.
`cxr_explain.models.default.reference_check()` recomputes the logits on the stored films (tests require
a difference < 1e-3) and re-renders the films from the seed with the installed generator: the pixel
difference is 0 only while the generator is the one the model was trained with ({card.get("generator_note") or "see above"}).
{card.get("notes") or ""}
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cxr_explain.training.package --package RUN/best.pt --data DATA [--out F] [--card F]``."""
    p = argparse.ArgumentParser(prog="python -m cxr_explain.training.package")
    p.add_argument("--package", required=True, type=Path, help="best.pt of the training run")
    p.add_argument("--data", required=True, type=Path, help="the benchmark folder it was trained on")
    here = Path(__file__).resolve().parents[1] / "assets"
    p.add_argument("--out", type=Path, default=here / DEFAULT_ASSET)
    docs = Path(__file__).resolve().parents[3] / "docs"
    p.add_argument("--card", type=Path, nargs="+",
                   default=[here / CARD_NAME] + ([docs / CARD_NAME] if docs.is_dir() else []))
    p.add_argument("--generator-note", default="", help="which phantom generator version made the data")
    p.add_argument("--notes", default="", help="free text appended to the card")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # fastest on a shared machine
    out = package_default(a.package, a.data, a.out, card_path=a.card[0], generator_note=a.generator_note,
                          notes=a.notes)
    for extra in a.card[1:]:
        extra.write_text(a.card[0].read_text())
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {', '.join(map(str, a.card))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
