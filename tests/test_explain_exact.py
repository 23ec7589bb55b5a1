"""The fixed-prompt standard errors and the curvature δH₂ against exact enumeration on a fixed prompt set
(docs/method.md §9, §10).

Setting (as a user evaluating on a fixed set): 21 fixed toy prompts, every one in every E batch (B_E = 21 of a
21-line prompt file), G_E = 8 responses each, max_new_tokens = 2, so every response of every prompt is enumerated
and H_fix(θ) = Σ_p E_p[h]/Σ_p E_p[T] over these prompts, its gradient, H_fix(θ + ηu) and d²H_fix/dη² along u are
exact numbers (the second derivative by a Richardson central difference of the exact H_fix, an independent path
from the probe's nested forward mode). u is fixed (one U batch), and the probe's own steps run on K seeds.

Tests (K = 40 seeds):
  • calibration of estimators.se=fixed_prompts: R = √(Σe²/Σs²) for Ĥ, δH₁, ΔH_true and Ĥ'' within the band a
    right SE gives: K·R² ~ χ²_K (errors normal, SEs exact), so R lies in [√(χ²_K(α/2)/K), √(χ²_K(1−α/2)/K)]
    but for a false alarm α = SUITE_ALPHA/MAX_STATISTICAL_CHECKS per key (≈ [0.55, 1.46] at K = 40), widened by
    the ratio estimator's O(1/n) bias (n = 21 prompts: ×(1 ± 1/21)). An SE off by ×2 lies far outside it.
  • δH₂: the mean error of Ĥ'' over the K seeds is within z_bonferroni() of its standard error (SE of the mean =
    √(Σs²)/K with the reported fixed-prompt SEs).
  • the population SE, which also counts prompt-to-prompt variation, is far larger here (reported, not pinned).
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from probe_dist.data.prompts import prompt_token_ids
from probe_dist.explain.decompose import explain_e
from probe_dist.measurement.sweep import snis_point
from probe_dist.prediction.delta_h1 import predict_delta_h1
from probe_dist.rollout.sample import sample_batch
from probe_dist.scoring.score import base_entropy, score_batch
from probe_dist.toy.task import MAX_OPERAND
from probe_dist.update.gradient import update_gradient
from probe_dist.update.step import set_theta, update_parts
from tests.probe_harness import (
    enumerate_responses,
    exact_gradient,
    exact_population,
    make_probe,
    write_prompts,
)
from tests.tolerances import MAX_STATISTICAL_CHECKS, SUITE_ALPHA, z_bonferroni

PAIRS = random.Random(7).sample([(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)], 21)
G_E = 8
ETA = 1e-4
NUM_SEEDS = 40


def calibration_band(k: int = NUM_SEEDS, n_prompts: int = len(PAIRS)) -> tuple[float, float]:
    """(lo, hi) for R = √(Σe²/Σs²) over k seeds when the SEs are right, at the per-check false-alarm share."""
    from scipy.stats import chi2

    alpha = SUITE_ALPHA / MAX_STATISTICAL_CHECKS
    bias = 1.0 / n_prompts  # a ratio estimator's SE is biased by O(1/n) (delta method), either way
    lo = math.sqrt(chi2.ppf(alpha / 2, k) / k) * (1 - bias)
    hi = math.sqrt(chi2.isf(alpha / 2, k) / k) * (1 + bias)
    return lo, hi


@pytest.fixture(scope="module")
def fixed_set(toy_checkpoint, tmp_path_factory):
    prompts = write_prompts(tmp_path_factory.mktemp("fixed") / "prompts.jsonl", PAIRS)
    probe = make_probe(toy_checkpoint, [f"sampling.prompts={prompts}", "sampling.max_new_tokens=2",
                                        f"sampling.B_E={len(PAIRS)}", f"sampling.G_E={G_E}",
                                        "estimators.se=fixed_prompts", f"memory.microbatch_grad={G_E}", f"memory.microbatch_jvp={G_E}",
                                        f"memory.microbatch_score={G_E}"])
    probe.model.eval()
    tok = probe.tokenizer
    responses, lengths = enumerate_responses(len(tok), tok.eos_token_id, tok.pad_token_id, 2)
    prompt_ids = [prompt_token_ids(tok, f"{a}+{b}=") for a, b in PAIRS]
    cfg, rt, runner = probe.cfg, probe.rt, probe.runner
    batch_u = sample_batch(rt, runner.decoder, tok, "U", sampling=cfg.sampling, num_prompts=16, group_size=4,
                           loss_family=cfg.update.loss, adv_eps=cfg.update.adv_eps,
                           rows_per_chunk=cfg.memory.microbatch_generate, lockstep=False)
    grad, *_ = update_gradient(rt, runner, batch_u, cfg.update)
    u = [part.u for part in update_parts(probe.optimizer, probe.trainable, grad)]
    theta0 = [p.detach().clone() for _, p in probe.trainable]

    def h_at(eta: float) -> float:
        set_theta(probe.trainable, theta0, u, eta)
        try:
            return exact_population(probe, prompt_ids, responses, lengths)[0]
        finally:
            set_theta(probe.trainable, theta0, u, 0.0)

    h0 = h_at(0.0)
    grad_h = exact_gradient(probe, prompt_ids, responses, lengths)
    d1 = sum(float((g * x).sum()) for g, x in zip(grad_h, u))
    step = 0.1 * 1e-3  # ηH''/H' ≈ 0.05 on the toy at this step: curvature resolved, rounding far below

    def second(s):
        return (h_at(s) - 2 * h0 + h_at(-s)) / s ** 2

    d2 = (4 * second(step / 2) - second(step)) / 3
    return {"probe": probe, "u": u, "theta0": theta0, "h": h0, "d1": d1, "d2": d2, "h_eta": h_at(ETA)}


def _run_seed(setup, seed: int) -> dict:
    probe, u, theta0 = setup["probe"], setup["u"], setup["theta0"]
    cfg, rt, runner, est = probe.cfg, probe.rt, probe.runner, probe.cfg.estimators
    batch = sample_batch(rt, runner.decoder, probe.tokenizer, "E",
                         sampling=dataclasses.replace(cfg.sampling, seed=seed), num_prompts=len(PAIRS),
                         group_size=G_E, loss_family=cfg.update.loss, adv_eps=cfg.update.adv_eps,
                         rows_per_chunk=cfg.memory.microbatch_generate, lockstep=False)
    assert sorted(g.prompt_index for g in batch.groups) == list(range(len(PAIRS)))  # the whole fixed set
    scores = score_batch(rt, runner, batch)
    base = base_entropy(rt, batch, scores, payload=est.payload, normalize=est.normalize)
    d1 = predict_delta_h1(rt, runner, batch, scores, base=base, u=u, est=est)
    ex = explain_e(rt, runner, batch, scores, base=base, u=u, delta_h1=d1, est=est)
    set_theta(probe.trainable, theta0, u, ETA)
    new = score_batch(rt, runner, batch)
    set_theta(probe.trainable, theta0, u, 0.0)
    point, _ = snis_point(rt, batch, scores, new, base=base, est=est)
    return {
        "entropy": (base.entropy - setup["h"], base.entropy_se_fixed, base.entropy_se),
        "delta_h1": (ETA * (d1.per_eta - setup["d1"]), ETA * ex.delta_h1_se_fixed, ETA * d1.per_eta_se),
        "delta_h_true": (point["delta_h_true"] - (setup["h_eta"] - setup["h"]),
                         point["delta_h_true_se_fixed_prompts"], point["delta_h_true_se_population"]),
        "curvature": (ex.second_derivative - setup["d2"], ex.second_derivative_se_fixed, ex.second_derivative_se),
    }


@pytest.fixture(scope="module")
def seed_runs(fixed_set):
    return [_run_seed(fixed_set, seed) for seed in range(NUM_SEEDS)]


def _columns(runs, key):
    e, s_fixed, s_pop = (torch.tensor([r[key][k] for r in runs], dtype=torch.float64) for k in range(3))
    return e, s_fixed, s_pop


@pytest.mark.slow
@pytest.mark.parametrize("key", ["entropy", "delta_h1", "delta_h_true", "curvature"])
def test_fixed_prompt_se_is_calibrated(seed_runs, key):
    errors, se_fixed, se_pop = _columns(seed_runs, key)
    ratio = math.sqrt(float(errors.pow(2).sum() / se_fixed.pow(2).sum()))
    print(f"{key}: rms error / rms fixed SE {ratio:.3f}, with the population SE "
          f"{math.sqrt(float(errors.pow(2).sum() / se_pop.pow(2).sum())):.3f}, population/fixed SE "
          f"{float(se_pop.mean() / se_fixed.mean()):.1f}, mean error / SE of the mean "
          f"{float(errors.mean()) / (math.sqrt(float(se_fixed.pow(2).sum())) / len(errors)):.2f}")
    lo, hi = calibration_band()
    assert 0.5 < lo and hi < 2.0  # tol: bound the band has power: an SE off by ×2 either way fails
    # tol: stat ×4 K·R² ~ χ²_K under a right SE: outside [lo, hi] with probability α/60 per key (calibration_band)
    assert lo < ratio < hi, (f"{key}: rms error / rms fixed-prompt SE = {ratio:.3f}; population SE is "
                                     f"{float(se_pop.mean() / se_fixed.mean()):.1f}x larger")


@pytest.mark.slow
def test_curvature_centres_on_the_exact_second_derivative(seed_runs, fixed_set):
    errors, se_fixed, _ = _columns(seed_runs, "curvature")
    se_mean = math.sqrt(float(se_fixed.pow(2).sum())) / len(errors)
    # tol: stat the mean of K = 40 errors is normal with SD se_mean: beyond z_bonferroni() of it w.p. α/60
    assert abs(float(errors.mean())) <= z_bonferroni() * se_mean, (float(errors.mean()), se_mean, fixed_set["d2"])
