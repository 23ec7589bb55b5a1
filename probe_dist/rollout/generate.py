"""Per-prompt seeded sampling from softmax(z/τ) with full support (top_p = 1, top_k = 0).

Our own decoding loop rather than `generate()`: no logits processors can silently truncate the support
(generation_config's default top_k = 50), no per-step scores are kept, and each prompt's G responses come from a
generator seeded by (run seed, batch name, global prompt index) — so the batch is identical for any world size.
"""

from __future__ import annotations

import hashlib

import torch


def prompt_seed(seed: int, batch_name: str, prompt_index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{batch_name}:{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def sample_responses(policy, prompt_ids: torch.Tensor, num_responses: int, max_new_tokens: int,
                     temperature: float, eos_id: int, pad_id: int, seed: int, device: torch.device,
                     lockstep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample G responses to one prompt. Returns (responses [G, max_new_tokens] CPU long, lengths [G]).

    `policy.decode(input_ids, past_key_values, position_ids)` gives last-position float32 logits and the cache.
    With `lockstep` every call runs exactly max_new_tokens steps (FSDP2 ranks must run the same forwards).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    ids = prompt_ids.to(device).unsqueeze(0).expand(num_responses, -1).contiguous()
    p = ids.shape[1]
    out = torch.full((num_responses, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((num_responses,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(num_responses, dtype=torch.bool, device=device)
    cache, step_input = None, ids
    positions = torch.arange(p, device=device).unsqueeze(0).expand(num_responses, -1)
    for t in range(max_new_tokens):
        logits, cache = policy.decode(step_input, past_key_values=cache, position_ids=positions)
        probs = torch.softmax(logits / temperature, dim=-1)
        token = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # drawn for every row: fixed RNG use
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out[:, t] = token
        newly_done = (~done) & (token == eos_id)
        lengths = torch.where(newly_done, torch.full_like(lengths, t + 1), lengths)
        done |= newly_done
        if bool(done.all()) and not lockstep:
            break
        step_input = token.unsqueeze(1)
        positions = torch.full((num_responses, 1), p + t, dtype=torch.long, device=device)
    return out.cpu(), lengths.cpu()
