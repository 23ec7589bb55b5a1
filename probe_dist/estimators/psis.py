"""Pareto k̂ diagnostic of SNIS log-weights (docs/method.md §6, "Diagnostics").

Implements the tail-shape diagnostic of Pareto-smoothed importance sampling (PSIS; Vehtari, Simpson,
Gelman, Yao, Gabry 2015/2024): fit a generalised Pareto distribution (GPD) to the largest importance
weights w_i = exp(log w_i) and report its shape k̂. k̂ > 0 is a heavy (power-law) tail; the SNIS estimate of
ΔH_true is considered reliable when k̂ < khat_threshold(N) = min(1 − 1/log10 N, 0.7).

Pure functions of tensors: float64 throughout, no scipy, no torch.distributed (the caller gathers the
global log-weights first).
"""

from __future__ import annotations

import math

import torch

__all__ = ["gpd_fit", "pareto_khat", "khat_threshold", "MIN_TAIL"]

# Fewer tail points than this and the GPD fit is meaningless (same cut as arviz/loo: tail_len > 4).
MIN_TAIL = 5

# Weakly informative prior on k (Vehtari et al., appendix): shrink towards 0.5 with weight 10 pseudo-points.
_PRIOR_K_WEIGHT = 10.0
_PRIOR_K_MEAN = 0.5
# Zhang & Stephens (2009) grid scale constant.
_PRIOR_BS = 3.0


def gpd_fit(exceedances: torch.Tensor) -> tuple[float, float]:
    """Fit a GPD to positive exceedances by Zhang & Stephens (2009) empirical Bayes.

    Same algorithm as arviz/loo ``gpdfit``: with x sorted ascending and n = len(x), a grid of
    m = 30 + floor(sqrt(n)) values θ_j = 1/x_(n) + (1 − sqrt(m/(j − 1/2))) / (3 x_(q)) (x_(q) the first
    quartile), the profile log-likelihood L(θ) = n (log(−θ/k(θ)) − k(θ) − 1) with k(θ) = mean(log1p(−θ x)),
    posterior-mean θ̂ = Σ_j θ_j softmax(L)_j, then k = mean(log1p(−θ̂ x)), σ = −k/θ̂ and finally the prior
    adjustment k ← (n k + 10·0.5)/(n + 10).

    Args:
        exceedances: 1-D tensor of exceedances over a threshold (≥ 0, at least one > 0).

    Returns:
        (k, sigma) as Python floats, PSIS sign convention (k > 0 ⇔ heavy tail). σ is computed before the
        prior adjustment of k, as in arviz/loo.
    """
    x = exceedances.detach().reshape(-1).to(dtype=torch.float64, device="cpu")
    n = x.numel()
    if n == 0:
        raise ValueError("gpd_fit needs at least one exceedance")
    if not bool(torch.isfinite(x).all()) or bool((x < 0).any()):
        raise ValueError("gpd_fit needs finite, non-negative exceedances")
    x, _ = torch.sort(x)
    x_max = x[-1]
    if not bool(x_max > 0):
        raise ValueError("gpd_fit needs at least one positive exceedance")
    # First-quartile order statistic (1-based index int(n/4 + 0.5), as arviz/loo). Guard against ties at 0
    # (it scales the grid, a zero would make the grid infinite): fall back to the smallest positive value.
    x_q = x[max(int(n / 4 + 0.5) - 1, 0)]
    if not bool(x_q > 0):
        x_q = x[x > 0][0]

    m = 30 + int(math.floor(math.sqrt(n)))
    j = torch.arange(1, m + 1, dtype=torch.float64)
    theta = 1.0 / x_max + (1.0 - torch.sqrt(m / (j - 0.5))) / (_PRIOR_BS * x_q)

    # k(θ_j) for every grid point: (m, n) matrix, fine for tails of a few thousand points.
    k_grid = torch.log1p(-theta[:, None] * x[None, :]).mean(dim=1)
    log_lik = n * (torch.log(-theta / k_grid) - k_grid - 1.0)
    # θ_j = 0 exactly would give 0/0; such a grid point simply gets no weight.
    log_lik = torch.where(torch.isfinite(log_lik), log_lik, torch.full_like(log_lik, -math.inf))
    # softmax == 1 / Σ_l exp(L_l − L_j) of arviz, but without overflow.
    weights = torch.softmax(log_lik, dim=0)
    # Drop negligible grid weights and renormalise (as arviz/loo).
    keep = weights >= 10 * torch.finfo(torch.float64).eps
    weights, theta = weights[keep], theta[keep]
    weights = weights / weights.sum()

    theta_post = torch.sum(theta * weights)
    k = torch.log1p(-theta_post * x).mean()
    sigma = -k / theta_post
    k = (n * k + _PRIOR_K_WEIGHT * _PRIOR_K_MEAN) / (n + _PRIOR_K_WEIGHT)
    return float(k), float(sigma)


