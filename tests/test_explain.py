"""docs/method.md §10–§11: the explanation — per-sequence decompositions of δH₁, the curvature δH₂, the Cui proxy,
and the forward-mode directional derivatives behind them — against independent computations: per-sequence
backward passes, finite differences of the scorer and of the SNIS estimator, a brute-force covariance, and (in
float64) exact closure of both decompositions, single process and 2-rank DDP."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from probe_dist.estimators.delta_h1 import surrogate_coefficients, surrogate_terms
from probe_dist.estimators.entropy import normaliser_lengths
from probe_dist.explain.decompose import explain_e
from probe_dist.explain.directional import eager_attention, parameter_names, token_derivatives
from probe_dist.measurement.sweep import snis_point
from probe_dist.prediction.delta_h1 import predict_delta_h1
from probe_dist.scoring.score import base_entropy, score_batch
from probe_dist.update.loss import LossSpec, row_coefficients, update_loss
from probe_dist.update.step import set_theta
from tests.model_families import FAMILIES, build_family_checkpoint, write_family_prompts
from tests.probe_harness import make_probe
from tests.tolerances import fp_bound, two_path_tol64, unit_roundoff

SMALL = ["sampling.B_E=4", "sampling.G_E=4", "sampling.B_U=4", "sampling.G_U=4", "estimators.etas=[0,1e-4]"]


def _dot(grads, direction) -> float:
    return sum(float((g.double() * d.double()).sum()) for g, d in zip(grads, direction))


def _two_float32_paths_tol(err32: float, scale: float) -> float:
    """|a − b| bound for two float32 paths computing one quantity of size `scale`, each within ≈ err32 (the
    measured |x₃₂ − x₆₄| of one of them) of the exact value: 4× safety each, plus one float32 rounding of |x|
    (tests/test_cli.py's two_path_tol)."""
    return 2 * (4 * err32 + fp_bound(torch.float32, 1, scale))


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
def test_contributions_equal_per_sequence_backward(toy_checkpoint, variant, float64_throughout):
    """c_i (E) and d_j (U) from forward mode equal one backward per sequence dotted with u (resp. v), float32;
    the backward also on the toy's float64 twin, which measures the float32 rounding of each row."""
    probe = make_probe(toy_checkpoint, SMALL + variant)
    twin = make_probe(toy_checkpoint, SMALL + variant + ["precision.dtype=float64"])
    res = probe.run()
    est, base = probe.cfg.estimators, res.base
    assert res.explain_e is not None and res.explain_u is not None, res.explain_skipped
    u = res.update.u
    rows_e = []  # (forward mode, backward float32, backward float64) per E row
    for g in res.batch_e.groups:
        for i in range(g.size):
            mb = g.layout(slice(i, i + 1))

            def surrogate(token_logp, token_h, rows):
                phi = token_h if est.payload == "rb" else -token_logp
                a, b = surrogate_coefficients(phi, token_h, rows, num_rows=1, entropy=base.entropy,
                                              method=est.delta_h1, normalize=est.normalize)
                return surrogate_terms(phi, token_logp, a, b, sum_lam=base.sum_lam)[0]

            expected = [_dot([torch.zeros(1) if x is None else x for x in _backward_per_row(pr, mb, i, surrogate)],
                             u) for pr in (probe, twin)]
            rows_e.append((float(res.explain_e.contrib[g.prompt_index][i]), *expected))
    # tol: fp forward and reverse mode are two float32 paths of one row's value: each within the measured float32
    # error of the backward, max_i |b₃₂ − b₆₄| (float64 twin, float64 throughout), 4× safety each (two_path_tol);
    # a wrong or missing tangent is O(|c_i|) (teeth below)
    tol_e = _two_float32_paths_tol(max(abs(b32 - b64) for _, b32, b64 in rows_e), max(abs(b64) for *_, b64 in rows_e))
    assert max(abs(got - b32) for got, b32, _ in rows_e) <= tol_e, (rows_e, tol_e)
    assert tol_e < 1e-2 * max(abs(b64) for *_, b64 in rows_e), tol_e  # tol: bound teeth (above)

    v = [res.update.clip_coef * pt.grad_coef * ge for pt, ge in zip(res.update.parts, res.delta_h1.grad_entropy)]
    norm = res.update.normalisers
    spec = LossSpec.from_config(probe.cfg.update)
    rows_u = []
    for g in res.batch_u.groups:
        coefficients = row_coefficients(spec, g, norm, kept=g.kept(probe.cfg.update.mask_truncated))
        for i in range(g.size):
            mb = g.layout(slice(i, i + 1))
            expected = []
            for pr in (probe, twin):
                ref = None
                if pr.cfg.update.kl_coef:
                    with pr.runner.reference():
                        ref = pr.runner.forward(mb, grad=False)[0].detach()

                def loss(token_logp, token_h, rows, g=g, i=i, ref=ref, coefficients=coefficients):
                    return update_loss(token_logp, token_h, rows, g.advantages[i:i + 1], coefficients[i:i + 1],
                                       spec, token_ref_logp=ref)

                expected.append(_dot([torch.zeros(1) if x is None else x for x in _backward_per_row(pr, mb, i, loss)],
                                     v))
            rows_u.append((float(res.explain_u.contrib[g.prompt_index][i]), *expected))
    scale_u = max(abs(b64) for *_, b64 in rows_u)
    tol_u = _two_float32_paths_tol(max(abs(b32 - b64) for _, b32, b64 in rows_u), scale_u)  # tol: fp as tol_e
    assert scale_u > 0 and max(abs(got - b32) for got, b32, _ in rows_u) <= tol_u, (rows_u, tol_u)
    assert tol_u < 1e-2 * scale_u, tol_u  # tol: bound teeth (above)
    # Both decompositions close on δH₁/η up to float32 rounding of the model's arithmetic.
    # tol: fp every float32 path's row value is within tol/2 of the exact one (the model above): Σ_i c_i and
    # δH₁/η (forward mode over E) each within n_E·tol_e/2, so |Σc − δH₁/η| ≤ n_E·tol_e; on U, ∇Ĥ·u_base + Σ_j d_j
    # vs δH₁/η adds the float32 backward errors of ∇Ĥ (E rows) and of ∇L_j inside u (U rows): ≤ n_E·tol_e + n_U·tol_u
    per_eta = abs(res.delta_h1.per_eta)
    assert res.explain_e.closure * per_eta <= len(rows_e) * tol_e, (res.explain_e.closure, tol_e)
    assert res.explain_u.closure * per_eta <= len(rows_e) * tol_e + len(rows_u) * tol_u, (res.explain_u.closure,)
    # teeth: both closure bounds are below the mean row's size, so a sum that drops (or counts twice) an average
    # sequence fails
    mean_e, mean_u = (sum(abs(b64) for *_, b64 in r) / len(r) for r in (rows_e, rows_u))
    assert len(rows_e) * tol_e < mean_e and len(rows_e) * tol_e + len(rows_u) * tol_u < mean_u, (tol_e, tol_u,
                                                                                                 mean_e, mean_u)


@pytest.fixture(scope="module")
def family_prompts(tmp_path_factory):
    return write_family_prompts(tmp_path_factory.mktemp("fam") / "prompts.jsonl")


def _float64_microbatch(ckpt, prompts, *, seed: int):
    """A float64 probe on `ckpt`, one sampled group of 3, its microbatch and a random direction (0.1·N(0, 1))."""
    probe = make_probe(ckpt, ["precision.dtype=float64", f"sampling.prompts={prompts}"])
    probe.model.eval()
    group = probe.sample("E", 1, 3).groups[0]
    gen = torch.Generator().manual_seed(seed)
    direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1 for _, p in probe.trainable]
    return probe, group, group.layout(slice(0, group.size)), direction


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_second_directional_derivative_matches_finite_differences(family, family_prompts, tmp_path):
    """Nested forward mode (ℓ'', H'') against a Richardson central difference of the first-order jvp, and the
    first-order jvp against one backward per row, on every supported model family in float64. Guards the
    composite kernels: torch's LayerNorm gave a silently wrong second derivative under nested jvp."""
    probe, group, mb, direction = _float64_microbatch(build_family_checkpoint(family, tmp_path / family),
                                                     family_prompts, seed=0)
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
    u32 = unit_roundoff(torch.float32)  # the precision floor: norms and softmaxes run in fp32 in float64 models
    for (exact, coarse, fine), first in (((td.dd_logp, l1, l2), td.d_logp), ((td.dd_entropy, e1, e2), td.d_entropy)):
        richardson = (4 * fine - coarse) / 3
        # tol: fp Richardson removes the O(h²) error |fine − coarse|/3 of the fine difference and leaves O(h⁴),
        # smaller by (h/2)²·C; the first-order values carry fp32 rounding ≲ 16·u₃₂·max|ℓ'| each, which the
        # difference quotient divides by h. The bound is measured on this family's inputs and must stay well
        # below the second derivative itself, so a wrong rule (O(1) relative: the LayerNorm bug) fails.
        bound = (fine - coarse).abs() / 3 + 16 * u32 * float(first.abs().max()) / h
        scale = float(exact.abs().max())
        assert float(bound.max()) < 0.05 * scale, (family, float(bound.max()), scale)  # tol: bound (teeth, above)
        assert bool(((richardson - exact).abs() <= bound).all()), (family, float((richardson - exact).abs().max()))
    # First order against reverse mode, row by row.
    rows = mb.token_rows
    for i in range(mb.num_rows):
        grads = _backward_per_row(probe, group.layout(slice(i, i + 1)), i,
                                  lambda lp, ent, r: lp.double().sum() + ent.double().sum())
        grads = [torch.zeros(1) if x is None else x for x in grads]
        expected = _dot(grads, direction)
        got = float((td.d_logp + td.d_entropy)[rows == i].sum())
        # tol: fp both routes differentiate the same fp32-floored forward: each gradient term g_k·d_k carries
        # ≲ 64·u₃₂ relative rounding (fp32 norm/softmax casts, 2 passes per layer, ≤ 4 layers, a summed row),
        # so |got − expected| ≤ 64·u₃₂·Σ_k|g_k·d_k| (measured here); a missing or wrong tangent is O(|expected|)
        scale = sum(float((g.double() * d.double()).abs().sum()) for g, d in zip(grads, direction))
        assert abs(got - expected) <= 64 * u32 * scale, (family, i, got, expected, scale)


