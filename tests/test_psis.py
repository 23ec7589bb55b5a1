"""Tests for the PSIS Pareto k̂ diagnostic (docs/method.md §6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probe_dist.estimators.psis import gpd_fit, khat_threshold, pareto_khat


def _gpd_sample(n: int, k: float, sigma: float, seed: int) -> torch.Tensor:
    """GPD(k, σ) draws by inverse CDF x = σ((1 − U)^(−k) − 1)/k, fixed generator."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return sigma * ((1.0 - u) ** (-k) - 1.0) / k


def _arviz_gpdfit_reference(ary: np.ndarray) -> tuple[float, float]:
    """Literal numpy transcription of arviz.stats.stats._gpdfit (ary sorted ascending)."""
    prior_bs, prior_k = 3, 10
    n = len(ary)
    m_est = 30 + int(n**0.5)
    b_ary = 1 - np.sqrt(m_est / (np.arange(1, m_est + 1, dtype=float) - 0.5))
    b_ary /= prior_bs * ary[int(n / 4 + 0.5) - 1]
    b_ary += 1 / ary[-1]
    k_ary = np.log1p(-b_ary[:, None] * ary).mean(axis=1)
    len_scale = n * (np.log(-(b_ary / k_ary)) - k_ary - 1)
    weights = 1 / np.exp(len_scale - len_scale[:, None]).sum(axis=1)
    real_idxs = weights >= 10 * np.finfo(float).eps
    if not np.all(real_idxs):
        weights = weights[real_idxs]
        b_ary = b_ary[real_idxs]
    weights /= weights.sum()
    b_post = np.sum(b_ary * weights)
    k_post = np.log1p(-b_post * ary).mean()
    sigma = -k_post / b_post
    k_post = (n * k_post + prior_k * 0.5) / (n + prior_k)
    return float(k_post), float(sigma)


@pytest.mark.parametrize("k", [0.3, 0.7, 1.0])
def test_gpd_fit_recovers_shape(k: float) -> None:
    # n = 2000: SE of k̂ is ~(1 + k)/sqrt(n) ≈ 0.03-0.045, so 0.1 is a > 2 SE margin (checked on 20 seeds).
    for seed in range(3):
        x = _gpd_sample(2000, k, 1.0, seed=100 + seed)
        k_hat, sigma_hat = gpd_fit(x)
        assert abs(k_hat - k) < 0.1, (seed, k_hat)
        assert abs(sigma_hat - 1.0) < 0.2, (seed, sigma_hat)


@pytest.mark.parametrize("k", [-0.2, 0.3, 1.0])
def test_gpd_fit_matches_arviz_transcription(k: float) -> None:
    x = _gpd_sample(500, k, 2.0, seed=7)  # k < 0: bounded tail, still non-negative
    ref = _arviz_gpdfit_reference(np.sort(x.numpy()))
    ours = gpd_fit(x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))])  # order-free
    assert ours == pytest.approx(ref, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("k", [0.3, 0.7, 1.0])
def test_pareto_khat_recovers_shape(k: float) -> None:
    # N = 1e6 gives a tail of M = 3000 points: k̂ sd ≈ 0.03-0.04 (max error 0.07 over 20 seeds); with
    # N = 1e4 (M = 300) the sd is ~0.1 and a 0.1 tolerance would be a coin flip.
    n = 1_000_000
    for seed in range(3):
        w = 1.0 + _gpd_sample(n, k, 1.0, seed=seed)  # weights 1 + x: same tail shape, log finite
        lw = torch.log(w) - 3.0  # k̂ is invariant to the weights' overall scale
        k_hat = pareto_khat(lw)
        assert abs(k_hat - k) < 0.1, (seed, k_hat)


def test_pareto_khat_light_tail() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (1000, 10_000):
        lw = 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
        k_hat = pareto_khat(lw)
        assert math.isfinite(k_hat)
        assert k_hat < 0.5
        assert k_hat < khat_threshold(n)


def test_pareto_khat_accepts_float32_and_any_shape() -> None:
    x = _gpd_sample(10_000, 0.5, 1.0, seed=3)
    lw = torch.log1p(x)
    assert pareto_khat(lw.float().reshape(100, 100)) == pytest.approx(pareto_khat(lw), abs=1e-3)


def test_pareto_khat_degenerate_inputs_are_nan() -> None:
    # Constant log-weights (e.g. η = 0, w ≡ 1): all exceedances zero → undefined, must not crash.
    assert math.isnan(pareto_khat(torch.zeros(1000, dtype=torch.float64)))
    assert math.isnan(pareto_khat(torch.full((1000,), 5.0)))
    # Too few samples for a 5-point tail.
    assert math.isnan(pareto_khat(torch.randn(10, dtype=torch.float64)))
    assert math.isnan(pareto_khat(torch.zeros(0)))
    # NaN / +inf log-weights.
    lw = torch.randn(1000, dtype=torch.float64)
    lw[3] = float("nan")
    assert math.isnan(pareto_khat(lw))
    lw[3] = float("inf")
    assert math.isnan(pareto_khat(lw))


def test_pareto_khat_allows_zero_weights() -> None:
    lw = torch.log1p(_gpd_sample(10_000, 0.5, 1.0, seed=4))
    lw[:100] = -math.inf  # zero weights below the tail do not matter
    assert math.isfinite(pareto_khat(lw))


def test_gpd_fit_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        gpd_fit(torch.zeros(0))
    with pytest.raises(ValueError):
        gpd_fit(torch.zeros(10))
    with pytest.raises(ValueError):
        gpd_fit(torch.tensor([1.0, -1.0, 2.0]))


def test_khat_threshold() -> None:
    assert khat_threshold(100) == pytest.approx(0.5)  # 1 − 1/2
    assert khat_threshold(1000) == pytest.approx(1.0 - 1.0 / 3.0)
    assert khat_threshold(10**6) == pytest.approx(0.7)  # capped: 1 − 1/6 > 0.7
    assert khat_threshold(2200) == pytest.approx(min(1.0 - 1.0 / math.log10(2200), 0.7))
    assert khat_threshold(10) == 0.0
    assert khat_threshold(1) == 0.0
    with pytest.raises(ValueError):
        khat_threshold(0)
