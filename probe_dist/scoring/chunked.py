"""Per-token log-probs ℓ and RB entropies H at temperature τ from hidden states, chunk by chunk.

Logits exist only for scored (response) positions and only one chunk at a time, in float32; with grad, each
chunk is recomputed in backward (activation checkpointing) so no [n, L, V] softmax is ever saved.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def logp_entropy_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """ℓ_t = log softmax(z/τ)[y_t] and H_t = −Σ_v p_v log p_v, in float32, without materialising log_softmax."""
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    probs = torch.softmax(z, dim=-1)
    entropy = lse - (probs * z).sum(-1)
    return logp, entropy


def _head_chunk(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float):
    return logp_entropy_from_logits(head(hidden), targets, temperature)


def chunked_logp_entropy(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *,
                         temperature: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [M, d] at scored positions, targets [M] → (ℓ [M], H [M]) float32.

    ℓ and H are in nats at temperature τ > 0; chunk (> 0) rows of logits [chunk, V] exist at a time.
    Raises ValueError if chunk is 0 and RuntimeError (torch.cat) if M is 0.
    """
    logps, ents = [], []
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], targets[start:start + chunk]
        if recompute:
            lp, en = checkpoint(_head_chunk, head, h, y, temperature, use_reentrant=False)
        else:
            lp, en = _head_chunk(head, h, y, temperature)
        logps.append(lp)
        ents.append(en)
    return torch.cat(logps), torch.cat(ents)
