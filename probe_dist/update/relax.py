"""The relaxed (Gumbel-softmax) token of GRADE as pure tensor functions (docs/method.md §4.2).

    y_t = softmax((z_t + g_t) / τ_g)          z_t: the policy's logits / τ at step t, g_t: Gumbel(0, 1) noise

restricted to the top-k entries of z_t (k = V: the full relaxation, bit for bit), a straight-through variant
(forward: the one-hot of argmax y_t; backward: ∂y_t), the soft embedding e_t = y_tᵀE, and the per-step
KL(π_θ‖π_ref) over the whole vocabulary. Sources: Jang, Gu & Poole 2017 (Gumbel-softmax, straight-through);
Maddison, Mnih & Teh 2017 (Concrete); GRADE (pathwise policy optimisation through a relaxed rollout).

The noise is counter-based: g[key, t, v] is a hash of (the response's 63-bit stream key, step t, token id v), so a
response's noise is the same whatever the batch it is drawn in, the rows next to it, the world size or k, and the
backward recomputation of a checkpointed step draws the same values without any generator state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for int64 x in [0, 2³²) without int64 overflow (c split into 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The `lowbias32` integer finaliser (C. Wellons, "Prospecting for hash functions"): [0, 2³²) → [0, 2³²)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(keys: torch.Tensor, step: int, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), float64, one per (row key, step, token id): a pure function of the three.

    keys: [n] int64 stream keys in [0, 2⁶³) (`rollout.generate.response_seed`); token_ids: [n, k] int64.
    Returns [n, k] float64 (u + ½)/2³² with u a 32-bit hash — never 0 or 1, so −log(−log u) is finite.
    """
    k = keys.to(torch.int64).unsqueeze(1)
    lo, hi = k & _MASK32, (k >> 32) & _MASK32
    h = _hash32(_hash32(_hash32(lo ^ _hash32(hi)) ^ (step & _MASK32)) ^ token_ids.to(torch.int64) & _MASK32)
    return (h.to(torch.float64) + 0.5) / 4294967296.0


def gumbel_noise(keys: torch.Tensor, step: int, token_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gumbel(0, 1) noise −log(−log u) for each (row key, step, token id), [n, k] in `dtype` (see counter_uniform)."""
    u = counter_uniform(keys, step, token_ids)
    return (-torch.log(-torch.log(u))).to(dtype)


@dataclass
class SoftToken:
    """One relaxed token per row, kept sparse: weights [n, k] (float, differentiable) on ids [n, k] (long, sorted
    ascending within a row). `hard` [n] long: the id with the largest weight (what the relaxation rounds to)."""

    weights: torch.Tensor
    ids: torch.Tensor
    hard: torch.Tensor

    def dense(self, vocab: int) -> torch.Tensor:
        """[n, V] with the weights scattered at their ids (for tests and the dense reference)."""
        return torch.zeros(self.weights.shape[0], vocab, dtype=self.weights.dtype,
                           device=self.weights.device).scatter(1, self.ids, self.weights)


def relaxed_token(z: torch.Tensor, keys: torch.Tensor, step: int, *, tau_g: float, top_k: int,
                  straight_through: bool = False) -> SoftToken:
    """GRADE's relaxed token at one step: softmax((z + g)/τ_g) over the top-k entries of z.

    z: [n, V] logits (already divided by the sampling temperature); keys: [n] int64 stream keys; top_k: 0 or ≥ V
    means the whole vocabulary. The kept ids are sorted ascending, so with k = V the result equals
    `gumbel_softmax_dense` under the same noise bit for bit. straight_through: the forward value is the one-hot of
    the largest entry and the gradient that of the soft weights (Jang et al. 2017, §2.2).
    Raises ValueError for τ_g ≤ 0.
    """
    if not tau_g > 0:
        raise ValueError(f"the Gumbel-softmax temperature must be > 0, got {tau_g}")
    vocab = z.shape[-1]
    if top_k and top_k < vocab:
        ids = torch.topk(z.detach(), top_k, dim=-1).indices.sort(dim=-1).values
        logits = z.gather(1, ids)
    else:
        ids = torch.arange(vocab, device=z.device).unsqueeze(0).expand(z.shape[0], -1)
        logits = z
    soft = torch.softmax((logits + gumbel_noise(keys, step, ids, z.dtype)) / tau_g, dim=-1)
    best = soft.detach().argmax(dim=-1, keepdim=True)
    hard = ids.gather(1, best).squeeze(1)
    if straight_through:
        one_hot = torch.zeros_like(soft).scatter(1, best, 1.0)
        soft = one_hot + soft - soft.detach()
    return SoftToken(weights=soft, ids=ids, hard=hard)


def gumbel_softmax_dense(z: torch.Tensor, keys: torch.Tensor, step: int, *, tau_g: float) -> torch.Tensor:
    """The full-vocabulary Gumbel-softmax softmax((z + g)/τ_g), [n, V]: the reference `relaxed_token` reproduces."""
    ids = torch.arange(z.shape[-1], device=z.device).unsqueeze(0).expand(z.shape[0], -1)
    return torch.softmax((z + gumbel_noise(keys, step, ids, z.dtype)) / tau_g, dim=-1)


REWARD_INPUTS = ("auto", "sparse", "dense")


def soft_embedding(token: SoftToken, embedding: torch.Tensor, how: str = "auto") -> torch.Tensor:
    """e = yᵀE for each row: [n, H] in E's dtype, differentiable through the weights (and E if it requires grad).

    sparse: `F.embedding_bag` with per-sample weights over the k kept ids — never materialises [n, k, H] nor
    [n, V]; dense: the [n, V] soft token times E. auto: sparse when k < V, dense when the token covers the whole
    vocabulary (same bytes, one matmul). embedding: [V, H]. Raises ValueError for an unknown `how`.
    """
    if how not in REWARD_INPUTS:
        raise ValueError(f"soft embedding mode must be one of {REWARD_INPUTS}, got {how!r}")
    vocab = embedding.shape[0]
    k = token.ids.shape[-1]
    if how == "dense" or (how == "auto" and k >= vocab):
        return token.dense(vocab).to(embedding.dtype) @ embedding
    return F.embedding_bag(token.ids, embedding, per_sample_weights=token.weights.to(embedding.dtype), mode="sum")


def token_kl(z_policy: torch.Tensor, z_ref: torch.Tensor) -> torch.Tensor:
    """KL(π_θ‖π_ref) = Σ_v p_v (log p_v − log q_v) for each row, from the two [n, V] logits of the SAME position:
    [n] float64. Exactly 0 when the logits are equal bit for bit."""
    logp = torch.log_softmax(z_policy.double(), dim=-1)
    logq = torch.log_softmax(z_ref.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(dim=-1)
