"""The covariance proxy of Cui et al. (2025), "The Entropy Mechanism of Reinforcement Learning for Reasoning
Language Models", arXiv 2505.22617, computed on the update batch (docs/method.md §11). Pure float64 functions.

For a softmax policy whose logits take one policy-gradient step of size η_z, the entropy change at a state is
    natural gradient:  ΔH ≈ −η_z · Cov_{a∼π}( log π(a|s), A(s,a) )
    vanilla (softmax):  ΔH ≈ −η_z · Cov_{a∼π}( log π(a|s), π(a|s)·A(s,a) )
estimated, as the paper's Clip-Cov/KL-Cov code does, by the covariance over all response tokens t of the batch
between ℓ_t = log π(y_t) and the sequence's advantage A_i (times π(y_t) = e^{ℓ_t} for the vanilla form), centred
at the batch means. η_z is a step in logit space, not the optimizer's learning rate, so the proxy predicts the
sign and the per-sequence pattern of the change, not δH₁'s magnitude.
"""

from __future__ import annotations

import torch

SUM_FIELDS = ("count", "x", "a", "xa", "pa", "xpa")


def cov_logp_adv(s: torch.Tensor) -> torch.Tensor:
    """Cov(ℓ, A) over tokens from sums s [6] (population covariance: Σ(ℓ−ℓ̄)(A−Ā)/M); differentiable in s."""
    m, x, a, xa = s[0], s[1], s[2], s[3]
    return xa / m - (x / m) * (a / m)


def cov_logp_pi_adv(s: torch.Tensor) -> torch.Tensor:
    """Cov(ℓ, π·A) over tokens from sums s [6]; differentiable in s."""
    m, x, pa, xpa = s[0], s[1], s[4], s[5]
    return xpa / m - (x / m) * (pa / m)