def test_curvature_matches_finite_difference_of_the_snis_estimator(toy_checkpoint, float64_throughout):
    """Ĥ'' (and Ĥ') of the same-sample estimator along u against second (first) central differences of the probe's
    own SNIS estimate Ĥ(θ + ηu) on the same E samples, Richardson-extrapolated at two levels. The differences are
    taken on the toy's float64 twin (float64 throughout), where rounding is far below the truncation error."""
    probe = make_probe(toy_checkpoint, SMALL)
    twin = make_probe(toy_checkpoint, SMALL + ["precision.dtype=float64"])
    res = probe.run()
    batch, est = res.batch_e, probe.cfg.estimators
    u = res.update.u
    scores64 = score_batch(twin.rt, twin.runner, batch)
    base64 = base_entropy(twin.rt, batch, scores64, payload=est.payload, normalize=est.normalize)
    theta0 = [p.detach().clone() for _, p in twin.trainable]

    def entropy_at(eta):
        set_theta(twin.trainable, theta0, u, eta)
        try:
            new = score_batch(twin.rt, twin.runner, batch)
        finally:
            set_theta(twin.trainable, theta0, u, 0.0)
        return snis_point(twin.rt, batch, scores64, new, base=base64, est=est)[0]["entropy_new"]

    h0 = base64.entropy
    e = res.explain_e
    step = 0.5 * e.linear_regime_eta  # where the second-order term is a few % of the first: both well resolved
    values = {s: entropy_at(s) for k in (1, 2, 4) for s in (step / k, -step / k)}

    def second(s):
        return (values[s] - 2 * h0 + values[-s]) / s ** 2

    def first(s):
        return (values[s] - values[-s]) / (2 * s)

    # The same estimator from the twin's forward-mode pass: the float32 pass's rounding, measured. (Without the
    # float32 run's rows: δH₁'s nested pass kept them for explain_e, which would otherwise reuse them.)
    assert res.delta_h1.e_rows is not None  # precondition: the float32 run took the shared pass
    e64 = explain_e(twin.rt, twin.runner, batch, scores64, base=base64, u=u,
                    delta_h1=dataclasses.replace(res.delta_h1, e_rows=None), est=est)
    # Float64 rounding of each Ĥ value: the float32 error of Ĥ on these inputs, rescaled (two_path_tol64's model).
    delta = two_path_tol64(abs(res.base.entropy - h0), abs(h0)) / 2
    # rounding of the extrapolated differences, from |δĤ| ≤ delta per value: (4·D(s/4) − D(s/2))/3
    rounding = {"second": (4 * 4 * delta / (step / 4) ** 2 + 4 * delta / (step / 2) ** 2) / 3,
                "first": (4 * delta / (step / 4) + delta / (step / 2)) / 3}
    for name, fd, jvp32, jvp64 in (("second", second, e.second_derivative, e64.second_derivative),
                                   ("first", first, e.first_derivative, e64.first_derivative)):
        coarse, fine = ((4 * fd(s / 2) - fd(s)) / 3 for s in (step, step / 2))
        # tol: fp the fine Richardson value's O(h⁴) remainder is ~|fine − coarse|/15 (the change between the two
        # levels: 15× safety), plus its rounding (above), plus the float32 pass's own rounding, measured as
        # |jvp₃₂ − jvp₆₄| (4× safety); a wrong curvature term (S'² in w'', the 2Ĥ'D' term) is O(|Ĥ''|)
        bound = abs(fine - coarse) + rounding[name] + 4 * abs(jvp32 - jvp64)
        assert abs(fine - jvp32) <= bound, (name, fine, coarse, jvp32, jvp64, bound)
        assert bound < 1e-2 * abs(jvp32), (name, bound, jvp32)  # tol: bound teeth (above)
    # The sweep's δH₂ is ½η²Ĥ''; δH₁ + δH₂ tracks ΔH_true better than δH₁ alone at the largest η.
    point = res.sweep[-1]
    assert point.delta_h2 == 0.5 * point.eta ** 2 * e.second_derivative  # tol: exact the same float64 formula
    assert math.isfinite(e.linear_regime_eta) and e.linear_regime_eta > 0


