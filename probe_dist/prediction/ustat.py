"""Single-batch δH₁ (E = U) by the U-statistic of docs/method.md §5.3, in dot-product form.

X_p = ∇ of unit p's entropy surrogate, Y_p = coef ⊙ (clip · ∇ unit p's loss) — u's gradient part, linearised
through the fixed AdamW denominator. Units are prompt groups (exact) or contiguous blocks of this rank's groups;
only the current unit's two param-sized sums are held, so memory does not grow with B.

The SE reported next to it is the two-batch delta-method SE of ∇Ĥ·u (conditional on u); the U-statistic has no
SE of its own here (that would need every unit's Y_p dotted with the final ΣX, i.e. a second pass).
"""

from __future__ import annotations

import torch

from probe_dist.config_schema import EstimatorsConfig, UpdateConfig
from probe_dist.estimators.ustat import block_assignments, u_statistic_dot
from probe_dist.model.runner import PolicyRunner
from probe_dist.results import UpdateGradient
from probe_dist.rollout.batch import RolloutBatch
from probe_dist.update.gradient import block_loss_backward


def vector_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Σ over tensors of a·b in float64 (lists of param-shaped tensors)."""
    return float(sum(float((x.reshape(-1).double() * y.reshape(-1).double()).sum()) for x, y in zip(a, b)))


def ustat_units(batch_u: RolloutBatch, est: EstimatorsConfig) -> list[list[int]]:
    """Group indices of each U-statistic unit: one real group each (exact) or contiguous blocks of them."""
    real = [i for i, g in enumerate(batch_u.groups) if g.weight > 0]
    if est.ustat == "exact":
        return [[i] for i in real]
    return [[real[j] for j in block] for block in block_assignments(len(real), min(est.ustat_blocks, len(real)))]


class SingleBatchUStatistic:
    """The single-batch (E = U) U-statistic of δH₁/η (docs/method.md §5.3), accumulated one unit at a time:
    `add_group` for every E = U group in order, then `finish` once on every rank."""

    def __init__(self, runner: PolicyRunner, batch_u: RolloutBatch, update_grad: UpdateGradient, *,
                 est: EstimatorsConfig, update: UpdateConfig):
        """Accumulator for the U-statistic over batch_u's real groups (units per est.ustat / est.ustat_blocks).

        update_grad: U's clipped gradient with its per-tensor AdamW coefficients (param-shaped float64 tensors);
        update: the config of the training loss. Raises nothing itself.
        """
        self.runner, self.batch_u, self.update_grad, self.update = runner, batch_u, update_grad, update
        self.coef = [pt.grad_coef for pt in update_grad.parts]
        units = ustat_units(batch_u, est)
        self.unit_of = {gi: k for k, gis in enumerate(units) for gi in gis}
        self.last_of_unit = {gis[-1] for gis in units}
        self.reset()

    def reset(self) -> None:
        """Drop the current unit's sums and the diagonal Σ_p X_p·Y_p (a restarted phase starts from here)."""
        self.x_unit = self.y_unit = None
        self.diag = 0.0

    def add_group(self, gi: int, x_p: list[torch.Tensor]) -> None:
        """Add E = U group gi: its ∇ surrogate X_p (given) and its loss gradient Y_p (one more backward)."""
        if gi not in self.unit_of:  # zero-weight padding
            return
        runner = self.runner
        runner.zero_grads()
        g_p = runner.new_accumulator()
        with runner.no_sync():
            block_loss_backward(runner, [self.batch_u.groups[gi]], norm=self.update_grad.normalisers,
                                update=self.update, accumulator=g_p)
        g_p = [g.cpu() for g in g_p]
        if self.x_unit is None:
            self.x_unit, self.y_unit = [x.clone() for x in x_p], g_p
        else:
            self.x_unit = [a + b for a, b in zip(self.x_unit, x_p)]
            self.y_unit = [a + b for a, b in zip(self.y_unit, g_p)]
        if gi in self.last_of_unit:
            clip = self.update_grad.clip_coef
            self.diag += clip * vector_dot(self.x_unit, [c * y for c, y in zip(self.coef, self.y_unit)])
            self.x_unit = self.y_unit = None

    def finish(self, rt, grad_entropy: list[torch.Tensor]) -> tuple[float, int]:
        """(U-statistic δH₁/η, number of units B) from the all-reduced ∇Ĥ = ΣX and the global diagonal."""
        diag, n_units = rt.sum_scalars(self.diag, float(len(self.last_of_unit)))
        grad = self.update_grad.grad  # already clipped
        bars_dot = vector_dot(grad_entropy, [c * g for c, g in zip(self.coef, grad)])
        base_term = vector_dot(grad_entropy, [pt.u_base for pt in self.update_grad.parts])
        b = int(n_units)
        # X·u_grad = Σ_{p,q} X_p·Y_q; the U-statistic drops the same-unit (diagonal) terms: B²·mean over p≠q.
        return base_term + b * b * u_statistic_dot(bars_dot, diag, b), b
