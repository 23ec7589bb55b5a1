"""Predicted change δH₁ (docs/method.md §5): surrogate coefficients and the delta-method standard error.

With payload values φ_{i,t} (H_{i,t} for RB, −ℓ_{i,t} for naive) and λ_i (T_i or 1), per microbatch we form
  surrogate₁ = Σ_i [ Σ_t φ_{i,t}(θ) + Σ_t a_{i,t} ℓ_{i,t}(θ) ] / Σλ   with fixed coefficients a,
  surrogate₂ = Σ_i Σ_t b_{i,t} ℓ_{i,t}(θ)
so that ∇surrogate₁·u summed over all groups is δH₁/η, and ∇surrogate₂·u is the Σ λ∇S·u piece of its SE.

snis_derivative: a_{i,t} = h_i − Ĥ λ_i,   b_{i,t} = λ_i            (exact η-derivative of the §6 estimator)
causal_rb:       a_{i,t} = Σ_{t'≥t} φ_{i,t'} − H_{i,t} − Ĥ λ_{i,t}^{>},  b_{i,t} = λ_{i,t}^{>}
                 (entropy-to-go with baseline b = H_{i,t}; tokens-to-go λ^{>} = T_i − t per token, 0 per sequence)
"""

from __future__ import annotations

import torch


def surrogate_coefficients(phi: torch.Tensor, rb_entropy: torch.Tensor, token_row: torch.Tensor, *,
                           num_rows: int, entropy: float, method: str, normalize: str):
    """Per-token coefficients (a, b) for one microbatch, float64, no grad (docs/method.md §5.1, §5.2).

    phi, rb_entropy: [M] flat per-token payload φ and RB entropies H (row-major over rows, any float dtype, nats);
    token_row: [M] long row index in [0, num_rows); entropy: Ĥ(θ) in nats; method: "snis_derivative" or
    "causal_rb"; normalize: "per_token" (λ_i = T_i) or otherwise per sequence (λ_i = 1). Returns two [M] float64
    tensors on phi's device. Raises ValueError for an unknown method.
    """
    phi = phi.detach().to(torch.float64)
    h_row = torch.zeros(num_rows, dtype=torch.float64, device=phi.device).index_add_(0, token_row, phi)
    counts = torch.bincount(token_row, minlength=num_rows).to(torch.float64)
    lam_row = counts if normalize == "per_token" else torch.ones_like(counts)
    if method == "snis_derivative":
        a = (h_row - entropy * lam_row)[token_row]
        b = lam_row[token_row]
        return a, b
    if method != "causal_rb":
        raise ValueError(f"unknown delta_h1 method {method!r}")
    # Reverse cumulative sums within each row (rows are contiguous in the flat layout).
    to_go = _reverse_cumsum_by_row(phi, token_row, num_rows)
    if normalize == "per_token":
        tokens_after = _reverse_cumsum_by_row(torch.ones_like(phi), token_row, num_rows) - 1.0
    else:
        tokens_after = torch.zeros_like(phi)
    a = to_go - rb_entropy.detach().to(torch.float64) - entropy * tokens_after
    return a, tokens_after


def surrogate_terms(phi: torch.Tensor, token_logp: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
                    sum_lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(surrogate₁, surrogate₂) of one microbatch: float64 scalars differentiable through φ and ℓ.

    surrogate₁ = (Σ_t φ_{i,t} + Σ_t a_{i,t} ℓ_{i,t}) / Σλ and surrogate₂ = Σ_t b_{i,t} ℓ_{i,t}, with phi, token_logp
    [M] per-token (with grad; nats) and a, b [M] float64 coefficients from `surrogate_coefficients` (no grad);
    sum_lam: the global Σλ (tokens or sequences, > 0). Raises nothing itself (torch raises on shape mismatch).
    """
    surrogate1 = (phi.double().sum() + (a * token_logp.double()).sum()) / sum_lam
    surrogate2 = (b * token_logp.double()).sum()
    return surrogate1, surrogate2


def _reverse_cumsum_by_row(values: torch.Tensor, token_row: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Σ_{t'≥t} values within each row, for a flat row-major layout."""
    total = torch.cumsum(values, 0)
    row_total = torch.zeros(num_rows, dtype=values.dtype, device=values.device).index_add_(0, token_row, values)
    row_end = torch.cumsum(row_total, 0)  # inclusive prefix sum at each row's end
    before = total - values  # exclusive prefix sum
    return row_end[token_row] - before


def delta_h1_influence(q_group: torch.Tensor, lam_group: torch.Tensor, h_group: torch.Tensor, *, value: float,
                       sum_lam: float, entropy: float, sum_b: float) -> torch.Tensor:
    """Per-group linearisation of δH₁/η = (Σa − Ĥ Σb)/Σλ in the group totals:
    c_p = q_p − (δH₁/η) λ_p/Σλ − (Σb/Σλ²)(h_p − Ĥ λ_p), with q_p = group p's ∇surrogate₁·u (sums to 0 over groups).

    q_group, lam_group, h_group: [P] float64 per-group totals; value = δH₁/η (nats per unit η), entropy = Ĥ (nats),
    sum_lam, sum_b: global scalars. Returns [P] float64. Raises nothing itself (torch raises on shape mismatch)."""
    return q_group - value * lam_group / sum_lam - (sum_b / sum_lam ** 2) * (h_group - entropy * lam_group)
