"""The probe's estimators against exact enumeration of every response (docs/method.md §3, §5, §6, §9).

Tiny vocabulary and max_new_tokens=2: every response of every prompt of the population (all 400 toy prompts) is
enumerated, so H(θ), ∇H·u and H(θ+ηu) are exact numbers. u is fixed (one U batch, seed 0) and the probe's own
steps — sample_batch, score_batch, base_entropy, predict_delta_h1 (both methods), set_theta, snis_point — run
on K independent E batches (seeds 0..K−1) of n = B_E prompt groups. The SEs the probe reports are conditional on
u, exactly this setting.

Why aggregate tests, not a per-seed |z| limit. With tens of groups the per-group contributions are heavy-tailed
(a few prompts dominate ∇S·u), so the plug-in SE of one run is itself noisy and the studentised error of one
run has heavier tails than a normal: on the fresh toy at 20 groups the δH₁ SE varied 25-fold across 50 seeds
and one error reached 4.4 SE (the suite failed on that). The SE formula is pinned exactly on fixed inputs in
tests/test_entropy_se.py; here the statistics over K seeds test what a formula pin cannot see — that the
estimators centre on the exact values and that the SEs have the right size.

False-failure probability under correct code (fixed seeds: the suite is deterministic; the probability is over
the a-priori choice of seeds). Four quantities × two tests, each at α = 1e-4/8 = 1.25e-5, so ≤ 1e-4 in all
(Bonferroni). For each quantity with errors e_k and reported SEs s_k, k = 1..K:
  • bias: t = ē/(sd(e)/√K) is Student-t with K−1 degrees of freedom when the e_k are i.i.d. normal with mean 0
    (the t-test is robust to moderate non-normality at K = 100); fail if |t| > t_{K−1}(1 − α/2).
  • size: R = Σe_k²/Σs_k². Σe_k²/τ² ~ χ²_K with τ² the estimator's variance. The reported SE treats prompts as
    drawn from an infinite population; drawing n of N without replacement shrinks only the between-prompt part
    of the variance, so (1 − n/N)·σ² ≤ τ² ≤ σ² with σ² = E[s²]. Σs_k² = Kσ²(1 + ε), where ε has sd ≈ c/√K and
    c = sd(s²)/mean(s²) (measured on the same seeds). Fail if R is outside
    [(1 − n/N)·χ²_K(α/4)/K/(1 + z·c/√K),  χ²_K(1 − α/4)/K/(1 − z·c/√K)] with z = Φ⁻¹(1 − α/4).
At K = 100 a bias of about 0.5 SE fails. The SEs vary a lot between seeds (c = 0.6–0.97 for δH₁ and ΔH_true, the
per-group contributions being heavy-tailed), which widens the band — at K = 60 a draw of seeds with c ≈ 0.97 left
it too wide to mean anything (slack 0.57), so K = 100 (measured with the counter-based sampler: slack ≤ 0.33, Σe²/Σs²
0.91–1.05). On the fresh toy with K = 60 the band was [0.27, 2.87]: reported SEs ×1.7 too small or ×1.9 too large
fail. Measured there: bias
|t| ≤ 1.12 (limit 4.77), Σe²/Σs² = 0.93 (Ĥ), 1.04 (δH₁ snis_derivative), 1.02 (causal_rb), 0.97 (ΔH_true),
largest single |z| 3.6 over 240, kurtosis of z 2.4–3.5.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from scipy import stats

from probe_dist.data.prompts import prompt_token_ids
from probe_dist.measurement.sweep import snis_point
from probe_dist.prediction.delta_h1 import predict_delta_h1
from probe_dist.rollout.sample import sample_batch
from probe_dist.scoring.behaviour import apply_sampler_weights
from probe_dist.scoring.score import base_entropy, score_batch
from probe_dist.toy.task import MAX_OPERAND
from probe_dist.update.gradient import update_gradient
from probe_dist.update.step import set_theta, update_parts
from tests.helpers.samplers import TemperedSampler
from tests.probe_harness import (
    enumerate_responses,
    exact_gradient,
    exact_population,
    make_probe,
    write_prompts,
)
from tests.tolerances import fp_bound

PAIRS = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]  # N = 400 prompts
B_E, G_E = 40, 4   # n = 40 groups per E batch: n/N = 0.1
B_U, G_U = 16, 4
ETA = 1e-3
NUM_SEEDS = 100
QUANTITIES = ("entropy", "snis_derivative", "causal_rb", "delta_h_true")
# tol: bound the false-alarm share of one check here, ≤ tests.tolerances' SUITE_ALPHA / MAX_STATISTICAL_CHECKS
ALPHA = 1e-4 / (2 * len(QUANTITIES))


@pytest.fixture(scope="module")
def exact_setup(toy_checkpoint, tmp_path_factory):
    prompts = write_prompts(tmp_path_factory.mktemp("enum") / "prompts.jsonl", PAIRS)
    probe = make_probe(toy_checkpoint, [f"sampling.prompts={prompts}", "sampling.max_new_tokens=2",
                                        f"estimators.etas=[0.0,{ETA}]"])
    probe.model.eval()  # as probe.run(): every pass in eval mode
    tok = probe.tokenizer
    responses, lengths = enumerate_responses(len(tok), tok.eos_token_id, tok.pad_token_id, 2)
    prompt_ids = [prompt_token_ids(tok, f"{a}+{b}=") for a, b in PAIRS]
    # One fixed u: the probe's own update gradient on one U batch, through AdamW.
    cfg, rt, runner = probe.cfg, probe.rt, probe.runner
    batch_u = sample_batch(rt, runner.decoder, tok, "U", sampling=cfg.sampling, num_prompts=B_U, group_size=G_U,
                           loss_family=cfg.update.loss, adv_eps=cfg.update.adv_eps,
                           rows_per_chunk=cfg.memory.microbatch_generate, lockstep=False)
    grad, *_ = update_gradient(rt, runner, batch_u, cfg.update)
    u = [part.u for part in update_parts(probe.optimizer, probe.trainable, grad)]
    theta0 = [p.detach().clone() for _, p in probe.trainable]
    # Exact H(θ), ∇H (autograd through the enumeration) and H(θ + ηu).
    h_exact, total_prob = exact_population(probe, prompt_ids, responses, lengths)
    grad_h = exact_gradient(probe, prompt_ids, responses, lengths)
    set_theta(probe.trainable, theta0, u, ETA)
    h_new, _ = exact_population(probe, prompt_ids, responses, lengths)
    set_theta(probe.trainable, theta0, u, 0.0)
    assert all(torch.equal(p, t) for (_, p), t in zip(probe.trainable, theta0))
    return {"probe": probe, "responses": responses, "lengths": lengths, "prompt_ids": prompt_ids, "u": u,
            "theta0": theta0, "h": h_exact, "grad_h": grad_h, "h_new": h_new, "total_prob": total_prob,
            "d1": ETA * sum(float((g * x).sum()) for g, x in zip(grad_h, u))}


def test_enumeration_is_complete(exact_setup):
    # Probabilities of all enumerated responses sum to one for every prompt: nothing is missing.
    for total in exact_setup["total_prob"]:
        # tol: fp each response's S sums 2 fp32 log-softmax values (error ≲ 8·u₃₂·log V ≈ 1.5e-6 each), so
        # Σ p·e^δS − 1 ≲ 3e-6; 1e-5 still fails if any response class (e.g. the cut-off ones) is missing
        assert abs(total - 1.0) < 1e-5


def _run_seed(setup, seed: int) -> dict:
    """The probe's steps on one E batch (seed) with the fixed u: (error vs exact, reported SE) per quantity."""
    probe, u, theta0 = setup["probe"], setup["u"], setup["theta0"]
    cfg, rt, runner, est = probe.cfg, probe.rt, probe.runner, probe.cfg.estimators
    batch = sample_batch(rt, runner.decoder, probe.tokenizer, "E",
                         sampling=dataclasses.replace(cfg.sampling, seed=seed), num_prompts=B_E, group_size=G_E,
                         loss_family=cfg.update.loss, adv_eps=cfg.update.adv_eps,
                         rows_per_chunk=cfg.memory.microbatch_generate, lockstep=False)
    scores = score_batch(rt, runner, batch)
    base = base_entropy(rt, batch, scores, payload=est.payload, normalize=est.normalize)
    d1 = {method: predict_delta_h1(rt, runner, batch, scores, base=base, u=u,
                                      est=dataclasses.replace(est, delta_h1=method))
          for method in ("snis_derivative", "causal_rb")}
    sweep = {}
    for eta in (0.0, ETA):
        set_theta(probe.trainable, theta0, u, eta)
        scores_new = score_batch(rt, runner, batch)
        set_theta(probe.trainable, theta0, u, 0.0)
        sweep[eta], _ = snis_point(rt, batch, scores, scores_new, base=base, est=est)
    exact_d1, exact_dt = setup["d1"], setup["h_new"] - setup["h"]
    return {
        "entropy": (base.entropy - setup["h"], base.entropy_se),
        **{m: (ETA * r.per_eta - exact_d1, ETA * r.per_eta_se) for m, r in d1.items()},
        "delta_h_true": (sweep[ETA]["delta_h_true"] - exact_dt, sweep[ETA]["delta_h_true_se_population"]),
        "eta0": sweep[0.0],
    }


