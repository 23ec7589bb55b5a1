"""docs/method.md §5.4: δH₁ by per-microbatch backward of the surrogate (what the probe does) equals the forward-mode JVP
of the §6 estimator along u on the same samples."""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, jvp

from probe_dist.model.policy import unwrap_causal_lm
from tests.probe_harness import make_probe
from tests.tolerances import fp_bound


def two_path_bound(err32: float, scale: float) -> float:
    """|a − b| for two float32 evaluations a, b of one quantity by different code paths (kernels, batch layout).

    err32 = |x₃₂ − x₆₄| is the measured error of one float32 evaluation against the same computation in float64:
    eps₃₂ times this computation's condition number on these inputs. Another float32 path through the same
    operations has an error of the same size; 4× each (fp_bound's safety for roundings a first-order count misses),
    plus a floor of one float32 rounding of the value (4u₃₂|x|) in case err32 is small by cancellation."""
    return 2 * (4 * err32 + fp_bound(torch.float32, 1, scale))


def test_backward_surrogate_equals_forward_mode_jvp(toy_checkpoint):
    probe = make_probe(toy_checkpoint, ["sampling.B_E=4", "sampling.G_E=4", "sampling.B_U=4", "sampling.G_U=4",
                                        "estimators.etas=[1e-3]"])
    result = probe.run()
    summary = result.summary()
    # SDPA has no forward-mode AD on CPU; eager attention is the same math.
    unwrap_causal_lm(probe.model).set_attn_implementation("eager")
    names = [n for n, _ in probe.trainable]
    groups = [g for g in result.batch_e.groups if g.weight > 0]
    temperature = probe.cfg.sampling.temperature

    policy64 = copy.deepcopy(probe.policy).double()  # the float64 reference (Qwen2's RMSNorm stays float32 inside)

    def snis_estimate(*values, policy=probe.policy):
        params = {"lm." + n: v for n, v in zip(names, values)}
        logps, ents = [], []
        for g in groups:
            mb = g.layout(slice(0, g.size))
            lp, h = functional_call(policy, params, (mb.input_ids, mb.attention_mask, mb.response_start,
                                                     mb.response_mask, temperature),
                                    strict=False)
            rows = mb.response_mask.nonzero(as_tuple=True)[0]
            logps.append(torch.zeros(g.size, dtype=torch.float64).index_add(0, rows, lp.double()))
            ents.append(torch.zeros(g.size, dtype=torch.float64).index_add(0, rows, h.double()))
        s, h = torch.cat(logps), torch.cat(ents)
        lam = torch.cat([g.lengths.double() for g in groups])
        w = torch.exp(s - s.detach())  # weights of θ + εu relative to θ on the same samples
        return (w * h).sum() / (w * lam).sum()

    primals = tuple(p.detach() for _, p in probe.trainable)
    tangents = tuple(u.to(p.dtype) for (_, p), u in zip(probe.trainable, result.update.u))
    value, derivative = jvp(snis_estimate, primals, tangents)
    value64, derivative64 = jvp(lambda *v: snis_estimate(*v, policy=policy64), tuple(p.double() for p in primals),
                                tuple(u.double() for u in result.update.u))
    # tol: fp two float32 paths (the probe's SDPA microbatches + backward surrogate vs eager jvp on whole groups):
    # two_path_bound from this path's measured float32 error against float64 (~1e-7 relative for Ĥ, ~1e-6 for the
    # derivative on the toy). A wrong weight, token or sign in either path moves them by ≥ 1e-3 relative.
    tol_value = two_path_bound(abs(float(value - value64)), abs(float(value64)))
    assert abs(float(value) - summary["entropy/base"]) <= tol_value, tol_value
    per_eta = summary["delta_h1/per_eta"]
    tol_derivative = two_path_bound(abs(float(derivative - derivative64)), abs(float(derivative64)))
    assert abs(float(derivative) - per_eta) <= tol_derivative, (tol_derivative, per_eta)


