"""The online probe: a `transformers.TrainerCallback` that predicts the entropy change of the trainer's real
optimizer step and measures it after the step (docs/method.md §12), inside TRL's GRPOTrainer or any HF Trainer.

    from probe_dist.callback import EntropyProbeCallback
    trainer.add_callback(EntropyProbeCallback(trainer=trainer, every_n_steps=10, eval_prompts="prompts.jsonl"))

Every `every_n_steps` optimizer steps: at `on_pre_optimizer_step` (θ_t, the accumulated and clipped gradient in
`.grad`, the AdamW state before the step) it samples E at θ_t, computes Ĥ(θ_t), the AdamW update u of that
gradient and δH₁ = η∇Ĥ·u (η the first group's lr of this step); at `on_optimizer_step` (θ_{t+1}) ΔH_true on the
same samples by SNIS, and the relative distance of the real step θ_{t+1} − θ_t from ηu (`update_match`: a fused
or 8-bit optimizer shows here, with a warning, instead of as a wrong δH₁). Training is untouched: parameters,
`.grad`, RNG states and train/eval flags are restored bit for bit (verified by hash), the trainer's optimizer and
scheduler are only read. The numbers are logged under `entropy_probe/` through the trainer's own `log` (its
`state.log_history` and every `report_to` logger) when the callback is given `trainer=`; without it they are
appended to `state.log_history` only.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback

from probe_dist.assemble import probe_from_state
from probe_dist.config import load_config
from probe_dist.data.prompts import load_prompts_with_lines
from probe_dist.errors import UserInputError
from probe_dist.online import measure_step, predict_step
from probe_dist.runtime.dist import runtime_of_process_group
from probe_dist.state.training import TrainingState
from probe_dist.update.loss import LOSS_FAMILIES

log = logging.getLogger("probe_dist")

PREFIX = "entropy_probe/"
# update_match above this (and above 10× what the parameters' rounding allows) means the optimizer is not the
# AdamW the probe rebuilds (a fused/8-bit/other optimizer, or a step that skipped): δH₁ describes another step.
UPDATE_MATCH_WARN = 1e-2


class OnlineProbeError(UserInputError, ValueError):
    """The online probe cannot run on this training setup; the message names the setup and what is supported."""


def no_reward(prompts, completions, **kwargs) -> list[float]:
    """A reward of 0 for every completion: E's rewards play no part in δH₁ or ΔH_true (TRL's reward convention,
    so prompts need no "answer" column)."""
    return [0.0] * len(completions)


class EntropyProbeCallback(TrainerCallback):
    """Probe every `every_n_steps`-th optimizer step of an HF / TRL trainer (see the module docstring).

    eval_prompts: the prompt source of E (as `sampling.prompts`: "toy", a JSONL file of {"prompt": ...} rows, a
    `datasets` folder or data file) or a list of {"prompt": ...} dicts; B_E, G_E: E's prompts and responses per
    prompt; seed: E's sampling seed (step t uses seed + t, so every probed step draws fresh samples); trainer: the
    trainer, to log through it (else `state.log_history` only); overrides: further probe config keys
    ("section.key=value", e.g. "sampling.temperature=0.7" for a trainer whose arguments record none).
    Raises OnlineProbeError at `on_train_begin` for a setup it cannot probe (every_n_steps < 1, DeepSpeed or FSDP,
    an optimizer other than torch AdamW, no trainable parameters, prompts that cannot be read)."""

    def __init__(self, every_n_steps: int = 10, eval_prompts="toy", B_E: int = 16, G_E: int = 4, *, seed: int = 0,
                 trainer=None, overrides: list[str] | tuple[str, ...] = ()):
        self.every_n_steps, self.eval_prompts, self.B_E, self.G_E = every_n_steps, eval_prompts, B_E, G_E
        self.seed, self.trainer, self.overrides = seed, trainer, list(overrides)
        self.rt = None
        self._prompts_file = None
        self._pending = None          # (probe, prediction) between the two hooks of a probed step
        self._metrics = None          # the last probed step's numbers, logged at on_step_end
        self._checked_sampler = False
        self.phase_seconds: dict[str, float] = {}  # wall time per probe phase, summed over the probed steps

    # ------------------------------------------------------------------------------------------------ set-up
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       processing_class=None, **kwargs):
        """Refuse what cannot be probed, with the supported setups named; set up the runtime of this process; and
        assemble the probe once on the trainer's objects, so that a prompt, an override or a recipe setting the
        probe cannot use fails now, not at the first probed step."""
        every = self.every_n_steps
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise OnlineProbeError(f"EntropyProbeCallback(every_n_steps={self.every_n_steps!r}): give an integer ≥ 1 "
                                   "(probe every n-th optimizer step).")
        if any(o.replace(" ", "") == "rollout.backend=vllm" for o in self.overrides):
            raise OnlineProbeError(
                "EntropyProbeCallback samples E with the probe's own decoder at every probed step; "
                "rollout.backend=vllm is for the offline probe (python -m probe_dist.main), where one engine serves "
                "the whole run. Drop the override (E is small online: a few prompt groups).")
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise OnlineProbeError(
                "EntropyProbeCallback runs with single-process training and with DDP (accelerate launch / torchrun, "
                "any number of processes), not with DeepSpeed or FSDP: the parameters it reads and the optimizer "
                "state it rebuilds are sharded there. Train with DDP to probe online, or save checkpoints and run "
                "the offline probe (python -m probe_dist.main) on them.")
        inner = _unwrap_optimizer(optimizer)
        if inner is None or type(inner).__name__ != "AdamW":
            raise OnlineProbeError(
                f"EntropyProbeCallback needs torch.optim.AdamW (optim=adamw_torch or adamw_torch_fused); the trainer "
                f"uses {type(inner).__name__ if inner is not None else 'no optimizer'}, whose step the probe does not "
                "reproduce.")
        if model is None or not any(p.requires_grad for p in model.parameters()):
            raise OnlineProbeError("EntropyProbeCallback: the model has no trainable parameters.")
        self._write_prompt_list()
        self.rt = runtime_of_process_group(next(model.parameters()).device)
        load_prompts_with_lines(self._prompts_file or self.eval_prompts, "train", require_answer=False)
        state_0 = TrainingState.from_objects(model, inner, processing_class, recipe=args,
                                             scheduler=getattr(lr_scheduler, "scheduler", lr_scheduler))
        with training_precision():
            probe_from_state(self._config(args, 0, float(inner.param_groups[0]["lr"]) or 1e-3), state_0, self.rt)

    def _write_prompt_list(self) -> None:
        """eval_prompts given as objects (a list of {"prompt": ...}, or a `datasets.Dataset`): checked, then written
        to a temporary JSONL file that the probe reads as a prompt source (removed at the end of training, or at
        exit if training fails)."""
        rows = self.eval_prompts
        if isinstance(rows, str | os.PathLike):
            self.eval_prompts = str(rows)
            return
        if hasattr(rows, "to_list"):  # datasets.Dataset
            rows = rows.to_list()
        if not isinstance(rows, list | tuple) or not rows:
            raise OnlineProbeError(
                f"EntropyProbeCallback(eval_prompts=...) takes a prompt source (\"toy\", a JSONL file, a datasets "
                f"folder or data file), a non-empty list of {{\"prompt\": ...}} dicts or a datasets.Dataset with a "
                f"\"prompt\" column; got {type(self.eval_prompts).__name__}{' (empty)' if not rows else ''}.")
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict) or "prompt" not in r), None)
        if bad is not None:
            raise OnlineProbeError(f"EntropyProbeCallback(eval_prompts=...): item {bad} is {rows[bad]!r:.80}, not a "
                                   "dict with a \"prompt\" (a text, or a list of chat messages).")
        fd, name = tempfile.mkstemp(prefix="entropy-probe-eval_prompts-", suffix=".jsonl")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, default=str) + "\n" for row in rows)
        self._prompts_file = name
        atexit.register(Path(name).unlink, missing_ok=True)

    def on_train_end(self, args, state, control, **kwargs):
        """Remove the temporary prompt file of a list of prompts."""
        if self._prompts_file is not None:
            Path(self._prompts_file).unlink(missing_ok=True)
            self._prompts_file = None

    # ------------------------------------------------------------------------------------------------ one step
    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                              processing_class=None, **kwargs):
        """Before `optimizer.step()` of a probed step: predict (δH₁ of the real gradient's AdamW step)."""
        if (state.global_step + 1) % self.every_n_steps:
            return
        inner = _unwrap_optimizer(optimizer)
        state_t = TrainingState.from_objects(model, inner, processing_class, recipe=args,
                                             scheduler=getattr(lr_scheduler, "scheduler", lr_scheduler))
        eta = float(inner.param_groups[0]["lr"])
        cfg = self._config(args, state.global_step + 1, eta)
        quiet = log.level
        if self._checked_sampler:
            log.setLevel(logging.WARNING)  # the recipe and plan are logged once, at the first probed step
        try:
            with training_precision():  # the probe sets `highest` for its passes; training keeps its own
                probe = probe_from_state(cfg, state_t, self.rt)
                grad = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in state_t.trainable]
                with plain_forward(model):
                    prediction = predict_step(probe, grad, eta, check_sampler=not self._checked_sampler)
        finally:
            log.setLevel(quiet)
        self._checked_sampler = True
        self._pending = (probe, prediction)

    def on_optimizer_step(self, args, state, control, **kwargs):
        """After `optimizer.step()` of a probed step: measure ΔH_true and the update's match."""
        if self._pending is None:
            return
        probe, prediction = self._pending
        self._pending = None
        with training_precision(probe.cfg.precision.matmul), plain_forward(probe.model):
            metrics = measure_step(probe, prediction)
        for phase, seconds in probe.clock.seconds.items():
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds
        limit = max(UPDATE_MATCH_WARN, 10 * metrics["update_match_rounding"])
        if self.rt.is_main and not metrics["update_match"] <= limit:
            log.warning("entropy probe, step %d: the optimizer's real step differs from the AdamW step the probe "
                        "rebuilt by %.3g (relative), more than its rounding allows (%.2g): the trainer's optimizer "
                        "is not torch AdamW as saved (fused, 8-bit, a skipped step?), so δH₁ describes another step.",
                        state.global_step + 1, metrics["update_match"], limit)
        self._metrics = metrics

    def on_step_end(self, args, state, control, **kwargs):
        """Log the probed step's numbers under entropy_probe/ (through the trainer when it was given)."""
        if self._metrics is None:
            return
        logs = {PREFIX + k: (v if math.isfinite(v) else float("nan")) for k, v in self._metrics.items()}
        self._metrics = None
        if self.trainer is not None:
            from transformers import Trainer

            should_log = control.should_log  # the handler's on_log clears it: the trainer's own log must still run
            Trainer.log(self.trainer, logs)  # the base class's log: TRL's override would flush its own metrics
            control.should_log = should_log
        else:
            state.log_history.append({**logs, "step": state.global_step})

    # ------------------------------------------------------------------------------------------------ helpers
    def _config(self, args, step: int, eta: float = 1e-3):
        """The probe's config for probed step `step` (E's seed = seed + step), its η the step's lr. The update loss
        is not used (u comes from the real gradient): a trainer that records none gets grpo's to resolve."""
        source = self._prompts_file or self.eval_prompts
        recorded = args.to_dict() if hasattr(args, "to_dict") else {}
        given = recorded.get("loss_type") in LOSS_FAMILIES or any(o.startswith("update.loss=") for o in self.overrides)
        loss = [] if given else ["update.loss=grpo"]
        return load_config(None, [*loss,
            f"device={self.rt.device.type}", f"sampling.prompts={json.dumps(source)}", f"sampling.B_E={self.B_E}",
            f"sampling.G_E={self.G_E}", "sampling.B_U=2", f"sampling.seed={self.seed + step}",
            "sampling.reward=probe_dist.callback:no_reward", f"estimators.etas=[{eta!r}]", "estimators.explain=false",
            "estimators.eta_train=false", "update.ignore_unsupported_recipe=true", "update.kl_coef=0",
            # E is small by design: all its rows in one pass (measured: half the δH₁ phase's time of 8-row passes
            # on the toy); overrides may lower them for a large model
            f"memory.microbatch_score={self.B_E * self.G_E}", f"memory.microbatch_grad={self.B_E * self.G_E}",
            f"memory.microbatch_jvp={self.B_E * self.G_E}", "log_level=warning", *self.overrides])


