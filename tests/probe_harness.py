"""Run the probe in-process on the toy checkpoint (world size 1), and enumerate responses exactly."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from probe_dist.assemble import build_probe
from probe_dist.config import load_config
from probe_dist.rollout.batch import Group
from probe_dist.runtime.dist import Runtime


def make_probe(ckpt: Path, overrides: list[str]):
    cfg = load_config(None, [f"checkpoint.path={ckpt}", "device=cpu", *overrides])
    return build_probe(cfg, Runtime())


def write_prompts(path: Path, pairs: list[tuple[int, int]]) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a, b in pairs))
    return path


def enumerate_responses(vocab_size: int, eos_id: int, pad_id: int, max_new_tokens: int):
    """Every response with full support: sequences that end at the first EOS, or are cut at max_new_tokens."""
    seqs = []
    for length in range(1, max_new_tokens + 1):
        for prefix in itertools.product([v for v in range(vocab_size) if v != eos_id], repeat=length - 1):
            if length < max_new_tokens:
                seqs.append(list(prefix) + [eos_id])
            else:
                seqs.extend(list(prefix) + [last] for last in range(vocab_size))
    responses = torch.full((len(seqs), max_new_tokens), pad_id, dtype=torch.long)
    lengths = torch.zeros(len(seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        responses[i, : len(s)] = torch.tensor(s)
        lengths[i] = len(s)
    return responses, lengths


def exact_gradient(probe, prompt_ids_list, responses, lengths) -> list[torch.Tensor]:
    """Exact ∇H for H = N/D (N = Σ_p E_p[h], D = Σ_p E_p[T]): ∇N and ∇D accumulated prompt by prompt."""
    params = [p for _, p in probe.trainable]
    grad_n = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    grad_d = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    num = den = 0.0
    for prompt_ids in prompt_ids_list:
        n_p, d_p, _ = _prompt_sums(probe, prompt_ids, responses, lengths, grad=True)
        for acc, g in zip(grad_n, torch.autograd.grad(n_p, params, retain_graph=True)):
            acc += g.double()
        for acc, g in zip(grad_d, torch.autograd.grad(d_p, params)):
            acc += g.double()
        num, den = num + float(n_p.detach()), den + float(d_p.detach())
    return [(gn * den - num * gd) / den ** 2 for gn, gd in zip(grad_n, grad_d)]


def _prompt_sums(probe, prompt_ids, responses, lengths, grad: bool, payload: str = "rb",
                 normalize: str = "per_token"):
    """E_p[h], E_p[λ] and the total probability for one prompt by enumeration (differentiable with grad)."""
    g = Group(0, prompt_ids, responses, lengths, torch.zeros(len(lengths), dtype=torch.float64))
    mb = g.layout(slice(0, g.size))
    with torch.set_grad_enabled(grad):
        token_logp, token_h = probe.policy(mb.input_ids, mb.attention_mask, mb.response_start, mb.response_mask,
                                           probe.cfg.sampling.temperature)
        rows = mb.response_mask.nonzero(as_tuple=True)[0]
        s = torch.zeros(g.size, dtype=torch.float64).index_add(0, rows, token_logp.double())
        h_rb = torch.zeros(g.size, dtype=torch.float64).index_add(0, rows, token_h.double())
        h = h_rb if payload == "rb" else -s
        p = torch.exp(s)
        lam = lengths.double() if normalize == "per_token" else torch.ones(g.size, dtype=torch.float64)
        return (p * h).sum(), (p * lam).sum(), p.sum()


def exact_population(probe, prompt_ids_list, responses, lengths, payload: str = "rb",
                     normalize: str = "per_token") -> tuple[float, list[float]]:
    """Exact H = Σ_p E_p[h] / Σ_p E_p[λ] over the prompts (each weighted once), by enumeration, and each
    prompt's total probability of the enumerated responses (1 when nothing is missing)."""
    num = den = 0.0
    total_prob = []
    for prompt_ids in prompt_ids_list:
        n_p, d_p, mass = _prompt_sums(probe, prompt_ids, responses, lengths, False, payload, normalize)
        num, den = num + float(n_p), den + float(d_p)
        total_prob.append(float(mass))
    return num / den, total_prob


