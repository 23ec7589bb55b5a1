"""The probe against exact enumeration of every response (SPEC §3, §5, §6).

Tiny vocabulary and max_new_tokens=2: every response of every prompt of the population is enumerated, so H(θ),
∇H·u and H(θ+ηu) are exact numbers. Over repeated seeds the probe's Ĥ, δH₁ (both methods) and ΔH_true(η) must sit within 4
reported SEs of them, and the reported SEs must match the empirical spread within a factor 1.5.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.probe_harness import (
    enumerate_responses,
    exact_gradient,
    exact_population,
    make_probe,
    write_prompts,
)

# The prompt population (150 prompts; correctness of answers does not matter for entropy). Each run draws B_E of
# them at random, as the probe does from a real prompt pool, so the group-unit SEs — which include
# between-prompt variance — are the right yardstick; the exact values are over the whole population. B_E is
# small against the population (finite-population correction ≥ 0.87) and large enough for a stable SE estimate.
PAIRS = [(a, b) for a in range(15) for b in range(10)]
B_E = 20
ETA = 1e-3
NUM_SEEDS = 20


def _prompt_ids(probe, path):
    import json

    from probe_dist.data.toy_task import encode_prompt

    return [torch.tensor(encode_prompt(probe.tokenizer, json.loads(line)["prompt"]))
            for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def exact_setup(toy_checkpoint, tmp_path_factory):
    prompts = write_prompts(tmp_path_factory.mktemp("enum") / "prompts.jsonl", PAIRS)
    probe = make_probe(toy_checkpoint, [f"sampling.prompts={prompts}", "sampling.max_new_tokens=2"])
    tok = probe.tokenizer
    responses, lengths = enumerate_responses(len(tok), tok.eos_token_id, tok.pad_token_id, 2)
    prompt_ids = _prompt_ids(probe, prompts)
    # Exact H(θ) and exact ∇H (autograd through the enumeration) at the checkpoint's θ.
    h_exact, total_prob = exact_population(probe, prompt_ids, responses, lengths)
    grad_h = exact_gradient(probe, prompt_ids, responses, lengths)
    return {"prompts": prompts, "responses": responses, "lengths": lengths, "prompt_ids": prompt_ids,
            "h": h_exact, "grad_h": grad_h, "total_prob": total_prob}


def test_enumeration_is_complete(exact_setup):
    # Probabilities of all enumerated responses sum to one for every prompt: nothing is missing.
    for total in exact_setup["total_prob"]:
        assert abs(total - 1.0) < 1e-5


def _run_seed(toy_checkpoint, setup, seed: int) -> dict:
    """One probe run (snis_derivative) plus the causal_rb δH₁ on the same E samples and the same u."""
    probe = make_probe(toy_checkpoint, [
        f"sampling.prompts={setup['prompts']}", "sampling.max_new_tokens=2", f"sampling.seed={seed}",
        f"sampling.B_E={B_E}", "sampling.G_E=4", "sampling.B_U=8", "sampling.G_U=4",
        f"estimators.etas=[0.0,{ETA}]", "estimators.delta_h1=snis_derivative"])
    summary = probe.run()
    u = probe.update_vector
    probe.cfg.estimators.delta_h1 = "causal_rb"
    causal = probe.delta_h1(probe.batches["E"], probe.scores_e, probe.base, u)
    exact_d1 = ETA * sum(float((g * x).sum()) for g, x in zip(setup["grad_h"], u))
    with torch.no_grad():
        theta0 = [p.detach().clone() for _, p in probe.trainable]
        for (_, p), ui in zip(probe.trainable, u):
            p.copy_((p.double() + ETA * ui).to(p.dtype))
        h_new, _ = exact_population(probe, setup["prompt_ids"], setup["responses"], setup["lengths"])
        for (_, p), t0 in zip(probe.trainable, theta0):
            p.copy_(t0)
    sweep = {s["eta"]: s for s in summary["sweep"]}
    return {
        "entropy": (summary["entropy/base"] - setup["h"], summary["entropy/base_se"]),
        "snis_derivative": (sweep[ETA]["delta_h1"] - exact_d1, sweep[ETA]["delta_h1_se"]),
        "causal_rb": (ETA * causal["per_eta"] - exact_d1, ETA * causal["se_per_eta"]),
        "delta_h_true": (sweep[ETA]["delta_h_true"] - (h_new - setup["h"]), sweep[ETA]["delta_h_true_se"]),
        "eta0": sweep[0.0],
    }


@pytest.fixture(scope="module")
def seed_runs(toy_checkpoint, exact_setup):
    return [_run_seed(toy_checkpoint, exact_setup, seed) for seed in range(NUM_SEEDS)]


@pytest.mark.slow
@pytest.mark.parametrize("key", ["entropy", "snis_derivative", "causal_rb", "delta_h_true"])
def test_probe_matches_exact_enumeration(seed_runs, key):
    errors = torch.tensor([r[key][0] for r in seed_runs], dtype=torch.float64)
    ses = torch.tensor([r[key][1] for r in seed_runs], dtype=torch.float64)
    z = errors / ses
    assert bool((z.abs() < 4).all()), f"{key}: |z| up to {float(z.abs().max()):.2f} (errors {errors.tolist()})"
    # Reported SE vs the empirical spread of the error around the exact value (both conditional on u).
    ratio = float(errors.pow(2).mean().sqrt() / ses.pow(2).mean().sqrt())
    assert 1 / 1.5 < ratio < 1.5, f"{key}: empirical spread / reported SE = {ratio:.3f}"


def test_eta_zero_in_every_seed(seed_runs):
    for r in seed_runs:
        assert r["eta0"]["delta_h_true"] == 0.0 and r["eta0"]["ess_frac"] == 1.0


def test_exact_derivative_matches_finite_difference(toy_checkpoint, exact_setup):
    """The exact ∇H used above agrees with a central difference of the exact H along a direction (η ~ 1e-3)."""
    probe = make_probe(toy_checkpoint, [f"sampling.prompts={exact_setup['prompts']}", "sampling.max_new_tokens=2"])
    gen = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for _, p in probe.trainable]
    norm = math.sqrt(sum(float((d * d).sum()) for d in direction))
    direction = [d / norm for d in direction]
    step = 1e-2
    values = []
    with torch.no_grad():
        theta0 = [p.detach().clone() for _, p in probe.trainable]
        for sign in (1, -1):
            for (_, p), t0, d in zip(probe.trainable, theta0, direction):
                p.copy_((t0.double() + sign * step * d).to(p.dtype))
            values.append(exact_population(probe, exact_setup["prompt_ids"], exact_setup["responses"],
                                           exact_setup["lengths"])[0])
        for (_, p), t0 in zip(probe.trainable, theta0):
            p.copy_(t0)
    fd = (values[0] - values[1]) / (2 * step)
    ad = sum(float((g * d).sum()) for g, d in zip(exact_setup["grad_h"], direction))
    assert abs(fd - ad) <= 1e-3 * abs(ad) + 1e-6, (fd, ad)
