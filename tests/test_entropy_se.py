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
from tests.tolerances import fp_bound

# Error model of every comparison below (float64, both sides): the inputs have ≤ 13 sequences, so a ratio Ĥ = Σh/Σλ
# carries ≤ 2·13 + 1 roundings, and a linearisation c_p = Σ_i w_i(h_i − Ĥλ_i)/Σwλ adds ≤ 13 + 6 (exp of the
# stabilised log-weight, the product, difference, division, group sum): ≤ 32 roundings on either path, 64 for two.
# Each is relative to the *sizes* of the terms (cancellation in h_p − Ĥλ_p is where the error grows), so every bound
# is fp_bound(float64, 64, Σ|terms|) with the term sizes measured on the inputs (_fp below): 2.8e-14 · scale.
N_ROUNDINGS = 64


def _fp(scale: float) -> float:
    """The float64 absolute error bound of a quantity whose terms have absolute values summing to `scale`."""
    return fp_bound(torch.float64, N_ROUNDINGS, scale)


def _ratio_scales(h_groups: list[list[float]], lam_groups: list[list[float]]) -> tuple[float, list[float], float]:
    """Term sizes of Ĥ, of each c_p = (h_p − Ĥλ_p)/Σλ and of SE = sqrt(n/(n−1)·Σc²) (for _fp).

    a_p = (|h_p| + |Ĥλ_p|)/Σλ bounds c_p's terms; SE moves by sqrt(n/(n−1))·Σ_p |c_p|·δc_p/sqrt(Σc²), so its scale
    is sqrt(n/(n−1))·Σ_p |c_p|·a_p/sqrt(Σc²) — large only where a c_p cancels (its a_p/|c_p| ≤ 100 here).
    """
    h_tot = [sum(g) for g in h_groups]
    lam_tot = [sum(g) for g in lam_groups]
    sum_lam = sum(lam_tot)
    est = sum(h_tot) / sum_lam
    c = [(hp - est * lp) / sum_lam for hp, lp in zip(h_tot, lam_tot)]
    a = [(abs(hp) + abs(est * lp)) / sum_lam for hp, lp in zip(h_tot, lam_tot)]
    n = len(c)
    norm = math.sqrt(sum(x * x for x in c))
    se_scale = math.sqrt(n / (n - 1)) * sum(abs(x) * y for x, y in zip(c, a)) / norm if norm > 0 else 0.0
    return abs(est), a, se_scale

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
    est_scale, a, se_scale = _ratio_scales(H_SEQ, lam_seq)
    # tol: fp float64 error model above (_fp: 64 roundings × the measured term sizes: 3e-14 relative for Ĥ, 8e-13 for
    # tol: fp the SE, whose c_p cancel 27×); a missing n/(n−1) is 12 % off, sequences as the unit 2 %: both ≫ the bound.
    assert abs(est - est_ref) <= _fp(est_scale)
    assert abs(se - se_ref) <= _fp(se_scale)
    # The influences themselves, and their zero sum.
    h = torch.tensor([sum(g) for g in H_SEQ], dtype=torch.float64)
    lam = torch.tensor([sum(g) for g in lam_seq], dtype=torch.float64)
    c = ratio_influence(h, lam, est, float(lam.sum()))
    for cp, hp, lp, ap in zip(c.tolist(), h.tolist(), lam.tolist(), a):
        assert abs(cp - (hp - est_ref * lp) / float(lam.sum())) <= _fp(ap)  # tol: fp term sizes a_p, model above
    assert abs(float(c.sum())) <= _fp(sum(a))  # tol: fp Σc_p = 0 analytically: rounding of Σ_p of terms of size a_p


def test_ratio_se_closed_form_three_groups_includes_small_sample_factor() -> None:
    """h = (1, 2, 3), λ = 1: Ĥ = 2, c = (−1, 0, 1)/3, SE² = 3/2 · 2/9 = 1/3 exactly.

    Without n/(n−1) = 1.5 the SE would be sqrt(2)/3 ≈ 0.471 instead of 1/sqrt(3) ≈ 0.577.
    """
    est, se = module_ratio_se([[1.0], [2.0], [3.0]], [[1.0], [1.0], [1.0]])
    assert est == 2.0  # tol: exact 6/3 in binary floating point
    _, _, se_scale = _ratio_scales([[1.0], [2.0], [3.0]], [[1.0], [1.0], [1.0]])
    assert abs(se - 1.0 / math.sqrt(3.0)) <= _fp(se_scale)  # tol: fp model above (se_scale = 2.3 here)
    # tol: bound 1/√3 − √2/3 = 0.106 exactly: the uncorrected SE lies 0.106 away, ≫ the fp bound of the line above
    assert abs(se - math.sqrt(2.0) / 3.0) > 0.1


