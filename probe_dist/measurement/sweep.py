"""Measure: ΔH_true(η) = Ĥ(θ + ηu) − Ĥ(θ) on the same E samples by self-normalised importance sampling
(docs/method.md §6), with ESS, max weight, KL(θ‖θ') and PSIS k̂, for every η of the sweep.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from probe_dist.config_schema import EstimatorsConfig
from probe_dist.estimators.entropy import fixed_prompts_sum_sq, normaliser_lengths, se_from_influence
from probe_dist.estimators.psis import khat_threshold, pareto_khat
from probe_dist.estimators.snis import (
    SNIS_SUM_FIELDS,
    log_weights,
    snis_delta_influence,
    snis_finalize,
    snis_local_sums,
    snis_sequence_influence,
)
from probe_dist.model.runner import PolicyRunner
from probe_dist.results import BaseEntropy, DeltaH1, SequenceScores, SweepPoint
from probe_dist.rollout.batch import RolloutBatch
from probe_dist.scoring.score import score_batch


def scores_at_eta(rt, runner: PolicyRunner, batch_e: RolloutBatch, scores_e: list[SequenceScores], *,
                  move_to_eta: Callable[[], None], restore: Callable[[], bool],
                  ) -> tuple[list[SequenceScores], list[SequenceScores], list[bool]]:
    """S(θ') on E after `move_to_eta()`, then `restore()` (returns whether the state hash matched).

    S(θ) is reused, never recomputed (η = 0 must give exactly 0), unless an OOM retry changed the scoring layout
    in between: then S(θ) is rescored with the new layout so both come from the same kernels.
    Returns (S(θ) scores, S(θ') scores, restore verifications).
    """
    verified = []
    while True:
        rows_before = runner.sizes.score
        move_to_eta()
        scores_new = score_batch(rt, runner, batch_e)
        verified.append(restore())
        if runner.sizes.score == rows_before:
            return scores_e, scores_new, verified
        scores_e = score_batch(rt, runner, batch_e)


def snis_point(rt, batch: RolloutBatch, scores0: list[SequenceScores], scores1: list[SequenceScores], *,
               base: BaseEntropy, est: EstimatorsConfig) -> tuple[dict, list[torch.Tensor]]:
    """SNIS at one θ': global max of log w, float64 sums all-reduced, the SE over prompt groups, k̂ on rank 0.

    scores0, scores1: per-group scores of `batch` at θ and θ' (float64 CPU tensors; entropies in nats).
    Returns (the SweepPoint fields but eta/δH₁, this rank's log w per real group [G] float64). Raises nothing
    itself; collective errors from `rt` propagate.
    """
    # With an external sampler (docs/method.md §13) each sequence's weight is v_i·w_i: h', h and λ carry v_i
    real = [(g.v, s0, s1) for g, s0, s1 in zip(batch.groups, scores0, scores1) if g.weight > 0]
    lw_local = [log_weights(s1.S, s0.S, est.log_weight_clip) for _, s0, s1 in real]
    lw_cat = torch.cat(lw_local) if lw_local else torch.zeros(0, dtype=torch.float64)
    local_max = float(lw_cat.max()) if lw_cat.numel() else -math.inf
    gmax = float(rt.max_f64(torch.tensor([local_max]))[0])
    sums = torch.zeros(len(SNIS_SUM_FIELDS), dtype=torch.float64)
    for (v, s0, s1), lw in zip(real, lw_local):
        lam = v * normaliser_lengths(s1.T, est.normalize)
        clipped = (s1.S - s0.S) > est.log_weight_clip if est.log_weight_clip is not None else None
        sums += snis_local_sums(lw, gmax, v * s1.h(est.payload), lam, clipped=clipped, h_old=v * s0.h(est.payload),
                                v=v)
    global_sums = rt.sum_f64(sums)
    res = snis_finalize(global_sums, base.entropy)
    sum_w_lam = float(global_sums[SNIS_SUM_FIELDS.index("sum_w_lam")])
    c2, per_sequence = 0.0, []
    for (v, s0, s1), lw in zip(real, lw_local):
        lam = v * normaliser_lengths(s1.T, est.normalize)
        c = snis_delta_influence(torch.exp(lw - gmax), v * s1.h(est.payload), v * s0.h(est.payload), lam,
                                 group_ids=torch.zeros(lw.numel(), dtype=torch.long), num_groups=1,
                                 entropy_new=res.entropy_new, entropy=base.entropy, sum_w_lam=sum_w_lam,
                                 sum_lam=base.sum_lam)
        c2 += float((c * c).sum())
        per_sequence.append(snis_sequence_influence(
            torch.exp(lw - gmax), v * s1.h(est.payload), v * s0.h(est.payload), lam, entropy_new=res.entropy_new,
            entropy=base.entropy, sum_w_lam=sum_w_lam, sum_lam=base.sum_lam))
    c2, fixed2 = rt.sum_scalars(c2, fixed_prompts_sum_sq(per_sequence))
    gathered = rt.gather_objects(lw_cat)
    khat = float("nan")
    if gathered is not None:
        all_lw = torch.cat(gathered)
        khat = pareto_khat(all_lw) if all_lw.numel() else float("nan")
    se_population = se_from_influence(c2, base.num_groups)
    fields = {"delta_h_true": res.delta, "delta_h_true_se": se_population, "delta_h_true_se_population": se_population,
              "delta_h_true_se_fixed_prompts": math.sqrt(fixed2),
              "entropy_new": res.entropy_new, "ess": res.ess, "ess_frac": res.ess_frac, "khat": khat,
              "khat_threshold": khat_threshold(round(res.ess / res.ess_frac)) if res.ess_frac > 0 else float("nan"),
              "kl": res.kl_k3, "kl_k1": res.kl_k1, "max_weight": res.max_weight, "clip_frac": res.clip_frac}
    return fields, lw_local


KHAT_UNRELIABLE = 0.7   # PSIS: above this the importance-sampling estimate is not to be trusted (Vehtari et al.)
ESS_FRAC_LOW = 0.1      # fewer than one effective sample in ten
MUST_BE_FINITE = ("delta_h_true", "entropy_new", "ess", "ess_frac", "kl", "max_weight", "delta_h1")


KHAT_MIN_N = 100         # below this many weights the tail fit behind k̂ is noise (a bootstrap interval spans ~1)
KHAT_MAX_ESS_FRAC = 0.99  # weights this close to uniform have no tail to fit


def khat_is_reliable(khat: float, n: float, ess_frac: float) -> bool:
    """Whether a PSIS k̂ of n weights with Kish ESS/N `ess_frac` means anything: finite, n ≥ KHAT_MIN_N, and the
    weights not near-uniform (ESS/N < KHAT_MAX_ESS_FRAC) — else it is the noise of a tail fit with no tail."""
    return bool(math.isfinite(khat) and n >= KHAT_MIN_N and ess_frac < KHAT_MAX_ESS_FRAC)


def sweep_point(eta: float, snis_fields: dict, d1: DeltaH1, *, se_kind: str = "population",
                delta_h1_se_fixed: float = math.nan, curvature: tuple[float, float, float] | None = None,
                ) -> SweepPoint:
    """One row of the sweep: ΔH_true(η) beside δH₁(η) = η·(δH₁/η) and δH₂(η) = ½η²Ĥ'' with SEs of the kind
    `se_kind` names (both kinds kept), flagged when a number is not finite or k̂ says SNIS is unreliable.

    curvature: (Ĥ'', its population SE, its fixed-prompt SE) in nats per unit η², or None without the explanation.
    (SEs with fewer than 2 groups and k̂ with too few weights are NaN by definition and not flagged.)
    """
    fixed = se_kind == "fixed_prompts"
    d1_pop, d1_fix = abs(eta) * d1.per_eta_se, abs(eta) * delta_h1_se_fixed
    fields = {**snis_fields, "delta_h1": eta * d1.reported_per_eta + 0.0,  # + 0.0: no −0.0 at η = 0
              "delta_h1_se": d1_fix if fixed else d1_pop, "delta_h1_se_population": d1_pop,
              "delta_h1_se_fixed_prompts": d1_fix,
              "delta_h_true_se": snis_fields["delta_h_true_se_fixed_prompts" if fixed else "delta_h_true_se_population"]}
    if curvature is not None:
        second, se_pop, se_fix = curvature
        fields["delta_h2"] = 0.5 * eta * eta * second + 0.0
        fields["delta_h2_se"] = 0.5 * eta * eta * (se_fix if fixed else se_pop)
    n = round(fields["ess"] / fields["ess_frac"]) if fields["ess_frac"] > 0 else 0
    fields["khat_reliable"] = khat_is_reliable(fields["khat"], n, fields["ess_frac"])
    bad = [k for k in MUST_BE_FINITE if not math.isfinite(fields[k])]
    flags = []
    if bad:
        flags.append(f"not finite: {', '.join(bad)} — at this η the step θ + ηu takes the model where its log-probs "
                     "or the importance weights overflow; use smaller η")
    if (math.isfinite(fields["khat"]) and fields["khat"] >= KHAT_UNRELIABLE
            and fields["ess_frac"] < KHAT_MAX_ESS_FRAC):
        noisy = f" (with N = {n} < {KHAT_MIN_N} weights k̂ itself is noisy)" if n < KHAT_MIN_N else ""
        flags.append(f"k̂ = {fields['khat']:.2f} ≥ {KHAT_UNRELIABLE}{noisy}: the importance weights are heavy-tailed, "
                     "so ΔH_true and its SE at this η are not reliable (PSIS); use a smaller η")
    if math.isfinite(fields["ess_frac"]) and fields["ess_frac"] < ESS_FRAC_LOW:
        flags.append(f"ESS/N = {fields['ess_frac']:.3f} < {ESS_FRAC_LOW}: ΔH_true rests on a few samples; "
                     "use a smaller η")
    return SweepPoint(eta=eta, **fields, flags=tuple(flags))
