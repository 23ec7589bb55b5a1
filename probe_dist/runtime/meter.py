"""Memory measurement: bytes saved for backward, process RSS, CUDA allocator peaks — per phase.

What a run measures, next to what the planner (probe_dist.plan.bytes) predicts. Why bytes *saved for backward*:
on CPU there is no allocator to ask, and RSS is dominated by the interpreter, the libraries and the model. What
grows with the microbatch — and what grows with the whole batch when a graph is kept across microbatches — is the
autograd graph: the tensors each op keeps for its backward. `SavedTensorsMeter` counts them exactly through
`torch.autograd.graph.saved_tensors_hooks`:

- the pack hook records the tensor's storage (each storage counted once, however many views of it are saved)
  and returns a small holder object that keeps the tensor;
- when autograd frees the graph (after backward, or when the graph is dropped) the holders are released and
  their bytes leave the running total — CPython frees them immediately, no garbage collection needed.

Parameters (and views of them, e.g. the transposed weight a linear layer saves) are excluded by default: they
live in memory anyway, so they are not "activations". Storages counted by an enclosing phase meter are counted
by every active meter: meters nest (one hook pair is installed for all of them).

Limitations: saved-tensor hooks are per thread, so a meter sees the graphs built by the thread that entered it
(the probe builds every graph on its main thread); tensors kept alive by other means than autograd's saved-tensor
slots are not seen; torch.func.{grad, vjp, jacrev, hessian} refuse to run under saved-tensor hooks (torch.func.jvp
works), so the probe calls none of them (its reverse-mode gradients use torch.autograd.grad, which the hooks meter;
tests/test_memory_profile.py runs every update path and estimator with memory.profile=true).
"""

from __future__ import annotations

import os
import threading
from contextlib import AbstractContextManager

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# ---------------------------------------------------------------------------------------------- RSS
def rss_bytes() -> int:
    """Current resident set size of this process (from /proc/self/statm; ru_maxrss where there is no /proc)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size: VmHWM (since the last `reset_peak_rss`), else the process lifetime peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs). False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------- saved tensors
def _is_parameter(t: torch.Tensor) -> bool:
    if isinstance(t, torch.nn.Parameter):
        return True
    base = getattr(t, "_base", None)
    return isinstance(base, torch.nn.Parameter)


def _storage_key_and_bytes(t: torch.Tensor) -> tuple[tuple, int]:
    local = t.to_local() if hasattr(t, "to_local") else t  # DTensor (FSDP2): this rank's shard
    try:
        storage = local.untyped_storage()
        return (str(local.device), storage.data_ptr()), int(storage.nbytes())
    except (RuntimeError, NotImplementedError, TypeError):  # sparse / nested / exotic subclasses
        return ("id", id(local)), int(local.numel() * local.element_size())


class _Hub:
    """The single pair of saved-tensor hooks shared by all active meters (hooks do not compose when nested)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.meters: list[SavedTensorsMeter] = []
        self.ctx: AbstractContextManager | None = None

    def attach(self, meter: SavedTensorsMeter) -> None:
        with self.lock:
            self.meters.append(meter)
            if self.ctx is None:
                self.ctx = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
                self.ctx.__enter__()

    def detach(self, meter: SavedTensorsMeter) -> None:
        with self.lock:
            if meter in self.meters:
                self.meters.remove(meter)
            if not self.meters and self.ctx is not None:
                ctx, self.ctx = self.ctx, None
                ctx.__exit__(None, None, None)


_HUB = _Hub()


class _Held:
    """What the graph stores instead of the tensor; releasing it releases the tensor's bytes from the meters."""

    __slots__ = ("tensor", "key", "meters")

    def __init__(self, tensor, key, meters):
        self.tensor, self.key, self.meters = tensor, key, meters

    def __del__(self):
        try:
            for m in self.meters:
                m._release(self.key)
        except Exception:  # noqa: BLE001 - never raise from a finaliser (e.g. at interpreter exit)
            pass


def _pack(t: torch.Tensor):
    with _HUB.lock:
        meters = [m for m in _HUB.meters if m.include_parameters or not _is_parameter(t)]
        if not meters:
            return t
        key, nbytes = _storage_key_and_bytes(t)
        for m in meters:
            m._add(key, nbytes)
    # Keep a detached alias: holding the output tensor itself (which points to its grad_fn, which holds this
    # object) would make a reference cycle through C++ that Python's collector cannot see — the graph would
    # never be freed if it is dropped without backward. Autograd restores grad_fn on unpack.
    return _Held(t.detach(), key, meters)


