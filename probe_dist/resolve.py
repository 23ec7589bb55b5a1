"""The config resolved against a training state: the recipe's settings with their origins, η_train, GRADE's reward
model (docs/method.md §4).

Precedence: a setting given in the config (YAML or command line) wins; else the training state's recorded
settings (training_args.json, HF Trainer / TRL training_args.bin, or a live trainer's arguments); else the probe's
default. Each setting the probe uses is logged once with its origin and recorded in summary.json
(provenance/settings). Recorded training the probe cannot reproduce is refused unless
update.ignore_unsupported_recipe=true. `resolve` needs only what a state records (its recipe, scheduler, adapter
and KL-reference facts), so it runs before the model loads: a wrong setting costs seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from probe_dist.rollout.batch import default_scale_rewards
from probe_dist.state.recipe import (
    SETTINGS,
    TRL_ADV_EPS,
    RecipeError,
    describe,
    format_settings,
    recipe_notes,
    unsupported_training,
)

log = logging.getLogger("probe_dist")


@dataclass
class Resolution:
    """A config resolved against a training state, and what the summary records about it."""

    cfg: Any                                       # the ProbeConfig the probe runs with (frozen from here on)
    settings: dict                                 # {"section.key": {"value", "origin"}} for every recipe setting
    overrides: list[str] = field(default_factory=list)     # config settings that differ from the recorded ones
    unsupported: list[str] = field(default_factory=list)   # recorded training ignored (ignore_unsupported_recipe)
    notes: list[str] = field(default_factory=list)         # recorded settings the user can match by hand
    eta_train: float | None = None                 # the lr the saved scheduler gives the next step (None: none)
    reward_folder: Path | None = None              # GRADE's reward model (None for the other losses)

    def provenance(self) -> dict:
        """The summary's keys for the resolution (docs/outputs.md)."""
        return {"provenance/recipe_ignored": self.unsupported, "provenance/settings": self.settings,
                "provenance/recipe_overrides": self.overrides, "provenance/recipe_notes": self.notes,
                "eta_train": self.eta_train}


def resolve(cfg, facts, rt, *, explicit: frozenset[str]) -> Resolution:
    """`cfg` with every recipe setting, η_train and GRADE's reward model resolved against `facts`.

    facts: a `state.source.CheckpointSource` (before loading) or a `state.TrainingState` — anything with `.recipe`
    (state.recipe.Recipe), `.scheduler` (SchedulerState or None), `.has_adapter` and `.ref_adapter`; explicit: the
    config keys the user gave (`config.explicit_keys`, taken before any `replace`). Logs the settings with their
    origins on rank 0. Raises RecipeError (unusable or unsupported recorded settings), ConfigError and
    RewardModelError (GRADE's refusals)."""
    recipe = facts.recipe
    cfg, settings, overrides, unsupported = resolve_recipe(cfg, recipe.fields, explicit=explicit, kind=recipe.kind,
                                                           source=recipe.path, ref_adapter=facts.ref_adapter,
                                                           has_adapter=facts.has_adapter, label=recipe.label)
    eta_train = next_step_lr(facts.scheduler)
    if eta_train is not None and eta_train > 0 and cfg.estimators.eta_train and eta_train not in cfg.estimators.etas:
        cfg = replace(cfg, estimators=replace(cfg.estimators, etas=sorted([*cfg.estimators.etas, eta_train])))
    notes = recipe_notes(recipe.fields, cfg)
    if rt.is_main:
        log.info("training recipe (config > checkpoint %s > default):\n%s", recipe.path or "(none)",
                 format_settings(settings))
        for note in notes:
            log.warning("%s", note)
        if overrides:
            log.warning("settings given in the config differ from the checkpoint's recorded training: %s. The probe "
                        "measures the configured update, not the trained one.", "; ".join(overrides))
        if eta_train is not None:
            log.info("eta_train = %g: the lr the saved scheduler gives the next training step (%s)%s", eta_train,
                     facts.scheduler.path, "" if eta_train > 0 else "; the schedule has ended (lr 0), so it adds "
                     "no sweep point")
    reward_folder = check_grade(cfg, rt.world_size, rt.is_main, explicit)  # GRADE: refusals, reward model
    if reward_folder is not None:
        cfg = replace(cfg, update=replace(cfg.update, reward_model=str(reward_folder)))  # recorded as used
    return Resolution(cfg=cfg, settings=settings, overrides=overrides, unsupported=unsupported, notes=notes,
                      eta_train=eta_train, reward_folder=reward_folder)


