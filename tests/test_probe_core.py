"""Core probe properties on the real toy checkpoint: η = 0, route parity and bitwise restore, same-sample limit."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from probe_dist.runtime.snapshot import restore_snapshot, take_snapshot
from probe_dist.update.gradient import update_gradient
from probe_dist.update.step import real_step, set_theta
from tests.probe_harness import make_probe

SMALL = ["sampling.B_E=6", "sampling.G_E=4", "sampling.B_U=4", "sampling.G_U=4"]


def _training_state(probe):
    opt = probe.optimizer
    return {
        "params": [p.detach().clone() for _, p in probe.trainable],
        "opt": [{k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in opt.state[p].items()}
                for _, p in probe.trainable],
        "groups": [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "rng": (torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()),
        "training": {n: m.training for n, m in probe.model.named_modules()},
    }


def _assert_bitwise_equal(a, b):
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x, y)
    for sa, sb in zip(a["opt"], b["opt"]):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k  # includes `step`
    assert a["groups"] == b["groups"]
    assert torch.equal(a["rng"][0], b["rng"][0]) and np.array_equal(a["rng"][1], b["rng"][1])
    assert a["rng"][2] == b["rng"][2]
    assert a["training"] == b["training"]


def test_eta_zero_is_exactly_zero(toy_checkpoint):
    probe = make_probe(toy_checkpoint, SMALL + ["estimators.etas=[0.0,1e-3]"])
    result = probe.run()
    summary = result.summary()
    s0 = summary["sweep"][0]
    assert s0["eta"] == 0.0 and s0["delta_h_true"] == 0.0 and s0["delta_h1"] == 0.0
    assert s0["ess_frac"] == 1.0 and s0["kl"] == 0.0
    for lw in result.log_weights[0.0]:
        assert torch.equal(lw, torch.zeros_like(lw))  # every weight exactly 1
    assert summary["sweep"][1]["delta_h_true"] != 0.0


@pytest.mark.parametrize("route", ["update_vector", "real_step"])
def test_restore_is_bitwise(toy_checkpoint, route):
    probe = make_probe(toy_checkpoint, SMALL + [f"update.route={route}", "estimators.etas=[0.0,1e-3,1e-2]"])
    before = _training_state(probe)
    summary = probe.run().summary()
    assert summary["restore/verified"] is True and summary["restore/verified_ranks"] == [True]
    _assert_bitwise_equal(before, _training_state(probe))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_real_step_matches_update_vector(toy_checkpoint, dtype):
    """θ' from optimizer.step() with lr = η equals θ + ηu to fp32 rounding, and ΔH_true agrees.

    In float32 the real step itself rounds θ' (and 1 − η·wd) to fp32, which moves ΔH_true by up to ~1e-4
    relative at η = 1e-5 (measured); the update-vector route forms θ + ηu in float64 (never a tiny step added in low precision). In float64
    both routes are exact, so there ΔH_true must agree to 1e-6 relative.
    """
    etas = [1e-4, 1e-3, 1e-2]
    common = SMALL + [f"estimators.etas={etas}", f"precision.dtype={dtype}"]
    probe_u = make_probe(toy_checkpoint, common + ["update.route=update_vector"])
    probe_r = make_probe(toy_checkpoint, common + ["update.route=real_step"])
    sum_u, result_r = probe_u.run().summary(), probe_r.run()
    sum_r = result_r.summary()
    for su, sr in zip(sum_u["sweep"], sum_r["sweep"]):
        assert su["eta"] == sr["eta"]
        assert su["delta_h1"] == sr["delta_h1"]
        if dtype == "float64":
            assert abs(su["delta_h_true"] - sr["delta_h_true"]) <= 1e-6 * abs(su["delta_h_true"])
    # θ' both ways, from the same gradient and optimizer state.
    probe = probe_r
    theta0 = [p.detach().clone() for _, p in probe.trainable]
    snap = take_snapshot(probe.model, probe.trainable, probe.optimizer)
    for eta in etas:
        # Also advances m, v and step: restored below.
        real_step(probe.optimizer, probe.trainable, result_r.update.grad, eta)
        stepped = [p.detach().clone() for _, p in probe.trainable]
        assert restore_snapshot(snap, probe.model, probe.trainable, probe.optimizer)
        set_theta(probe.trainable, theta0, result_r.update.u, eta)
        formed = [p.detach().clone() for _, p in probe.trainable]
        assert restore_snapshot(snap, probe.model, probe.trainable, probe.optimizer)
        for a, b in zip(stepped, formed):
            # Max relative difference per tensor, ‖a − b‖∞ / ‖b‖∞ (measured ~1.4e-7). Element by element it
            # is not a rounding measure: where θ + step cancels, or the real step's fp32 m' = β1 m + (1−β1) g
            # cancels ~100-fold (seen on the toy checkpoint), one element's relative error is amplified.
            rel = float((a.double() - b.double()).abs().max() / b.double().abs().max())
            assert rel < 1e-5
        # The step itself: Δθ of the real step vs η·u, up to the rounding of θ' in the parameter dtype.
        delta_real = torch.cat([(a.double() - t.double()).reshape(-1) for a, t in zip(stepped, theta0)])
        delta_vec = torch.cat([(eta * u).reshape(-1) for u in result_r.update.u])
        tol = 1e-3 if dtype == "float32" else 1e-9
        assert float((delta_real - delta_vec).norm() / delta_vec.norm()) < tol


def test_same_sample_limit_is_linear_in_eta(toy_checkpoint):
    """ΔH_true(η)/η → δH₁/η on one batch, with error shrinking linearly in η (docs/method.md §5.1)."""
    # float64 and 1e-5 ≤ η ≤ 3e-4: off the fp32 floor (some layers compute in fp32 whatever the model dtype; below
    # ~1e-5 it shows) and inside the linear regime (at 1e-3 higher orders already bend the error on some toys).
    etas = [1e-5, 1e-4, 3e-4]
    probe = make_probe(toy_checkpoint, SMALL + [f"estimators.etas={etas}", "precision.dtype=float64"])
    summary = probe.run().summary()
    per_eta = summary["delta_h1/per_eta"]
    errors = [abs(s["delta_h_true"] / s["eta"] - per_eta) for s in summary["sweep"]]
    for (small, eta_small), (big, eta_big) in zip(zip(errors, etas), zip(errors[1:], etas[1:])):
        factor = eta_big / eta_small
        assert factor / 2.5 < big / small < factor * 2.5, (errors, per_eta)  # ×f in η → ×~f in the error
    assert errors[0] < 0.05 * abs(per_eta)


def test_negated_advantages_flip_the_prediction(toy_checkpoint):
    """Sanity on signs (seed notes): the gradient part of u is odd in the advantages."""
    probe = make_probe(toy_checkpoint, SMALL + ["estimators.etas=[1e-3]"])
    result = probe.run()
    grad = result.update.grad
    batch_u = result.batch_u
    for g in batch_u.groups:
        g.advantages = -g.advantages
    flipped, *_ = update_gradient(probe.rt, probe.runner, batch_u, probe.cfg.update)
    for a, b in zip(grad, flipped):
        assert torch.allclose(a, -b, rtol=1e-6, atol=1e-12)


def test_samples_do_not_depend_on_generation_chunking(toy_checkpoint):
    """Each response has its own counter-based stream: decoding rows 1 at a time, 3 at a time, or whole groups of
    different prompts together (left-padded blocks: 8 rows = 2 groups) gives the same samples (float64: the
    logits differ only at 1e-16, far from any CDF boundary), and the same real groups in the same order."""
    tokens = []
    for rows in (1, 3, 8):
        probe = make_probe(toy_checkpoint, SMALL + [f"memory.microbatch_generate={rows}", "precision.dtype=float64"])
        batch = probe.sample("E", 3, 4)
        assert batch.block_size == {1: 1, 3: 1, 8: 2}[rows]
        tokens.append([(g.prompt_index, g.responses.tolist(), g.lengths.tolist()) for g in batch.real_groups])
    assert tokens[0] == tokens[1] == tokens[2]
    other_seed = make_probe(toy_checkpoint, SMALL + ["sampling.seed=99"]).sample("E", 3, 4)
    assert [(g.prompt_index, g.responses.tolist(), g.lengths.tolist()) for g in other_seed.groups] != tokens[0]


def test_output_overwrite_false_refuses_existing_results(toy_checkpoint, tmp_path):
    import subprocess
    import sys

    (tmp_path / "summary.json").write_text("{}")
    res = subprocess.run([sys.executable, "-m", "probe_dist.main", f"checkpoint.path={toy_checkpoint}",
                          f"output.dir={tmp_path}", "output.overwrite=false", "device=cpu"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "output.overwrite=false" in res.stderr
    assert (tmp_path / "summary.json").read_text() == "{}"


def test_delta_h1_forward_and_reverse_mode_agree(toy_checkpoint):
    """δH₁/η and its SE by one jvp per block microbatch (the default) equal the reverse-mode path (one forward and
    two backward passes per group microbatch), both estimators; ∇Ĥ by one backward per block microbatch equals the
    reverse path's (a padded last block: its zero-weight rows add nothing)."""
    import dataclasses

    from probe_dist.prediction.delta_h1 import _forward_mode, _reverse_mode, entropy_gradient
    from probe_dist.scoring.score import base_entropy, score_batch
    from probe_dist.update.step import update_parts

    probe = make_probe(toy_checkpoint, SMALL + ["precision.dtype=float64", "memory.microbatch_generate=8",
                                                "memory.microbatch_grad=3"])
    probe.model.eval()
    cfg, rt, runner = probe.cfg, probe.rt, probe.runner
    batch = probe.sample("E", 5, 4)
    assert batch.block_size == 2  # microbatches of 3 rows span groups; the last block holds a zero-weight copy
    assert [g.weight for g in batch.groups] == [1.0] * 5 + [0.0]
    scores = score_batch(rt, runner, batch)
    base = base_entropy(rt, batch, scores, payload="rb", normalize="per_token")
    grad, *_ = update_gradient(rt, runner, probe.sample("U", 4, 4), cfg.update)
    u = [p.u for p in update_parts(probe.optimizer, probe.trainable, grad)]
    for method in ("snis_derivative", "causal_rb"):
        est = dataclasses.replace(cfg.estimators, delta_h1=method)
        fwd = _forward_mode(rt, runner, batch, scores, base=base, u=u, est=est)
        rev = _reverse_mode(rt, runner, batch, scores, base=base, u=u, est=est)
        assert fwd.grad_entropy is None
        assert abs(fwd.per_eta - rev.per_eta) <= 1e-6 * abs(rev.per_eta), (method, fwd, rev)
        assert abs(fwd.per_eta_se - rev.per_eta_se) <= 1e-6 * rev.per_eta_se, (method, fwd, rev)
    ge = entropy_gradient(rt, runner, batch, base=base, est=cfg.estimators)  # block microbatches, padding weighted 0
    rev = _reverse_mode(rt, runner, batch, scores, base=base, u=u, est=cfg.estimators)  # group by group
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(ge, rev.grad_entropy)) ** 0.5
    den = sum(float(b.pow(2).sum()) for b in rev.grad_entropy) ** 0.5
    assert num <= 1e-10 * den, (num, den)