def test_cui_proxy_equals_brute_force(toy_checkpoint, float64_throughout):
    """Cov(ℓ, A) and Cov(ℓ, π·A) over U's response tokens, recomputed from the scorer's per-token log-probs with a
    plain two-pass covariance; the per-sequence shares sum to the covariance."""
    probe = make_probe(toy_checkpoint, SMALL)
    twin = make_probe(toy_checkpoint, SMALL + ["precision.dtype=float64"])
    res = probe.run()
    xs, xs64, adv, seqs = [], [], [], []
    for g in res.batch_u.real_groups:
        for i in range(g.size):
            mb = g.layout(slice(i, i + 1))
            token_logp, _ = probe.runner.forward(mb, grad=False)
            xs.extend(token_logp.double().tolist())
            xs64.extend(twin.runner.forward(mb, grad=False)[0].double().tolist())
            adv.extend([float(g.advantages[i])] * token_logp.numel())
            seqs.append((float(g.advantages[i]), float(token_logp.double().sum()), token_logp.numel()))
    x, a = torch.tensor(xs, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)
    pa = torch.exp(x) * a
    cov = float(((x - x.mean()) * (a - a.mean())).mean())
    cov_pi = float(((x - x.mean()) * (pa - pa.mean())).mean())
    ex = res.explain_u
    m = x.numel()
    # tol: fp per token, the explanation's ℓ (its jvp pass) and this plain forward are two float32 paths: τ =
    # two_path_tol with err32 = max_t |ℓ₃₂ − ℓ₆₄| of the plain path (float64 twin), measured. Cov(ℓ, A) moves by
    # ≤ τ·mean|A − Ā|; Cov(ℓ, πA) by ≤ τ·mean|πA − mean πA| + (e^τ − 1)(2τ·max|πA| + mean(|ℓ − ℓ̄|·|πA|));
    # plus each side's float64 sums over the m tokens (γ_m of the terms' sizes)
    tau = _two_float32_paths_tol(float((x - torch.tensor(xs64, dtype=torch.float64)).abs().max()),
                                 float(x.abs().max()))
    grow = math.expm1(tau)
    tol = tau * float((a - a.mean()).abs().mean()) + 2 * fp_bound(
        torch.float64, m, float((x * a).abs().mean()) + abs(float(x.mean() * a.mean())))
    tol_pi = (tau * float((pa - pa.mean()).abs().mean()) + grow * (2 * tau * float(pa.abs().max())
              + float(((x - x.mean()).abs() * pa.abs()).mean()))
              + 2 * fp_bound(torch.float64, m, float((x * pa).abs().mean()) + abs(float(x.mean() * pa.mean()))))
    assert abs(ex.cov_logp_adv - cov) <= tol, (ex.cov_logp_adv, cov, tol)
    assert abs(ex.cov_logp_pi_adv - cov_pi) <= tol_pi, (ex.cov_logp_pi_adv, cov_pi, tol_pi)
    # tol: bound teeth: a covariance centred wrongly (Ā over sequences, not tokens) or without π is O(|Cov|);
    # Cov(ℓ, πA) is small next to its terms on some toys (they cancel), hence its looser margin
    assert tol < 1e-2 * abs(cov) and tol_pi < 0.1 * abs(cov_pi), (tol, cov, tol_pi, cov_pi)
    shares = sum(float(c.sum()) for c in ex.cov_contrib.values())
    # tol: fp two float64 evaluations of one covariance (Σ_i shares (A_i − Ā)(s_i − T_i·ℓ̄)/M vs E[ℓA] − E[ℓ]E[A])
    # over the m tokens and the sequences: γ_(m + sequences) of the terms' sizes, each
    x_bar, a_bar = float(x.mean()), float(a.mean())
    share_terms = sum(abs((ai - a_bar) * (si - ti * x_bar)) for ai, si, ti in seqs) / m
    scale = share_terms + float((x * a).abs().mean()) + abs(x_bar * a_bar)
    assert abs(shares - ex.cov_logp_adv) <= 2 * fp_bound(torch.float64, m + len(seqs), scale)  # tol: fp (above)
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


