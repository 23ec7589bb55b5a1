"""Snapshot / restore of the training state (docs/method.md §7), bit for bit.

Copies to CPU by clone — never through state_dict round trips that cast dtypes — and restores in place with
copy_ so tensor objects held elsewhere (the optimizer's state, FSDP shards) stay the same objects.
"""

from __future__ import annotations

import copy
import hashlib
import random
from dataclasses import dataclass, field

import numpy as np
import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters are DTensors: each rank snapshots and hashes its own shard.
    return t.to_local() if hasattr(t, "to_local") else t


def tensor_digest(h, t: torch.Tensor) -> None:
    """Feed `t` into the hashlib object `h`: its shape and dtype, then its raw bytes (a DTensor's local shard,
    copied to CPU). Updates `h` in place."""
    t = _local(t).detach().to("cpu").contiguous()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def state_hash(params: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer | None) -> str:
    """sha256 over parameters (local shards) and every optimizer state tensor, including `step`."""
    h = hashlib.sha256()
    for name, p in params:
        h.update(name.encode())
        tensor_digest(h, p)
    if optimizer is not None:
        for i, (_, p) in enumerate(params):
            for key, val in sorted(optimizer.state.get(p, {}).items()):
                h.update(f"{i}:{key}".encode())
                if torch.is_tensor(val):
                    tensor_digest(h, val)
                else:
                    h.update(repr(val).encode())
        for group in optimizer.param_groups:
            h.update(repr({k: v for k, v in group.items() if k != "params"}).encode())
    return h.hexdigest()


@dataclass
class Snapshot:
    """The training state copied to CPU by `take_snapshot` (docs/method.md §7): per trainable parameter its
    value and .grad (None: no grad), its optimizer state and the param groups (without params), the
    Python/NumPy/torch(/CUDA) RNG states, every module's training flag, and `state_hash` when taken."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    opt_state: list[dict]
    opt_groups: list[dict]
    rng: dict
    train_flags: dict = field(default_factory=dict)
    digest: str = ""


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def take_snapshot(model: torch.nn.Module, params: list[tuple[str, torch.nn.Parameter]],
                  optimizer: torch.optim.Optimizer | None) -> Snapshot:
    """Copy (clone, no dtype cast) `params` — (name, parameter) in optimizer order, local shards under FSDP2 —
    their grads, the optimizer's state and groups, the RNG states and `model`'s training flags to CPU, for
    `restore_snapshot` to put back bit for bit (docs/method.md §7)."""
    with torch.no_grad():
        snap = Snapshot(
            params=[_local(p).detach().to("cpu", copy=True) for _, p in params],
            grads=[None if p.grad is None else _local(p.grad).detach().to("cpu", copy=True) for _, p in params],
            opt_state=[], opt_groups=[], rng=_rng_state(),
            train_flags={name: m.training for name, m in model.named_modules()},
        )
        if optimizer is not None:
            for _, p in params:
                snap.opt_state.append({k: (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else copy.deepcopy(v))
                                       for k, v in optimizer.state.get(p, {}).items()})
            snap.opt_groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                               for g in optimizer.param_groups]
    snap.digest = state_hash(params, optimizer)
    return snap


def restore_snapshot(snap: Snapshot, model: torch.nn.Module, params: list[tuple[str, torch.nn.Parameter]],
                     optimizer: torch.optim.Optimizer | None) -> bool:
    """Copy everything back in place; return True iff the post-restore hash equals the snapshot's."""
    with torch.no_grad():
        for (_, p), saved, saved_grad in zip(params, snap.params, snap.grads):
            _local(p).copy_(saved)
            if saved_grad is None:
                p.grad = None
            elif p.grad is None:
                p.grad = saved_grad.to(p.device).clone()
            else:
                _local(p.grad).copy_(saved_grad)
        if optimizer is not None:
            for (_, p), saved_state in zip(params, snap.opt_state):
                live = optimizer.state.get(p)
                if not saved_state:
                    optimizer.state.pop(p, None)
                    continue
                if live is None:
                    optimizer.state[p] = live = {}
                for key in list(live.keys()):
                    if key not in saved_state:
                        del live[key]
                for key, val in saved_state.items():
                    if torch.is_tensor(val) and torch.is_tensor(live.get(key)) and live[key].shape == val.shape:
                        _local(live[key]).copy_(val)
                    elif torch.is_tensor(val):
                        live[key] = val.clone().to(p.device if val.dim() else val.device)
                    else:
                        live[key] = copy.deepcopy(val)
            for group, saved in zip(optimizer.param_groups, snap.opt_groups):
                group.update(copy.deepcopy(saved))
    for name, m in model.named_modules():
        if name in snap.train_flags:
            m.training = snap.train_flags[name]
    _set_rng_state(snap.rng)
    return state_hash(params, optimizer) == snap.digest
