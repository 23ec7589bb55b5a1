"""Sampler weights (docs/method.md §13): E drawn by a sampler q ≠ π_θ, every estimate weighted by π_θ(y)/q(y).

Checked here against independent computations:
  • the pure functions (truncation, stabilisation, diagnostics) against direct formulas;
  • weights that are exactly 1 (log q = S) leave every number bit for bit as the unweighted path gives it;
  • integer weights are multiplicities: v_i ∝ m_i gives the same Ĥ, δH₁, ΔH_true and SEs as a batch in which
    response i appears m_i times (a second code path: no weights at all);
  • a real off-policy sampler end to end through `probe.run()` reports the weights' diagnostics.
The statistical proof — a sampler that is off gives exact values after the correction and wrong ones without
it — is in tests/test_exact_enumeration.py (`test_sampler_mismatch_*`).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from probe_dist.estimators.behaviour import (
    SAMPLER_SUM_FIELDS,
    log_sampler_ratio,
    sampler_diagnostics,
    sampler_local_sums,
    sampler_weights,
    truncate_log_ratio,
)
from probe_dist.explain.decompose import explain_e
from probe_dist.measurement.sweep import snis_point
from probe_dist.prediction.delta_h1 import predict_delta_h1
from probe_dist.rollout.batch import Group, RolloutBatch
from probe_dist.rollout.sample import sample_batch
from probe_dist.scoring.behaviour import apply_sampler_weights
from probe_dist.scoring.score import base_entropy, score_batch
from probe_dist.update.gradient import update_gradient
from probe_dist.update.step import set_theta, update_parts
from tests.helpers.samplers import TemperedSampler
from tests.probe_harness import make_probe
from tests.tolerances import fp_bound


def test_pure_functions_against_direct_formulas():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(50, generator=gen, dtype=torch.float64) * 3
    logq = s + torch.randn(50, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, 9, (50,), generator=gen)
    log_rho = log_sampler_ratio(s, logq)
    assert torch.equal(log_rho, s - logq)  # tol: exact same float64 operation
    cut = truncate_log_ratio(log_rho, 2.0)
    assert torch.equal(cut, torch.minimum(log_rho, torch.full_like(log_rho, math.log(2.0))))  # tol: exact clamp
    assert torch.equal(truncate_log_ratio(log_rho, None), log_rho)  # tol: exact no cap, no change
    with pytest.raises(ValueError):
        truncate_log_ratio(log_rho, 0.0)
    v = sampler_weights(cut, float(cut.max()))
    assert float(v.max()) == 1.0  # tol: exact exp(0)
    rho = torch.exp(cut)
    # tol: fp float64 exp(x − m) vs exp(x)/exp(m): a few roundings of values ≤ 1 (4·3·u)
    assert torch.allclose(v, rho / rho.max(), rtol=0, atol=fp_bound(torch.float64, 3, 1.0))
    sums = sampler_local_sums(log_rho, cut, float(cut.max()), float(log_rho.max()), lengths)
    d = sampler_diagnostics(sums, float(log_rho.max()))
    raw = torch.exp(log_rho)
    expected = {"ess": float(rho.sum() ** 2 / (rho * rho).sum()), "max_weight": float(rho.max() / rho.sum()),
                "trunc_frac": float((log_rho > math.log(2.0)).double().mean()), "kl": float((-log_rho).mean()),
                "log_ratio_per_token": float(log_rho.abs().sum() / lengths.sum()), "mean_ratio": float(raw.mean())}
    expected["ess_frac"] = expected["ess"] / 50
    assert len(sums) == len(SAMPLER_SUM_FIELDS)
    for key, value in expected.items():
        # tol: fp float64 sums of 50 terms, each a few roundings: 4·50·u relative
        assert math.isclose(d[key], value, rel_tol=fp_bound(torch.float64, 50, 1.0)), key


@pytest.fixture(scope="module")
def world(toy_checkpoint):
    """The probe's own steps on the toy: one E batch (8 groups of 4), one u from a U batch, θ₀."""
    probe = make_probe(toy_checkpoint, ["sampling.B_E=8", "sampling.G_E=4", "sampling.B_U=4", "sampling.G_U=4",
                                        "memory.microbatch_generate=8", "memory.microbatch_score=8",
                                        "memory.microbatch_grad=8"])
    probe.model.eval()
    cfg, rt, runner = probe.cfg, probe.rt, probe.runner
    kwargs = dict(sampling=cfg.sampling, loss_family=cfg.update.loss, adv_eps=cfg.update.adv_eps,
                  rows_per_chunk=cfg.memory.microbatch_generate, lockstep=False)
    batch_u = sample_batch(rt, runner.decoder, probe.tokenizer, "U", num_prompts=4, group_size=4, **kwargs)
    grad, *_ = update_gradient(rt, runner, batch_u, cfg.update)
    u = [part.u for part in update_parts(probe.optimizer, probe.trainable, grad)]
    # The update's size matters only through ΔH_true's curvature: a nonzero u, built and asserted
    assert sum(float((x * x).sum()) for x in u) > 0  # tol: bound u ≠ 0 (the toy's U batch has mixed rewards)
    theta0 = [p.detach().clone() for _, p in probe.trainable]
    return {"probe": probe, "u": u, "theta0": theta0, "kwargs": kwargs}