def assert_same_sample_taylor(ckpt: Path, overrides: list[str]) -> None:
    """ΔH_true(η)/η → δH₁/η on the same samples, with the error the second-order term ½η·Ĥ'' of the probe's own
    same-sample curvature (curvature/d2H_deta2, a forward-mode second derivative) up to a remainder that scales as
    η² (docs/method.md §5.1, §10). `overrides` must make the run float64 throughout (the `float64_throughout`
    fixture for Qwen2) and keep η_train out of the sweep.

    The Taylor regime is built, not hoped for: a first run measures Ĥ' and Ĥ''; a second run on the same samples
    sweeps η_k = η₀·10⁻ᵏ (k = 0..4) from η₀ = 0.02|Ĥ'|/|Ĥ''| (second-order term 1 % of the first), and the
    check uses the largest η_k whose remainder is at most a tenth of the second-order term (the series dominated by
    its leading terms: the third-order scale can be far below |Ĥ'|/|Ĥ''| on a toy), asserting one was found."""
    import math

    from tests.tolerances import fp_bound

    first = make_probe(ckpt, [*overrides, "estimators.etas=[1e-4]"]).run().summary()
    slope, curvature = first["delta_h1/per_eta"], first["curvature/d2H_deta2"]
    assert slope != 0.0 and math.isfinite(curvature) and curvature != 0.0, (slope, curvature)  # tol: exact
    eta0 = 0.02 * abs(slope) / abs(curvature)
    etas = [eta0 * 10.0 ** -k for k in range(5)]
    probe = make_probe(ckpt, [*overrides, f"estimators.etas=[{','.join(repr(e) for e in etas)}]"])
    summary = probe.run().summary()
    assert summary["delta_h1/per_eta"] == slope and summary["curvature/d2H_deta2"] == curvature  # tol: exact
    sweep = {s["eta"]: s["delta_h_true"] for s in summary["sweep"]}
    assert set(sweep) == set(etas), (sorted(sweep), etas)
    # error of the first-order prediction and its remainder after the second-order term, per η
    error = {eta: sweep[eta] / eta - slope for eta in etas}
    remainder = {eta: error[eta] - 0.5 * eta * curvature for eta in etas}
    # tol: fp ΔH_true is a difference of two float64 ratio estimators over at most B_E·G_E·max_new_tokens token
    # terms of size |Ĥ| each (float64 throughout): fp_bound per Ĥ, divided by η
    sampling = probe.cfg.sampling
    tokens = sampling.B_E * sampling.G_E * sampling.max_new_tokens
    floor = {eta: 2 * fp_bound(torch.float64, tokens, abs(summary["entropy/base"])) / eta for eta in etas}
    # tol: bound precondition of the Taylor model at η₂: the remainder (third order and up) is at most a tenth of
    # the second-order term there, and the float64 floor a hundredth of it (so the measured remainder is real)
    regime = [eta for eta in etas[:-1] if abs(remainder[eta]) + floor[eta] <= 0.1 * 0.5 * eta * abs(curvature)
              and floor[eta] <= 0.01 * 0.5 * eta * abs(curvature)]
    assert regime, ("no η of the grid is in the Taylor regime", remainder, curvature)
    eta2 = regime[0]
    eta1 = etas[etas.index(eta2) + 1]  # η₂/10 (the grid's next point, not η₂/10 re-rounded)
    # tol: bound the remainder is O(η²) (third order): at η₁ = η₂/10 it is |remainder(η₂)|/100, 4× safety for the
    # fourth-order part (≤ a tenth of the third at η₂ by the same series argument), plus the float64 floors
    tol = 4 * (abs(remainder[eta2]) + floor[eta2]) * (eta1 / eta2) ** 2 + floor[eta1]
    assert abs(remainder[eta1]) <= tol, (eta2, error, remainder, tol)
    # tol: bound teeth: δH₁ off by a factor 1 + ε moves error(η₁) by ε|Ĥ'|, Ĥ'' off by δ moves it by ½η₁δ; the
    # tolerance (plus the second-order term it is compared after) stays below 0.2 % of |Ĥ'|, so a first order off
    # by 0.2 % or more fails, and a wrong Ĥ'' leaves a remainder linear in η that the precondition rejects
    assert tol + 0.5 * eta1 * abs(curvature) < 2e-3 * abs(slope), (tol, slope, curvature)