def test_first_order_linear_rules_equal_torch_forward_mode(monkeypatch):
    """`frozen_linear_rule`: a frozen linear with bias on a dual input (ẏ = ẋWᵀ) and a trainable one on a dual input
    (ẏ = ẋWᵀ + xẆᵀ), in a LoRA-shaped block, give torch's own forward-mode values and tangents (float64) and a
    central finite difference."""
    from probe_dist.explain import directional

    gen = torch.Generator().manual_seed(0)
    first = torch.nn.Linear(4, 6, bias=True).double().requires_grad_(False)
    base = torch.nn.Linear(6, 5, bias=True).double().requires_grad_(False)
    second = torch.nn.Linear(5, 4, bias=True).double().requires_grad_(False)
    a0 = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    b0 = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    da, db = torch.randn_like(a0), torch.randn_like(b0)
    fn = torch.nn.functional

    def block(a, b):
        h = first(x)                          # frozen, tangent-free input
        lora = fn.linear(fn.linear(h, a), b)  # trainable weights
        return second(torch.tanh(base(h) + lora))  # frozen on a dual input

    calls = []
    for cls in (directional._FrozenLinear, directional._TrainableLinear):
        rule = cls.jvp
        monkeypatch.setattr(cls, "jvp", staticmethod(lambda ctx, *t, rule=rule, name=cls.__name__:
                                                     calls.append(name) or rule(ctx, *t)))
    original = fn.linear
    with torch.no_grad():
        y, dy = jvp(block, (a0, b0), (da, db))
        with directional.frozen_linear_rule():
            y1, dy1 = jvp(block, (a0, b0), (da, db))
        eps = 1e-6
        fd = (block(a0 + eps * da, b0 + eps * db) - block(a0 - eps * da, b0 - eps * db)) / (2 * eps)
        fd2 = (block(a0 + 2 * eps * da, b0 + 2 * eps * db) - block(a0 - 2 * eps * da, b0 - 2 * eps * db)) / (4 * eps)
        # Σ|terms| of the tangent, elementwise: ẏ = W₂ (tanh′ ⊙ (Ḃ A h + B Ȧ h)) with every factor in absolute value
        # (|tanh′| ≤ 1), and of the value y itself.
        h_abs = x.abs() @ first.weight.abs().T + first.bias.abs()
        lora_dot_abs = (h_abs @ a0.abs().T) @ db.abs().T + (h_abs @ da.abs().T) @ b0.abs().T
        tangent_scale = lora_dot_abs @ second.weight.abs().T
        inner_abs = h_abs @ base.weight.abs().T + base.bias.abs() + (h_abs @ a0.abs().T) @ b0.abs().T
        value_scale = (inner_abs + 1) @ second.weight.abs().T + second.bias.abs()  # |tanh| ≤ 1, |tanh′| ≤ 1
    assert set(calls) == {"_FrozenLinear", "_TrainableLinear"}
    assert fn.linear is original  # put back
    assert torch.equal(y, y1)
    # tol: fp two float64 evaluations of the same tangent: reductions of 4 + 6 + 3 + 5 terms along the chain, so
    # ≤ fp_bound(float64, 18, Σ|terms|) elementwise (~1e-14 here)
    assert ((dy1 - dy).abs() <= fp_bound(torch.float64, 18, 1.0) * tangent_scale).all()
    # tol: fp central difference: rounding 2·δy/(2ε) with δy ≤ fp_bound(float64, 18, Σ|terms| of y), plus the
    # truncation ε²y'''/6 estimated from the step-2ε difference (Richardson: FD(2ε) − FD(ε) = 3·ε²y'''/6), ×2
    fd_tol = fp_bound(torch.float64, 18, 1.0) * value_scale / eps + 2 * (fd2 - fd).abs()
    assert ((dy1 - fd).abs() <= fd_tol).all()
    # tol: bound precondition: the tangent is ≫ the FD tolerance, so a wrong rule (a sign, a missing ẋWᵀ) fails
    assert float(dy1.abs().max()) > 1e3 * float(fd_tol.max())
