"""Per-token log-probs ℓ and RB entropies H at temperature τ from hidden states, chunk by chunk.

Logits exist only for scored (response) positions and only one chunk at a time, in float32; with grad, each
chunk is recomputed in backward (activation checkpointing) so no [n, L, V] softmax is ever saved.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from probe_dist.model.logits import LogitTransform

IDENTITY = LogitTransform()


def logp_entropy_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """ℓ_t = log softmax(z/τ)[y_t] and H_t = −Σ_v p_v log p_v, in float32, without materialising log_softmax.

    logits [M, V] (any float dtype), targets [M] long → (ℓ [M], H [M]) float32, nats. A −inf logit (a masked
    token) has p_v = 0 and adds 0 to H (not 0·(−inf) = NaN); ℓ of a −inf target is −inf. The logits are shifted
    by their (detached) row maximum first: ℓ and H are shift-invariant, and at large logits (soft-capped heads
    reach ±30/τ) the shift keeps fp32 cancellation out of ℓ = z_y − logsumexp z and H = logsumexp z − Σ p z.
    """
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return _logp_entropy_no_grad(logits, targets, temperature)
    z = (logits if logits.dtype == torch.float64 else logits.float()) / temperature  # float64 mode stays float64
    z = z - z.max(dim=-1, keepdim=True).values.detach()
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    probs = torch.softmax(z, dim=-1)
    entropy = lse - (probs * z.masked_fill(torch.isneginf(z), 0.0)).sum(-1)
    return logp, entropy


def _logp_entropy_no_grad(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """`logp_entropy_from_logits` without autograd, in fewer passes over [M, V] (the scoring and sweep forwards):
    one shifted, tempered copy z = (x − max x)/τ, e = exp(z), s = Σe; ℓ = z_y − log s and H = log s − (Σ e·z)/s (a fused dot). The same
    formulas; values agree with the autograd path to float rounding. A −inf logit (e = 0) is zeroed in z first,
    so 0·(−inf) does not turn H into NaN; NaN logits still give NaN."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    peak = x.max(dim=-1, keepdim=True).values
    z = torch.add(peak / -temperature, x, alpha=1.0 / temperature)  # (x − max)/τ in one pass; a new tensor
    logp_shifted = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    e = torch.exp(z)
    s = e.sum(dim=-1)
    log_s = torch.log(s)
    dot = _row_dot(e, z)
    if bool(torch.isnan(dot).any()):  # 0·(−inf) from masked tokens (or NaN logits, which stay NaN through s)
        dot = _row_dot(e, z.masked_fill_(torch.isneginf(z), 0.0))
    return logp_shifted - log_s, log_s - dot / s


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[m, v]·b[m, v] for each row m, as a batched matrix product (BLAS: ~2× a fused elementwise dot)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _head_chunk(head: torch.nn.Module, transform: LogitTransform, hidden: torch.Tensor, targets: torch.Tensor,
                temperature: float):
    return logp_entropy_from_logits(transform(_project(head, hidden)), targets, temperature)


def _project(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """head(hidden). Under autocast (update.autocast) as TRL's fused LM head computes it: logits from inputs rounded
    to the autocast dtype and rounded to it themselves, while the backward accumulates ∂/∂hidden in float32 from
    the rounded gradient and weight (an autocast Linear would round ∂/∂hidden to bf16 too: 4e-3 apart)."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type) or not isinstance(head, torch.nn.Linear):
        return head(hidden)
    dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False):
        bias = head.bias.to(dtype).float() if head.bias is not None else None
        return torch.nn.functional.linear(hidden.to(dtype).float(), head.weight.to(dtype).float(), bias).to(dtype)


def chunked_logp_entropy(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *,
                         temperature: float, chunk: int,
                         transform: LogitTransform = IDENTITY) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [M, d] at scored positions, targets [M] → (ℓ [M], H [M]) float32.

    The logits are `transform(head(hidden))`: the model's own post-processing (soft-capping, scaling), so ℓ and H
    are of the distribution the model's forward — and the sampler — uses.

    ℓ and H are in nats at temperature τ > 0; chunk (> 0) rows of logits [chunk, V] exist at a time.
    Raises ValueError if chunk is 0 and RuntimeError (torch.cat) if M is 0.
    """
    logps, ents = [], []
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], targets[start:start + chunk]
        if recompute:
            lp, en = checkpoint(_head_chunk, head, transform, h, y, temperature, use_reentrant=False)
        else:
            lp, en = _head_chunk(head, transform, h, y, temperature)
        logps.append(lp)
        ents.append(en)
    return torch.cat(logps), torch.cat(ents)