def test_se_from_influence_small_sample_factor_and_nan() -> None:
    # tol: fp float64, ≤ 4 roundings per side (n/(n−1), the product, sqrt): _fp(value) allows 64; a wrong factor
    # tol: fp n/(n−1) (n instead of n−1, or none) moves the value by ≥ 0.5 % (n = 101), ≫ 3e-14 relative.
    assert abs(se_from_influence(2.0 / 9.0, 3) - math.sqrt(1.5 * 2.0 / 9.0)) <= _fp(math.sqrt(1.5 * 2.0 / 9.0))
    assert abs(se_from_influence(0.8, 2) - math.sqrt(1.6)) <= _fp(math.sqrt(1.6))
    assert abs(se_from_influence(1.0, 101) - math.sqrt(101 / 100)) <= _fp(math.sqrt(101 / 100))
    assert se_from_influence(0.0, 5) == 0.0  # tol: exact sqrt(0) = 0
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
    est_scale, _, se_scale = _ratio_scales(h_groups, lam_groups)
    # tol: fp model above; the 0.3x + 0.7x ≠ x rounding of the split groups is one more rounding per term (within
    # tol: fp the 64); statistics.stdev is exact up to its final rounding. Dropping n/(n−1) would be 8 % off.
    assert abs(est - statistics.fmean(h_tot) / length) <= _fp(est_scale)
    assert abs(se - statistics.stdev(h_tot) / (length * math.sqrt(n))) <= _fp(se_scale)