# A hang guard, not a measurement: the first test to use `seed_runs` pays for its 100 probe runs (~5 min on one
# core, longer on a shared machine), which pytest-timeout counts against that test.
SEED_RUNS_GUARD_S = 1800


@pytest.fixture(scope="module")
def seed_runs(exact_setup):
    return [_run_seed(exact_setup, seed) for seed in range(NUM_SEEDS)]


def size_band(num_seeds: int, se_sq: torch.Tensor, fpc: float, alpha: float) -> tuple[float, float]:
    """The interval R = Σe²/Σs² lies in under correct code with probability ≥ 1 − alpha (module docstring)."""
    z = stats.norm.isf(alpha / 4)
    c = float(se_sq.std() / se_sq.mean())
    slack = z * c / math.sqrt(num_seeds)
    # tol: bound the band exists only while slack < 1 (Σs² = Kσ²(1 ± slack) with probability ≥ 1 − alpha/2)
    assert slack < 1, f"the SEs vary too much across seeds for a size test (c = {c:.2f}, slack {slack:.2f})"
    lo = (1 - fpc) * stats.chi2.ppf(alpha / 4, num_seeds) / num_seeds / (1 + slack)
    hi = stats.chi2.isf(alpha / 4, num_seeds) / num_seeds / (1 - slack)
    return lo, hi


