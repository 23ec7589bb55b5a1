"""Explain: why entropy moves — per-sequence decompositions of δH₁, its curvature along u, and the Cui et al.
covariance proxy (docs/method.md §10, §11), each from forward-mode passes (no per-sequence backward).

E side (one nested-jvp pass over E along u): every E sequence's contribution c_i to δH₁/η (the per-row value of
the §5 surrogate's derivative, Σ_i c_i = δH₁/η), and the six per-sequence sums behind Ĥ'' (estimators/curvature).
U side (one jvp pass over U along v = clip·coef ⊙ ∇Ĥ): u = u_base + coef ⊙ clip·Σ_j ∇L_j, so
δH₁/η = ∇Ĥ·u_base + Σ_j v·∇L_j, and v·∇L_j is the jvp of sequence j's training loss (update/loss.py) along v:
the contribution d_j of U sequence j through AdamW's fixed denominator. The same pass scores ℓ at θ on U for the
covariance proxy.
"""

from __future__ import annotations

import math

import torch
from torch.func import jvp

from probe_dist.config_schema import EstimatorsConfig, UpdateConfig
from probe_dist.estimators import covariance, curvature
from probe_dist.estimators.delta_h1 import delta_h1_influence
from probe_dist.estimators.entropy import fixed_prompts_sum_sq, normaliser_lengths, se_from_influence
from probe_dist.explain.directional import (
    ForwardModeUnavailable,
    eager_attention,
    parameter_names,
    token_derivatives,
)
from probe_dist.model.runner import PolicyRunner
from probe_dist.prediction.delta_h1 import path_rows
from probe_dist.prediction.ustat import vector_dot
from probe_dist.results import (
    BaseEntropy,
    DeltaH1,
    EExplanation,
    SequenceScores,
    UExplanation,
    UpdateGradient,
)
from probe_dist.rollout.batch import RolloutBatch, block_microbatches, gather_rows
from probe_dist.update.loss import LossSpec, RowCoefficients, row_coefficients, update_loss_per_sequence


def _rows(mb, values: torch.Tensor) -> torch.Tensor:
    return mb.row_sums(values)


def explain_e(rt, runner: PolicyRunner, batch_e: RolloutBatch, scores_e: list[SequenceScores], *,
              base: BaseEntropy, u: list[torch.Tensor], delta_h1: DeltaH1, est: EstimatorsConfig) -> EExplanation:
    """Per-sequence contributions c_i to δH₁/η on E, the curvature Ĥ'' with its SEs, and δH₁'s fixed-prompt SE.

    From the second-order pass's per-sequence path derivatives: δH₁'s own (delta_h1.e_rows, taken as this batch's
    from this runner — pass a DeltaH1 without them to score another model) when it ran that pass, else one
    `path_rows(order=2)` pass here. u: the update vector (float64, param-shaped, optimizer order). c_i are in nats per unit η; Ĥ'' in nats per
    unit η². Raises ForwardModeUnavailable when the model has an operation without a forward-mode rule, or with
    delta_h1.nested_failure when δH₁'s own attempt at the nested pass failed.
    """
    if delta_h1.nested_failure:  # δH₁ tried the nested pass already: the same failure, not a second try
        raise ForwardModeUnavailable(delta_h1.nested_failure)
    rows = delta_h1.e_rows
    if rows is None:  # δH₁ came from a first-order or reverse-mode pass: the nested pass here
        rows = path_rows(rt, runner, batch_e, base=base, u=u, est=est, order=2)
    state = {"c": {}, "lam": {}, "h": {}, "b": {}, "x": {}}
    for group, sc, cat in zip(batch_e.groups, scores_e, rows):
        if group.weight == 0:
            continue
        h, lam, v = sc.h(est.payload), normaliser_lengths(sc.T, est.normalize), group.v  # v: §13's weights
        p = group.prompt_index
        state["c"][p], state["b"][p], state["h"][p], state["lam"][p] = cat["q"], cat["b"], v * h, v * lam
        state["x"][p] = v.unsqueeze(1) * curvature.path_sums(h, lam, cat["dS"], cat["ddS"], cat["dh"], cat["ddh"])
    prompts = sorted(state["c"])
    c_total, b_total = rt.sum_scalars(sum(float(state["c"][p].sum()) for p in prompts),
                                      sum(float(state["b"][p].sum()) for p in prompts))
    per_eta = delta_h1.per_eta
    # δH₁'s SE conditional on the prompts: the per-sequence version of the §5 influence, centred within prompts.
    infl = {p: delta_h1_influence(state["c"][p], state["lam"][p], state["h"][p], value=c_total,
                                  sum_lam=base.sum_lam, entropy=base.entropy, sum_b=b_total) for p in prompts}
    (fixed_d1,) = rt.sum_scalars(fixed_prompts_sum_sq([infl[p] for p in prompts]))
    # Curvature: global sums, then influences per sequence (fixed) and per group (population).
    x_local = sum((state["x"][p].sum(0) for p in prompts), torch.zeros(6, dtype=torch.float64))
    x_total = rt.sum_f64(x_local)
    second = float(curvature.second_derivative(x_total))
    first = float(curvature.first_derivative(x_total))
    seq_infl = {p: curvature.influence(curvature.second_derivative, x_total, state["x"][p]) for p in prompts}
    pop2, fix2 = rt.sum_scalars(sum(float(seq_infl[p].sum()) ** 2 for p in prompts),
                                fixed_prompts_sum_sq([seq_infl[p] for p in prompts]))
    return EExplanation(
        contrib={p: state["c"][p] for p in prompts}, sum_contrib=c_total,
        closure=_relative(c_total, per_eta), delta_h1_se_fixed=math.sqrt(fixed_d1),
        first_derivative=first, second_derivative=second,
        second_derivative_se=se_from_influence(pop2, base.num_groups), second_derivative_se_fixed=math.sqrt(fix2),
        linear_regime_eta=curvature.linear_regime_eta(first, second))


