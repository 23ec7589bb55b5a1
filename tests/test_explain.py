"""docs/method.md §10–§11: the explanation — per-sequence decompositions of δH₁, the curvature δH₂, the Cui proxy,
and the forward-mode directional derivatives behind them — against independent computations: per-sequence
backward passes, finite differences of the scorer and of the SNIS estimator, a brute-force covariance, and (in
float64) exact closure of both decompositions, single process and 2-rank DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from probe_dist.estimators.delta_h1 import surrogate_coefficients, surrogate_terms
from probe_dist.estimators.entropy import normaliser_lengths
from probe_dist.explain.directional import eager_attention, parameter_names, token_derivatives
from probe_dist.measurement.sweep import snis_point
from probe_dist.scoring.score import score_batch
from probe_dist.update.loss import LossSpec, row_coefficients, update_loss
from probe_dist.update.step import set_theta
from tests.model_families import FAMILIES, build_family_checkpoint, write_family_prompts
from tests.probe_harness import make_probe

SMALL = ["sampling.B_E=4", "sampling.G_E=4", "sampling.B_U=4", "sampling.G_U=4", "estimators.etas=[0,1e-4]"]


def _dot(grads, direction) -> float:
    return sum(float((g.double() * d.double()).sum()) for g, d in zip(grads, direction))


def _backward_per_row(probe, mb, row: int, loss_of):
    """∇ of one row's scalar (loss_of(token_logp, token_h, rows) on a one-row layout) by autograd."""
    params = [p for _, p in probe.trainable]
    token_logp, token_h = probe.runner.forward(mb, grad=True)
    value = loss_of(token_logp, token_h, mb.token_rows)
    return torch.autograd.grad(value, params, allow_unused=True)


@pytest.mark.parametrize("variant", [
    [],                                                            # per-token, RB, snis_derivative, no KL
    ["estimators.delta_h1=causal_rb", "update.kl_coef=0.04", "update.loss=dr_grpo"],
    ["estimators.normalize=per_sequence", "estimators.payload=naive", "update.loss=dapo"],
    ["update.loss=bnpo", "update.loss_block_rows=8", "update.scale_rewards=batch", "update.kl_coef=0.04",
     "update.kl_bias_correction=true", "update.mask_truncated=true", "update.top_entropy_quantile=0.5",
     "update.entropy_coef=0.01", "sampling.max_new_tokens=2"],
])
def test_contributions_equal_per_sequence_backward(toy_checkpoint, variant):
    """c_i (E) and d_j (U) from forward mode equal one backward per sequence dotted with u (resp. v)."""
    probe = make_probe(toy_checkpoint, SMALL + variant)
    res = probe.run()
    est, base = probe.cfg.estimators, res.base
    assert res.explain_e is not None and res.explain_u is not None, res.explain_skipped
    u = res.update.u
    worst = 0.0
    for g in res.batch_e.groups:
        for i in range(g.size):
            mb = g.layout(slice(i, i + 1))

            def surrogate(token_logp, token_h, rows):
                phi = token_h if est.payload == "rb" else -token_logp
                a, b = surrogate_coefficients(phi, token_h, rows, num_rows=1, entropy=base.entropy,
                                              method=est.delta_h1, normalize=est.normalize)
                return surrogate_terms(phi, token_logp, a, b, sum_lam=base.sum_lam)[0]

            grads = _backward_per_row(probe, mb, i, surrogate)
            expected = _dot([torch.zeros(1) if x is None else x for x in grads], u)
            got = float(res.explain_e.contrib[g.prompt_index][i])
            worst = max(worst, abs(got - expected))
    scale = max(float(c.abs().max()) for c in res.explain_e.contrib.values())
    assert worst <= 1e-5 * scale, (worst, scale)

    v = [res.update.clip_coef * pt.grad_coef * ge for pt, ge in zip(res.update.parts, res.delta_h1.grad_entropy)]
    norm = res.update.normalisers
    spec = LossSpec.from_config(probe.cfg.update)
    worst = 0.0
    for g in res.batch_u.groups:
        coefficients = row_coefficients(spec, g, norm, kept=g.kept(probe.cfg.update.mask_truncated))
        for i in range(g.size):
            mb = g.layout(slice(i, i + 1))
            ref = None
            if probe.cfg.update.kl_coef:
                with probe.runner.reference():
                    ref = probe.runner.forward(mb, grad=False)[0].detach()

            def loss(token_logp, token_h, rows, g=g, i=i, ref=ref, coefficients=coefficients):
                return update_loss(token_logp, token_h, rows, g.advantages[i:i + 1], coefficients[i:i + 1], spec,
                                   token_ref_logp=ref)

            grads = _backward_per_row(probe, mb, i, loss)
            expected = _dot([torch.zeros(1) if x is None else x for x in grads], v)
            worst = max(worst, abs(float(res.explain_u.contrib[g.prompt_index][i]) - expected))
    scale = max(float(c.abs().max()) for c in res.explain_u.contrib.values())
    assert scale > 0 and worst <= 1e-5 * scale, (worst, scale)
    # Both decompositions close on δH₁/η up to float32 rounding of the model's arithmetic.
    assert res.explain_e.closure < 1e-5 and res.explain_u.closure < 1e-5


