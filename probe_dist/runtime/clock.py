"""The phase clock: wall time (and with memory.profile, memory) per phase of a probe run, and the test hooks that
inject a fault or a signal as a phase starts (debug.fault, debug.signal)."""

from __future__ import annotations

import os
import signal as signal_module
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from probe_dist.runtime import progress
from probe_dist.runtime.meter import PhaseMemoryRecorder, merge_phase_records


@dataclass
class PhaseClock:
    """Wall time (and with memory.profile, memory) per phase. Test hooks: `fault` ("<rank>:<phase>", debug.fault)
    raises as the phase starts; `signal` ("<rank>:<phase>:<SIGNAME>", debug.signal) sends the signal then."""

    rank: int = 0
    fault: str | None = None
    signal: str | None = None
    profile: bool = False
    device: torch.device = torch.device("cpu")
    seconds: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str, label: str | None = None):
        """Context that times phase `name` (seconds add up over repeated entries, also for a phase that raises;
        with `profile`, memory too, for phases that finish), under a progress bar titled `label` (default: the
        name) when bars are on (runtime/progress.py).
        On entry it raises RuntimeError when debug.fault names this rank and phase, and sends debug.signal."""
        if self.fault and self.fault == f"{self.rank}:{name}":
            raise RuntimeError(f"injected fault (debug.fault={self.fault})")
        send_test_signal(self.signal, self.rank, name)
        recorder = PhaseMemoryRecorder(self.device) if self.profile else nullcontext()
        start = time.perf_counter()
        try:
            with recorder, progress.phase(label or name):  # recorder: resets the CUDA peaks and peak RSS,
                yield                                           # meters bytes saved for backward
        finally:  # a phase that ends by a stop or an error still reports the time it took
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        if self.profile:
            self.memory[name] = merge_phase_records(self.memory.get(name), recorder.result)


def send_test_signal(spec: str | None, rank: int, phase: str) -> None:
    """debug.signal "<rank>:<phase>:<SIGNAME>": this process signals itself as `phase` starts on `rank`."""
    if spec:
        where, _, name = spec.rpartition(":")
        if where == f"{rank}:{phase}":
            os.kill(os.getpid(), getattr(signal_module, name))
