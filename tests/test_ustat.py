"""Tests for the single-batch U-statistic of docs/method.md §5.3."""

from __future__ import annotations

import pytest
import torch

from probe_dist.estimators.ustat import block_assignments, u_statistic_dot
from tests.tolerances import fp_bound, z_bonferroni


def _fp_u(X: torch.Tensor, Y: torch.Tensor, num_units: int, dtype: torch.dtype = torch.float64) -> float:
    """Float64 error bound of any route to (1/(M(M−1)))·Σ_{p≠q} X_p·Y_q from the B rows of X, Y (M units).

    Every route (brute-force double loop, (ΣX)·(ΣY) − Σ_p X_p·Y_p, running sums, block sums) adds up products
    X_pk·Y_qk, each pair (p, q) at most once per route: ≤ B² + d roundings (the sums over rows, then over the d
    components), relative to Σ_{p,q}Σ_k |X_pk||Y_qk| ≤ (Σ_p‖X_p‖)(Σ_q‖Y_q‖) (Cauchy–Schwarz), diagonal included
    because the (ΣX)·(ΣY) route subtracts it. Two routes compared: twice fp_bound. With dtype=float32 the inputs
    are first rounded to float32 (relative u₃₂ each, 2u₃₂ per product): add fp_bound(float32, 2, same scale).
    """
    b, d = X.shape[0], X[0].numel()
    x = X.reshape(b, -1).double()
    y = Y.reshape(b, -1).double()
    scale = float(x.norm(dim=1).sum() * y.norm(dim=1).sum()) / (num_units * (num_units - 1))
    bound = 2 * fp_bound(torch.float64, b * b + d + 4, scale)
    if dtype != torch.float64:
        bound += fp_bound(dtype, 2, scale)
    return bound


def _brute_force(X: torch.Tensor, Y: torch.Tensor) -> tuple[float, float]:
    """(1/(B(B−1))) Σ_{p≠q} X_p·Y_q by the explicit double loop, plus a scale Σ|X_p||Y_q|/(B(B−1))."""
    b = X.shape[0]
    total, scale = 0.0, 0.0
    for p in range(b):
        for q in range(b):
            if p != q:
                total += float(torch.dot(X[p], Y[q]))
                scale += float(X[p].norm() * Y[q].norm())
    return total / (b * (b - 1)), scale / (b * (b - 1))


def _sums(X: torch.Tensor, Y: torch.Tensor) -> tuple[float, float]:
    """The ingredients u_statistic_dot takes, built as the probe builds them: unit by unit, each unit flattened
    and cast to float64 — (Σ_p X_p)·(Σ_p Y_p) and Σ_p X_p·Y_p."""
    sum_x = torch.zeros(X[0].numel(), dtype=torch.float64)
    sum_y = torch.zeros(Y[0].numel(), dtype=torch.float64)
    diag = 0.0
    for x_p, y_p in zip(X, Y):
        x, y = x_p.reshape(-1).double(), y_p.reshape(-1).double()
        sum_x += x
        sum_y += y
        diag += float(torch.dot(x, y))
    return float(torch.dot(sum_x, sum_y)), diag


CASES = [(b, d) for b in (2, 3, 7, 16) for d in (1, 5, 50)]


@pytest.mark.parametrize("b,d", CASES)
def test_u_statistic_dot_matches_brute_force(b: int, d: int) -> None:
    g = torch.Generator().manual_seed(1000 * b + d)
    X = torch.randn(b, d, generator=g, dtype=torch.float64) + 0.7
    Y = torch.randn(b, d, generator=g, dtype=torch.float64) - 0.3
    ref, scale = _brute_force(X, Y)
    bars_dot = float(torch.dot(X.sum(0), Y.sum(0)))
    diag = float((X * Y).sum())
    u = u_statistic_dot(bars_dot, diag, b)
    # tol: fp float64 error model of _fp_u: (B² + d + 4) roundings × the summands' sizes (the result itself may be
    # tol: fp near 0), ≤ 1.4e-13 × scale at B = 16, d = 50; dividing by B² instead of B(B−1), or keeping the
    # tol: fp diagonal, is off by ≥ 1/B = 6 % of the terms, ≫ the bound.
    tol = _fp_u(X, Y, b)
    assert abs(u - ref) <= tol
    # The documented form [B/(B−1)]·X̄·Ȳ − [1/(B(B−1))]·Σ_p X_p·Y_p.
    alt = b / (b - 1) * float(torch.dot(X.mean(0), Y.mean(0))) - diag / (b * (b - 1))
    assert abs(u - alt) <= tol  # tol: fp _fp_u (the means add one division per component: within its + 4)

    # The same from running sums accumulated one unit at a time.
    streamed = u_statistic_dot(*_sums(X, Y), b)
    assert abs(streamed - ref) <= tol  # tol: fp _fp_u, same products summed in another order