@pytest.fixture(scope="module")
def family_prompts(tmp_path_factory):
    return write_family_prompts(tmp_path_factory.mktemp("fam") / "prompts.jsonl")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_second_directional_derivative_matches_finite_differences(family, family_prompts, tmp_path):
    """Nested forward mode (ℓ'', H'') against a Richardson central difference of the first-order jvp, and the
    first-order jvp against one backward per row, on every supported model family in float64. Guards the
    composite kernels: torch's LayerNorm gave a silently wrong second derivative under nested jvp."""
    ckpt = build_family_checkpoint(family, tmp_path / family)
    probe = make_probe(ckpt, ["precision.dtype=float64", f"sampling.prompts={family_prompts}"])
    probe.model.eval()
    group = probe.sample("E", 1, 3).groups[0]
    mb = group.layout(slice(0, group.size))
    gen = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1 for _, p in probe.trainable]
    policy, theta0 = probe.policy, [p.detach().clone() for _, p in probe.trainable]
    names = parameter_names(policy, probe.trainable)

    def at(step: float, order: int):
        set_theta(probe.trainable, theta0, direction, step)
        try:
            with eager_attention(policy):
                return token_derivatives(policy, names, probe.trainable, mb, direction, device=probe.rt.device,
                                         temperature=probe.cfg.sampling.temperature, order=order)
        finally:
            set_theta(probe.trainable, theta0, direction, 0.0)

    td = at(0.0, 2)
    assert all(p is q for (_, p), (_, q) in zip(probe.trainable, probe.runner.trainable))

    def central(step):
        hi, lo = at(step, 1), at(-step, 1)
        return (hi.d_logp - lo.d_logp) / (2 * step), (hi.d_entropy - lo.d_entropy) / (2 * step)

    h = 2e-3
    (l1, e1), (l2, e2) = central(h), central(h / 2)
    for exact, coarse, fine in ((td.dd_logp, l1, l2), (td.dd_entropy, e1, e2)):
        richardson = (4 * fine - coarse) / 3
        assert float((richardson - exact).abs().max()) <= 2e-3 * float(exact.abs().max()), family
    # First order against reverse mode, row by row.
    rows = mb.token_rows
    for i in range(mb.num_rows):
        grads = _backward_per_row(probe, group.layout(slice(i, i + 1)), i,
                                  lambda lp, ent, r: lp.double().sum() + ent.double().sum())
        expected = _dot([torch.zeros(1) if x is None else x for x in grads], direction)
        got = float((td.d_logp + td.d_entropy)[rows == i].sum())
        assert abs(got - expected) <= 1e-6 * max(1.0, abs(expected)), (family, i, got, expected)


