"""Pure math against independent computations: AdamW update vector, loss normalisers, surrogate coefficients,
ratio influence functions."""

from __future__ import annotations

import math

import pytest
import torch

from probe_dist.estimators.delta_h1 import delta_h1_influence, surrogate_coefficients
from probe_dist.estimators.entropy import ratio_influence, se_from_influence
from probe_dist.estimators.snis import SNIS_SUM_FIELDS, log_weights, snis_finalize, snis_local_sums
from probe_dist.rollout.batch import group_advantages
from probe_dist.update.adamw import AdamWHyper, adamw_update_vector
from probe_dist.update.loss import (
    LossNormalisers,
    LossSpec,
    RowCoefficients,
    sequence_normalisers,
    update_loss,
)
from tests.tolerances import fp_bound, unit_roundoff

U64 = unit_roundoff(torch.float64)
# Torch's default isclose/allclose (rtol 1e-5, atol 1e-8) where a line below uses it: float64 values of size ≤ 10
# formed in ≤ 20 roundings err by ≤ 20·u₆₄·10 ≈ 2e-14, so the default is a loose bound (no false alarm possible),
# kept because every defect it guards (a wrong normaliser, coefficient, sign or mask) moves a value by ≥ 1e-2.


def _fd_bound(f, n: int, p: int, step: float, eps_f: float, deriv: float) -> float:
    """Error bound of the forward difference (f(1 + step·e_p) − f(1))/step against f'_p, for f of n weights at 1.

    Taylor: ½·max|f''|·step; rounding: each f value within eps_f (so 2·eps_f/step); the step: 1 + step is rounded,
    the step taken differs from `step` by ≤ u₆₄, i.e. a relative u₆₄/step on f'_p. max|f''| over [1, 1 + step] is
    measured by a central second difference at H = 1e-3 (plus its own rounding 4·eps_f/H²), doubled for its
    variation and the difference's O(H²) truncation.
    """
    big = 1e-3
    w_hi, w_lo = torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    w_hi[p] += big
    w_lo[p] -= big
    f0 = f(torch.ones(n, dtype=torch.float64))
    curvature = abs(f(w_hi) - 2 * f0 + f(w_lo)) / big**2 + 4 * eps_f / big**2
    return 0.5 * (2 * curvature) * step + 2 * eps_f / step + U64 / step * abs(deriv)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("step", [1, 7])
def test_update_vector_is_one_real_adamw_step(amsgrad, weight_decay, step):
    """θ + ηu equals torch.optim.AdamW(lr=η).step() from the same state (float64: exact up to rounding)."""
    gen = torch.Generator().manual_seed(step)
    theta = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    grad = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    m = torch.randn(5, 3, generator=gen, dtype=torch.float64) * 0.1
    v = torch.rand(5, 3, generator=gen, dtype=torch.float64) * 0.01
    v_max = v + torch.rand(5, 3, generator=gen, dtype=torch.float64) * 0.01
    hp = AdamWHyper(betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay, amsgrad=amsgrad)
    parts = adamw_update_vector(theta, grad, m, v, step=float(step), hp=hp,
                                max_exp_avg_sq=v_max if amsgrad else None)
    for eta in (1e-6, 1e-3, 0.5):
        p = torch.nn.Parameter(theta.clone())
        opt = torch.optim.AdamW([p], lr=eta, betas=hp.betas, eps=hp.eps, weight_decay=weight_decay, amsgrad=amsgrad)
        opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
        if amsgrad:
            opt.state[p]["max_exp_avg_sq"] = v_max.clone()
        p.grad = grad.clone()
        opt.step()
        # tol: fp float64: torch rounds θ' = θ(1 − η·wd) − η·m̂/denom at the size of θ (≤ 3 roundings of size |θ|,
        # tol: fp |θ'|, and θ' − θ is one more), our η·u carries ≤ 8 relative roundings (bias corrections, sqrt,
        # tol: fp division): |Δ| ≤ 4u(|θ| + |θ'|) + fp_bound(8, |ηu|) elementwise. An ε inside instead of outside the
        # tol: fp sqrt or a missing bias correction moves η·u by ≥ 1e-7 relative, ≥ 1e-13 absolute: ≫ 1.3e-15.
        bound = 4 * U64 * (theta.abs() + p.detach().abs()) + fp_bound(torch.float64, 8, 1.0) * (eta * parts.u).abs()
        assert bool(((p.detach() - theta) - eta * parts.u).abs().le(bound).all())
    # u splits into the part that does not depend on g and the linear gradient map.
    # tol: fp float64, one product and one sum per element: ≤ fp_bound(4, |u_base| + |coef·g|); a missing term is O(1)
    split_bound = fp_bound(torch.float64, 4, 1.0) * (parts.u_base.abs() + (parts.grad_coef * grad).abs())
    assert bool((parts.u - (parts.u_base + parts.grad_coef * grad)).abs().le(split_bound).all())


