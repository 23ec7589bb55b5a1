"""Out-of-memory retry in lockstep: if any rank ran out of memory in a phase, every rank halves that phase's
microbatch size and reruns it (memory.auto_microbatch). Lives next to the collectives because the decision is one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

log = logging.getLogger("probe_dist")
T = TypeVar("T")


@dataclass
class MicrobatchSizes:
    """Rows per no-grad scoring forward and per forward+backward, as actually used (halved on OOM)."""

    score: int
    grad: int

    def as_dict(self) -> dict[str, int]:
        return {"score": self.score, "grad": self.grad}


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(exc).lower()


def run_with_oom_retry(rt, sizes: MicrobatchSizes, kind: str, local_fn: Callable[[], T], *, auto: bool,
                       on_oom: Callable[[], None]) -> T:
    """Run a collective-free local loop; if any rank ran out of memory, all ranks halve `sizes.<kind>` and rerun.

    kind: "score" or "grad". `on_oom` cleans up a failed attempt (gradients). Sums are float64 and each microbatch
    is group-local, so a rerun with a smaller size gives exactly what a run at that size from the start gives.
    Raises MemoryError when `auto` is off or the size is already 1; re-raises anything that is not an OOM.
    """
    while True:
        failed, result = False, None
        try:
            result = local_fn()
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are retried
            if not is_oom(exc):
                raise
            failed = True
            on_oom()
            if rt.device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("out of memory with microbatch_%s=%d", kind, getattr(sizes, kind))
        if not rt.any_flag(failed):
            return result
        current = getattr(sizes, kind)
        if not auto or current <= 1:
            raise MemoryError(f"out of memory at memory.microbatch_{kind}={current} on some rank; lower "
                              "memory.microbatch_* / memory.logits_chunk, or set memory.auto_microbatch=true.")
        setattr(sizes, kind, max(1, current // 2))
        log.warning("auto_microbatch: retrying with memory.microbatch_%s=%d", kind, max(1, current // 2))