def test_curvature_matches_finite_difference_of_the_snis_estimator(toy_checkpoint):
    """Ĥ'' (and Ĥ') of the same-sample estimator along u against second (first) central differences of the probe's
    own SNIS estimate Ĥ(θ + ηu) on the same E samples, Richardson-extrapolated."""
    probe = make_probe(toy_checkpoint, SMALL)
    res = probe.run()
    rt, runner, batch, est = probe.rt, probe.runner, res.batch_e, probe.cfg.estimators
    theta0 = [p.detach().clone() for _, p in probe.trainable]
    u = res.update.u

    def entropy_at(eta):
        set_theta(probe.trainable, theta0, u, eta)
        try:
            new = score_batch(rt, runner, batch)
        finally:
            set_theta(probe.trainable, theta0, u, 0.0)
        return snis_point(rt, batch, res.scores_e, new, base=res.base, est=est)[0]["entropy_new"]

    h0 = res.base.entropy
    e = res.explain_e
    step = 0.5 * e.linear_regime_eta  # where the second-order term is a few % of the first: both well resolved

    def second(s):
        return (entropy_at(s) - 2 * h0 + entropy_at(-s)) / s ** 2

    def first(s):
        return (entropy_at(s) - entropy_at(-s)) / (2 * s)

    d2 = (4 * second(step / 2) - second(step)) / 3
    d1 = (4 * first(step / 2) - first(step)) / 3
    assert abs(d2 - e.second_derivative) <= 2e-2 * abs(e.second_derivative), (d2, e.second_derivative)
    assert abs(d1 - e.first_derivative) <= 1e-3 * abs(e.first_derivative), (d1, e.first_derivative)
    # The sweep's δH₂ is ½η²Ĥ''; δH₁ + δH₂ tracks ΔH_true better than δH₁ alone at the largest η.
    point = res.sweep[-1]
    assert point.delta_h2 == 0.5 * point.eta ** 2 * e.second_derivative
    assert math.isfinite(e.linear_regime_eta) and e.linear_regime_eta > 0


def test_cui_proxy_equals_brute_force(toy_checkpoint):
    """Cov(ℓ, A) and Cov(ℓ, π·A) over U's response tokens, recomputed from the scorer's per-token log-probs with a
    plain two-pass covariance; the per-sequence shares sum to the covariance."""
    probe = make_probe(toy_checkpoint, SMALL)
    res = probe.run()
    xs, adv = [], []
    for g in res.batch_u.real_groups:
        for i in range(g.size):
            token_logp, _ = probe.runner.forward(g.layout(slice(i, i + 1)), grad=False)
            xs.extend(token_logp.double().tolist())
            adv.extend([float(g.advantages[i])] * token_logp.numel())
    x, a = torch.tensor(xs, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)
    pa = torch.exp(x) * a
    cov = float(((x - x.mean()) * (a - a.mean())).mean())
    cov_pi = float(((x - x.mean()) * (pa - pa.mean())).mean())
    ex = res.explain_u
    assert abs(ex.cov_logp_adv - cov) <= 1e-5 * abs(cov)
    assert abs(ex.cov_logp_pi_adv - cov_pi) <= 1e-5 * abs(cov_pi)
    shares = sum(float(c.sum()) for c in ex.cov_contrib.values())
    assert abs(shares - ex.cov_logp_adv) <= 1e-12 * abs(ex.cov_logp_adv)
    assert ex.cov_logp_adv_se > 0


@pytest.fixture(scope="module")
def gpt2_float64(tmp_path_factory):
    """A GPT-2-family checkpoint: LayerNorm and GELU with no float32 casts inside, so float64 runs are float64
    throughout (Llama-style RMSNorm casts to float32 even in a float64 model)."""
    root = tmp_path_factory.mktemp("gpt2")
    return build_family_checkpoint("gpt2", root / "ckpt"), write_family_prompts(root / "prompts.jsonl")


def _closure_overrides(prompts, out):
    # The family prompts' rewards are all 0 on a random model (advantages 0): the KL term gives U its gradient.
    return [f"sampling.prompts={prompts}", "precision.dtype=float64", "update.kl_coef=0.04", "sampling.B_E=4",
            "sampling.G_E=4",
            "sampling.B_U=4", "sampling.G_U=4", "estimators.etas=[0,1e-4]", f"output.dir={out}"]


