"""GRADE's update gradient: backpropagation through a relaxed rollout (docs/method.md §4.2).

For each prompt of U and each of its G_U rows, max_new_tokens relaxed tokens are generated with gradient:

    z_t = head(policy(e_<t))/τ,   y_t = relaxed_token(z_t, g_t),   e_t = y_tᵀE         (update/relax.py)
    L_U = (1/(B·G)) Σ_i ( −r_φ(prompt_i, y_i,1..T) + β Σ_t KL(π_θ(·|e_<t) ‖ π_ref(·|e_<t)) )

π_ref is the base with the adapter disabled, fed the same relaxed inputs, so both distributions of the KL belong
to the same position. Memory per row is O(T) besides one step's activations:

- the policy's (and the reference's) KV cache is kept with gradient as one [rows, kv_heads, 1, d] tensor per step
  and layer; each step runs under activation checkpointing and concatenates its past inside the checkpoint, so
  neither the concatenation nor the step's activations (nor its [rows, V] logits, KL and relaxation) are saved —
  they are recomputed in backward, and no step recomputes the prefix (no O(T²) forward);
- the relaxed tokens are kept sparse (k weights and ids per step), the reward model reads them through
  `relax.soft_embedding` (embedding_bag over the k ids, or one dense matmul when k = V), also checkpointed.

`use_cache=False` runs the same rollout by recomputing the whole prefix at every step: the reference the tests
compare the cached gradient with.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from probe_dist.model.policy import PolicyModel, cache_kwargs, unwrap_causal_lm
from probe_dist.rollout.generate import response_seed
from probe_dist.update.relax import SoftToken, relaxed_token, soft_embedding, token_kl

log = logging.getLogger("probe_dist")

GRADE_FAMILIES = ("grade", "grade_st")


@dataclass(frozen=True)
class GradeSpec:
    """The settings of one GRADE objective (update section + sampling's τ and max_new_tokens)."""

    steps: int                    # T = max_new_tokens relaxed tokens per row
    temperature: float            # τ: z = logits/τ, the sampling temperature of the policy
    tau_g: float                  # Gumbel-softmax temperature τ_g
    top_k: int                    # relaxation support (0: the whole vocabulary)
    straight_through: bool        # grade_st: one-hot forward, soft backward
    kl_coef: float                # β
    embed: str = "auto"           # how soft tokens become embeddings: auto | sparse | dense

    @classmethod
    def from_config(cls, update, *, temperature: float, max_new_tokens: int) -> GradeSpec:
        """The spec of config section `update` (loss grade or grade_st) with the run's resolved τ and
        max_new_tokens."""
        return cls(steps=max_new_tokens, temperature=temperature, tau_g=update.grade_tau, top_k=update.grade_top_k,
                   straight_through=update.loss == "grade_st", kl_coef=update.kl_coef, embed=update.grade_embed)


@dataclass
class SoftRollout:
    """Rows' relaxed rollouts: tokens[t] a SoftToken ([n, k] weights with gradient), kl [n, T] float64 per-step
    KL(π_θ‖π_ref) with gradient (zeros when β = 0), hard [n, T] long (the ids the relaxation rounds to), and with
    a shared reward head the reward [n] float64."""

    tokens: list[SoftToken]
    kl: torch.Tensor
    hard: torch.Tensor
    reward: torch.Tensor | None = None  # [n] float64 r_φ when the reward head shares the frozen base


def row_keys(seed: int, batch: str, prompt_index: int, rows: range) -> torch.Tensor:
    """[n] int64 noise-stream keys of the rows: the same (seed, batch, prompt, response) key as hard sampling."""
    return torch.tensor([response_seed(seed, batch, prompt_index, r) for r in rows], dtype=torch.int64)


class SoftRolloutRunner:
    """Runs relaxed rollouts of one PolicyModel (and its reference: `reference()` disables the adapter)."""

    def __init__(self, policy: PolicyModel, reference, spec: GradeSpec, reward_head: torch.nn.Module | None = None):
        """reward_head: the score head of a reward model whose backbone IS the frozen base (RewardModel.shared):
        the reward is then read off the reference's own pass over the relaxed rollout (one more reference step
        after the last token), with no second backbone in memory."""
        self.policy, self.reference, self.spec, self.reward_head = policy, reference, spec, reward_head
        causal = unwrap_causal_lm(policy.lm)
        self.config = causal.config
        self.embedding = causal.get_input_embeddings()
        self.track_reference = bool(spec.kl_coef) or reward_head is not None

    # -- one forward of the decoder over new inputs, with the past given as per-step tensors ---------------------

    def _forward(self, e_in: torch.Tensor, past: list[list[torch.Tensor]], start: int, ref: bool):
        """Decoder over e_in [n, L, H] at positions start.. with `past` = per step a flat [k₀, v₀, k₁, v₁, …] list.

        Returns (last-position hidden state [n, H], the new flat k/v of these L positions, cloned off the cache)."""
        from transformers import DynamicCache

        n, length = e_in.shape[0], e_in.shape[1]
        cache = DynamicCache(config=self.config)
        if past:
            num = len(past[0]) // 2
            for layer in range(num):
                keys = torch.cat([p[2 * layer] for p in past], dim=-2)
                values = torch.cat([p[2 * layer + 1] for p in past], dim=-2)
                cache.update(keys, values, layer)
        positions = torch.arange(start, start + length, device=e_in.device).unsqueeze(0).expand(n, -1)
        with self.reference() if ref else nullcontext():
            hidden = self.policy.decoder(inputs_embeds=e_in, position_ids=positions, use_cache=True,
                                         **cache_kwargs(cache)).last_hidden_state[:, -1]
        new = []
        for layer in cache.layers:
            if getattr(layer, "keys", None) is None:
                raise RuntimeError("the model's KV cache has a layer without keys/values (a recurrent or hybrid "
                                   "architecture): GRADE's cached soft rollout supports attention layers only")
            new += [layer.keys[:, :, -length:].clone(), layer.values[:, :, -length:].clone()]
        return hidden, new

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """z = the model's logits / τ at one position, [n, V] (float32, or float64 for a float64 model)."""
        logits = self.policy.logit_transform(self.policy.head(hidden))
        return (logits if logits.dtype == torch.float64 else logits.float()) / self.spec.temperature

    def _step(self, t: int, keys: torch.Tensor, start: int, num_past: int, e_in: torch.Tensor, *flat):
        """One relaxed step (checkpointed): forward(s), KL, relaxation, next input embedding, new k/v; at the last
        step with a shared reward head, the reference's pass over the last token and the reward."""
        width = len(flat) // num_past if num_past else 0
        per_step = [list(flat[s * width:(s + 1) * width]) for s in range(num_past)]
        half = width // 2 if self.track_reference else width
        past_p = [p[:half] for p in per_step]
        past_r = [p[half:] for p in per_step]
        hidden, new_p = self._forward(e_in, past_p, start, ref=False)
        z = self._logits(hidden)
        kl, new_r = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device), []
        if self.track_reference:
            hidden_ref, new_r = self._forward(e_in, past_r, start, ref=True)
            if self.spec.kl_coef:
                kl = token_kl(z, self._logits(hidden_ref))
        tok = relaxed_token(z, keys, t, tau_g=self.spec.tau_g, top_k=self.spec.top_k,
                            straight_through=self.spec.straight_through)
        e_next = soft_embedding(tok, self.embedding.weight, self.spec.embed).unsqueeze(1).to(e_in.dtype)
        reward = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
        if self.reward_head is not None and t == self.spec.steps - 1:
            last, _ = self._forward(e_next, [*past_r, new_r], start + e_in.shape[1], ref=True)
            reward = self.reward_head(last).squeeze(-1).double()
        return (kl, reward, tok.weights, tok.ids, tok.hard, e_next, *new_p, *new_r)

    def rollout(self, prompt_ids: torch.Tensor, keys: torch.Tensor, *, use_cache: bool = True,
                checkpoint_steps: bool = True) -> SoftRollout:
        """Relaxed rollouts of len(keys) rows of one prompt (prompt_ids [P] long), T = spec.steps steps.

        use_cache=False: every step recomputes the whole prefix (the O(T²) reference path). Runs with gradient
        when grad mode is on. Returns a SoftRollout (its reward set only with a shared reward head).
        """
        dev = self.embedding.weight.device
        n = keys.shape[0]
        keys = keys.to(dev)
        e_prompt = self.embedding(prompt_ids.to(dev).unsqueeze(0).expand(n, -1))
        tokens, kls, hard = [], [], []
        past: list[tuple[torch.Tensor, ...]] = []
        e_in, start = e_prompt, 0
        for t in range(self.spec.steps):
            if use_cache:
                args = (t, keys, start, len(past), e_in, *[x for p in past for x in p])
            else:  # the whole prefix again, no past
                args = (t, keys, 0, 0, e_in)
            if use_cache and checkpoint_steps and torch.is_grad_enabled():
                out = checkpoint(self._step, *args, use_reentrant=False)
            else:
                out = self._step(*args)
            kl, reward, w, ids, h, e_next, *new = out
            tokens.append(SoftToken(w, ids, h))
            kls.append(kl)
            hard.append(h)
            if use_cache:
                past.append(tuple(new))
                start += e_in.shape[1]
                e_in = e_next
            else:
                e_in = torch.cat([e_in, e_next], dim=1)
        return SoftRollout(tokens, torch.stack(kls, dim=1), torch.stack(hard, dim=1),
                           reward if self.reward_head is not None else None)


