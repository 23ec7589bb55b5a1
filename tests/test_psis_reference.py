"""Pins PSIS k̂ (probe_dist.estimators.psis) to ArviZ and pins its tail length M exactly (docs/method.md §6).

tests/test_psis.py checks gpd_fit against a numpy transcription of ArviZ's _gpdfit and checks that k̂ recovers
known shapes within ~0.1 — loose enough that a wrong tail length (the number M of largest weights the GPD is
fitted to) goes unnoticed. Here:

* the tail length M = ceil(min(0.2·S, 3·sqrt(S))) (ArviZ psislw with r_eff = 1) is pinned directly: k̂ must
  depend on the M + 1 largest log-weights only (the M tail points and the threshold), and on each of them;
* k̂ must equal ``arviz.psislw``'s on fixed light- and heavy-tailed log-weight vectors for S on both sides of
  the 0.2·S / 3·sqrt(S) crossover (S = 225), to 1e-12 (the observed agreement is ~1e-14: the two differ only in
  how the exceedances exp(a) − exp(c) are rounded);
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

with warnings.catch_warnings():  # ArviZ 0.x announces its 1.0 refactor with a FutureWarning at import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz

KHAT_TOL = 1e-12

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
    assert ours == pytest.approx(ref, rel=KHAT_TOL, abs=KHAT_TOL)
    # Shifting all log-weights (a constant factor on the weights) changes nothing.
    assert pareto_khat(torch.from_numpy(lw + 37.5)) == pytest.approx(ref, rel=KHAT_TOL, abs=KHAT_TOL)


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
    assert base == pytest.approx(arviz_khat(lw_sorted[perm].copy()), rel=KHAT_TOL, abs=KHAT_TOL)

    # Everything below the threshold (ranks M+2 .. S) replaced by other values, still below the threshold.
    body = lw_sorted.copy()
    rng = np.random.default_rng(99)
    body[m + 1:] = lw_sorted[m] - 0.25 - rng.exponential(3.0, size=s - m - 1)
    assert khat(body) == base

    # The threshold (rank M+1) moved down, halfway to rank M+2: k̂ changes.
    thr = lw_sorted.copy()
    thr[m] = 0.5 * (lw_sorted[m] + lw_sorted[m + 1])
    assert abs(khat(thr) - base) > 1e-9

    # The last tail point (rank M) moved down, halfway to the threshold: k̂ changes.
    tail = lw_sorted.copy()
    tail[m - 1] = 0.5 * (lw_sorted[m - 1] + lw_sorted[m])
    assert abs(khat(tail) - base) > 1e-9


@pytest.mark.parametrize("n", [11, 50, 100, 1000, 2154, 2155, 10_000, 10**7])
def test_khat_threshold_formula(n: int) -> None:
    assert khat_threshold(n) == pytest.approx(min(1.0 - 1.0 / math.log10(n), 0.7), rel=1e-15)


def test_khat_threshold_cap_sits_between_2154_and_2155() -> None:
    """1 − 1/log10 n = 0.7 at n = 10^(10/3) ≈ 2154.43: below the cap at 2154, capped from 2155."""
    assert 0.6999 < khat_threshold(2154) < 0.7
    assert khat_threshold(2155) == 0.7
    assert khat_threshold(100) == pytest.approx(0.5, rel=1e-15)
