"""The planner: resolve the inputs (checkpoint, model, adapter, sequence lengths), predict each phase's peak and
propose the largest microbatch sizes that fit. Pure: reads the config, never writes it."""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from probe_dist.errors import CheckpointError
from probe_dist.phases import DELTA_H1, EXPLAIN, SAMPLE, SCORE_BASE, SWEEP, UPDATE_GRADIENT
from probe_dist.plan.bytes import (
    DTYPE_BYTES,
    MIN_LOGITS_CHUNK,
    STATIC_COMPONENTS,
    GiB,
    Settings,
    block_rows,
    phase_peaks,
    sample_peak,
)
from probe_dist.plan.shape import (
    ModelShape,
    PlanError,
    builtin_model_config,
    load_model_config,
    model_shape,
    resolve_lora,
)
from probe_dist.state.paths import CheckpointPaths

log = logging.getLogger("probe_dist")

DEFAULT_MARGIN = 0.10
DEFAULT_RESERVE = 1 * GiB  # CUDA context + cuBLAS workspace, outside the caching allocator
SIZE_KEYS = ("microbatch_generate", "microbatch_score", "microbatch_grad", "microbatch_jvp",
             "logits_chunk")  # the memory.* keys a proposal sets


# ------------------------------------------------------------------------------------- inputs
def parse_bytes(text) -> int:
    """'40GiB', '40G' (= GiB), '40GB' (= 10^9), '512MiB', '1.5TiB' or a plain number of bytes → bytes (int).

    Raises PlanError (a ValueError) for anything else.
    """
    if isinstance(text, int | float):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)(B?)\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise PlanError(f"cannot read the memory size {text!r}: use e.g. 40GiB, 80GB, 512MiB or a number of bytes")
    value, unit, binary, byte = float(m.group(1)), m.group(2).upper(), m.group(3), m.group(4)
    if not unit:
        return int(value)
    power = "KMGT".index(unit) + 1
    decimal = bool(byte) and not binary  # "GB" is 10^9; "G", "GiB" are 2^30
    return int(value * (1000 ** power if decimal else 1024 ** power))


def _checkpoint(cfg, *, model_given: bool, notes: list[str]) -> CheckpointPaths | None:
    """The checkpoint's files as the probe resolves them, or None when no checkpoint is configured.

    No checkpoint.path / checkpoint.base: None (the probe then builds the toy checkpoint). A checkpoint the probe
    would refuse: PlanError, unless the model config was given (--model-config); then the plan goes on without the
    checkpoint (LoRA from the flags, no training_args.json) and says so in the notes.
    """
    ck = cfg.checkpoint
    if not (ck.path or ck.base):
        return None
    try:
        from probe_dist.state.files import open_checkpoint

        return open_checkpoint(ck).paths  # any format: probe_dist, HF Trainer/TRL, accelerate, DeepSpeed
    except CheckpointError as exc:
        if not model_given:
            raise PlanError(f"{str(exc).rstrip()} Pass --model-config PATH_OR_NAME (e.g. qwen2.5-1.5b) to plan without the "
                            "checkpoint.") from exc
        notes.append(f"checkpoint not read: {exc} Planned without its adapter_config.json and training_args.json "
                     "(LoRA from --lora-* or the defaults, max_new_tokens from sampling.max_new_tokens).")
        return None


def _with_recipe_sizes(cfg, recorded: dict):
    """cfg with the memory-relevant settings (response cap, U's group size, KL term) taken from the recorded recipe
    where the config leaves them to it, as `probe_dist.resolve` resolves them at run time."""
    from probe_dist.config import explicit_keys
    from probe_dist.state.recipe import recorded_value

    explicit, sections = explicit_keys(cfg), {}
    for name in ("sampling.max_new_tokens", "sampling.G_U", "update.kl_coef"):
        value = recorded_value(name, recorded)
        if name not in explicit and value is not None:
            section, key = name.split(".")
            sections.setdefault(section, {})[key] = value
    return replace(cfg, **{sec: replace(getattr(cfg, sec), **kv) for sec, kv in sections.items()})


