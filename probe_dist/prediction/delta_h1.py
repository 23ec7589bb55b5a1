"""Predict: δH₁(η) = η ∇Ĥ·u over E (docs/method.md §5, §5.4).

By forward mode along u (one jvp per microbatch of a block's rows: every token's directional derivative, no
backward) or, where that is unavailable, by streamed backward passes whose gradients are dotted with u at once.
Group totals give the value and its delta-method SE.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from probe_dist.config_schema import EstimatorsConfig
from probe_dist.estimators.delta_h1 import delta_h1_influence, surrogate_coefficients, surrogate_terms
from probe_dist.estimators.entropy import normaliser_lengths, se_from_influence
from probe_dist.explain.directional import (
    ForwardModeUnavailable,
    eager_attention,
    parameter_names,
    token_derivatives,
)
from probe_dist.model.runner import PolicyRunner
from probe_dist.prediction.ustat import SingleBatchUStatistic, vector_dot
from probe_dist.results import BaseEntropy, DeltaH1, SequenceScores
from probe_dist.rollout.batch import RolloutBatch, block_microbatches, gather_rows

log = logging.getLogger("probe_dist")


def predict_delta_h1(rt, runner: PolicyRunner, batch_e: RolloutBatch, scores_e: list[SequenceScores], *,
                     base: BaseEntropy, u: list[torch.Tensor], est: EstimatorsConfig,
                     ustat: SingleBatchUStatistic | None = None, reverse_fallback: bool = True,
                     second_order: bool = False) -> DeltaH1:
    """δH₁/η, its SE over E's prompt groups (conditional on u) and, on the reverse-mode path, ∇Ĥ (float64, CPU,
    all-reduced).

    Two exact paths. Forward mode (two-batch mode; DDP and FSDP2 alike): one jvp along u per microbatch of a block's
    rows gives every token's ℓ' and H', hence each group's ∇surrogate₁·u and Σ∇surrogate₂·u — no backward pass; ∇Ĥ
    is left None (`entropy_gradient` computes it when the explanation needs it). With second_order (the
    explanation is on) that pass is the nested one of `path_rows(order=2)`: the same ℓ', H' plus ℓ'', H'', kept
    per sequence in `DeltaH1.e_rows` for `explain_e` — one pass over E instead of two; where the nested pass has
    no rule, the first-order one. Reverse mode (single_batch, or a model with an operation without a forward-mode
    rule): per group microbatch one forward and two backward passes, ∇Ĥ kept.
    u: the update vector (float64 tensors in optimizer order, param-shaped). With `ustat` (single_batch mode) each
    E group's ∇ surrogate also feeds the U-statistic of §5.3, whose value the result carries as `ustat_per_eta`.
    δH₁/η is in nats per unit η. With reverse_fallback=False (the online probe: no backward pass may reach the
    trainer's gradients) forward mode is the only path: ForwardModeUnavailable when it cannot run or gives a
    non-finite derivative. Raises ValueError for an unknown est.delta_h1 method; OOM that survives the runner's
    retries propagates.
    """
    nested_failure = None
    if ustat is None and second_order:
        try:
            result = _forward_mode(rt, runner, batch_e, scores_e, base=base, u=u, est=est, order=2)
            if result is not None:
                return result
            nested_failure = "the nested forward-mode pass gave non-finite first derivatives on some rank"
        except ForwardModeUnavailable as err:
            nested_failure = f"the nested forward-mode pass has an operation without a rule ({err})"
        if rt.is_main:
            log.info("δH₁ by a first-order pass: %s", nested_failure)
    result = _first_order(rt, runner, batch_e, scores_e, base=base, u=u, est=est, ustat=ustat,
                          reverse_fallback=reverse_fallback)
    return dataclasses.replace(result, nested_failure=nested_failure) if nested_failure else result


def _first_order(rt, runner: PolicyRunner, batch_e: RolloutBatch, scores_e: list[SequenceScores], *,
                 base: BaseEntropy, u: list[torch.Tensor], est: EstimatorsConfig,
                 ustat: SingleBatchUStatistic | None, reverse_fallback: bool) -> DeltaH1:
    """predict_delta_h1 by the first-order forward-mode pass or, where allowed and needed, reverse mode."""
    if not reverse_fallback:
        result = _forward_mode(rt, runner, batch_e, scores_e, base=base, u=u, est=est)
        if result is None:
            raise ForwardModeUnavailable("the forward-mode pass gave non-finite derivatives on some rank")
        return result
    if ustat is None:
        try:
            result = _forward_mode(rt, runner, batch_e, scores_e, base=base, u=u, est=est)
            if result is not None:
                return result
            if rt.is_main:
                log.info("δH₁ by reverse mode: the forward-mode pass gave non-finite derivatives on some rank")
        except ForwardModeUnavailable as err:
            if rt.is_main:
                log.info("δH₁ by reverse mode: the model has an operation without a forward-mode rule (%s)", err)
    return _reverse_mode(rt, runner, batch_e, scores_e, base=base, u=u, est=est, ustat=ustat)


PATH_KEYS = {1: ("q", "b"), 2: ("q", "b", "dS", "ddS", "dh", "ddh")}


def path_rows(rt, runner: PolicyRunner, batch_e: RolloutBatch, *, base: BaseEntropy, u: list[torch.Tensor],
              est: EstimatorsConfig, order: int) -> list[dict[str, torch.Tensor]]:
    """Per sequence of each of this rank's E groups (batch_e.groups' order), the derivatives along u that δH₁ and
    the explanation are sums of, from one forward-mode pass per microbatch of a block's rows (`runner.sizes.jvp`):

        q    the sequence's ∇surrogate₁·u (its contribution c_i to δH₁/η; Σ_i q_i = ∇Ĥ·u before the b term)
        b    its ∇surrogate₂·u
        (order 2 adds) dS, ddS = S', S''; dh, ddh = h', h'' of the payload h (docs/method.md §10)

    q and b carry the sequence's sampler weight v_i (§13; 1 when π_θ drew E); the path derivatives do not.

    Each value a [G] float64 CPU tensor, nats (and log-prob) per unit η (η² for second derivatives). Lockstep
    padding groups (weight 0) run the same passes. Raises ForwardModeUnavailable when an operation has no
    forward-mode rule (of that order).
    """
    policy = runner.strategy.policy
    names = parameter_names(policy, runner.trainable)
    keys = PATH_KEYS[order]

    def step(_bi: int, block, state: list) -> None:
        parts = [{k: torch.zeros(g.size, dtype=torch.float64) for k in keys} for g in block]
        weights = [g.v for g in block]
        for mb in block_microbatches(block, runner.sizes.jvp):
            td = token_derivatives(policy, names, runner.trainable, mb, u, device=runner.device,
                                   temperature=runner.temperature, order=order)
            rb = est.payload == "rb"
            phi, d_phi = (td.entropy, td.d_entropy) if rb else (-td.logp, -td.d_logp)
            a, coef_b = surrogate_coefficients(phi, td.entropy, mb.token_rows, num_rows=mb.num_rows,
                                               entropy=base.entropy, method=est.delta_h1, normalize=est.normalize)
            v = gather_rows(mb, weights)  # the sampler weights v_i (§13): 1 for responses drawn from π_θ
            values = {"q": v * mb.row_sums(d_phi + a * td.d_logp) / base.sum_lam,
                      "b": v * mb.row_sums(coef_b * td.d_logp)}
            if order == 2:
                values.update(dS=mb.row_sums(td.d_logp), ddS=mb.row_sums(td.dd_logp), dh=mb.row_sums(d_phi),
                              ddh=mb.row_sums(td.dd_entropy if rb else -td.dd_logp))
            for i, (j, r) in enumerate(zip(mb.row_group, mb.row_index)):
                for k in keys:
                    parts[j][k][r] = values[k][i]
        state.extend(parts)

    with eager_attention(policy):
        return runner.run_groups(rt, "jvp", batch_e.blocks(), start=list, step=step)


def _forward_mode(rt, runner: PolicyRunner, batch_e: RolloutBatch, scores_e: list[SequenceScores], *,
                  base: BaseEntropy, u: list[torch.Tensor], est: EstimatorsConfig, order: int = 1) -> DeltaH1 | None:
    """predict_delta_h1 from `path_rows` (order 1, or 2 with the rows kept for the explanation); None when a
    directional derivative came out non-finite on any rank (the caller falls back)."""
    per_group = path_rows(rt, runner, batch_e, base=base, u=u, est=est, order=order)
    finite = all(bool(torch.isfinite(rows["q"]).all() and torch.isfinite(rows["b"]).all()) for rows in per_group)
    if rt.any_flag(not finite):  # every rank decides together (a NaN from eager attention's padding on any rank)
        return None
    nested_failure = None
    if order == 2 and rt.any_flag(not all(bool(torch.isfinite(x).all()) for rows in per_group for x in rows.values())):
        nested_failure = "the nested forward-mode pass gave non-finite second derivatives on some rank"
    q_groups, b_groups, lam_groups, h_groups = [], [], [], []
    for gi, (group, rows) in enumerate(zip(batch_e.groups, per_group)):
        if group.weight > 0:
            sc = scores_e[gi]
            q_groups.append(float(rows["q"].sum()))
            b_groups.append(float(rows["b"].sum()))
            lam_groups.append(float((group.v * normaliser_lengths(sc.T, est.normalize)).sum()))
            h_groups.append(float((group.v * sc.h(est.payload)).sum()))
    per_eta, sum_b = rt.sum_scalars(sum(q_groups), sum(b_groups))
    c = delta_h1_influence(torch.tensor(q_groups, dtype=torch.float64), torch.tensor(lam_groups, dtype=torch.float64),
                           torch.tensor(h_groups, dtype=torch.float64), value=per_eta, sum_lam=base.sum_lam,
                           entropy=base.entropy, sum_b=sum_b)
    (c2,) = rt.sum_scalars(float((c * c).sum()))
    return DeltaH1(per_eta=per_eta, per_eta_se=se_from_influence(c2, base.num_groups), grad_entropy=None,
                   e_rows=per_group if order == 2 and nested_failure is None else None, nested_failure=nested_failure)


def _microbatch_surrogates(runner: PolicyRunner, mb, *, base: BaseEntropy, est: EstimatorsConfig,
                           row_weight: torch.Tensor | None = None):
    """(σ₁, σ₂) of one microbatch from a forward with grad (docs/method.md §5.4; estimators.delta_h1); with
    row_weight ([n] float64), each row's terms scaled by its weight (0 for lockstep padding)."""
    token_logp, token_h = runner.forward(mb, grad=True)
    rows = mb.token_rows_on(token_logp.device)
    phi = token_h if est.payload == "rb" else -token_logp
    a, b = surrogate_coefficients(phi, token_h, rows, num_rows=mb.num_rows, entropy=base.entropy,
                                  method=est.delta_h1, normalize=est.normalize)
    if row_weight is not None:
        w = row_weight.to(a.device)[rows]
        phi, a, b = phi.double() * w, a * w, b * w
    return surrogate_terms(phi, token_logp, a, b, sum_lam=base.sum_lam)


