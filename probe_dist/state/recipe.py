"""The training recipe a state records: every setting of the update the probe reproduces, read and checked.

`SETTINGS` maps each config key the recipe can fill to the recorded keys that give it — probe_dist's own (loss,
temperature, max_new_tokens, grad_clip, kl_coef, ...) and TRL's GRPOConfig (loss_type, max_completion_length,
max_grad_norm, beta, scale_rewards, epsilon_high, mask_truncated_completions, top_entropy_quantile, entropy_coef,
use_bias_correction_kl, bf16, per_device_train_batch_size, num_generations) — with the parser that types and
range-checks the value (`RecipeError` names the file, key, value and the override that fixes it).
`unsupported_training` names recorded training the probe cannot reproduce (stale samples, vLLM importance
correction, truncated sampling, another optimizer). TRL normalises advantages with ε = 1e-4 (a constant of its
code, not a setting). The config is resolved against a recipe (config > recipe > default) by `probe_dist.resolve`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probe_dist.errors import CheckpointError
from probe_dist.state.checks import is_number
from probe_dist.update.loss import LOSS_FAMILIES

log = logging.getLogger("probe_dist")

TRL_ADV_EPS = 1e-4  # trl GRPOTrainer: advantages / (std + 1e-4)
TRL_ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused")


class RecipeError(CheckpointError):
    """The checkpoint records a setting the probe would use with a wrong type or out of range, or training the
    probe cannot reproduce."""


@dataclass(frozen=True)
class Recipe:
    """The training settings a checkpoint (or a live trainer) records, as plain data.

    fields: the recorded keys and values (probe_dist's own names, or HF Trainer / TRL's); kind: whose keys
    ("probe_dist", "trl", "hf_trainer", "none"); path: the file they came from (None: none, or in memory);
    class_name: the recorded arguments' class (e.g. trl.trainer.grpo_config.GRPOConfig)."""

    fields: dict = field(default_factory=dict)
    kind: str = "none"
    path: Path | None = None
    class_name: str | None = None
    label: str | None = None  # how messages name a recipe that is no file (None: the file, or the checkpoint)


def describe(value) -> str:
    """A recorded value for messages: its JSON (at most 60 characters) and its kind, e.g.
    '"0.5" (a string)'."""
    kind = {str: "a string", list: "a list", dict: "an object", bool: "a boolean", type(None): "null"}.get(type(value))
    return f"{json.dumps(value, default=str)[:60]} ({kind or type(value).__name__})"


def _positive(v):
    return float(v) if is_number(v) and math.isfinite(v) and v > 0 else None


def _nonnegative(v):
    return float(v) if is_number(v) and math.isfinite(v) and v >= 0 else None


def _count(minimum):
    def parse(v):
        return int(v) if is_number(v) and math.isfinite(v) and float(v).is_integer() and v >= minimum else None
    return parse


def _finite(v):
    return float(v) if is_number(v) and math.isfinite(v) else None


def _fraction(v):
    return float(v) if is_number(v) and 0 <= v <= 1 else None


def _bool(v):
    return v if isinstance(v, bool) else None


def _loss(v):
    return v if isinstance(v, str) and v in LOSS_FAMILIES else None


def _scale_rewards(v):  # TRL ≥ 0.22: "group" | "batch" | "none"; older TRL: a boolean (True = group)
    if isinstance(v, bool):
        return "group" if v else "none"
    return v if v in ("group", "batch", "none") else None


def _autocast(v):  # TRL / HF Trainer bf16=True trains under bf16 autocast
    if isinstance(v, bool):
        return "bfloat16" if v else "none"
    return v if v in ("none", "bfloat16") else None


def _bos(v):
    return v if v in ("auto", "always", "never") else None


@dataclass(frozen=True)
class Setting:
    """How one config key is read from a recorded recipe: the recorded keys tried in order, the parser that
    types and range-checks the value, what is accepted (for RecipeError), and whether it has no default."""

    name: str  # the config key, "section.key"
    keys: tuple[str, ...]  # recorded keys, first non-null wins
    parse: Callable[[Any], Any]  # recorded value -> config value, or None when unusable
    need: str  # what is accepted, for the message
    required: bool = False  # no default: the config or the checkpoint must give it


