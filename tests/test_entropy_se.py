"""Pins the delta-method standard errors of Ĥ(θ) and ΔH_true to hand computations (docs/method.md §3, §6, §9).

Statistical tests (coverage of a confidence interval over many seeds) cannot see an SE that is off by a
constant factor such as n/(n−1) = 1.25 at n = 5, nor one that uses sequences instead of prompt groups as the
sampling unit when the two give similar numbers. These tests compare the estimators on fixed small inputs with
an independent computation in plain Python floats:

    Ĥ = Σh/Σλ,   c_p = (h_p − Ĥ λ_p)/Σλ   with group totals h_p, λ_p,   SE² = n/(n−1)·Σ_p c_p²,

n = number of prompt GROUPS (the i.i.d. unit), and for SNIS (w_i = e^{log w_i}, Ĥ' = Σ w h'/Σ w λ)

    c_p = Σ_{i∈p} [ w_i (h'_i − Ĥ' λ_i)/Σwλ − (h_i − Ĥ λ_i)/Σλ ].

The unit question (groups vs sequences) is pinned at the function level: the same sequences grouped
differently must give different SEs, each the hand formula with n = number of groups.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from probe_dist.estimators.entropy import normaliser_lengths, ratio_influence, se_from_influence
from probe_dist.estimators.snis import snis_delta_influence

REL = 1e-12

# Five prompt groups of unequal size: per-sequence h_i (Σ_t H_{i,t}) and T_i.
H_SEQ = [[2.0, 3.5, 1.25], [4.0, 0.5], [1.0, 2.0, 3.0, 6.5], [5.25], [0.75, 2.5]]
T_SEQ = [[4, 6, 2], [7, 1], [2, 3, 5, 9], [8], [1, 4]]


# ---------------------------------------------------------------------------------------------- hand formulas
def hand_ratio_se(h_groups: list[list[float]], lam_groups: list[list[float]]) -> tuple[float, float]:
    """(Ĥ, SE) with plain floats: group totals, c_p, SE² = n/(n−1)·Σc_p², n = number of groups."""
    h_tot = [sum(g) for g in h_groups]
    lam_tot = [sum(g) for g in lam_groups]
    sum_h, sum_lam = sum(h_tot), sum(lam_tot)
    est = sum_h / sum_lam
    n = len(h_tot)
    sum_sq = 0.0
    for hp, lp in zip(h_tot, lam_tot):
        c = (hp - est * lp) / sum_lam
        sum_sq += c * c
    return est, math.sqrt(n / (n - 1) * sum_sq)


def hand_snis(lw: list[list[float]], h_new: list[list[float]], h_old: list[list[float]],
              lam: list[list[float]]) -> tuple[float, list[float], float]:
    """(ΔH_true, per-group c_p, SE) with plain floats and unstabilised weights w = exp(log w)."""
    w = [[math.exp(x) for x in g] for g in lw]
    sum_lam = sum(sum(g) for g in lam)
    sum_w_lam = sum(wi * li for wg, lg in zip(w, lam) for wi, li in zip(wg, lg))
    h0 = sum(sum(g) for g in h_old) / sum_lam
    h1 = sum(wi * hi for wg, hg in zip(w, h_new) for wi, hi in zip(wg, hg)) / sum_w_lam
    c = []
    for wg, hng, hog, lg in zip(w, h_new, h_old, lam):
        cp = 0.0
        for wi, hn, ho, li in zip(wg, hng, hog, lg):
            cp += wi * (hn - h1 * li) / sum_w_lam - (ho - h0 * li) / sum_lam
        c.append(cp)
    n = len(c)
    return h1 - h0, c, math.sqrt(n / (n - 1) * sum(x * x for x in c))


# ---------------------------------------------------------------------------------------------- module path
def module_ratio_se(h_groups: list[list[float]], lam_groups: list[list[float]]) -> tuple[float, float]:
    """(Ĥ, SE) through ratio_influence + se_from_influence on group totals."""
    h = torch.tensor([sum(g) for g in h_groups], dtype=torch.float64)
    lam = torch.tensor([sum(g) for g in lam_groups], dtype=torch.float64)
    sum_lam = float(lam.sum())
    est = float(h.sum()) / sum_lam
    c = ratio_influence(h, lam, est, sum_lam)
    return est, se_from_influence(float((c * c).sum()), len(h_groups))


def _regroup(flat: list, sizes: list[int]) -> list[list]:
    out, k = [], 0
    for s in sizes:
        out.append(flat[k:k + s])
        k += s
    assert k == len(flat)
    return out


@pytest.mark.parametrize("normalize", ["per_token", "per_sequence"])
def test_ratio_se_matches_hand_formula_on_five_groups(normalize: str) -> None:
    lam_seq = [[float(t) if normalize == "per_token" else 1.0 for t in g] for g in T_SEQ]
    # λ as the module builds it from the lengths.
    for g_t, g_lam in zip(T_SEQ, lam_seq):
        assert normaliser_lengths(torch.tensor(g_t), normalize).tolist() == g_lam
    est_ref, se_ref = hand_ratio_se(H_SEQ, lam_seq)
    est, se = module_ratio_se(H_SEQ, lam_seq)
    assert est == pytest.approx(est_ref, rel=REL)
    assert se == pytest.approx(se_ref, rel=REL)
    # The influences themselves, and their zero sum.
    h = torch.tensor([sum(g) for g in H_SEQ], dtype=torch.float64)
    lam = torch.tensor([sum(g) for g in lam_seq], dtype=torch.float64)
    c = ratio_influence(h, lam, est, float(lam.sum()))
    for cp, hp, lp in zip(c.tolist(), h.tolist(), lam.tolist()):
        assert cp == pytest.approx((hp - est_ref * lp) / float(lam.sum()), rel=REL, abs=1e-15)
    assert abs(float(c.sum())) < 1e-14


def test_ratio_se_closed_form_three_groups_includes_small_sample_factor() -> None:
    """h = (1, 2, 3), λ = 1: Ĥ = 2, c = (−1, 0, 1)/3, SE² = 3/2 · 2/9 = 1/3 exactly.

    Without n/(n−1) = 1.5 the SE would be sqrt(2)/3 ≈ 0.471 instead of 1/sqrt(3) ≈ 0.577.
    """
    est, se = module_ratio_se([[1.0], [2.0], [3.0]], [[1.0], [1.0], [1.0]])
    assert est == 2.0
    assert se == pytest.approx(1.0 / math.sqrt(3.0), rel=REL)
    assert abs(se - math.sqrt(2.0) / 3.0) > 0.1


def test_se_from_influence_small_sample_factor_and_nan() -> None:
    assert se_from_influence(2.0 / 9.0, 3) == pytest.approx(math.sqrt(1.5 * 2.0 / 9.0), rel=REL)
    assert se_from_influence(0.8, 2) == pytest.approx(math.sqrt(1.6), rel=REL)
    assert se_from_influence(1.0, 101) == pytest.approx(math.sqrt(101 / 100), rel=REL)
    assert se_from_influence(0.0, 5) == 0.0
    assert math.isnan(se_from_influence(1.0, 1))
    assert math.isnan(se_from_influence(1.0, 0))


def test_ratio_se_with_equal_group_normalisers_is_the_standard_error_of_the_mean() -> None:
    """λ_p ≡ L: c_p = (h_p − h̄)/(nL), so SE = stdev(h_p)/(L·sqrt(n)) with the n−1 sample standard deviation."""
    h_tot = [3.0, 7.5, 1.25, 4.0, 9.0, 2.5, 6.0]
    length = 4.0
    n = len(h_tot)
    # Each group: two sequences of λ = 2 whose h split the group total unevenly (grouping must not matter here).
    h_groups = [[0.3 * x, 0.7 * x] for x in h_tot]
    lam_groups = [[2.0, 2.0] for _ in h_tot]
    est, se = module_ratio_se(h_groups, lam_groups)
    assert est == pytest.approx(statistics.fmean(h_tot) / length, rel=REL)
    assert se == pytest.approx(statistics.stdev(h_tot) / (length * math.sqrt(n)), rel=REL)


def test_ratio_se_unit_is_the_prompt_group_not_the_sequence() -> None:
    """The same six sequences grouped three ways: same Ĥ, three different SEs, each the hand formula with n = #groups."""
    h_flat = [2.0, 3.5, 1.25, 4.0, 0.5, 6.5]
    t_flat = [4.0, 6.0, 2.0, 7.0, 1.0, 9.0]
    results = []
    for sizes in ([2, 2, 2], [3, 3], [1, 1, 1, 1, 1, 1]):
        hg, lg = _regroup(h_flat, sizes), _regroup(t_flat, sizes)
        est_ref, se_ref = hand_ratio_se(hg, lg)
        est, se = module_ratio_se(hg, lg)
        assert est == pytest.approx(est_ref, rel=REL)
        assert se == pytest.approx(se_ref, rel=REL)
        results.append((est, se))
    ests = [r[0] for r in results]
    ses = [r[1] for r in results]
    assert max(ests) - min(ests) < 1e-14
    for i in range(len(ses)):
        for j in range(i + 1, len(ses)):
            assert abs(ses[i] - ses[j]) > 1e-3 * max(ses), ses


