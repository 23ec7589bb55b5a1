"""Core probe properties on the real toy checkpoint: η = 0, route parity and bitwise restore, same-sample limit."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from probe_dist.measurement.sweep import snis_point
from probe_dist.runtime.snapshot import restore_snapshot, take_snapshot
from probe_dist.scoring.score import base_entropy, score_batch
from probe_dist.update.gradient import update_gradient
from probe_dist.update.step import real_step, set_theta
from tests.probe_harness import assert_same_sample_taylor, make_probe
from tests.tolerances import fp_bound, two_path_tol64, unit_roundoff

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


def _adamw_step_rounding(optimizer, trainable, grad, eta: float, dtype: torch.dtype) -> list[torch.Tensor]:
    """Per coordinate, a bound on |θ'_real − fl(θ + ηu)|: the real AdamW step in `dtype` against θ + ηu formed in
    float64 and rounded once. Read from the optimizer's state before the step (float64 tensors like the params).

    The step θ' = θ(1 − lr·wd) − lr·m̂'/(√v̂' + ε), m' = β1·m + (1−β1)·fl(g), v' = β2·v + (1−β2)·g², takes ~14
    roundings in `dtype` (the grad cast, the moments, sqrt, the bias corrections, the quotient, the decay and the
    update of θ), each relative to its operands: |θ| and |θ'| for the parameter side, and for the moment side the
    step's size at the operands of m' (which may cancel ~100-fold), lr·(β1|m| + (1−β1)|g|)/(bc1·(√v̂' + ε)). 16
    roundings of u_dtype each; the formed θ + ηu rounds once more at |θ'|."""
    u_d = unit_roundoff(dtype)
    out = []
    for (_, p), g in zip(trainable, grad):
        group = next(gr for gr in optimizer.param_groups if any(q is p for q in gr["params"]))
        assert not group.get("amsgrad", False), "the bound below is for AdamW without amsgrad"
        st = optimizer.state[p]
        (b1, b2), t = group["betas"], float(st["step"]) + 1.0
        bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        m, v, g64 = st["exp_avg"].double(), st["exp_avg_sq"].double(), g.double()
        denom = (b2 * v + (1.0 - b2) * g64 * g64).sqrt() / bc2 ** 0.5 + group["eps"]
        lr = eta * float(group.get("lr_ratio", 1.0))
        theta = p.detach().double()
        moment_side = lr * (b1 * m.abs() + (1.0 - b1) * g64.abs()) / (bc1 * denom)
        step_size = lr * (group["weight_decay"] * theta.abs() + (b1 * m + (1.0 - b1) * g64).abs() / (bc1 * denom))
        out.append(16 * u_d * (2 * theta.abs() + step_size + moment_side))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_real_step_matches_update_vector(toy_checkpoint, dtype):
    """θ' from optimizer.step() with lr = η equals θ + ηu to the step's own rounding, coordinate by coordinate,
    and ΔH_true agrees.

    In float32 the real step rounds θ' (and 1 − η·wd) to fp32, which moves ΔH_true by up to ~1e-4 relative at
    η = 1e-5 (measured); the update-vector route forms θ + ηu in float64 (never a tiny step added in low
    precision). In float64 the two θ' agree to float64 rounding, so ΔH_true agrees up to the model's float32
    parts (Qwen2's RMSNorm rounds its input to fp32 even in a float64 model): bounded by the float32 model's
    error on the same batch, measured.
    """
    etas = [1e-4, 1e-3, 1e-2]
    common = SMALL + [f"estimators.etas={etas}", f"precision.dtype={dtype}"]
    probe_u = make_probe(toy_checkpoint, common + ["update.route=update_vector"])
    probe_r = make_probe(toy_checkpoint, common + ["update.route=real_step"])
    result_u, result_r = probe_u.run(), probe_r.run()
    sum_u, sum_r = result_u.summary(), result_r.summary()
    if dtype == "float64":
        dh32 = _delta_h_true_float32(toy_checkpoint, common, result_u, etas)
    for k, (su, sr) in enumerate(zip(sum_u["sweep"], sum_r["sweep"])):
        assert su["eta"] == sr["eta"]
        assert su["delta_h1"] == sr["delta_h1"]  # tol: exact same gradient, same E scores: the same float64 formula
        if dtype == "float64":
            # tol: fp each float64 route's ΔH_true is within the float32 model's error on this batch and θ' of the
            # exact value (its fp32 norm flips an fp32 rounding at most; the float32 model rounds everywhere):
            # err32 = |ΔH₃₂ − ΔH₆₄| measured, 4× safety per route, plus one fp32 rounding of Ĥ' (4u₃₂|Ĥ'|)
            err32 = abs(dh32[k] - su["delta_h_true"])
            tol = 2 * (4 * err32 + fp_bound(torch.float32, 1, abs(su["entropy_new"])))
            assert abs(su["delta_h_true"] - sr["delta_h_true"]) <= tol, (su, sr, tol)
            # tol: bound teeth: a step at another η of the grid (10× apart) or from stale moments moves ΔH_true by
            # O(|ΔH_true|); the tolerance stays a small part of it
            assert tol < 0.1 * abs(su["delta_h_true"]), (tol, su["delta_h_true"])
    # θ' both ways, from the same gradient and optimizer state.
    probe = probe_r
    theta0 = [p.detach().clone() for _, p in probe.trainable]
    snap = take_snapshot(probe.model, probe.trainable, probe.optimizer)
    param_dtype = probe.trainable[0][1].dtype
    for eta in etas:
        bound = _adamw_step_rounding(probe.optimizer, probe.trainable, result_r.update.grad, eta, param_dtype)
        # Also advances m, v and step: restored below.
        real_step(probe.optimizer, probe.trainable, result_r.update.grad, eta)
        stepped = [p.detach().clone() for _, p in probe.trainable]
        assert restore_snapshot(snap, probe.model, probe.trainable, probe.optimizer)
        set_theta(probe.trainable, theta0, result_r.update.u, eta)
        formed = [p.detach().clone() for _, p in probe.trainable]
        assert restore_snapshot(snap, probe.model, probe.trainable, probe.optimizer)
        for a, b, t0, u, bd in zip(stepped, formed, theta0, result_r.update.u, bound):
            # tol: fp coordinate by coordinate, the step's roundings (_adamw_step_rounding: 16 u per rounding
            # site, at the operands' sizes, the moments' cancellation included)
            assert bool(((a.double() - b.double()).abs() <= bd).all()), float(((a.double() - b.double()).abs()
                                                                               / bd).max())
            # tol: fp the step itself: Δθ of the real step vs η·u, the same bound plus the formed θ's rounding
            step_error = (a.double() - t0.double() - eta * u).abs()
            assert bool((step_error <= bd + fp_bound(param_dtype, 1, 1.0) * b.double().abs()).all())
        delta_vec = torch.cat([(eta * u).reshape(-1) for u in result_r.update.u])
        total = torch.cat([bd.reshape(-1) for bd in bound])
        # tol: bound teeth: the rounding allowed is a small part of the step, which a missing bias correction
        # (×1/(1 − β1^t)) or a wrong lr ratio changes by O(1)
        assert float(total.norm()) < 0.1 * float(delta_vec.norm()), (eta, float(total.norm()), float(delta_vec.norm()))


def _delta_h_true_float32(ckpt, overrides: list[str], result, etas: list[float]) -> list[float]:
    """ΔH_true(η) of `result`'s E batch along its u, rescored by the same model in float32 (the update-vector
    route): the float32 model's value on the same inputs, whose distance to the float64 one measures how far
    float32 rounding moves ΔH_true here."""
    probe = make_probe(ckpt, [o for o in overrides if not o.startswith("precision.dtype=")]
                       + ["precision.dtype=float32", "update.route=update_vector"])
    est, batch = probe.cfg.estimators, result.batch_e
    scores0 = score_batch(probe.rt, probe.runner, batch)
    base = base_entropy(probe.rt, batch, scores0, payload=est.payload, normalize=est.normalize)
    theta0 = [p.detach().clone() for _, p in probe.trainable]
    out = []
    for eta in etas:
        set_theta(probe.trainable, theta0, result.update.u, eta)
        try:
            scores1 = score_batch(probe.rt, probe.runner, batch)
        finally:
            set_theta(probe.trainable, theta0, result.update.u, 0.0)
        out.append(snis_point(probe.rt, batch, scores0, scores1, base=base, est=est)[0]["delta_h_true"])
    return out


def test_same_sample_limit_is_linear_in_eta(toy_checkpoint, float64_throughout):
    """ΔH_true(η)/η → δH₁/η on one batch (docs/method.md §5.1): the error is the second-order term ½η·Ĥ'' up to a
    remainder O(η²), in a Taylor regime built from the measured curvature (tests/probe_harness.py)."""
    assert_same_sample_taylor(toy_checkpoint, [*SMALL, "precision.dtype=float64", "estimators.eta_train=false"])


def test_negated_advantages_flip_the_prediction(toy_checkpoint):
    """Sanity on signs (seed notes): the gradient part of u is odd in the advantages."""
    probe = make_probe(toy_checkpoint, SMALL + ["estimators.etas=[1e-3]"])
    result = probe.run()
    grad = result.update.grad
    batch_u = result.batch_u
    for g in batch_u.groups:
        g.advantages = -g.advantages
    flipped, *_ = update_gradient(probe.rt, probe.runner, batch_u, probe.cfg.update)
    assert any(bool(a.abs().max() > 0) for a in grad), "a zero gradient would not test the sign"
    for a, b in zip(grad, flipped):
        # tol: exact the loss is linear in A (kl_coef = entropy_coef = 0 by default; the ratio is exactly 1 on-policy),
        # and round-to-nearest is symmetric under negation: every backward op gives exactly the negated result
        assert torch.equal(a, -b)


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


def _float32_twin(ckpt, overrides: list[str]):
    """The same toy and config in float32: the float32 model on the same inputs measures the computation's
    condition number, eps₃₂ × κ (tests/test_grade.py's two_path_tol64)."""
    twin = make_probe(ckpt, [o for o in overrides if not o.startswith("precision.dtype=")] + ["precision.dtype=float32"])
    twin.model.eval()
    return twin


def _norm(xs) -> float:
    return sum(float(x.double().pow(2).sum()) for x in xs) ** 0.5


def _dist(xs, ys) -> float:
    return sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(xs, ys)) ** 0.5


def test_delta_h1_forward_and_reverse_mode_agree(toy_checkpoint, float64_throughout):
    """δH₁/η and its SE by one jvp per block microbatch (the default) equal the reverse-mode path (one forward and
    two backward passes per group microbatch), both estimators; ∇Ĥ by one backward per block microbatch equals the
    reverse path's (a padded last block: its zero-weight rows add nothing).

    float64 throughout (float64_throughout), to float64 rounding: two_path_tol64 with the error of the same passes
    on a float32 twin."""
    import dataclasses

    from probe_dist.prediction.delta_h1 import _forward_mode, _reverse_mode, entropy_gradient
    from probe_dist.update.step import update_parts

    overrides = SMALL + ["precision.dtype=float64", "memory.microbatch_generate=8", "memory.microbatch_grad=3",
                         "memory.microbatch_jvp=3"]
    probe, twin = make_probe(toy_checkpoint, overrides), _float32_twin(toy_checkpoint, overrides)
    probe.model.eval()
    cfg, rt, runner = probe.cfg, probe.rt, probe.runner
    batch = probe.sample("E", 5, 4)
    assert batch.block_size == 2  # microbatches of 3 rows span groups; the last block holds a zero-weight copy
    assert [g.weight for g in batch.groups] == [1.0] * 5 + [0.0]
    scores, scores32 = score_batch(rt, runner, batch), score_batch(twin.rt, twin.runner, batch)
    base = base_entropy(rt, batch, scores, payload="rb", normalize="per_token")
    base32 = base_entropy(twin.rt, batch, scores32, payload="rb", normalize="per_token")
    grad, *_ = update_gradient(rt, runner, probe.sample("U", 4, 4), cfg.update)
    u = [p.u for p in update_parts(probe.optimizer, probe.trainable, grad)]
    rows = sum(g.size for g in batch.groups)
    for method in ("snis_derivative", "causal_rb"):
        est = dataclasses.replace(cfg.estimators, delta_h1=method)
        fwd = _forward_mode(rt, runner, batch, scores, base=base, u=u, est=est)
        rev = _reverse_mode(rt, runner, batch, scores, base=base, u=u, est=est)
        fwd32 = _forward_mode(twin.rt, twin.runner, batch, scores32, base=base32, u=u, est=est)
        rev32 = _reverse_mode(twin.rt, twin.runner, batch, scores32, base=base32, u=u, est=est)
        assert fwd.grad_entropy is None
        for field in ("per_eta", "per_eta_se"):
            ref, got = getattr(rev, field), getattr(fwd, field)
            # tol: fp two float64 routes: two_path_tol64 with the float32 error of this quantity on these inputs,
            # measured as the larger of the float32 twin's two routes' distances to the float64 reverse value; plus
            # the sums over the batch's rows that both dtypes take in float64 (not rescaled): γ_rows·|x| per route
            err32 = max(abs(getattr(fwd32, field) - ref), abs(getattr(rev32, field) - ref))
            tol = two_path_tol64(err32, abs(ref)) + 2 * fp_bound(torch.float64, rows, abs(ref))
            assert abs(got - ref) <= tol, (method, field, got, ref, tol)
            # tol: bound teeth: a missing term of δH₁ (the −H̄·T·∇S·u denominator) or of its SE is O(1) relative
            assert tol < 1e-6 * abs(ref), (method, field, tol, ref)
    ge = entropy_gradient(rt, runner, batch, base=base, est=cfg.estimators)  # block microbatches, padding weighted 0
    rev = _reverse_mode(rt, runner, batch, scores, base=base, u=u, est=cfg.estimators)  # group by group
    rev32 = _reverse_mode(twin.rt, twin.runner, batch, scores32, base=base32, u=u, est=cfg.estimators)
    den = _norm(rev.grad_entropy)
    # tol: fp two float64 reverse passes (other microbatch layouts): two_path_tol64 with the float32 error
    # ‖∇Ĥ₃₂ − ∇Ĥ‖ of the same pass, measured; a padding row weighted 1, or a row dropped, is O(‖∇Ĥ‖/rows)
    tol = two_path_tol64(_dist(rev32.grad_entropy, rev.grad_entropy), den)
    assert den > 0 and _dist(ge, rev.grad_entropy) <= tol, (_dist(ge, rev.grad_entropy), tol, den)
    assert tol < 1e-6 * den, (tol, den)  # tol: bound teeth (above)


@pytest.mark.parametrize("options", [
    ["update.loss=grpo", "update.kl_coef=0.05"],
    ["update.loss=bnpo", "update.loss_block_rows=6", "update.top_entropy_quantile=0.5", "update.entropy_coef=0.01",
     "update.mask_truncated=true"],
], ids=["grpo_kl", "bnpo_entropy_mask"])
def test_update_gradient_over_block_microbatches_equals_group_by_group(toy_checkpoint, options,
                                                                      float64_throughout):
    """∇L_U from microbatches that span groups (3 rows, blocks of 2 groups of 4, left-padded prompts, a padded last
    block) equals a direct computation: one forward + backward per real group over all its rows, the same loss
    function (float64 throughout, to float64 rounding: two_path_tol64 with the float32 twin's error)."""
    from probe_dist.update.loss import LossSpec, row_coefficients, update_loss

    overrides = SMALL + ["precision.dtype=float64", "memory.microbatch_generate=8", "memory.microbatch_grad=3",
                         "update.grad_clip=0"] + options
    probe, twin = make_probe(toy_checkpoint, overrides), _float32_twin(toy_checkpoint, overrides)
    probe.model.eval()
    cfg, rt, runner = probe.cfg, probe.rt, probe.runner
    batch = probe.sample("U", 5, 4)
    assert batch.block_size == 2 and [g.weight for g in batch.groups] == [1.0] * 5 + [0.0]
    assert len({int(g.prompt_ids.numel()) for g in batch.real_groups}) > 1  # prompts of different lengths
    grad, norm_before, coef, norm = update_gradient(rt, runner, batch, cfg.update)
    grad32, *_ = update_gradient(twin.rt, twin.runner, batch, twin.cfg.update)
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
    num, den = _dist(grad, direct), _norm(direct)
    # tol: fp two float64 computations of ∇L_U (block microbatches vs whole groups): two_path_tol64 with the
    # float32 error ‖∇L₃₂ − ∇L‖ of the block pass, measured; a padding row weighted 1, a row's coefficients taken
    # from the wrong group, or a block's KL reference misaligned, is O(‖∇L‖/rows)
    tol = two_path_tol64(_dist(grad32, grad), den)
    assert den > 0 and num <= tol, (num, tol, den)
    assert tol < 1e-6 * den, (tol, den)  # tol: bound teeth (above)
    # tol: fp |‖a‖ − ‖b‖| ≤ ‖a − b‖ (the bound above), plus the float64 norm's own rounding over its N squares
    n_terms = sum(x.numel() for x in direct)
    assert abs(norm_before - den) <= tol + fp_bound(torch.float64, n_terms, den)


def test_forward_mode_passes_take_the_jvp_microbatch_and_the_gradient_passes_the_grad_one(toy_checkpoint):
    """memory.microbatch_jvp sizes δH₁'s forward-mode pass and memory.microbatch_grad the update's forward + backward:
    set apart (jvp 8, grad 2), every decoder call of the δH₁ pass has more than 2 rows and ≤ 8, and every call of
    the gradient pass ≤ 2 (a pass reading the other size fails one side); provenance records both."""
    from probe_dist.model.policy import unwrap_causal_lm
    from probe_dist.prediction.delta_h1 import predict_delta_h1
    from probe_dist.update.step import update_parts

    probe = make_probe(toy_checkpoint, SMALL + ["memory.microbatch_grad=2", "memory.microbatch_jvp=8",
                                                "estimators.explain=false"])
    probe.model.eval()
    cfg, rt, runner = probe.cfg, probe.rt, probe.runner
    assert runner.sizes.as_dict() == {"score": cfg.memory.microbatch_score, "grad": 2, "jvp": 8}
    rows: list[int] = []
    hook = unwrap_causal_lm(probe.model).get_decoder().register_forward_pre_hook(
        lambda _m, args, kwargs: rows.append(int((kwargs.get("input_ids") if kwargs.get("input_ids") is not None
                                                  else args[0]).shape[0])), with_kwargs=True)
    try:
        batch_u = probe.sample("U", 4, 4)
        rows.clear()
        grad, *_ = update_gradient(rt, runner, batch_u, cfg.update)
        assert rows and max(rows) <= 2, rows
        batch_e = probe.sample("E", 6, 4)
        scores = score_batch(rt, runner, batch_e)
        base = base_entropy(rt, batch_e, scores, payload=cfg.estimators.payload, normalize=cfg.estimators.normalize)
        u = [part.u for part in update_parts(probe.optimizer, probe.trainable, grad)]
        rows.clear()
        predict_delta_h1(rt, runner, batch_e, scores, base=base, u=u, est=cfg.estimators)
        assert rows and max(rows) == 8 and min(rows) > 2, rows
    finally:
        hook.remove()
