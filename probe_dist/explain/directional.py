"""Exact directional derivatives of the per-token scores along a parameter direction, by forward-mode AD.

For one microbatch and a direction v over the trainable parameters, nested `torch.func.jvp` gives per token

    ℓ, H          at θ                                     (as the scorer)
    ℓ', H'        = d/dε ℓ(θ + εv), H(θ + εv) at ε = 0       (first order)
    ℓ'', H''      = d²/dε² at ε = 0                          (second order, with order=2)

with no parameter-sized gradient and no per-sequence backward: per-row sums of these give every sequence's
directional derivative at once (docs/method.md §10). Forward-mode AD needs attention kernels that implement it;
PyTorch's fused SDPA kernels do not, so these passes run the model's eager attention (the same math) and put the
model's own attention implementation back afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.func import jvp

from probe_dist.model.policy import PolicyModel, unwrap_causal_lm
from probe_dist.rollout.batch import Microbatch
from probe_dist.scoring.chunked import (
    analytic_first_order,
    first_order_head,
    functorch_wrapped,
    second_order_logp_entropy,
)


class ForwardModeUnavailable(RuntimeError):
    """The model (or its wrapping) has an operation without a forward-mode derivative."""


@dataclass(frozen=True)
class TokenDerivatives:
    """Per-token values along one direction: [M] float64 CPU tensors, flat over the scored tokens (row-major)."""

    logp: torch.Tensor
    entropy: torch.Tensor
    d_logp: torch.Tensor
    d_entropy: torch.Tensor
    dd_logp: torch.Tensor | None = None     # second order (order=2 only)
    dd_entropy: torch.Tensor | None = None


@contextmanager
def eager_attention(policy: PolicyModel):
    """Run the causal LM with eager attention inside the block (forward-mode AD), restoring its own after."""
    causal = unwrap_causal_lm(policy.lm)
    config = getattr(causal, "config", None)
    original = getattr(config, "_attn_implementation", None)
    if original in (None, "eager") or not hasattr(causal, "set_attn_implementation"):
        yield
        return
    causal.set_attn_implementation("eager")
    try:
        yield
    finally:
        causal.set_attn_implementation(original)


@contextmanager
def composite_kernels():
    """SiLU, GELU, LayerNorm and RMSNorm as their composite formulas (the same math) during second-order
    forward-mode passes (first order uses the fused kernels: their first-order rules are correct).

    The fused kernels' forward-mode rules are first-order only: nested jvp either fails on them (SiLU, GELU: their
    rules call *_backward kernels without a forward-mode rule) or — LayerNorm in torch 2.13 — silently returns a
    wrong second derivative (measured: relative error 1.9 against finite differences). Composite formulas are
    differentiated op by op, to any order.
    """
    fn = torch.nn.functional
    saved = {name: getattr(fn, name) for name in ("silu", "gelu", "layer_norm", "rms_norm")}

    def composite_silu(x, inplace=False):
        return x * torch.sigmoid(x)

    def composite_gelu(x, approximate="none"):
        if approximate == "tanh":
            return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
        return 0.5 * x * (1.0 + torch.erf(x * 0.7071067811865476))

    def composite_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        dims = tuple(range(-len(normalized_shape), 0))
        mean = x.mean(dim=dims, keepdim=True)
        var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + eps)
        y = y * weight if weight is not None else y
        return y + bias if bias is not None else y

    def composite_rms_norm(x, normalized_shape, weight=None, eps=None):
        dims = tuple(range(-len(normalized_shape), 0))
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        y = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
        return y * weight if weight is not None else y

    fn.silu, fn.gelu = composite_silu, composite_gelu
    fn.layer_norm, fn.rms_norm = composite_layer_norm, composite_rms_norm
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(fn, name, value)


_LINEAR = torch._C._nn.linear  # what torch.nn.functional.linear is


class _Frozen:
    """A frozen weight and bias handed to `_FrozenLinear` as one non-tensor argument, so torch.func does not make
    (and fill) zero tangents for them."""

    __slots__ = ("weight", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias


class _FrozenLinear(torch.autograd.Function):
    """F.linear(x, W, b) for a W and b without tangents: forward mode's rule is ẏ = ẋWᵀ alone. (torch.func.jvp
    hands a linear layer zero tangents for a frozen W and b and multiplies them out: ~4 matmuls where 2 do.)"""

    @staticmethod
    def forward(x, frozen):
        return _LINEAR(x, frozen.weight, frozen.bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.frozen = inputs[1]

    @staticmethod
    def jvp(ctx, d_x, _d_frozen):
        return _LINEAR(d_x, ctx.frozen.weight)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("_FrozenLinear is forward-mode only")


class _TrainableLinear(torch.autograd.Function):
    """F.linear(x, W, b) for a W with a tangent (a LoRA factor) and a frozen or absent b: ẏ = ẋWᵀ + xẆᵀ."""

    @staticmethod
    def forward(x, weight, frozen):
        return _LINEAR(x, weight, frozen.bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_forward(x, weight)

    @staticmethod
    def jvp(ctx, d_x, d_weight, _d_frozen):
        x, weight = ctx.saved_tensors
        return _LINEAR(d_x, weight) + _LINEAR(x, d_weight)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("_TrainableLinear is forward-mode only")


@contextmanager
def frozen_linear_rule():
    """Inside the block (a first-order torch.func.jvp), linear layers on the transform's tensors use rules that
    multiply only real tangents: `_FrozenLinear` for a frozen weight and bias (plain tensors, not the transform's
    dual ones), `_TrainableLinear` for a weight with a tangent and a frozen or absent bias; anything else keeps
    torch's rule. Not for nested jvp (the rules are not themselves differentiated)."""
    fn = torch.nn.functional
    original = fn.linear

    def linear(x, weight, bias=None):
        if (bias is not None and functorch_wrapped(bias)) or not functorch_wrapped(x):
            return original(x, weight, bias)
        if functorch_wrapped(weight):
            return _TrainableLinear.apply(x, weight, _Frozen(None, bias))
        return _FrozenLinear.apply(x, _Frozen(weight, bias))

    fn.linear = linear
    try:
        yield
    finally:
        fn.linear = original


