"""Curvature of the same-sample entropy estimator along u: δH₂ = ½η²·d²Ĥ/dη² (docs/method.md §10). Pure functions.

Along θ(η) = θ + ηu the SNIS estimator of §6 is Ĥ(η) = N(η)/D(η) with N = Σ w_i h_i(η), D = Σ w_i λ_i and
w_i = exp(S_i(η) − S_i(0)). With per-sequence directional derivatives S', S'', h', h'' at η = 0 (w = 1, w' = S',
w'' = S'' + S'²):

    N' = Σ (S'_i h_i + h'_i)        N'' = Σ ((S''_i + S'_i²) h_i + 2 S'_i h'_i + h''_i)
    D' = Σ S'_i λ_i                 D'' = Σ (S''_i + S'_i²) λ_i
    Ĥ' = (N' − Ĥ D')/D              Ĥ'' = (N'' − 2Ĥ' D' − Ĥ D'')/D

Ĥ' is the snis_derivative δH₁/η of §5.1. Each is a smooth function of six sums over sequences and homogeneous
of degree 0 in them, so its delta-method influence c_i = ∇f·X_i sums to 0 and gives standard errors over prompt
groups (population) or within prompts (fixed_prompts), as §9.
"""

from __future__ import annotations

import math

import torch

SUM_FIELDS = ("N", "dN", "ddN", "D", "dD", "ddD")


def path_sums(h: torch.Tensor, lam: torch.Tensor, dS: torch.Tensor, ddS: torch.Tensor, dh: torch.Tensor,
              ddh: torch.Tensor) -> torch.Tensor:
    """Per-sequence X_i = (h, N'_i, N''_i, λ, D'_i, D''_i) as [n, 6] float64 (inputs [n], any float dtype).

    h: entropy payload (nats), λ: normaliser (T_i or 1), dS/ddS and dh/ddh: first and second derivatives of S_i and
    h_i along u (nats per unit η, per unit η²). Raises nothing itself (torch raises on shape mismatch).
    """
    h, lam, dS, ddS, dh, ddh = (x.to(torch.float64) for x in (h, lam, dS, ddS, dh, ddh))
    w2 = ddS + dS * dS
    return torch.stack([h, dS * h + dh, w2 * h + 2 * dS * dh + ddh, lam, dS * lam, w2 * lam], dim=-1)


def first_derivative(x: torch.Tensor) -> torch.Tensor:
    """Ĥ'(0) from the global sums x [6] (a 0-dim float64 tensor, differentiable in x)."""
    n, dn, _, d, dd, _ = x.unbind(-1)
    return (dn - n / d * dd) / d


def second_derivative(x: torch.Tensor) -> torch.Tensor:
    """Ĥ''(0) from the global sums x [6] (a 0-dim float64 tensor, differentiable in x)."""
    n, dn, ddn, d, dd, ddd = x.unbind(-1)
    h = n / d
    h1 = (dn - h * dd) / d
    return (ddn - 2 * h1 * dd - h * ddd) / d


def influence(fn, total: torch.Tensor, per_unit: torch.Tensor) -> torch.Tensor:
    """Delta-method influence c_k = ∇f(total)·X_k of f = `fn` at the global sums `total` [6] for units X [n, 6]
    (sequences or groups); [n] float64. For f homogeneous of degree 0 the c_k over all units sum to 0.

    ∇f comes from reverse-mode autograd on a fresh float64 leaf, not `torch.func.grad`: torch.func's reverse
    transforms refuse to run under saved-tensor hooks, which `memory.profile` installs around every phase
    (plan.meter.SavedTensorsMeter); autograd.grad runs under them (the few bytes of this 6-element graph are
    metered like any other)."""
    x = total.detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(fn(x), x)
    return per_unit.to(torch.float64) @ grad


def linear_regime_eta(first: float, second: float, tolerance: float = 0.1) -> float:
    """The η at which the second-order term reaches `tolerance` of the first: |½η²Ĥ''| = tol·|ηĤ'|, i.e.
    η = 2·tol·|Ĥ'|/|Ĥ''| (inf when Ĥ'' = 0, 0 when Ĥ' = 0; NaN if either is not finite)."""
    if not (math.isfinite(first) and math.isfinite(second)):
        return float("nan")
    if second == 0.0:
        return math.inf
    return 2.0 * tolerance * abs(first) / abs(second)