def explain_u(rt, runner: PolicyRunner, batch_u: RolloutBatch, *, update: UpdateGradient,
              grad_entropy: list[torch.Tensor], per_eta: float, update_cfg: UpdateConfig) -> UExplanation:
    """Per-sequence contributions d_j of U to δH₁/η through u, the batch-independent part ∇Ĥ·u_base, and the Cui
    covariance proxy on U.

    grad_entropy: ∇Ĥ (float64, param-shaped, all-reduced); per_eta: the reported δH₁/η = ∇Ĥ·u, for the closure.
    d_j in nats per unit η; the covariances in nats × advantage units. Raises ForwardModeUnavailable as explain_e.
    """
    policy = runner.strategy.policy
    names = parameter_names(policy, runner.trainable)
    v = [update.clip_coef * part.grad_coef * g for part, g in zip(update.parts, grad_entropy)]
    base_term = vector_dot(grad_entropy, [part.u_base for part in update.parts])
    norm = update.normalisers  # the counts (and entropy thresholds) the gradient pass used
    spec = LossSpec.from_config(update_cfg)

    def start() -> dict:
        return {"d": {}, "cov": {}, "seq": {}}

    def step(_bi: int, block, state: dict) -> None:
        coefficients = [row_coefficients(spec, g, norm, kept=g.kept(update_cfg.mask_truncated)) for g in block]
        advantages = [g.advantages.to(torch.float64) for g in block]
        weights = [float(g.weight) for g in block]
        d = [torch.zeros(g.size, dtype=torch.float64) for g in block]
        seq = [torch.zeros(g.size, 4, dtype=torch.float64) for g in block]
        for mb in block_microbatches(block, runner.sizes.jvp):
            ref_logp = None
            if update_cfg.kl_coef:
                with runner.reference():
                    ref_logp = runner.forward(mb, grad=False)[0].detach().to("cpu", torch.float64)
            td = token_derivatives(policy, names, runner.trainable, mb, v, device=runner.device,
                                   temperature=runner.temperature, order=1)
            rows = mb.token_rows
            coef = RowCoefficients.gather(coefficients, mb.row_group, mb.row_index, [1.0] * len(block))
            adv = gather_rows(mb, advantages)

            def loss_rows(token_logp, token_h, rows=rows, adv=adv, coef=coef, mb=mb, ref_logp=ref_logp):
                return update_loss_per_sequence(token_logp, token_h, rows, adv, coef, spec,
                                                num_rows=mb.num_rows, token_ref_logp=ref_logp)

            _, d_rows = jvp(loss_rows, (td.logp, td.entropy), (td.d_logp, td.d_entropy))
            pi = torch.exp(td.logp)
            seq_rows = torch.stack([_rows(mb, td.logp), mb.row_sums(torch.ones_like(td.logp)),
                                    _rows(mb, td.logp * pi), _rows(mb, pi)], dim=-1)
            for i, (j, r) in enumerate(zip(mb.row_group, mb.row_index)):
                d[j][r], seq[j][r] = d_rows[i], seq_rows[i]
        for j, group in enumerate(block):
            if weights[j] == 0:
                continue
            p = group.prompt_index
            state["d"][p], state["seq"][p] = d[j], seq[j]
            state["cov"][p] = _group_token_sums(seq[j], advantages[j])

    with eager_attention(policy):
        state = runner.run_groups(rt, "jvp", batch_u.blocks(), start=start, step=step)
    prompts = sorted(state["d"])
    (d_total,) = rt.sum_scalars(sum(float(state["d"][p].sum()) for p in prompts))
    cov_total = rt.sum_f64(sum((state["cov"][p] for p in prompts), torch.zeros(6, dtype=torch.float64)))
    num_groups = len(batch_u.real_groups)
    (num_groups,) = rt.sum_scalars(float(num_groups))
    out = {}
    for name, fn in (("cov_logp_adv", covariance.cov_logp_adv), ("cov_logp_pi_adv", covariance.cov_logp_pi_adv)):
        infl = curvature.influence(fn, cov_total, torch.stack([state["cov"][p] for p in prompts])
                                   if prompts else torch.zeros(0, 6, dtype=torch.float64))
        (c2,) = rt.sum_scalars(float(infl.pow(2).sum()))
        out[name] = (float(fn(cov_total)), se_from_influence(c2, int(num_groups)))
    cov_contrib = {p: _sequence_covariance(state["seq"][p], batch_u, p, cov_total) for p in prompts}
    return UExplanation(
        contrib={p: state["d"][p] for p in prompts}, base_per_eta=base_term, sum_contrib=d_total,
        closure=_relative(base_term + d_total, per_eta), cov_logp_adv=out["cov_logp_adv"][0],
        cov_logp_adv_se=out["cov_logp_adv"][1], cov_logp_pi_adv=out["cov_logp_pi_adv"][0],
        cov_logp_pi_adv_se=out["cov_logp_pi_adv"][1], cov_contrib=cov_contrib)


