"""θ(η): the AdamW update vector u from the loaded optimizer state, and the two routes to θ' (docs/method.md §4).

update_vector: θ' = θ + ηu formed in float64 and cast once to the parameter dtype (never a tiny step added in
bf16). real_step: a real `optimizer.step()` with lr = η on the same gradient. The caller restores the snapshot.
"""

from __future__ import annotations

import torch

from probe_dist.update.adamw import AdamWHyper, UpdateParts, adamw_update_vector


def update_parts(optimizer: torch.optim.Optimizer, trainable: list[tuple[str, torch.nn.Parameter]],
                 grad: list[torch.Tensor]) -> list[UpdateParts]:
    """u = u_base + coef ⊙ g per trainable tensor, with each parameter's own group hyperparameters and state.

    A parameter whose group trains at k times the first group's lr (group["lr_ratio"] = k, `state.optimizer.
    set_lr_ratios`; 1 when absent) has u, u_base and coef scaled by k: η is the first group's learning rate.
    grad: float64 tensors in `trainable` order. Returns float64 CPU tensors shaped like the parameters.
    """
    parts = []
    for (_, p), g in zip(trainable, grad):
        group = next(gr for gr in optimizer.param_groups if any(q is p for q in gr["params"]))
        st = optimizer.state[p]
        hp = AdamWHyper(betas=tuple(group["betas"]), eps=group["eps"], weight_decay=group["weight_decay"],
                        amsgrad=bool(group.get("amsgrad", False)))
        part = adamw_update_vector(p, g, st["exp_avg"], st["exp_avg_sq"], step=float(st["step"]), hp=hp,
                                   max_exp_avg_sq=st.get("max_exp_avg_sq"))
        ratio = float(group.get("lr_ratio", 1.0))
        if ratio != 1.0:
            part = UpdateParts(u=ratio * part.u, u_base=ratio * part.u_base, grad_coef=ratio * part.grad_coef)
        parts.append(part)
    return parts


def set_theta(trainable: list[tuple[str, torch.nn.Parameter]], theta0: list[torch.Tensor], u: list[torch.Tensor],
              eta: float) -> None:
    """θ ← θ0 + ηu formed in float64, then cast to the parameter dtype."""
    with torch.no_grad():
        for (_, p), t0, ui in zip(trainable, theta0, u):
            p.copy_((t0.to(torch.float64) + eta * ui).to(p.dtype))


def real_step(optimizer: torch.optim.Optimizer, trainable: list[tuple[str, torch.nn.Parameter]],
              grad: list[torch.Tensor], eta: float) -> None:
    """One real `optimizer.step()` on the gradient g with the first group's lr = η and every other group's lr at
    its ratio to it (group["lr_ratio"]); .grad is cleared after."""
    with torch.no_grad():
        for (_, p), g in zip(trainable, grad):
            p.grad = g.to(device=p.device, dtype=p.dtype)
    for group in optimizer.param_groups:
        group["lr"] = eta * float(group.get("lr_ratio", 1.0))
    optimizer.step()
    for _, p in trainable:
        p.grad = None