def test_loss_normalisers_follow_the_spec():
    lengths = torch.tensor([3, 1, 2, 5])
    norm = LossNormalisers(num_prompts=2, group_size=2, total_tokens=11.0, max_len=6)
    assert torch.allclose(sequence_normalisers("grpo", lengths, norm), 1.0 / (4 * lengths.double()))
    assert torch.allclose(sequence_normalisers("dr_grpo", lengths, norm), torch.full((4,), 1.0 / (2 * 2 * 6.0),
                                                                                         dtype=torch.float64))
    assert torch.allclose(sequence_normalisers("dapo", lengths, norm), torch.full((4,), 1 / 11.0, dtype=torch.float64))
    assert torch.equal(sequence_normalisers("cispo", lengths, norm), sequence_normalisers("dapo", lengths, norm))
    # bnpo: token mean per block of 2 rows (rows 0-1: 4 tokens, rows 2-3: 7), mean over the 2 blocks.
    blocks = LossNormalisers(num_prompts=2, group_size=2, total_tokens=11.0, max_len=6, block_rows=2,
                             block_tokens=(4.0, 7.0))
    for p in (0, 1):
        got = sequence_normalisers("bnpo", lengths[2 * p:2 * p + 2], blocks, prompt_index=p)
        assert torch.allclose(got, torch.full((2,), 1.0 / (2 * (4.0, 7.0)[p]), dtype=torch.float64))
    # A masked (truncated) response gets n_i = 0; the counts come from the caller (kept tokens only).
    kept = torch.tensor([True, False, True, True])
    assert sequence_normalisers("grpo", lengths, norm, kept=kept)[1] == 0.0
    with pytest.raises(ValueError, match="unknown loss family"):
        sequence_normalisers("ppo", lengths, norm)


def test_loss_adds_up_over_microbatches_and_matches_a_direct_formula():
    """Σ over any microbatch split = the batch loss; grpo = mean over sequences of −A·(token mean of ℓ)."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([2, 4, 1, 3])
    row = torch.repeat_interleave(torch.arange(4), lengths)
    logp = -torch.rand(int(lengths.sum()), generator=gen, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75], dtype=torch.float64)
    norm = LossNormalisers(num_prompts=2, group_size=2, total_tokens=float(lengths.sum()), max_len=4)
    n = sequence_normalisers("grpo", lengths, norm)
    rows = RowCoefficients(n, torch.full((4,), -math.inf), torch.zeros(4, dtype=torch.float64))
    spec = LossSpec(family="grpo")
    whole = update_loss(logp, None, row, adv, rows, spec)
    direct = sum(-adv[i] * logp[row == i].mean() for i in range(4)) / 4
    # tol: fp float64, a sum of 10 token terms −A·n·ℓ (a few roundings each) both ways: fp_bound(16, Σ|A·n·ℓ|) with
    # tol: fp the term sizes measured (≈ 3e-15 on a loss of 0.057); a wrong normaliser or sign is ≫ that.
    loss_bound = fp_bound(torch.float64, 16, float((adv[row].abs() * n[row] * logp.abs()).sum()))
    assert abs(float(whole - direct)) <= loss_bound
    first = int(lengths[:2].sum())
    split = update_loss(logp[:first], None, row[:first], adv[:2], rows[:2], spec) + \
        update_loss(logp[first:], None, row[first:] - 2, adv[2:], rows[2:], spec)
    assert abs(float(whole - split)) <= loss_bound  # tol: fp same terms summed in two pieces: bound above
    # KL term: k3 is zero when the policy equals the reference, positive otherwise.
    kl = LossSpec(family="grpo", kl_coef=0.1)
    assert torch.isclose(update_loss(logp, None, row, adv, rows, kl, token_ref_logp=logp), whole)
    assert update_loss(logp, None, row, adv, rows, kl, token_ref_logp=logp - 0.3) > whole
    # cispo at ratio 1: the policy term scaled by min(1, ε_high); the bias-corrected KL has the same value.
    cispo = LossSpec(family="cispo", epsilon_high=0.2)
    assert torch.isclose(update_loss(logp, None, row, adv, rows, cispo), 0.2 * whole)
    corrected = LossSpec(family="grpo", kl_coef=0.1, kl_bias_correction=True)
    assert torch.isclose(update_loss(logp, None, row, adv, rows, corrected, token_ref_logp=logp - 0.3),
                         update_loss(logp, None, row, adv, rows, kl, token_ref_logp=logp - 0.3))


def test_entropy_mask_and_bonus_act_per_token():
    """top_entropy_quantile keeps the policy term only where H ≥ the row's threshold; the bonus subtracts o_i·H there."""
    logp = torch.tensor([-0.5, -1.0, -2.0], dtype=torch.float64, requires_grad=True)
    h = torch.tensor([0.1, 0.9, 0.5], dtype=torch.float64, requires_grad=True)
    row = torch.zeros(3, dtype=torch.long)
    adv = torch.tensor([2.0], dtype=torch.float64)
    rows = RowCoefficients(torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.5]),
                           torch.tensor([0.25], dtype=torch.float64))
    loss = update_loss(logp, h, row, adv, rows, LossSpec(family="grpo", top_entropy_quantile=0.5, entropy_coef=1.0))
    expected = 0.5 * (-2.0) * (-1.0 + -2.0) - 0.25 * (0.9 + 0.5)  # tokens 1 and 2 pass H ≥ 0.5
    assert torch.isclose(loss, torch.tensor(expected, dtype=torch.float64))
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([0.0, -1.0, -1.0], dtype=torch.float64))
    assert torch.allclose(h.grad, torch.tensor([0.0, -0.25, -0.25], dtype=torch.float64))


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(group_advantages(r, "none", 1e-6), r - 0.5)
    a = group_advantages(r, "group", 1e-6)
    assert torch.allclose(a, (r - 0.5) / (r.std() + 1e-6))
    assert torch.equal(group_advantages(torch.ones(4, dtype=torch.float64), "group", 1e-6), torch.zeros(4, dtype=torch.float64))


