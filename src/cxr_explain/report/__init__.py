"""Figures, overlays and the HTML report, drawn from a results folder (:mod:`cxr_explain.results`)."""
