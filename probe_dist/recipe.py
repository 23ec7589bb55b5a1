"""The training recipe: every setting of the update the probe reproduces, with where its value came from.

Precedence: a setting given in the config (YAML or command line) wins; else the checkpoint's recorded training
settings (training_args.json, or HF Trainer / TRL training_args.bin); else the probe's default. Each setting the
probe uses is logged once with its origin and recorded in summary.json (provenance/settings). Recorded values are
typed and range-checked (`RecipeError` names the file, key, value and the override that fixes it). Recorded
training the probe cannot reproduce (stale samples, vLLM importance correction, truncated sampling, another
optimizer) is refused unless update.ignore_unsupported_recipe=true.

Key names: probe_dist's own (loss, temperature, max_new_tokens, grad_clip, kl_coef, ...) and TRL's GRPOConfig
(loss_type, max_completion_length, max_grad_norm, beta, scale_rewards, epsilon_high, mask_truncated_completions,
top_entropy_quantile, entropy_coef, use_bias_correction_kl, bf16, per_device_train_batch_size, num_generations).
TRL normalises advantages with ε = 1e-4 (a constant of its code, not a setting): a TRL recipe sets update.adv_eps so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from probe_dist.model.load import CheckpointError
from probe_dist.rollout.batch import default_scale_rewards
from probe_dist.update.loss import LOSS_FAMILIES

log = logging.getLogger("probe_dist")

TRL_ADV_EPS = 1e-4  # trl GRPOTrainer: advantages / (std + 1e-4)
TRL_ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused")


class RecipeError(CheckpointError):
    """The checkpoint records a setting the probe would use with a wrong type or out of range, or training the
    probe cannot reproduce."""


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def describe(value) -> str:
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


def _get(cfg, name: str):
    section, key = name.split(".")
    return getattr(getattr(cfg, section), key)


def _set(cfg, values: dict[str, Any]):
    sections: dict[str, dict] = {}
    for name, value in values.items():
        section, key = name.split(".")
        sections.setdefault(section, {})[key] = value
    return replace(cfg, **{s: replace(getattr(cfg, s), **kv) for s, kv in sections.items()})


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
        except ValueError:
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


def resolve_recipe(cfg, recorded: dict, *, explicit: frozenset[str], kind: str, source: Path | None,
                   ref_adapter: Path | None = None, has_adapter: bool = True):
    """(the config with every recipe setting resolved, {setting: {"value", "origin"}}, overrides, unsupported).

    recorded: the checkpoint's training settings as plain data; explicit: config keys the user gave ("section.key");
    kind: whose keys `recorded` uses ("probe_dist", "trl", "hf_trainer", "none"); source: the file, for messages;
    ref_adapter: TRL's saved KL-reference adapter (ref/), refused when the KL term is on (the probe's reference is
    the base with the adapter disabled); has_adapter: whether the model has an adapter (without one there is no
    reference policy, so a KL term is refused).
    overrides: explicit settings that differ from the recorded value ("setting=value (checkpoint's key=value)").
    Raises RecipeError for a recorded value the probe would use that is unusable, for a required setting neither
    given nor recorded, and for unsupported training unless update.ignore_unsupported_recipe."""
    where = str(source) if source is not None else "training_args.json"
    unsupported = unsupported_training(recorded, kind)
    if unsupported and not cfg.update.ignore_unsupported_recipe:
        raise RecipeError(
            f"training settings file {where!r} records training the probe cannot reproduce: "
            f"{'; '.join(unsupported)}. The probe's δH₁ and ΔH_true would describe another update than training "
            "took. Probe a checkpoint trained on-policy, or set update.ignore_unsupported_recipe=true to measure the "
            "on-policy step anyway (the summary then says which settings were ignored).")
    if unsupported:
        log.warning("ignoring training settings the probe cannot reproduce (update.ignore_unsupported_recipe): %s",
                    "; ".join(unsupported))
    values, origins, overrides, missing = {}, {}, [], []
    for s in SETTINGS:
        found = next((k for k in s.keys if recorded.get(k) is not None), None)
        if s.name in explicit:
            value, origin = _get(cfg, s.name), "config"
            if found is not None and s.parse(recorded[found]) is not None and s.parse(recorded[found]) != value:
                overrides.append(f"{s.name}={value!r} (checkpoint: {found}={recorded[found]!r})")
            elif found is None and s.name == "update.adv_eps" and kind == "trl" and value != TRL_ADV_EPS:
                overrides.append(f"{s.name}={value!r} (checkpoint: TRL's constant {TRL_ADV_EPS:g})")
        elif found is not None:
            value = s.parse(recorded[found])
            if value is None:
                raise RecipeError(f"training settings file {where!r}: {found!r} is {describe(recorded[found])}, but "
                                  f"the probe needs {s.need} for {s.name}. Fix the value in the file, or set it "
                                  f"explicitly, e.g. {s.name}=...")
            origin = f"checkpoint ({found})"
        elif s.name == "update.adv_eps" and kind == "trl":
            value, origin = TRL_ADV_EPS, "checkpoint (TRL's constant)"
        elif s.required and _get(cfg, s.name) is None:
            missing.append(s.name)
            continue
        else:
            value, origin = _get(cfg, s.name), "default"
        values[s.name], origins[s.name] = value, origin
    if missing:
        what = {"none": "the checkpoint records no training recipe",
                "hf_trainer": f"the checkpoint's {where!r} is an HF Trainer recipe, not a GRPO one (no sampling or "
                              "loss settings)"}.get(kind, f"the checkpoint's {where!r} does not record "
                                                          f"{'it' if len(missing) == 1 else 'them'}")
        raise RecipeError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set and {what}; set "
                          f"{'it' if len(missing) == 1 else 'them'} explicitly, e.g. "
                          + " ".join(f"{m}=..." for m in missing))
    cfg = _set(cfg, values)
    # Defaults that depend on other settings.
    if cfg.update.scale_rewards is None:
        cfg = _set(cfg, {"update.scale_rewards": default_scale_rewards(cfg.update.loss)})
    if cfg.sampling.bos is None:  # the toy task put BOS in front of every prompt
        cfg = _set(cfg, {"sampling.bos": "always" if recorded.get("task") == "toy_addition" else "auto"})
        if recorded.get("task") == "toy_addition":
            origins["sampling.bos"] = "checkpoint (task)"
    if cfg.update.max_len is None:  # dr_grpo's L_max defaults to the response cap
        cfg = _set(cfg, {"update.max_len": cfg.sampling.max_new_tokens})
    if cfg.precision.dtype == "float64" and cfg.update.autocast != "none":
        origin = "the config" if "update.autocast" in explicit else "the checkpoint's recipe (bf16 training)"
        raise RecipeError(
            f"precision.dtype=float64 with update.autocast={cfg.update.autocast} (from {origin}) would mix an exact "
            "float64 model with a bf16-rounded head: the gradient would match neither training nor exact math. Set "
            "update.autocast=none for an exact float64 gradient, or precision.dtype=float32 to reproduce the bf16 "
            "training gradient.")
    if not has_adapter and cfg.update.kl_coef > 0:
        origin = "the config" if "update.kl_coef" in explicit else "the checkpoint's recipe"
        raise RecipeError(
            f"update.kl_coef={cfg.update.kl_coef:g} (from {origin}) needs a reference policy, and the probe's is the "
            "base with the adapter disabled: this checkpoint is a full fine-tune (no adapter), whose reference — "
            "the model training started from — the probe does not hold, and with θ itself as reference the KL "
            "gradient would be exactly 0. Set update.kl_coef=0 to measure the step without the KL term.")
    if ref_adapter is not None and cfg.update.kl_coef > 0:
        why = (f"a KL reference adapter {str(ref_adapter)!r} (TRL keeps the adapter it was given as the reference of "
               f"the β = {cfg.update.kl_coef:g} KL term; the probe's reference is the base with the adapter disabled)")
        if not cfg.update.ignore_unsupported_recipe:
            raise RecipeError(f"the checkpoint holds {why}, so the probe's KL term would differ from training's. Set "
                              "update.kl_coef=0 to measure the update without the KL term, or "
                              "update.ignore_unsupported_recipe=true to use the base as the reference anyway.")
        unsupported.append(why)
        log.warning("ignoring %s (update.ignore_unsupported_recipe)", why)
    settings = {name: {"value": _get(cfg, name), "origin": origins[name]} for name in origins}
    return cfg, settings, overrides, unsupported


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


def explicit_keys(cfg) -> frozenset[str]:
    """The config keys the user gave (`probe_dist.config.load_config` records them); for a config built in code,
    the keys whose value differs from the schema default."""
    given = getattr(cfg, "_explicit", None)
    if given is not None:
        return given
    from probe_dist.config_schema import ProbeConfig

    default, out = ProbeConfig(), set()
    for section in dataclasses.fields(ProbeConfig):
        ours, theirs = getattr(cfg, section.name), getattr(default, section.name)
        if dataclasses.is_dataclass(ours):
            out |= {f"{section.name}.{f.name}" for f in dataclasses.fields(ours)
                    if getattr(ours, f.name) != getattr(theirs, f.name)}
    return frozenset(out)


def format_settings(settings: dict) -> str:
    """One line per setting: "  section.key = value   (origin)"."""
    width = max(len(k) for k in settings)
    return "\n".join(f"  {k:<{width}} = {json.dumps(v['value'])}   ({v['origin']})" for k, v in settings.items())