def _closure_tol(err32: float, per_eta: float, terms: float, rows: int) -> float:
    """A bound on |Σ contributions (+ base) − δH₁/η| of a float64 run (absolute, nats per unit η).

    err32: the same closure's |Σ − δH₁/η| in a float32 run on the same samples, i.e. u₃₂ × the forward-mode
    passes' condition number, measured; rescaled to float64 (two_path_tol64). terms: Σ|c_i| (+ |base|) + |δH₁/η|,
    the sizes of what the float64 sums over the `rows` sequences add in both dtypes alike (γ_rows each side)."""
    return two_path_tol64(err32, abs(per_eta)) + 2 * fp_bound(torch.float64, rows, terms)


def _first_order_gap(probe, res) -> float:
    """|δH₁/η by the first-order forward-mode pass − the run's δH₁/η| (absolute). The run's came from the
    explanation's nested pass (asserted), whose Σ_i c_i is δH₁ by construction (closure_e = 0): this second code
    path is what the E decomposition's sum is checked against."""
    assert res.delta_h1.e_rows is not None and res.explain_e.closure == 0.0  # precondition: the shared pass ran
    first = predict_delta_h1(probe.rt, probe.runner, res.batch_e, res.scores_e, base=res.base, u=res.update.u,
                             est=probe.cfg.estimators)
    assert first.e_rows is None  # the first-order pass, not the nested one again
    return abs(first.per_eta - res.delta_h1.per_eta)


