"""Chunked ℓ and H (probe_dist/scoring/chunked.py) with masked (−inf) logits and the model's logit post-processing."""

from __future__ import annotations

import torch

from probe_dist.model.logits import LogitTransform, logit_transform
from probe_dist.scoring.chunked import chunked_logp_entropy, logp_entropy_from_logits
from tests.tolerances import fp_bound, unit_roundoff


def lh_error_bound(z: torch.Tensor, dz: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """A first-order bound, per row, on |Δℓ| and |ΔH| of ℓ = z_y − logsumexp z and H = logsumexp z − Σ p z computed in
    `dtype` from tempered logits z [M, V] (float64, −inf = masked) whose values carry an absolute error ≤ dz [M].

    With z shifted by its row maximum (what the scorer does), A = Σ_v p_v |z_v| and n the unmasked count: every
    logit is off by D ≤ dz + 2u·max|z| (the shift and the division by τ round once each); logsumexp by ≤ D + γ_n
    (n exps summed), p_v by ≤ p_v (2D + 2γ_n) relative, so ℓ is off by ≤ 2D + 2γ_n and H by ≤ (2D + 2γ_n)(1 + A);
    the log rounds once more (u·logsumexp). The factor 4 of fp_bound covers the roundings each step adds."""
    u = unit_roundoff(dtype)
    finite = torch.isfinite(z)
    shifted = (z - z.max(dim=-1, keepdim=True).values).masked_fill(~finite, 0.0)
    p = torch.softmax(z, dim=-1)
    a = (p * shifted.abs()).sum(-1)
    n = finite.sum(-1).double()
    gamma = n * u / (1 - n * u)
    d = dz + 2 * u * shifted.abs().amax(-1)
    lse = torch.logsumexp(z, dim=-1) - z.max(dim=-1).values
    return 4 * ((2 * d + 2 * gamma) * (1 + a) + u * lse)


def test_minus_inf_logits_give_finite_entropy_of_the_unmasked_distribution():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 11, generator=gen, dtype=torch.float64)
    masked = z.clone()
    masked[:, 3] = -torch.inf
    masked[2, 7:] = -torch.inf
    targets = torch.tensor([0, 1, 2, 4, 5])
    for tau in (1.0, 0.7):
        logp, ent = logp_entropy_from_logits(masked.float(), targets, tau)
        # tol: fp float32 ℓ, H from float64 logits rounded to float32 (|Δz| ≤ u₃₂|z|, in dz) against float64:
        # lh_error_bound's first-order model on these logits (~4e-5 here; a masked token counted, a wrong τ or
        # target moves ℓ or H by ≥ 0.1)
        tol = lh_error_bound(masked / tau, 2 * unit_roundoff(torch.float32) * (masked / tau).nan_to_num(
            neginf=0.0).abs().amax(-1), torch.float32)
        # Independent: the distribution over the unmasked tokens only, in float64.
        for row in range(5):
            keep = torch.isfinite(masked[row])
            p = torch.softmax(masked[row][keep] / tau, dim=0)
            assert torch.isfinite(ent[row])
            assert abs(float(ent[row]) - float(-(p * p.log()).sum())) <= float(tol[row])  # tol: fp (above)
            lp = torch.log_softmax(masked[row][keep] / tau, dim=0)
            # tol: fp the same bound
            assert abs(float(logp[row]) - float(lp[int(keep[: targets[row]].sum())])) <= float(tol[row])


def test_minus_inf_logits_have_finite_gradients():
    x = torch.randn(3, 6, dtype=torch.float32)
    w = torch.randn(6, 6, requires_grad=True)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[:, 0] = True  # token 0 masked out (e.g. a vocabulary mask)
    logits = (x @ w).masked_fill(mask, -torch.inf)
    logp, ent = logp_entropy_from_logits(logits, torch.tensor([1, 2, 3]), 1.0)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(w.grad).all()