def _estimates(world, batch, *, eta: float = 1e-3, reverse: bool = False, explain: bool = False) -> dict:
    """Ĥ, δH₁/η (forward or reverse mode), ΔH_true(η) and their population SEs on `batch` (sampler weights as set)."""
    probe, u, theta0 = world["probe"], world["u"], world["theta0"]
    rt, runner, est = probe.rt, probe.runner, probe.cfg.estimators
    scores = score_batch(rt, runner, batch)
    base = base_entropy(rt, batch, scores, payload=est.payload, normalize=est.normalize)
    if reverse:
        from probe_dist.prediction.delta_h1 import _reverse_mode
        d1 = _reverse_mode(rt, runner, batch, scores, base=base, u=u, est=est)
    else:
        d1 = predict_delta_h1(rt, runner, batch, scores, base=base, u=u, est=est, second_order=explain)
    set_theta(probe.trainable, theta0, u, eta)
    scores_new = score_batch(rt, runner, batch)
    set_theta(probe.trainable, theta0, u, 0.0)
    sweep, _ = snis_point(rt, batch, scores, scores_new, base=base, est=est)
    out = {"entropy": base.entropy, "entropy_se": base.entropy_se, "d1": d1.per_eta, "d1_se": d1.per_eta_se,
           "dh": sweep["delta_h_true"], "dh_se": sweep["delta_h_true_se_population"], "kl": sweep["kl"],
           "scores": scores}
    if explain:
        e = explain_e(rt, runner, batch, scores, base=base, u=u, delta_h1=d1, est=est)
        out.update(curv=e.second_derivative, sum_c=e.sum_contrib)
    return out


def _batch_e(world, seed: int = 7) -> RolloutBatch:
    probe = world["probe"]
    kwargs = dict(world["kwargs"], sampling=dataclasses.replace(world["kwargs"]["sampling"], seed=seed))
    return sample_batch(probe.rt, probe.runner.decoder, probe.tokenizer, "E", num_prompts=8, group_size=4, **kwargs)


KEYS = ("entropy", "entropy_se", "d1", "d1_se", "dh", "dh_se", "kl")


@pytest.mark.parametrize("reverse", [False, True])
def test_unit_weights_change_nothing(world, reverse):
    """log q = S exactly gives v ≡ 1, and then every number is bit for bit the unweighted one."""
    probe = world["probe"]
    batch = _batch_e(world)
    plain = _estimates(world, batch, reverse=reverse, explain=not reverse)
    for g, sc in zip(batch.groups, plain["scores"]):
        g.behaviour_logp = sc.S.clone()
    diag = apply_sampler_weights(probe.rt, batch, plain["scores"], cap=None)
    assert all(torch.equal(g.v, torch.ones(g.size, dtype=torch.float64)) for g in batch.groups)  # tol: exact exp(0)
    assert diag.ess_frac == 1.0 and diag.trunc_frac == 0.0 and diag.kl == 0.0  # tol: exact v ≡ 1, log ρ ≡ 0
    weighted = _estimates(world, batch, reverse=reverse, explain=not reverse)
    for key in KEYS + (() if reverse else ("curv", "sum_c")):
        assert weighted[key] == plain[key], key  # tol: exact multiplying by 1.0 changes no bit