def _float32_closures(ckpt, prompts, out, res64=None) -> tuple[float, float]:
    """|Σ_i c_i − δH₁/η by the first-order pass| and |∇Ĥ·u_base + Σ_j d_j − δH₁/η| of the same run in float32
    (absolute); with `res64`, asserts the float32 run drew the same samples (so the errors are measured on the same
    inputs)."""
    overrides = [o for o in _closure_overrides(prompts, out) if o != "precision.dtype=float64"]
    probe = make_probe(ckpt, overrides)
    res = probe.run()
    if res64 is not None:
        for b32, b64 in ((res.batch_e, res64.batch_e), (res.batch_u, res64.batch_u)):
            assert [g.responses.tolist() for g in b32.groups] == [g.responses.tolist() for g in b64.groups]
    per_eta = abs(res.delta_h1.per_eta)
    return _first_order_gap(probe, res), res.explain_u.closure * per_eta


def test_decompositions_close_exactly_in_float64(gpt2_float64, tmp_path):
    """In float64 both decompositions sum to δH₁/η to float64 rounding (_closure_tol: the float32 run's closure
    rescaled): Σ_i c_i over E (the nested pass, against δH₁ by the first-order pass), and ∇Ĥ·u_base + Σ_j d_j
    over U."""
    ckpt, prompts = gpt2_float64
    probe = make_probe(ckpt, _closure_overrides(prompts, tmp_path / "out"))
    res = probe.run()
    err32_e, err32_u = _float32_closures(ckpt, prompts, tmp_path / "out32", res)
    per_eta = res.delta_h1.per_eta
    sum_c = sum(float(c.abs().sum()) for c in res.explain_e.contrib.values())
    sum_d = sum(float(d.abs().sum()) for d in res.explain_u.contrib.values())
    rows_e, rows_u = (sum(g.size for g in b.real_groups) for b in (res.batch_e, res.batch_u))
    # tol: fp _closure_tol (float32 closure measured on the same samples, rescaled; float64 sums over the rows)
    tol_e = _closure_tol(err32_e, per_eta, sum_c + abs(per_eta), rows_e)
    tol_u = _closure_tol(err32_u, per_eta, abs(res.explain_u.base_per_eta) + sum_d + abs(per_eta), rows_u)
    assert _first_order_gap(probe, res) <= tol_e, tol_e  # Σ_i c_i (the nested pass) against the first-order pass
    assert res.explain_u.closure * abs(per_eta) <= tol_u, (res.explain_u.closure, tol_u)
    # tol: bound teeth: a sequence dropped or counted twice moves a sum by O(|δH₁/η|/rows)
    assert max(tol_e, tol_u) < 1e-9 * abs(per_eta), (tol_e, tol_u, per_eta)
    assert abs(res.delta_h1.per_eta) > 0 and abs(res.explain_u.sum_contrib) > 0


