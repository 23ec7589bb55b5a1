"""Deterministic assignment of prompt groups (the statistical unit) to ranks."""

from __future__ import annotations


def shard_bounds(num_groups: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous, balanced block [start, stop) of group indices for `rank`; uneven sizes differ by at most 1."""
    base, extra = divmod(num_groups, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_groups(num_groups: int, world_size: int, rank: int) -> list[int]:
    start, stop = shard_bounds(num_groups, world_size, rank)
    return list(range(start, stop))


def max_groups_per_rank(num_groups: int, world_size: int) -> int:
    """Every rank runs this many group-steps (padding with zero-weight work) so collectives stay in lockstep."""
    return -(-num_groups // world_size)
