"""Summary tables of the analyses beside the localisation scores: the CheXlocalize protocol
(:mod:`.chexlocalize`), faithfulness (deletion / insertion), model-parameter randomisation
(docs/evaluation.md §4) and where the relevance goes (intention, §6). Each is built from the per-image file the analysis wrote into the results folder
(:data:`FAITHFULNESS_CSV`, :data:`RANDOMIZATION_CSV`, :data:`INTENTION_CSV`, with their settings in
JSON), so the tables can be rewritten, and the report drawn, without rerunning anything.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics.localization import bootstrap_mean_ci
from .chexlocalize import saved_chexlocalize_tables
from .folder import ResultsFolder
from .tables import Table, TableGroup, ci_cell

__all__ = ["FAITHFULNESS_CSV", "FAITHFULNESS_SETTINGS", "RANDOMIZATION_CSV", "INTENTION_CSV",
           "INTENTION_SETTINGS", "SHARES", "faithfulness_table", "randomization_summary", "randomization_table",
           "summarize_intention", "intention_table", "analysis_tables", "read_settings"]

FAITHFULNESS_CSV = "faithfulness.csv"
FAITHFULNESS_SETTINGS = "faithfulness.json"
RANDOMIZATION_CSV = "randomization.csv"
INTENTION_CSV = "intention.csv"
INTENTION_SETTINGS = "intention.json"
#: The relevance shares of the intention analysis, in table order.
SHARES = ("inside_lesion", "lung_outside_lesion", "outside_lungs", "on_cue")


def read_settings(path: Path) -> dict:
    """A settings JSON written beside an analysis' CSV ({} when absent or unreadable)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _mean_ci(v) -> tuple[float, float, float]:
    return bootstrap_mean_ci(np.asarray(v, dtype=float))


def faithfulness_table(per_image: pd.DataFrame, settings: dict) -> Table:
    """Deletion / insertion AUC per method: mean [bootstrap 95% CI] over images, and n."""
    rows, data = [], []
    for m, g in per_image.groupby("method", sort=False):
        d, i = _mean_ci(g["deletion_auc"]), _mean_ci(g["insertion_auc"])
        rows.append([m.upper(), ci_cell(*d, n=int(g["deletion_auc"].notna().sum())),
                     ci_cell(*i, n=int(g["insertion_auc"].notna().sum())), len(g)])
        data.append({"method": m, "n": len(g), "deletion_auc": d[0], "deletion_auc_low": d[1],
                     "deletion_auc_high": d[2], "insertion_auc": i[0], "insertion_auc_low": i[1],
                     "insertion_auc_high": i[2]})
    st = settings
    prot = (f"Protocol: docs/evaluation.md §4, deletion / insertion (pixel flipping): {st.get('patch', '?')} px "
            f"patches in order of summed relevance, {st.get('steps', '?')} steps, removed pixels replaced by the "
            f"{st.get('baseline', 'blurred image')}; score = area under the explained logit's curve on [0, 1]; "
            f"mean [bootstrap 95% CI] over {st.get('images', '?')} images. Lower deletion / higher insertion = more faithful.")
    return Table("faithfulness", "Deletion / insertion AUC",
                 pd.DataFrame(rows, columns=["method", "deletion AUC", "insertion AUC", "n"]),
                 pd.DataFrame(data), prot)


def randomization_summary(per_image: pd.DataFrame) -> pd.DataFrame:
    """Mean Spearman and SSIM of |map| per method and randomisation step (over images)."""
    return per_image.groupby(["method", "step", "layer"], sort=False)[["spearman_abs", "ssim_abs"]].mean().reset_index()


def randomization_table(per_image: pd.DataFrame) -> Table:
    """Similarity of the map to the original one after each cascading randomisation step."""
    agg = randomization_summary(per_image)
    prot = ("Protocol: docs/evaluation.md §4, cascading model-parameter randomisation (Adebayo et al. 2018): "
            "layers re-initialised from the output down, cumulatively; Spearman rank correlation and SSIM between "
            f"|original map| and |map| after each step, mean over {per_image['image_id'].nunique()} image(s). "
            "A map that stays similar explains the image, not the model.")
    frame = pd.DataFrame([[r.method.upper(), r.step, r.layer, f"{r.spearman_abs:.3f}", f"{r.ssim_abs:.3f}"]
                          for r in agg.itertuples()],
                         columns=["method", "step", "randomised down to", "Spearman (abs map)", "SSIM (abs map)"])
    return Table("randomization", "Model-parameter randomisation", frame, agg, prot)


def summarize_intention(per_image: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
    """Per (method, class): n and, per share, its mean, CI low and high and its own n (finite values)."""
    rows = []
    for (m, c), g in per_image.groupby(["method", "class"], sort=False):
        r = {"method": m, "class": c, "n": len(g)}
        for s in SHARES:
            v = g[s].to_numpy(dtype=float)
            mean, lo, hi = bootstrap_mean_ci(v, n_boot=n_boot)
            r.update({s: mean, f"{s}_low": lo, f"{s}_high": hi, f"{s}_n": int(np.isfinite(v).sum())})
        rows.append(r)
    return pd.DataFrame(rows)


def intention_table(per_image: pd.DataFrame, finding: str = "Pneumonia", model_name: str = "") -> Table:
    """Where the positive relevance of the ``finding`` logit goes, per method and class."""
    summ = summarize_intention(per_image)
    prot = (f"Protocol: docs/evaluation.md §6 (paper Section 3, inconsistency of intention). Explained output = "
            f"the {finding} logit on every image; map resized to the original image (bilinear); shares of the positive "
            f"relevance sum(max(h,0)) inside the lesion masks/boxes, in the lungs outside them, outside the lungs, and "
            f"on the planted cue (images with a cue only); mean [bootstrap 95% CI]. Model: {model_name}.")

    def cell(r, s):
        return "–" if not math.isfinite(r[s]) else ci_cell(r[s], r[s + "_low"], r[s + "_high"], int(r[s + "_n"]))

    frame = pd.DataFrame([[r["method"].upper(), r["class"], r["n"]] + [cell(r, s) for s in SHARES]
                          for _, r in summ.iterrows()],
                         columns=["method", "class", "n", "inside lesion", "lungs outside lesion", "outside lungs",
                                  "on cue"])
    return Table("intention", "Where the positive relevance goes", frame, summ, prot)


def analysis_tables(folder: ResultsFolder) -> list[Table | TableGroup]:
    """The CheXlocalize, faithfulness, randomisation and intention tables whose per-image files are
    in ``folder``."""
    d = folder.path
    out: list[Table | TableGroup] = []
    cxl = saved_chexlocalize_tables(folder)
    if cxl is not None:
        out.append(cxl)
    if (d / FAITHFULNESS_CSV).is_file():
        fdf = pd.read_csv(d / FAITHFULNESS_CSV, dtype={"image_id": str})
        if len(fdf):
            out.append(faithfulness_table(fdf, read_settings(d / FAITHFULNESS_SETTINGS)))
    rp = d / RANDOMIZATION_CSV
    if rp.is_file() and rp.stat().st_size > 1:
        rdf = pd.read_csv(rp, dtype={"image_id": str})
        if len(rdf) and "method" in rdf.columns:
            out.append(randomization_table(rdf))
    if (d / INTENTION_CSV).is_file():
        idf = pd.read_csv(d / INTENTION_CSV, dtype={"image_id": str})
        if len(idf):
            st = read_settings(d / INTENTION_SETTINGS)
            out.append(intention_table(idf, st.get("finding", "Pneumonia"), st.get("model", "")))
    return out