def _unpack(packed):
    return packed.tensor if isinstance(packed, _Held) else packed


class SavedTensorsMeter:
    """Current and peak bytes of tensors saved for backward while the context is active.

        with SavedTensorsMeter() as meter:
            loss = model(x).sum()
            loss.backward()
        meter.peak_bytes   # the largest graph that existed at once (activations, not parameters)

    `current_bytes` drops back when autograd frees the graph. Meters nest; `reset_peak()` restarts the peak.
    """

    def __init__(self, include_parameters: bool = False):
        self.include_parameters = include_parameters
        self.current_bytes = 0
        self.peak_bytes = 0
        self.tensors_saved = 0
        self._refs: dict[tuple, list[int]] = {}  # storage key -> [references held by graphs, nbytes]
        self._lock = threading.RLock()

    def _add(self, key, nbytes: int) -> None:
        with self._lock:
            self.tensors_saved += 1
            entry = self._refs.get(key)
            if entry is None:
                self._refs[key] = [1, nbytes]
                self.current_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            else:
                entry[0] += 1

    def _release(self, key) -> None:
        with self._lock:
            entry = self._refs.get(key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] == 0:
                del self._refs[key]
                self.current_bytes -= entry[1]

    def reset_peak(self) -> None:
        """Restart the peak from the bytes held now (peak_bytes = current_bytes)."""
        with self._lock:
            self.peak_bytes = self.current_bytes

    def __enter__(self) -> SavedTensorsMeter:
        _HUB.attach(self)
        return self

    def __exit__(self, *exc) -> None:
        _HUB.detach(self)


# ---------------------------------------------------------------------------------------- per phase
def phase_memory(device: torch.device | str) -> dict:
    """Current memory of this process: RSS now and its peak (since the last reset), CUDA allocator figures."""
    device = torch.device(device)
    out = {"rss_bytes": rss_bytes(), "rss_peak_bytes": peak_rss_bytes()}
    if device.type == "cuda" and torch.cuda.is_available():
        out["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated(device))
        out["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["cuda_reserved_bytes"] = int(torch.cuda.memory_reserved(device))
        out["cuda_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
    return out


class PhaseMemoryRecorder:
    """Everything one phase needs: resets the peaks on entry, meters saved tensors, records on exit.

        with PhaseMemoryRecorder(device) as rec:
            ...phase...
        rec.result   # {"rss_bytes", "rss_peak_bytes", "rss_start_bytes", "rss_growth_bytes" (peak − start),
                     #  "saved_peak_bytes", "saved_current_bytes", ("cuda_*" on GPU),
                     #  "rss_peak_scope": "phase" (VmHWM was reset at entry) | "process" (lifetime peak)}
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.meter = SavedTensorsMeter()
        self.result: dict = {}
        self._rss_reset = False
        self._rss_start = 0

    def __enter__(self) -> PhaseMemoryRecorder:
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(self.device)
        self._rss_reset = reset_peak_rss()
        self._rss_start = rss_bytes()
        self.meter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.meter.__exit__(*exc)
        mem = phase_memory(self.device)
        self.result = {**mem, "rss_start_bytes": self._rss_start,
                       "rss_growth_bytes": max(0, mem["rss_peak_bytes"] - self._rss_start),
                       "rss_peak_scope": "phase" if self._rss_reset else "process",
                       "saved_peak_bytes": self.meter.peak_bytes, "saved_current_bytes": self.meter.current_bytes}


_PEAK_KEYS = ("rss_peak_bytes", "rss_growth_bytes", "saved_peak_bytes", "cuda_peak_allocated_bytes",
              "cuda_peak_reserved_bytes")


def merge_phase_records(old: dict | None, new: dict) -> dict:
    """Combine two records of the same phase (e.g. the sweep, entered once per η): max of peaks, latest currents."""
    if not old:
        return dict(new)
    out = dict(new)
    for key in _PEAK_KEYS:
        if key in old or key in new:
            out[key] = max(old.get(key, 0), new.get(key, 0))
    if "rss_start_bytes" in old:
        out["rss_start_bytes"] = old["rss_start_bytes"]
    return out
