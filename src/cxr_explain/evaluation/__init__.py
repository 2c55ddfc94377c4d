"""The evaluation loop: explain every lesion of a dataset with several methods, score each map
against its box or mask, and write the rows, maps and run record through :mod:`cxr_explain.results`;
plus the faithfulness checks and the relevance-share (intention) analysis."""
from .runner import DEFAULT_METHODS, GroundTruth, evaluate, ground_truths
from .timing import StageTimer

__all__ = ["evaluate", "ground_truths", "GroundTruth", "DEFAULT_METHODS", "StageTimer"]