def test_multidimensional_float32_units_and_sharded_sums() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
    Y = torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
    bars_dot, diag = _sums(X, Y)  # any shape, flattened
    ref, scale = _brute_force(X.reshape(6, -1), Y.reshape(6, -1))
    full = u_statistic_dot(bars_dot, diag, 6)
    tol = _fp_u(X, Y, 6)  # tol: fp float64 model of _fp_u (B = 6, d = 12: ≈ 1e-13 relative to the summands)
    assert abs(full - ref) <= tol

    # Two shards of the units combined by summing their sums (what an all-reduce SUM does) == one pass.
    sx_a, sy_a = X[:2].reshape(2, -1).sum(0), Y[:2].reshape(2, -1).sum(0)
    sx_b, sy_b = X[2:].reshape(4, -1).sum(0), Y[2:].reshape(4, -1).sum(0)
    diag_a, diag_b = float((X[:2] * Y[:2]).sum()), float((X[2:] * Y[2:]).sum())
    merged = u_statistic_dot(float(torch.dot(sx_a + sx_b, sy_a + sy_b)), diag_a + diag_b, 2 + 4)
    assert abs(merged - full) <= tol  # tol: fp _fp_u: the shards only regroup the same float64 sums

    # float32 inputs, accumulated in float64.
    u32 = u_statistic_dot(*_sums(X.float(), Y.float()), 6)
    # tol: fp inputs rounded to float32 (2u₃₂ per product) then float64 sums: _fp_u(float32) ≈ 5e-7 × the summands'
    # tol: fp size; accumulating in float32 instead would not be caught, a wrong normaliser (≥ 17 %) would.
    assert abs(u32 - ref) <= _fp_u(X, Y, 6, dtype=torch.float32)


def test_too_few_units_raise() -> None:
    with pytest.raises(ValueError, match="at least 2 units"):
        u_statistic_dot(1.0, 1.0, 1)
    with pytest.raises(ValueError):
        u_statistic_dot(0.0, 0.0, 0)  # no units at all
    one = torch.ones(1, 3)  # a single unit: its only pair is with itself
    with pytest.raises(ValueError):
        u_statistic_dot(*_sums(one, one), 1)


@pytest.mark.parametrize("b,m", [(2, 2), (7, 3), (8, 4), (10, 3), (10, 10), (5, 2)])
def test_blocks_mode_matches_brute_force_over_distinct_blocks(b: int, m: int) -> None:
    """Blocks mode: units are the sums over block_assignments' blocks; the U-statistic is then the mean over
    ordered pairs of distinct blocks, i.e. Σ over sample pairs (p, q) in different blocks of X_p·Y_q / (M(M−1))."""
    g = torch.Generator().manual_seed(100 * b + m)
    X = torch.randn(b, 5, generator=g, dtype=torch.float64) + 0.4
    Y = 0.5 * X + torch.randn(b, 5, generator=g, dtype=torch.float64)
    blocks = block_assignments(b, m)
    block_of = {i: k for k, blk in enumerate(blocks) for i in blk}
    total = scale = 0.0
    for p in range(b):
        for q in range(b):
            if block_of[p] != block_of[q]:
                total += float(torch.dot(X[p], Y[q]))
                scale += float(X[p].norm() * Y[q].norm())
    ref, scale = total / (m * (m - 1)), scale / (m * (m - 1))
    x_units = torch.stack([X[blk].sum(0) for blk in blocks])
    y_units = torch.stack([Y[blk].sum(0) for blk in blocks])
    u = u_statistic_dot(*_sums(x_units, y_units), m)
    # tol: fp _fp_u on the B sample rows (block sums add ≤ B roundings, within B² + d + 4; the block-level norms are
    # tol: fp ≤ the sample-level ones by the triangle inequality); pairs within a block counted would be ≥ 1/M off.
    tol = _fp_u(X, Y, m)
    assert abs(u - ref) <= tol
    assert abs(u - _brute_force(x_units, y_units)[0]) <= tol


