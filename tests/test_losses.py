"""Each loss term against a value computed by hand on a tiny tensor (worked out in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import ce_loss, combined_loss, kl_consistency, supcon_nce


def test_ce_by_hand():
    # logits [2,0] label 0: -log(e^2/(e^2+1)) = log(1+e^-2); logits [0,1] label 1: log(1+e^-1)
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2  # 0.220095
    got = ce_loss(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.220095, abs=1e-6)


def test_ce_label_smoothing_by_hand():
    # smoothing 0.2 over 2 classes: target [0.9, 0.1] for label 0; logits [2,0]: p = [e²/(e²+1), 1/(e²+1)]
    p0, p1 = math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)
    expected = -(0.9 * math.log(p0) + 0.1 * math.log(p1))
    got = ce_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), label_smoothing=0.2)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_kl_by_hand():
    # weak [0,0] → p = [.5,.5]; strong [1,0] → q = [e/(1+e), 1/(1+e)] = [0.731059, 0.268941]
    # KL(p‖q) = .5·ln(.5/.731059) + .5·ln(.5/.268941) = 0.120115
    q0, q1 = math.e / (1 + math.e), 1 / (1 + math.e)
    expected = 0.5 * math.log(0.5 / q0) + 0.5 * math.log(0.5 / q1)
    got = kl_consistency(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.120115, abs=1e-6)
    # T = 2: q = softmax([.5, 0]); the term is scaled by T² = 4
    r0, r1 = math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)
    expected_t2 = 4 * (0.5 * math.log(0.5 / r0) + 0.5 * math.log(0.5 / r1))  # 0.123640
    got_t2 = kl_consistency(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]), temperature=2.0)
    assert got_t2.item() == pytest.approx(expected_t2, abs=1e-6)


def test_kl_gradient_flows_only_into_the_strong_view():
    weak = torch.tensor([[0.3, -0.2]], requires_grad=True)
    strong = torch.tensor([[1.0, 0.0]], requires_grad=True)
    kl_consistency(weak, strong).backward()
    assert weak.grad is None or torch.all(weak.grad == 0)
    assert strong.grad is not None and strong.grad.abs().sum() > 0


def test_supcon_by_hand():
    # z1=[1,0] (real), z2=[.6,.8] (real), z3=[0,1] (fake); τ = 1; cosine sims s12=.6, s13=0, s23=.8
    # anchor 1: positive 2; −(s12 − ln(e^s12 + e^s13)) = ln(e^.6 + 1) − .6 = 0.437488
    # anchor 2: positive 1; −(s12 − ln(e^s12 + e^s23)) = ln(e^.6 + e^.8) − .6 = 0.798138
    # anchor 3: no positive → not counted. Mean = 0.617813
    a1 = math.log(math.exp(0.6) + 1) - 0.6
    a2 = math.log(math.exp(0.6) + math.exp(0.8)) - 0.6
    expected = (a1 + a2) / 2
    feats = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    got = supcon_nce(feats * 3.0, torch.tensor([0, 0, 1]), temperature=1.0)  # scale must not matter (L2-normalised)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.617813, abs=1e-6)


def test_supcon_with_no_positive_pairs_is_zero():
    assert supcon_nce(torch.randn(2, 4), torch.tensor([0, 1])).item() == 0.0


def test_combined_weights_the_terms():
    torch.manual_seed(0)
    lw, ls = torch.randn(4, 2), torch.randn(4, 2)
    pw, ps = torch.randn(4, 8), torch.randn(4, 8)
    y = torch.tensor([0, 1, 0, 1])
    parts = combined_loss(lw, ls, pw, ps, y, w_ce=1.0, w_kl=0.5, w_nce=0.1)
    ce = 0.5 * (ce_loss(lw, y) + ce_loss(ls, y))
    assert parts.ce.item() == pytest.approx(ce.item(), abs=1e-6)
    assert parts.kl.item() == pytest.approx(kl_consistency(lw, ls).item(), abs=1e-6)
    assert parts.nce.item() == pytest.approx(supcon_nce(torch.cat([pw, ps]), torch.cat([y, y])).item(), abs=1e-6)
    assert parts.total.item() == pytest.approx(parts.ce.item() + 0.5 * parts.kl.item() + 0.1 * parts.nce.item(),
                                               abs=1e-6)
