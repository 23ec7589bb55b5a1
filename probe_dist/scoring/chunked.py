"""Per-token log-probs ℓ and RB entropies H at temperature τ from hidden states, chunk by chunk.

Logits exist only for scored (response) positions and only one chunk at a time, in float32; with grad, each
chunk is recomputed in backward (activation checkpointing) so no [n, L, V] softmax is ever saved.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

from probe_dist.model.logits import LogitTransform

IDENTITY = LogitTransform()
ROW_BLOCK_BYTES = 1 << 20  # rows of logits per elementwise block on CPU (`_no_grad_chunks`)


def logp_entropy_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float, *,
                             overwrite: bool = False):
    """ℓ_t = log softmax(z/τ)[y_t] and H_t = −Σ_v p_v log p_v, in float32, without materialising log_softmax.

    logits [M, V] (any float dtype), targets [M] long → (ℓ [M], H [M]) float32 (float64 for float64 logits), nats. A −inf logit (a masked
    token) has p_v = 0 and adds 0 to H (not 0·(−inf) = NaN); ℓ of a −inf target is −inf. The logits are shifted
    by their (detached) row maximum first: ℓ and H are shift-invariant, and at large logits (soft-capped heads
    reach ±30/τ) the shift keeps fp32 cancellation out of ℓ = z_y − logsumexp z and H = logsumexp z − Σ p z.
    overwrite: without autograd, the caller's float32/float64 logits may be overwritten (a buffer it no longer
    needs), saving one [M, V] allocation.
    """
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return _logp_entropy_no_grad(logits, targets, temperature, overwrite=overwrite)
    z = (logits if logits.dtype == torch.float64 else logits.float()) / temperature  # float64 mode stays float64
    z = z - z.amax(dim=-1, keepdim=True).detach()
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    probs = torch.softmax(z, dim=-1)
    entropy = lse - (probs * z.masked_fill(torch.isneginf(z), 0.0)).sum(-1)
    return logp, entropy


def _logp_entropy_no_grad(logits: torch.Tensor, targets: torch.Tensor, temperature: float, *,
                          overwrite: bool = False):
    """`logp_entropy_from_logits` without autograd, in fewer passes over [M, V] (the scoring and sweep forwards):
    one shifted, tempered copy z = (x − max x)/τ, e = exp(z), s = Σe; ℓ = z_y − log s and H = log s − (Σ e·z)/s
    (a fused dot). The same formulas; values agree with the autograd path to float rounding. A −inf logit (e = 0)
    is zeroed in z first, so 0·(−inf) does not turn H into NaN; NaN logits still give NaN.

    Under forward-mode AD (`torch.func.jvp`, first order: `analytic_first_order`) the tangents come from the
    closed forms of `_LogpEntropy.jvp` instead of differentiating these passes op by op."""
    if _ANALYTIC_JVP[0]:
        logp, entropy, *_ = _LogpEntropy.apply(logits, targets, temperature)
        return logp, entropy
    logp, entropy, *_ = _logp_entropy_parts(logits, targets, temperature, overwrite=overwrite)
    return logp, entropy


def _logp_entropy_parts(logits: torch.Tensor, targets: torch.Tensor, temperature: float, *,
                        overwrite: bool = False, exp_out: torch.Tensor | None = None,
                        scratch: torch.Tensor | None = None):
    """(ℓ [M], H [M], e [M, V], z [M, V], s [M], Σ_v p_v z_v [M]) of `_logp_entropy_no_grad`. With `overwrite`
    (or when the float32 upcast made a copy anyway) z is written over the logits' buffer: one [M, V] allocation
    fewer. exp_out, scratch: plain buffers of z's dtype for e ([M, V]) and the row dots' products (`_row_dot`),
    which the no-grad chunk loop allocates once."""
    x = logits if logits.dtype in (torch.float64, torch.float32) else logits.float()
    peak = x.amax(dim=-1, keepdim=True)  # amax: no argmax (max(dim) computes one: 2x the pass)
    # out= has no forward-mode rule: write in place only into a plain tensor (not one torch.func.jvp wraps)
    into = x if (overwrite or x is not logits) and not functorch_wrapped(x) else None
    z = torch.add(peak / -temperature, x, alpha=1.0 / temperature, out=into)  # (x − max)/τ in one pass
    logp_shifted = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    e = torch.exp(z, out=exp_out) if exp_out is not None and not functorch_wrapped(z) else torch.exp(z)
    s = e.sum(dim=-1)
    log_s = torch.log(s)
    dot = _row_dot(e, z, scratch=scratch)
    if bool(torch.isnan(dot).any()):  # 0·(−inf) from masked tokens (or NaN logits, which stay NaN through s)
        z.masked_fill_(torch.isneginf(z), 0.0)
        dot = _row_dot(e, z, scratch=scratch)
    mean_z = dot / s
    return logp_shifted - log_s, log_s - mean_z, e, z, s, mean_z


_ANALYTIC_JVP = [False]


def functorch_wrapped(t: torch.Tensor) -> bool:
    """Whether `t` carries torch.func transform levels (a jvp's dual tensor)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


@contextmanager
def analytic_first_order():
    """Inside the block, first-order forward-mode AD through the no-grad ℓ/H uses the closed-form tangents of
    `_LogpEntropy` (two row dots over [M, V] instead of differentiating every pass). Not for nested (second-order)
    jvp: the closed forms are not themselves differentiated."""
    previous = _ANALYTIC_JVP[0]
    _ANALYTIC_JVP[0] = True
    try:
        yield
    finally:
        _ANALYTIC_JVP[0] = previous


class _LogpEntropy(torch.autograd.Function):
    """(ℓ, H) from logits with a closed-form forward-mode rule. With z = x/τ, p = softmax(z) and a tangent ż:

        ℓ̇ = ż_y − Σ_v p_v ż_v,        Ḣ = −Σ_v p_v (z_v − Σ_u p_u z_u) ż_v

    (H = −Σ p log p, ṗ = p(ż − Σ p ż), log p = z − logsumexp z; the logsumexp terms cancel). The shift by max x
    changes neither. e, z, s and Σ p z ride along as non-differentiable outputs so the rule reuses them."""

    @staticmethod
    def forward(logits, targets, temperature):
        return _logp_entropy_parts(logits, targets, temperature)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, targets, temperature = inputs
        _, _, e, z, s, mean_z = output
        ctx.mark_non_differentiable(e, z, s, mean_z)
        ctx.save_for_forward(e, z, s, mean_z, targets)
        ctx.temperature = temperature

    @staticmethod
    def jvp(ctx, d_logits, _d_targets, _d_temperature):
        e, z, s, mean_z, targets = ctx.saved_tensors
        dz = (d_logits if d_logits.dtype == z.dtype else d_logits.to(z.dtype)) / ctx.temperature
        mean_dz = _row_dot(e, dz) / s                     # Σ p ż
        # Ḣ = −Σ p (z − Σ p z) ż: centred first (uncentred, E[zż] − E[z]E[ż] cancels in float32)
        d_entropy = -_row_dot(torch.sub(z, mean_z.unsqueeze(-1)).mul_(e), dz) / s
        d_logp = dz.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - mean_dz
        return d_logp, d_entropy, None, None, None, None

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("_LogpEntropy is forward-mode only (reverse mode uses logp_entropy_from_logits' graph)")


def second_order_logp_entropy(logits: torch.Tensor, d_logits: torch.Tensor, dd_logits: torch.Tensor,
                              targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, ...]:
    """ℓ, H and their first and second derivatives along a path, from the logits' own: logits x(ε) at ε = 0 with
    ẋ = d_logits and ẍ = dd_logits (all [M, V], any float dtype), targets [M] long → (ℓ, H, ℓ', H', ℓ'', H'')
    [M] float32 (float64 for float64 logits), nats per unit ε and ε².

    With z = x/τ, p = softmax(z), E the mean under p, c = z − E[z] and d = ż − E[ż] (centred: no cancellation
    of uncentred moments in float32):

        ℓ'  = ż_y − E[ż]                     H'  = −E[c·d]
        ℓ'' = z̈_y − E[z̈] − E[d²]             H'' = −E[(1 + c)·d²] − E[c·z̈]

    (ṗ = p·d; d/dε E[f] = E[ḟ] + E[f·d]; for H = log Σe^z − E[z]). The closed forms replace differentiating
    the softmax twice op by op (nested forward mode: ~4× the [M, V] passes). A −inf logit (p = 0) adds nothing.
    """
    x = logits if logits.dtype in (torch.float64, torch.float32) else logits.float()
    dz = (d_logits.to(x.dtype) if d_logits.dtype != x.dtype else d_logits.clone()).div_(temperature)
    ddz = (dd_logits.to(x.dtype) if dd_logits.dtype != x.dtype else dd_logits.clone()).div_(temperature)
    peak = x.amax(dim=-1, keepdim=True)  # amax: no argmax (max(dim) computes one: 2x the pass)
    z = torch.add(peak / -temperature, x, alpha=1.0 / temperature)
    col = targets.unsqueeze(-1)
    z_y, dz_y, ddz_y = (t.gather(-1, col).squeeze(-1) for t in (z, dz, ddz))
    e = torch.exp(z)
    z.masked_fill_(e == 0, 0.0)  # p = 0: no contribution (and no 0·(−inf))
    s = e.sum(dim=-1)
    mean_z = _row_dot(e, z) / s
    mean_dz = _row_dot(e, dz) / s
    c = z.sub_(mean_z.unsqueeze(-1))
    d = dz.sub_(mean_dz.unsqueeze(-1))
    ec = c.mul_(e)                                     # e·c (c itself is not needed again)
    d_entropy = -_row_dot(ec, d) / s
    d2 = d.mul_(d)
    var_dz = _row_dot(e, d2) / s
    dd_logp = ddz_y - _row_dot(e, ddz) / s - var_dz
    dd_entropy = -var_dz - (_row_dot(ec, d2) + _row_dot(ec, ddz)) / s
    log_s = torch.log(s)
    return z_y - log_s, log_s - mean_z, dz_y - mean_dz, d_entropy, dd_logp, dd_entropy


def _row_dot(a: torch.Tensor, b: torch.Tensor, block: int = 32, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_v a[m, v]·b[m, v] for each row m ([M, V] → [M]).

    On CPU a product, then a row sum, `block` rows at a time through one small scratch buffer: 3.4× faster than a
    batched matrix product [M, 1, V] × [M, V, 1] (bmm runs M dot products as tiny GEMVs; measured 25 ms against
    7.4 ms at M = 256, V = 32768, one thread) and more precise (pairwise sums: at those sizes 1e-4 from the float64
    value where bmm was 2e-3 off). Tensors a transform or autograd tracks take the same two ops without the
    buffer (the same values: each row's sum is its own reduction). On an accelerator, the batched product.
    scratch: a buffer of at least min(block, M) × V elements of the result dtype to use instead of a fresh one."""
    if a.device.type != "cpu":
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
    if a.requires_grad or b.requires_grad or functorch_wrapped(a) or functorch_wrapped(b):
        return (a * b).sum(dim=-1)
    rows = a.shape[0]
    dtype = torch.promote_types(a.dtype, b.dtype)
    out = torch.empty(rows, dtype=dtype)
    if scratch is None or scratch.dtype != dtype or scratch.numel() < min(block, rows) * a.shape[1]:
        scratch = torch.empty(min(block, rows), a.shape[1], dtype=dtype)
    else:
        scratch = scratch.view(-1)[:min(block, rows) * a.shape[1]].view(min(block, rows), a.shape[1])
    for start in range(0, rows, block):
        n = min(block, rows - start)
        torch.sum(torch.mul(a[start:start + n], b[start:start + n], out=scratch[:n]), dim=-1, out=out[start:start + n])
    return out


def _head_chunk(head: torch.nn.Module, transform: LogitTransform, hidden: torch.Tensor, targets: torch.Tensor,
                temperature: float):
    # The logits are this chunk's own fresh tensor: the no-grad path may overwrite them.
    return logp_entropy_from_logits(transform(_project(head, hidden)), targets, temperature,
                                    overwrite=not _ANALYTIC_JVP[0])


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
    if _closed_form_head(head, transform, hidden):
        return _FrozenHeadLogpEntropy.apply(hidden, targets, head, temperature, chunk)
    if _reusable_buffers(head, transform, hidden):
        return _no_grad_chunks(head, hidden, targets, temperature, chunk)
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


def _reusable_buffers(head: torch.nn.Module, transform: LogitTransform, hidden: torch.Tensor) -> bool:
    """Whether a no-grad pass can take `_no_grad_chunks`: no autograd, no torch.func transform, no analytic jvp
    rule, a plain float32/float64 linear head of hidden's dtype, no logit transform, no autocast."""
    if not isinstance(head, torch.nn.Linear) or _ANALYTIC_JVP[0] or not transform.is_identity:
        return False
    tracked = hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    return (not (torch.is_grad_enabled() and tracked) and not functorch_wrapped(hidden)
            and not functorch_wrapped(head.weight) and hidden.dtype in (torch.float32, torch.float64) and head.weight.dtype == hidden.dtype
            and not torch.is_autocast_enabled(hidden.device.type))


def _linear_into(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight, bias) written into `out` (the same mm/addmm kernel F.linear runs for a 2-D input)."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _row_blocks(hidden: torch.Tensor, vocab: int, rows: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(rows per elementwise block, its e = exp(z) buffer [sub, V], `_row_dot`'s scratch) for a chunk loop over
    `rows` rows of logits: on CPU ~1 MiB of rows (the passes stay in cache, where a chunk's [chunk, V] would stream
    from memory once per pass; the product stays one GEMM per chunk), elsewhere the whole chunk."""
    sub = max(1, min(rows, ROW_BLOCK_BYTES // (vocab * hidden.element_size()))) if hidden.device.type == "cpu" else rows
    kw = {"dtype": hidden.dtype, "device": hidden.device}
    return sub, torch.empty(sub, vocab, **kw), torch.empty(min(sub, 32), vocab, **kw)


def _no_grad_chunks(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                    chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The no-grad chunk loop of `chunked_logp_entropy` through two [chunk, V] buffers allocated once per call: the
    logits (written by the head's product, then overwritten by z) and e = exp(z). The same kernels and formulas as
    a fresh tensor per chunk (values bit for bit equal; tested); on CPU a fresh [chunk, V] tensor is a fresh
    mapping whose every page faults on first touch, which cost scoring ~15 % of a plain forward."""
    rows = hidden.shape[0]
    if rows == 0:
        raise RuntimeError("chunked_logp_entropy: no scored positions (M = 0)")
    weight, bias = head.weight, head.bias
    vocab, kw = weight.shape[0], {"dtype": hidden.dtype, "device": hidden.device}
    logits_buf = torch.empty(min(chunk, rows), vocab, **kw)
    sub, exp_buf, scratch = _row_blocks(hidden, vocab, min(chunk, rows))
    logps, ents = torch.empty(rows, **kw), torch.empty(rows, **kw)
    for start in range(0, rows, chunk):
        m = min(chunk, rows - start)
        x = _linear_into(hidden[start:start + m], weight, bias, logits_buf[:m])
        for first in range(0, m, sub):
            k = min(sub, m - first)
            at = slice(start + first, start + first + k)
            logps[at], ents[at], *_ = _logp_entropy_parts(x[first:first + k], targets[at], temperature,
                                                          overwrite=True, exp_out=exp_buf[:k], scratch=scratch)
    return logps, ents


def first_order_head(head: torch.nn.Linear, hidden: torch.Tensor, d_hidden: torch.Tensor, targets: torch.Tensor, *,
                     temperature: float, chunk: int) -> tuple[torch.Tensor, ...]:
    """(ℓ, H, ℓ̇, Ḣ) [M] through a frozen plain linear head from the scored hidden states h [M, d] and their tangent
    ḣ [M, d] (float32 or float64, the head's dtype), targets [M] long; nats, and nats per unit of the tangent.

    The closed forms of `_LogpEntropy.jvp` with x = hWᵀ + b, ẋ = ḣWᵀ and z = x/τ, p = softmax(z):
    ℓ̇ = (ẋ_y − Σ_v p_v ẋ_v)/τ and Ḣ = −Σ_v p_v (z_v − Σ_u p_u z_u) ẋ_v/τ (centred first, as there), computed
    `chunk` rows of logits at a time through reused buffers, the passes over them in ~1 MiB row blocks on CPU (as
    `_no_grad_chunks`): what forward-mode AD through the head computes, without its [M, V] temporaries (the
    tangent's division by τ, the centred copy) streaming through memory. Values agree with it to float rounding.
    Raises RuntimeError when M is 0."""
    rows = hidden.shape[0]
    if rows == 0:
        raise RuntimeError("first_order_head: no scored positions (M = 0)")
    weight, bias = head.weight, head.bias
    vocab, kw = weight.shape[0], {"dtype": hidden.dtype, "device": hidden.device}
    x_buf, dx_buf = torch.empty(min(chunk, rows), vocab, **kw), torch.empty(min(chunk, rows), vocab, **kw)
    sub, exp_buf, scratch = _row_blocks(hidden, vocab, min(chunk, rows))
    out = [torch.empty(rows, **kw) for _ in range(4)]
    for start in range(0, rows, chunk):
        m = min(chunk, rows - start)
        x, dx = x_buf[:m], dx_buf[:m]
        _linear_into(hidden[start:start + m], weight, bias, x)
        torch.mm(d_hidden[start:start + m], weight.t(), out=dx)
        for first in range(0, m, sub):
            k = min(sub, m - first)
            at = slice(start + first, start + first + k)
            y = targets[at].unsqueeze(-1)
            logp, ent, e, z, s, mean_z = _logp_entropy_parts(x[first:first + k], targets[at], temperature,
                                                             overwrite=True, exp_out=exp_buf[:k], scratch=scratch)
            dxb = dx[first:first + k]
            mean_dx = _row_dot(e, dxb, scratch=scratch) / s
            c = z.sub_(mean_z.unsqueeze(-1)).mul_(e)  # e·(z − Σpz): z is not needed again
            out[0][at], out[1][at] = logp, ent
            out[2][at] = (dxb.gather(-1, y).squeeze(-1) - mean_dx) / temperature
            out[3][at] = -_row_dot(c, dxb, scratch=scratch) / s / temperature
    return tuple(out)


def _closed_form_head(head: torch.nn.Module, transform: LogitTransform, hidden: torch.Tensor) -> bool:
    """Whether a pass with grad can take `_FrozenHeadLogpEntropy`: a frozen plain linear head, no logit transform,
    no autocast (TRL's rounding is `_project`'s), hidden a tensor autograd tracks (not a torch.func transform's)."""
    return (torch.is_grad_enabled() and hidden.requires_grad and not functorch_wrapped(hidden)
            and isinstance(head, torch.nn.Linear) and transform.is_identity
            and not any(p.requires_grad for p in head.parameters())
            and not torch.is_autocast_enabled(hidden.device.type))


class _FrozenHeadLogpEntropy(torch.autograd.Function):
    """(ℓ, H) [M] of hidden [M, d] through a frozen linear head, chunk rows at a time, with the backward in closed
    form: for a token with z = x/τ and p = softmax(z),

        ∂ℓ/∂z = onehot(y) − p,        ∂H/∂z = −p ⊙ (z − Σ_v p_v z_v)

    so ∂/∂hidden = (g_ℓ·∂ℓ/∂z + g_H·∂H/∂z)/τ · W, recomputing each chunk's logits in backward (nothing [M, V] is
    saved, as with activation checkpointing) instead of differentiating the softmax pass by pass. The values are
    the no-grad scorer's (`_logp_entropy_no_grad`). The head's weight is read from the module in backward, as a
    checkpoint's recomputation would (FSDP2 has unsharded it again by then)."""

    @staticmethod
    def forward(ctx, hidden, targets, head, temperature, chunk):
        ctx.save_for_backward(hidden, targets)
        ctx.head, ctx.temperature, ctx.chunk = head, temperature, chunk
        with torch.no_grad():  # the no-grad scorer's own chunk loop
            return chunked_logp_entropy(head, hidden, targets, temperature=temperature, chunk=chunk)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the closed form is not itself differentiated: refuse, not wrong
    def backward(ctx, grad_logp, grad_entropy):
        hidden, targets = ctx.saved_tensors
        head, temperature, chunk = ctx.head, ctx.temperature, ctx.chunk
        grad_hidden = torch.empty_like(hidden)
        with torch.no_grad():
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                x = head(hidden[rows])
                _, _, e, z, s, mean_z = _logp_entropy_parts(x, targets[rows], temperature, overwrite=True)
                g_l = grad_logp[rows].to(z.dtype) if grad_logp is not None else torch.zeros_like(s)
                g_h = grad_entropy[rows].to(z.dtype) if grad_entropy is not None else torch.zeros_like(s)
                z.masked_fill_(e == 0, 0.0)  # p = 0 (a −inf logit): no gradient, and no 0·(−inf)
                # g_z = g_ℓ (onehot − p) − g_H p (z − z̄) = −p ⊙ (g_ℓ + g_H (z − z̄)) + g_ℓ onehot, written over z
                g_z = z.sub_(mean_z.unsqueeze(-1)).mul_(g_h.unsqueeze(-1)).add_(g_l.unsqueeze(-1))
                g_z.mul_(e).div_(-s.unsqueeze(-1))
                g_z.scatter_add_(-1, targets[rows].unsqueeze(-1), g_l.unsqueeze(-1))
                g_x = g_z.div_(temperature).to(head.weight.dtype)
                grad_hidden[rows] = (g_x @ head.weight).to(hidden.dtype)
        return grad_hidden, None, None, None, None
