"""Sample: draw a batch of prompt groups at θ — prompts chosen by seed, responses by per-response generators,
rewards and group advantages (docs/method.md §2, §4). Every rank holds the same number of groups."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from probe_dist.config_schema import SamplingConfig
from probe_dist.data.prompts import load_prompts, prompt_text, prompt_token_ids, select_prompts
from probe_dist.data.rewards import RewardSet, decode_response, get_rewards, is_plugin_spec
from probe_dist.rollout.batch import (
    Group,
    RolloutBatch,
    batch_reward_std,
    default_scale_rewards,
    group_advantages,
)
from probe_dist.rollout.generate import response_seed, sample_rows
from probe_dist.runtime import progress
from probe_dist.runtime.sharding import (
    block_ranges,
    groups_per_block,
    idle_rank_note,
    max_groups_per_rank,
    shard_groups,
)

log = logging.getLogger("probe_dist")


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


BOS_RULES = ("auto", "always", "never")


def sample_group(decoder, tokenizer, prompt: dict, *, prompt_index: int, seed_key: tuple[int, str, int],
                 group_size: int, temperature: float, max_new_tokens: int, reward_fn: Callable[[str, str], float] | RewardSet,
                 loss_family: str, adv_eps: float, device: torch.device, rows_per_chunk: int | None = None,
                 lockstep: bool = False, weight: float = 1.0, eos_ids: Sequence[int] | None = None,
                 scale_rewards: str | None = None, bos: str = "always") -> Group:
    """One prompt group: G responses sampled at τ with full support, their rewards and advantages (CPU).

    prompt: {"prompt": text, "answer": text}. seed_key = (seed, batch name, prompt index) keys each response's
    stream (rollout.generate), so the group is the same whatever the world size. `decoder.decode` gives
    last-position logits (see rollout.generate). weight 0 marks lockstep padding. eos_ids: the ids that end a
    response (default: the tokenizer's EOS; the probe passes `response_eos_ids`). scale_rewards: group | none
    (default: the loss family's); "batch" leaves the group-scaled advantages for `sample_batch` to replace.
    """
    seed, name, _ = seed_key
    return sample_block(decoder, tokenizer, [prompt], [prompt_index], seed=seed, name=name, group_size=group_size,
                        temperature=temperature, max_new_tokens=max_new_tokens, reward_fn=reward_fn,
                        loss_family=loss_family, adv_eps=adv_eps, device=device, rows_per_chunk=rows_per_chunk,
                        lockstep=lockstep, weights=[weight], eos_ids=eos_ids, scale_rewards=scale_rewards,
                        bos=bos)[0]


def sample_block(decoder, tokenizer, prompts: Sequence[dict], prompt_indices: Sequence[int], *, seed: int, name: str,
                 group_size: int, temperature: float, max_new_tokens: int,
                 reward_fn: Callable[[str, str], float] | RewardSet, loss_family: str, adv_eps: float,
                 device: torch.device, rows_per_chunk: int | None = None, lockstep: bool = False,
                 weights: Sequence[float] | None = None, eos_ids: Sequence[int] | None = None,
                 scale_rewards: str | None = None, bos: str = "always", sampler=None) -> list[Group]:
    """A block of prompt groups decoded together: every group's G rows in one batch of left-padded prompts
    (`rows_per_chunk` rows per decode call at most), then each group's rewards and advantages (see sample_group).
    Response r of the prompt at global index p draws from the stream (seed, name, p, r). With `sampler` (an
    external engine with `sample_rows` as `rollout.vllm_engine.VLLMSampler`'s) the rows come from it instead of
    `decoder`, with the per-sequence log q it reports kept as each group's `behaviour_logp`."""
    eos_ids = list(eos_ids) if eos_ids is not None else [tokenizer.eos_token_id]
    prompt_ids = [prompt_token_ids(tokenizer, p["prompt"], bos) for p in prompts]
    rows = [(j, r) for j in range(len(prompts)) for r in range(group_size)]
    chunk = rows_per_chunk or len(rows)
    outs, lens, logq = [], [], []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        keys = torch.tensor([response_seed(seed, name, prompt_indices[j], r) for j, r in part], dtype=torch.int64)
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, eos_ids=eos_ids,
                      pad_id=_pad_id(tokenizer))
        if sampler is None:
            o, n = sample_rows(decoder, prompt_ids, [j for j, _ in part], keys, device=device, lockstep=lockstep,
                               **kwargs)
        else:
            o, n, q = sampler.sample_rows(prompt_ids, [j for j, _ in part], keys, **kwargs)
            logq.append(q.to(torch.float64))
        outs.append(o)
        lens.append(n)
    responses_all, lengths_all = torch.cat(outs), torch.cat(lens)
    logq_all = torch.cat(logq) if logq else None
    groups = []
    for j, prompt in enumerate(prompts):
        sl = slice(j * group_size, (j + 1) * group_size)
        groups.append(_finish_group(tokenizer, prompt, prompt_indices[j], prompt_ids[j], responses_all[sl],
                                    lengths_all[sl], reward_fn=reward_fn, loss_family=loss_family, adv_eps=adv_eps,
                                    weight=weights[j] if weights is not None else 1.0, eos_ids=eos_ids,
                                    scale_rewards=scale_rewards))
        if logq_all is not None:
            groups[-1].behaviour_logp = logq_all[sl].clone()
    return groups


def _finish_group(tokenizer, prompt: dict, prompt_index: int, prompt_ids: torch.Tensor, responses: torch.Tensor,
                  lengths: torch.Tensor, *, reward_fn, loss_family: str, adv_eps: float, weight: float,
                  eos_ids: list[int], scale_rewards: str | None) -> Group:
    """One group's rewards, EOS flags and advantages from its sampled responses."""
    reward_parts = None
    if isinstance(reward_fn, RewardSet):
        rewards, reward_parts = reward_fn.score(tokenizer, prompt, [r[: int(n)] for r, n in zip(responses, lengths)])
    else:
        texts = [decode_response(tokenizer, r[: int(n)], eos_ids) for r, n in zip(responses, lengths)]
        rewards = torch.tensor([reward_fn(t, prompt["answer"]) for t in texts], dtype=torch.float64)
    ended = torch.tensor([int(n) > 0 and int(r[int(n) - 1]) in eos_ids for r, n in zip(responses, lengths)],
                         dtype=torch.bool)
    scale = scale_rewards or default_scale_rewards(loss_family)
    return Group(prompt_index=prompt_index, prompt_ids=prompt_ids, responses=responses, lengths=lengths,
                 rewards=rewards, advantages=group_advantages(rewards, "group" if scale == "batch" else scale, adv_eps),
                 answer=str(prompt.get("answer", "")), weight=weight, ended=ended, reward_parts=reward_parts,
                 prompt_text=prompt_text(prompt))


def rank_blocks(num_prompts: int, per_block: int, world_size: int, rank: int) -> list[tuple[list[int], list[float]]]:
    """This rank's blocks: (global prompt indices, weights), `per_block` of each. The fixed blocks of the global
    order (runtime.sharding.block_ranges) are dealt out contiguously; the batch's last block, when short, is filled
    with zero-weight copies of its last prompt (the same at every world size), and a rank with fewer blocks adds
    zero-weight copies of its last block — so every rank holds the same number of full blocks."""
    blocks = block_ranges(num_prompts, per_block)
    full = [(list(b) + [b[-1]] * (per_block - len(b)), [1.0] * len(b) + [0.0] * (per_block - len(b)))
            for b in blocks]
    mine = [full[b] for b in shard_groups(len(blocks), world_size, rank)]
    pad = max_groups_per_rank(len(blocks), world_size) - len(mine)
    last = mine[-1][0] if mine else (full[0][0] if full else [])
    return mine + [(last, [0.0] * len(last))] * pad


def sample_batch(rt, decoder, tokenizer, name: str, *, sampling: SamplingConfig, num_prompts: int, group_size: int,
                 loss_family: str, adv_eps: float, rows_per_chunk: int, lockstep: bool,
                 eos_ids: Sequence[int] | None = None, scale_rewards: str | None = None,
                 after_group: Callable[[], None] | None = None, sampler=None) -> RolloutBatch:
    """This rank's shard of batch `name` ("E" or "U"): blocks of whole prompt groups of the seeded prompt order
    (`rows_per_chunk` // G groups, at least one, decoded and scored together), contiguous per rank, padded with
    zero-weight copies so every rank holds the same number of full blocks (`rank_blocks`).

    Each group holds responses [G, max_new_tokens] CPU long, lengths [G] and float64 rewards/advantages.
    `after_group` runs after every block (a safe point: every rank decodes the same number of blocks). `sampler`:
    an external backend that draws the rows instead of `decoder` (see sample_block).
    Raises ValueError (or FileNotFoundError) for a bad prompt source/split, an unknown reward or num_prompts < 0.
    """
    prompts = load_prompts(sampling.prompts, sampling.split, require_answer=not is_plugin_spec(sampling.reward))
    chosen = select_prompts(prompts, num_prompts, sampling.seed, name)
    reward_fn = get_rewards(sampling.reward)
    per_block = groups_per_block(rows_per_chunk, group_size, num_prompts)
    groups: list[Group] = []
    mine = rank_blocks(num_prompts, per_block, rt.world_size, rt.rank)
    note = idle_rank_note(name, num_prompts, group_size, rows_per_chunk, rt.world_size)
    if note and rt.is_main:
        log.warning(note)
    progress.expect(sum(len(block) for block, _ in mine) * group_size)
    for block, weights in mine:
        new = sample_block(decoder, tokenizer, [chosen[p][1] for p in block], block, seed=sampling.seed,
                               name=name, group_size=group_size, temperature=sampling.temperature,
                               max_new_tokens=sampling.max_new_tokens, reward_fn=reward_fn, loss_family=loss_family,
                               adv_eps=adv_eps, device=rt.device, rows_per_chunk=rows_per_chunk, lockstep=lockstep,
                               weights=weights, eos_ids=eos_ids, scale_rewards=scale_rewards,
                               bos=sampling.bos or "always", sampler=sampler)
        groups += new
        progress.advance(sum(g.size for g in new), sum(int(g.lengths.sum()) for g in new))
        if after_group is not None:
            after_group()  # a safe point: every rank decodes the same number of blocks
    real = [g for g in groups if g.weight > 0]
    if real and all(bool(torch.isnan(g.rewards).all()) for g in real) and rt.is_main:
        log.warning("no reward function scored any completion of batch %s on this rank (every value None): every "
                    "advantage is 0; check sampling.reward's functions against the prompt columns", name)
    if (scale_rewards or default_scale_rewards(loss_family)) == "batch":
        # One std over every reward of the batch (TRL's scale_rewards="batch"), from all ranks' groups in prompt order.
        local = {g.prompt_index: g.rewards for g in groups if g.weight > 0}
        merged = {k: v for part in rt.all_gather_objects(local) for k, v in part.items()}
        std = batch_reward_std([merged[k] for k in sorted(merged)])
        for g in groups:
            g.advantages = group_advantages(g.rewards, "batch", adv_eps, batch_std=std)
    return RolloutBatch(name=name, groups=groups, block_size=per_block)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prompt_batch(rt, tokenizer, name: str, *, sampling: SamplingConfig, num_prompts: int,
                 group_size: int) -> RolloutBatch:
    """This rank's shard of batch `name` as prompts only — what a GRADE update reads (its rollouts are relaxed and
    generated inside the gradient pass, group by group): the same seeded prompt order, contiguous groups per rank
    with zero-weight padding, each group with its prompt ids, `group_size` rows and no sampled tokens (responses [G, 0]).
    Raises ValueError (or FileNotFoundError) for a bad prompt source/split."""
    prompts = load_prompts(sampling.prompts, sampling.split, require_answer=not is_plugin_spec(sampling.reward))
    chosen = select_prompts(prompts, num_prompts, sampling.seed, name)
    mine = shard_groups(num_prompts, rt.world_size, rt.rank)
    padded = mine + [mine[-1] if mine else 0] * (max_groups_per_rank(num_prompts, rt.world_size) - len(mine))
    groups = []
    for slot, pos in enumerate(padded):
        prompt = chosen[pos][1]
        groups.append(Group(prompt_index=pos, prompt_ids=prompt_token_ids(tokenizer, prompt["prompt"],
                                                                         sampling.bos or "always"),
                            responses=torch.zeros(group_size, 0, dtype=torch.long),
                            lengths=torch.zeros(group_size, dtype=torch.long),
                            rewards=torch.full((group_size,), float("nan"), dtype=torch.float64),
                            advantages=torch.zeros(group_size, dtype=torch.float64),
                            answer=str(prompt.get("answer", "")), weight=1.0 if slot < len(mine) else 0.0,
                            prompt_text=prompt_text(prompt)))
    return RolloutBatch(name=name, groups=groups)

