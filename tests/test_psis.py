"""Tests for the PSIS Pareto k̂ diagnostic (docs/method.md §6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probe_dist.estimators.psis import gpd_fit, khat_threshold, pareto_khat
from tests.tolerances import MAX_STATISTICAL_CHECKS, fp_bound, two_path_tol64, unit_roundoff, z_bonferroni


def _gpd_sample(n: int, k: float, sigma: float, seed: int) -> torch.Tensor:
    """GPD(k, σ) draws by inverse CDF x = σ((1 − U)^(−k) − 1)/k, fixed generator."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return sigma * ((1.0 - u) ** (-k) - 1.0) / k


def _arviz_gpdfit_reference(ary: np.ndarray, dtype=np.float64) -> tuple[float, float]:
    """Literal numpy transcription of arviz.stats.stats._gpdfit (ary sorted ascending), evaluated in `dtype`.

    dtype=np.float64 is ArviZ's computation; np.float32 runs every step in float32 (the grid too), which measures
    the computation's condition number on `ary` (two_path_tol64). exp(L_l − L_j) overflows to inf for grid points
    far below the best, in either dtype, as in ArviZ: their weight is 1/inf = 0.
    """
    ary = np.asarray(ary, dtype=dtype)
    prior_bs, prior_k = 3, 10
    n = len(ary)
    m_est = 30 + int(n**0.5)
    b_ary = 1 - np.sqrt(m_est / (np.arange(1, m_est + 1, dtype=dtype) - 0.5))
    b_ary /= prior_bs * ary[int(n / 4 + 0.5) - 1]
    b_ary += 1 / ary[-1]
    k_ary = np.log1p(-b_ary[:, None] * ary).mean(axis=1)
    len_scale = n * (np.log(-(b_ary / k_ary)) - k_ary - 1)
    with np.errstate(over="ignore"):
        weights = 1 / np.exp(len_scale - len_scale[:, None]).sum(axis=1)
    real_idxs = weights >= 10 * np.finfo(float).eps  # tol: exact ArviZ's own cutoff, transcribed (not a test bound)
    if not np.all(real_idxs):
        weights = weights[real_idxs]
        b_ary = b_ary[real_idxs]
    weights /= weights.sum()
    b_post = np.sum(b_ary * weights)
    k_post = np.log1p(-b_post * ary).mean()
    sigma = -k_post / b_post
    k_post = (n * k_post + prior_k * 0.5) / (n + prior_k)
    return float(k_post), float(sigma)


def _shape_expectation(k: float, n: int) -> float:
    """E[k̂] for n GPD(k) exceedances: the fit's prior adjustment (n k + 10·0.5)/(n + 10) of k (gpd_fit)."""
    return (n * k + 5.0) / (n + 10.0)


@pytest.mark.parametrize("k", [0.3, 0.7, 1.0])
def test_gpd_fit_recovers_shape(k: float) -> None:
    """The mean of k̂ and σ̂ over R independent samples of n GPD(k, 1) draws is within z SEs of (E[k̂], 1).

    SEs: the GPD's inverse Fisher information, sd(k̂) = (1 + k)/sqrt(n), sd(σ̂)/σ = sqrt(2(1 + k)/n) (Zhang &
    Stephens' estimator is asymptotically efficient; measured over 400 seeds at n = 2000: within 4 % of these).
    Its finite-sample bias (beyond the prior term, which the expectation includes) measured there: ≤ 0.001 in k̂,
    ≤ 0.0017 in σ̂, ≤ 0.2 SE of the mean. A sign error or fitting log x is ≫ 4 SE off; a missing prior term
    (10(k − 0.5)/(n + 10) ≤ 2.5e-3 here) is for test_gpd_fit_matches_arviz_transcription.
    """
    n, reps = 2000, 16
    fits = torch.tensor([gpd_fit(_gpd_sample(n, k, 1.0, seed=100 + seed)) for seed in range(reps)],
                        dtype=torch.float64)
    se_k = (1.0 + k) / math.sqrt(n * reps)
    se_sigma = math.sqrt(2.0 * (1.0 + k) / (n * reps))
    z = z_bonferroni(2 * MAX_STATISTICAL_CHECKS)  # the pair is one check of the budget: α/120 each
    mean_k, mean_sigma = float(fits[:, 0].mean()), float(fits[:, 1].mean())
    # tol: stat ×3 one check per k (its two parts at α/120 each): the means within z SE of E[k̂] and of σ = 1
    assert abs(mean_k - _shape_expectation(k, n)) <= z * se_k and abs(mean_sigma - 1.0) <= z * se_sigma, (
        mean_k, mean_sigma, z * se_k, z * se_sigma)