def test_causal_coefficients_match_brute_force():
    """Entropy-to-go with baseline H_t and tokens-to-go, row by row in a flat layout."""
    gen = torch.Generator().manual_seed(1)
    lengths = [3, 1, 4]
    row = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    h = torch.rand(int(sum(lengths)), generator=gen, dtype=torch.float64)
    a, b = surrogate_coefficients(h, h, row, num_rows=3, entropy=0.7, method="causal_rb", normalize="per_token")
    k = 0
    for t_len in lengths:
        seg = h[k:k + t_len]
        for t in range(t_len):
            after = float(seg[t + 1:].sum())
            assert torch.isclose(a[k + t], torch.tensor(after - 0.7 * (t_len - 1 - t), dtype=torch.float64))
            assert b[k + t] == t_len - 1 - t
        k += t_len
    a_s, b_s = surrogate_coefficients(h, h, row, num_rows=3, entropy=0.7, method="snis_derivative",
                                      normalize="per_token")
    h_row = torch.zeros(3, dtype=torch.float64).index_add(0, row, h)
    assert torch.allclose(a_s, (h_row - 0.7 * torch.tensor(lengths, dtype=torch.float64))[row])
    assert torch.equal(b_s, torch.tensor(lengths, dtype=torch.float64)[row])


def _ratio(h, lam):
    return h.sum() / lam.sum()


def test_ratio_influence_matches_numerical_jackknife_direction():
    """c_p is the derivative of Ĥ = Σh/Σλ w.r.t. group p's weight: check by a finite weight perturbation."""
    gen = torch.Generator().manual_seed(2)
    h, lam = torch.rand(6, generator=gen, dtype=torch.float64), 1 + torch.rand(6, generator=gen, dtype=torch.float64)
    est = float(_ratio(h, lam))
    c = ratio_influence(h, lam, est, float(lam.sum()))
    # tol: fp Σc_p = 0 analytically; c_p = (h_p − Ĥλ_p)/Σλ has terms of size (|h_p| + Ĥλ_p)/Σλ, Ĥ carries ≤ 13
    # tol: fp roundings: |Σc| ≤ fp_bound(16, 2Σh/Σλ) ≈ 7e-15. A c_p with the wrong Ĥ or normaliser sums to ≥ 1e-3.
    assert abs(float(c.sum())) <= fp_bound(torch.float64, 16, 2 * float(h.sum() / lam.sum()))
    eps_f = fp_bound(torch.float64, 16, est)  # Σwh/Σwλ of positive terms: ≤ 13 roundings relative to Ĥ
    step = 1e-7
    for p in range(6):
        w = torch.ones(6, dtype=torch.float64)
        w[p] += step
        fd = (float(_ratio(w * h, w * lam)) - est) / step
        # tol: fp forward-difference error model of _fd_bound (Taylor + rounding, curvature measured): ≈ 6e-8 here,
        # tol: fp |c_p| ≈ 5e-3 … 6e-2, so a wrong sign, a factor 2 or a missing Ĥλ_p term is ≫ the bound.
        bound = _fd_bound(lambda v: float(_ratio(v * h, v * lam)), 6, p, step, eps_f, float(c[p]))
        assert abs(fd - float(c[p])) <= bound, (p, fd, float(c[p]), bound)
    assert se_from_influence(float((c * c).sum()), 1) != se_from_influence(float((c * c).sum()), 1)  # NaN for n<2


