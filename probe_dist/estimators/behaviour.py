"""Sampler weights: E drawn by another sampler q (vLLM's engine, any external rollout backend) instead of π_θ
(docs/method.md §13). Pure float64 functions; the runtime reduces between them (scoring/behaviour.py).

Every estimator of §3, §5 and §6 is a ratio of sums over E's sequences; with responses drawn from q each sequence
carries the importance ratio ρ_i = π_θ(y_i)/q(y_i), so each sum Σ_i x_i becomes Σ_i v_i x_i with the
self-normalised weights v_i ∝ ρ_i (optionally truncated at a cap c, as the truncated importance sampling — TIS — of
verl and TRL's `vllm_importance_sampling_cap`): Ĥ = Σ v h / Σ v λ, and along θ + ηu the weight is v_i·w_i(η)
because q does not move.
"""

from __future__ import annotations

import math

import torch


def log_sampler_ratio(logp_target: torch.Tensor, logp_sampler: torch.Tensor) -> torch.Tensor:
    """log ρ_i = S_i(θ) − log q(y_i): [N] float64 (inputs [N] per-sequence log-probs in nats, any float dtype)."""
    return logp_target.to(torch.float64) - logp_sampler.to(torch.float64)


def truncate_log_ratio(log_rho: torch.Tensor, cap: float | None) -> torch.Tensor:
    """min(log ρ_i, log c): the truncated ratio of TIS (Ionides 2008; verl's and TRL's `*_importance_sampling_cap`),
    [N] float64. cap None leaves log ρ as it is. Raises ValueError for a cap ≤ 0."""
    if cap is None:
        return log_rho
    if not cap > 0:
        raise ValueError(f"the sampler-weight cap must be > 0, got {cap!r}")
    return log_rho.clamp(max=math.log(cap))


def sampler_weights(log_rho: torch.Tensor, global_max: float) -> torch.Tensor:
    """v_i = exp(log ρ_i − max_j log ρ_j): [N] float64 in (0, 1], the largest exactly 1. Self-normalised estimators
    are invariant to the scale, so the stabilisation changes nothing but overflow (global_max: over all ranks)."""
    return torch.exp(log_rho.to(torch.float64) - global_max)


# Layout of the local sums that are all-reduced (SUM) across ranks.
SAMPLER_SUM_FIELDS = ("sum_v", "sum_v2", "count", "truncated", "sum_neg_log_rho", "sum_abs_log_rho", "tokens",
                      "sum_rho_scaled")


def sampler_local_sums(log_rho: torch.Tensor, log_rho_used: torch.Tensor, global_max: float, global_max_raw: float,
                       lengths: torch.Tensor) -> torch.Tensor:
    """[Σv, Σv², N, #truncated, Σ(−log ρ), Σ|log ρ|, ΣT, Σ exp(log ρ − max log ρ)] as [8] float64, laid out as
    SAMPLER_SUM_FIELDS.

    log_rho: [N] the untruncated log ρ_i; log_rho_used: after `truncate_log_ratio`; global_max: the global max of
    log_rho_used, global_max_raw of log_rho; lengths: [N] T_i. The untruncated ratios' sum (scaled by
    exp(−max log ρ)) gives the mean ratio, whose expectation under q is 1 when q covers π_θ.
    """
    v = sampler_weights(log_rho_used, global_max)
    return torch.stack([v.sum(), (v * v).sum(), torch.tensor(float(log_rho.numel()), dtype=torch.float64),
                        (log_rho_used < log_rho).sum().to(torch.float64), (-log_rho).sum(), log_rho.abs().sum(),
                        lengths.to(torch.float64).sum(), torch.exp(log_rho - global_max_raw).sum()])


def sampler_diagnostics(sums: torch.Tensor, global_max_raw: float) -> dict[str, float]:
    """From the global SAMPLER_SUM_FIELDS sums: Kish ESS of v and ESS/N, the largest self-normalised weight, the
    share of truncated ratios, KL(q‖π_θ) per sequence estimated by mean(−log ρ) on q's samples (nats), the mean
    |log ρ| per token (nats: how far the sampler's log-probs are from the scorer's), and the mean ratio
    (1/N)Σρ_i (≈ 1 when q covers π_θ; well below 1 means q misses mass π_θ puts somewhere)."""
    s = dict(zip(SAMPLER_SUM_FIELDS, sums.tolist()))
    n = s["count"]
    ess = s["sum_v"] ** 2 / s["sum_v2"] if s["sum_v2"] > 0 else float("nan")
    log_mean = math.log(s["sum_rho_scaled"] / n) + global_max_raw if n > 0 and s["sum_rho_scaled"] > 0 else -math.inf
    return {"ess": ess, "ess_frac": ess / n if n else float("nan"), "max_weight": 1.0 / s["sum_v"],
            "trunc_frac": s["truncated"] / n if n else float("nan"), "kl": s["sum_neg_log_rho"] / n if n else math.nan,
            "log_ratio_per_token": s["sum_abs_log_rho"] / s["tokens"] if s["tokens"] else float("nan"),
            "mean_ratio": math.exp(log_mean) if log_mean < 700 else math.inf}