def test_logit_transform_from_config_and_applied_per_chunk():
    class Cfg:
        final_logit_softcapping = 30.0

    cap = logit_transform(Cfg())
    assert cap == LogitTransform(softcap=30.0)
    z = torch.tensor([[-90.0, 0.0, 54.0]])
    # tol: fp the same three float32 roundings (÷30, tanh ≤ 2 ulp, ×30) of values ≤ 30: ≤ 4u₃₂·30 apart
    assert torch.allclose(cap(z), 30.0 * torch.tanh(z / 30.0), rtol=0.0, atol=fp_bound(torch.float32, 4, 30.0))
    # tol: bound |30·tanh(x/30)| < 30 for |x/30| ≤ 3 (tanh 3 = 0.995: float32 does not round it to 1)
    assert float(cap(z).abs().max()) < 30.0
    assert logit_transform(type("Plain", (), {})()).is_identity

    class Cohere:
        logit_scale = 0.0625

    assert torch.equal(logit_transform(Cohere())(z), z * 0.0625)

    head = torch.nn.Linear(4, 9, bias=False)
    with torch.no_grad():
        head.weight.mul_(40.0)  # raw logits well beyond the cap
    hidden, targets = torch.randn(7, 4), torch.randint(0, 9, (7,))
    logp, ent = chunked_logp_entropy(head, hidden, targets, temperature=0.8, chunk=3, transform=cap)
    ref_logp, ref_ent = logp_entropy_from_logits(cap(head(hidden)), targets, 0.8)
    # The exact values: the same formulas in float64 on the same (float32-valued) weights and inputs.
    w64, h64 = head.weight.detach().double(), hidden.double()
    z64 = 30.0 * torch.tanh(h64 @ w64.T / 30.0) / 0.8  # the cap, then τ = 0.8
    exact_logp = torch.log_softmax(z64, -1).gather(-1, targets[:, None]).squeeze(-1)
    exact_ent = -(torch.softmax(z64, -1) * torch.log_softmax(z64, -1)).sum(-1)
    # tol: fp each float32 path vs exact: the raw logits' matmul over d = 4 (fp_bound with Σ_k |W||h|), damped by
    # the cap's slope 1 − tanh²(z/30), plus the cap's own 3 roundings of ≤ 30, divided by τ, propagated by
    # lh_error_bound; the two paths may round differently (chunk shapes), so each is compared with the exact value.
    # A missing or doubled cap, or a chunk's rows mixed up, moves ℓ by O(1) (the cap: checked below).
    u = unit_roundoff(torch.float32)
    raw64 = h64 @ w64.T
    slope = 1 - torch.tanh(raw64 / 30.0) ** 2
    dz = ((slope * fp_bound(torch.float32, 4, 1.0) * (h64.abs() @ w64.abs().T)).amax(-1) + 4 * u * 30.0) / 0.8
    tol = lh_error_bound(z64, dz, torch.float32)
    for got_logp, got_ent in ((logp, ent), (ref_logp, ref_ent)):
        assert ((got_logp.double() - exact_logp).abs() <= tol).all()  # tol: fp (above)
        assert ((got_ent.double() - exact_ent).abs() <= tol).all()  # tol: fp (above)
    raw_logp, _ = chunked_logp_entropy(head, hidden, targets, temperature=0.8, chunk=3)
    # tol: bound the uncapped logits reach |z| ≫ 30 here: ℓ changes by O(1), far beyond allclose's default 1e-5
    assert not torch.allclose(raw_logp, logp)  # the cap matters at these logits