@contextmanager
def training_precision(matmul: str | None = None):
    """torch's float32 matmul precision as training had it, restored after the block (the probe's passes run at
    `precision.matmul`, `highest` by default — set here when given, else by the probe's assembly)."""
    saved = torch.get_float32_matmul_precision()
    if matmul is not None:
        torch.set_float32_matmul_precision(matmul)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


# Forward hooks a trainer registers that forward-mode AD cannot run through: transformers'
# `enable_input_require_grads` (used with peft and gradient checkpointing) calls requires_grad_ on the embeddings.
SUSPENDED_HOOKS = ("make_inputs_require_grads",)


@contextmanager
def plain_forward(model: torch.nn.Module):
    """The model's own float32 forward inside the block, as the offline probe runs it. accelerate's mixed precision
    (`bf16=True`, TRL's default) replaces `forward` by an autocast wrapper and keeps the original as
    `_original_forward`: the original is put back for the block. Forward hooks named in SUSPENDED_HOOKS are left
    out for the block (each module's hook dict is swapped for a filtered copy). Everything is restored after,
    the same objects in the same order."""
    patched = [m for m in model.modules() if "_original_forward" in m.__dict__ and "forward" in m.__dict__]
    saved = [m.__dict__["forward"] for m in patched]
    hooked = [m for m in model.modules()
              if any(getattr(h, "__name__", "") in SUSPENDED_HOOKS for h in m._forward_hooks.values())]
    hooks = [m._forward_hooks for m in hooked]
    for m in patched:
        m.forward = m.__dict__["_original_forward"]
    for m, table in zip(hooked, hooks):
        m._forward_hooks = type(table)((k, h) for k, h in table.items()
                                       if getattr(h, "__name__", "") not in SUSPENDED_HOOKS)
    try:
        yield
    finally:
        for m, forward in zip(patched, saved):
            m.forward = forward
        for m, table in zip(hooked, hooks):
            m._forward_hooks = table


def _unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


__all__ = ["EntropyProbeCallback", "OnlineProbeError", "no_reward"]