def assert_size_band_has_power(lo: float, hi: float, key: str) -> None:
    """The size test must be able to fail: an SE off by a factor 2 either way (R = 4 or 1/4) lies outside.

    This replaces a fixed guard on the slack (which 0.507 against 0.5 once failed on another CPU): what matters
    is whether the band, however wide the SEs' spread makes it, still rejects a factor-2 error.
    """
    # tol: bound a reported SE half or double the true one moves R = Σe²/Σs² to 4 or 1/4 (docstring above)
    assert lo > 0.25 and hi < 4.0, f"{key}: the band [{lo:.3f}, {hi:.3f}] cannot reject an SE off by 2x"


@pytest.mark.slow
@pytest.mark.parametrize("key", QUANTITIES)
@pytest.mark.timeout(SEED_RUNS_GUARD_S)
def test_estimator_centres_on_the_exact_value(seed_runs, key):
    errors = torch.tensor([r[key][0] for r in seed_runs], dtype=torch.float64)
    t = float(errors.mean() / (errors.std() / math.sqrt(len(errors))))
    limit = stats.t.isf(ALPHA / 2, len(errors) - 1)
    # tol: stat ×4 Student-t at ALPHA per quantity (module docstring)
    assert abs(t) < limit, f"{key}: mean error {float(errors.mean()):.3g} is {t:.2f} standard errors from 0"


