"""docs/method.md §5.4: δH₁ by per-microbatch backward of the surrogate (what the probe does) equals the forward-mode JVP
of the §6 estimator along u on the same samples."""

from __future__ import annotations

import torch
from torch.func import functional_call, jvp

from probe_dist.model.policy import unwrap_causal_lm
from tests.probe_harness import make_probe


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

    def snis_estimate(*values):
        params = {"lm." + n: v for n, v in zip(names, values)}
        logps, ents = [], []
        for g in groups:
            mb = g.layout(slice(0, g.size))
            lp, h = functional_call(probe.policy, params, (mb.input_ids, mb.attention_mask, mb.response_start,
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
    assert abs(float(value) - summary["entropy/base"]) < 1e-6
    per_eta = summary["delta_h1/per_eta"]
    assert abs(float(derivative) - per_eta) <= 1e-5 * abs(per_eta)


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
    assert set(calls) == {"_FrozenLinear", "_TrainableLinear"}
    assert fn.linear is original  # put back
    assert torch.equal(y, y1)
    assert torch.allclose(dy1, dy, rtol=1e-12, atol=1e-12)
    assert torch.allclose(dy1, fd, rtol=1e-6, atol=1e-8)
    assert float(dy1.abs().max()) > 0.1