@pytest.mark.slow
def test_decompositions_close_and_agree_across_ranks(gpt2_float64, tmp_path):
    """2-rank DDP with torchrun: the summary's closures stay at float64 rounding (_closure_tol) and every sequence's
    contribution equals the single-process one (same groups, same per-group layout) up to the reordered float64
    all-reduce sums."""
    ckpt, prompts = gpt2_float64
    err32_e, err32_u = _float32_closures(ckpt, prompts, tmp_path / "w32")
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
        per_eta = summary["delta_h1/per_eta"]
        c_e = [r["contrib_e"] for r in rows if r["batch"] == "E"]
        c_u = [r["contrib_u"] for r in rows if r["batch"] == "U"]
        base = summary["explain/delta_h1_base_per_eta"]
        sum_c, sum_d = sum(abs(c) for c in c_e), sum(abs(d) for d in c_u)
        # tol: fp _closure_tol as in the single-process test (the float32 closures of the same config: the same
        # samples, asserted there), plus this sum over the rows read back (γ_rows·Σ|c|)
        tol_e = _closure_tol(err32_e, per_eta, sum_c + abs(per_eta), len(c_e))
        tol_u = _closure_tol(err32_u, per_eta, abs(base) + sum_d + abs(per_eta), len(c_u))
        assert summary["explain/closure_e"] * abs(per_eta) <= tol_e, (world, summary["explain/closure_e"], tol_e)
        assert summary["explain/closure_u"] * abs(per_eta) <= tol_u, (world, summary["explain/closure_u"], tol_u)
        assert abs(sum(c_e) - per_eta) <= tol_e + fp_bound(torch.float64, len(c_e), sum_c)
        assert abs(base + sum(c_u) - per_eta) <= tol_u + fp_bound(torch.float64, len(c_u), sum_d)
        assert max(tol_e, tol_u) < 1e-9 * abs(per_eta), (tol_e, tol_u)  # tol: bound teeth (single-process test)
    key = ("batch", "prompt_index", "response")
    one = {tuple(r[k] for k in key): r for r in outs[1][1]}
    assert len(one) == len(outs[2][1])
    for col in ("contrib_e", "contrib_u", "cov_contrib"):
        pairs = [(r[col], one[tuple(r[k] for k in key)][col]) for r in outs[2][1] if col in r]
        # tol: fp a row's value is linear in the all-reduced direction (u, v) and sums (Ĥ, Σλ), whose float64 sums
        # over the rows' pieces run in another order on 2 ranks: γ_rows of the pieces' sizes, Σ_rows |value|
        tol = fp_bound(torch.float64, len(pairs), sum(abs(b) for _, b in pairs))
        assert all(abs(a - b) <= tol for a, b in pairs), (col, tol, max(abs(a - b) for a, b in pairs))


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


