"""Batched, seeded sampling from softmax(z/τ) with full support (top_p = 1, top_k = 0).

Our own decoding loop rather than `generate()`: no logits processors can silently truncate the support
(generation_config's default top_k = 50) and no per-step scores are kept. A block of rows — the responses of
several prompts, left-padded to one width with an attention mask and position ids — is decoded together with a
KV cache; rows finish independently (their later tokens are padding). Every response draws from its own
counter-based stream keyed by (run seed, batch name, global prompt index, response index): at step t its uniform
is a hash of (key, t) (`update.relax.counter_uniform`) and the token is the inverse CDF of softmax(z/τ) at it, so
all rows draw at once, with no generator state.

Invariances: the samples do not depend on the world size or on which rank decodes a block (blocks are fixed by the
global prompt order and memory.microbatch_generate). Decoding the same rows in another block (another
microbatch_generate) changes the logits only by float rounding, so a token changes only where a row's uniform
falls within that rounding of a CDF boundary (probability ~1e-7 per token in float32).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from probe_dist.update.relax import counter_uniform

SAMPLER_STREAM = 0xFFFFFFFF  # the counter's token slot for sampling: no token id, so GRADE's noise never coincides


def response_seed(seed: int, batch_name: str, prompt_index: int, response_index: int) -> int:
    """The 63-bit stream key of one response: SHA-256 of (seed, batch, prompt index, response index)."""
    digest = hashlib.sha256(f"{seed}:{batch_name}:{prompt_index}:{response_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class InvalidDistributionError(RuntimeError):
    """A sampling step's probabilities are not a distribution: NaN/inf logits or no probability mass."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def inverse_cdf_sample(probs: torch.Tensor, keys: torch.Tensor, step: int) -> torch.Tensor:
    """One token per row from probs [n, V] (rows need not be normalised) at the row's counter uniform for `step`.

    The token is the first id whose cumulative probability (float64) reaches u·total: an id of zero probability is
    never drawn, every other id with probability proportional to its mass. keys: [n] int64. Returns [n] long.
    Raises InvalidDistributionError (a RuntimeError) when a row is not a valid distribution (NaN/inf or no mass,
    e.g. temperature 0).
    """
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    if not bool(torch.isfinite(cdf).all()) or not bool((total > 0).all()):
        raise InvalidDistributionError("invalid sampling distribution: the logits give NaN/inf or no probability "
                                       "mass (check the model's weights and sampling.temperature > 0)", step)
    ids = torch.full((keys.shape[0], 1), SAMPLER_STREAM, dtype=torch.long, device=keys.device)
    u = counter_uniform(keys, step, ids).to(cdf.device) * total
    return torch.searchsorted(cdf, u).squeeze(1).clamp_max(probs.shape[-1] - 1)


@torch.no_grad()
def sample_rows(policy, prompts: Sequence[torch.Tensor], row_prompt: Sequence[int], keys: torch.Tensor, *,
                max_new_tokens: int, temperature: float, eos_ids: Sequence[int], pad_id: int,
                device: torch.device, lockstep: bool = False, return_logp: bool = False):
    """Decode one block: row i continues prompts[row_prompt[i]] drawing from stream keys[i].

    prompts: [P_j] long token ids (any device); keys: [n] int64 stream keys (`response_seed`). Prompts are
    left-padded with pad_id to the longest, masked out, and positions count real tokens only.
    `policy.decode(input_ids, past_key_values, position_ids, attention_mask)` gives last-position float32 logits
    and the cache. With `lockstep` every call runs exactly max_new_tokens steps (FSDP2 ranks must run the same
    forwards). A response ends at the first token in `eos_ids`, which is counted in its length T and scored.
    Returns (responses [n, max_new_tokens] CPU long, pad after the end; lengths [n] CPU long, max_new_tokens for
    unfinished rows); with return_logp also each response's log-probability Σ_t log softmax(z/τ)[y_t] over its
    T tokens ([n] float64 CPU, nats): the sampling distribution's own, as an external sampler reports it.
    Raises InvalidDistributionError (a RuntimeError) on an invalid distribution (NaN/inf logits,
    temperature 0).
    """
    n = len(row_prompt)
    width = max(int(prompts[j].numel()) for j in set(row_prompt))
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(n, width, dtype=torch.long, device=device)
    for i, j in enumerate(row_prompt):
        p = prompts[j].to(device)
        ids[i, width - p.numel():] = p
        mask[i, width - p.numel():] = 1
    keys = keys.to(device)
    out = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted({int(e) for e in eos_ids}), dtype=torch.long, device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache, step_input = None, ids
    seq_logp = torch.zeros(n, dtype=torch.float64, device=device)
    for t in range(max_new_tokens):
        logits, cache = policy.decode(step_input, past_key_values=cache, position_ids=positions, attention_mask=mask)
        token = inverse_cdf_sample(torch.softmax(logits / temperature, dim=-1), keys, t)
        if return_logp:
            logp = torch.log_softmax(logits.float() / temperature, dim=-1).gather(1, token.unsqueeze(1)).squeeze(1)
            seq_logp += torch.where(done, torch.zeros_like(logp), logp).double()
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out[:, t] = token
        newly_done = (~done) & torch.isin(token, eos)
        lengths = torch.where(newly_done, torch.full_like(lengths, t + 1), lengths)
        done |= newly_done
        if bool(done.all()) and not lockstep:
            break
        step_input = token.unsqueeze(1)
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(n, 1, dtype=torch.long, device=device)], dim=1)
    if return_logp:
        return out.cpu(), lengths.cpu(), seq_logp.cpu()
    return out.cpu(), lengths.cpu()


def sample_responses(policy, prompt_ids: torch.Tensor, num_responses: int, *, max_new_tokens: int,
                     temperature: float, eos_ids: Sequence[int], pad_id: int, seed_key: tuple[int, str, int],
                     device: torch.device, rows_per_chunk: int | None = None,
                     lockstep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """G responses to one prompt (prompt_ids [P] long), `rows_per_chunk` rows decoded together; response r
    draws from the stream response_seed(*seed_key, r). Returns (responses [G, max_new_tokens], lengths [G]) on CPU;
    see `sample_rows`."""
    chunk = rows_per_chunk or num_responses
    outs, lens = [], []
    for start in range(0, num_responses, chunk):
        rows = range(start, min(start + chunk, num_responses))
        keys = torch.tensor([response_seed(*seed_key, r) for r in rows], dtype=torch.int64)
        o, n = sample_rows(policy, [prompt_ids], [0] * len(rows), keys, max_new_tokens=max_new_tokens,
                           temperature=temperature, eos_ids=eos_ids, pad_id=pad_id, device=device, lockstep=lockstep)
        outs.append(o)
        lens.append(n)
    return torch.cat(outs), torch.cat(lens)
