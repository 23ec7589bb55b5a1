"""Sampled batches kept on CPU, one record per prompt group (the statistical unit), and the microbatch layout
every model pass uses (docs/method.md §2)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass(frozen=True)
class Microbatch:
    """Rows of one prompt group — or of several, `block_microbatches` — laid out for teacher forcing:
    ``[prompt (left-padded) | response (right-padded)]``.

    input_ids, attention_mask: [n, P + W] long (CPU); response_mask: [n, W] bool, True at the T_i scored positions
    of row i (its response tokens through EOS); response_start = P. Scoring returns per-token values flat over the
    True entries of response_mask in row-major order; `token_rows` maps each to its row and `row_sums` adds them up
    per row in float64.
    """

    rows: slice                      # which of the group's responses these are (a block's: all its rows)
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    response_start: int
    row_group: tuple[int, ...] | None = None   # rows of several groups (`block_microbatches`): each row's group
    row_index: tuple[int, ...] | None = None   # ... and its response index within that group

    @property
    def num_rows(self) -> int:
        """n, the rows of this microbatch."""
        return int(self.response_mask.shape[0])

    @cached_property
    def token_rows(self) -> torch.Tensor:
        """[M] long: the row of each scored token (CPU)."""
        return self.response_mask.nonzero(as_tuple=True)[0]

    def token_rows_on(self, device: torch.device) -> torch.Tensor:
        """`token_rows` ([M] long, the row of each scored token) on `device`."""
        return self.token_rows.to(device)

    def row_sums(self, token_values: torch.Tensor) -> torch.Tensor:
        """Σ_t of per-token values [M] for each row → [n] float64 on CPU (detached)."""
        rows = self.token_rows_on(token_values.device)
        return torch.zeros(self.num_rows, dtype=torch.float64, device=token_values.device).index_add_(
            0, rows, token_values.detach().double()).cpu()


@dataclass
class Group:
    """One prompt with its G responses. Tensors live on CPU."""

    prompt_index: int                 # global index in the batch's prompt list (sharding / SE unit)
    prompt_ids: torch.Tensor          # [P] long
    responses: torch.Tensor           # [G, R] long, pad after each response's end
    lengths: torch.Tensor             # [G] long, T_i = scored tokens (through EOS, or the cut)
    rewards: torch.Tensor             # [G] float64
    advantages: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    answer: str = ""
    weight: float = 1.0               # 0.0 for padding work that keeps ranks in lockstep
    ended: torch.Tensor | None = None  # [G] bool: the response ends with an EOS (None: all do)
    reward_parts: dict[str, torch.Tensor] | None = None  # reward functions given by name: each one's [G] values
    prompt_text: str = ""             # the prompt as text (a conversation: its last message), for tables
    behaviour_logp: torch.Tensor | None = None  # [G] float64 log q(y_i) at τ of an external sampler (None: q = π_θ)
    is_weight: torch.Tensor | None = None  # [G] float64 sampler weights v_i ∝ π_θ(y_i)/q(y_i) (docs/method.md §13)

    @property
    def v(self) -> torch.Tensor:
        """[G] float64 per-sequence sampler weights v_i (docs/method.md §13): every E sum Σ_i x_i is Σ_i v_i x_i.
        All ones (so every product is bit for bit the unweighted one) when the responses were sampled from π_θ."""
        if self.is_weight is None:
            return torch.ones(self.size, dtype=torch.float64)
        return self.is_weight

    def kept(self, mask_truncated: bool) -> torch.Tensor:
        """[G] bool: responses the loss keeps — all, or with mask_truncated only those that ended with an EOS."""
        if not mask_truncated or self.ended is None:
            return torch.ones(self.size, dtype=torch.bool)
        return self.ended.clone()

    @property
    def size(self) -> int:
        """G, the number of responses of this group."""
        return int(self.responses.shape[0])

    def microbatches(self, rows: int) -> Iterator[Microbatch]:
        """Row chunks of at most `rows` responses of this group.

        The layout depends on this group only, so every forward — and every rounding — is the same whatever
        the world size or which rank holds the group.
        """
        for start in range(0, self.size, rows):
            yield self.layout(slice(start, min(start + rows, self.size)))

    def layout(self, sl: slice) -> Microbatch:
        """The Microbatch of responses `sl` of this group: the prompt (no padding), then the responses
        right-padded to the group-wide width max(max_i T_i, 1), so every chunk of the group has one shape."""
        lengths = self.lengths[sl]
        width = max(int(self.lengths.max()), 1)  # group-wide width: same shapes for every chunk of the group
        resp = self.responses[sl, :width]
        n, p = resp.shape[0], self.prompt_ids.shape[0]
        response_mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
        input_ids = torch.cat([self.prompt_ids.unsqueeze(0).expand(n, p), resp], dim=1)
        attention_mask = torch.cat([torch.ones(n, p, dtype=torch.long), response_mask.long()], dim=1)
        return Microbatch(rows=sl, input_ids=input_ids, attention_mask=attention_mask,
                          response_mask=response_mask, response_start=p)


def block_microbatches(groups: list[Group], rows: int) -> Iterator[Microbatch]:
    """The rows of a block of groups, `rows` at a time in (group, response) order, each chunk one Microbatch:
    prompts left-padded to the chunk's longest (masked out; the scorer's positions count real tokens), responses
    right-padded to the largest group-wide width among the chunk's groups. The layout depends on the block and
    `rows` only, so every forward is the same whatever the world size. With one group this is
    `Group.microbatches` (no prompt padding)."""
    order = [(j, r) for j, g in enumerate(groups) for r in range(g.size)]
    for start in range(0, len(order), rows):
        part = order[start:start + rows]
        members = sorted({j for j, _ in part})
        if len(members) == 1:
            j = members[0]
            mb = groups[j].layout(slice(part[0][1], part[-1][1] + 1))
            yield dataclasses.replace(mb, row_group=(j,) * len(part), row_index=tuple(r for _, r in part))
            continue
        width = max(max(int(groups[j].lengths.max()), 1) for j in members)
        p_max = max(int(groups[j].prompt_ids.shape[0]) for j in members)
        n = len(part)
        input_ids = torch.zeros(n, p_max + width, dtype=torch.long)
        attention_mask = torch.zeros(n, p_max + width, dtype=torch.long)
        response_mask = torch.zeros(n, width, dtype=torch.bool)
        for i, (j, r) in enumerate(part):
            g = groups[j]
            p = g.prompt_ids.shape[0]
            length = int(g.lengths[r])
            input_ids[i, p_max - p:p_max] = g.prompt_ids
            attention_mask[i, p_max - p:p_max] = 1
            w = min(width, g.responses.shape[1])
            input_ids[i, p_max:p_max + w] = g.responses[r, :w]
            response_mask[i, :length] = True
            attention_mask[i, p_max:p_max + length] = 1
        yield Microbatch(rows=slice(0, n), input_ids=input_ids, attention_mask=attention_mask,
                         response_mask=response_mask, response_start=p_max,
                         row_group=tuple(j for j, _ in part), row_index=tuple(r for _, r in part))


def gather_rows(mb: Microbatch, per_group: list[torch.Tensor]) -> torch.Tensor:
    """[n] values of `mb`'s rows from per-group tensors of its block (per_group[j][r] for a row of group j,
    response r; `block_microbatches` layouts only). Keeps per_group's dtype and device."""
    return torch.stack([per_group[j][r] for j, r in zip(mb.row_group, mb.row_index)])