SETTINGS = (
    Setting("sampling.temperature", ("temperature",), _positive, "a number > 0", required=True),
    Setting("sampling.max_new_tokens", ("max_new_tokens", "max_completion_length"), _count(1), "an integer >= 1",
            required=True),
    Setting("update.loss", ("loss", "loss_type"), _loss, f"one of {', '.join(LOSS_FAMILIES)} (TRL's sapo trains as "
            "grpo and vespo as dapo on-policy: set update.loss so)", required=True),
    Setting("update.grad_clip", ("grad_clip", "max_grad_norm"), _nonnegative, "a number >= 0 (0 or null: no clipping)"),
    Setting("update.kl_coef", ("kl_coef", "beta"), _nonnegative, "a number >= 0"),
    Setting("update.scale_rewards", ("scale_rewards",), _scale_rewards, "group, batch or none (or a boolean)"),
    Setting("update.epsilon_high", ("epsilon_high", "epsilon"), _positive, "a number > 0"),
    Setting("update.mask_truncated", ("mask_truncated", "mask_truncated_completions"), _bool, "true or false"),
    Setting("update.top_entropy_quantile", ("top_entropy_quantile",), _fraction, "a number in [0, 1]"),
    Setting("update.entropy_coef", ("entropy_coef",), _finite, "a finite number"),
    Setting("update.kl_bias_correction", ("kl_bias_correction", "use_bias_correction_kl"), _bool, "true or false"),
    Setting("update.autocast", ("autocast", "bf16"), _autocast, "none or bfloat16 (or a boolean bf16)"),
    Setting("update.adv_eps", ("adv_eps",), _positive, "a number > 0"),
    Setting("update.loss_block_rows", ("loss_block_rows", "per_device_train_batch_size"), _count(1),
            "an integer >= 1"),
    Setting("sampling.G_U", ("num_generations",), _count(2), "an integer >= 2"),
    Setting("sampling.bos", ("prompt_bos",), _bos, "auto, always or never"),
)


def recorded_value(name: str, recorded: dict):
    """The value the recorded recipe gives config key `name` ("section.key"), by the same keys and parsing as the
    run (`SETTINGS`); None when it records none or an unusable one."""
    setting = next(s for s in SETTINGS if s.name == name)
    found = next((k for k in setting.keys if recorded.get(k) is not None), None)
    return setting.parse(recorded[found]) if found is not None else None