@pytest.mark.slow
@pytest.mark.parametrize("key", QUANTITIES)
@pytest.mark.timeout(SEED_RUNS_GUARD_S)
def test_reported_se_has_the_right_size(seed_runs, key):
    errors = torch.tensor([r[key][0] for r in seed_runs], dtype=torch.float64)
    se_sq = torch.tensor([r[key][1] for r in seed_runs], dtype=torch.float64) ** 2
    ratio = float(errors.pow(2).sum() / se_sq.sum())
    lo, hi = size_band(len(errors), se_sq, B_E / len(PAIRS), ALPHA)
    assert_size_band_has_power(lo, hi, key)
    # tol: stat ×4 χ²_K band at ALPHA per quantity, widened for the SEs' own spread (module docstring)
    assert lo < ratio < hi, f"{key}: Σe²/Σs² = {ratio:.3f} outside [{lo:.3f}, {hi:.3f}] (spread/SE {ratio ** 0.5:.3f})"


@pytest.mark.slow
@pytest.mark.timeout(SEED_RUNS_GUARD_S)
def test_size_test_rejects_an_se_off_by_half(seed_runs):
    """The size test has teeth: the same errors against SEs half or double the reported ones fail it."""
    errors = torch.tensor([r["snis_derivative"][0] for r in seed_runs], dtype=torch.float64)
    se_sq = torch.tensor([r["snis_derivative"][1] for r in seed_runs], dtype=torch.float64) ** 2
    for scale in (0.5, 2.0):
        lo, hi = size_band(len(errors), se_sq * scale ** 2, B_E / len(PAIRS), ALPHA)
        assert not lo < float(errors.pow(2).sum() / (se_sq.sum() * scale ** 2)) < hi, scale


def test_eta_zero_in_every_seed(exact_setup):
    for seed in range(3):
        r = _run_seed(exact_setup, seed)["eta0"]
        assert r["delta_h_true"] == 0.0 and r["ess_frac"] == 1.0 and r["kl"] == 0.0


def test_exact_derivative_matches_finite_difference(exact_setup, toy_checkpoint, float64_throughout):
    """The exact ∇H of the enumeration (autograd through it, as above) agrees with a finite difference of the exact H
    along a random direction, on the toy in float64 throughout (so the difference quotient is not swamped by the
    float32 layers' rounding: a directional derivative can be 1e-3 of H).

    Central differences at h, h/2 and h/4 combined by Richardson extrapolation, (4·D(h/2) − D(h))/3 and
    (4·D(h/4) − D(h/2))/3, cancel the O(h²) term; the two extrapolations' difference measures what remains.
    """
    setup = exact_setup
    probe = make_probe(toy_checkpoint, ["sampling.max_new_tokens=2", "precision.dtype=float64"])
    probe.model.eval()
    theta0 = [p.detach().clone() for _, p in probe.trainable]
    # Every 10th prompt (40 of 400): the identity checked (autograd's ∇ of the enumerated H equals H's difference
    # quotient) holds for any prompt set, and 8 float64 enumerations of all 400 took 3.5 min of the fast tier.
    args = (setup["prompt_ids"][::10], setup["responses"], setup["lengths"])
    gen = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for _, p in probe.trainable]
    norm = math.sqrt(sum(float((d * d).sum()) for d in direction))
    direction = [d / norm for d in direction]

    def h_at(step: float) -> float:
        set_theta(probe.trainable, theta0, direction, step)
        try:
            return exact_population(probe, *args)[0]
        finally:
            set_theta(probe.trainable, theta0, direction, 0.0)

    def central(step: float) -> float:
        return (h_at(step) - h_at(-step)) / (2 * step)

    step = 1e-2
    c1, c2, c4 = central(step), central(step / 2), central(step / 4)
    r1, r2 = (4 * c2 - c1) / 3, (4 * c4 - c2) / 3
    autograd = sum(float((g * d).sum()) for g, d in zip(exact_gradient(probe, *args), direction))
    h0 = h_at(0.0)
    # tol: fp truncation: r2's remaining O(h⁴) error is ≈ |r2 − r1|/15, bounded here by |r2 − r1| (measured);
    # rounding: H in float64 throughout sums ≤ prompts·responses·V terms of size ≤ |H|: ε = fp_bound of that,
    # and r2 = (4·D(h/4) − D(h/2))/3 carries ≤ (4·ε/(h/4) + ε/(h/2))/3 = 6ε/h of it
    terms = len(args[0]) * len(setup["responses"]) * len(probe.tokenizer)
    tol = abs(r2 - r1) + 6 * fp_bound(torch.float64, terms, abs(h0)) / step
    assert abs(r2 - autograd) <= tol, (r1, r2, autograd, tol)
    assert tol < 1e-2 * abs(autograd), (tol, autograd)  # tol: bound teeth: a wrong or missing ∇ term is O(1)