def _resolve_model(model_config, paths: CheckpointPaths | None) -> tuple[object, str]:
    if model_config is not None:
        spec_name = model_config if isinstance(model_config, str) else ""
        return load_model_config(model_config), spec_name
    if paths is not None:
        if not (paths.base / "config.json").is_file():
            raise PlanError(f"no config.json in the base model directory {str(paths.base)!r}; pass --model-config "
                            "PATH_OR_NAME (e.g. qwen2.5-1.5b) to plan without the checkpoint.")
        return load_model_config(paths.base), str(paths.base)
    # No checkpoint: the probe uses the built-in toy checkpoint.
    return builtin_model_config("toy"), "toy"


def _prompt_tokens(cfg, tokenizer_dir: Path | None, notes: list[str]) -> int:
    if cfg.sampling.prompts == "toy":
        from probe_dist.toy.task import MAX_PROMPT_TOKENS

        return MAX_PROMPT_TOKENS
    path = Path(cfg.sampling.prompts)
    if path.is_file() and tokenizer_dir is not None:
        try:
            from probe_dist.data.prompts import load_prompts, prompt_token_ids
            from probe_dist.state.model import load_tokenizer

            tok = load_tokenizer(tokenizer_dir)
            prompts = load_prompts(str(path), cfg.sampling.split, require_answer=False)
            return max(len(prompt_token_ids(tok, p["prompt"], "always")) for p in prompts)
        except Exception as exc:  # noqa: BLE001 - fall back to the assumption below, and say so
            notes.append(f"could not measure prompt lengths ({exc})")
    notes.append("prompt length assumed to be 512 tokens; pass --prompt-tokens N for your prompts")
    return 512


# ------------------------------------------------------------------------------------- the plan
def _divisor_rows(n_max: int, block: int) -> int:
    """The smallest row count with as few passes per block of `block` rows as n_max rows: same passes, less
    memory."""
    n_max = max(1, min(n_max, block))
    return math.ceil(block / math.ceil(block / n_max))