@dataclass
class RolloutBatch:
    """One sampled batch (E or U) as this rank holds it: its prompt groups in global order, padded with
    zero-weight copies so every rank runs the same passes, decoded and scored `block_size` groups at a time
    (docs/method.md §2)."""

    name: str                          # "E" or "U"
    groups: list[Group]                # this rank's groups (plus zero-weight padding)
    block_size: int = 1                # groups decoded (and scored) together: consecutive runs of this many

    def blocks(self) -> list[list[Group]]:
        """This rank's groups as its blocks (every block full: the batch's last one is padded with zero-weight
        copies), in order."""
        k = max(self.block_size, 1)
        return [self.groups[i:i + k] for i in range(0, len(self.groups), k)]

    @property
    def real_groups(self) -> list[Group]:
        """The groups that count (weight > 0), without the lockstep padding."""
        return [g for g in self.groups if g.weight > 0]


SCALE_REWARDS = ("group", "batch", "none")


def default_scale_rewards(family: str) -> str:
    """The reward scaling each loss family's paper uses: Dr. GRPO none (no std division), the others group."""
    return "none" if family == "dr_grpo" else "group"


def group_advantages(rewards: torch.Tensor, scale: str, eps: float, *, batch_std: float | None = None) -> torch.Tensor:
    """Advantages A_i within one group (docs/method.md §4): r − mean(group), divided by (std + ε) where std is the
    group's (scale "group"), the whole batch's (scale "batch": `batch_std`, computed over every reward of the batch),
    or not at all ("none").

    rewards [G] → [G] float64; std is Bessel-corrected (as TRL's nanstd), 0 for a single reward. Raises ValueError
    for an unknown scale, or "batch" without batch_std.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale!r}")
    r = rewards.to(torch.float64)
    scored = ~torch.isnan(r)  # a reward no function scored (NaN) is left out of the baseline; its advantage is 0
    if not bool(scored.all()):
        out = torch.zeros_like(r)
        if bool(scored.any()):
            out[scored] = group_advantages(r[scored], scale, eps, batch_std=batch_std)
        return out
    centred = r - r.mean()
    if scale == "none":
        return centred
    if scale == "group":
        std = r.std(unbiased=True) if r.numel() > 1 else torch.zeros((), dtype=torch.float64)
        return centred / (std + eps)
    if batch_std is None:
        raise ValueError("scale_rewards=batch needs the batch's reward std")
    return centred / (batch_std + eps)


def batch_reward_std(rewards: list[torch.Tensor]) -> float:
    """Bessel-corrected std of every reward of a batch, from per-group reward tensors in global prompt order
    (the same order, so the same bits, on every rank and at every world size); 0 for a single reward."""
    r = torch.cat([x.to(torch.float64) for x in rewards]) if rewards else torch.zeros(0, dtype=torch.float64)
    r = r[~torch.isnan(r)]
    return float(r.std(unbiased=True)) if r.numel() > 1 else 0.0