def test_closed_form_tangents_match_forward_mode_through_every_pass():
    """`analytic_first_order`'s closed-form ℓ̇, Ḣ equal jvp through the op-by-op formulas (float64, masked logits,
    τ ≠ 1) and a central finite difference; its primal values are the no-grad scorer's bit for bit."""
    from torch.func import jvp

    from probe_dist.scoring.chunked import analytic_first_order

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 40, generator=gen, dtype=torch.float64) * 4
    x[1, 7] = x[4, :5] = -torch.inf
    dx = torch.randn(9, 40, generator=gen, dtype=torch.float64)
    dx[1, 7] = 0.0
    dx[4, :5] = 0.0
    targets = torch.arange(9) * 3 + 8  # none masked

    def f(a):
        return logp_entropy_from_logits(a, targets, 0.7)

    with torch.no_grad():
        (lp, h), (dlp, dh) = jvp(f, (x,), (dx,))
        with analytic_first_order():
            (lp1, h1), (dlp1, dh1) = jvp(f, (x,), (dx,))
        eps = 1e-6
        plus, minus = f(x + eps * dx), f(x - eps * dx)
        plus2, minus2 = f(x + 2 * eps * dx), f(x - 2 * eps * dx)
    assert torch.equal(lp, lp1) and torch.equal(h, h1)
    z, dz = x / 0.7, dx / 0.7
    # tol: fp two float64 evaluations of ℓ̇ = ż_y − Σ p ż and Ḣ = −Σ p (z − Σ p z) ż over n ≤ 40 terms: γ_n times
    # Σ_v p_v (1 + |z_v − z̄|)|ż_v| ≤ (1 + 2 max|z − max z|)·max|ż|, plus p's own error (2γ_n relative) times the same
    finite = torch.isfinite(z)
    spread = (z - z.max(-1, keepdim=True).values).masked_fill(~finite, 0.0).abs().amax(-1)
    scale = (1 + 2 * spread) * dz.abs().amax(-1)
    tangent_tol = torch.tensor([fp_bound(torch.float64, 2 * int(n), float(c)) for n, c in zip(finite.sum(-1), scale)])
    assert ((dlp1 - dlp).abs() <= tangent_tol).all() and ((dh1 - dh).abs() <= tangent_tol).all()
    # tol: fp central difference: rounding δf/ε (δf: lh_error_bound in float64 at these logits) plus truncation
    # ε²f'''/6, estimated from the difference with step 2ε (Richardson: FD(2ε) − FD(ε) = 3·(ε²f'''/6) + O(ε⁴)),
    # counted twice; a wrong tangent (a sign, a factor 2, a missing term) is ≥ 1e3 × this (asserted at the end)
    rounding = lh_error_bound(z, 2 * unit_roundoff(torch.float64) * z.nan_to_num(neginf=0.0).abs().amax(-1),
                              torch.float64) / eps
    for k, tangent in ((0, dlp1), (1, dh1)):
        fd = (plus[k] - minus[k]) / (2 * eps)
        fd2 = (plus2[k] - minus2[k]) / (4 * eps)
        fd_tol = 2 * rounding + 2 * (fd2 - fd).abs()  # tol: fp the rounding and truncation model above
        assert ((tangent - fd).abs() <= fd_tol).all(), float(((tangent - fd).abs() / fd_tol).max())
        # tol: bound precondition: a direction that moves ℓ and H far above the FD tolerance, so the check has teeth
        assert float(tangent.abs().max()) > 1e3 * float(fd_tol.max())