def plan_memory(cfg, gpu_mem_bytes: int | None = None, model_config=None, *, lora_r: int | None = None,
                lora_alpha: float | None = None, lora_targets: list[str] | None = None,
                world_size: int | None = None, prompt_tokens: int | None = None, margin: float = DEFAULT_MARGIN,
                reserve_bytes: int = DEFAULT_RESERVE, adapter_params: int | None = None) -> dict:
    """Per-phase predicted peak bytes per GPU, their components, and microbatch sizes that fit.

    cfg: a ProbeConfig (read only). gpu_mem_bytes: the GPU's memory in bytes (default memory.gpu_mem_gib).
    model_config: a transformers config, a dict, 'qwen2.5-1.5b' / 'toy', or a path (default: the checkpoint's
    base config.json, else the toy). adapter_params overrides the counted adapter size (the live model's exact
    count at run time). world_size defaults to $WORLD_SIZE, else 8 for ddp/fsdp2 and 1 otherwise; prompt_tokens
    to the longest configured prompt (measured with the checkpoint's tokenizer) or 512. margin (fraction) and
    reserve_bytes come off the GPU memory before anything is compared with it.

    Returns a JSON-serialisable dict: "model", "lora", "inputs" (all sizes used, "available_bytes"), "phases"
    ({phase: {"peak_bytes", "components"}} for the configured sizes), "peak_bytes", "peak_phase", "fits",
    "proposal" ({"fits", "microbatch_generate", "microbatch_score", "microbatch_grad", "microbatch_jvp",
    "logits_chunk" (None when nothing fits),
    "peak_bytes", "phases"}), "notes" and "message" (for people).
    Raises PlanError when the budget, the margin, the model or max_new_tokens cannot be worked out.
    """
    notes: list[str] = []
    if gpu_mem_bytes is None:
        if cfg.memory.gpu_mem_gib is None:
            raise PlanError("no GPU memory budget: pass --gpu-mem 40GiB (or set memory.gpu_mem_gib=40).")
        gpu_mem_bytes = int(cfg.memory.gpu_mem_gib * GiB)
    if not 0 <= margin < 1:
        raise PlanError(f"margin must be in [0, 1), got {margin}")
    paths = _checkpoint(cfg, model_given=model_config is not None, notes=notes)
    mc, name = _resolve_model(model_config, paths)
    if paths is not None and paths.adapter is None and lora_r is None and not lora_targets:
        lora_r = 0  # the checkpoint has no adapter: the probe trains the whole model (a full fine-tune)
        notes.append("the checkpoint has no adapter: planned as a full fine-tune (every parameter trainable)")
    lora = resolve_lora(paths.adapter if paths else None, name, r=lora_r, alpha=lora_alpha, targets=lora_targets)
    if paths is not None:  # the sizes the run will use: the recipe's where the config does not set them
        cfg = _with_recipe_sizes(cfg, paths.training_args)
    shape = model_shape(mc, lora, name)
    if adapter_params is not None:
        shape.adapter_params = int(adapter_params)
    notes.extend(shape.notes)
    max_new = cfg.sampling.max_new_tokens  # the recipe's when the config leaves it (_with_recipe_sizes)
    if max_new is None and not (cfg.checkpoint.path or cfg.checkpoint.base):
        from probe_dist.toy.task import MAX_ANSWER_TOKENS

        max_new = MAX_ANSWER_TOKENS
    if max_new is None:
        raise PlanError("sampling.max_new_tokens is not set and the checkpoint's recipe does not record it: "
                        "pass sampling.max_new_tokens=N.")
    if prompt_tokens is None:
        tok_dir = paths.tokenizer if paths else (Path(cfg.checkpoint.tokenizer) if cfg.checkpoint.tokenizer else None)
        prompt_tokens = _prompt_tokens(cfg, tok_dir, notes)
    strategy = cfg.distributed.strategy
    grade = cfg.update.loss in ("grade", "grade_st")
    reward_params = _grade_notes(cfg, notes) if grade else 0
    if world_size is None:
        env = os.environ.get("WORLD_SIZE")
        world_size = int(env) if env else (8 if strategy in ("ddp", "fsdp2") else 1)
    s = Settings(dtype_bytes=DTYPE_BYTES[cfg.precision.dtype], world_size=int(world_size), strategy=strategy,
                 prompt_tokens=int(prompt_tokens), max_new_tokens=int(max_new), group_e=cfg.sampling.G_E,
                 group_u=cfg.sampling.G_U, single_batch=cfg.estimators.mode == "single_batch",
                 kl=bool(cfg.update.kl_coef), real_step=cfg.update.route == "real_step", amsgrad=False,
                 accumulators_on_device=cfg.memory.accumulator_device == "model",
                 rows_generate=cfg.memory.microbatch_generate,
                 explain=cfg.estimators.explain and strategy != "fsdp2",
                 nested_delta_h1=(cfg.estimators.explain and cfg.precision.dtype != "bfloat16"
                                  and cfg.estimators.mode != "single_batch"),
                 grade_top_k=cfg.update.grade_top_k if grade else None, reward_model_params=reward_params)
    available = int(gpu_mem_bytes * (1.0 - margin) - reserve_bytes)
    m = cfg.memory
    configured = phase_peaks(shape, s, rows_score=m.microbatch_score, rows_grad=m.microbatch_grad,
                             rows_jvp=m.microbatch_jvp, chunk=m.logits_chunk)
    peak = max(p["peak_bytes"] for p in configured.values())
    worst = max(configured, key=lambda k: configured[k]["peak_bytes"])
    proposal = _propose(shape, s, available, m.logits_chunk)
    if shape.adapter_params > m.max_trainable_params and not m.allow_full_finetune:
        notes.append(f"{shape.adapter_params:,} trainable parameters exceed memory.max_trainable_params="
                     f"{m.max_trainable_params:,}: the probe will refuse to start; set memory.max_trainable_params="
                     f"{_round_up(shape.adapter_params)}")
    plan = {
        "model": shape.as_dict(),
        "lora": {"r": lora.r, "alpha": lora.alpha, "targets": list(lora.targets), "source": lora.source},
        "inputs": {"gpu_mem_bytes": int(gpu_mem_bytes), "margin": margin, "reserve_bytes": int(reserve_bytes),
                   "available_bytes": available, "world_size": s.world_size, "strategy": strategy,
                   "dtype": cfg.precision.dtype, "prompt_tokens": s.prompt_tokens,
                   "max_new_tokens": s.max_new_tokens, "seq_len": s.seq_len, "G_E": s.group_e, "G_U": s.group_u,
                   "microbatch_generate": m.microbatch_generate, "microbatch_score": m.microbatch_score,
                   "microbatch_grad": m.microbatch_grad, "microbatch_jvp": m.microbatch_jvp,
                   "logits_chunk": m.logits_chunk, "grade": s.grade_top_k is not None},
        "phases": configured,
        "peak_bytes": peak,
        "peak_phase": worst,
        "fits": peak <= available,
        "proposal": proposal,
        "notes": notes,
    }
    plan["message"] = _message(plan)
    return plan


