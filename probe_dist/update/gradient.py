"""The update gradient g = ∇L_U, streamed per microbatch into a float64 accumulator (docs/method.md §4).

Summing in .grad would round in float32 in an order that depends on how many groups a rank holds; float64 sums
of float32 terms are (practically) exact, so g — and u — are the same bits for any world size.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext

import torch

from probe_dist.config_schema import UpdateConfig
from probe_dist.model.runner import PolicyRunner
from probe_dist.rollout.batch import Group, RolloutBatch, block_microbatches, gather_rows
from probe_dist.update.grade import GRADE_FAMILIES, GradeObjective, GradeStats, group_grade_backward
from probe_dist.update.loss import LossNormalisers, LossSpec, RowCoefficients, row_coefficients, update_loss

log = logging.getLogger("probe_dist")


def training_autocast(runner: PolicyRunner, update: UpdateConfig):
    """The autocast context of the training forward: bf16 with update.autocast=bfloat16 (TRL's bf16=True), else
    none. Only the gradient passes use it; scoring stays in the probe's dtype."""
    if update.autocast == "bfloat16":
        return torch.autocast(device_type=runner.device.type, dtype=torch.bfloat16)
    return nullcontext()


def loss_normalisers(rt, batch: RolloutBatch, *, update: UpdateConfig,
                     runner: PolicyRunner | None = None) -> LossNormalisers:
    """Global counts behind the per-sequence coefficients of L_U, gathered before any backward.

    Counts per block (update.loss_block_rows consecutive sequences in global prompt-major order, or all of U):
    unmasked tokens (update.mask_truncated drops responses without an EOS); with update.top_entropy_quantile < 1,
    a no-grad pass over U (`runner`, required then) gives every token's entropy, and each block's threshold is
    TRL's torch.quantile(float32 entropies of the block's kept tokens, 1 − q); with update.entropy_coef, each
    block's bonus denominator Σ e·m. Every rank computes the same numbers from the gathered per-group values.
    """
    spec = LossSpec.from_config(update)
    real = batch.real_groups
    size = batch.groups[0].size
    local = {g.prompt_index: g.lengths.to(torch.float64) * g.kept(update.mask_truncated) for g in real}
    entropies = _token_entropies(rt, runner, batch, update) if update.top_entropy_quantile < 1.0 else {}
    kept_rows = {g.prompt_index: g.kept(update.mask_truncated) for g in real}
    kept_entropies = {p: [h if bool(k) else torch.zeros(0) for h, k in zip(rows, kept_rows[p])]
                      for p, rows in entropies.items()}
    merged_tokens, merged_h = {}, {}
    for part in rt.all_gather_objects((local, kept_entropies)):
        merged_tokens.update(part[0])
        merged_h.update(part[1])
    order = sorted(merged_tokens)
    kept_lengths = torch.cat([merged_tokens[p] for p in order]) if order else torch.zeros(0, dtype=torch.float64)
    num_rows = kept_lengths.numel()
    block_rows = update.loss_block_rows or max(num_rows, 1)
    if update.loss_block_rows and num_rows % update.loss_block_rows and rt.is_main:
        log.warning("update.loss_block_rows=%d does not divide U's %d sequences: the last micro-step block is "
                    "smaller than in any TRL run (per_device_train_batch_size divides the generation batch there)",
                    update.loss_block_rows, num_rows)
    num_blocks = max(math.ceil(num_rows / block_rows), 1)
    block_of_row = torch.arange(num_rows) // block_rows
    block_tokens = torch.zeros(num_blocks, dtype=torch.float64).index_add_(0, block_of_row, kept_lengths)
    thresholds: tuple[float, ...] = ()
    bonus: tuple[float, ...] = ()
    masks: dict = {}
    if update.top_entropy_quantile < 1.0:
        rows_h = [h for p in order for h in merged_h[p]]  # per row: float32 entropies of its kept tokens
        thr, bonus_list = [], []
        for b in range(num_blocks):
            tokens = [rows_h[r] for r in range(b * block_rows, min((b + 1) * block_rows, num_rows))]
            values = torch.cat(tokens) if tokens else torch.zeros(0)
            if values.numel() == 0:
                thr.append(math.inf)  # TRL: no token of the block passes
                bonus_list.append(0.0)
                continue
            t = torch.quantile(values, 1.0 - update.top_entropy_quantile)
            thr.append(float(t))
            bonus_list.append(float((values >= t).sum()))
        thresholds, bonus = tuple(thr), tuple(bonus_list)
        # The mask of this rank's tokens from the same entropy values the thresholds came from (TRL takes both from
        # one forward): tokens of one prompt often tie exactly (shared prefixes), and a tie at the threshold must
        # not flip with the rounding of another forward.
        masks = {}
        position = {p: k for k, p in enumerate(order)}
        for p, rows in entropies.items():
            row0 = position[p] * size
            masks[p] = [h >= thresholds[(row0 + i) // block_rows] for i, h in enumerate(rows)]
    elif spec.entropy_coef:
        bonus = tuple(float(x) for x in block_tokens)
    return LossNormalisers(num_prompts=len(order), group_size=size, total_tokens=float(kept_lengths.sum()),
                           max_len=update.max_len, block_rows=update.loss_block_rows,
                           block_tokens=tuple(float(x) for x in block_tokens) if update.loss_block_rows else (),
                           block_threshold=thresholds, block_bonus_tokens=bonus, entropy_masks=masks)


def _token_entropies(rt, runner: PolicyRunner | None, batch: RolloutBatch, update: UpdateConfig) -> dict:
    """{prompt index: [per-row float32 CPU tensors of the token entropies]} for this rank's real groups, from one
    no-grad forward per microbatch of a block (`runner.sizes.score` rows) under the training autocast."""
    if runner is None:
        raise ValueError("update.top_entropy_quantile < 1 needs a runner for the entropy pre-pass")

    def step(_i: int, block: list[Group], out: dict) -> None:
        rows: list[list] = [[None] * g.size for g in block]
        for mb in block_microbatches(block, runner.sizes.score):
            with training_autocast(runner, update):
                _, token_h = runner.forward(mb, grad=False)
            token_h = token_h.detach().float().cpu()
            for i, (j, r) in enumerate(zip(mb.row_group, mb.row_index)):
                rows[j][r] = token_h[mb.token_rows == i]
        for group, group_rows in zip(block, rows):
            if group.weight > 0:
                out[group.prompt_index] = group_rows

    return runner.run_groups(rt, "score", batch.blocks(), start=dict, step=step)


def block_loss_backward(runner: PolicyRunner, groups: list[Group], *, norm: LossNormalisers, update: UpdateConfig,
                        accumulator: list[torch.Tensor]) -> None:
    """Forward + backward of L_U on a block of groups, microbatch by microbatch (`runner.sizes.grad` rows that may
    span groups: `rollout.batch.block_microbatches`), each microbatch's gradient added at once to the float64
    `accumulator` (param-shaped, see PolicyRunner). With one group, that group's own microbatches.

    With a KL term the reference log-probs come from a no-grad forward of the same microbatch with the adapter
    disabled. Forwards run under the training autocast (update.autocast). Zero-weight padding groups still join
    the graph (with coefficients 0) so every rank runs the same backward passes.
    accumulator: float64 tensors shaped like the trainable parameters (on runner's accumulator device).
    Raises ValueError for an unknown update.loss family.
    """
    spec = LossSpec.from_config(update)
    coefficients = [row_coefficients(spec, g, norm, kept=g.kept(update.mask_truncated)) for g in groups]
    advantages = [g.advantages.to(torch.float64) for g in groups]
    weights = [float(g.weight) for g in groups]
    for mb in block_microbatches(groups, runner.sizes.grad):
        ref_logp = None
        with training_autocast(runner, update):
            if update.kl_coef:
                with runner.reference():
                    ref_logp = runner.forward(mb, grad=False)[0].detach()
            token_logp, token_h = runner.forward(mb, grad=True)
        rows = RowCoefficients.gather(coefficients, mb.row_group, mb.row_index, weights)
        loss = update_loss(token_logp, token_h, mb.token_rows_on(token_logp.device), gather_rows(mb, advantages),
                           rows, spec, token_ref_logp=ref_logp)
        loss.backward()
        runner.drain_grads_into(accumulator)


def update_gradient(rt, runner: PolicyRunner, batch: RolloutBatch, update: UpdateConfig, *,
                    grade: GradeObjective | None = None,
                    ) -> tuple[list[torch.Tensor], float, float, LossNormalisers | GradeStats]:
    """g = ∇L_U over U (float64, CPU, all-reduced), clipped as in training.

    Returns (g, ‖g‖ before clipping, clip coefficient, the normalisers — for GRADE its rollout statistics). The
    clip coefficient is min(1, max_norm/(‖g‖ + 1e-6)) as torch.nn.utils.clip_grad_norm_. `update` is the resolved
    section (L_max set). GRADE families (update.loss grade, grade_st) need `grade` and use only U's prompts.
    """
    if update.loss in GRADE_FAMILIES:
        if grade is None:
            raise ValueError(f"update.loss={update.loss} needs the GRADE objective (reward model, spec, seed)")
        local_rows = float(sum(g.size for g in batch.real_groups))
        num_rows = int(rt.sum_f64(torch.tensor([local_rows], dtype=torch.float64))[0])
        sums = torch.zeros(2, dtype=torch.float64)

        def step(_index: int, group: Group, accumulator: list[torch.Tensor]) -> None:
            with training_autocast(runner, update):
                group_grade_backward(runner, group, objective=grade, num_rows=num_rows, accumulator=accumulator,
                                     sums=sums)
    else:
        norm = loss_normalisers(rt, batch, update=update, runner=runner)

        def step(_index: int, block: list[Group], accumulator: list[torch.Tensor]) -> None:
            block_loss_backward(runner, block, norm=norm, update=update, accumulator=accumulator)

    def start() -> list[torch.Tensor]:
        runner.zero_grads()
        if update.loss in GRADE_FAMILIES:
            sums.zero_()  # an out-of-memory retry starts the phase over
        return runner.new_accumulator()

    with runner.no_sync():  # GRADE: a group at a time; the teacher-forced loss: a block at a time
        units = batch.groups if update.loss in GRADE_FAMILIES else batch.blocks()
        accumulator = runner.run_groups(rt, "grad", units, start=start, step=step)
    grad = rt.sum_f64_vectors([a.cpu() for a in accumulator])
    if update.loss in GRADE_FAMILIES:
        total = rt.sum_f64_vectors([sums])[0]
        norm = GradeStats(num_rows=num_rows, reward_mean=float(total[0]) / num_rows, kl_mean=float(total[1]) / num_rows)
    total_norm = math.sqrt(sum(float((x * x).sum()) for x in grad))
    coef = 1.0
    if update.grad_clip and update.grad_clip > 0:
        coef = min(1.0, update.grad_clip / (total_norm + 1e-6))
        grad = [x * coef for x in grad]
    return grad, total_norm, coef, norm
