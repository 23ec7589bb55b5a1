"""The training loss L_U (docs/method.md §4) — the one function every path (toy training, real step, update vector) uses.

L_U = Σ_i n_i Σ_t ( −A_i ℓ_{i,t} + β·k3_{i,t} ), with per-sequence normalisers n_i fixed by the loss family from
*global* counts (all-reduced before any backward), so per-microbatch losses simply add up to the batch loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_FAMILIES = ("grpo", "dr_grpo", "dapo")


@dataclass(frozen=True)
class LossNormalisers:
    """Global counts the normalisers need: B prompts, G responses per prompt, total scored tokens, L_max."""

    num_prompts: int
    group_size: int
    total_tokens: float
    max_len: int


def sequence_normalisers(family: str, lengths: torch.Tensor, norm: LossNormalisers) -> torch.Tensor:
    """n_i (float64) for the sequences with lengths T_i.

    grpo:    token mean per sequence, mean over all B·G sequences → 1 / (B·G·T_i)
    dr_grpo: Σ_t / (G·L_max) per prompt, mean over prompts         → 1 / (B·G·L_max)
    dapo:    token mean over every token of the batch              → 1 / T_tot
    """
    t = lengths.to(torch.float64)
    if family == "grpo":
        return 1.0 / (norm.num_prompts * norm.group_size * t.clamp_min(1.0))
    if family == "dr_grpo":
        return torch.full_like(t, 1.0 / (norm.num_prompts * norm.group_size * norm.max_len))
    if family == "dapo":
        return torch.full_like(t, 1.0 / norm.total_tokens)
    raise ValueError(f"unknown loss family {family!r}; expected one of {LOSS_FAMILIES}")


def kl_k3(token_logp: torch.Tensor, token_ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ ‖ π_ref) on samples from π_θ: e^{ref−ℓ} − (ref−ℓ) − 1 (as in GRPO)."""
    delta = token_ref_logp - token_logp
    return torch.exp(delta) - delta - 1.0


def update_loss_token_terms(token_logp: torch.Tensor, token_row: torch.Tensor, advantages: torch.Tensor,
                            normalisers: torch.Tensor, *, kl_coef: float = 0.0,
                            token_ref_logp: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token terms n_i (−A_i ℓ_{i,t} + β k3_{i,t}) of L_U: [M] float64, differentiable through token_logp.

    token_logp [M] (flat over scored tokens), token_row [M] row index of each token, advantages [n], normalisers
    [n] (float64, no grad); kl_coef = β; token_ref_logp [M]: the reference log-probs (nats). Raises ValueError if
    kl_coef is non-zero and token_ref_logp is None.
    """
    per_token = -advantages.to(token_logp.device)[token_row] * token_logp.double()
    if kl_coef:
        if token_ref_logp is None:
            raise ValueError("kl_coef > 0 needs the reference log-probs (adapter disabled)")
        per_token = per_token + kl_coef * kl_k3(token_logp.double(), token_ref_logp.double().to(token_logp.device))
    return normalisers.to(token_logp.device)[token_row] * per_token


def update_loss(token_logp: torch.Tensor, token_row: torch.Tensor, advantages: torch.Tensor,
                normalisers: torch.Tensor, *, kl_coef: float = 0.0,
                token_ref_logp: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i n_i Σ_t (−A_i ℓ_{i,t} + β k3_{i,t}) for one microbatch: a float64 scalar (see update_loss_token_terms)."""
    return update_loss_token_terms(token_logp, token_row, advantages, normalisers, kl_coef=kl_coef,
                                   token_ref_logp=token_ref_logp).sum()


def update_loss_per_sequence(token_logp: torch.Tensor, token_row: torch.Tensor, advantages: torch.Tensor,
                             normalisers: torch.Tensor, *, num_rows: int, kl_coef: float = 0.0,
                             token_ref_logp: torch.Tensor | None = None) -> torch.Tensor:
    """Each sequence's share L_i of the loss, [num_rows] float64 (Σ_i L_i = update_loss), differentiable through
    token_logp: what the per-sequence decomposition of δH₁ differentiates (explain/decompose.py)."""
    terms = update_loss_token_terms(token_logp, token_row, advantages, normalisers, kl_coef=kl_coef,
                                    token_ref_logp=token_ref_logp)
    return torch.zeros(num_rows, dtype=terms.dtype, device=terms.device).index_add(0, token_row.to(terms.device),
                                                                                    terms)