def _group_token_sums(seq: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """The token sums behind the covariances (estimators/covariance.py: [Σ1, Σℓ, ΣA, ΣℓA, ΣπA, ΣℓπA] over one
    group's tokens, [6] float64) from its per-row sums seq [G, 4] = (Σℓ, T, Σℓπ, Σπ): the advantage is constant
    along a row, so they are Σ_i [T_i, Σℓ, A_i·T_i, A_i·Σℓ, A_i·Σπ, A_i·Σℓπ]."""
    s, t, lpi, pi = seq.unbind(-1)
    a = advantages.to(torch.float64)
    return torch.stack([t.sum(), s.sum(), (a * t).sum(), (a * s).sum(), (a * pi).sum(), (a * lpi).sum()])


def _sequence_covariance(seq: torch.Tensor, batch_u: RolloutBatch, prompt_index: int,
                         total: torch.Tensor) -> torch.Tensor:
    """Each sequence's share of Cov(ℓ, A) = Σ_{t∈i} (ℓ_t − ℓ̄)(A_i − Ā)/M (they sum to the covariance)."""
    group = next(g for g in batch_u.groups if g.prompt_index == prompt_index and g.weight > 0)
    m, x, a = float(total[0]), float(total[1]), float(total[2])
    s, t = seq[:, 0], seq[:, 1]
    return (group.advantages.to(torch.float64) - a / m) * (s - t * x / m) / m


def _relative(value: float, reference: float) -> float:
    """|value − reference| / |reference| (absolute difference when the reference is 0)."""
    diff = abs(value - reference)
    return diff / abs(reference) if reference != 0.0 else diff