def _head_second_order(policy: PolicyModel, h: torch.Tensor, d_h: torch.Tensor, dd_h: torch.Tensor,
                       targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, ...]:
    """(ℓ, H, ℓ', H', ℓ'', H'') [M] from the scored hidden states h [M, d] and their first and second derivatives
    along the path, through a frozen head and the model's logit transform, `policy.logits_chunk` rows at a time.

    A plain linear head without a transform: the logits' derivatives are ḣWᵀ and ḧWᵀ (the head is linear and
    frozen). Otherwise x(ε) = transform(head(h + εḣ + ½ε²ḧ)) — the same path to second order — differentiated
    twice in ε by nested jvp."""
    head, transform = policy.head, policy.logit_transform
    linear = isinstance(head, torch.nn.Linear) and transform.is_identity
    parts = []
    for start in range(0, h.shape[0], policy.logits_chunk):
        hc, dhc, ddhc = (t[start:start + policy.logits_chunk] for t in (h, d_h, dd_h))
        if linear:
            x, dx, ddx = head(hc), _LINEAR(dhc, head.weight), _LINEAR(ddhc, head.weight)
        else:
            def logits(eps, hc=hc, dhc=dhc, ddhc=ddhc):
                return transform(head(hc + eps * dhc + (0.5 * eps * eps) * ddhc))

            def first(eps):
                return jvp(logits, (eps,), (torch.ones_like(eps),))

            eps = torch.zeros((), dtype=hc.dtype, device=hc.device)
            with composite_kernels():
                (x, dx), (_, ddx) = jvp(first, (eps,), (torch.ones_like(eps),))
        parts.append(second_order_logp_entropy(x, dx, ddx, targets[start:start + policy.logits_chunk], temperature))
    return tuple(torch.cat(column) for column in zip(*parts))


def parameter_names(policy: PolicyModel, trainable: list[tuple[str, torch.nn.Parameter]]) -> list[str]:
    """The name under `policy` of each trainable parameter (optimizer order). Raises ForwardModeUnavailable when
    a trainable parameter is not a plain parameter of the policy (e.g. sharded by FSDP2)."""
    by_id = {id(p): n for n, p in policy.named_parameters()}
    names = [by_id.get(id(p)) for _, p in trainable]
    if any(n is None for n in names):
        raise ForwardModeUnavailable("the trainable parameters are not the policy's own tensors (sharded model)")
    return names


