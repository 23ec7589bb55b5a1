"""The training state as one object: what the probe measures one optimizer step of, whatever it came from.

    state = load_training_state(open_checkpoint(cfg.checkpoint), tokenizer, ...)   # files (state.files)
    state = TrainingState.from_objects(model, optimizer, tokenizer, recipe=args)    # a running trainer's objects

Both end in the same object: the model with its adapter, the trainable parameters in optimizer order, the probe's
own torch AdamW over them holding the training optimizer's state (never the trainer's optimizer itself: the
probe's steps and the `lr_ratio` it records stay out of the trainer's hands), the tokenizer, the recorded recipe
with its kind and file, the lr scheduler's lrs, and the provenance the summary records.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from probe_dist.errors import CheckpointError
from probe_dist.state.model import check_trainable_count, config_max_positions, trainable_parameters
from probe_dist.state.optimizer import check_optimizer_blob, load_optimizer, set_lr_ratios
from probe_dist.state.recipe import Recipe
from probe_dist.state.source import SchedulerState

log = logging.getLogger("probe_dist")

IN_MEMORY = Path("<in-memory optimizer>")  # what messages about an in-memory optimizer name as its "file"


@dataclass
class TrainingState:
    """One training state. `trainable` lists (name, parameter) in the optimizer's group order; `optimizer` is a
    torch AdamW over exactly those parameters, with every state tensor (exp_avg, exp_avg_sq, step) and each
    group's "lr_ratio" to the first group's lr (η is the first group's). `provenance` holds the summary keys of
    where it came from (provenance/checkpoint_source, optimizer_coverage, trainable_params, lr_ratios,
    checkpoint_inconsistencies, load_warnings)."""

    model: torch.nn.Module                                 # PeftModel (or a plain causal LM), on its device
    trainable: list[tuple[str, torch.nn.Parameter]]        # in optimizer order
    optimizer: torch.optim.Optimizer                       # the probe's AdamW holding the training state
    tokenizer: Any
    recipe: Recipe = field(default_factory=Recipe)         # recorded training settings (plain data)
    scheduler: SchedulerState | None = None                # the lr schedule's base and next lrs
    ref_adapter: Path | None = None                        # TRL's KL-reference adapter (ref/), when saved
    max_positions: int | None = None                       # the model's maximum positions (None: no limit known)
    config_file: Path | None = None                        # where max_positions was read, for messages
    provenance: dict = field(default_factory=dict)

    @property
    def has_adapter(self) -> bool:
        """Whether the policy is a base with an adapter (the reference policy is then the adapter disabled)."""
        return hasattr(self.model, "disable_adapter")

    @classmethod
    def from_objects(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokenizer, *,
                     recipe: Recipe | dict | Any | None = None, scheduler: Any = None,
                     max_trainable_params: int = 50_000_000, allow_full_finetune: bool = False) -> TrainingState:
        """The state of a training run held in memory (a trainer's model, optimizer, tokenizer and arguments).

        model: the policy (a peft model, or a causal LM whose trainable parameters the optimizer steps); optimizer:
        the run's torch AdamW (its state is copied, never modified; a parameter the optimizer has not stepped yet
        gets the zero moments and step 0 that AdamW's first step would create); recipe: the recorded training
        settings — a `Recipe`, a dict in probe_dist's keys (temperature, max_new_tokens, loss, ...), or an HF
        `TrainingArguments` / TRL `GRPOConfig` (read with `to_dict()`); scheduler: the run's torch lr scheduler
        (its base lrs and last lrs give the group ratios and η_train), or None.
        Raises CheckpointError (a UserInputError) when the optimizer is not AdamW, does not hold exactly the
        model's trainable parameters, or holds unusable state; and when there are too many trainable parameters
        (max_trainable_params, unless allow_full_finetune)."""
        trainable = trainable_parameters(model)
        count = check_trainable_count(trainable, max_trainable_params, allow_full_finetune)
        name_of = {id(p): n for n, p in model.named_parameters()}
        stepped = [p for g in optimizer.param_groups for p in g["params"]]
        foreign = [p for p in stepped if id(p) not in name_of]
        if foreign:
            raise CheckpointError(f"the optimizer steps {len(foreign)} tensor(s) that are not parameters of the model "
                                  f"(e.g. of shape {tuple(foreign[0].shape)}): pass the model the optimizer was built on.")
        state_dict = copy.deepcopy(optimizer.state_dict())  # the trainer's tensors are never aliased
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for pid, p in zip(ids, stepped):
            if pid not in state_dict["state"]:  # not stepped yet: what AdamW's first step initialises
                fresh = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                         "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
                if group.get("amsgrad"):
                    fresh["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state_dict["state"][pid] = fresh
        blob = {"optimizer_class": type(optimizer).__name__, "param_names": [name_of[id(p)] for p in stepped],
                "state_dict": state_dict}
        check_optimizer_blob(blob, IN_MEMORY)
        probe_optimizer, coverage = load_optimizer(IN_MEMORY, trainable, blob=blob)
        sched = _scheduler_state(scheduler)
        lr_ratios = set_lr_ratios(probe_optimizer, sched.base_lrs if sched else None)
        by_id = {id(p): (n, p) for n, p in trainable}
        ordered = [by_id[id(p)] for g in probe_optimizer.param_groups for p in g["params"]]
        recipe = _recipe(recipe)
        config = getattr(model, "config", None)
        source = {"format": "in_memory", "model_class": type(model).__name__,
                  "optimizer_class": type(optimizer).__name__, "recipe_class": recipe.class_name}
        return cls(model=model, trainable=ordered, optimizer=probe_optimizer, tokenizer=tokenizer, recipe=recipe,
                   scheduler=sched, max_positions=config_max_positions(config) if config is not None else None,
                   provenance={"provenance/optimizer_coverage": coverage, "provenance/trainable_params": count,
                               "provenance/checkpoint_source": source, "provenance/lr_ratios": lr_ratios,
                               "provenance/checkpoint_inconsistencies": [], "provenance/load_warnings": []})


def _scheduler_state(scheduler) -> SchedulerState | None:
    """A live torch lr scheduler's base lrs and last lrs (the lrs of the next step), or None."""
    if scheduler is None or isinstance(scheduler, SchedulerState):
        return scheduler
    base = getattr(scheduler, "base_lrs", None)
    last = scheduler.get_last_lr() if hasattr(scheduler, "get_last_lr") else None
    return SchedulerState(path=f"in memory: {type(scheduler).__name__}",
                          base_lrs=[float(x) for x in base] if base is not None else None,
                          next_lrs=[float(x) for x in last] if last is not None else None)


def _recipe(recipe) -> Recipe:
    """A `Recipe` from what `from_objects` accepts (see there)."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe is None:
        return Recipe(label="the in-memory training state (TrainingState.from_objects without recipe=)")
    if isinstance(recipe, dict):
        return Recipe(fields=dict(recipe), kind="probe_dist",
                      label="the recipe given to TrainingState.from_objects")
    if hasattr(recipe, "to_dict"):
        cls = f"{type(recipe).__module__}.{type(recipe).__qualname__}"
        return Recipe(fields=recipe.to_dict(), kind="trl" if cls.startswith("trl.") else "hf_trainer",
                      class_name=cls, label=f"the training arguments ({type(recipe).__name__}) given in memory")
    raise TypeError(f"recipe must be a Recipe, a dict or a TrainingArguments-like object, got {type(recipe).__name__}")
