"""Chunked ℓ and H (probe_dist/scoring/chunked.py) with masked (−inf) logits and the model's logit post-processing."""

from __future__ import annotations

import torch

from probe_dist.model.logits import LogitTransform, logit_transform
from probe_dist.scoring.chunked import chunked_logp_entropy, logp_entropy_from_logits


def test_minus_inf_logits_give_finite_entropy_of_the_unmasked_distribution():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 11, generator=gen, dtype=torch.float64)
    masked = z.clone()
    masked[:, 3] = -torch.inf
    masked[2, 7:] = -torch.inf
    targets = torch.tensor([0, 1, 2, 4, 5])
    for tau in (1.0, 0.7):
        logp, ent = logp_entropy_from_logits(masked.float(), targets, tau)
        # Independent: the distribution over the unmasked tokens only, in float64.
        for row in range(5):
            keep = torch.isfinite(masked[row])
            p = torch.softmax(masked[row][keep] / tau, dim=0)
            assert torch.isfinite(ent[row])
            assert abs(float(ent[row]) - float(-(p * p.log()).sum())) < 1e-5
            lp = torch.log_softmax(masked[row][keep] / tau, dim=0)
            assert abs(float(logp[row]) - float(lp[int(keep[: targets[row]].sum())])) < 1e-5


def test_minus_inf_logits_have_finite_gradients():
    x = torch.randn(3, 6, dtype=torch.float32)
    w = torch.randn(6, 6, requires_grad=True)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[:, 0] = True  # token 0 masked out (e.g. a vocabulary mask)
    logits = (x @ w).masked_fill(mask, -torch.inf)
    logp, ent = logp_entropy_from_logits(logits, torch.tensor([1, 2, 3]), 1.0)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(w.grad).all()


def test_logit_transform_from_config_and_applied_per_chunk():
    class Cfg:
        final_logit_softcapping = 30.0

    cap = logit_transform(Cfg())
    assert cap == LogitTransform(softcap=30.0)
    z = torch.tensor([[-90.0, 0.0, 54.0]])
    assert torch.allclose(cap(z), 30.0 * torch.tanh(z / 30.0))
    assert float(cap(z).abs().max()) < 30.0
    assert logit_transform(type("Plain", (), {})()).is_identity

    class Cohere:
        logit_scale = 0.0625

    assert torch.equal(logit_transform(Cohere())(z), z * 0.0625)

    head = torch.nn.Linear(4, 9, bias=False)
    with torch.no_grad():
        head.weight.mul_(40.0)  # raw logits well beyond the cap
    hidden, targets = torch.randn(7, 4), torch.randint(0, 9, (7,))
    logp, ent = chunked_logp_entropy(head, hidden, targets, temperature=0.8, chunk=3, transform=cap)
    ref_logp, ref_ent = logp_entropy_from_logits(cap(head(hidden)), targets, 0.8)
    assert torch.allclose(logp, ref_logp, rtol=1e-6, atol=1e-6) and torch.allclose(ent, ref_ent, rtol=1e-6, atol=1e-6)
    raw_logp, _ = chunked_logp_entropy(head, hidden, targets, temperature=0.8, chunk=3)
    assert not torch.allclose(raw_logp, logp)  # the cap matters at these logits


def test_closed_form_tangents_match_forward_mode_through_every_pass():
    """`analytic_first_order`'s closed-form ℓ̇, Ḣ equal jvp through the op-by-op formulas (float64, masked logits,
    τ ≠ 1) and a central finite difference; its primal values are the no-grad scorer's bit for bit."""
    from torch.func import jvp

    from probe_dist.scoring.chunked import analytic_first_order

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 40, generator=gen, dtype=torch.float64) * 4
    x[1, 7] = x[4, :5] = -torch.inf
    dx = torch.randn(9, 40, generator=gen, dtype=torch.float64)
    dx[1, 7] = 0.0
    dx[4, :5] = 0.0
    targets = torch.arange(9) * 3 + 8  # none masked

    def f(a):
        return logp_entropy_from_logits(a, targets, 0.7)

    with torch.no_grad():
        (lp, h), (dlp, dh) = jvp(f, (x,), (dx,))
        with analytic_first_order():
            (lp1, h1), (dlp1, dh1) = jvp(f, (x,), (dx,))
        eps = 1e-6
        plus, minus = f(x + eps * dx), f(x - eps * dx)
    assert torch.equal(lp, lp1) and torch.equal(h, h1)
    assert torch.allclose(dlp1, dlp, atol=1e-12, rtol=1e-10) and torch.allclose(dh1, dh, atol=1e-12, rtol=1e-10)
    assert torch.allclose(dlp1, (plus[0] - minus[0]) / (2 * eps), atol=1e-7)
    assert torch.allclose(dh1, (plus[1] - minus[1]) / (2 * eps), atol=1e-7)
    assert float(dh1.abs().max()) > 1e-2  # a direction that moves H
