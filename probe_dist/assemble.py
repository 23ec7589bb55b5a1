"""Assembly: a config and a training state become a ready `Probe` — resolve → plan memory → build runner → Probe.

    probe = build_probe(cfg, rt)                # from files: what the CLI runs
    probe = probe_from_state(cfg, state, rt)    # from objects in memory (state.TrainingState.from_objects)

From files, every input is checked before the first model pass, cheapest first, so a typo costs seconds, not a
model load: (1) the prompt source and the reward; (2) the checkpoint's paths and JSON files and the training
settings it records, resolved against the config (`state.files.open_checkpoint`, `probe_dist.resolve`); (3) the
tokenizer and every prompt + max_new_tokens within the model's positions (`data.checks`); (4) the optimizer file
(weights_only, finite state), the weight files (complete), the weights (finite) (`state.files.load_training_state`).
Resolution happens here and only here; the Probe and its steps get the final, frozen config. Every refusal is a
`UserInputError` (exit 2 in the CLI).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from probe_dist.config import ConfigError, config_hash, explicit_keys
from probe_dist.config_schema import ProbeConfig
from probe_dist.data.checks import check_prompts_fit, note_fixed_prompt_coverage, note_prompt_repeats
from probe_dist.data.prompts import load_prompts_with_lines, prompt_source_name
from probe_dist.data.rewards import get_rewards, is_plugin_spec
from probe_dist.errors import CheckpointError, MissingDependencyError
from probe_dist.model.policy import unwrap_causal_lm
from probe_dist.model.runner import PolicyRunner
from probe_dist.probe import Probe
from probe_dist.resolve import Resolution, resolve
from probe_dist.rollout.sample import response_eos_ids
from probe_dist.runtime import signals
from probe_dist.runtime.dist import Runtime
from probe_dist.runtime.oom import MicrobatchSizes
from probe_dist.runtime.strategy import build_strategy
from probe_dist.state import bounds
from probe_dist.state.files import load_training_state, open_checkpoint
from probe_dist.state.model import load_tokenizer, model_max_positions
from probe_dist.state.optimizer import check_real_step_dtypes
from probe_dist.state.training import TrainingState

log = logging.getLogger("probe_dist")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def build_probe(cfg: ProbeConfig, rt) -> Probe:
    """From files (the CLI's path): checked inputs → opened checkpoint → resolved config → loaded state → Probe.

    Files are read within the reading bounds (`state.bounds`, checkpoint.read_limits), and a stop signal during
    the reading ends it at once; then every rank agrees on a stop (one all-reduce) and raises StopRequested.
    rt: the `runtime.dist.Runtime` of this process. Raises UserInputError subclasses (ConfigError, PromptError,
    CheckpointError, RecipeError, RewardModelError, ReadLimitError) for anything the user can fix."""
    explicit = explicit_keys(cfg)  # before any `replace`, which drops the record
    prompts = _prompts(cfg)
    if not (cfg.checkpoint.path or cfg.checkpoint.base):
        from probe_dist.toy.checkpoint import ensure_toy_checkpoint

        toy = ensure_toy_checkpoint(cfg.checkpoint.toy_seed, cfg.checkpoint.toy_cache, rt)
        cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, path=str(toy)))
    with bounds.using(cfg.checkpoint.read_limits):  # every file this build reads (the reward model's too)
        state, resolution = _read_checkpoint(cfg, prompts, explicit, rt)
        return assemble(resolution, state, rt)


def _read_checkpoint(cfg: ProbeConfig, prompts: list, explicit, rt) -> tuple[TrainingState, Resolution]:
    """The reading part of `build_probe`: a stop signal ends it at once (no collective inside), then every rank
    agrees on a stop (one all-reduce) and raises StopRequested."""
    stopped = False
    try:
        with signals.interruptible():
            source = open_checkpoint(cfg.checkpoint)
            resolution = resolve(cfg, source, rt, explicit=explicit)
            paths = source.paths
            tokenizer = load_tokenizer(paths.tokenizer, paths.tokenizer_source)
            _check_prompts(prompts, tokenizer, resolution, model_max_positions(paths.base),
                           paths.base / "config.json", rt)
            memory = resolution.cfg.memory
            state = load_training_state(source, tokenizer, dtype=DTYPES[resolution.cfg.precision.dtype],
                                        device=rt.device, max_trainable_params=memory.max_trainable_params,
                                        allow_full_finetune=memory.allow_full_finetune, is_main=rt.is_main)
    except signals.StoppedWhileLoading:
        stopped = True
    if rt.any_flag(stopped or signals.requested()):  # every rank stops here, loaded or not
        raise signals.StopRequested("while loading the checkpoint")
    return state, resolution


def probe_from_state(cfg: ProbeConfig, state: TrainingState, rt=None) -> Probe:
    """From a training state in memory (no files): the same checks, resolution and assembly as `build_probe`.

    The probe runs in the model's own dtype (precision.dtype is set to it). rt: a `Runtime` (default: this
    process alone). Raises what `build_probe` raises."""
    rt = rt or Runtime()
    explicit = explicit_keys(cfg)
    prompts = _prompts(cfg)
    dtype = next(name for name, d in DTYPES.items() if d == state.trainable[0][1].dtype)
    resolution = resolve(replace(cfg, precision=replace(cfg.precision, dtype=dtype)), state, rt, explicit=explicit)
    _check_prompts(prompts, state.tokenizer, resolution, state.max_positions, state.config_file, rt)
    return assemble(resolution, state, rt)


def assemble(resolution: Resolution, state: TrainingState, rt) -> Probe:
    """A resolved config and a loaded state → precision → memory plan → reward model → strategy and runner → Probe.

    Raises CheckpointError when the state cannot run as configured (real_step with mixed dtypes, no EOS)."""
    cfg = resolution.cfg
    _set_precision(cfg)
    if cfg.update.route == "real_step":
        check_real_step_dtypes(state.optimizer, state.trainable)
    memory_plan = None
    if cfg.memory.auto_microbatch:
        from probe_dist.plan import auto_microbatch_plan, proposed_sizes

        memory_plan = auto_microbatch_plan(cfg, state.model, rt.world_size, rt.device, tokenizer=state.tokenizer)
        sizes = rt.broadcast_object(proposed_sizes(memory_plan))  # every rank uses rank 0's sizes
        if sizes:
            cfg = replace(cfg, memory=replace(cfg.memory, **sizes))
    reward_model = _reward_model(cfg, resolution.reward_folder, state.model, rt)
    runner = PolicyRunner(model=state.model, strategy=build_strategy(cfg, rt, state.model), trainable=state.trainable,
                          device=rt.device, temperature=cfg.sampling.temperature,
                          sizes=MicrobatchSizes(score=cfg.memory.microbatch_score, grad=cfg.memory.microbatch_grad,
                                                jvp=cfg.memory.microbatch_jvp),
                          accumulator_device=cfg.memory.accumulator_device, auto_microbatch=cfg.memory.auto_microbatch,
                          reward_model=reward_model)
    try:
        eos_ids = response_eos_ids(state.tokenizer, getattr(unwrap_causal_lm(state.model), "generation_config", None))
    except ValueError as exc:
        where = state.provenance.get("provenance/checkpoint_source", {}).get("tokenizer", "the tokenizer given")
        raise CheckpointError(f"{exc}: responses could never end. Set eos_token in the tokenizer ({str(where)!r}) "
                              "or eos_token_id in the base's generation_config.json.") from None
    probe = Probe(cfg, rt, runner, tokenizer=state.tokenizer, optimizer=state.optimizer, eos_ids=eos_ids,
                  open_sampler=_rollout_engine(cfg, state, rt))
    info, found = state.provenance, resolution.provenance()
    probe.load_info = {"sampling/eos_ids": eos_ids, **{k: info[k] for k in ("provenance/optimizer_coverage",
                                                                          "provenance/trainable_params")},
                       **{k: found[k] for k in ("provenance/recipe_ignored", "provenance/settings",
                                                "provenance/recipe_overrides", "provenance/recipe_notes")},
                       **{k: info[k] for k in ("provenance/checkpoint_source", "provenance/lr_ratios",
                                               "provenance/checkpoint_inconsistencies")},
                       "provenance/load_warnings": info.get("provenance/load_warnings", []),
                       "eta_train": found["eta_train"],
                       "provenance/reward_model": ({"path": str(resolution.reward_folder), "shared_base":
                                                    reward_model.shared} if reward_model is not None else None),
                       "provenance/memory_plan": {k: memory_plan[k] for k in ("peak_bytes", "peak_phase", "fits",
                                                                              "proposal")} if memory_plan else None}
    if rt.is_main:
        log.info("resolved config hash %s (summary.json provenance/config_hash, config.yaml)", config_hash(probe.cfg))
    return probe


def _rollout_engine(cfg: ProbeConfig, state: TrainingState, rt):
    """rollout.backend=vllm: a function opening a vLLM engine on the policy at θ (vLLM imported now, so a
    missing install stops the run before any model pass); hf: None. Raises MissingDependencyError, or
    ConfigError for a combination the engine cannot serve."""
    if cfg.rollout.backend != "vllm":
        return None
    from probe_dist.rollout.vllm_engine import VLLMSampler, import_vllm

    if cfg.distributed.strategy == "fsdp2":
        raise ConfigError("rollout.backend=vllm with distributed.strategy=fsdp2 is not supported: the engine is given "
                          "θ's adapter from each rank's memory, which FSDP2 shards. Use distributed.strategy=ddp (the "
                          "adapter is small; the base is read by the engine from its folder) or rollout.backend=hf.")
    missing = None
    try:
        import_vllm()
    except MissingDependencyError as exc:
        missing = exc
    if rt.any_flag(missing is not None):  # every rank stops (exit 2), none waits in a collective
        raise missing or MissingDependencyError("vLLM cannot be imported on another rank (its log says why); "
                                                "install it on every node or set rollout.backend=hf")
    base_dir = state.config_file.parent if state.config_file is not None else None

    def open_engine():
        return VLLMSampler.from_model(state.model, base_dir=base_dir, dtype=cfg.precision.dtype, device=rt.device,
                                      gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
                                      max_num_seqs=cfg.rollout.vllm_max_num_seqs, max_model_len=state.max_positions)
    return open_engine


def _prompts(cfg: ProbeConfig) -> list:
    """The prompt source read and checked (with line numbers), and the reward resolved: before anything else."""
    prompts = load_prompts_with_lines(cfg.sampling.prompts, cfg.sampling.split,
                                      require_answer=not is_plugin_spec(cfg.sampling.reward))
    get_rewards(cfg.sampling.reward)
    return prompts


def _check_prompts(prompts: list, tokenizer, resolution: Resolution, max_positions: int | None,
                   config_file: Path | None, rt) -> None:
    """The prompts against the resolved run: notes on repeats and fixed-prompt coverage, and every prompt fitting
    the policy's (and GRADE's reward model's) positions with max_new_tokens."""
    cfg, reward_folder = resolution.cfg, resolution.reward_folder
    source = prompt_source_name(cfg.sampling.prompts, cfg.sampling.split)
    note_prompt_repeats(len(prompts), cfg.sampling, cfg.estimators.mode, source, rt.is_main)
    note_fixed_prompt_coverage(len(prompts), cfg.sampling, cfg.estimators.se, source, rt.is_main)
    check_prompts_fit(prompts, tokenizer, max_new_tokens=cfg.sampling.max_new_tokens, max_positions=max_positions,
                      source=source, config_file=config_file, is_main=rt.is_main, bos=cfg.sampling.bos)
    if reward_folder is not None and (reward_folder / "config.json").is_file():  # GRADE's reward model reads P + T
        check_prompts_fit(prompts, tokenizer, max_new_tokens=cfg.sampling.max_new_tokens,
                          max_positions=model_max_positions(reward_folder), source=source,
                          config_file=reward_folder / "config.json", is_main=False, bos=cfg.sampling.bos)