@pytest.mark.parametrize("options", [
    ["update.loss=grpo", "update.kl_coef=0.05"],
    ["update.loss=bnpo", "update.loss_block_rows=6", "update.top_entropy_quantile=0.5", "update.entropy_coef=0.01",
     "update.mask_truncated=true"],
], ids=["grpo_kl", "bnpo_entropy_mask"])
def test_update_gradient_over_block_microbatches_equals_group_by_group(toy_checkpoint, options):
    """∇L_U from microbatches that span groups (3 rows, blocks of 2 groups of 4, left-padded prompts, a padded last
    block) equals a direct computation: one forward + backward per real group over all its rows, the same loss
    function (float64, relative 1e-10)."""
    from probe_dist.update.loss import LossSpec, row_coefficients, update_loss

    probe = make_probe(toy_checkpoint, SMALL + ["precision.dtype=float64", "memory.microbatch_generate=8",
                                                "memory.microbatch_grad=3", "update.grad_clip=0"] + options)
    probe.model.eval()
    cfg, rt, runner = probe.cfg, probe.rt, probe.runner
    batch = probe.sample("U", 5, 4)
    assert batch.block_size == 2 and [g.weight for g in batch.groups] == [1.0] * 5 + [0.0]
    assert len({int(g.prompt_ids.numel()) for g in batch.real_groups}) > 1  # prompts of different lengths
    grad, norm_before, coef, norm = update_gradient(rt, runner, batch, cfg.update)
    assert coef == 1.0
    spec = LossSpec.from_config(cfg.update)
    direct = [torch.zeros(p.shape, dtype=torch.float64) for _, p in runner.trainable]
    for group in batch.real_groups:
        mb = group.layout(slice(0, group.size))
        ref = None
        if cfg.update.kl_coef:
            with runner.reference():
                ref = runner.forward(mb, grad=False)[0].detach()
        token_logp, token_h = runner.forward(mb, grad=True)
        rows = row_coefficients(spec, group, norm, kept=group.kept(cfg.update.mask_truncated))
        update_loss(token_logp, token_h, mb.token_rows, group.advantages, rows, spec, token_ref_logp=ref).backward()
        for acc, x in zip(direct, runner.take_grads()):
            acc += x
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(grad, direct)) ** 0.5
    den = sum(float(b.pow(2).sum()) for b in direct) ** 0.5
    assert den > 0 and num <= 1e-10 * den, (num, den)
    assert abs(norm_before - den) <= 1e-10 * den