def test_decompositions_close_exactly_in_float64(gpt2_float64, tmp_path):
    """In float64 both decompositions sum to δH₁/η within 1e-9 (relative): Σ_i c_i over E, and
    ∇Ĥ·u_base + Σ_j d_j over U."""
    ckpt, prompts = gpt2_float64
    probe = make_probe(ckpt, _closure_overrides(prompts, tmp_path / "out"))
    res = probe.run()
    assert res.explain_e.closure <= 1e-9 and res.explain_u.closure <= 1e-9, (res.explain_e.closure,
                                                                            res.explain_u.closure)
    assert abs(res.delta_h1.per_eta) > 0 and abs(res.explain_u.sum_contrib) > 0


@pytest.mark.slow
def test_decompositions_close_and_agree_across_ranks(gpt2_float64, tmp_path):
    """2-rank DDP with torchrun: the summary's closures stay ≤ 1e-9 and every sequence's contribution equals the
    single-process one (same groups, same per-group layout)."""
    ckpt, prompts = gpt2_float64
    outs = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        overrides = [f"checkpoint.path={ckpt}", "device=cpu", *_closure_overrides(prompts, out)]
        if world == 1:
            cmd = [sys.executable, "-m", "probe_dist.main", *overrides]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "-m", "probe_dist.main", "distributed.strategy=ddp", "distributed.backend=gloo", *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        rows = [json.loads(line) for line in (out / "sequences.jsonl").read_text().splitlines()]
        outs[world] = (summary, rows)
        assert summary["provenance/world_size"] == world
        assert summary["explain/closure_e"] <= 1e-9 and summary["explain/closure_u"] <= 1e-9
        per_eta = summary["delta_h1/per_eta"]
        sum_e = sum(r["contrib_e"] for r in rows if r["batch"] == "E")
        sum_u = sum(r["contrib_u"] for r in rows if r["batch"] == "U")
        assert abs(sum_e - per_eta) <= 1e-9 * abs(per_eta)
        assert abs(summary["explain/delta_h1_base_per_eta"] + sum_u - per_eta) <= 1e-9 * abs(per_eta)
    key = ("batch", "prompt_index", "response")
    one = {tuple(r[k] for k in key): r for r in outs[1][1]}
    for r in outs[2][1]:
        ref = one[tuple(r[k] for k in key)]
        for col in ("contrib_e", "contrib_u", "cov_contrib"):
            if col in r:
                assert r[col] == pytest.approx(ref[col], rel=1e-12, abs=1e-15), col


def test_normalisers_match_the_estimator():  # guards the helper used above against a silent API change
    assert torch.equal(normaliser_lengths(torch.tensor([3, 1]), "per_token"), torch.tensor([3.0, 1.0],
                                                                                         dtype=torch.float64))


def test_curvature_is_flagged_when_within_two_se_and_rows_carry_the_prompt(toy_checkpoint):
    from probe_dist.report.build import sequence_rows
    from probe_dist.results import EExplanation, ProbeResult

    def explained(second, se):
        return ProbeResult(explain_e=EExplanation(contrib={}, sum_contrib=0.0, closure=0.0, delta_h1_se_fixed=0.0,
                                                  first_derivative=-1.0, second_derivative=second,
                                                  second_derivative_se=se, second_derivative_se_fixed=se / 10,
                                                  linear_regime_eta=1e-3))

    assert not explained(100.0, 60.0).curvature_resolved()
    assert any("not resolved" in w for w in explained(100.0, 60.0).warnings())
    assert explained(100.0, 40.0).curvature_resolved()
    assert explained(100.0, 60.0).explain_summary()["curvature/resolved"] is False
    fixed = explained(100.0, 60.0)
    fixed.se_kind = "fixed_prompts"
    assert fixed.curvature_resolved()  # its fixed-prompt SE is 6
    probe = make_probe(toy_checkpoint, SMALL)
    res = probe.run()
    rows = sequence_rows(res, lambda ids: probe.tokenizer.decode(ids))
    assert rows and all(r["prompt"].endswith("=") and "+" in r["prompt"] for r in rows)
