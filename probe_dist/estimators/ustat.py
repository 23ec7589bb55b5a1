"""Single-batch U-statistic for δH₁ with E = U (docs/method.md §5.3), in dot-product form.

With per-unit contributions X_p (entropy-gradient side) and Y_p (update side) over B units, the
product of the two batch means X̄·Ȳ is biased when X_p and Y_p come from the same samples: it contains the
diagonal terms X_p·Y_p. The U-statistic averages only the ordered distinct pairs,

    U = 1/(B(B−1)) Σ_{p≠q} X_p·Y_q = [B/(B−1)]·X̄·Ȳ − [1/(B(B−1))]·Σ_p X_p·Y_p,

("bars_dot minus the diagonal"), which is unbiased for E[X]·E[Y] when units are i.i.d. Only the running
sums Σ X_p, Σ Y_p and the scalar Σ X_p·Y_p are needed, so param-sized vectors are never stored per unit.
Units are prompts ("exact" mode) or M contiguous blocks of prompts ("blocks" mode, see block_assignments).
"""

from __future__ import annotations

__all__ = ["u_statistic_dot", "block_assignments"]


def u_statistic_dot(bars_dot: float, diag_sum: float, num_units: int) -> float:
    """U-statistic from its dot-product ingredients (docs/method.md §5.3).

    Args:
        bars_dot: (Σ_p X_p)·(Σ_p Y_p) over the B units.
        diag_sum: Σ_p X_p·Y_p.
        num_units: B, must be ≥ 2.

    Returns:
        (1/(B(B−1))) Σ_{p≠q} X_p·Y_q = [B/(B−1)]·X̄·Ȳ − [1/(B(B−1))]·Σ_p X_p·Y_p.
    """
    b = int(num_units)
    if b < 2:
        raise ValueError(
            f"u_statistic_dot needs at least 2 units (prompts or blocks) to form distinct pairs, got {b}"
        )
    # [B/(B−1)]·(ΣX/B)·(ΣY/B) = bars_dot/(B(B−1)), so both terms share the denominator; subtracting first
    # is one rounding instead of two.
    return (float(bars_dot) - float(diag_sum)) / (b * (b - 1))


def block_assignments(num_units: int, num_blocks: int) -> list[list[int]]:
    """Split unit indices 0..B−1 into M contiguous blocks of nearly equal size ("blocks" mode).

    Block sizes differ by at most one; the first B mod M blocks get the extra index. Requires
    1 ≤ M ≤ B so that no block is empty.
    """
    b, m = int(num_units), int(num_blocks)
    if b < 1:
        raise ValueError(f"num_units must be >= 1, got {b}")
    if not 1 <= m <= b:
        raise ValueError(f"num_blocks must satisfy 1 <= num_blocks <= num_units={b}, got {m}")
    base, extra = divmod(b, m)
    blocks: list[list[int]] = []
    start = 0
    for i in range(m):
        size = base + (1 if i < extra else 0)
        blocks.append(list(range(start, start + size)))
        start += size
    return blocks
