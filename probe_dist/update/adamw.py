"""The exact torch AdamW step as a vector: θ(η) = θ + η·u is the state after one real step with lr = η (docs/method.md §4).

t = s+1, m' = β1 m + (1−β1) g, v' = β2 v + (1−β2) g², denom = √v'/√(1−β2^t) + ε (amsgrad: √max(v_max, v')),
Δθ = −lr·wd·θ − (lr/(1−β1^t))·m'/denom, and Δθ is exactly linear in lr, so u = Δθ/lr.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdamWHyper:
    """One param group's AdamW hyperparameters besides the lr (torch.optim.AdamW's betas, eps, weight_decay,
    amsgrad); the lr is η."""

    betas: tuple[float, float]
    eps: float
    weight_decay: float
    amsgrad: bool = False


@dataclass
class UpdateParts:
    """u = u_base + coef ⊙ g: u_base does not depend on the update batch; coef is the linearised gradient map."""

    u: torch.Tensor
    u_base: torch.Tensor
    grad_coef: torch.Tensor  # −(1−β1)/((1−β1^t)·denom), elementwise


def adamw_update_vector(theta: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                        step: float, hp: AdamWHyper, max_exp_avg_sq: torch.Tensor | None = None) -> UpdateParts:
    """All inputs are upcast to float64; returns float64 tensors shaped like theta.

    theta, grad, exp_avg, exp_avg_sq (and max_exp_avg_sq, used only with hp.amsgrad): same shape, any device/dtype
    (results on the CPU); step: optimizer steps taken so far (u is for step + 1), u per unit learning rate.
    Raises nothing itself (torch raises on shape mismatch).
    """
    beta1, beta2 = hp.betas
    theta, grad, m, v = (x.detach().to("cpu", torch.float64) for x in (theta, grad, exp_avg, exp_avg_sq))
    t = float(step) + 1.0
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    v_new = beta2 * v + (1.0 - beta2) * grad * grad
    if hp.amsgrad:
        v_max = max_exp_avg_sq.detach().to("cpu", torch.float64) if max_exp_avg_sq is not None else torch.zeros_like(v)
        v_new = torch.maximum(v_max, v_new)
    denom = v_new.sqrt() / (bc2 ** 0.5) + hp.eps
    u_base = -hp.weight_decay * theta - (beta1 * m) / (bc1 * denom)
    grad_coef = -(1.0 - beta1) / (bc1 * denom)
    return UpdateParts(u=u_base + grad_coef * grad, u_base=u_base, grad_coef=grad_coef)
