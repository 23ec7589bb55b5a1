"""Sample: draw a batch of prompt groups at θ — prompts chosen by seed, responses by per-response generators,
rewards and group advantages (docs/method.md §2, §4). Every rank holds the same number of groups."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from probe_dist.config_schema import SamplingConfig
from probe_dist.data.prompts import load_prompts, select_prompts
from probe_dist.data.rewards import decode_response, get_reward_fn
from probe_dist.rollout.batch import Group, RolloutBatch, group_advantages
from probe_dist.rollout.generate import sample_responses
from probe_dist.runtime.sharding import max_groups_per_rank, shard_groups


def response_eos_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and each id of `generation_config.eos_token_id` (an int or
    a list: Qwen3, Llama-3-instruct, Gemma-3 and Phi-3.5 ship several), sorted. Raises ValueError if there is none."""
    ids = {tokenizer.eos_token_id} - {None}
    configured = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if configured is not None:
        ids |= set(configured) if isinstance(configured, list | tuple) else {configured}
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config defines an EOS token id")
    return sorted(int(i) for i in ids)


def prompt_token_ids(tokenizer, text: str) -> torch.Tensor:
    """[P] long: the prompt's token ids, with the tokenizer's BOS in front when it defines one (not doubled)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    bos = tokenizer.bos_token_id
    if bos is not None and (ids.numel() == 0 or ids[0] != bos):
        ids = torch.cat([torch.tensor([bos]), ids])
    return ids


def sample_group(decoder, tokenizer, prompt: dict, *, prompt_index: int, seed_key: tuple[int, str, int],
                 group_size: int, temperature: float, max_new_tokens: int, reward_fn: Callable[[str, str], float],
                 loss_family: str, adv_eps: float, device: torch.device, rows_per_chunk: int | None = None,
                 lockstep: bool = False, weight: float = 1.0, eos_ids: Sequence[int] | None = None) -> Group:
    """One prompt group: G responses sampled at τ with full support, their rewards and advantages (CPU).

    prompt: {"prompt": text, "answer": text}. seed_key = (seed, batch name, prompt index) keys each response's
    generator, so the group is the same whatever the world size or the generation chunking. `decoder.decode` gives
    last-position logits (see rollout.generate). weight 0 marks lockstep padding. eos_ids: the ids that end a
    response (default: the tokenizer's EOS; the probe passes `response_eos_ids`).
    """
    eos_ids = list(eos_ids) if eos_ids is not None else [tokenizer.eos_token_id]
    prompt_ids = prompt_token_ids(tokenizer, prompt["prompt"])
    responses, lengths = sample_responses(decoder, prompt_ids, group_size, max_new_tokens=max_new_tokens,
                                          temperature=temperature, eos_ids=eos_ids,
                                          pad_id=_pad_id(tokenizer), seed_key=seed_key, device=device,
                                          rows_per_chunk=rows_per_chunk, lockstep=lockstep)
    texts = [decode_response(tokenizer, r[: int(n)], eos_ids) for r, n in zip(responses, lengths)]
    rewards = torch.tensor([reward_fn(t, prompt["answer"]) for t in texts], dtype=torch.float64)
    return Group(prompt_index=prompt_index, prompt_ids=prompt_ids, responses=responses, lengths=lengths,
                 rewards=rewards, advantages=group_advantages(rewards, loss_family, adv_eps),
                 answer=prompt["answer"], weight=weight)


def sample_batch(rt, decoder, tokenizer, name: str, *, sampling: SamplingConfig, num_prompts: int, group_size: int,
                 loss_family: str, adv_eps: float, rows_per_chunk: int, lockstep: bool,
                 eos_ids: Sequence[int] | None = None,
                 after_group: Callable[[], None] | None = None) -> RolloutBatch:
    """This rank's shard of batch `name` ("E" or "U"): contiguous prompt groups of the seeded prompt order,
    padded with zero-weight copies so every rank generates and scores the same number of groups.

    Each group holds responses [G, max_new_tokens] CPU long, lengths [G] and float64 rewards/advantages.
    Raises ValueError (or FileNotFoundError) for a bad prompt source/split, an unknown reward or num_prompts < 0.
    """
    chosen = select_prompts(load_prompts(sampling.prompts, sampling.split), num_prompts, sampling.seed, name)
    reward_fn = get_reward_fn(sampling.reward)
    mine = shard_groups(num_prompts, rt.world_size, rt.rank)
    padded = mine + [mine[-1] if mine else 0] * (max_groups_per_rank(num_prompts, rt.world_size) - len(mine))
    groups = []
    for slot, pos in enumerate(padded):
        groups.append(sample_group(decoder, tokenizer, chosen[pos][1], prompt_index=pos,
                                   seed_key=(sampling.seed, name, pos), group_size=group_size,
                                   temperature=sampling.temperature, max_new_tokens=sampling.max_new_tokens,
                                   reward_fn=reward_fn, loss_family=loss_family, adv_eps=adv_eps, device=rt.device,
                                   rows_per_chunk=rows_per_chunk, lockstep=lockstep,
                                   weight=1.0 if slot < len(mine) else 0.0, eos_ids=eos_ids))
        if after_group is not None:
            after_group()  # a safe point: every rank samples the same number of groups
    return RolloutBatch(name=name, groups=groups)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
