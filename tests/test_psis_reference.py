"""Pins PSIS k̂ (probe_dist.estimators.psis) to ArviZ and pins its tail length M exactly (docs/method.md §6).

tests/test_psis.py checks gpd_fit against a numpy transcription of ArviZ's _gpdfit and checks that k̂ recovers
known shapes within ~0.1 — loose enough that a wrong tail length (the number M of largest weights the GPD is
fitted to) goes unnoticed. Here:

* the tail length M = ceil(min(0.2·S, 3·sqrt(S))) (ArviZ psislw with r_eff = 1) is pinned directly: k̂ must
  depend on the M + 1 largest log-weights only (the M tail points and the threshold), and on each of them;
* k̂ must equal ``arviz.psislw``'s on fixed light- and heavy-tailed log-weight vectors for S on both sides of
  the 0.2·S / 3·sqrt(S) crossover (S = 225), to float64 rounding: the two differ only in how they round — the
  exceedances (ArviZ exp(a) − exp(c), the probe exp(c)·expm1(a − c)) and the grid weights (ArviZ
  1/Σ exp(L_l − L_j), the probe a softmax) — so the bound is khat_tol, a first-order rounding bound with k̂'s
  gradient measured on each input (bounds 1e-14 to 5e-12 here; the observed differences stay ≤ 0.1 of them);
* k̂ is undefined (NaN; ArviZ: inf) exactly when M < 5, i.e. S ≤ 20;
* khat_threshold(n) = min(1 − 1/log10 n, 0.7), including both sides of the cap at n ≈ 2154.4.

ArviZ is a required test dependency: the references are computed at test time, not stored.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from probe_dist.estimators.psis import khat_threshold, pareto_khat
from tests.test_psis import _arviz_gpdfit_reference, khat_and_gradient, two_path_tol64
from tests.tolerances import fp_bound, unit_roundoff

with warnings.catch_warnings():  # ArviZ 0.x announces its 1.0 refactor with a FutureWarning at import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz

# M = ceil(min(0.2 S, 3 sqrt(S))) written out: 0.2 S below S = 225, 3 sqrt(S) above it.
TAIL_LENGTH = {21: 5, 24: 5, 25: 5, 64: 13, 100: 20, 224: 45, 225: 45, 226: 46, 1000: 95, 5000: 213}


def expected_tail_length(s: int) -> int:
    return math.ceil(min(0.2 * s, 3.0 * math.sqrt(s)))


def log_weights(kind: str, s: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":  # light tail, k̂ well below 0.5
        return 0.5 * rng.standard_normal(s)
    if kind == "wide_normal":  # log-normal weights, k̂ around 0.7
        return 2.0 * rng.standard_normal(s)
    if kind == "student_t3":  # very heavy tail, k̂ > 1
        return rng.standard_t(3, s)
    if kind == "gpd":  # w = 1 + GPD(k = 0.8) draws
        u = rng.random(s)
        return np.log1p(((1.0 - u) ** -0.8 - 1.0) / 0.8) - 4.0
    raise ValueError(kind)


def arviz_khat(lw: np.ndarray) -> float:
    _, k = arviz.psislw(lw.copy())  # r_eff = 1
    return float(k)


def khat_tol(lw: np.ndarray, ref: float, shift: float = 0.0) -> float:
    """A bound on |k̂_probe(lw + shift) − k̂_ArviZ(lw)|: two float64 computations of one k̂ that round differently.

    First order, in two parts:

    * the log-weight level, worst case: each path rounds x = lw − max (≤ u|x_i|), exponentiates and forms the
      exceedances — ArviZ exp(a) − exp(c), the probe exp(c)·expm1(a − c), whose a − c rounds at ≤ u|x_c| — each
      rounding ≤ u relative, i.e. ≤ u in the log-weight it stems from: ≤ u(|x_i| + |x_c| + 3) per log-weight and
      path, and the shifted path's lw + shift one more u|lw_i + shift|. Times |∂k̂/∂lw_i| (khat_and_gradient), 4×
      safety (fp_bound's);
    * the fit's own arithmetic (the grid sums, ArviZ's 1/Σ exp(L_l − L_j) against the probe's softmax):
      two_path_tol64 of the float32 transcription of _gpdfit on these exceedances.
    """
    assert math.isfinite(ref)
    assert np.all(lw + shift > np.log(np.finfo(float).tiny))  # ArviZ's cutoff clamp at log(tiny) is not reached
    u = unit_roundoff(torch.float64)
    m = expected_tail_length(lw.size)
    lw_t = torch.from_numpy(lw)
    _, grad = khat_and_gradient(lw_t)
    x = lw_t - lw_t.max()
    x_c = torch.topk(x, m + 1).values[m]
    per_value = 2 * u * (x.abs() + x_c.abs() + 3.0) + u * (lw_t + shift).abs() * (shift != 0)
    log_level = 4 * float((grad.abs() * per_value).sum())
    desc = np.sort(lw - lw.max())[::-1]
    exceedances = np.sort(np.exp(desc[m]) * np.expm1(desc[:m] - desc[m]))
    err32 = abs(_arviz_gpdfit_reference(exceedances.astype(np.float32), dtype=np.float32)[0]
                - _arviz_gpdfit_reference(exceedances)[0])
    return log_level + two_path_tol64(err32, abs(ref))


def test_tail_length_table_is_the_arviz_formula() -> None:
    for s, m in TAIL_LENGTH.items():
        assert expected_tail_length(s) == m, s


@pytest.mark.parametrize("kind", ["normal", "wide_normal", "student_t3", "gpd"])
@pytest.mark.parametrize("s", [21, 64, 100, 224, 226, 1000, 5000])
def test_pareto_khat_equals_arviz_psislw(kind: str, s: int) -> None:
    lw = log_weights(kind, s, seed=1000 + s)
    ref = arviz_khat(lw)
    assert math.isfinite(ref)
    ours = pareto_khat(torch.from_numpy(lw))
    # tol: fp two float64 k̂ that differ in rounding only (module docstring): khat_tol (1e-14 to 5e-12). A tail one
    # point longer or shorter, or the threshold counted in the tail, moves k̂ by ≥ 6e-4 on these inputs.
    tol = khat_tol(lw, ref)
    assert abs(ours - ref) <= tol, (ours, ref, tol)
    # Shifting all log-weights (a constant factor on the weights) changes nothing but the rounding of lw + 37.5.
    shifted = pareto_khat(torch.from_numpy(lw + 37.5))
    tol = khat_tol(lw, ref, shift=37.5)  # tol: fp (khat_tol, with the shift's rounding)
    assert abs(shifted - ref) <= tol, (shifted, ref, tol)


@pytest.mark.parametrize("s", [5, 10, 19, 20])
def test_pareto_khat_undefined_when_tail_shorter_than_five(s: int) -> None:
    """S ≤ 20 gives M = ceil(0.2 S) ≤ 4 tail points: ArviZ returns inf, the probe NaN."""
    lw = log_weights("wide_normal", s, seed=s)
    assert math.isinf(arviz_khat(lw))
    assert math.isnan(pareto_khat(torch.from_numpy(lw)))


@pytest.mark.parametrize("s", [21, 64, 100, 225, 226, 1000, 5000])
def test_pareto_khat_depends_on_exactly_the_top_m_plus_one_log_weights(s: int) -> None:
    """k̂ is a function of the M tail values and the (M+1)-th largest value (the threshold) only.

    Rewriting every smaller log-weight leaves k̂ bit-identical; moving the threshold or the M-th largest value
    (keeping the order) changes it. Together this pins M = TAIL_LENGTH[s] exactly.
    """
    m = TAIL_LENGTH[s]
    lw_sorted = np.sort(log_weights("wide_normal", s, seed=7 + s))[::-1].copy()  # descending, distinct values
    assert np.all(np.diff(lw_sorted) < 0)
    perm = np.random.default_rng(s).permutation(s)  # k̂ must not depend on the order either

    def khat(desc: np.ndarray) -> float:
        return pareto_khat(torch.from_numpy(desc[perm].copy()))

    base = khat(lw_sorted)
    assert math.isfinite(base)
    ref = arviz_khat(lw_sorted[perm].copy())
    tol = khat_tol(lw_sorted[perm].copy(), ref)  # tol: fp rounding only (khat_tol); also what rounding could move
    assert abs(base - ref) <= tol, (base, ref, tol)  # tol: fp (above)

    # Everything below the threshold (ranks M+2 .. S) replaced by other values, still below the threshold.
    body = lw_sorted.copy()
    rng = np.random.default_rng(99)
    body[m + 1:] = lw_sorted[m] - 0.25 - rng.exponential(3.0, size=s - m - 1)
    assert khat(body) == base

    # The threshold (rank M+1) moved down, halfway to rank M+2: k̂ changes.
    thr = lw_sorted.copy()
    thr[m] = 0.5 * (lw_sorted[m] + lw_sorted[m + 1])
    assert abs(khat(thr) - base) > tol  # tol: fp a real change: more than any rounding of k̂ (khat_tol) could be

    # The last tail point (rank M) moved down, halfway to the threshold: k̂ changes.
    tail = lw_sorted.copy()
    tail[m - 1] = 0.5 * (lw_sorted[m - 1] + lw_sorted[m])
    assert abs(khat(tail) - base) > tol  # tol: fp a real change, beyond rounding (khat_tol)


@pytest.mark.parametrize("n", [11, 50, 100, 1000, 2154, 2155, 10_000, 10**7])
def test_khat_threshold_formula(n: int) -> None:
    """min(1 − 1/log10 n, 0.7): the sample-size dependent threshold of Vehtari et al. (2024), JMLR 25(72)."""
    # tol: exact the same float64 expression as the implementation (0.7: the paper's cap, a decision threshold)
    assert khat_threshold(n) == min(1.0 - 1.0 / math.log10(n), 0.7)


def test_khat_threshold_cap_sits_between_2154_and_2155() -> None:
    """1 − 1/log10 n = 0.7 at n = 10^(10/3) ≈ 2154.43: below the cap at 2154, capped from 2155."""
    # tol: bound 0.7 is the paper's cap (Vehtari et al. 2024): 2154 is uncapped (the formula, bitwise) and below it
    assert khat_threshold(2154) == 1.0 - 1.0 / math.log10(2154) < 0.7
    assert khat_threshold(2155) == 0.7
    # tol: fp three float64 roundings (log10, 1/·, 1 − ·) of values ≤ 1
    assert abs(khat_threshold(100) - 0.5) <= fp_bound(torch.float64, 3, 1.0)