def _replicate(group: Group, m: torch.Tensor) -> Group:
    """The group with response i repeated m_i times (no sampler weights)."""
    idx = torch.repeat_interleave(torch.arange(group.size), m)
    return dataclasses.replace(group, responses=group.responses[idx], lengths=group.lengths[idx],
                               rewards=group.rewards[idx], advantages=group.advantages[idx],
                               ended=None if group.ended is None else group.ended[idx], reward_parts=None,
                               behaviour_logp=None, is_weight=None)


@pytest.mark.slow  # four probe passes over two batches (~40 s); the fast tier keeps the unit-weight check
def test_integer_weights_are_multiplicities(world):
    """Sampler weights v_i ∝ m_i (integers) estimate exactly what a batch holding response i m_i times does,
    unweighted: Ĥ, δH₁ and ΔH_true and their population SEs (the group totals coincide), and the KL(θ‖θ') mean. A second code path
    through every weighted sum — scoring, the forward-mode δH₁, the reverse-mode δH₁, the sweep."""
    probe = world["probe"]
    batch = _batch_e(world, seed=11)
    gen = torch.Generator().manual_seed(3)
    mult = [torch.randint(1, 4, (g.size,), generator=gen) for g in batch.groups]
    assert any(bool((m > 1).any()) for m in mult)  # tol: exact the weights are not all equal
    replicated = RolloutBatch(name="E", groups=[_replicate(g, m) for g, m in zip(batch.groups, mult)],
                              block_size=batch.block_size)
    plain = _estimates(world, batch)
    for g, sc, m in zip(batch.groups, plain["scores"], mult):
        g.behaviour_logp = sc.S - torch.log(m.double())  # ρ_i = m_i
    apply_sampler_weights(probe.rt, batch, plain["scores"], cap=None)
    for reverse in (False, True):
        weighted = _estimates(world, batch, reverse=reverse)
        reference = _estimates(world, replicated, reverse=reverse)
        tokens = sum(int(g.lengths.sum()) for g in replicated.groups)
        for key in KEYS:
            # tol: fp the replicated rows run in other microbatch layouts, so each float32 per-token value (ℓ, H
            # and their jvp) may round differently, by a few u₃₂ of its size; the float64 sums add `tokens` of
            # them: fp_bound(float32, tokens, scale) with scale the two values' size (measured: ≤ 1.2e-7 relative
            # for δH₁, 1e-16 for Ĥ, 0 for ΔH_true; dropping v from one sum moves a value by ≥ 2e-3 relative)
            scale = abs(reference[key]) + abs(plain[key])
            assert abs(weighted[key] - reference[key]) <= fp_bound(torch.float32, tokens, scale), \
                (key, reverse, weighted[key], reference[key])
        assert weighted["d1"] != plain["d1"]  # tol: exact the weights did change the estimate


def test_off_policy_run_reports_the_sampler(toy_checkpoint, tmp_path):
    """probe.run() with a sampler at another temperature: the summary carries the weights' diagnostics, the
    weights are not all 1, and η = 0 still gives exactly 0 (v cancels in Ĥ(θ') − Ĥ(θ) on the same sums)."""
    probe = make_probe(toy_checkpoint, ["sampling.B_E=8", "sampling.G_E=4", "sampling.B_U=4", "sampling.G_U=4",
                                        "estimators.etas=[0.0,1e-3]", "rollout.is_cap=3.0",
                                        f"output.dir={tmp_path}"])
    probe.sampler = TemperedSampler(probe.runner.decoder, 1.5 * probe.cfg.sampling.temperature)
    res = probe.run()
    summary = res.summary()
    assert res.final_status() == "completed"
    s = res.sampler
    assert s is not None and summary["sampler/cap"] == 3.0
    assert 0 < s.ess_frac < 1 and s.kl > 0  # tol: bound q ≠ π_θ: unequal weights, KL(q‖π) > 0 in expectation
    assert 0 <= s.trunc_frac <= 1  # tol: bound a share
    assert all(g.is_weight is not None and float(g.is_weight.max()) <= 1.0 for g in res.batch_e.groups)  # tol: bound
    zero = [p for p in res.sweep if p.eta == 0.0][0]
    assert zero.delta_h_true == 0.0  # tol: exact η = 0
