"""The training loss L_U (docs/method.md §4) — the one function every path (toy training, real step, update vector,
the explanation's per-sequence jvp) uses, with every on-policy option of TRL's GRPOTrainer (1.16) and verl.

Per scored token t of sequence i (on-policy: the sampling policy is θ, so every importance ratio is 1 in value):

    loss_{i,t} = n_i · ( −c·A_i·ℓ_{i,t}·e_{i,t}  +  β·k3_{i,t}·ρ_{i,t} )  −  o_i·H_{i,t}·e_{i,t}

    n_i   per-sequence normaliser of the aggregation (`sequence_normalisers`), 0 for a masked truncated response
    c     1, or min(1, ε_high) for cispo (TRL's clamp(ratio, max=ε_high).detach() at ratio 1)
    e     1, or the high-entropy token mask [H_{i,t} ≥ q-quantile of the block's entropies] (top_entropy_quantile)
    k3    e^{ref−ℓ} − (ref−ℓ) − 1, the KL(π_θ‖π_ref) estimator of GRPO; ρ = e^{ℓ − stop(ℓ)} (value 1, gradient ∇ℓ)
          with the bias correction TRL applies by default (use_bias_correction_kl), else 1
    o_i   entropy-bonus weight: entropy_coef / (number of blocks · Σ_block e·m), TRL's per-micro-step token mean

Aggregations (`LOSS_FAMILIES`) over U's B·G sequences, with m_i = 0 for masked truncated responses:
    grpo     token mean per sequence, mean over sequences          n_i = m_i / (B·G · max(T_i, 1))
    bnpo     token mean per training micro-step block, mean over blocks  n_i = m_i / (K · max(T_block, 1))
    dr_grpo  token sum / (B·G·L_max)                                  n_i = m_i / (B·G · L_max)
    dapo     token mean over every (unmasked) token of the batch      n_i = m_i / max(T_tot, 1)
    cispo    as dapo, with c = min(1, ε_high)

A block is `update.loss_block_rows` consecutive sequences in U's global order (prompt-major) — TRL's
per_device_train_batch_size rows of one micro-step — and K the number of blocks; without it U is one block (bnpo =
dapo). All counts are global (computed before any backward), so per-microbatch losses simply add up to L_U.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

LOSS_FAMILIES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")


@dataclass(frozen=True)
class LossSpec:
    """The loss options (update section of the config) that act per token."""

    family: str
    kl_coef: float = 0.0
    kl_bias_correction: bool = False
    epsilon_high: float = 0.2
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0

    @classmethod
    def from_config(cls, update) -> LossSpec:
        """The per-token options of config section `update`, its loss resolved (one of LOSS_FAMILIES)."""
        return cls(family=update.loss, kl_coef=update.kl_coef, kl_bias_correction=update.kl_bias_correction,
                   epsilon_high=update.epsilon_high, top_entropy_quantile=update.top_entropy_quantile,
                   entropy_coef=update.entropy_coef)

    @property
    def policy_scale(self) -> float:
        """c of the module docstring: min(1, ε_high) for cispo (TRL's clamped ratio at ratio 1), else 1."""
        return min(1.0, self.epsilon_high) if self.family == "cispo" else 1.0

    @property
    def needs_entropy(self) -> bool:
        """Whether the loss uses the per-token entropy H: a top-entropy token mask or an entropy bonus."""
        return self.top_entropy_quantile < 1.0 or self.entropy_coef != 0.0


@dataclass(frozen=True)
class LossNormalisers:
    """Global counts the normalisers need (all-reduced or gathered before any backward).

    num_prompts B, group_size G, total_tokens T_tot (unmasked tokens), max_len L_max; block_rows (None: U is one
    block), and per block in global order: unmasked tokens, the entropy threshold (−inf: no mask) and the
    entropy-bonus denominator Σ e·m.
    """

    num_prompts: int
    group_size: int
    total_tokens: float
    max_len: int
    block_rows: int | None = None
    block_tokens: tuple[float, ...] = ()
    block_threshold: tuple[float, ...] = ()
    block_bonus_tokens: tuple[float, ...] = ()
    entropy_masks: dict = field(default_factory=dict)  # this rank's groups: prompt index → per-row bool masks

    @property
    def num_rows(self) -> int:
        """B·G, the sequences in U."""
        return self.num_prompts * self.group_size

    def blocks_of(self, prompt_index: int, size: int) -> torch.Tensor:
        """[size] long: the block of each response of the group at `prompt_index` (0 when U is one block)."""
        rows = prompt_index * self.group_size + torch.arange(size)
        return rows // self.block_rows if self.block_rows else torch.zeros(size, dtype=torch.long)


def sequence_normalisers(family: str, lengths: torch.Tensor, norm: LossNormalisers, *,
                         kept: torch.Tensor | None = None, prompt_index: int = 0) -> torch.Tensor:
    """n_i (float64 [G]) for one group's sequences with lengths T_i (module docstring).

    kept: [G] bool, False for a truncated response masked out of the loss (mask_truncated_completions); default all
    kept. prompt_index: the group's position in U (bnpo's block). Raises ValueError for an unknown family.
    """
    t = lengths.to(torch.float64)
    m = kept.to(torch.float64) if kept is not None else torch.ones_like(t)
    if family == "grpo":
        return m / (norm.num_rows * t.clamp_min(1.0))
    if family == "bnpo":
        blocks = norm.blocks_of(prompt_index, t.numel())
        tokens = torch.tensor(norm.block_tokens, dtype=torch.float64)[blocks] if norm.block_tokens else \
            torch.full_like(t, norm.total_tokens)
        num_blocks = max(len(norm.block_tokens), 1)
        return m / (num_blocks * tokens.clamp_min(1.0))
    if family == "dr_grpo":
        return m / (norm.num_rows * norm.max_len)
    if family in ("dapo", "cispo"):
        return m / max(norm.total_tokens, 1.0)
    raise ValueError(f"unknown loss family {family!r}; expected one of {LOSS_FAMILIES}")


@dataclass(frozen=True)
class RowCoefficients:
    """Per-sequence coefficients of one group (or microbatch rows): [n] float64 tensors (module docstring)."""

    normaliser: torch.Tensor       # n_i
    threshold: torch.Tensor        # entropy-mask threshold of the row's block (float32; −inf: no mask)
    bonus: torch.Tensor            # o_i
    token_mask: list[torch.Tensor] | None = None  # per row: the entropy mask from the pass the thresholds came from

    def __getitem__(self, rows: slice) -> RowCoefficients:
        mask = self.token_mask[rows] if self.token_mask is not None else None
        return RowCoefficients(self.normaliser[rows], self.threshold[rows], self.bonus[rows], mask)

    @staticmethod
    def gather(parts: list[RowCoefficients], row_group, row_index, weights: list[float]) -> RowCoefficients:
        """The coefficients of rows drawn from several groups — row k is parts[row_group[k]]'s row row_index[k] —
        with each group's weight folded into n_i and o_i (a zero-weight padding group's rows add exactly 0)."""
        w = torch.tensor([weights[j] for j in row_group], dtype=torch.float64)
        pick = list(zip(row_group, row_index))
        masks = None
        if any(p.token_mask is not None for p in parts):
            masks = [parts[j].token_mask[r] for j, r in pick]
        return RowCoefficients(normaliser=torch.stack([parts[j].normaliser[r] for j, r in pick]) * w,
                               threshold=torch.stack([parts[j].threshold[r] for j, r in pick]),
                               bonus=torch.stack([parts[j].bonus[r] for j, r in pick]) * w, token_mask=masks)


def row_coefficients(spec: LossSpec, group, norm: LossNormalisers, *, kept: torch.Tensor | None = None,
                     ) -> RowCoefficients:
    """n_i, the entropy threshold and the bonus weight o_i of every response of `group` (a rollout Group)."""
    n = sequence_normalisers(spec.family, group.lengths, norm, kept=kept, prompt_index=group.prompt_index)
    blocks = norm.blocks_of(group.prompt_index, group.size)
    if norm.block_threshold:
        threshold = torch.tensor(norm.block_threshold, dtype=torch.float32)[blocks]
    else:
        threshold = torch.full((group.size,), -math.inf, dtype=torch.float32)
    bonus = torch.zeros(group.size, dtype=torch.float64)
    if spec.entropy_coef and norm.block_bonus_tokens:
        denominators = torch.tensor(norm.block_bonus_tokens, dtype=torch.float64)[blocks].clamp_min(1.0)
        m = kept.to(torch.float64) if kept is not None else torch.ones(group.size, dtype=torch.float64)
        bonus = spec.entropy_coef * m / (len(norm.block_bonus_tokens) * denominators)
    return RowCoefficients(n, threshold, bonus, norm.entropy_masks.get(group.prompt_index))


def kl_k3(token_logp: torch.Tensor, token_ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ ‖ π_ref) on samples from π_θ: e^{ref−ℓ} − (ref−ℓ) − 1 (as in GRPO)."""
    delta = token_ref_logp - token_logp
    return torch.exp(delta) - delta - 1.0


def update_loss_token_terms(token_logp: torch.Tensor, token_h: torch.Tensor | None, token_row: torch.Tensor,
                            advantages: torch.Tensor, rows: RowCoefficients, spec: LossSpec, *,
                            token_ref_logp: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token terms of L_U (module docstring): [M] float64, differentiable through token_logp and token_h.

    token_logp, token_h: [M] per-token ℓ and RB entropy H (nats; token_h may be None unless spec.needs_entropy),
    token_row: [M] row index into advantages [n] and rows (n rows). token_ref_logp: [M] reference log-probs, needed
    when spec.kl_coef ≠ 0. Raises ValueError if a needed input is missing.
    """
    dev = token_logp.device
    row = token_row.to(dev)
    logp = token_logp.double()
    per_token = -spec.policy_scale * advantages.to(dev)[row] * logp
    mask = None
    if spec.top_entropy_quantile < 1.0:
        if rows.token_mask is not None:  # from the entropy pre-pass (ties at the threshold stay consistent)
            mask = torch.cat(list(rows.token_mask)).to(dev, torch.float64)
        elif token_h is None:
            raise ValueError("top_entropy_quantile < 1 needs the per-token entropies")
        else:
            mask = (token_h.detach().float() >= rows.threshold.to(dev)[row]).to(torch.float64)
        per_token = per_token * mask
    if spec.kl_coef:
        if token_ref_logp is None:
            raise ValueError("kl_coef > 0 needs the reference log-probs (adapter disabled)")
        kl = kl_k3(logp, token_ref_logp.double().to(dev))
        if spec.kl_bias_correction:
            kl = kl * torch.exp(logp - logp.detach())  # the importance ratio π_θ/π_old: 1, with gradient ∇ℓ
        per_token = per_token + spec.kl_coef * kl
    terms = rows.normaliser.to(dev)[row] * per_token
    if spec.entropy_coef:
        if token_h is None:
            raise ValueError("entropy_coef ≠ 0 needs the per-token entropies")
        bonus = rows.bonus.to(dev)[row] * token_h.double()
        terms = terms - (bonus * mask if mask is not None else bonus)
    return terms


def update_loss(token_logp: torch.Tensor, token_h: torch.Tensor | None, token_row: torch.Tensor,
                advantages: torch.Tensor, rows: RowCoefficients, spec: LossSpec, *,
                token_ref_logp: torch.Tensor | None = None) -> torch.Tensor:
    """L_U's share of one microbatch: a float64 scalar, the sum of `update_loss_token_terms`."""
    return update_loss_token_terms(token_logp, token_h, token_row, advantages, rows, spec,
                                   token_ref_logp=token_ref_logp).sum()


def update_loss_per_sequence(token_logp: torch.Tensor, token_h: torch.Tensor | None, token_row: torch.Tensor,
                             advantages: torch.Tensor, rows: RowCoefficients, spec: LossSpec, *, num_rows: int,
                             token_ref_logp: torch.Tensor | None = None) -> torch.Tensor:
    """Each sequence's share L_i of the loss, [num_rows] float64 (Σ_i L_i = update_loss), differentiable through
    token_logp and token_h: what the per-sequence decomposition of δH₁ differentiates (explain/decompose.py)."""
    terms = update_loss_token_terms(token_logp, token_h, token_row, advantages, rows, spec,
                                    token_ref_logp=token_ref_logp)
    return torch.zeros(num_rows, dtype=terms.dtype, device=terms.device).index_add(0, token_row.to(terms.device),
                                                                                    terms)


def grade_loss_per_sequence(rewards: torch.Tensor, kl: torch.Tensor, *, kl_coef: float, num_rows: int) -> torch.Tensor:
    """GRADE's objective per relaxed rollout (update/grade.py): L_i = (−r_i + β·Σ_t KL_{i,t}) / (B·G).

    rewards: [n] float64 r_φ of each row's relaxed rollout; kl: [n, T] float64 per-step KL(π_θ‖π_ref) at the same
    position; num_rows: B·G of the whole batch U (all ranks), so the rows' shares add up to the batch mean.
    Returns [n] float64, differentiable through both. Raises ValueError if num_rows < 1.
    """
    if num_rows < 1:
        raise ValueError("GRADE's loss needs at least one row")
    return (-rewards.double() + kl_coef * kl.double().sum(dim=-1)) / num_rows
