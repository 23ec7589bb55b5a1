"""How the policy is wrapped across ranks: none (world size 1 or plain replicas), DDP, or FSDP2.

The probe reduces every gradient itself, in float64 on CPU (so results agree across world sizes to ~1e-15, and
every collective is a float64 sum, docs/architecture.md): DDP backward passes run under no_sync, and FSDP2 shards
the frozen base while the trainable adapter stays replicated. A float32 DDP all-reduce of gradients would make
the update depend on the world size at the 1e-7 level, and ΔH_true with it.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from probe_dist.model.policy import PolicyModel


@dataclass
class Strategy:
    """How the policy is wrapped (`build_strategy`): name "none", "ddp" or "fsdp2"; policy the PolicyModel;
    root what scoring forwards call (the DDP wrapper under ddp, else policy); decoder what generation
    calls."""

    name: str
    policy: PolicyModel
    root: torch.nn.Module      # what scoring forwards call
    decoder: object            # what generation calls (has .decode)

    def no_sync(self):
        """Context in which backward passes do not synchronise gradients: DDP's no_sync, FSDP2's
        set_requires_gradient_sync(False), else a nullcontext."""
        if self.name == "ddp":
            return self.root.no_sync()
        if self.name == "fsdp2":
            return _fsdp_no_sync(self.root)
        return nullcontext()


@contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def build_strategy(cfg, rt, model) -> Strategy:
    """Wrap `model` (PeftModel or causal LM) in a PolicyModel and as distributed.strategy says: unwrapped for
    "none" or world size 1; DDP; or FSDP2 sharding every decoder layer and the root, the trainable
    parameters left out (replicated). Raises ValueError for an unknown strategy."""
    policy = PolicyModel(model, cfg.memory.logits_chunk)
    name = cfg.distributed.strategy
    if name == "none" or rt.world_size == 1:
        # A wrapper over one rank changes nothing numerically; run unwrapped, same code path.
        return Strategy("none", policy, policy, policy)
    if name == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(policy, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                  find_unused_parameters=False, broadcast_buffers=False)
        return Strategy("ddp", policy, ddp, policy)
    if name == "fsdp2":
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        from probe_dist.model.policy import unwrap_causal_lm

        # Shard the frozen base; keep the (small) trainable adapter replicated and out of FSDP's hands, so its
        # gradients stay rank-local and the probe reduces them in float64 like every other sum.
        trainable = {p for p in model.parameters() if p.requires_grad}
        for layer in unwrap_causal_lm(model).get_decoder().layers:
            fully_shard(layer, ignored_params=trainable)
        fully_shard(policy, ignored_params=trainable)
        register_fsdp_forward_method(policy, "decode")
        register_fsdp_forward_method(policy, "scored_hidden")  # the second-order forward-mode pass's body
        return Strategy("fsdp2", policy, policy, policy)
    raise ValueError(f"unknown distributed.strategy {name!r}")
