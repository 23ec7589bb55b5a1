"""Sampled batches kept on CPU, one record per prompt group (the statistical unit)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


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

    @property
    def size(self) -> int:
        return int(self.responses.shape[0])

    def microbatches(self, rows: int) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
        """Row chunks of this group laid out for teacher forcing: [prompt | response (right-padded)].

        The layout depends on this group only, so every forward — and every rounding — is the same whatever
        the world size or which rank holds the group.
        """
        for start in range(0, self.size, rows):
            sl = slice(start, min(start + rows, self.size))
            yield sl, self.layout(sl)

    def layout(self, sl: slice) -> dict[str, torch.Tensor]:
        lengths = self.lengths[sl]
        width = max(int(self.lengths.max()), 1)  # group-wide width: same shapes for every chunk of the group
        resp = self.responses[sl, :width]
        n, p = resp.shape[0], self.prompt_ids.shape[0]
        response_mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
        input_ids = torch.cat([self.prompt_ids.unsqueeze(0).expand(n, p), resp], dim=1)
        attention_mask = torch.cat([torch.ones(n, p, dtype=torch.long), response_mask.long()], dim=1)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "response_mask": response_mask, "response_start": p}


@dataclass
class RolloutBatch:
    name: str                          # "E" or "U"
    groups: list[Group]                # this rank's groups (plus zero-weight padding)


def group_advantages(rewards: torch.Tensor, family: str, eps: float) -> torch.Tensor:
    """Advantages within one group (SPEC §4): grpo/dapo (r − mean)/(std + ε); dr_grpo r − mean."""
    r = rewards.to(torch.float64)
    centred = r - r.mean()
    if family == "dr_grpo":
        return centred
    std = r.std(unbiased=True) if r.numel() > 1 else torch.zeros((), dtype=torch.float64)
    return centred / (std + eps)