# ---- A sampler that is off (docs/method.md §13) -------------------------------------------------------------------
# E drawn by q = softmax(z/τ_q) with τ_q = 2.5τ (tests/helpers/samplers.py: what a vLLM engine is to the probe, with a
# mismatch far larger than kernels give). The corrected estimators weight each sequence by π_θ(y)/q(y); the
# uncorrected ones treat q's samples as π_θ's. A hotter sampler covers π_θ (bounded ratios) and its weights do not
# depend on u, so ESS/N stays near 0.3–0.5 whatever the toy (measured at toy seeds 0 and 3; a copy of the model
# moved along u, also tried, gave ESS/N from 0.09 to 0.9 depending on the toy's u). It moves Ĥ by many SEs at every
# toy seed tried (uncorrected: −15 and −17 pooled SEs at seeds 0 and 3); how much it moves δH₁ and ΔH_true depends
# on the toy (5.6 and 5.9 pooled SEs at seed 0, −0.3 and 1.0 at seed 3), so "needed" is asserted on Ĥ and printed
# for the others.
MISMATCH_SEEDS = 30
MISMATCH_TEMPERATURE = 2.5
MISMATCH_QUANTITIES = ("entropy", "snis_derivative", "delta_h_true")
# tol: bound the false-alarm share of one mismatch check, ≤ tests.tolerances' SUITE_ALPHA / MAX_STATISTICAL_CHECKS
MISMATCH_ALPHA = 1e-4 / (2 * len(MISMATCH_QUANTITIES))


def _run_seed_off_policy(setup, seed: int, sampler) -> dict:
    """The probe's steps on one E batch drawn by `sampler`: (error vs exact, reported SE) per quantity, corrected by
    the sampler weights and uncorrected."""
    probe, u, theta0 = setup["probe"], setup["u"], setup["theta0"]
    cfg, rt, runner, est = probe.cfg, probe.rt, probe.runner, probe.cfg.estimators
    batch = sample_batch(rt, runner.decoder, probe.tokenizer, "E",
                         sampling=dataclasses.replace(cfg.sampling, seed=seed), num_prompts=B_E, group_size=G_E,
                         loss_family=cfg.update.loss, adv_eps=cfg.update.adv_eps,
                         rows_per_chunk=cfg.memory.microbatch_generate, lockstep=False, sampler=sampler)
    scores = score_batch(rt, runner, batch)
    set_theta(probe.trainable, theta0, u, ETA)
    scores_new = score_batch(rt, runner, batch)
    set_theta(probe.trainable, theta0, u, 0.0)
    exact_d1, exact_dt = setup["d1"], setup["h_new"] - setup["h"]
    out = {}
    for corrected in (False, True):
        diag = apply_sampler_weights(rt, batch, scores, cap=None) if corrected else None
        base = base_entropy(rt, batch, scores, payload=est.payload, normalize=est.normalize)
        d1 = predict_delta_h1(rt, runner, batch, scores, base=base, u=u, est=est)
        point, _ = snis_point(rt, batch, scores, scores_new, base=base, est=est)
        out[corrected] = {"entropy": (base.entropy - setup["h"], base.entropy_se),
                          "snis_derivative": (ETA * d1.per_eta - exact_d1, ETA * d1.per_eta_se),
                          "delta_h_true": (point["delta_h_true"] - exact_dt, point["delta_h_true_se_population"]),
                          "ess_frac": diag.ess_frac if diag else 1.0}
    return out


