"""Run the probe in-process on the toy checkpoint (world size 1), and enumerate responses exactly."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from probe_dist.config import load_config
from probe_dist.main import build_probe
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