def _grade_notes(cfg, notes: list[str]) -> int:
    """GRADE: what the probe would refuse, and the reward model's parameter count (from its safetensors headers;
    0 with a note when its folder is not found)."""
    if cfg.distributed.strategy == "fsdp2":
        notes.append(f"update.loss={cfg.update.loss} runs with distributed.strategy=ddp or none: the probe refuses "
                     "fsdp2 with more than one rank")
    if cfg.estimators.mode == "single_batch":
        notes.append(f"update.loss={cfg.update.loss} needs estimators.mode=two_batch: the probe refuses single_batch")
    folder = Path(cfg.update.reward_model) if cfg.update.reward_model else (
        Path(cfg.checkpoint.path) / "reward_model" if cfg.checkpoint.path else None)
    files = sorted(folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []
    if not files:
        notes.append("the reward model's weights are not counted (no update.reward_model folder with safetensors "
                     "found); add them to the update_gradient peak")
        return 0
    from safetensors import safe_open

    from probe_dist.state.bounds import check_safetensors_header

    count = 0
    for f in files:
        check_safetensors_header(f, "reward model weight file")
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                count += math.prod(handle.get_slice(key).get_shape())
    return count


def _round_up(n: int) -> int:
    step = 10 ** max(0, len(str(n)) - 2)
    return int(math.ceil(n / step) * step)


def _propose(shape: ModelShape, s: Settings, available: int, chunk_configured: int) -> dict:
    """Largest microbatches (fewest passes per block of groups: at most a block's rows) and logits chunk for which
    every phase fits. The decode block is the configured memory.microbatch_generate, halved until generation fits
    (it sets the blocks every other pass spans)."""
    while s.rows_generate > 1 and sample_peak(shape, s) > available:
        s = replace(s, rows_generate=s.rows_generate // 2)
    r_max = max(block_rows(s.rows_generate, s.group_e), block_rows(s.rows_generate, s.group_u))
    chunks = []
    c = max(chunk_configured, MIN_LOGITS_CHUNK)
    while c >= MIN_LOGITS_CHUNK:
        chunks.append(c)
        c //= 2
    best = None
    for chunk in chunks:
        def largest(kind: str, names: tuple[str, ...], chunk: int = chunk) -> int:
            def fits(n: int) -> bool:
                rows = {"rows_score": 1, "rows_grad": 1, "rows_jvp": 1, kind: n}
                return _fits_phases(shape, s, **rows, chunk=chunk, available=available, names=names)
            return next((n for n in range(r_max, 0, -1) if fits(n)), 0)

        rows_grad = largest("rows_grad", (UPDATE_GRADIENT, DELTA_H1, EXPLAIN))
        rows_jvp = largest("rows_jvp", (DELTA_H1, EXPLAIN))
        rows_score = largest("rows_score", (SCORE_BASE, SWEEP))
        if 0 in (rows_grad, rows_score, rows_jvp):
            continue
        rows_grad, rows_score, rows_jvp = (_divisor_rows(n, r_max) for n in (rows_grad, rows_score, rows_jvp))
        key = (-math.ceil(r_max / rows_grad), -math.ceil(r_max / rows_jvp), -math.ceil(r_max / rows_score), chunk)
        if best is None or key > best[0]:
            best = (key, rows_score, rows_grad, rows_jvp, chunk)
    if best is None:
        smallest = phase_peaks(shape, s, rows_score=1, rows_grad=1, rows_jvp=1, chunk=MIN_LOGITS_CHUNK)
        return {"fits": False, "microbatch_generate": None, "microbatch_score": None, "microbatch_grad": None,
                "microbatch_jvp": None, "logits_chunk": None,
                "peak_bytes": max(p["peak_bytes"] for p in smallest.values()),
                "phases": {k: v["peak_bytes"] for k, v in smallest.items()}}
    _, rows_score, rows_grad, rows_jvp, chunk = best
    phases = phase_peaks(shape, s, rows_score=rows_score, rows_grad=rows_grad, rows_jvp=rows_jvp, chunk=chunk)
    peak = max(p["peak_bytes"] for p in phases.values())
    return {"fits": peak <= available, "microbatch_generate": s.rows_generate, "microbatch_score": rows_score,
            "microbatch_grad": rows_grad, "microbatch_jvp": rows_jvp,
            "logits_chunk": chunk, "peak_bytes": peak, "phases": {k: v["peak_bytes"] for k, v in phases.items()}}


def _fits_phases(shape: ModelShape, s: Settings, *, rows_score: int, rows_grad: int, rows_jvp: int, chunk: int,
                 available: int, names: tuple[str, ...]) -> bool:
    peaks = phase_peaks(shape, s, rows_score=rows_score, rows_grad=rows_grad, rows_jvp=rows_jvp, chunk=chunk)
    return all(peaks[k]["peak_bytes"] <= available for k in names) and peaks[SAMPLE]["peak_bytes"] <= available


def proposed_sizes(plan: dict | None) -> dict[str, int] | None:
    """The memory.* sizes a plan proposes — {"microbatch_generate", "microbatch_score", "microbatch_grad",
    "microbatch_jvp", "logits_chunk"} — or None
    when there is no plan or nothing fits (then keep the configured sizes)."""
    if not plan or not plan["proposal"]["fits"]:
        return None
    return {k: int(plan["proposal"][k]) for k in SIZE_KEYS}


# ------------------------------------------------------------------------------------- messages
def _gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"


def _message(plan: dict) -> str:
    inp, prop = plan["inputs"], plan["proposal"]
    avail = (f"{_gib(inp['available_bytes'])} available ({_gib(inp['gpu_mem_bytes'])} − {inp['margin']:.0%} margin − "
             f"{_gib(inp['reserve_bytes'])} CUDA context reserve)")
    if plan["fits"]:
        head = f"fits: peak {_gib(plan['peak_bytes'])} in {plan['peak_phase']} of {avail}."
    else:
        head = (f"does not fit with the configured microbatches: peak {_gib(plan['peak_bytes'])} in "
                f"{plan['peak_phase']} > {avail}.")
    if prop["fits"]:
        tail = (f" Largest sizes that fit: memory.microbatch_generate={prop['microbatch_generate']} "
                f"memory.microbatch_score={prop['microbatch_score']} memory.microbatch_jvp={prop['microbatch_jvp']} "
                f"memory.microbatch_grad={prop['microbatch_grad']} memory.logits_chunk={prop['logits_chunk']} "
                f"(peak {_gib(prop['peak_bytes'])}).")
    else:
        phases = plan["phases"]
        static = {k: v for k, v in phases[plan["peak_phase"]]["components"].items() if k in STATIC_COMPONENTS}
        tail = (f" Does not fit at all: even microbatch 1 and logits_chunk {MIN_LOGITS_CHUNK} need "
                f"{_gib(prop['peak_bytes'])} (static part: "
                + ", ".join(f"{k} {_gib(v)}" for k, v in static.items())
                + "). Options: "
                + ("" if inp.get("grade") or inp["strategy"] == "fsdp2"
                   else "distributed.strategy=fsdp2 (shards the base weights over the GPUs), ")
                + "precision.dtype=bfloat16 (halves weights and activations, but bf16 quantises the tiny-η "
                  "log-prob changes the probe measures), a shorter sampling.max_new_tokens or smaller G, "
                  "or a GPU with more memory.")
    return head + tail


def format_plan(plan: dict) -> str:
    """The plan as text for people: model and settings, one line per phase (peak and largest components), the
    message and the notes."""
    inp, mdl = plan["inputs"], plan["model"]
    lines = [
        f"model {mdl['name']} ({mdl['model_type']}): {mdl['base_params']:,} base parameters, "
        f"{mdl['adapter_params']:,} trainable (LoRA r={plan['lora']['r']} on {', '.join(mdl['targets_found'])})",
        f"{inp['strategy']} × {inp['world_size']} GPUs, {inp['dtype']}, sequences {inp['prompt_tokens']} + "
        f"{inp['max_new_tokens']} tokens, G_E={inp['G_E']} G_U={inp['G_U']}, microbatch_generate="
        f"{inp['microbatch_generate']} microbatch_score="
        f"{inp['microbatch_score']} microbatch_grad={inp['microbatch_grad']} microbatch_jvp={inp['microbatch_jvp']} "
        f"logits_chunk={inp['logits_chunk']}",
        "",
        f"{'phase':<16} {'peak/GPU':>12}   largest components",
    ]
    for name, ph in plan["phases"].items():
        comps = sorted(((k, v) for k, v in ph["components"].items() if v), key=lambda kv: -kv[1])[:4]
        lines.append(f"{name:<16} {_gib(ph['peak_bytes']):>12}   " + ", ".join(f"{k} {_gib(v)}" for k, v in comps))
    lines += ["", plan["message"]]
    lines += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- run time
def auto_microbatch_plan(cfg, model, world_size: int, device: torch.device, *, tokenizer=None) -> dict | None:
    """memory.auto_microbatch at run time: plan from the live model. Reads cfg, never writes it.

    model: the loaded (peft) model; its config and exact trainable count are planned for. The GPU memory is
    memory.gpu_mem_gib, else the device's total. tokenizer: measures the configured prompts (else as plan_memory).
    Returns None on a non-CUDA device without memory.gpu_mem_gib (there the OOM retry alone adapts the sizes),
    else plan_memory's dict; the sizes to apply are proposed_sizes(plan) (None when nothing fits: keep the
    configured ones). Raises PlanError as plan_memory does.
    """
    if device.type != "cuda" and cfg.memory.gpu_mem_gib is None:
        return None
    from probe_dist.model.policy import unwrap_causal_lm

    gpu_mem = (int(cfg.memory.gpu_mem_gib * GiB) if cfg.memory.gpu_mem_gib is not None
               else torch.cuda.get_device_properties(device).total_memory)
    prompt_tokens = None
    if tokenizer is not None:
        from probe_dist.data.prompts import load_prompts, prompt_token_ids

        prompts = load_prompts(cfg.sampling.prompts, cfg.sampling.split, require_answer=False)
        prompt_tokens = max(len(prompt_token_ids(tokenizer, p["prompt"], cfg.sampling.bos or "always"))
                            for p in prompts)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = plan_memory(cfg, gpu_mem, unwrap_causal_lm(model).config, world_size=world_size,
                       prompt_tokens=prompt_tokens, adapter_params=trainable)
    prop = plan["proposal"]
    if prop["fits"]:
        log.info("auto_microbatch: microbatch_generate=%d microbatch_score=%d microbatch_grad=%d microbatch_jvp=%d "
                 "logits_chunk=%d (planned peak %s)", prop["microbatch_generate"], prop["microbatch_score"],
                 prop["microbatch_grad"], prop["microbatch_jvp"], prop["logits_chunk"], _gib(prop["peak_bytes"]))
    else:
        log.warning("auto_microbatch: %s", plan["message"])
    return plan