def pareto_khat(log_weights: torch.Tensor) -> float:
    """Pareto k̂ of importance log-weights log w_i = S_i(θ') − S_i(θ) (docs/method.md §6).

    N = number of weights, tail length M = ceil(min(0.2 N, 3 sqrt(N))). The log-weights are stabilised by
    their max (k̂ is scale invariant), the M largest weights exp(log w − max) are taken as the tail and the
    (M+1)-th largest as the threshold u; the GPD is fitted to the exceedances w − u.

    Exceedances equal to zero (weights tied with the threshold) carry no tail information and are dropped.

    Returns:
        k̂ as a Python float, or ``float('nan')`` when k̂ is undefined: fewer than MIN_TAIL = 5 positive
        exceedances (e.g. N < ~25, or constant / heavily tied log-weights), N ≤ M, or any log-weight NaN or
        +inf. NaN (not inf) so that callers cannot mistake "undefined" for "infinitely heavy tail"; -inf
        log-weights (zero weights) are allowed.
    """
    lw = log_weights.detach().reshape(-1).to(dtype=torch.float64, device="cpu")
    n = lw.numel()
    if n == 0 or bool(torch.isnan(lw).any()) or bool(torch.isposinf(lw).any()):
        return float("nan")
    m_tail = int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n))))
    if m_tail < MIN_TAIL or n <= m_tail:
        return float("nan")

    lw_max = lw.max()
    if not bool(torch.isfinite(lw_max)):  # all -inf: every weight is zero
        return float("nan")
    top, _ = torch.topk(lw - lw_max, m_tail + 1, largest=True, sorted=True)
    tail_lw, cutoff_lw = top[:m_tail], top[m_tail]
    # Exceedances in weight space: exp(a) − exp(c) = exp(c)·expm1(a − c), accurate when a ≈ c.
    if bool(torch.isfinite(cutoff_lw)):
        exc = torch.exp(cutoff_lw) * torch.expm1(tail_lw - cutoff_lw)
    else:  # threshold weight is exactly 0
        exc = torch.exp(tail_lw)
    exc = exc[exc > 0]
    if exc.numel() < MIN_TAIL:
        return float("nan")
    k, _ = gpd_fit(exc)
    return k


def khat_threshold(n: int) -> float:
    """Sample-size dependent "good" threshold for k̂: min(1 − 1/log10 n, 0.7) (docs/method.md §6).

    For n ≤ 10 the formula is ≤ 0 (and undefined at n = 1); it is clamped at 0.0 there, the value it takes
    at n = 10, meaning no positive k̂ counts as good with so few samples (pareto_khat is NaN for n < ~25
    anyway). n < 1 raises ValueError.
    """
    if n < 1:
        raise ValueError(f"khat_threshold needs n >= 1, got {n}")
    if n <= 10:
        return 0.0
    return min(1.0 - 1.0 / math.log10(n), 0.7)