@pytest.mark.parametrize("b,m", [(1, 1), (7, 1), (7, 3), (8, 4), (10, 3), (10, 10), (64, 5), (5, 2)])
def test_block_assignments(b: int, m: int) -> None:
    blocks = block_assignments(b, m)
    assert len(blocks) == m
    flat = [i for blk in blocks for i in blk]
    assert flat == list(range(b))  # every index exactly once, in order
    for blk in blocks:
        assert blk and blk == list(range(blk[0], blk[0] + len(blk)))  # contiguous, non-empty
    sizes = [len(blk) for blk in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_block_assignments_invalid() -> None:
    for b, m in [(5, 0), (5, 6), (0, 1), (3, -1)]:
        with pytest.raises(ValueError):
            block_assignments(b, m)


def test_unbiased_where_naive_product_is_biased() -> None:
    # X_p i.i.d. with mean μx, Y_p = a·X_p + noise (same-unit correlation), so E[Y] = a·μx + μn and
    # E[X̄·Ȳ] = μx·μy + a·tr(Cov X)/B: the naive product carries the diagonal's bias, the U-statistic not.
    g = torch.Generator().manual_seed(12345)
    reps, b, d, a = 20_000, 4, 5, 1.0
    mu_x = torch.linspace(-0.5, 0.5, d, dtype=torch.float64) + 0.2
    mu_n = torch.full((d,), 0.3, dtype=torch.float64)
    X = mu_x + torch.randn(reps, b, d, generator=g, dtype=torch.float64)
    Y = a * X + mu_n + 0.5 * torch.randn(reps, b, d, generator=g, dtype=torch.float64)
    target = float(torch.dot(mu_x, a * mu_x + mu_n))
    expected_naive_bias = a * d / b  # tr(Cov X) = d

    bars_dot = (X.sum(1) * Y.sum(1)).sum(-1)
    diag = (X * Y).sum((1, 2))
    u = torch.tensor([u_statistic_dot(float(s), float(t), b) for s, t in zip(bars_dot, diag)])
    naive = (X.mean(1) * Y.mean(1)).sum(-1)

    bias_u = float(u.mean()) - target
    bias_naive = float(naive.mean()) - target
    # SEs of the two means over the 20 000 independent replicates (CLT: each replicate has finite variance).
    se_u = float(u.std()) / reps**0.5
    se_naive = float(naive.std()) / reps**0.5
    z = z_bonferroni()
    assert abs(bias_u) <= z * se_u  # tol: stat E[u] = target exactly (unbiased): z_bonferroni SEs (se_u ≈ 0.01)
    # tol: stat E[X̄·Ȳ] − target = a·tr(Cov X)/B = 1.25 exactly: z_bonferroni SEs of the naive mean (≈ 0.01)
    assert abs(bias_naive - expected_naive_bias) <= z * se_naive
    # The experiment resolves the naive bias: the two bands above lie far apart (a design precondition, asserted).
    assert expected_naive_bias - z * se_naive > max(1.0, 10 * z * se_u), (se_naive, se_u)
    # tol: bound implied by the three lines above: |bias_naive| ≥ 1.25 − z·se_naive > max(1, 10·z·se_u) ≥ 10·|bias_u|
    assert abs(bias_naive) > 10 * abs(bias_u) and abs(bias_naive) > 1.0