def test_second_order_closed_forms_match_nested_forward_mode():
    """`second_order_logp_entropy`'s ℓ, H, ℓ', H', ℓ'', H'' equal nested jvp through the op-by-op formulas along
    the path x + εẋ + ½ε²ẍ (float64, masked logits, τ ≠ 1): the explanation's curvature pass rests on them."""
    from torch.func import jvp

    from probe_dist.scoring.chunked import second_order_logp_entropy

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 40, generator=gen, dtype=torch.float64) * 4
    dx, ddx = (torch.randn(9, 40, generator=gen, dtype=torch.float64) for _ in range(2))
    x[1, 7] = x[4, :5] = -torch.inf
    dx[1, 7] = ddx[1, 7] = 0.0
    dx[4, :5] = ddx[4, :5] = 0.0
    targets = torch.arange(9) * 3 + 8  # none masked
    one = torch.ones((), dtype=torch.float64)

    def path(eps):
        return torch.stack(logp_entropy_from_logits(x + eps * dx + 0.5 * eps * eps * ddx, targets, 0.7))

    def first(eps):
        return jvp(path, (eps,), (one,))

    with torch.no_grad():
        (value, d1), (_, d2) = jvp(first, (torch.zeros((), dtype=torch.float64),), (one,))
        got = second_order_logp_entropy(x, dx, ddx, targets, 0.7)
    z = x / 0.7
    finite = torch.isfinite(z)
    spread = (z - z.max(-1, keepdim=True).values).masked_fill(~finite, 0.0).abs().amax(-1)
    for k, (mine, ref, order) in enumerate(zip(got, (value[0], value[1], d1[0], d1[1], d2[0], d2[1]),
                                               (0, 0, 1, 1, 2, 2))):
        # tol: fp both are float64 sums over n ≤ 40 terms of products of ≤ 3 factors bounded by
        # (1 + 2·spread)·max(|ż|, |z̈|)^order/τ: γ_{4n} relative to that scale (a wrong term is O(scale))
        scale = (1 + 2 * spread) ** 2 * (torch.maximum(dx.abs().amax(-1), ddx.abs().amax(-1)) / 0.7 + 1) ** order
        tol = torch.tensor([fp_bound(torch.float64, 4 * int(n), float(c)) for n, c in zip(finite.sum(-1), scale)])
        assert ((mine - ref).abs() <= tol).all(), (k, float((mine - ref).abs().max()))
        if order:  # tol: bound precondition: the path moves the values far above the tolerance (the check has teeth)
            assert float(ref.abs().max()) > 1e6 * float(tol.max())


def test_closed_form_head_backward_matches_autograd_through_the_softmax():
    """The frozen linear head's closed-form backward (∂ℓ/∂z = onehot − p, ∂H/∂z = −p(z − z̄)) gives the same
    ∂/∂hidden as autograd through `logp_entropy_from_logits` (float64, τ ≠ 1, chunked, with a bias), the same
    values as the no-grad scorer, and is what a frozen head takes."""
    from probe_dist.scoring import chunked

    gen = torch.Generator().manual_seed(11)
    head = torch.nn.Linear(16, 50, dtype=torch.float64).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, generator=gen, dtype=torch.float64))
    hidden = torch.randn(13, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (13,), generator=gen)
    a, b = (torch.randn(13, generator=gen, dtype=torch.float64) for _ in range(2))
    assert chunked._closed_form_head(head, chunked.IDENTITY, hidden)  # precondition: the path under test runs
    lp, h = chunked_logp_entropy(head, hidden, targets, temperature=0.7, chunk=5)
    (grad,) = torch.autograd.grad((a * lp + b * h).sum(), hidden)
    lp_ref, h_ref = logp_entropy_from_logits(head(hidden), targets, 0.7)
    (grad_ref,) = torch.autograd.grad((a * lp_ref + b * h_ref).sum(), hidden)
    with torch.no_grad():
        lp0, h0 = chunked_logp_entropy(head, hidden, targets, temperature=0.7, chunk=5)
    assert torch.equal(lp, lp0) and torch.equal(h, h0)  # tol: exact the no-grad scorer's passes
    # tol: fp two float64 routes to Σ_v (…)·W over V = 50 logits and d = 16: γ_{4·66} relative to Σ|terms|,
    # bounded by (|a| + |b|·(1 + 2·spread))·Σ_v|W_v| per entry; a wrong term (a sign, p vs onehot) is O(1)
    z = head(hidden).detach() / 0.7
    spread = (z - z.max(-1, keepdim=True).values).abs().amax(-1)
    scale = (a.abs() + b.abs() * (1 + 2 * spread)) * float(head.weight.abs().sum(0).max()) / 0.7
    tol = torch.tensor([fp_bound(torch.float64, 4 * 66, float(c)) for c in scale]).unsqueeze(-1)
    assert ((grad - grad_ref).abs() <= tol).all(), float((grad - grad_ref).abs().max())
    assert float(grad_ref.abs().max()) > 1e6 * float(tol.max())  # tol: bound precondition (teeth)