def entropy_gradient(rt, runner: PolicyRunner, batch_e: RolloutBatch, *, base: BaseEntropy,
                     est: EstimatorsConfig) -> list[torch.Tensor]:
    """∇Ĥ = Σ ∇surrogate₁ over E (float64, CPU, all-reduced, param-shaped): one forward and one backward per
    microbatch of a block's rows (`runner.sizes.grad`) — what the explanation needs when δH₁ was computed in
    forward mode."""
    def start() -> list[torch.Tensor]:
        runner.zero_grads()
        return runner.new_accumulator()

    def step(_bi: int, block, accumulator: list[torch.Tensor]) -> None:
        weights = [float(g.weight) * g.v for g in block]  # lockstep padding 0, sampler weights v_i (§13)
        for mb in block_microbatches(block, runner.sizes.grad):
            surrogate1, _ = _microbatch_surrogates(runner, mb, base=base, est=est,
                                                   row_weight=gather_rows(mb, weights))
            surrogate1.backward()
            runner.drain_grads_into(accumulator)

    with runner.no_sync():
        accumulator = runner.run_groups(rt, "grad", batch_e.blocks(), start=start, step=step)
    return rt.sum_f64_vectors([x.cpu() for x in accumulator])


def _reverse_mode(rt, runner: PolicyRunner, batch_e: RolloutBatch, scores_e: list[SequenceScores], *,
                  base: BaseEntropy, u: list[torch.Tensor], est: EstimatorsConfig,
                  ustat: SingleBatchUStatistic | None = None) -> DeltaH1:
    """predict_delta_h1 by reverse mode: per group microbatch one forward and two backward passes."""
    def start() -> dict:
        if ustat is not None:
            ustat.reset()
        runner.zero_grads()
        return {"grad_entropy": [torch.zeros_like(x) for x in u], "q": [], "b": [], "lam": [], "h": []}

    def step(gi: int, group, state: dict) -> None:
        q_p = b_p = 0.0
        x_p = None
        for mb in group.microbatches(runner.sizes.grad):
            surrogate1, surrogate2 = _microbatch_surrogates(
                runner, mb, base=base, est=est, row_weight=None if group.is_weight is None else group.v[mb.rows])
            (surrogate1 * group.weight).backward(retain_graph=True)
            g1 = runner.take_grads()
            (surrogate2 * group.weight).backward()
            g2 = runner.take_grads()
            q_p += vector_dot(g1, u)
            b_p += vector_dot(g2, u)
            for acc, x in zip(state["grad_entropy"], g1):
                acc += x
            if ustat is not None:
                x_p = g1 if x_p is None else [a + b for a, b in zip(x_p, g1)]
        if ustat is not None:
            ustat.add_group(gi, x_p)
        if group.weight > 0:
            sc = scores_e[gi]
            state["q"].append(q_p)
            state["b"].append(b_p)
            state["lam"].append(float((group.v * normaliser_lengths(sc.T, est.normalize)).sum()))
            state["h"].append(float((group.v * sc.h(est.payload)).sum()))

    with runner.no_sync():
        state = runner.run_groups(rt, "grad", batch_e.groups, start=start, step=step)
    grad_entropy, q_groups, b_groups, lam_groups, h_groups = (state[k] for k in ("grad_entropy", "q", "b", "lam", "h"))
    per_eta, sum_b = rt.sum_scalars(sum(q_groups), sum(b_groups))
    c = delta_h1_influence(torch.tensor(q_groups, dtype=torch.float64), torch.tensor(lam_groups, dtype=torch.float64),
                           torch.tensor(h_groups, dtype=torch.float64), value=per_eta, sum_lam=base.sum_lam,
                           entropy=base.entropy, sum_b=sum_b)
    (c2,) = rt.sum_scalars(float((c * c).sum()))
    grad_entropy = rt.sum_f64_vectors(grad_entropy)
    ustat_value, units = ustat.finish(rt, grad_entropy) if ustat is not None else (None, None)
    return DeltaH1(per_eta=per_eta, per_eta_se=se_from_influence(c2, base.num_groups), grad_entropy=grad_entropy,
                   ustat_per_eta=ustat_value, ustat_units=units)
