"""Evaluation pipeline: score explanations against lesion boxes/masks, summarise, report."""
from .commands import (add_demo_arguments, add_evaluate_arguments, add_report_arguments, demo_cli,
                       evaluate_cli, report_cli)
from .runner import evaluate, load_maps

__all__ = ["evaluate", "load_maps", "evaluate_cli", "report_cli", "demo_cli", "add_evaluate_arguments",
           "add_report_arguments", "add_demo_arguments"]
