"""The per-group loop of every phase, with a safe point after each group: stop signals and out-of-memory retries
are decided by all ranks together (memory.auto_microbatch). Lives next to the collectives because the decisions
are collectives."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from probe_dist.runtime import progress, signals

log = logging.getLogger("probe_dist")
G = TypeVar("G")
S = TypeVar("S")


@dataclass
class MicrobatchSizes:
    """Rows per no-grad scoring forward, per forward+backward and per forward-mode (jvp) pass, as actually used
    (halved on OOM)."""

    score: int
    grad: int
    jvp: int

    def as_dict(self) -> dict[str, int]:
        """{"score": rows, "grad": rows, "jvp": rows}, as provenance/microbatch records them."""
        return {"score": self.score, "grad": self.grad, "jvp": self.jvp}


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is an out-of-memory error: torch.OutOfMemoryError, MemoryError, or any exception whose
    message contains "out of memory" (case-insensitive)."""
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(exc).lower()


def run_groups(rt, sizes: MicrobatchSizes, kind: str, groups: Sequence[G], *, start: Callable[[], S],
               step: Callable[[int, G, S], None], auto: bool, on_oom: Callable[[], None],
               stop_requested: Callable[[], bool] = signals.requested) -> S:
    """state = start(); step(index, group, state) for each of this rank's groups; the final state.

    After every group all ranks meet at one safe point — one all-reduce of (stop requested, out of memory) — so a
    stop signal ends the phase on every rank within one group of work (raises StopRequested everywhere), and an
    out-of-memory error on any rank makes all ranks halve `sizes.<kind>` ("score", "grad" or "jvp") and restart the phase
    (memory.auto_microbatch). Every rank holds the same number of groups (lockstep padding), so the safe points
    line up. Steps must not communicate. Sums are float64 and each microbatch is group-local, so a rerun with a
    smaller size gives exactly what a run at that size from the start gives. `on_oom` cleans up (gradients).
    Raises MemoryError when `auto` is off or the size is already 1; re-raises anything that is not an OOM.
    """
    while True:
        state, failed, any_failed = start(), False, False
        pass_rows, done_rows = sum(_rows(g) for g in groups), 0
        progress.expect(pass_rows)  # a pass starts (again, after an OOM retry)
        for index, group in enumerate(groups):
            if not failed:
                try:
                    step(index, group, state)
                    progress.advance(_rows(group), _tokens(group))
                    done_rows += _rows(group)
                except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are retried
                    if not is_oom(exc):
                        raise
                    failed = True
                    on_oom()
                    if rt.device.type == "cuda":
                        torch.cuda.empty_cache()
                    log.warning("out of memory with microbatch_%s=%d", kind, getattr(sizes, kind))
            stop, any_failed = rt.any_flags(stop_requested(), failed)
            if stop:
                raise signals.StopRequested()
            if any_failed:
                break
        if not any_failed:
            return state
        progress.withdraw(pass_rows, done_rows)  # the retry announces the whole pass again
        current = getattr(sizes, kind)
        if not auto or current <= 1:
            raise MemoryError(f"out of memory at memory.microbatch_{kind}={current} on some rank; lower "
                              "memory.microbatch_* / memory.logits_chunk, or set memory.auto_microbatch=true.")
        setattr(sizes, kind, max(1, current // 2))
        log.warning("auto_microbatch: retrying with memory.microbatch_%s=%d", kind, max(1, current // 2))


def _rows(item) -> int:
    """Sequences in one item of a pass: a prompt group (`.size` rows) or a block of them."""
    return int(item.size) if hasattr(item, "size") else sum(int(g.size) for g in item)


def _tokens(item) -> int:
    """Response tokens in one item of a pass (for the progress bar's tokens/s; 0 when bars are off)."""
    if not progress.active():
        return 0
    groups = [item] if hasattr(item, "lengths") else list(item)
    return sum(int(g.lengths.sum()) for g in groups)
