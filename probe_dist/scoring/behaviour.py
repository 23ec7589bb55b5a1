"""Sampler weights on E: when an external sampler q (rollout.backend=vllm) drew the responses, each sequence's
importance ratio ρ_i = π_θ(y_i)/q(y_i) from the scorer's S_i(θ) and the sampler's own log q(y_i), truncated at
`rollout.is_cap` when set and self-normalised with the global max (docs/method.md §13)."""

from __future__ import annotations

import math

import torch

from probe_dist.estimators.behaviour import (
    SAMPLER_SUM_FIELDS,
    log_sampler_ratio,
    sampler_diagnostics,
    sampler_local_sums,
    sampler_weights,
    truncate_log_ratio,
)
from probe_dist.estimators.psis import khat_threshold, pareto_khat
from probe_dist.measurement.sweep import khat_is_reliable
from probe_dist.results import SamplerCorrection, SequenceScores
from probe_dist.rollout.batch import RolloutBatch


def apply_sampler_weights(rt, batch: RolloutBatch, scores: list[SequenceScores], *,
                          cap: float | None) -> SamplerCorrection | None:
    """Set each group's `is_weight` v_i ∝ min(ρ_i, cap) (every group, padding included; the largest real weight is
    exactly 1) and return the weights' diagnostics (global; k̂ of the untruncated log ρ on rank 0). None, and
    nothing set, when no rank's batch carries sampler log-probs (the responses came from π_θ itself).

    scores: S_i(θ) of every group of `batch` (float64 CPU). Raises ValueError when some groups carry sampler
    log-probs and others do not (a backend that lost them for some rows).
    """
    local = [g.behaviour_logp is not None for g in batch.groups]
    if not rt.any_flag(any(local)):
        return None
    if rt.any_flag(not all(local)):
        raise ValueError(f"batch {batch.name}: the sampler reported log-probabilities for some groups only; every "
                         "response of an external sampler needs its log q to be weighted")
    log_rho = [log_sampler_ratio(sc.S, g.behaviour_logp) for g, sc in zip(batch.groups, scores)]
    used = [truncate_log_ratio(x, cap) for x in log_rho]
    real = [i for i, g in enumerate(batch.groups) if g.weight > 0]
    local_max = [max((float(used[i].max()) for i in real), default=-math.inf),
                 max((float(log_rho[i].max()) for i in real), default=-math.inf)]
    gmax, gmax_raw = rt.max_f64(torch.tensor(local_max, dtype=torch.float64)).tolist()
    for g, x in zip(batch.groups, used):
        g.is_weight = sampler_weights(x, gmax)
    sums = torch.zeros(len(SAMPLER_SUM_FIELDS), dtype=torch.float64)
    for i in real:
        sums += sampler_local_sums(log_rho[i], used[i], gmax, gmax_raw, batch.groups[i].lengths)
    diag = sampler_diagnostics(rt.sum_f64(sums), gmax_raw)
    gathered = rt.gather_objects(torch.cat([log_rho[i] for i in real]) if real else torch.zeros(0, dtype=torch.float64))
    khat = float("nan")
    if gathered is not None:
        everything = torch.cat(gathered)
        khat = pareto_khat(everything) if everything.numel() else float("nan")
    n = diag["ess"] / diag["ess_frac"] if diag["ess_frac"] > 0 else float("nan")
    reliable = khat_is_reliable(khat, n, diag["ess_frac"])
    return SamplerCorrection(cap=cap, khat=khat, khat_threshold=khat_threshold(round(n)) if math.isfinite(n)
                             else float("nan"), khat_reliable=reliable, **diag)