@dataclass(frozen=True)
class GradeObjective:
    """What the GRADE gradient pass needs beyond the runner: the spec, the reward model and the run seed (the
    noise of response r of U's prompt p is keyed by (seed, "U", p, r), as hard sampling would be)."""

    spec: GradeSpec
    reward_model: object          # model.reward_model.RewardModel
    seed: int


@dataclass(frozen=True)
class GradeStats:
    """U's relaxed rollouts over all ranks: rows B·G, the mean reward r_φ and the mean sequence KL Σ_t KL_t
    (float64 sums, all-reduced)."""

    num_rows: int
    reward_mean: float
    kl_mean: float


def group_grade_backward(runner, group, *, objective: GradeObjective, num_rows: int,
                         accumulator: list[torch.Tensor], sums: torch.Tensor) -> None:
    """Forward + backward of L_U (module docstring) on one prompt group, `runner.sizes.grad` rows at a time, each
    microbatch's gradient added to the float64 `accumulator`; sums [2] float64 += (Σ r_φ, Σ_i Σ_t KL) of real rows.

    Zero-weight padding groups run the same passes (every rank the same backward count) and add nothing. The
    group keeps what the rows rounded to and scored, for the per-sequence table: responses [G, T] the hard ids
    (argmax of each relaxed token), lengths T, rewards r_φ (float64)."""
    from probe_dist.update.loss import grade_loss_per_sequence

    rm = objective.reward_model
    rollout = SoftRolloutRunner(runner.strategy.policy, runner.reference, objective.spec,
                                reward_head=rm.score if rm.shared else None)
    group.responses = torch.zeros(group.size, objective.spec.steps, dtype=torch.long)
    group.lengths = torch.full((group.size,), objective.spec.steps, dtype=torch.long)
    for start in range(0, group.size, runner.sizes.grad):
        rows = range(start, min(start + runner.sizes.grad, group.size))
        keys = row_keys(objective.seed, "U", group.prompt_index, rows)
        soft = rollout.rollout(group.prompt_ids, keys)
        rewards = soft.reward if rm.shared else rm(group.prompt_ids, soft.tokens)
        per_row = grade_loss_per_sequence(rewards, soft.kl, kl_coef=objective.spec.kl_coef, num_rows=num_rows)
        (per_row.sum() * group.weight).backward()
        runner.drain_grads_into(accumulator)
        group.responses[start:rows.stop] = soft.hard.cpu()
        group.rewards[start:rows.stop] = rewards.detach().cpu()
        if group.weight > 0:
            sums += torch.stack([rewards.detach().sum(), soft.kl.detach().sum()]).cpu()