def _set_precision(cfg: ProbeConfig) -> None:
    """torch's float32 matmul precision (precision.matmul: `highest` keeps TF32 off) and anomaly detection."""
    torch.set_float32_matmul_precision(cfg.precision.matmul)
    if cfg.precision.dtype == "bfloat16":
        log.warning("precision.dtype=bfloat16: θ + ηu is rounded to bf16 (8 bits of mantissa), so ΔH_true at small η "
                    "is quantised and can disagree with δH₁; use float32 for numbers you will report.")
    if cfg.debug.detect_anomaly:
        torch.autograd.set_detect_anomaly(True)


def _reward_model(cfg: ProbeConfig, folder: Path | None, model, rt):
    """GRADE's reward model r_φ (None for the other losses), sharing the frozen base when its backbone is it."""
    if folder is None:
        return None
    from probe_dist.model.reward_model import RewardModel

    causal = unwrap_causal_lm(model)
    reward_model = RewardModel.load(folder, dtype=DTYPES[cfg.precision.dtype], device=rt.device,
                                    vocab_size=causal.get_output_embeddings().weight.shape[0],
                                    embed=cfg.update.grade_embed)
    shared = hasattr(model, "disable_adapter") and reward_model.share_base(causal, model.disable_adapter)
    if rt.is_main:
        up = cfg.update
        log.info("GRADE (%s): reward model %s%s; τ_g=%g, top-k=%s, soft embeddings %s, β=%g, T=%d relaxed tokens",
                 up.loss, folder, " (its backbone is the frozen base: rewards read off the reference's pass)"
                 if shared else "", up.grade_tau, up.grade_top_k or "all", up.grade_embed, up.kl_coef,
                 cfg.sampling.max_new_tokens)
    return reward_model