@pytest.mark.parametrize("k", [-0.2, 0.3, 1.0])
def test_gpd_fit_matches_arviz_transcription(k: float) -> None:
    x = _gpd_sample(500, k, 2.0, seed=7)  # k < 0: bounded tail, still non-negative
    xs = np.sort(x.numpy())
    ref = _arviz_gpdfit_reference(xs)
    ref32 = _arviz_gpdfit_reference(xs.astype(np.float32), dtype=np.float32)
    ours = gpd_fit(x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))])  # order-free
    for name, a, b, b32 in zip(("k", "sigma"), ours, ref, ref32):
        # tol: fp two float64 paths of one algorithm (torch's softmax vs ArviZ's 1/Σexp(L_l − L_j), its own sums):
        # two_path_tol64 from the float32 transcription's measured error (~1e-14). The quartile index off by one moves
        # k and σ by ≥ 9e-6, a missing prior term k by ≥ 5e-3 (measured here); the grid's size barely matters.
        assert abs(a - b) <= two_path_tol64(abs(b32 - b), abs(b)), (name, a, b, b32)


@pytest.mark.parametrize("k", [0.3, 0.7, 1.0])
def test_pareto_khat_recovers_shape(k: float) -> None:
    """The mean k̂ over R samples of N weights w = 1 + GPD(k) draws is within z SEs of its expectation.

    Above any threshold u the exceedances w − u of 1 + GPD(k, 1) are exactly GPD(k, 1 + k(u − 1)) (threshold
    stability), and given the (M+1)-th largest the M largest are iid from that tail: k̂ is gpd_fit on M iid
    GPD(k) points, E[k̂] = (M k + 5)/(M + 10), sd (1 + k)/sqrt(M) (measured over 200 seeds at N = 1e5, M = 949:
    within 5 % below it, bias ≤ 0.004, ≤ 0.2 SE of the mean). Exceedances in the wrong space (log-weights: an
    exponential tail, k̂ ≈ 0) or a wrong sign are ≫ 4 SE off.
    """
    n, reps = 100_000, 10
    m_tail = math.ceil(min(0.2 * n, 3.0 * math.sqrt(n)))
    k_hats = []
    for seed in range(reps):
        w = 1.0 + _gpd_sample(n, k, 1.0, seed=seed)  # weights 1 + x: same tail shape, log finite
        lw = torch.log(w) - 3.0  # k̂ is invariant to the weights' overall scale
        k_hats.append(pareto_khat(lw))
    mean = sum(k_hats) / reps
    se = (1.0 + k) / math.sqrt(m_tail * reps)
    # tol: stat ×3 the mean of R independent k̂ within z_bonferroni() SEs of E[k̂]
    assert abs(mean - _shape_expectation(k, m_tail)) <= z_bonferroni() * se, (mean, k_hats)


def test_pareto_khat_light_tail() -> None:
    """Log-normal weights with σ = 0.05 (every moment finite) are classified as light: k̂ below 0.5.

    0.5 is the PSIS paper's bound for finite-variance weights (Vehtari et al. 2024, JMLR 25(72)), and below the
    decision threshold khat_threshold(n) ≥ 2/3 for n ≥ 1000. The weights ≈ 1 + 0.05 z have a normal's tail, in
    the Gumbel domain (shape 0) and approaching it from below, so E[k̂] ≤ the prior term 5/(M + 10) (measured over
    1000 seeds: mean −0.06, −0.07, sd 0.093, 0.055 at n = 1000, 10 000) and sd(k̂) ≤ (1 + 0)/sqrt(M): the check
    fails for a right k̂ only if it lands (0.5 − 5/(M + 10))·sqrt(M) SEs high, asserted ≥ z_bonferroni().
    """
    g = torch.Generator().manual_seed(0)
    for n in (1000, 10_000):
        m_tail = math.ceil(min(0.2 * n, 3.0 * math.sqrt(n)))
        assert (0.5 - 5.0 / (m_tail + 10)) * math.sqrt(m_tail) >= z_bonferroni()  # tol: bound (docstring)
        lw = 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
        k_hat = pareto_khat(lw)
        assert math.isfinite(k_hat)
        assert k_hat < 0.5  # tol: stat ×2 a light tail's k̂ under PSIS's 0.5 (Vehtari et al. 2024), docstring
        assert k_hat < khat_threshold(n)