def test_delta_h1_influence_is_the_derivative_of_the_ratio_formula():
    """f = (Σa − Ĥ Σb)/Σλ with Ĥ = Σh/Σλ: c_p equals ∂f/∂(weight of group p)."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    h, lam = torch.rand(5, generator=gen, dtype=torch.float64), 1 + torch.rand(5, generator=gen, dtype=torch.float64)

    def f(w):
        hbar = (w * h).sum() / (w * lam).sum()
        return float(((w * a).sum() - hbar * (w * b).sum()) / (w * lam).sum())

    ones = torch.ones(5, dtype=torch.float64)
    value, sum_lam, hbar, sum_b = f(ones), float(lam.sum()), float(h.sum() / lam.sum()), float(b.sum())
    q = (a - hbar * b) / sum_lam  # what ∇surrogate₁·u gives per group
    c = delta_h1_influence(q, lam, h, value=value, sum_lam=sum_lam, entropy=hbar, sum_b=sum_b)
    # f = (Σwa − ĥ(w)Σwb)/Σwλ: ≤ 3·5 + 6 roundings relative to its term sizes (Σ|a| + ĥΣ|b|)/Σλ.
    f_scale = float((a.abs().sum() + hbar * b.abs().sum()) / lam.sum())
    eps_f = fp_bound(torch.float64, 24, f_scale)
    step = 1e-7
    for p in range(5):
        w = ones.clone()
        w[p] += step
        # tol: fp forward-difference error model of _fd_bound (Taylor + rounding, curvature measured), ≈ 1.2e-7 here,
        # tol: fp against |c_p| ≈ 7e-3 … 0.17: a dropped term of c_p (λ_p·δH₁/η, or the Ĥ-term) is ≫ the bound.
        bound = _fd_bound(f, 5, p, step, eps_f, float(c[p]))
        assert abs((f(w) - value) / step - float(c[p])) <= bound, (p, bound)
    # tol: fp Σc_p = 0 analytically; terms of size |q_p| + |value|λ_p/Σλ + |Σb|/Σλ²·(h_p + ĥλ_p), ≤ 24 roundings
    c_scale = float((q.abs() + abs(value) * lam / sum_lam + abs(sum_b) / sum_lam**2 * (h + hbar * lam)).sum())
    assert abs(float(c.sum())) <= fp_bound(torch.float64, 24, c_scale)


def test_snis_sums_and_finalize():
    logp_old = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
    logp_new = logp_old + torch.tensor([0.1, -0.2, 0.05, 0.3], dtype=torch.float64)
    h_new = torch.tensor([0.4, 1.1, 0.2, 2.0], dtype=torch.float64)
    lam = torch.tensor([1.0, 2.0, 1.0, 3.0], dtype=torch.float64)
    lw = log_weights(logp_new, logp_old)
    sums = snis_local_sums(lw, float(lw.max()), h_new, lam)
    assert len(sums) == len(SNIS_SUM_FIELDS)
    res = snis_finalize(sums, entropy=0.5)
    w = torch.exp(lw)
    # tol: fp float64, 4 sequences: ratios of sums of ≤ 4 positive terms, the weights exp(log w − max) vs exp(log w)
    # tol: fp (≤ 3 roundings each): ≤ 16 roundings relative to the value on either side, fp_bound(16, |value|)
    # tol: fp ≈ 7e-15·|value|; kl_k1's terms have sizes |log w|. A wrong normaliser/weight moves any of them ≥ 1 %.
    def close(x: float, y: float, scale: float) -> bool:
        return abs(x - y) <= 2 * fp_bound(torch.float64, 16, scale)  # 2: both sides carry the rounding

    assert close(res.entropy_new, float((w * h_new).sum() / (w * lam).sum()), res.entropy_new)
    assert close(res.ess, float(w.sum() ** 2 / (w * w).sum()), res.ess)
    assert close(res.max_weight, float(w.max() / w.sum()), res.max_weight)
    assert close(res.kl_k1, float((-lw).mean()), float(lw.abs().mean()))
    # Stabilising by any global max leaves the estimates unchanged (only the scale of w).
    res2 = snis_finalize(snis_local_sums(lw, float(lw.max()) + 5.0, h_new, lam), entropy=0.5)
    assert close(res2.entropy_new, res.entropy_new, res.entropy_new) and close(res2.ess, res.ess, res.ess)
