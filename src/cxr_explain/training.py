"""Fit a chest X-ray classifier (multi-label or binary) and measure its AUROC; torchrun/DDP-ready.

Recipe (CheXNet, Rajpurkar et al. 2017): Adam (β = 0.9, 0.999), lr 1e-3, loss
``BCEWithLogits(z, y) = -[y log σ(z) + (1-y) log(1-σ(z))]`` averaged over images × findings,
lr × 0.1 when the validation loss stops improving (``ReduceLROnPlateau``, patience 1). The
checkpoint with the best mean validation AUROC is kept as ``best.pt`` (``cxr-explain/1`` format,
loadable by :func:`~cxr_explain.models.checkpoints.load_checkpoint`); ``last.pt`` (model, optimizer,
scheduler, scaler, epoch, RNG state, history) is rewritten after every epoch so that
``resume=True`` continues from the next epoch.

Distributed: started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), each rank joins the
process group with ``init_method="env://"`` (nccl on CUDA, gloo on CPU), reads one shard of the
training and validation sets (``DistributedSampler``), gradients are all-reduced by
``DistributedDataParallel``, validation scores are gathered, and only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .data.folder import SampleDataset
from .data.images import get_preprocessing
from .data.labels import BOX_FINDINGS, CHEXNET_FINDINGS, RSNA_FINDINGS
from .errors import CheckpointError, CxrExplainError
from .metrics.classification import auroc_per_class, format_table1
from .models.checkpoints import file_sha256, load_checkpoint, save_checkpoint
from .models.zoo import ARCHS, ModelSpec, build_model, get_spec, label_index
from .runtime import Dist, current_dist, init_distributed, resolve_device

__all__ = ["TrainConfig", "TrainResult", "train", "fit", "train_cli", "add_train_arguments", "evaluate_auroc",
           "auroc_cli", "add_auroc_arguments", "load_split", "detect_layout", "predict"]

LAYOUTS = ("nih", "rsna")
RESUME_FORMAT = "cxr-explain-resume/1"


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in the checkpoints' provenance).

    ``findings`` None = the 8 NIH box findings (layout "nih") or ``["Pneumonia"]`` (layout "rsna").
    ``hflip`` is off by default: a horizontal flip swaps the patient's left and right (heart on
    the wrong side, laterality markers mirrored), which is not an image a scanner produces.
    ``affine`` = small random rotation (±``rotate`` degrees), shift (±``translate`` of the side)
    and scale (1 ± ``scale``). ``device``: "cpu", "cuda" or "auto" (cuda if available).
    """

    data: str
    out: str
    layout: str = "nih"
    arch: str = "densenet121"
    findings: Optional[list[str]] = None
    size: int = 224
    preprocessing: str = "imagenet-rgb"
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_factor: float = 0.1
    lr_patience: int = 1
    affine: bool = True
    rotate: float = 5.0
    translate: float = 0.04
    scale: float = 0.05
    hflip: bool = False
    workers: int = 2
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    data_seed: int = 0
    val_fraction: float = 0.1
    resume: bool = False
    max_train_images: Optional[int] = None
    max_val_images: Optional[int] = None
    shortcut_note: str = ""
    command: str = ""
    progress: bool = True
    threads: Optional[int] = None

    def resolved_findings(self) -> list[str]:
        """The label list the model outputs, in order."""
        if self.findings:
            return [str(f) for f in self.findings]
        return list(BOX_FINDINGS) if self.layout == "nih" else ["Pneumonia"]

    def validate(self) -> None:
        """Raise :class:`CxrExplainError` naming the bad field."""
        if self.layout not in LAYOUTS:
            raise CxrExplainError(f"TrainConfig.layout {self.layout!r}: use one of {', '.join(LAYOUTS)}")
        if self.arch not in ARCHS:
            raise CxrExplainError(f"TrainConfig.arch {self.arch!r}: use one of {', '.join(ARCHS)}")
        for name in ("epochs", "batch_size", "size"):
            if int(getattr(self, name)) < 1:
                raise CxrExplainError(f"TrainConfig.{name} = {getattr(self, name)} must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise CxrExplainError(f"TrainConfig.lr = {self.lr} must be a positive number")
        if self.device not in ("cpu", "cuda", "auto") and not str(self.device).startswith("cuda:"):
            raise CxrExplainError(f"TrainConfig.device {self.device!r}: use cpu, cuda or auto")
        if self.workers < 0:
            raise CxrExplainError(f"TrainConfig.workers = {self.workers} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON and checkpoints (tuples become lists)."""
        d = asdict(self)
        d["betas"] = list(d["betas"])
        return d


# ----------------------------------------------------------------------------- data
def detect_layout(root: str | os.PathLike[str]) -> str:
    """The layout of a training folder: :func:`cxr_explain.data.layout.detect_layout`, which must
    be one with labels and a split (``nih`` or ``rsna``)."""
    from .data.layout import detect_layout as detect

    layout = detect(root)
    if layout not in LAYOUTS:
        raise CxrExplainError(f"{root}: neither Data_Entry_2017*.csv (NIH) nor stage_2_train_labels.csv "
                              "(RSNA) found; pass --layout or point --data at the dataset root")
    return layout


def load_split(root: str | os.PathLike[str], layout: str, split: str, findings: Sequence[str],
               seed: int = 0, val_fraction: float = 0.1) -> SampleDataset:
    """The ``split`` ("train" / "val" / "test") of an NIH- or RSNA-layout dataset at ``root``."""
    from .data.layout import open_dataset

    if layout not in LAYOUTS:
        raise CxrExplainError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    return open_dataset(root, layout, split=split, findings=findings, image_size=None, seed=seed,
                        val_fraction=val_fraction)


def phantom_provenance(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The generator settings of a synthetic benchmark (its ``phantom.json``), else {}."""
    p = Path(root) / "phantom.json"
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text())
    except ValueError:
        return {}
    return {k: d[k] for k in ("seed", "n", "size", "layout", "shortcut", "generator") if k in d}


class _Subset(Dataset):
    """The first ``n`` items of a dataset (keeps ``(x, y, index)`` with the original index)."""

    def __init__(self, base: Dataset, n: int):
        self.base, self.n = base, min(n, len(base))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.base[i]


class _Augmented(Dataset):
    """Random affine (and optional horizontal flip) on the preprocessed tensor of ``base``."""

    def __init__(self, base: Dataset, cfg: TrainConfig):
        from torchvision.transforms import v2

        self.base = base
        ops: list[Any] = []
        if cfg.affine:
            ops.append(v2.RandomAffine(degrees=cfg.rotate, translate=(cfg.translate, cfg.translate),
                                       scale=(1 - cfg.scale, 1 + cfg.scale),
                                       interpolation=v2.InterpolationMode.BILINEAR))
        if cfg.hflip:
            ops.append(v2.RandomHorizontalFlip())
        self.tf = v2.Compose(ops) if ops else None

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y, idx = self.base[i]
        if self.tf is not None:
            x = self.tf(x)
        return x, y, idx


# ----------------------------------------------------------------------------- prediction
def _scores(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Per-class probability: σ(z) for multi-label / single-logit heads, softmax(z) otherwise."""
    logits = logits.float()
    return torch.sigmoid(logits) if multilabel or logits.shape[1] == 1 else torch.softmax(logits, dim=1)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, multilabel: bool = True,
            amp: bool = False, progress: bool = False, desc: str = "predict"
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Run ``model`` over ``loader`` of ``(x, y, index)``: (indices, y_true, scores, mean BCE loss)."""
    model.eval()
    idx_all, y_all, s_all = [], [], []
    loss_sum, n = 0.0, 0
    it = loader
    if progress:
        from .progress import progress_bar
        it = progress_bar(loader, desc=desc, leave=False)
    for x, y, idx in it:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
            z = model(x)
        z = z.float()
        if z.shape == y.shape:
            loss_sum += float(nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum"))
            n += y.numel()
        idx_all.append(idx.cpu().numpy())
        y_all.append(y.cpu().numpy())
        s_all.append(_scores(z, multilabel).cpu().numpy())
    if not idx_all:
        return np.zeros(0, np.int64), np.zeros((0, 0)), np.zeros((0, 0)), float("nan")
    return (np.concatenate(idx_all), np.concatenate(y_all), np.concatenate(s_all),
            loss_sum / n if n else float("nan"))


def _as_torch_dataset(dataset: Any, spec: ModelSpec) -> Dataset:
    if isinstance(dataset, SampleDataset):
        return dataset.with_preprocessing(get_preprocessing(spec.preprocessing, spec.input_size))
    return dataset


def evaluate_auroc(model: nn.Module, dataset: Any, batch_size: int = 16, device: str | torch.device = "cpu",
                   workers: int = 0, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(y_true N×C, scores N×C) of ``model`` on ``dataset``, rows in dataset order.

    ``dataset`` is a :class:`SampleDataset` (preprocessed with the model's own spec) or a torch
    Dataset of ``(x, y, index)``. Scores are σ(logit) per class (softmax for a two-logit head);
    AUROC only needs their order. Under an initialised process group each rank scores one shard
    and the results are gathered, so every rank returns the full arrays.
    """
    spec = get_spec(model)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CxrExplainError(f"--device {dev} requested but CUDA is not available; use --device cpu")
    ds = _as_torch_dataset(dataset, spec)
    d = current_dist()
    sampler = DistributedSampler(ds, d.world, d.rank, shuffle=False) if d.world > 1 else None
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=workers,
                        pin_memory=dev.type == "cuda")
    model = model.to(dev)
    idx, y, s, _ = predict(model, loader, dev, spec.multilabel, progress=progress and d.main, desc="auroc")
    parts = d.gather((idx, y, s))
    return _merge(parts, len(ds))  # type: ignore[arg-type]


def _merge(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Put gathered (index, y, score) shards back in dataset order, dropping sampler padding."""
    parts = [p for p in parts if p[0].size]
    if not parts:
        return np.zeros((0, 0)), np.zeros((0, 0))
    idx = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    s = np.concatenate([p[2] for p in parts])
    _, first = np.unique(idx, return_index=True)
    order = first[np.argsort(idx[first])]
    if order.size != n:
        raise CxrExplainError(f"gathered predictions cover {order.size} of {n} images")
    return y[order], s[order]


# ----------------------------------------------------------------------------- training
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _py_state(random.getstate())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _py_state(s: Any) -> Any:
    return [_py_state(v) for v in s] if isinstance(s, (tuple, list)) else s


def _py_unstate(s: Any) -> Any:
    return tuple(_py_unstate(v) for v in s) if isinstance(s, list) else s


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(_py_unstate(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _auroc_table(df: Any, epoch: int) -> str:
    """One compact text table: a header of finding abbreviations and one row of AUROCs."""
    names = [str(f)[:8] for f in df["finding"]]
    head = " ".join(f"{n:>8}" for n in names) + "     mean"
    vals = " ".join(f"{v:8.3f}" if np.isfinite(v) else f"{'n/a':>8}" for v in df["auroc"])
    return f"  val AUROC epoch {epoch}\n  {head}\n  {vals} {np.nanmean(df['auroc']):8.3f}"


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _sync_buffers(model: nn.Module, d: Dist) -> None:
    """Copy rank 0's BatchNorm running statistics to every rank (parameters are already equal)."""
    for b in _unwrap(model).buffers():
        d.broadcast_(b.data, src=0)


def _save_resume(path: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, scaler: Any,
                 epoch: int, best: float, history: list[dict], cfg: TrainConfig) -> None:
    payload = {
        "format": RESUME_FORMAT, "epoch": epoch, "best_mean_auroc": best, "history": history,
        "config": cfg.to_dict(), "model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": _rng_state(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load_resume(path: Path) -> dict[str, Any]:
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise CheckpointError(f"{path}: cannot read the resume checkpoint ({' '.join(str(exc).split())[:120]}); "
                              "delete it or train without --resume") from None
    if not isinstance(st, dict) or st.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"{path} is not a cxr-explain resume checkpoint; train without --resume")
    return st


def _provenance(cfg: TrainConfig, d: Dist, device: torch.device, n_train: int, n_val: int) -> dict[str, Any]:
    prov: dict[str, Any] = {
        "weights": "trained by cxr_explain.training",
        "data": str(Path(cfg.data).resolve()), "layout": cfg.layout, "data_seed": cfg.data_seed,
        "command": cfg.command or "cxr_explain.training.train(TrainConfig(...))",
        "epochs": cfg.epochs, "size": cfg.size, "batch_size": cfg.batch_size * d.world, "lr": cfg.lr,
        "device": f"{device.type} x{d.world}" if d.world > 1 else device.type,
        "torch": str(torch.__version__), "n_train": n_train, "n_val": n_val, "train_seed": cfg.seed,
    }
    ph = phantom_provenance(cfg.data)
    if ph:
        prov["phantom"] = ph
    if cfg.shortcut_note:
        prov["shortcut_note"] = cfg.shortcut_note
    return prov


@dataclass
class TrainResult:
    """What :func:`fit` returns on every rank: the checkpoint paths, the trained model, the history."""

    best: Path
    last: Path
    model: nn.Module
    history: list[dict] = field(default_factory=list)


def train(config: TrainConfig) -> Path:
    """Train ``config.arch`` on ``config.data``; return the path of the best checkpoint (``best.pt``).

    Writes into ``config.out``: ``best.pt`` (best mean validation AUROC, own format, provenance:
    data dir, data seed, command, epochs, per-class validation AUROC), ``last.pt`` (resume state,
    every epoch), ``history.jsonl`` (one line per epoch) and ``config.json``.
    """
    return fit(config).best


def fit(config: TrainConfig) -> TrainResult:
    """:func:`train`, returning the trained (unwrapped, CPU or GPU) model and history as well."""
    cfg = config
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))  # 1 is fastest on a busy machine (no spinning waits)
    findings = cfg.resolved_findings()
    known = CHEXNET_FINDINGS if cfg.layout == "nih" else RSNA_FINDINGS
    bad = [f for f in findings if f not in known]
    if bad:
        raise CxrExplainError(f"finding {bad[0]!r} is not in the {cfg.layout} label set; use some of {', '.join(known)}")
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    d = init_distributed(device)
    try:
        return _train(cfg, findings, device, d)
    finally:
        d.close()


def _train(cfg: TrainConfig, findings: list[str], device: torch.device, d: Dist) -> TrainResult:
    out = Path(cfg.out)
    last_path, best_path = out / "last.pt", out / "best.pt"
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    _seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)

    pre = get_preprocessing(cfg.preprocessing, cfg.size)
    train_base = load_split(cfg.data, cfg.layout, "train", findings, cfg.data_seed, cfg.val_fraction)
    val_base = load_split(cfg.data, cfg.layout, "val", findings, cfg.data_seed, cfg.val_fraction)
    if len(train_base) == 0 or len(val_base) == 0:
        raise CxrExplainError(f"{cfg.data}: the train or val split is empty ({len(train_base)} / "
                              f"{len(val_base)} images); check split.csv or the data folder")
    train_ds: Dataset = train_base.with_preprocessing(pre)
    val_ds: Dataset = val_base.with_preprocessing(pre)
    if cfg.max_train_images:
        train_ds = _Subset(train_ds, cfg.max_train_images)
    if cfg.max_val_images:
        val_ds = _Subset(val_ds, cfg.max_val_images)
    train_ds = _Augmented(train_ds, cfg)

    model = build_model(cfg.arch, labels=findings, in_channels=pre.channels, preprocessing=cfg.preprocessing,
                        input_size=cfg.size, multilabel=True,
                        provenance=_provenance(cfg, d, device, len(train_ds), len(val_ds)))
    spec: ModelSpec = model.cxr_spec
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_factor,
                                                       patience=cfg.lr_patience)
    use_amp = bool(cfg.amp and device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    start_epoch, best, history = 0, -math.inf, []
    if cfg.resume:
        if not last_path.is_file():
            raise CheckpointError(f"{last_path} not found; train without --resume or point --out at the earlier run")
        st = _load_resume(last_path)
        model.load_state_dict(st["model"], strict=True)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        _set_rng_state(st["rng"])
        start_epoch, best, history = int(st["epoch"]), float(st["best_mean_auroc"]), list(st["history"])
        if d.main:
            print(f"resuming from {last_path} after epoch {start_epoch} (best mean val AUROC {best:.3f})",
                  flush=True)
    if d.main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    net: nn.Module = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_sampler = DistributedSampler(train_ds, d.world, d.rank, shuffle=True, seed=cfg.seed)
    val_sampler = DistributedSampler(val_ds, d.world, d.rank, shuffle=False)
    loader_kw = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda",
                     persistent_workers=cfg.workers > 0)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=train_sampler, drop_last=False, **loader_kw)
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size, sampler=val_sampler, **loader_kw)
    loss_fn = nn.BCEWithLogitsLoss()

    if d.main:
        print(f"training {cfg.arch} on {cfg.data} ({cfg.layout}): {len(train_ds)} train / {len(val_ds)} val "
              f"images at {cfg.size} px, {len(findings)} finding(s), device {device}"
              f"{f' x{d.world} ranks' if d.world > 1 else ''}, epochs {start_epoch + 1}..{cfg.epochs}", flush=True)
    for epoch in range(start_epoch, cfg.epochs):
        train_sampler.set_epoch(epoch)
        net.train()
        t0 = time.time()
        it: Any = train_loader
        bar = None
        if cfg.progress and d.main:
            from .progress import progress_bar
            bar = it = progress_bar(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        run_loss, n_batches = 0.0, 0
        for x, y, _ in it:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                z = net(x)
            loss = loss_fn(z.float(), y)
            if not torch.isfinite(loss):
                raise CxrExplainError(f"training loss became {float(loss)} at epoch {epoch + 1}; lower --lr")
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            run_loss += loss.detach().item()
            n_batches += 1
            if bar is not None:
                bar.set_postfix(loss=f"{run_loss / n_batches:.4f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
        if bar is not None:
            bar.close()
        _sync_buffers(net, d)

        idx, y_val, s_val, vloss = predict(model, val_loader, device, True, use_amp, progress=False)
        parts = d.gather((idx, y_val, s_val, vloss, len(y_val)))
        y_all, s_all = _merge([p[:3] for p in parts], len(val_ds))  # type: ignore[arg-type]
        tot = sum(p[4] for p in parts)
        val_loss = sum(p[3] * p[4] for p in parts if p[4]) / max(tot, 1)
        tl = d.gather(run_loss / max(n_batches, 1))
        train_loss = float(np.mean(tl))
        df = auroc_per_class(y_all, s_all, findings, n_boot=0)
        mean_auc = float(np.nanmean(df["auroc"])) if df["auroc"].notna().any() else float("nan")
        sched.step(val_loss)
        rec = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "mean_val_auroc": mean_auc,
               "val_auroc": {f: (None if not np.isfinite(a) else float(a)) for f, a in zip(df["finding"], df["auroc"])},
               "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 1)}
        history.append(rec)
        improved = np.isfinite(mean_auc) and mean_auc > best
        if improved:
            best = mean_auc
        if d.main:
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                  f"mean val AUROC {mean_auc:.3f}{' (best)' if improved else ''}, {rec['seconds']:.0f} s", flush=True)
            print(_auroc_table(df, epoch + 1), flush=True)
            if improved or not best_path.is_file():
                spec.provenance.update({"best_epoch": epoch + 1, "val_auroc": rec["val_auroc"],
                                        "mean_val_auroc": mean_auc})
                save_checkpoint(best_path, model, spec, extra={"history": history, "config": cfg.to_dict()})
            _save_resume(last_path, net, opt, sched, scaler, epoch + 1, best, history, cfg)
            with open(out / "history.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        d.barrier()
    return TrainResult(best_path, last_path, model, history)


# ----------------------------------------------------------------------------- CLI glue
def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``cxr-explain train`` (read back by :func:`train_cli`)."""
    p.add_argument("--data", required=True, help="dataset folder (NIH or RSNA layout, e.g. a phantom)")
    p.add_argument("--layout", choices=LAYOUTS, default=None, help="default: detected from the files")
    p.add_argument("--arch", default="densenet121", choices=ARCHS)
    p.add_argument("--findings", default=None,
                   help="|-separated outputs; default: the 8 NIH box findings (nih) or Pneumonia (rsna)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--size", type=int, default=224, help="input side in pixels")
    p.add_argument("--preprocessing", default="imagenet-rgb", choices=("imagenet-rgb", "gray", "xrv"))
    p.add_argument("--batch-size", type=int, default=16, help="per process (rank)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--no-augment", action="store_true", help="no random affine")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips (swap laterality: off by default)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on GPU")
    p.add_argument("--seed", type=int, default=0, help="training seed (weights, shuffling)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of a random train/val split (RSNA without split.csv)")
    p.add_argument("--max-train-images", type=int, default=None)
    p.add_argument("--max-val-images", type=int, default=None)
    p.add_argument("--out", required=True, help="output folder: best.pt, last.pt, history.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--shortcut-note", default="", help="free text stored in the checkpoint's provenance")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's)")
    return p


def train_cli(args: argparse.Namespace) -> Path:
    """``cxr-explain train``: build a :class:`TrainConfig` from parsed arguments and :func:`train`."""
    layout = getattr(args, "layout", None) or detect_layout(args.data)
    findings = getattr(args, "findings", None)
    if isinstance(findings, str):
        findings = [f.strip() for f in findings.split("|") if f.strip()]
    cfg = TrainConfig(
        data=str(args.data), out=str(args.out), layout=layout, arch=getattr(args, "arch", "densenet121"),
        findings=findings or None, size=int(getattr(args, "size", 224)),
        preprocessing=getattr(args, "preprocessing", "imagenet-rgb"), epochs=int(getattr(args, "epochs", 10)),
        batch_size=int(getattr(args, "batch_size", 16)), lr=float(getattr(args, "lr", 1e-3)),
        weight_decay=float(getattr(args, "weight_decay", 0.0)), affine=not getattr(args, "no_augment", False),
        hflip=bool(getattr(args, "hflip", False)), workers=int(getattr(args, "workers", 2)),
        device=str(getattr(args, "device", "auto")), amp=not getattr(args, "no_amp", False),
        seed=int(getattr(args, "seed", 0)), data_seed=int(getattr(args, "data_seed", 0)),
        resume=bool(getattr(args, "resume", False)),
        max_train_images=getattr(args, "max_train_images", None), max_val_images=getattr(args, "max_val_images", None),
        shortcut_note=str(getattr(args, "shortcut_note", "") or ""),
        command=getattr(args, "command_line", None) or "cxr-explain " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        progress=not getattr(args, "no_progress", False), threads=getattr(args, "threads", None),
    )
    path = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"best checkpoint: {path}")
    return path


def add_auroc_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``cxr-explain auroc`` (read back by :func:`auroc_cli`)."""
    p.add_argument("--data", required=True, help="dataset folder (NIH or RSNA layout)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint load_checkpoint understands")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    p.add_argument("--layout", choices=LAYOUTS, default=None, help="default: detected from the files")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CI (0 = none)")
    p.add_argument("--trust-pickle", action="store_true", help="allow pickled checkpoints (jrzech, xrv objects)")
    p.add_argument("--out", default=None, help="also write table1.md / table1.csv into this folder")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    return p


def checkpoint_identity(path: str | os.PathLike[str]) -> str:
    """``name.pt (sha256 1a2b3c4d5e6f)``: the file name and the first 12 hex digits of its SHA-256."""
    return f"{Path(path).name} (sha256 {file_sha256(path)[:12]})"


def auroc_cli(args: argparse.Namespace) -> str:
    """``cxr-explain auroc``: Table 1 (AUROC per finding, bootstrap 95% CI) of a checkpoint on a split.

    Findings evaluated: the model's outputs that the dataset labels (e.g. Pneumonia for RSNA);
    the checkpoint (file name + SHA-256 prefix) and split are named on every row. Returns the table.
    """
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt}: checkpoint not found; pass --checkpoint with a .pt/.pth file")
    layout = getattr(args, "layout", None) or detect_layout(args.data)
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
    model, spec, report = load_checkpoint(ckpt, trust_pickle=bool(getattr(args, "trust_pickle", False)))
    known = CHEXNET_FINDINGS if layout == "nih" else RSNA_FINDINGS
    names = [lab for lab in spec.labels if lab in known]
    if layout == "rsna" and not names:
        names = [lab for lab in spec.labels if lab.lower() in ("lung opacity", "lung_opacity")][:1]
    if not names:
        raise CxrExplainError(f"{ckpt}: none of the model's outputs ({', '.join(spec.labels[:5])}) is a "
                              f"{layout} finding; pass a checkpoint trained for this dataset")
    split = str(getattr(args, "split", "test"))
    ds = load_split(args.data, layout, None if split == "all" else split, names,  # type: ignore[arg-type]
                    int(getattr(args, "data_seed", 0) or 0))
    if len(ds) == 0:
        raise CxrExplainError(f"{args.data}: the {split} split is empty; choose another --split")
    device = resolve_device(str(getattr(args, "device", "cpu") or "cpu"))
    y, s = evaluate_auroc(model, ds, int(getattr(args, "batch_size", 32) or 32), device,
                          int(getattr(args, "workers", 0) or 0))
    cols = [label_index(spec, n) for n in names]
    df = auroc_per_class(y, s[:, cols], names, n_boot=int(getattr(args, "n_boot", 1000)))
    ident = checkpoint_identity(ckpt)
    split_name = f"{split} ({len(ds)} images, {Path(args.data).name})"
    table = format_table1(df, ident, split_name)
    print(report.summary().splitlines()[0])
    print(table, end="")
    out = getattr(args, "out", None)
    if out:
        o = Path(out)
        o.mkdir(parents=True, exist_ok=True)
        (o / "table1.md").write_text(table)
        df.assign(checkpoint=ident, split=split_name).to_csv(o / "table1.csv", index=False)
    return table


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cxr_explain.training {train,auroc} ...`` (the same arguments as the CLI)."""
    parser = argparse.ArgumentParser(prog="python -m cxr_explain.training")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_train_arguments(sub.add_parser("train", help="train a classifier"))
    add_auroc_arguments(sub.add_parser("auroc", help="Table 1 of a checkpoint on a split"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = "python -m cxr_explain.training " + " ".join(shlex.quote(a) for a in argv)
    try:
        if args.cmd == "train":
            train_cli(args)
        else:
            auroc_cli(args)
    except CxrExplainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
