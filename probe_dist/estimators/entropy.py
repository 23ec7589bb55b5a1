"""Entropy estimators at θ and their standard errors (docs/method.md §3, §9). Pure functions on float64 tensors.

λ_i is the per-sequence normaliser: T_i for the per-token estimator, 1 for the per-sequence one, so both
estimators are the ratio Ĥ = Σ h_i / Σ λ_i and share one delta-method standard error.
"""

from __future__ import annotations

import math

import torch


def normaliser_lengths(lengths: torch.Tensor, normalize: str) -> torch.Tensor:
    """λ_i: T_i (per_token) or 1 (per_sequence), float64."""
    if normalize == "per_token":
        return lengths.to(torch.float64)
    if normalize == "per_sequence":
        return torch.ones_like(lengths, dtype=torch.float64)
    raise ValueError(f"normalize must be 'per_token' or 'per_sequence', got {normalize!r}")


def ratio_influence(h_group: torch.Tensor, lam_group: torch.Tensor, entropy: float, sum_lam: float) -> torch.Tensor:
    """Per-group linearisation c_p = (h_p − Ĥ λ_p)/Σλ of the ratio Ĥ = Σh/Σλ (sums to 0 over all groups)."""
    return (h_group - entropy * lam_group) / sum_lam


def se_from_influence(sum_sq: float, num_groups: int) -> float:
    """SE² = n/(n−1)·Σ_p c_p² over the n groups (global sums). NaN with fewer than 2 groups."""
    if num_groups < 2:
        return float("nan")
    return math.sqrt(max(sum_sq, 0.0) * num_groups / (num_groups - 1))


def fixed_prompts_sum_sq(per_sequence: list[torch.Tensor]) -> float:
    """Σ_p G_p/(G_p−1) Σ_{i∈p} (c_i − c̄_p)²: the within-prompt part of the variance of Σ_i c_i (this rank's groups).

    per_sequence: one [G_p] float64 tensor of per-sequence influence values c_i per prompt group. Conditional on
    the prompt set, the G_p responses of prompt p are i.i.d., so Var(Σ_{i∈p} c_i | p) = G_p σ_p², estimated without
    bias by G_p/(G_p−1) Σ (c_i − c̄_p)²; prompt-level differences (what the population SE adds) drop out. Groups
    with one response carry no within-prompt information and add 0 (`estimators.se=fixed_prompts` needs G ≥ 2).
    Sum over ranks, then `math.sqrt` gives the SE conditional on the prompts (docs/method.md §9).
    """
    total = 0.0
    for c in per_sequence:
        g = c.numel()
        if g >= 2:
            total += g / (g - 1) * float((c - c.mean()).pow(2).sum())
    return total