def test_no_grad_chunk_loop_through_reused_buffers_equals_a_fresh_tensor_per_chunk(monkeypatch):
    """`_no_grad_chunks` (two [chunk, V] buffers per call, the elementwise passes in row blocks) against the generic
    loop (a fresh head(h) per chunk through `logp_entropy_from_logits`): the same kernels and formulas row by row,
    so bit for bit equal (tol: exact; one thread, where the GEMM's accumulation order is fixed). Row blocks smaller
    than a chunk, a ragged last chunk and a bias are covered."""
    from probe_dist.scoring import chunked

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(chunked, "ROW_BLOCK_BYTES", 3 * 37 * 8)  # 3 rows per block at float64, 6 at float32
        gen = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.float64):
            for bias in (False, True):
                head = torch.nn.Linear(16, 37, bias=bias).to(dtype).requires_grad_(False)
                hidden = torch.randn(23, 16, generator=gen, dtype=dtype) * 4
                targets = torch.randint(0, 37, (23,), generator=gen)
                with torch.no_grad():
                    assert chunked._reusable_buffers(head, chunked.IDENTITY, hidden)
                    got = chunked_logp_entropy(head, hidden, targets, temperature=0.7, chunk=10)
                    want = [logp_entropy_from_logits(head(hidden[s:s + 10]), targets[s:s + 10], 0.7)
                            for s in range(0, 23, 10)]
                assert torch.equal(got[0], torch.cat([w[0] for w in want]))  # tol: exact (same kernels)
                assert torch.equal(got[1], torch.cat([w[1] for w in want]))  # tol: exact (same kernels)
                head.weight.requires_grad_(True)  # a trainable head under grad takes the generic loop
                assert not chunked._reusable_buffers(head, chunked.IDENTITY, hidden)
    finally:
        torch.set_num_threads(threads)


def test_first_order_head_equals_forward_mode_through_the_head(monkeypatch):
    """`first_order_head` (ℓ, H and their tangents in closed form through reused buffers and row blocks) against
    torch.func.jvp through head(h) and the autograd formulas of `logp_entropy_from_logits`, in float64 with a bias,
    τ ≠ 1, a ragged last chunk and row blocks smaller than a chunk."""
    from torch.func import jvp

    from probe_dist.scoring import chunked

    monkeypatch.setattr(chunked, "ROW_BLOCK_BYTES", 3 * 37 * 8)  # 3 rows per block
    gen = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 37, dtype=torch.float64).requires_grad_(False)
    hidden = torch.randn(23, 16, generator=gen, dtype=torch.float64) * 3
    d_hidden = torch.randn(23, 16, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 37, (23,), generator=gen)
    with torch.enable_grad():
        (logp, ent), (d_logp, d_ent) = jvp(lambda h: logp_entropy_from_logits(head(h), targets, 0.7),
                                           (hidden.requires_grad_(True),), (d_hidden,))
    got = chunked.first_order_head(head, hidden.detach(), d_hidden, targets, temperature=0.7, chunk=10)
    for value, want in zip(got, (logp, ent, d_logp, d_ent)):
        # tol: fp float64 sums over V = 37 terms in two orders (each ≤ 37·u·Σ|term| ≈ 1e-13 here); a wrong
        # term — a missing 1/τ, an uncentred product, a wrong target row — moves a value by ≥ 1e-2
        torch.testing.assert_close(value, want.detach(), rtol=0, atol=1e-10)
