"""Single-batch mode (E = U): δH₁ by the U-statistic equals the brute-force double sum over distinct prompt
groups, with X_p and Y_p computed independently here by plain autograd on whole groups."""

from __future__ import annotations

import math

import pytest
import torch

from probe_dist.update.adamw import AdamWHyper, adamw_update_vector
from probe_dist.update.loss import LossNormalisers, LossSpec, row_coefficients, update_loss
from tests.probe_harness import make_probe
from tests.tolerances import fp_bound

B, G = 4, 4
# Mixed rewards in every group by construction (whatever the toy seed samples): with equal rewards in a group its
# advantages — and with kl_coef=0 its update gradient — would be zero, and the U-statistic would have less to check.
REWARD = "sampling.reward=tests.test_single_batch:reward_by_position"


def reward_by_position(completions, **kwargs):
    """Rewards 0, 1, …, G−1 within a group (the probe calls a reward function once per group, TRL's convention)."""
    return [float(i) for i in range(len(completions))]


def _grad_of(probe, scalar, retain: bool = False) -> list[torch.Tensor]:
    params = [p for _, p in probe.trainable]
    grads = torch.autograd.grad(scalar, params, retain_graph=retain)
    return [g.double() for g in grads]


def _dot(a, b):
    return sum(float((x * y).sum()) for x, y in zip(a, b))


def _brute_force(probe, result, ustat: str, kl_coef: float) -> tuple[float, float]:
    """(the U-statistic, the plain diagonal-including value) of δH₁/η from X_p, Y_p by plain autograd per group,
    in the model's current dtype."""
    groups = result.batch_e.groups
    temperature = probe.cfg.sampling.temperature
    total_tokens = float(sum(int(g.lengths.sum()) for g in groups))
    entropy = result.base.entropy
    norm = LossNormalisers(num_prompts=B, group_size=G, total_tokens=total_tokens,
                           max_len=probe.cfg.sampling.max_new_tokens)
    xs, gs = [], []
    for g in groups:
        mb = g.layout(slice(0, g.size))
        lp, h = probe.policy(mb.input_ids, mb.attention_mask, mb.response_start, mb.response_mask, temperature)
        rows = mb.response_mask.nonzero(as_tuple=True)[0]
        s = torch.zeros(g.size, dtype=torch.float64).index_add(0, rows, lp.double())
        hs = torch.zeros(g.size, dtype=torch.float64).index_add(0, rows, h.double())
        t = g.lengths.double()
        # docs/method.md §5.1 per token: Σ_i [h_i + (h_i − Ĥ T_i) S_i] / T_tot, coefficients held fixed.
        surrogate = (hs + (hs.detach() - entropy * t) * s).sum() / total_tokens
        xs.append(_grad_of(probe, surrogate, retain=True))
        with torch.no_grad(), probe.model.disable_adapter():  # the KL reference: the base without the adapter
            ref_lp, _ = probe.policy(mb.input_ids, mb.attention_mask, mb.response_start, mb.response_mask,
                                     temperature)
        spec = LossSpec(family=probe.cfg.update.loss, kl_coef=kl_coef)
        loss = update_loss(lp, h, rows, g.advantages, row_coefficients(spec, g, norm), spec, token_ref_logp=ref_lp)
        gs.append(_grad_of(probe, loss))
    raw = [sum(gp[k] for gp in gs) for k in range(len(gs[0]))]
    clip = probe.cfg.update.grad_clip
    raw_norm = math.sqrt(sum(float((x * x).sum()) for x in raw))
    clip_coef = min(1.0, clip / (raw_norm + 1e-6)) if clip else 1.0
    coefs, bases = [], []
    for (_, p), g in zip(probe.trainable, raw):
        grp = probe.optimizer.param_groups[0]
        st = probe.optimizer.state[p]
        parts = adamw_update_vector(p, g * clip_coef, st["exp_avg"], st["exp_avg_sq"], step=float(st["step"]),
                                    hp=AdamWHyper(tuple(grp["betas"]), grp["eps"], grp["weight_decay"]))
        coefs.append(parts.grad_coef)
        bases.append(parts.u_base)

    units = [[0], [1], [2], [3]] if ustat == "exact" else [[0, 1], [2, 3]]
    x_units = [[sum(xs[p][k] for p in unit) for k in range(len(xs[0]))] for unit in units]
    y_units = [[coefs[k] * clip_coef * sum(gs[p][k] for p in unit) for k in range(len(gs[0]))] for unit in units]
    m = len(units)
    off_diag = sum(_dot(x_units[a], y_units[b]) for a in range(m) for b in range(m) if a != b)
    x_total = [sum(xs[p][k] for p in range(B)) for k in range(len(xs[0]))]
    expected = _dot(x_total, bases) + m * m * off_diag / (m * (m - 1))
    plain = _dot(x_total, [b_ + c * clip_coef * sum(gs[p][k] for p in range(B))
                           for k, (b_, c) in enumerate(zip(bases, coefs))])
    return expected, plain


@pytest.mark.parametrize(("ustat", "kl_coef"), [("exact", 0.0), ("blocks", 0.0), ("exact", 0.05)])
def test_single_batch_u_statistic_matches_brute_force(toy_checkpoint, ustat, kl_coef):
    probe = make_probe(toy_checkpoint, [f"sampling.B_E={B}", f"sampling.B_U={B}", f"sampling.G_E={G}",
                                        f"sampling.G_U={G}", "estimators.mode=single_batch", f"estimators.ustat={ustat}",
                                        "estimators.ustat_blocks=2", "estimators.etas=[0.0,1e-3]",
                                        f"update.kl_coef={kl_coef}", REWARD])
    result = probe.run()
    summary = result.summary()
    assert result.batch_u is result.batch_e
    # tol: exact the precondition: every group's rewards differ, so every advantage is non-zero
    assert all(bool((g.advantages != 0).all()) for g in result.batch_e.groups)
    expected, plain = _brute_force(probe, result, ustat, kl_coef)
    # The same brute force in float64 (Qwen2's RMSNorm still computes in float32 inside): the float32 one's error.
    probe.model.double()
    expected64, plain64 = _brute_force(probe, result, ustat, kl_coef)
    got = summary["delta_h1/ustat_per_eta"]
    # tol: fp two float32 paths (the probe's microbatched backward vs plain autograd on whole groups): each within
    # ≈ err₃₂ = |brute₃₂ − brute₆₄| of the exact value (eps₃₂ × the condition number of these dot products on these
    # inputs, measured), 4× safety each, plus one float32 rounding of the value (4u₃₂|x|) as a floor
    tol = 2 * (4 * abs(expected - expected64) + fp_bound(torch.float32, 1, abs(expected64)))
    assert abs(got - expected) <= tol, (got, expected, expected64, tol)
    tol_plain = 2 * (4 * abs(plain - plain64) + fp_bound(torch.float32, 1, abs(plain64)))  # tol: fp the same
    assert abs(summary["delta_h1/per_eta"] - plain) <= tol_plain, (summary["delta_h1/per_eta"], plain, tol_plain)
    # The plain (biased, diagonal-including) value differs: the U-statistic really removed something.
    # tol: bound precondition: the diagonal's share exceeds both float32 tolerances, so a probe that reported the
    # plain value as the U-statistic would fail the first check (the intervals around got and plain are disjoint)
    assert abs(got - plain) > tol + tol_plain, (got, plain, tol, tol_plain)
    # tol: exact the sweep's δH₁ is η · (δH₁/η), the same one float64 product
    assert summary["sweep"][1]["delta_h1"] == 1e-3 * got
