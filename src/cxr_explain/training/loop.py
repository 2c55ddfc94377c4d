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

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..data.images import get_preprocessing
from ..data.labels import CHEXNET_FINDINGS, RSNA_FINDINGS
from ..errors import CheckpointError, CxrExplainError
from ..metrics.classification import auroc_per_class
from ..models.checkpoints import save_checkpoint
from ..models.zoo import ModelSpec, build_model
from ..runtime import Dist, init_distributed, resolve_device
from .config import TrainConfig
from .data import Augmented, FirstN, load_split, phantom_provenance
from .predict import merge_shards, predict

__all__ = ["TrainResult", "train", "fit", "RESUME_FORMAT"]

RESUME_FORMAT = "cxr-explain-resume/1"


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
        train_ds = FirstN(train_ds, cfg.max_train_images)
    if cfg.max_val_images:
        val_ds = FirstN(val_ds, cfg.max_val_images)
    train_ds = Augmented(train_ds, cfg)

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
            from ..progress import progress_bar
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
        y_all, s_all = merge_shards([p[:3] for p in parts], len(val_ds))  # type: ignore[arg-type]
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
