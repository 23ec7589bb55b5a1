"""Score sampled sequences: per-sequence S, h, T on every group, and Ĥ(θ) with its SE (docs/method.md §3, §9)."""

from __future__ import annotations

import math

import torch

from probe_dist.estimators.entropy import (
    fixed_prompts_sum_sq,
    normaliser_lengths,
    ratio_influence,
    se_from_influence,
)
from probe_dist.model.runner import PolicyRunner
from probe_dist.results import BaseEntropy, SequenceScores
from probe_dist.rollout.batch import Group, RolloutBatch, block_microbatches


def score_group(runner: PolicyRunner, group: Group) -> SequenceScores:
    """S_i and Σ_t H_{i,t} per sequence (no grad): float64 sums of float32 per-token values, CPU.

    Microbatches of `runner.sizes.score` rows; the layout depends on the group alone.
    """
    logp_parts, rb_parts = [], []
    for mb in group.microbatches(runner.sizes.score):
        token_logp, token_h = runner.forward(mb, grad=False)
        logp_parts.append(mb.row_sums(token_logp))
        rb_parts.append(mb.row_sums(token_h))
    return SequenceScores(S=torch.cat(logp_parts), h_rb=torch.cat(rb_parts), T=group.lengths.clone())


def score_block(runner: PolicyRunner, groups: list[Group]) -> list[SequenceScores]:
    """score_group for a block of groups scored together: microbatches of `runner.sizes.score` rows that may span
    groups (left-padded prompts, `rollout.batch.block_microbatches`); the layout depends on the block alone."""
    s = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
    h = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
    for mb in block_microbatches(groups, runner.sizes.score):
        token_logp, token_h = runner.forward(mb, grad=False)
        logp_rows, h_rows = mb.row_sums(token_logp), mb.row_sums(token_h)
        for i, (j, r) in enumerate(zip(mb.row_group, mb.row_index)):
            s[j][r], h[j][r] = logp_rows[i], h_rows[i]
    return [SequenceScores(S=s[j], h_rb=h[j], T=g.lengths.clone()) for j, g in enumerate(groups)]


def score_batch(rt, runner: PolicyRunner, batch: RolloutBatch) -> list[SequenceScores]:
    """Scores of every group of this rank (padding included), block by block (`RolloutBatch.blocks`: G ≥
    microbatch_score means one group at a time), with a safe point after each block (stop signals, the lockstep
    OOM retry). Raises StopRequested on every rank when a stop was requested."""
    blocks = batch.blocks()
    out = runner.run_groups(rt, "score", blocks, start=list,
                            step=lambda _i, block, acc: acc.append(score_block(runner, block)))
    return [sc for block in out for sc in block]


def base_entropy(rt, batch: RolloutBatch, scores: list[SequenceScores], *, payload: str,
                 normalize: str) -> BaseEntropy:
    """Ĥ(θ) = Σh/Σλ over E's real groups (global float64 sums), its delta-method SE over prompt groups and its SE
    conditional on E's prompts (within-prompt variance only, docs/method.md §9). With sampler weights on the groups
    (`scoring.behaviour.apply_sampler_weights`) the self-normalised Σvh/Σvλ and the same SEs of the weighted sums."""
    # v_i (docs/method.md §13): 1 unless an external sampler drew E, then every sum is v-weighted
    real = [(g.v, sc) for g, sc in zip(batch.groups, scores) if g.weight > 0]
    h_groups = torch.tensor([float((v * sc.h(payload)).sum()) for v, sc in real], dtype=torch.float64)
    lam_groups = torch.tensor([float((v * normaliser_lengths(sc.T, normalize)).sum()) for v, sc in real],
                              dtype=torch.float64)
    naive = sum(float((v * -sc.S).sum()) for v, sc in real)
    sum_h, sum_lam, sum_naive, n_groups = rt.sum_scalars(float(h_groups.sum()), float(lam_groups.sum()), naive,
                                                         float(len(real)))
    entropy = sum_h / sum_lam
    per_sequence = [ratio_influence(v * sc.h(payload), v * normaliser_lengths(sc.T, normalize), entropy, sum_lam)
                    for v, sc in real]
    c2, fixed2 = rt.sum_scalars(float(ratio_influence(h_groups, lam_groups, entropy, sum_lam).pow(2).sum()),
                                fixed_prompts_sum_sq(per_sequence))
    return BaseEntropy(entropy=entropy, entropy_se=se_from_influence(c2, int(n_groups)),
                       entropy_naive=sum_naive / sum_lam, sum_h=sum_h, sum_lam=sum_lam, num_groups=int(n_groups),
                       entropy_se_fixed=math.sqrt(fixed2))