def _reshapes_sampling(key: str, value, temperature) -> bool:
    """Whether a generation setting (TRL's generation_kwargs, merged into its GenerationConfig) makes the samples
    come from another distribution than the tempered policy the loss scores."""
    if value is None:
        return False
    if key in ("top_p", "typical_p"):
        return is_number(value) and value < 1
    if key in ("top_k", "min_p", "epsilon_cutoff", "eta_cutoff", "no_repeat_ngram_size"):
        return is_number(value) and value > 0
    if key == "repetition_penalty":
        return is_number(value) and value != 1
    if key == "temperature":
        return value != temperature
    if key == "do_sample":
        return value is False
    if key in ("bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "sequence_bias", "logits_processor"):
        return bool(value)
    return False


def unsupported_training(recorded: dict, kind: str) -> list[str]:
    """Recorded training settings whose step the probe cannot reproduce (it measures one on-policy AdamW step with
    samples from the full, temperature-scaled distribution)."""
    out = []
    iterations = recorded.get("num_iterations")
    if is_number(iterations) and iterations > 1:
        out.append(f"num_iterations={iterations} (each batch is reused for several optimizer steps, with clipped "
                   "importance ratios to a stale policy; the probe measures the first, on-policy step)")
    steps, accumulation = recorded.get("steps_per_generation"), recorded.get("gradient_accumulation_steps")
    if is_number(steps) and is_number(accumulation) and steps > accumulation:
        out.append(f"steps_per_generation={steps} > gradient_accumulation_steps={accumulation} (later optimizer "
                   "steps train on samples from an older policy)")
    if recorded.get("use_vllm") and recorded.get("vllm_importance_sampling_correction"):
        out.append("vllm_importance_sampling_correction (the loss is reweighted by the sampler/trainer probability "
                   "ratio of vLLM; the probe samples from the trainer's own policy)")
    loss = recorded.get("loss_type")
    if isinstance(loss, str) and loss not in LOSS_FAMILIES and loss not in ("sapo", "vespo", "luspo"):
        out.append(f"loss_type={loss!r}")
    if recorded.get("importance_sampling_level") not in (None, "token"):
        out.append(f"importance_sampling_level={recorded['importance_sampling_level']!r} (GSPO's sequence-level "
                   "ratio: its gradient differs from the token-level loss the probe reproduces)")
    if recorded.get("use_adaptive_entropy"):
        out.append("use_adaptive_entropy (the entropy coefficient changes from step to step; set "
                   "update.entropy_coef to the current one)")
    top_p, top_k, min_p = recorded.get("top_p"), recorded.get("top_k"), recorded.get("min_p")
    if is_number(top_p) and top_p < 1:
        out.append(f"top_p={top_p} (training sampled from a truncated distribution; the probe's importance weights "
                   "need the full one)")
    if is_number(top_k) and top_k > 0:
        out.append(f"top_k={top_k} (truncated sampling, as top_p)")
    if is_number(min_p) and min_p > 0:
        out.append(f"min_p={min_p} (truncated sampling, as top_p)")
    penalty = recorded.get("repetition_penalty")
    if is_number(penalty) and penalty != 1:
        out.append(f"repetition_penalty={penalty} (training sampled from a reshaped distribution)")
    generation = recorded.get("generation_kwargs")
    if isinstance(generation, str):  # TRL accepts a JSON string on the command line
        try:
            generation = json.loads(generation)
        except (ValueError, RecursionError):
            generation = None
    if isinstance(generation, dict):
        changed = {k: v for k, v in generation.items() if _reshapes_sampling(k, v, recorded.get("temperature"))}
        if changed:
            out.append(f"generation_kwargs={changed} (training sampled from a reshaped or truncated distribution, "
                       "or at another temperature than its loss used)")
    if recorded.get("sync_ref_model") and is_number(recorded.get("beta")) and recorded["beta"] > 0:
        out.append("sync_ref_model (the KL reference moves during training; the probe's is the base)")
    aggregation = recorded.get("multi_objective_aggregation")
    if aggregation not in (None, "sum_then_normalize"):
        out.append(f"multi_objective_aggregation={aggregation!r} (the probe sums the rewards, then normalises)")
    if recorded.get("fp16"):
        out.append("fp16 (training ran under fp16 autocast; the probe reproduces fp32 or bf16 autocast)")
    optim = recorded.get("optim")
    if kind in ("trl", "hf_trainer") and isinstance(optim, str) and optim not in TRL_ADAMW_OPTIMS:
        out.append(f"optim={optim!r} (the probe reproduces torch AdamW's step: {', '.join(TRL_ADAMW_OPTIMS)})")
    return out


def recipe_notes(recorded: dict, cfg) -> list[str]:
    """Recorded training settings the probe cannot read but the user can match (warnings, not refusals)."""
    notes = []
    weights = recorded.get("reward_weights")
    if isinstance(weights, list | tuple) and any(w != 1 for w in weights):
        notes.append(f"training weighted its reward functions by reward_weights={list(weights)}; the probe's reward "
                     f"is sampling.reward={cfg.sampling.reward!r}: give the same functions with the same weights "
                     "(module:function*weight, comma-separated)")
    template = recorded.get("chat_template_kwargs")
    if template:
        notes.append(f"training rendered conversational prompts with chat_template_kwargs={template!r}, which the "
                     "probe does not pass to the chat template: conversational prompts may differ from training's")
    return notes


def format_settings(settings: dict) -> str:
    """One line per setting: "  section.key = value   (origin)"."""
    width = max(len(k) for k in settings)
    return "\n".join(f"  {k:<{width}} = {json.dumps(v['value'])}   ({v['origin']})" for k, v in settings.items())
