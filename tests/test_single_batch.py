"""Single-batch mode (E = U): δH₁ by the U-statistic equals the brute-force double sum over distinct prompt
groups, with X_p and Y_p computed independently here by plain autograd on whole groups."""

from __future__ import annotations

import math

import pytest
import torch

from probe_dist.update.adamw import AdamWHyper, adamw_update_vector
from probe_dist.update.loss import LossNormalisers, LossSpec, row_coefficients, update_loss
from tests.probe_harness import make_probe

B, G = 4, 4
# A seed whose 4 groups all have mixed rewards on the toy checkpoint: with the default seed (1234) every group's
# rewards are equal, so the advantages — and with kl_coef=0 the update gradient — are zero and u = u_base.
SEED = 2


def _grad_of(probe, scalar, retain: bool = False) -> list[torch.Tensor]:
    params = [p for _, p in probe.trainable]
    grads = torch.autograd.grad(scalar, params, retain_graph=retain)
    return [g.double() for g in grads]


@pytest.mark.parametrize(("ustat", "kl_coef"), [("exact", 0.0), ("blocks", 0.0), ("exact", 0.05)])
def test_single_batch_u_statistic_matches_brute_force(toy_checkpoint, ustat, kl_coef):
    probe = make_probe(toy_checkpoint, [f"sampling.B_E={B}", f"sampling.B_U={B}", f"sampling.G_E={G}",
                                        f"sampling.G_U={G}", "estimators.mode=single_batch", f"estimators.ustat={ustat}",
                                        "estimators.ustat_blocks=2", "estimators.etas=[0.0,1e-3]",
                                        f"update.kl_coef={kl_coef}", f"sampling.seed={SEED}"])
    result = probe.run()
    summary = result.summary()
    groups = result.batch_e.groups
    assert result.batch_u is result.batch_e
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

    def dot(a, b):
        return sum(float((x * y).sum()) for x, y in zip(a, b))

    units = [[0], [1], [2], [3]] if ustat == "exact" else [[0, 1], [2, 3]]
    x_units = [[sum(xs[p][k] for p in unit) for k in range(len(xs[0]))] for unit in units]
    y_units = [[coefs[k] * clip_coef * sum(gs[p][k] for p in unit) for k in range(len(gs[0]))] for unit in units]
    m = len(units)
    off_diag = sum(dot(x_units[a], y_units[b]) for a in range(m) for b in range(m) if a != b)
    x_total = [sum(xs[p][k] for p in range(B)) for k in range(len(xs[0]))]
    expected = dot(x_total, bases) + m * m * off_diag / (m * (m - 1))
    got = summary["delta_h1/ustat_per_eta"]
    assert math.isclose(got, expected, rel_tol=1e-6), (got, expected)
    # The plain (biased, diagonal-including) value differs: the U-statistic really removed something.
    plain = dot(x_total, [b_ + c * clip_coef * sum(gs[p][k] for p in range(B))
                          for k, (b_, c) in enumerate(zip(bases, coefs))])
    assert math.isclose(summary["delta_h1/per_eta"], plain, rel_tol=1e-6)
    assert not math.isclose(got, plain, rel_tol=1e-3)
    assert summary["sweep"][1]["delta_h1"] == pytest.approx(1e-3 * got, rel=1e-12)
