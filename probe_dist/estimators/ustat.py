"""Single-batch U-statistic for δH₁ with E = U (SPEC §5.3), in dot-product form.

With per-unit contributions X_p (entropy-gradient side) and Y_p (update side) over B units, the
product of the two batch means X̄·Ȳ is biased when X_p and Y_p come from the same samples: it contains the
diagonal terms X_p·Y_p. The U-statistic averages only the ordered distinct pairs,

    U = 1/(B(B−1)) Σ_{p≠q} X_p·Y_q = [B/(B−1)]·X̄·Ȳ − [1/(B(B−1))]·Σ_p X_p·Y_p,

("bars_dot minus the diagonal"), which is unbiased for E[X]·E[Y] when units are i.i.d. Only the running
sums Σ X_p, Σ Y_p and the scalar Σ X_p·Y_p are needed, so param-sized vectors are never stored per unit.
Units are prompts ("exact" mode) or M contiguous blocks of prompts ("blocks" mode, see block_assignments).
"""

from __future__ import annotations

import torch

__all__ = ["u_statistic_dot", "UStatAccumulator", "block_assignments"]


def u_statistic_dot(bars_dot: float, diag_sum: float, num_units: int) -> float:
    """U-statistic from its dot-product ingredients (SPEC §5.3).

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


class UStatAccumulator:
    """Streaming accumulator of Σ_p X_p, Σ_p Y_p (float64, flattened) and Σ_p X_p·Y_p over units.

    Args:
        numel: length of the flattened vectors; if None it is taken from the first add_unit.
        device: where the running sums live (default CPU; e.g. the GPU to avoid host copies).

    The attributes ``sum_X``, ``sum_Y``, ``diag_sum`` and ``num_units`` are plain sums, so shards of the
    units can be combined by summing them (``merge``, or an all-reduce SUM done by the caller).
    """

    def __init__(self, numel: int | None = None, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.sum_X: torch.Tensor | None = None
        self.sum_Y: torch.Tensor | None = None
        self.diag_sum: float = 0.0
        self.num_units: int = 0
        if numel is not None:
            self._allocate(int(numel))

    def _allocate(self, numel: int) -> None:
        self.sum_X = torch.zeros(numel, dtype=torch.float64, device=self.device)
        self.sum_Y = torch.zeros(numel, dtype=torch.float64, device=self.device)

    def add_unit(self, X_p: torch.Tensor, Y_p: torch.Tensor) -> None:
        """Add one unit's contributions X_p, Y_p (any shape; flattened, cast to float64)."""
        x = X_p.detach().reshape(-1).to(device=self.device, dtype=torch.float64)
        y = Y_p.detach().reshape(-1).to(device=self.device, dtype=torch.float64)
        if x.numel() != y.numel():
            raise ValueError(
                f"X_p and Y_p must have the same number of elements, got {x.numel()} and {y.numel()}"
            )
        if self.sum_X is None:
            self._allocate(x.numel())
        assert self.sum_X is not None and self.sum_Y is not None
        if x.numel() != self.sum_X.numel():
            raise ValueError(f"unit has {x.numel()} elements, accumulator has {self.sum_X.numel()}")
        self.sum_X.add_(x)
        self.sum_Y.add_(y)
        self.diag_sum += float(torch.dot(x, y))
        self.num_units += 1

    def merge(self, other: UStatAccumulator) -> None:
        """Add another accumulator's units to this one (all sums are additive)."""
        if other.sum_X is None:
            return
        if self.sum_X is None:
            self._allocate(other.sum_X.numel())
        assert self.sum_X is not None and self.sum_Y is not None and other.sum_Y is not None
        self.sum_X.add_(other.sum_X.to(self.device))
        self.sum_Y.add_(other.sum_Y.to(self.device))
        self.diag_sum += other.diag_sum
        self.num_units += other.num_units

    @property
    def bars_dot(self) -> float:
        """(Σ_p X_p)·(Σ_p Y_p)."""
        if self.sum_X is None or self.sum_Y is None:
            return 0.0
        return float(torch.dot(self.sum_X, self.sum_Y))

    def result(self) -> float:
        """The U-statistic (1/(B(B−1))) Σ_{p≠q} X_p·Y_q; ValueError if fewer than 2 units were added."""
        return u_statistic_dot(self.bars_dot, self.diag_sum, self.num_units)


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
