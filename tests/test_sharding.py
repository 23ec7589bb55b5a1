"""Blocks and ranks (probe_dist/runtime/sharding.py): the note for a batch with fewer blocks than ranks."""

from __future__ import annotations

import itertools

from probe_dist.runtime.sharding import block_ranges, groups_per_block, idle_rank_note


def test_idle_rank_note_names_a_block_size_that_gives_every_rank_a_block():
    """Over a grid of batches, group sizes, block rows and world sizes: no note when every rank gets a block (or one
    rank), a note exactly when some rank would hold only zero-weight copies, and the microbatch_generate it names
    gives at least world-size blocks (checked by cutting the blocks again, as sample_batch does)."""
    for prompts, group, rows, world in itertools.product((1, 3, 8, 16, 25), (1, 4, 8), (8, 64), (1, 2, 3, 8)):
        per_block = groups_per_block(rows, group, prompts)
        blocks = len(block_ranges(prompts, per_block))
        note = idle_rank_note("E", prompts, blocks, world, per_block * group)
        assert (note is None) == (world == 1 or blocks >= world), (prompts, group, rows, world)
        if note is None:
            continue
        if prompts < world:  # no block size helps: the note says so
            assert "run fewer ranks" in note and "microbatch_generate" not in note
            continue
        fit = int(note.rsplit("memory.microbatch_generate=", 1)[1].split()[0])
        again = len(block_ranges(prompts, groups_per_block(fit, group, prompts)))
        assert again >= world, (prompts, group, rows, world, fit, again)
