"""Attention rules (docs/rules.md §10) against independent references: dense Jacobians and loops
written from the formulas, never the rule code; and the decomposed attention ops against the
modules they replace."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dense import sdiv
import torch.nn as nn

from cxr_explain.attribution import rules as R
from cxr_explain.attribution.graph import ForwardRecord, LayerNode
from cxr_explain.attribution.rules import attention as AR

F64 = torch.float64


@pytest.fixture
def rng():
    return np.random.default_rng(0)




# ------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------


def ref_softmax(x, R):
    """The z-rule of the softmax's first-order expansion at x, from its Jacobian
    J_ij = s_i (δ_ij − s_j): R_in_j = Σ_i x_j J_ij R_i / s_i. Also the bias b = s − J x and its share."""
    s = np.exp(x - x.max())
    s /= s.sum()
    J = np.diag(s) - np.outer(s, s)
    Rin = np.array([sum(x[j] * J[i, j] * R[i] / s[i] for i in range(len(x))) for j in range(len(x))])
    b = s - J @ x
    return Rin, float((b * R / s).sum())


def ref_bilinear(a, b, R, share_a=0.5, share_b=0.5):
    """out[l, m] = Σ_d a[l, d] b[d, m]; the z-rule on each operand with the other fixed, by loops."""
    L, D = a.shape
    M = b.shape[1]
    out = a @ b
    Ra, Rb = np.zeros_like(a), np.zeros_like(b)
    for l in range(L):
        for m in range(M):
            for d in range(D):
                c = a[l, d] * b[d, m] * sdiv(R[l, m], out[l, m])
                Ra[l, d] += share_a * c
                Rb[d, m] += share_b * c
    return Ra, Rb


def ref_attention(q, k, v, bias, scale, R, cp):
    """AttnLRP (or CP-LRP) through one head, rule by rule with the references above."""
    S = scale * q @ k.T
    X = S + bias
    A = np.exp(X - X.max(1, keepdims=True))
    A /= A.sum(1, keepdims=True)
    if cp:
        _, Rv = ref_bilinear(A, v, R, 0.0, 1.0)
        return np.zeros_like(q), np.zeros_like(k), Rv
    RA, Rv = ref_bilinear(A, v, R)
    RX = np.stack([ref_softmax(X[l], RA[l])[0] for l in range(len(X))])
    RS = S * sdiv(RX, X)  # the bias keeps its own share
    Rq, RkT = ref_bilinear(scale * q, k.T, RS)
    return Rq, RkT.T, Rv


# ------------------------------------------------------------------------------------------
# The formulas
# ------------------------------------------------------------------------------------------


def test_softmax_rule_equals_the_jacobian_reference_and_loses_the_expansion_bias(rng):
    x = torch.tensor(rng.normal(size=(2, 3, 5)) * 2)
    s = torch.softmax(x, -1)
    Rout = torch.tensor(rng.normal(size=(1, 2, 3, 5)))
    ours = AR.softmax_linearised(x, s, Rout, -1)[0]
    for i in range(2):
        for j in range(3):
            ref, lost = ref_softmax(x[i, j].numpy(), Rout[0, i, j].numpy())
            np.testing.assert_allclose(ours[i, j].numpy(), ref, rtol=1e-11, atol=1e-13)
            # what the rule does not pass on is exactly the expansion bias's share
            assert abs(float(Rout[0, i, j].sum() - ours[i, j].sum()) - lost) < 1e-12
    # along another axis; a masked (−∞) logit gets nothing, and the others are what the rule gives
    # the softmax over the unmasked entries (the relevance at a masked weight is 0: its weight is)
    x2 = x.clone()
    x2[0, 0, 1] = -math.inf
    R2 = Rout.clone()
    R2[0, 0, 0, 1] = 0
    ours2 = AR.softmax_linearised(x2.transpose(1, 2), torch.softmax(x2, -1).transpose(1, 2), R2.transpose(2, 3), 1)
    assert torch.isfinite(ours2).all() and ours2[0, 0, 1, 0] == 0
    keep = [0, 2, 3, 4]
    ref, _ = ref_softmax(x2[0, 0, keep].numpy(), R2[0, 0, 0, keep].numpy())
    np.testing.assert_allclose(ours2[0, 0, keep, 0].numpy(), ref, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("shares", [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0)])
def test_matmul_rule_equals_loops_and_conserves(rng, shares):
    a = torch.tensor(rng.normal(size=(2, 4, 3)))
    b = torch.tensor(rng.normal(size=(2, 3, 5)))
    Rout = torch.tensor(rng.normal(size=(2, 2, 4, 5)))  # two targets
    ra, rb = AR.matmul_relevance(a, b, Rout, 0.0, *shares)
    for t in range(2):
        for i in range(2):
            ref_a, ref_b = ref_bilinear(a[i].numpy(), b[i].numpy(), Rout[t, i].numpy(), *shares)
            if shares[0]:
                np.testing.assert_allclose(ra[t, i].numpy(), ref_a, rtol=1e-11, atol=1e-13)
            if shares[1]:
                np.testing.assert_allclose(rb[t, i].numpy(), ref_b, rtol=1e-11, atol=1e-13)
    assert (ra is None) == (shares[0] == 0) and (rb is None) == (shares[1] == 0)
    total = sum(r.sum((2, 3)) for r in (ra, rb) if r is not None)
    np.testing.assert_allclose(total.numpy(), Rout.sum((2, 3)).numpy(), rtol=1e-10)


def test_matmul_rule_sums_broadcast_operands_back(rng):
    a = torch.tensor(rng.normal(size=(2, 3, 4, 3)))
    w = torch.tensor(rng.normal(size=(3, 5)))  # one matrix for every batch entry
    Rout = torch.tensor(rng.normal(size=(1, 2, 3, 4, 5)))
    ra, rw = AR.matmul_relevance(a, w, Rout)
    assert rw.shape == (1, 3, 5)
    ref_w = sum(ref_bilinear(a[i, h].numpy(), w.numpy(), Rout[0, i, h].numpy())[1] for i in range(2) for h in range(3))
    np.testing.assert_allclose(rw[0].numpy(), ref_w, rtol=1e-11, atol=1e-13)


def test_epsilon_stabiliser_is_the_z_plus_eps_sign_rule(rng):
    a = torch.tensor(rng.normal(size=(1, 3, 2)))
    b = torch.tensor(rng.normal(size=(1, 2, 3)))
    Rout = torch.tensor(rng.normal(size=(1, 1, 3, 3)))
    out = (a @ b)[0].numpy()
    ra, _ = AR.matmul_relevance(a, b, Rout, epsilon=0.3)
    stab = out + 0.3 * np.where(out >= 0, 1, -1)
    ref = 0.5 * a[0].numpy() * ((Rout[0, 0].numpy() / stab) @ b[0].numpy().T)
    np.testing.assert_allclose(ra[0, 0].numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("cp", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_rule_equals_the_rule_by_rule_reference(rng, cp, with_bias):
    B, H, L, d = 2, 2, 4, 3
    q, k, v = (torch.tensor(rng.normal(size=(B, H, L, d))) for _ in range(3))
    bias = torch.tensor(rng.normal(size=(1, H, L, L))) if with_bias else None
    Rout = torch.tensor(rng.normal(size=(1, B, H, L, d)))
    scale = 0.7
    rq, rk, rv, lost = AR.attention_relevance(q, k, v, Rout, scale, bias, cp=cp)
    for i in range(B):
        for h in range(H):
            bb = bias[0, h].numpy() if with_bias else np.zeros((L, L))
            ref_q, ref_k, ref_v = ref_attention(q[i, h].numpy(), k[i, h].numpy(), v[i, h].numpy(), bb, scale,
                                                Rout[0, i, h].numpy(), cp)
            np.testing.assert_allclose(rv[0, i, h].numpy(), ref_v, rtol=1e-10, atol=1e-12)
            if cp:
                assert rq is None and rk is None
            else:
                np.testing.assert_allclose(rq[0, i, h].numpy(), ref_q, rtol=1e-9, atol=1e-11)
                np.testing.assert_allclose(rk[0, i, h].numpy(), ref_k, rtol=1e-9, atol=1e-11)
    got = rv.sum((2, 3, 4)) + (0 if cp else rq.sum((2, 3, 4)) + rk.sum((2, 3, 4)))
    np.testing.assert_allclose((got + lost).numpy(), Rout.sum((2, 3, 4)).numpy(), rtol=1e-10)
    if cp:  # CP-LRP conserves: the weights are constants of a linear map of v
        assert float(lost.abs().max()) == 0
        np.testing.assert_allclose(rv.sum((2, 3, 4)).numpy(), Rout.sum((2, 3, 4)).numpy(), rtol=1e-10)


def test_cp_attention_is_gradient_times_input_with_the_weights_detached(rng):
    """An exact identity: with A constant, O = A v is linear in v, so the z-rule is v ⊙ ∂⟨R/O, O⟩/∂v."""
    q, k, v = (torch.tensor(rng.normal(size=(1, 2, 5, 3))) for _ in range(3))
    Rout = torch.tensor(rng.normal(size=(1, 1, 2, 5, 3)))
    _, _, rv, _ = AR.attention_relevance(q, k, v, Rout, 0.5, None, cp=True)
    vg = v.clone().requires_grad_(True)
    A = torch.softmax(0.5 * q @ k.transpose(-1, -2), -1).detach()
    O = A @ vg
    (g,) = torch.autograd.grad(O, vg, (Rout[0] / O).detach())
    torch.testing.assert_close(rv[0], (vg * g).detach(), rtol=1e-12, atol=1e-14)


def test_boolean_and_causal_masks_become_minus_infinity_biases():
    mask = torch.tensor([[True, False], [True, True]])
    b = AR.attention_bias(mask, False, 2, 2, F64, torch.device("cpu"))
    assert b[0, 1] == -math.inf and b[0, 0] == 0 and b[1, 1] == 0
    c = AR.attention_bias(None, True, 3, 3, F64, torch.device("cpu"))
    assert torch.equal(torch.isinf(c), torch.ones(3, 3, dtype=torch.bool).triu(1))


def test_linear_rules_run_on_token_sequences(rng):
    """A Linear on (B, L, D) is the same map on every token: the ε-rule (bias included) equals the
    rule applied token by token; the bias broadcasts along the features."""
    lin = nn.Linear(4, 3).to(F64)
    nn.init.uniform_(lin.bias, -1, 1)
    x = torch.tensor(rng.normal(size=(2, 5, 4)))
    Rout = torch.tensor(rng.normal(size=(1, 2, 5, 3)))
    rule = R.epsilon(0.1)

    def run(inp, rel):
        node = LayerNode(0, "layer", "linear", "hidden", "Linear", fx_node=None, module=lin, module_path="layer")
        with torch.no_grad():
            return rule.backward(R.Step(node, [inp], lin(inp), ForwardRecord({}, {}), 1, {}), rel)[0]

    seq = run(x, Rout)
    per_token = torch.stack([run(x[:, t], Rout[:, :, t]) for t in range(5)], 2)
    torch.testing.assert_close(seq, per_token, rtol=1e-12, atol=1e-14)
