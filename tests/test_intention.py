"""docs/evaluation.md §6: a model trained with a planted shortcut puts its relevance on the cue, a clean
model does not."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from cxr_explain.data.nih import NIHDataset
from cxr_explain.data.phantom import PhantomConfig, generate, render_phantom
from cxr_explain.evaluation.intention import intention_analysis, read_region_masks
from cxr_explain.models.zoo import ModelSpec

SIZE = 64
N_TRAIN = 160


def _config(split) -> PhantomConfig:
    # binary task: Pneumonia on half of the films; in training the cue marks exactly the pneumonia films
    return PhantomConfig(prevalence={"Pneumonia": 1.0}, p_no_finding=0.5, split=split, shortcut_p_pos=1.0,
                         shortcut_p_neg=0.0, shortcut_p_eval=1.0)


def _render(args):
    i, shortcut = args
    ph = render_phantom(i, 5, SIZE, _config((1.0, 0.0, 0.0)), shortcut)
    return ph.image, float("Pneumonia" in ph.findings), ph.cue is not None


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                      nn.ReLU(), nn.Flatten(), nn.Linear(8 * (SIZE // 4) ** 2, 1))
    m.cxr_spec = ModelSpec(arch="tiny-cnn", labels=["Pneumonia"], preprocessing="gray", input_size=SIZE)
    return m


def _train(data, epochs: int = 10, seed: int = 0) -> tuple[nn.Module, float]:
    x = torch.tensor(np.stack([d[0] for d in data]), dtype=torch.float32)[:, None] / 255
    y = torch.tensor([d[1] for d in data])
    m = _net(seed)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for k in range(0, len(x), 32):
            b = perm[k:k + 32]
            loss = nn.functional.binary_cross_entropy_with_logits(m(x[b])[:, 0], y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    with torch.no_grad():
        acc = float(((m(x)[:, 0] > 0).float() == y).float().mean())
    return m, acc


@pytest.fixture(scope="module")
def models():
    with ProcessPoolExecutor(2) as ex:
        cue = list(ex.map(_render, [(i, "marker") for i in range(N_TRAIN)], chunksize=20))
        clean = list(ex.map(_render, [(i, None) for i in range(N_TRAIN)], chunksize=20))
    assert all(c == (y > 0) for _, y, c in cue)  # the cue is perfectly predictive in training
    assert not any(c for _, _, c in clean)
    shortcut, acc_s = _train(cue)
    plain, _ = _train(clean)
    assert acc_s > 0.95  # the cue is learnt
    return shortcut, plain


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    generate(root, 40, seed=11, size=SIZE, config=_config((0.0, 0.0, 1.0)), shortcut="marker", workers=2,
             progress=False)
    return NIHDataset(root, findings=("Pneumonia",))


def test_shortcut_model_moves_relevance_onto_the_cue(models, eval_set, tmp_path):
    shortcut, plain = models
    assert len(read_region_masks(eval_set.root, "cues.csv")) == len(eval_set)  # a cue on every eval film
    methods = ("lrp", "gradient-x-input")
    a = intention_analysis(shortcut, eval_set, methods, out_dir=tmp_path)
    b = intention_analysis(plain, eval_set, methods)
    assert set(a["class"]) == {"pneumonia", "normal"} and len(a) == 2 * len(eval_set)
    shares = a[["inside_lesion", "lung_outside_lesion", "outside_lungs"]]
    finite = shares.notna().all(axis=1)  # NaN only where a map has no positive relevance at all
    assert finite.mean() > 0.9 and np.allclose(shares[finite].sum(axis=1), 1.0, atol=1e-6)
    assert (a[a["class"] == "normal"]["inside_lesion"].dropna() == 0).all()
    assert (a[a["class"] == "pneumonia"]["inside_lesion"] > 0).any()
    for m in methods:
        cue_s = a[a["method"] == m]["on_cue"].mean()
        cue_p = b[b["method"] == m]["on_cue"].mean()
        assert cue_s > cue_p, (m, cue_s, cue_p)
    md = (tmp_path / "tables" / "intention.md").read_text()
    assert "Protocol: docs/evaluation.md §6" in md and "| LRP | pneumonia |" in md
    summ = pd.read_csv(tmp_path / "tables" / "intention.csv")
    assert set(summ["class"]) == {"pneumonia", "normal"} and (summ["n"] > 0).all()


def test_split_and_max_images_select_the_images(models, tmp_path):
    _, plain = models
    generate(tmp_path, 16, seed=3, size=SIZE, config=_config((0.5, 0.0, 0.5)), shortcut="marker", workers=1,
             progress=False)
    ds = NIHDataset(tmp_path, findings=("Pneumonia",))
    split = pd.read_csv(tmp_path / "split.csv")
    test_ids = set(split.loc[split.iloc[:, 1] == "test", split.columns[0]])
    assert 0 < len(test_ids) < 16
    df = intention_analysis(plain, ds, ["lrp"], split="test")
    assert set(df["image_id"]) == test_ids
    first = intention_analysis(plain, ds, ["lrp"], split="test", max_images=2)
    assert list(first["image_id"]) == list(df["image_id"][:2])
    with pytest.raises(Exception, match="split 'val'"):
        intention_analysis(plain, ds, ["lrp"], split="val")
