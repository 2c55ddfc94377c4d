"""The trainer: fit a chest X-ray classifier and measure its AUROC (Table 1); torchrun/DDP-ready.

Its own subpackage, used by the command line only (``cxr-explain train`` / ``auroc``); nothing
else in cxr_explain imports it. Modules: :mod:`.config` (``TrainConfig``, whose fields are the
``train`` options), :mod:`.data` (layout, splits, augmentation), :mod:`.loop` (``fit`` /
``train``), :mod:`.predict` (scores in dataset order across ranks), :mod:`.auroc` (Table 1),
:mod:`.commands` (the command functions), :mod:`.package` (the shipped model from a run).
"""
from __future__ import annotations

from .auroc import add_auroc_arguments, auroc_cli, checkpoint_identity
from .commands import main, train_cli
from .config import LAYOUTS, TrainConfig, add_train_arguments, config_from_args
from .data import detect_layout, load_split, phantom_provenance
from .loop import TrainResult, fit, train
from .predict import evaluate_auroc, predict

__all__ = ["TrainConfig", "TrainResult", "train", "fit", "train_cli", "add_train_arguments", "config_from_args",
           "evaluate_auroc", "auroc_cli", "add_auroc_arguments", "load_split", "detect_layout", "predict",
           "checkpoint_identity", "phantom_provenance", "main", "LAYOUTS"]
