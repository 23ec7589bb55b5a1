"""The policy as every step uses it: one microbatch forward (through the DDP/FSDP2 root), gradient hygiene, and
the reference policy (adapter disabled).

Each step (scoring, update, prediction, measurement) receives a `PolicyRunner` and the config section it needs,
never the whole probe.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from probe_dist.rollout.batch import Microbatch
from probe_dist.runtime.oom import MicrobatchSizes, run_groups
from probe_dist.runtime.strategy import Strategy


@dataclass
class PolicyRunner:
    """The policy as every step uses it: the model, how it is wrapped (`strategy`), θ as (name,
    parameter) pairs in optimizer order, τ, the microbatch sizes in use, and the gradient helpers (float64
    accumulators)."""

    model: torch.nn.Module                               # PeftModel (or a plain causal LM)
    strategy: Strategy                                   # how the policy is wrapped across ranks
    trainable: list[tuple[str, torch.nn.Parameter]]      # in optimizer order
    device: torch.device
    temperature: float                                   # τ of sampling and scoring
    sizes: MicrobatchSizes                               # rows per pass, as actually used
    accumulator_device: str = "cpu"                      # where param-sized float64 accumulators live
    auto_microbatch: bool = False                        # halve sizes and rerun on OOM (all ranks together)
    reward_model: object = None                          # GRADE's r_φ (model.reward_model.RewardModel), frozen

    @classmethod
    def single_process(cls, model: torch.nn.Module, *, temperature: float, rows: int,
                       device: torch.device | None = None, logits_chunk: int = 1024) -> PolicyRunner:
        """An unwrapped runner (world size 1) over `model`'s trainable parameters, `rows` rows per pass: what the
        toy builder and the tests use to run the probe's own forwards outside a probe run."""
        from probe_dist.model.policy import PolicyModel
        from probe_dist.state.model import trainable_parameters

        policy = PolicyModel(model, logits_chunk)
        return cls(model=model, strategy=Strategy("none", policy, policy, policy), trainable=trainable_parameters(model),
                   device=device or torch.device("cpu"), temperature=temperature, sizes=MicrobatchSizes(score=rows, grad=rows, jvp=rows))

    def forward(self, mb: Microbatch, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced (ℓ, H) of the scored tokens: two [M] float32 tensors on the device (float64 for a
        float64 model; docs/method.md §3)."""
        dev = self.device
        with torch.set_grad_enabled(grad):
            return self.strategy.root(input_ids=mb.input_ids.to(dev, non_blocking=True),
                                      attention_mask=mb.attention_mask.to(dev, non_blocking=True),
                                      response_start=mb.response_start,
                                      response_mask=mb.response_mask.to(dev, non_blocking=True),
                                      temperature=self.temperature)

    def run_groups(self, rt, kind: str, groups, *, start, step):
        """`runtime.oom.run_groups` over `groups` with this runner's sizes (`kind` "score", "grad" or "jvp"): a safe point
        after every group (stop signals, lockstep OOM retry); returns the state `start()` made and `step` filled."""
        return run_groups(rt, self.sizes, kind, groups, start=start, step=step, auto=self.auto_microbatch,
                          on_oom=self.zero_grads)

    @property
    def decoder(self):
        """What generation calls (`.decode`); FSDP2 registers it as a forward method."""
        return self.strategy.decoder

    def no_sync(self):
        """Context in which backward passes skip the wrapper's gradient all-reduce (`Strategy.no_sync`): the
        probe reduces gradients itself, in float64."""
        return self.strategy.no_sync()

    def reference(self):
        """Context in which forwards are the reference policy π_ref (LoRA adapter disabled)."""
        return self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext()

    def zero_grads(self) -> None:
        """Set .grad of every trainable parameter to None."""
        for _, p in self.trainable:
            p.grad = None

    def take_grads(self) -> list[torch.Tensor]:
        """This microbatch's gradient as float64 CPU tensors (zeros where none); .grad is cleared."""
        out = [torch.zeros(p.shape, dtype=torch.float64) if p.grad is None
               else p.grad.detach().to("cpu", torch.float64) for _, p in self.trainable]
        self.zero_grads()
        return out

    def new_accumulator(self) -> list[torch.Tensor]:
        """Param-shaped float64 zeros on `accumulator_device` (CPU by default)."""
        dev = "cpu" if self.accumulator_device == "cpu" else self.device
        return [torch.zeros(p.shape, dtype=torch.float64, device=dev) for _, p in self.trainable]

    def drain_grads_into(self, accumulator: list[torch.Tensor]) -> None:
        """accumulator += .grad in float64 (exact for float32 terms, so independent of the world size); clears .grad."""
        for acc, (_, p) in zip(accumulator, self.trainable):
            if p.grad is not None:
                acc += p.grad.detach().to(acc.device, torch.float64)
                p.grad = None