@pytest.fixture(scope="module")
def off_policy_runs(exact_setup):
    probe = exact_setup["probe"]
    sampler = TemperedSampler(probe.runner.decoder, MISMATCH_TEMPERATURE * probe.cfg.sampling.temperature)
    return [_run_seed_off_policy(exact_setup, 1000 + seed, sampler) for seed in range(MISMATCH_SEEDS)]


def _pooled_z(runs, corrected: bool, key: str) -> float:
    """Σ_k e_k / √(Σ_k s_k²): the seeds' errors pooled, in units of their reported SEs (≈ N(0, 1) when the
    estimator centres on the exact value and its SE is right)."""
    e = torch.tensor([r[corrected][key][0] for r in runs], dtype=torch.float64)
    s = torch.tensor([r[corrected][key][1] for r in runs], dtype=torch.float64)
    return float(e.sum() / s.pow(2).sum().sqrt())


@pytest.mark.slow
@pytest.mark.timeout(SEED_RUNS_GUARD_S)
@pytest.mark.parametrize("key", MISMATCH_QUANTITIES)
def test_sampler_mismatch_is_corrected_by_the_weights(off_policy_runs, key):
    """A sampler that is off: after the correction every estimate centres on the exact value (pooled over the
    seeds, within z SEs), and the SEs have the right size (the §9 band); uncorrected, the same samples miss the
    exact Ĥ by many SEs — the correction is needed (Ĥ) and sufficient (all three)."""
    limit = stats.norm.isf(MISMATCH_ALPHA / 2)
    z = _pooled_z(off_policy_runs, True, key)
    uncorrected = _pooled_z(off_policy_runs, False, key)
    errors = torch.tensor([r[True][key][0] for r in off_policy_runs], dtype=torch.float64)
    se_sq = torch.tensor([r[True][key][1] for r in off_policy_runs], dtype=torch.float64) ** 2
    ratio = float(errors.pow(2).sum() / se_sq.sum())
    ess = [r[True]["ess_frac"] for r in off_policy_runs]
    print(f"{key}: corrected z {z:.2f}, uncorrected z {uncorrected:.2f}, Σe²/Σs² {ratio:.3f}, "
          f"ESS/N {min(ess):.3f}–{max(ess):.3f}")
    # tol: stat ×3 pooled z at MISMATCH_ALPHA per quantity (normal: the pooled sum of 30 seeds' errors)
    assert abs(z) < limit, f"{key}: corrected estimates are {z:.2f} pooled SEs from the exact value"
    lo, hi = size_band(len(errors), se_sq, B_E / len(PAIRS), MISMATCH_ALPHA)
    # tol: stat ×3 χ²_K band at MISMATCH_ALPHA per quantity, widened for the SEs' own spread (module docstring)
    assert lo < ratio < hi, f"{key}: Σe²/Σs² = {ratio:.3f} outside [{lo:.3f}, {hi:.3f}]"
    if key == "entropy":
        # tol: stat the uncorrected Ĥ must fail the same test the corrected one passes (beyond the limit)
        assert abs(uncorrected) > limit, f"uncorrected Ĥ only {uncorrected:.2f} pooled SEs off: no visible bias"