def test_ratio_se_unit_is_the_prompt_group_not_the_sequence() -> None:
    """The same six sequences grouped three ways: same Ĥ, three different SEs, each the hand formula with n = #groups."""
    h_flat = [2.0, 3.5, 1.25, 4.0, 0.5, 6.5]
    t_flat = [4.0, 6.0, 2.0, 7.0, 1.0, 9.0]
    results = []
    for sizes in ([2, 2, 2], [3, 3], [1, 1, 1, 1, 1, 1]):
        hg, lg = _regroup(h_flat, sizes), _regroup(t_flat, sizes)
        est_ref, se_ref = hand_ratio_se(hg, lg)
        est, se = module_ratio_se(hg, lg)
        est_scale, _, se_scale = _ratio_scales(hg, lg)
        assert abs(est - est_ref) <= _fp(est_scale)  # tol: fp model above
        assert abs(se - se_ref) <= _fp(se_scale)  # tol: fp model above (the cancellation of each grouping measured)
        results.append((est, se, se_scale))
    ests = [r[0] for r in results]
    ses = [r[1] for r in results]
    # tol: fp the groupings only reorder the sums: each Ĥ is within _fp(Ĥ) of the exact Σh/Σλ, so two within 2×
    assert max(ests) - min(ests) <= 2 * _fp(max(ests))
    for i in range(len(ses)):
        for j in range(i + 1, len(ses)):
            # tol: fp distinct beyond rounding: SEs that did not depend on the grouping would agree within the sum of
            # tol: fp their fp bounds (≤ 1e-14); these differ by ≥ 5 % (hand values 0.047, 0.041, 0.043)
            assert abs(ses[i] - ses[j]) > _fp(results[i][2]) + _fp(results[j][2]), ses


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
    # tol: fp model above: Ĥ' and Ĥ each within _fp(|Ĥ|), so ΔH within _fp(|Ĥ'| + |Ĥ|) — 949× |ΔH| here (the
    # tol: fp two nearly cancel), i.e. 2.7e-11 relative; dropping the weights (ΔH −0.0013 → −0.0064) is far outside.
    assert abs((h1 - h0) - delta_ref) <= _fp(abs(h1) + abs(h0))
    c = snis_delta_influence(w, h_new, h_old, lam, group_ids=group_ids, num_groups=len(LW), entropy_new=h1,
                             entropy=h0, sum_w_lam=sum_w_lam, sum_lam=sum_lam)
    assert c.shape == (len(LW),)
    # Term sizes of c_p = Σ_{i∈p} [w_i(h'_i − Ĥ'λ_i)/Σwλ − (h_i − Ĥλ_i)/Σλ] (a_p/|c_p| = 54 … 1.8e3 here).
    wf = [math.exp(x) for x in lw.tolist()]
    terms = [wi * (abs(hn) + abs(h1 * li)) / sum_w_lam + (abs(ho) + abs(h0 * li)) / sum_lam
             for wi, hn, ho, li in zip(wf, h_new.tolist(), h_old.tolist(), lam.tolist())]
    a = [0.0] * len(LW)
    for p, t in zip(group_ids.tolist(), terms):
        a[p] += t
    for cp, rp, ap in zip(c.tolist(), c_ref, a):
        assert abs(cp - rp) <= _fp(ap)  # tol: fp model above, with the measured term sizes a_p
    assert abs(float(c.sum())) <= _fp(sum(a))  # tol: fp both linearisations sum to zero: Σ_p rounding of a_p
    se = se_from_influence(float((c * c).sum()), len(LW))
    norm = math.sqrt(sum(x * x for x in c_ref))
    se_scale = math.sqrt(len(LW) / (len(LW) - 1)) * sum(abs(x) * y for x, y in zip(c_ref, a)) / norm
    assert abs(se - se_ref) <= _fp(se_scale)  # tol: fp SE moves by sqrt(n/(n−1))·Σ|c_p|δc_p/‖c‖ (_ratio_scales)
    # One call per group with num_groups = 1 (how a rank accumulates Σc_p² over its own groups): same SE.
    sum_sq, start = 0.0, 0
    for g in LW:
        sl = slice(start, start + len(g))
        cg = snis_delta_influence(w[sl], h_new[sl], h_old[sl], lam[sl],
                                  group_ids=torch.zeros(len(g), dtype=torch.long), num_groups=1,
                                  entropy_new=h1, entropy=h0, sum_w_lam=sum_w_lam, sum_lam=sum_lam)
        sum_sq += float((cg * cg).sum())
        start += len(g)
    assert abs(se_from_influence(sum_sq, len(LW)) - se_ref) <= _fp(se_scale)  # tol: fp as the SE above


def test_snis_influence_vanishes_at_eta_zero() -> None:
    """η = 0: w ≡ 1 and h' = h, so Ĥ' = Ĥ and every c_p is 0 (ΔH_true = 0 with SE 0)."""
    h, lam = _flat(H_OLD), _flat(T_SNIS)
    group_ids = torch.tensor([p for p, g in enumerate(H_OLD) for _ in g])
    est = float(h.sum() / lam.sum())
    c = snis_delta_influence(torch.ones_like(h), h, h, lam, group_ids=group_ids, num_groups=len(H_OLD),
                             entropy_new=est, entropy=est, sum_w_lam=float(lam.sum()), sum_lam=float(lam.sum()))
    # Both halves of each term are the same float64 expression on the same inputs (w = 1 exactly): 0 in the current
    # code. The bound allows any algebraically equal rewrite: the terms' rounding, sizes a_p (model above).
    sum_lam = float(lam.sum())
    a = torch.zeros(len(H_OLD), dtype=torch.float64).index_add_(0, group_ids, 2 * (h.abs() + est * lam) / sum_lam)
    for cp, ap in zip(c.tolist(), a.tolist()):
        assert abs(cp) <= _fp(ap)  # tol: fp model above (a_p ≤ 0.6 here: bounds ≤ 2e-14)
    # tol: fp SE = sqrt(n/(n−1)·Σc²) ≤ sqrt(n/(n−1))·‖(_fp(a_p))_p‖₂ when every c_p is within its bound (+ Σc²'s own
    # rounding, relative, negligible at this size)
    se_bound = math.sqrt(len(H_OLD) / (len(H_OLD) - 1)) * math.sqrt(sum(_fp(x) ** 2 for x in a.tolist()))
    assert se_from_influence(float((c * c).sum()), len(H_OLD)) <= se_bound