def _slot(root: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """(owning module, attribute) of the parameter called `name` under `root`."""
    path, _, leaf = name.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def token_derivatives(policy: PolicyModel, names: list[str], trainable: list[tuple[str, torch.nn.Parameter]],
                      mb: Microbatch, direction: list[torch.Tensor], *, device: torch.device, temperature: float,
                      order: int = 1) -> TokenDerivatives:
    """ℓ, H and their first (order=1) or first and second (order=2) derivatives along `direction` for `mb`.

    direction: tensors shaped like the trainable parameters (any dtype; cast to each parameter's dtype);
    names: `parameter_names(policy, trainable)`. Runs without building a backward graph. Call inside
    `eager_attention(policy)`. Raises ForwardModeUnavailable when an operation has no forward-mode rule.
    """
    primals = tuple(p.detach() for _, p in trainable)
    tangents = tuple(v.to(device=p.device, dtype=p.dtype) for (_, p), v in zip(trainable, direction))
    args = (mb.input_ids.to(device), mb.attention_mask.to(device), mb.response_start,
            mb.response_mask.to(device), temperature)

    slots = [_slot(policy, name) for name in names]

    def swapped(call, values):
        # The parameters are swapped in place and the original Parameter objects put back in `finally`:
        # torch.func.functional_call under nested jvp left functorch wrapper tensors in the module (measured,
        # torch 2.13), which would detach the optimizer's parameters from the model.
        saved = [module._parameters[leaf] for module, leaf in slots]
        try:
            for (module, leaf), value in zip(slots, values):
                module._parameters[leaf] = value
            return call()
        finally:
            for (module, leaf), original in zip(slots, saved):
                module._parameters[leaf] = original

    def scores(*values):
        return swapped(lambda: policy(*args), values)

    def first(*values):
        return jvp(scores, values, tangents)

    trainable_ids = {id(p) for _, p in trainable}
    frozen_head = not any(id(p) in trainable_ids for p in policy.head.parameters())
    def body(*values):  # the scored hidden states (the body's output at the response positions)
        return swapped(lambda: policy.scored_hidden(*args[:4])[0], values)

    plain_head = (frozen_head and isinstance(policy.head, torch.nn.Linear) and policy.logit_transform.is_identity
                  and policy.head.weight.dtype in (torch.float32, torch.float64))
    try:
        if order == 1 and plain_head:  # the body by forward mode, the head and softmax in closed form
            with torch.no_grad(), analytic_first_order(), frozen_linear_rule():
                h, d_h = jvp(body, primals, tangents)
                targets = policy.scored_targets(args[0], args[2], args[3])
                logp, ent, d_logp, d_ent = first_order_head(policy.head, h, d_h.to(h.dtype), targets,
                                                            temperature=temperature, chunk=policy.logits_chunk)
            dd_logp = dd_ent = None
        elif order == 1:  # the fused kernels' first-order rules hold; ℓ/H's tangents in closed form
            with torch.no_grad(), analytic_first_order(), frozen_linear_rule():
                (logp, ent), (d_logp, d_ent) = first(*primals)
            dd_logp = dd_ent = None
        elif frozen_head:  # the body by nested jvp; the head and the softmax in closed form
            def first_hidden(*values):
                return jvp(body, values, tangents)

            with torch.no_grad(), composite_kernels():
                (h, d_h), (_, dd_h) = jvp(first_hidden, primals, tangents)
            targets = policy.scored_targets(args[0], args[2], args[3])
            with torch.no_grad():
                logp, ent, d_logp, d_ent, dd_logp, dd_ent = _head_second_order(policy, h, d_h, dd_h, targets,
                                                                                temperature)
        else:  # a trainable head (LoRA on lm_head): everything by nested jvp
            with torch.no_grad(), composite_kernels():
                ((logp, ent), (d_logp, d_ent)), (_, (dd_logp, dd_ent)) = jvp(first, primals, tangents)
    except (NotImplementedError, RuntimeError) as err:
        if "forward AD" in str(err) or "forward-mode" in str(err) or "jvp" in str(err).lower():
            raise ForwardModeUnavailable(str(err).splitlines()[0]) from err
        raise

    def cpu(x):
        return None if x is None else x.detach().to("cpu", torch.float64)

    return TokenDerivatives(logp=cpu(logp), entropy=cpu(ent), d_logp=cpu(d_logp), d_entropy=cpu(d_ent),
                            dd_logp=cpu(dd_logp), dd_entropy=cpu(dd_ent))