def test_second_order_head_in_closed_form_equals_the_nested_pass_through_it(gpt2_float64):
    """The nested pass with the head and softmax in closed form (a frozen head, the default) gives the same ℓ, H
    and derivatives as the fallback that differentiates through the head too (taken when the head's weight is
    trainable: here it is listed among the trainable tensors with a zero direction), in a float64 model."""
    probe, _, mb, direction = _float64_microbatch(*gpt2_float64, seed=1)
    policy = probe.policy
    head_weight = policy.head.weight
    with_head = [*probe.trainable, ("head.weight", head_weight)]
    by_id = {id(p): n for n, p in policy.named_parameters()}
    assert id(head_weight) in by_id  # precondition: the head's weight is a parameter the pass can swap
    results = {}
    with eager_attention(policy):
        for name, trainable, dirs in (("closed_form", probe.trainable, direction),
                                      ("nested", with_head, [*direction, torch.zeros_like(head_weight)])):
            names = parameter_names(policy, trainable)
            results[name] = token_derivatives(policy, names, trainable, mb, dirs, device=probe.rt.device,
                                              temperature=probe.cfg.sampling.temperature, order=2)
    for field in ("logp", "entropy", "d_logp", "d_entropy", "dd_logp", "dd_entropy"):
        a, b = getattr(results["closed_form"], field), getattr(results["nested"], field)
        # tol: fp two float64 evaluations (closed forms vs op-by-op nested jvp) of the same vocabulary sums
        # (V = 64 logits, products of up to 4 factors: γ over 4·V terms) relative to the largest value (measured
        # here ~3 u₆₄); a wrong or missing term (the LayerNorm bug's size) is O(1) relative
        tol = fp_bound(torch.float64, 4 * 64, float(b.abs().max()))
        assert float((a - b).abs().max()) <= tol, (field, float((a - b).abs().max()), tol)
        assert float(b.abs().max()) > 0  # tol: exact precondition: the values are not trivially zero


def test_a_failed_nested_pass_gives_first_order_delta_h1_and_is_not_retried(toy_checkpoint, monkeypatch):
    """When the nested pass cannot run, δH₁ is the first-order pass's — the same number as a run without the
    explanation, bit for bit — the explanation is skipped with the reason, and the nested pass is tried once."""
    import probe_dist.prediction.delta_h1 as module
    from probe_dist.explain.directional import ForwardModeUnavailable

    off = make_probe(toy_checkpoint, SMALL + ["estimators.explain=false"]).run()
    attempts = []
    real = module.token_derivatives

    def no_second_order(*args, order=1, **kwargs):
        if order == 2:
            attempts.append(1)
            raise ForwardModeUnavailable("no second-order rule (test)")
        return real(*args, order=order, **kwargs)

    monkeypatch.setattr(module, "token_derivatives", no_second_order)
    res = make_probe(toy_checkpoint, SMALL).run()
    assert res.delta_h1.per_eta == off.delta_h1.per_eta  # tol: exact the same samples and the same first-order pass
    assert res.explain_e is None and "no second-order rule (test)" in res.explain_skipped, res.explain_skipped
    assert len(attempts) == 1


def test_bfloat16_keeps_delta_h1_and_the_explanation_in_separate_passes(toy_checkpoint):
    """In bfloat16 the nested pass's kernels differ from the first-order pass's by bfloat16 rounding: δH₁ stays the
    first-order pass's (equal to a run without the explanation) and closure_e reports the gap."""
    on = make_probe(toy_checkpoint, SMALL + ["precision.dtype=bfloat16"]).run()
    off = make_probe(toy_checkpoint, SMALL + ["precision.dtype=bfloat16", "estimators.explain=false"]).run()
    assert on.delta_h1.e_rows is None and on.explain_e is not None
    assert on.delta_h1.per_eta == off.delta_h1.per_eta  # tol: exact the same samples and passes
    assert on.explain_e.closure > 0  # tol: exact the two passes' kernels differ (composite vs fused) in bfloat16
