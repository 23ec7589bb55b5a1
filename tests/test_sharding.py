"""Blocks and ranks (probe_dist/runtime/sharding.py): the note for a batch with fewer blocks than ranks."""

from __future__ import annotations

import itertools

from probe_dist.runtime.sharding import block_ranges, groups_per_block, idle_rank_note


def _blocks(prompts: int, group: int, rows: int) -> int:
    """Blocks of a batch as sample_batch cuts them."""
    return len(block_ranges(prompts, groups_per_block(rows, group, prompts)))


def test_idle_rank_note_names_a_block_size_that_gives_every_rank_a_block():
    """Over a grid of batches, group sizes, block rows and world sizes (the 8-rank cases included, where a
    proportional guess such as rows·blocks/ranks leaves ranks idle): no note when every rank gets a block (or at one
    rank), a note exactly when some rank would hold only zero-weight copies, and the microbatch_generate it names
    gives at least world-size blocks while one row more would not (the largest that does), checked by cutting
    the blocks again; with fewer prompts than ranks it says that no block size helps."""
    for prompts, group, rows, world in itertools.product((1, 3, 8, 14, 16, 25, 100), (1, 4, 8), (8, 16, 64),
                                                         (1, 2, 3, 8)):
        note = idle_rank_note("E", prompts, group, rows, world)
        blocks = _blocks(prompts, group, rows)
        assert (note is None) == (world == 1 or blocks >= world), (prompts, group, rows, world)
        if note is None:
            continue
        assert f"{blocks} block(s) for {world} ranks" in note
        if prompts < world:
            assert "run fewer ranks" in note and "microbatch_generate" not in note
            continue
        fit = int(note.rsplit("memory.microbatch_generate=", 1)[1].split()[0])
        assert _blocks(prompts, group, fit) >= world, (prompts, group, rows, world, fit)
        assert fit + 1 >= rows or _blocks(prompts, group, fit + 1) < world, (prompts, group, rows, world, fit)
