"""Deterministic assignment of prompt groups (the statistical unit) to ranks."""

from __future__ import annotations


def shard_bounds(num_groups: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous, balanced block [start, stop) of group indices for `rank`; uneven sizes differ by at most 1."""
    base, extra = divmod(num_groups, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_groups(num_groups: int, world_size: int, rank: int) -> list[int]:
    """The group indices `rank` holds: the contiguous block of `shard_bounds`, as a list."""
    start, stop = shard_bounds(num_groups, world_size, rank)
    return list(range(start, stop))


def max_groups_per_rank(num_groups: int, world_size: int) -> int:
    """Every rank runs this many group-steps (padding with zero-weight work) so collectives stay in lockstep."""
    return -(-num_groups // world_size)


def groups_per_block(rows_per_forward: int, group_size: int, num_groups: int | None = None) -> int:
    """Prompt groups decoded together: as many whole groups as fit in `rows_per_forward` rows, at least one; with
    `num_groups`, evened out over the blocks that needs (ceil(B / ceil(B / K))) so the last block is nearly full —
    it is padded with zero-weight copies (every rank runs the same passes). Depends on B, G and the rows only."""
    most = max(1, rows_per_forward // max(group_size, 1))
    if not num_groups:
        return most
    blocks = -(-num_groups // most)
    return -(-num_groups // blocks)


def block_ranges(num_groups: int, per_block: int) -> list[range]:
    """The fixed blocks of consecutive group indices [0, num_groups), `per_block` each (the last may be shorter):
    a function of the global order and the block size only, never of the world size."""
    return [range(start, min(start + per_block, num_groups)) for start in range(0, num_groups, per_block)]


def idle_rank_note(name: str, num_groups: int, group_size: int, rows_generate: int, world_size: int) -> str | None:
    """What to tell a user whose batch `name` (num_groups prompt groups of group_size rows, cut into blocks by
    memory.microbatch_generate = rows_generate) has fewer blocks than ranks — some ranks then decode and score only
    zero-weight copies: correct, but idle — or None. Blocks are fixed by the batch and microbatch_generate alone
    (never by the world size, so results agree across world sizes); the note names the largest
    microbatch_generate that gives every rank a block, found by cutting the blocks as `sample_batch` does."""
    def blocks(rows: int) -> int:
        return len(block_ranges(num_groups, groups_per_block(rows, group_size, num_groups)))

    have = blocks(rows_generate)
    if world_size <= 1 or have >= world_size:
        return None
    idle = (f"batch {name} makes {have} block(s) for {world_size} ranks: {world_size - have} rank(s) decode and "
            "score only zero-weight copies (results are unchanged; those ranks add no speed)")
    fit = next((r for r in range(rows_generate - 1, 0, -1) if blocks(r) >= world_size), None)
    if fit is None:
        return f"{idle}; it has {num_groups} prompt group(s): give it at least {world_size} prompts or run fewer ranks"
    return f"{idle}; memory.microbatch_generate={fit} gives every rank a block"
