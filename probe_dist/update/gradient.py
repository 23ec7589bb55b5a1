"""The update gradient g = ∇L_U, streamed per microbatch into a float64 accumulator (docs/method.md §4).

Summing in .grad would round in float32 in an order that depends on how many groups a rank holds; float64 sums
of float32 terms are (practically) exact, so g — and u — are the same bits for any world size.
"""

from __future__ import annotations

import math

import torch

from probe_dist.config_schema import UpdateConfig
from probe_dist.model.runner import PolicyRunner
from probe_dist.rollout.batch import Group, RolloutBatch
from probe_dist.update.loss import LossNormalisers, sequence_normalisers, update_loss


def loss_normalisers(rt, batch: RolloutBatch, *, max_len: int) -> LossNormalisers:
    """Global counts (all-reduced before any backward) behind the per-sequence normalisers n_i."""
    real = batch.real_groups
    num_prompts, total_tokens = rt.sum_scalars(float(len(real)), float(sum(int(g.lengths.sum()) for g in real)))
    return LossNormalisers(num_prompts=int(num_prompts), group_size=batch.groups[0].size,
                           total_tokens=total_tokens, max_len=max_len)


def group_loss_backward(runner: PolicyRunner, group: Group, *, norm: LossNormalisers, update: UpdateConfig,
                        accumulator: list[torch.Tensor]) -> None:
    """Forward + backward of L_U on one group, microbatch by microbatch (`runner.sizes.grad` rows), each
    microbatch's gradient added at once to the float64 `accumulator` (param-shaped, see PolicyRunner).

    With a KL term the reference log-probs come from a no-grad forward of the same microbatch with the adapter
    disabled. Zero-weight padding groups still join the graph so every rank runs the same backward passes.
    accumulator: float64 tensors shaped like the trainable parameters (on runner's accumulator device).
    Raises ValueError for an unknown update.loss family.
    """
    normalisers = sequence_normalisers(update.loss, group.lengths, norm)
    for mb in group.microbatches(runner.sizes.grad):
        ref_logp = None
        if update.kl_coef:
            with runner.reference():
                ref_logp = runner.forward(mb, grad=False)[0].detach()
        token_logp, _ = runner.forward(mb, grad=True)
        loss = update_loss(token_logp, mb.token_rows_on(token_logp.device), group.advantages[mb.rows],
                           normalisers[mb.rows], kl_coef=update.kl_coef, token_ref_logp=ref_logp)
        (loss * group.weight).backward()
        runner.drain_grads_into(accumulator)


def update_gradient(rt, runner: PolicyRunner, batch: RolloutBatch,
                    update: UpdateConfig) -> tuple[list[torch.Tensor], float, float, LossNormalisers]:
    """g = ∇L_U over U (float64, CPU, all-reduced), clipped as in training.

    Returns (g, ‖g‖ before clipping, clip coefficient, the normalisers). The clip coefficient is
    min(1, max_norm/(‖g‖ + 1e-6)) as torch.nn.utils.clip_grad_norm_. `update` is the resolved section (L_max set).
    """
    norm = loss_normalisers(rt, batch, max_len=update.max_len)

    def start() -> list[torch.Tensor]:
        runner.zero_grads()
        return runner.new_accumulator()

    def step(_index: int, group: Group, accumulator: list[torch.Tensor]) -> None:
        group_loss_backward(runner, group, norm=norm, update=update, accumulator=accumulator)

    with runner.no_sync():
        accumulator = runner.run_groups(rt, "grad", batch.groups, start=start, step=step)
    grad = rt.sum_f64_vectors([a.cpu() for a in accumulator])
    total_norm = math.sqrt(sum(float((x * x).sum()) for x in grad))
    coef = 1.0
    if update.grad_clip and update.grad_clip > 0:
        coef = min(1.0, update.grad_clip / (total_norm + 1e-6))
        grad = [x * coef for x in grad]
    return grad, total_norm, coef, norm