# ---------------------------------------------------------------------------------------------- SNIS ΔH_true
# Four prompt groups: log-weights, payloads at θ' and θ, and λ = T (per-token).
LW = [[0.3, -0.2, 0.05], [0.8, -1.1], [0.0, 0.4, -0.3, 0.15], [-0.6]]
H_NEW = [[2.1, 3.3, 1.4], [4.2, 0.4], [1.1, 2.2, 2.9, 6.1], [5.0]]
H_OLD = [[2.0, 3.5, 1.25], [4.0, 0.5], [1.0, 2.0, 3.0, 6.5], [5.25]]
T_SNIS = [[4.0, 6.0, 2.0], [7.0, 1.0], [2.0, 3.0, 5.0, 9.0], [8.0]]


def _flat(groups: list[list[float]]) -> torch.Tensor:
    return torch.tensor([x for g in groups for x in g], dtype=torch.float64)


def test_snis_delta_influence_and_se_match_hand_formula() -> None:
    delta_ref, c_ref, se_ref = hand_snis(LW, H_NEW, H_OLD, T_SNIS)
    lw, h_new, h_old, lam = _flat(LW), _flat(H_NEW), _flat(H_OLD), _flat(T_SNIS)
    group_ids = torch.tensor([p for p, g in enumerate(LW) for _ in g])
    # Stabilised weights exactly as the probe passes them (the SE is invariant to the weights' scale).
    w = torch.exp(lw - lw.max())
    sum_lam, sum_w_lam = float(lam.sum()), float((w * lam).sum())
    h0 = float(h_old.sum()) / sum_lam
    h1 = float((w * h_new).sum()) / sum_w_lam
    assert h1 - h0 == pytest.approx(delta_ref, rel=REL)
    c = snis_delta_influence(w, h_new, h_old, lam, group_ids=group_ids, num_groups=len(LW), entropy_new=h1,
                             entropy=h0, sum_w_lam=sum_w_lam, sum_lam=sum_lam)
    assert c.shape == (len(LW),)
    assert c.tolist() == pytest.approx(c_ref, rel=1e-11, abs=1e-15)
    assert abs(float(c.sum())) < 1e-14  # both linearisations sum to zero
    se = se_from_influence(float((c * c).sum()), len(LW))
    assert se == pytest.approx(se_ref, rel=1e-11)
    # One call per group with num_groups = 1 (how a rank accumulates Σc_p² over its own groups): same SE.
    sum_sq, start = 0.0, 0
    for g in LW:
        sl = slice(start, start + len(g))
        cg = snis_delta_influence(w[sl], h_new[sl], h_old[sl], lam[sl],
                                  group_ids=torch.zeros(len(g), dtype=torch.long), num_groups=1,
                                  entropy_new=h1, entropy=h0, sum_w_lam=sum_w_lam, sum_lam=sum_lam)
        sum_sq += float((cg * cg).sum())
        start += len(g)
    assert se_from_influence(sum_sq, len(LW)) == pytest.approx(se_ref, rel=1e-11)


def test_snis_influence_vanishes_at_eta_zero() -> None:
    """η = 0: w ≡ 1 and h' = h, so Ĥ' = Ĥ and every c_p is 0 (ΔH_true = 0 with SE 0)."""
    h, lam = _flat(H_OLD), _flat(T_SNIS)
    group_ids = torch.tensor([p for p, g in enumerate(H_OLD) for _ in g])
    est = float(h.sum() / lam.sum())
    c = snis_delta_influence(torch.ones_like(h), h, h, lam, group_ids=group_ids, num_groups=len(H_OLD),
                             entropy_new=est, entropy=est, sum_w_lam=float(lam.sum()), sum_lam=float(lam.sum()))
    assert torch.all(c.abs() < 1e-15)
    assert se_from_influence(float((c * c).sum()), len(H_OLD)) < 1e-14