def resolve_recipe(cfg, recorded: dict, *, explicit: frozenset[str], kind: str, source: Path | None,
                   ref_adapter: Path | None = None, has_adapter: bool = True, label: str | None = None):
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
    named = label or f"training settings file {where!r}"  # in memory: the recipe given to from_objects
    unsupported = unsupported_training(recorded, kind)
    if unsupported and not cfg.update.ignore_unsupported_recipe:
        raise RecipeError(
            f"{named} records training the probe cannot reproduce: "
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
                raise RecipeError(f"{named}: {found!r} is {describe(recorded[found])}, but "
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
        them = "it" if len(missing) == 1 else "them"
        if kind == "none":
            what = f"{label} records no training recipe" if label else "the checkpoint records no training recipe"
        elif kind == "hf_trainer":
            what = f"{named} is an HF Trainer recipe, not a GRPO one (no sampling or loss settings)"
        else:
            what = f"{named} does not record {them}"
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


def _get(cfg, name: str):
    section, key = name.split(".")
    return getattr(getattr(cfg, section), key)


def _set(cfg, values: dict[str, Any]):
    sections: dict[str, dict] = {}
    for name, value in values.items():
        section, key = name.split(".")
        sections.setdefault(section, {})[key] = value
    return replace(cfg, **{s: replace(getattr(cfg, s), **kv) for s, kv in sections.items()})


def next_step_lr(scheduler) -> float | None:
    """The first param group's lr for the next training step, from the saved scheduler (None: no scheduler).

    scheduler: a `state.source.SchedulerState` or None."""
    lrs = scheduler.next_lrs if scheduler else None
    return float(lrs[0]) if lrs else None


def check_grade(cfg, world_size: int, is_main: bool, explicit: frozenset[str] = frozenset()) -> Path | None:
    """GRADE (update.loss grade / grade_st): refuse what it cannot run with, name settings that do not apply, and
    return the reward model's folder (None for the other loss families).

    Raises ConfigError for distributed.strategy=fsdp2 with more than one rank (the relaxed rollout calls the
    decoder step by step outside the sharded root) and for estimators.mode=single_batch (U holds no sampled
    sequences to reuse as E); RewardModelError when no reward model folder is given or found."""
    from probe_dist.config import ConfigError
    from probe_dist.model.reward_model import RewardModelError
    from probe_dist.update.grade import GRADE_FAMILIES

    up = cfg.update
    if up.loss not in GRADE_FAMILIES:
        return None
    if cfg.distributed.strategy == "fsdp2" and world_size > 1:
        raise ConfigError(f"update.loss={up.loss} runs with distributed.strategy=ddp or none, not fsdp2: the relaxed "
                          "rollout steps the decoder with its own KV cache outside FSDP2's sharded root. Use "
                          "distributed.strategy=ddp (the adapter's gradients are reduced the same way).")
    if up.grade_top_k == 1:
        raise ConfigError(f"update.loss={up.loss} with update.grade_top_k=1: a relaxation over one token is a constant "
                          "one-hot, so no gradient flows through the rollout. Use update.grade_top_k ≥ 2, or 0 for "
                          "the whole vocabulary.")
    if cfg.estimators.mode == "single_batch":
        raise ConfigError(f"update.loss={up.loss} cannot use estimators.mode=single_batch: a GRADE update reads "
                          "relaxed rollouts of U's prompts, not sampled sequences that E could reuse. Use "
                          "estimators.mode=two_batch.")
    folder = Path(up.reward_model) if up.reward_model else Path(cfg.checkpoint.path or "") / "reward_model"
    if not up.reward_model and not (folder / "config.json").is_file():
        raise RewardModelError(f"update.loss={up.loss} needs a reward model that reads soft tokens: set "
                               "update.reward_model=<folder of a one-label *ForSequenceClassification model over the "
                               f"policy's vocabulary> (none given, and {str(folder)!r} does not exist).")
    defaults = (("top_entropy_quantile", 1.0), ("entropy_coef", 0.0), ("mask_truncated", False),
                ("epsilon_high", 0.2), ("kl_bias_correction", False), ("loss_block_rows", None))
    token_level = ("scale_rewards", "adv_eps", "max_len")  # resolved from defaults/recipe: named only if given
    ignored = [f"{k}={getattr(up, k)}" for k, default in defaults if getattr(up, k) != default]
    ignored += [f"{k}={getattr(up, k)}" for k in token_level if f"update.{k}" in explicit]
    if ignored and is_main:
        log.warning("update.loss=%s: %s do not apply to GRADE's objective (−r_φ + β·KL over relaxed rollouts) and "
                    "are ignored", up.loss, ", ".join(ignored))
    return folder
