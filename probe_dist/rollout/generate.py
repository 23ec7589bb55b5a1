"""Per-prompt seeded sampling from softmax(z/τ) with full support (top_p = 1, top_k = 0).

Our own decoding loop rather than `generate()`: no logits processors can silently truncate the support
(generation_config's default top_k = 50), no per-step scores are kept, and every response comes from a generator
seeded by (run seed, batch name, global prompt index, response index) — so the batch is identical for any world
size and any generation chunking.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def response_seed(seed: int, batch_name: str, prompt_index: int, response_index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{batch_name}:{prompt_index}:{response_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def sample_responses(policy, prompt_ids: torch.Tensor, num_responses: int, *, max_new_tokens: int,
                     temperature: float, eos_ids: Sequence[int], pad_id: int, seed_key: tuple[int, str, int],
                     device: torch.device, rows_per_chunk: int | None = None,
                     lockstep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample G responses to one prompt. Returns (responses [G, max_new_tokens] CPU long, lengths [G]).

    Response r draws from its own generator seeded by (seed, batch, prompt index, r), so the samples are the same
    whatever the world size and however the rows are chunked (`rows_per_chunk` bounds the KV cache).
    `policy.decode(input_ids, past_key_values, position_ids)` gives last-position float32 logits and the cache.
    With `lockstep` every call runs exactly max_new_tokens steps (FSDP2 ranks must run the same forwards).
    A response ends at the first token in `eos_ids` (every id the model's generation_config and the tokenizer
    name as EOS), which is counted in its length T and scored.
    prompt_ids: [P] long (any device); unfinished rows have length max_new_tokens, padding after EOS is pad_id.
    Raises RuntimeError (from torch.multinomial) if the logits give an invalid distribution (NaN/inf, temperature 0).
    """
    chunk = rows_per_chunk or num_responses
    outs, lens = [], []
    for start in range(0, num_responses, chunk):
        rows = range(start, min(start + chunk, num_responses))
        gens = []
        for r in rows:
            gen = torch.Generator(device=device)
            gen.manual_seed(response_seed(*seed_key, r))
            gens.append(gen)
        o, n = _decode_rows(policy, prompt_ids, gens, max_new_tokens=max_new_tokens, temperature=temperature,
                            eos_ids=eos_ids, pad_id=pad_id, device=device, lockstep=lockstep)
        outs.append(o)
        lens.append(n)
    return torch.cat(outs), torch.cat(lens)


def _decode_rows(policy, prompt_ids, gens, *, max_new_tokens, temperature, eos_ids, pad_id, device, lockstep):
    """Decode len(gens) rows of prompt_ids [P] long, row i drawing from gens[i] on `device`.

    Returns (out [rows, max_new_tokens] CPU long, lengths [rows] CPU long). Raises RuntimeError (torch.multinomial)
    on an invalid distribution.
    """
    n_rows = len(gens)
    ids = prompt_ids.to(device).unsqueeze(0).expand(n_rows, -1).contiguous()
    p = ids.shape[1]
    out = torch.full((n_rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((n_rows,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(n_rows, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted({int(e) for e in eos_ids}), dtype=torch.long, device=device)
    cache, step_input = None, ids
    positions = torch.arange(p, device=device).unsqueeze(0).expand(n_rows, -1)
    for t in range(max_new_tokens):
        logits, cache = policy.decode(step_input, past_key_values=cache, position_ids=positions)
        probs = torch.softmax(logits / temperature, dim=-1)
        # One draw per row from its own generator, also for finished rows: a fixed use of each stream.
        token = torch.cat([torch.multinomial(probs[i], 1, generator=gens[i]) for i in range(n_rows)])
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out[:, t] = token
        newly_done = (~done) & torch.isin(token, eos)
        lengths = torch.where(newly_done, torch.full_like(lengths, t + 1), lengths)
        done |= newly_done
        if bool(done.all()) and not lockstep:
            break
        step_input = token.unsqueeze(1)
        positions = torch.full((n_rows, 1), p + t, dtype=torch.long, device=device)
    return out.cpu(), lengths.cpu()