def khat_and_gradient(lw: torch.Tensor) -> tuple[float, torch.Tensor]:
    """k̂ of 1-D float64 log-weights and ∂k̂/∂lw (float64, lw's shape), by autograd through a torch transcription.

    The same computation as pareto_khat (top M + 1, exceedances exp(c)·expm1(a − c), Zhang-Stephens posterior
    mean over the grid, the prior term), written differentiably: the gradient is the condition number of k̂ with
    respect to each log-weight (zero outside the M + 1 largest), for first-order rounding bounds. The grid weights
    dropped as negligible (< 10 eps) are held fixed, as sorting order is.
    """
    lw = lw.detach().to(torch.float64).clone().requires_grad_(True)
    n = lw.numel()
    m = math.ceil(min(0.2 * n, 3.0 * math.sqrt(n)))
    top = torch.topk(lw, m + 1).values
    x = top - top[0]
    exc, _ = torch.sort(torch.exp(x[m]) * torch.expm1(x[:m] - x[m]))
    grid = 30 + int(math.floor(math.sqrt(m)))
    j = torch.arange(1, grid + 1, dtype=torch.float64)
    theta = 1.0 / exc[-1] + (1.0 - torch.sqrt(grid / (j - 0.5))) / (3.0 * exc[int(m / 4 + 0.5) - 1])
    k_grid = torch.log1p(-theta[:, None] * exc[None, :]).mean(dim=1)
    weights = torch.softmax(m * (torch.log(-theta / k_grid) - k_grid - 1.0), dim=0)
    keep = (weights >= 10 * torch.finfo(torch.float64).eps).detach()  # tol: exact gpd_fit's own cutoff, transcribed
    theta_post = torch.sum(theta[keep] * weights[keep] / weights[keep].sum())
    k = (m * torch.log1p(-theta_post * exc).mean() + 5.0) / (m + 10.0)
    k.backward()
    assert bool(torch.isfinite(lw.grad).all()), "k̂ is not differentiable here"
    return float(k.detach()), lw.grad


def test_pareto_khat_accepts_float32_and_any_shape() -> None:
    x = _gpd_sample(10_000, 0.5, 1.0, seed=3)
    lw = torch.log1p(x)
    n = lw.numel()
    m_tail = math.ceil(min(0.2 * n, 3.0 * math.sqrt(n)))
    top = torch.topk(lw, m_tail + 2).values  # the tail, the threshold and the next value below it
    # Precondition: float32 rounding (≤ u₃₂|lw| each) keeps the M + 2 largest in their order, so k̂ stays a smooth
    # function of the same M + 1 values (k̂ ignores the others: tests/test_psis_reference.py).
    assert bool((-torch.diff(top) > 4 * unit_roundoff(torch.float32) * top[:-1].abs()).all())  # tol: bound (above)
    _, grad = khat_and_gradient(lw)
    # tol: fp the float32 input moves each log-weight by ≤ u₃₂|lw_i|: to first order k̂ moves ≤ Σ|∂k̂/∂lw_i|·u₃₂|lw_i|
    # (the gradient by autograd), 4× safety (fp_bound's) for the second order and the float64 evaluations' own
    # rounding (u₆₄ × a like condition number)
    tol = 4 * float((grad.abs() * unit_roundoff(torch.float32) * lw.abs()).sum())
    assert abs(pareto_khat(lw.float().reshape(100, 100)) - pareto_khat(lw)) <= tol, tol


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
    # tol: fp min(1 − 1/log10 n, 0.7) in float64: three roundings (log10, 1/·, 1 − ·) of values ≤ 1
    assert abs(khat_threshold(100) - 0.5) <= fp_bound(torch.float64, 3, 1.0)  # 1 − 1/2
    assert abs(khat_threshold(1000) - 2.0 / 3.0) <= fp_bound(torch.float64, 3, 1.0)  # 1 − 1/3
    assert khat_threshold(10**6) == 0.7  # tol: exact capped (1 − 1/6 > 0.7): the cap itself is returned
    assert khat_threshold(2200) == min(1.0 - 1.0 / math.log10(2200), 0.7)  # tol: exact the same float64 expression
    assert khat_threshold(10) == 0.0
    assert khat_threshold(1) == 0.0
    with pytest.raises(ValueError):
        khat_threshold(0)
