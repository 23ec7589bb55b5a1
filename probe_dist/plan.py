"""Memory planner: each phase's peak per GPU from the model config alone, and microbatch sizes that fit.

    python -m probe_dist.plan --config configs/a100_40gb_8gpu.yaml --gpu-mem 40GiB [key=value ...]
        [--model-config qwen2.5-1.5b|toy|PATH] [--lora-r 64] [--lora-alpha 128] [--lora-targets q_proj,...]
        [--world-size 8] [--prompt-tokens N] [--margin 0.10] [--reserve 1GiB] [--json]

The model is instantiated on the meta device (no weights, no download) and the LoRA adapter is attached with
peft on the meta model, so parameter counts are exact. Peaks are what the CUDA caching allocator reports as
*allocated* (torch.cuda.max_memory_allocated); the CUDA context and allocator slack are covered by `--reserve`
and `--margin`, which are taken off the GPU memory before anything is compared with it. Exit status: 0 when some
microbatch sizes fit (the configured ones, or the proposal printed), 1 when nothing fits, 2 for bad input.

Memory model (b = bytes of precision.dtype; n rows × L = prompt + max_new_tokens tokens per microbatch;
M = n × max_new_tokens scored positions; h hidden, I intermediate, H heads, d head dim, V vocabulary, ℓ layers;
every row of a microbatch belongs to one prompt group, so n ≤ G):

  static      weights (b each; FSDP2 shards the frozen base: ÷ world size, plus two unsharded decoder layers),
              adapter (b) and AdamW exp_avg/exp_avg_sq on the device in the parameter dtype (replicated),
              DDP gradient buckets (adapter × b), param-sized accumulators only if memory.accumulator_device=model
              (snapshots, the update vector and gradient accumulators are float64 on CPU by default);
              adapter gradients (adapter × b) in the passes with grad.
  saved for backward, per layer and token (Qwen2/Llama-style decoder, SDPA, frozen base, LoRA on projections):
              both RMSNorm inputs in float32 (8h) and their rsqrt; SDPA's q, k, v (k/v repeated to H heads when a
              padding mask is passed — the default assumption, an upper bound) and output, which is also o_proj's
              input (4·b·h), its log-sum-exp (4·H) and the additive mask (b·L); MLP gate, SiLU(gate), up (3·b·I);
              LoRA: each lora_A's input (shared when adapter and model dtype agree: b·h for q/k/v, b·h for gate/up,
              b·I for down; a float32 copy per projection for a bf16 model) and rank-r output (4·r);
              plus, once: the final norm input (4h), RoPE cos/sin (2·b·d), the response hidden states and targets
              (M·(b·h + 8)), minus layer 0's norm input (the embedding output needs no grad).
              tests/test_plan.py checks this against SavedTensorsMeter on real forwards (equal to ~0.1%).
  transient   grad passes: the larger of the checkpointed head chunk's backward (5 float32 [chunk, V] buffers,
              measured) and one layer's backward workspace (b·(1.5·I + h) per token); no-grad passes: the residual
              stream plus one layer's temporaries (b·(2h + max(4I + 2h, 8h)) per token, and the mask), or at the
              head the last hidden states + response hidden states + 4 float32 [chunk, V] buffers.
  generation  KV cache 2·ℓ·kv·d·g·L·b for g = min(memory.microbatch_generate, G) rows of one prompt decoded
              together, plus one layer's cache copy, and the larger of the prefill temporaries and the per-step
              float32 logits/probabilities (3·g·V·4).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("probe_dist")

GiB = 1 << 30
DEFAULT_MARGIN = 0.10
DEFAULT_RESERVE = 1 * GiB  # CUDA context + cuBLAS workspace, outside the caching allocator
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHASES = ("sample", "score_base", "update_gradient", "delta_h1", "sweep")
GRAD_LOGITS_FACTOR = 5   # float32 [chunk, V] buffers alive in a checkpointed head chunk's backward (measured: 4.95)
NOGRAD_LOGITS_FACTOR = 4  # ... in a no-grad chunk (logits, z/τ, exp temporaries, probs, probs·z)
MIN_LOGITS_CHUNK = 64
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float64": 8}


class PlanError(ValueError):
    """The planner cannot work out the model or the settings; the message says what to pass."""


# --------------------------------------------------------------------------------------- model shape
def builtin_model_config(name: str):
    """Model configs the planner knows by name: 'qwen2.5-1.5b' (Qwen2.5-1.5B's shape) and 'toy'."""
    import transformers

    key = name.lower().replace("_", "-")
    if key in ("qwen2.5-1.5b", "qwen2.5-1.5b-instruct", "qwen-1.5b"):
        return transformers.Qwen2Config(
            vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=True, attention_dropout=0.0, bos_token_id=151643,
            eos_token_id=151643)
    if key == "toy":
        from probe_dist.data.toy_task import model_config

        return model_config()
    raise PlanError(f"unknown model config name {name!r}: use 'qwen2.5-1.5b', 'toy', or a path to a model "
                    "directory (with config.json) or to a config.json file.")


def load_model_config(spec):
    """A transformers config from a config object, a dict, a built-in name, a directory or a config.json."""
    import transformers

    if spec is None:
        return None
    if isinstance(spec, transformers.PretrainedConfig):
        return spec
    if isinstance(spec, dict):
        d = dict(spec)
        return transformers.AutoConfig.for_model(d.pop("model_type", "qwen2"), **d)
    path = Path(str(spec)).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return transformers.AutoConfig.from_pretrained(str(path))
    if path.is_file():
        return load_model_config(json.loads(path.read_text()))
    return builtin_model_config(str(spec))


@dataclass
class LoraSpec:
    r: int = 64
    alpha: float = 128.0
    targets: tuple[str, ...] = ALL_PROJECTIONS
    source: str = "flags"
    peft_config: object | None = None  # a peft LoraConfig read from adapter_config.json, when there is one

    @property
    def full_finetune(self) -> bool:
        return self.r == 0 and self.peft_config is None


@dataclass
class ModelShape:
    name: str
    model_type: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    base_params: int
    adapter_params: int
    lora_modules: dict[str, tuple[float, float]]  # projection → (in_features, r), per decoder layer
    layer_params: int               # parameters of the largest decoder layer (adapter included)
    llama_like: bool
    full_finetune: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "model_type", "num_layers", "hidden", "intermediate", "heads",
                                              "kv_heads", "head_dim", "vocab", "tied", "base_params",
                                              "adapter_params", "layer_params")} | {"targets_found": self.targets_found}

    @property
    def targets_found(self) -> list[str]:
        return sorted(self.lora_modules)


def model_shape(model_config, lora: LoraSpec, name: str = "") -> ModelShape:
    """Instantiate the model (and the LoRA adapter) on the meta device and read the numbers off it."""
    import transformers
    from accelerate.utils import compute_module_sizes

    c = model_config
    notes = []
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(c)
        if not lora.full_finetune:
            from peft import LoraConfig, get_peft_model

            peft_cfg = lora.peft_config or LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                      target_modules=list(lora.targets))
            try:
                model = get_peft_model(model, peft_cfg)
            except ValueError as exc:
                raise PlanError(f"LoRA targets {list(lora.targets)} do not match modules of this model: {exc}") from exc
    named = list(model.named_parameters())  # tied weights appear once
    if lora.full_finetune:
        adapter = sum(p.numel() for _, p in named)
        base = adapter
    else:
        adapter = sum(p.numel() for n, p in named if "lora_" in n)
        base = sum(p.numel() for n, p in named if "lora_" not in n)
    num_layers = int(getattr(c, "num_hidden_layers", 0) or getattr(c, "n_layer", 0))
    hidden = int(getattr(c, "hidden_size", 0) or getattr(c, "n_embd", 0))
    heads = int(getattr(c, "num_attention_heads", 0) or getattr(c, "n_head", 0))
    kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(c, "head_dim", None) or hidden // max(heads, 1))
    intermediate = int(getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden)
    per_kind: dict[str, list[float]] = {}
    for mod_name, mod in model.named_modules():
        if mod_name.endswith(".lora_A.default") and isinstance(mod, torch.nn.Linear):
            acc = per_kind.setdefault(mod_name.split(".")[-3], [0.0, 0.0])
            acc[0] += mod.in_features
            acc[1] += mod.out_features
    if lora.full_finetune:  # every projection's input is saved, like a LoRA on all of them with r = 0
        per_kind = {k: [0.0, 0.0] for k in ALL_PROJECTIONS}
        for mod_name, mod in model.named_modules():
            kind = mod_name.split(".")[-1]
            if kind in per_kind and isinstance(mod, torch.nn.Linear):
                per_kind[kind][0] += mod.in_features
    lora_modules = {k: (v[0] / max(num_layers, 1), v[1] / max(num_layers, 1)) for k, v in per_kind.items()}
    sizes = compute_module_sizes(model, dtype=torch.float32)
    layer_keys = [k for k in sizes if re.search(r"\.layers\.\d+$", k) or re.search(r"\.h\.\d+$", k)]
    layer_params = max((sizes[k] // 4 for k in layer_keys), default=0)
    llama_like = all(hasattr(c, a) for a in ("intermediate_size", "num_key_value_heads"))
    if not llama_like:
        notes.append(f"model_type {c.model_type!r} is not Qwen2/Llama-style: the activation model is approximate")
    return ModelShape(
        name=name or getattr(c, "_name_or_path", "") or c.model_type, model_type=c.model_type,
        num_layers=num_layers, hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, vocab=int(c.vocab_size), tied=bool(getattr(c, "tie_word_embeddings", False)),
        base_params=int(base), adapter_params=int(adapter),
        lora_modules=lora_modules, layer_params=int(layer_params), llama_like=llama_like,
        full_finetune=lora.full_finetune, notes=notes)


# ------------------------------------------------------------------------------------ the byte model
@dataclass
class Settings:
    dtype_bytes: int
    world_size: int
    strategy: str
    prompt_tokens: int
    max_new_tokens: int
    group_e: int
    group_u: int
    single_batch: bool
    kl: bool
    real_step: bool
    amsgrad: bool
    accumulators_on_device: bool
    rows_generate: int = 8  # memory.microbatch_generate: responses of one prompt decoded together

    @property
    def seq_len(self) -> int:
        return self.prompt_tokens + self.max_new_tokens


def saved_activation_bytes(shape: ModelShape, n: int, seq_len: int, scored: int, dtype_bytes: int,
                           padded: bool = True) -> int:
    """Bytes autograd saves for backward in one forward of n rows × seq_len tokens (`scored` positions per row).

    padded=True (the default, an upper bound): rows of different lengths make transformers pass an attention mask,
    and SDPA then runs on k/v repeated to all heads and saves the additive mask; without padding k/v stay at
    the KV heads and there is no mask.
    """
    b, h, t = dtype_bytes, shape.hidden, n * seq_len
    # peft keeps adapters in float32 (float64 models: float64); full fine-tuning has no separate adapter dtype
    lb = b if shape.full_finetune else (8 if b == 8 else 4)
    mods = shape.lora_modules
    attn_lora = bool(set(mods) & {"q_proj", "k_proj", "v_proj", "o_proj"})
    if lb == b:  # LoRA A saves its input; q/k/v share the normalised input, gate/up theirs, o_proj's is SDPA's
        lora_inputs = b * (h * bool(set(mods) & {"q_proj", "k_proj", "v_proj"})
                           + h * bool(set(mods) & {"gate_proj", "up_proj"}) + shape.intermediate * ("down_proj" in mods))
    else:  # each LoRA A casts its input to float32: one copy per projection
        lora_inputs = lb * sum(in_f for in_f, _ in mods.values())
    lora_outputs = lb * sum(r for _, r in mods.values())
    kv = h if padded else shape.kv_heads * shape.head_dim
    sdpa = b * (2 * h + 2 * kv) + 4 * shape.heads + (b * seq_len if padded else 0)
    norms = 2 * 4 * h + 8  # both RMSNorm inputs in float32, and their rsqrt
    mlp = 3 * b * shape.intermediate  # gate, SiLU(gate), up
    per_layer = norms + sdpa + mlp + lora_inputs + lora_outputs
    # Layer 0's input (the embedding output) needs no grad: its first norm input is not saved, nor — without LoRA
    # in its attention — its attention or second norm input. The final norm input and RoPE cos/sin are saved once.
    layer0 = 4 * h + (0 if attn_lora else sdpa + 4 * h)
    model_level = 4 * h + 2 * b * shape.head_dim - layer0
    m = n * scored
    response = m * (b * h + 8) + n * scored  # hidden states at scored positions, targets, response mask
    return int(t * (shape.num_layers * per_layer + model_level) + response)


def logits_chunk_bytes(shape: ModelShape, chunk: int, grad: bool) -> int:
    return (GRAD_LOGITS_FACTOR if grad else NOGRAD_LOGITS_FACTOR) * chunk * shape.vocab * 4


def _static(shape: ModelShape, s: Settings) -> dict[str, int]:
    b, ws = s.dtype_bytes, s.world_size
    shard = ws if s.strategy == "fsdp2" and ws > 1 else 1
    # FSDP2 shards the frozen base only: the adapter, its optimizer state and gradients stay replicated
    # (probe_dist.runtime.strategy), so their gradients are reduced by the probe in float64.
    out = {
        "weights": math.ceil(shape.base_params * b / shard),
        "adapter": 0 if shape.full_finetune else shape.adapter_params * b,
        "optimizer_state": (3 if s.amsgrad else 2) * shape.adapter_params * b,
    }
    if s.strategy == "ddp" and ws > 1:
        out["ddp_buckets"] = shape.adapter_params * b
    if shard > 1:
        out["fsdp_unsharded_layers"] = 2 * shape.layer_params * b
    if s.accumulators_on_device:
        out["accumulators"] = 4 * shape.adapter_params * 8
    return out


def _nograd_forward(shape: ModelShape, s: Settings, n: int, chunk: int) -> dict[str, int]:
    """Peak of one no-grad scoring forward: inside the widest layer, or at the chunked head."""
    b, h, L = s.dtype_bytes, shape.hidden, s.seq_len
    t = n * L
    inside = t * b * (2 * h + max(4 * shape.intermediate + 2 * h, 8 * h)) + n * L * L * (b + 1)
    m = n * s.max_new_tokens
    at_head_hidden = t * b * h + m * b * h
    at_head = at_head_hidden + logits_chunk_bytes(shape, min(chunk, m), grad=False)
    if inside >= at_head:
        return {"forward_transient": inside, "response_hidden": 0, "logits_chunk": 0}
    return {"forward_transient": 0, "response_hidden": at_head_hidden,
            "logits_chunk": logits_chunk_bytes(shape, min(chunk, m), grad=False)}


def _grad_pass(shape: ModelShape, s: Settings, n: int, chunk: int) -> dict[str, int]:
    """Peak of one forward+backward: all saved activations + the larger of head backward and a layer's."""
    b, h, L = s.dtype_bytes, shape.hidden, s.seq_len
    m = n * s.max_new_tokens
    saved = saved_activation_bytes(shape, n, L, s.max_new_tokens, b)
    head = logits_chunk_bytes(shape, min(chunk, m), grad=True) + m * 4 * h
    layer = n * L * b * (3 * shape.intermediate // 2 + h)
    return {"activations_saved": saved, "logits_chunk": head if head >= layer else 0,
            "layer_workspace": layer if layer > head else 0}


def _sample(shape: ModelShape, s: Settings) -> dict[str, int]:
    b = s.dtype_bytes
    g = min(s.rows_generate, max(s.group_e, s.group_u))  # rows of one prompt decoded together
    per_token_layer = 2 * shape.kv_heads * shape.head_dim * b
    kv = shape.num_layers * per_token_layer * g * s.seq_len
    prefill = g * s.prompt_tokens * b * (2 * shape.hidden + max(4 * shape.intermediate + 2 * shape.hidden,
                                                                8 * shape.hidden))
    step = 3 * g * shape.vocab * 4 + g * shape.vocab * b
    return {"kv_cache": kv, "generation_transient": per_token_layer * g * s.seq_len + max(prefill, step)}


def phase_peaks(shape: ModelShape, s: Settings, rows_score: int, rows_grad: int, chunk: int) -> dict[str, dict]:
    """{phase: {"peak_bytes": int, "components": {name: bytes}}} — components add up to the peak."""
    static = _static(shape, s)
    grads = {"adapter_grads": shape.adapter_params * s.dtype_bytes}
    rs_e, rg_e, rg_u = min(rows_score, s.group_e), min(rows_grad, s.group_e), min(rows_grad, s.group_u)

    def total(parts: dict) -> dict:
        return {"peak_bytes": int(sum(parts.values())), "components": {k: int(v) for k, v in parts.items()}}

    def best(*alternatives: dict) -> dict:
        return max(alternatives, key=lambda d: sum(d.values()))

    out = {"sample": total({**static, **_sample(shape, s)}),
           "score_base": total({**static, **_nograd_forward(shape, s, rs_e, chunk)})}
    update = {**static, **grads, **_grad_pass(shape, s, rg_u, chunk)}
    if s.kl:  # reference log-probs: a no-grad forward with microbatch_grad rows and the adapter disabled
        update = best(update, {**static, **grads, **_nograd_forward(shape, s, rg_u, chunk)})
    out["update_gradient"] = total(update)
    d1 = {**static, **grads, **_grad_pass(shape, s, rg_e, chunk)}
    if s.single_batch:
        d1 = best(d1, {**static, **grads, **_grad_pass(shape, s, rg_u, chunk)})
    out["delta_h1"] = total(d1)
    sweep = {**static, **_nograd_forward(shape, s, rs_e, chunk)}
    if s.real_step:
        sweep["real_step_transient"] = 3 * shape.adapter_params * s.dtype_bytes
    out["sweep"] = total(sweep)
    return out


# ------------------------------------------------------------------------------------- inputs
def parse_bytes(text) -> int:
    """'40GiB', '40G' (= GiB), '40GB' (= 10^9), '512MiB', '1.5TiB' or a plain number of bytes."""
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


def _checkpoint_dirs(cfg) -> tuple[Path | None, Path | None]:
    ck = cfg.checkpoint
    root = Path(ck.path) if ck.path else None
    base = Path(ck.base) if ck.base else (root / "base" if root is not None else None)
    adapter = Path(ck.adapter) if ck.adapter else root
    return base, adapter


def resolve_lora(cfg, model_name: str, r: int | None, alpha: float | None, targets: list[str] | None) -> LoraSpec:
    _, adapter_dir = _checkpoint_dirs(cfg)
    if adapter_dir is not None and (adapter_dir / "adapter_config.json").is_file() and r is None and not targets:
        from peft import LoraConfig

        pc = LoraConfig.from_pretrained(str(adapter_dir))
        tm = pc.target_modules
        return LoraSpec(r=int(pc.r), alpha=float(pc.lora_alpha),
                        targets=tuple(sorted(tm)) if not isinstance(tm, str) else (tm,),
                        source=str(adapter_dir / "adapter_config.json"), peft_config=pc)
    if model_name == "toy" and r is None and not targets:
        from probe_dist.toy import TRAINING_ARGS

        lo = TRAINING_ARGS["lora"]
        return LoraSpec(r=lo["r"], alpha=lo["lora_alpha"], targets=tuple(lo["target_modules"]), source="toy recipe")
    r = 64 if r is None else r
    return LoraSpec(r=r, alpha=float(alpha if alpha is not None else 2 * r),
                    targets=tuple(targets) if targets else ALL_PROJECTIONS, source="flags")


def _resolve_model(cfg, model_config) -> tuple[object, str]:
    if model_config is not None:
        spec_name = model_config if isinstance(model_config, str) else ""
        return load_model_config(model_config), spec_name
    base, _ = _checkpoint_dirs(cfg)
    if base is not None:
        if not (base / "config.json").is_file():
            raise PlanError(f"no config.json in the base model directory {str(base)!r}; pass --model-config "
                            "PATH_OR_NAME (e.g. qwen2.5-1.5b) to plan without the checkpoint.")
        return load_model_config(base), str(base)
    # No checkpoint: the probe uses the built-in toy checkpoint.
    return builtin_model_config("toy"), "toy"


def _training_args(cfg) -> dict:
    if cfg.checkpoint.path:
        p = Path(cfg.checkpoint.path) / "training_args.json"
        if p.is_file():
            return json.loads(p.read_text())
    return {}


def _prompt_tokens(cfg, notes: list[str]) -> int:
    if cfg.sampling.prompts == "toy":
        from probe_dist.data.toy_task import MAX_PROMPT_TOKENS

        return MAX_PROMPT_TOKENS
    path = Path(cfg.sampling.prompts)
    tok_dir = None
    if cfg.checkpoint.tokenizer:
        tok_dir = Path(cfg.checkpoint.tokenizer)
    elif cfg.checkpoint.path and (Path(cfg.checkpoint.path) / "tokenizer").is_dir():
        tok_dir = Path(cfg.checkpoint.path) / "tokenizer"
    if path.is_file() and tok_dir is not None:
        try:
            from probe_dist.data.prompts import load_prompts
            from probe_dist.model.load import load_tokenizer

            tok = load_tokenizer(tok_dir)
            prompts = load_prompts(str(path), cfg.sampling.split)
            return 1 + max(len(tok(p["prompt"], add_special_tokens=False)["input_ids"]) for p in prompts)
        except Exception as exc:  # noqa: BLE001 - fall back to the assumption below, and say so
            notes.append(f"could not measure prompt lengths ({exc})")
    notes.append("prompt length assumed to be 512 tokens; pass --prompt-tokens N for your prompts")
    return 512


# ------------------------------------------------------------------------------------- the plan
def _divisor_rows(n_max: int, group: int) -> int:
    """The smallest row count with as few passes per group as n_max rows: same passes, less memory."""
    n_max = max(1, min(n_max, group))
    return math.ceil(group / math.ceil(group / n_max))


def plan_memory(cfg, gpu_mem_bytes: int | None = None, model_config=None, *, lora_r: int | None = None,
                lora_alpha: float | None = None, lora_targets: list[str] | None = None,
                world_size: int | None = None, prompt_tokens: int | None = None, margin: float = DEFAULT_MARGIN,
                reserve_bytes: int = DEFAULT_RESERVE, adapter_params: int | None = None) -> dict:
    """Per-phase predicted peak bytes per GPU, their components, and microbatch sizes that fit.

    cfg: a ProbeConfig. gpu_mem_bytes: the GPU's memory (default memory.gpu_mem_gib). model_config: a transformers
    config, a dict, 'qwen2.5-1.5b' / 'toy', or a path (default: the checkpoint's base config.json, else the toy).
    adapter_params overrides the counted adapter size (the live model's exact count at run time).
    """
    notes: list[str] = []
    if gpu_mem_bytes is None:
        if cfg.memory.gpu_mem_gib is None:
            raise PlanError("no GPU memory budget: pass --gpu-mem 40GiB (or set memory.gpu_mem_gib=40).")
        gpu_mem_bytes = int(cfg.memory.gpu_mem_gib * GiB)
    if not 0 <= margin < 1:
        raise PlanError(f"margin must be in [0, 1), got {margin}")
    mc, name = _resolve_model(cfg, model_config)
    lora = resolve_lora(cfg, name, lora_r, lora_alpha, lora_targets)
    shape = model_shape(mc, lora, name)
    if adapter_params is not None:
        shape.adapter_params = int(adapter_params)
    notes.extend(shape.notes)
    targs = _training_args(cfg)
    max_new = cfg.sampling.max_new_tokens or targs.get("max_new_tokens")
    if max_new is None and not (cfg.checkpoint.path or cfg.checkpoint.base):
        from probe_dist.data.toy_task import MAX_ANSWER_TOKENS

        max_new = MAX_ANSWER_TOKENS
    if max_new is None:
        raise PlanError("sampling.max_new_tokens is not set and no training_args.json records it: "
                        "pass sampling.max_new_tokens=N.")
    if prompt_tokens is None:
        prompt_tokens = _prompt_tokens(cfg, notes)
    strategy = cfg.distributed.strategy
    if world_size is None:
        env = os.environ.get("WORLD_SIZE")
        world_size = int(env) if env else (8 if strategy in ("ddp", "fsdp2") else 1)
    dtype_bytes = _DTYPE_BYTES[cfg.precision.dtype]
    s = Settings(dtype_bytes=dtype_bytes, world_size=int(world_size), strategy=strategy,
                 prompt_tokens=int(prompt_tokens), max_new_tokens=int(max_new), group_e=cfg.sampling.G_E,
                 group_u=cfg.sampling.G_U, single_batch=cfg.estimators.mode == "single_batch",
                 kl=bool(cfg.update.kl_coef), real_step=cfg.update.route == "real_step", amsgrad=False,
                 accumulators_on_device=cfg.memory.accumulator_device == "model",
                 rows_generate=cfg.memory.microbatch_generate)
    available = int(gpu_mem_bytes * (1.0 - margin) - reserve_bytes)
    m = cfg.memory
    configured = phase_peaks(shape, s, m.microbatch_score, m.microbatch_grad, m.logits_chunk)
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
                   "microbatch_score": m.microbatch_score, "microbatch_grad": m.microbatch_grad,
                   "logits_chunk": m.logits_chunk},
        "phases": configured,
        "peak_bytes": peak,
        "peak_phase": worst,
        "fits": peak <= available,
        "proposal": proposal,
        "notes": notes,
    }
    plan["message"] = _message(plan)
    return plan


def _round_up(n: int) -> int:
    step = 10 ** max(0, len(str(n)) - 2)
    return int(math.ceil(n / step) * step)


def _propose(shape: ModelShape, s: Settings, available: int, chunk_configured: int) -> dict:
    """Largest microbatches (fewest passes per group) and logits chunk for which every phase fits."""
    g_max = max(s.group_e, s.group_u)
    chunks = []
    c = max(chunk_configured, MIN_LOGITS_CHUNK)
    while c >= MIN_LOGITS_CHUNK:
        chunks.append(c)
        c //= 2
    best = None
    for chunk in chunks:
        rows_grad = next((n for n in range(g_max, 0, -1) if _fits_phases(shape, s, 1, n, chunk, available,
                                                                         ("update_gradient", "delta_h1"))), 0)
        rows_score = next((n for n in range(g_max, 0, -1) if _fits_phases(shape, s, n, 1, chunk, available,
                                                                          ("score_base", "sweep"))), 0)
        if rows_grad == 0 or rows_score == 0:
            continue
        rows_grad, rows_score = _divisor_rows(rows_grad, g_max), _divisor_rows(rows_score, g_max)
        key = (-math.ceil(g_max / rows_grad), -math.ceil(g_max / rows_score), chunk)
        if best is None or key > best[0]:
            best = (key, rows_score, rows_grad, chunk)
    if best is None:
        smallest = phase_peaks(shape, s, 1, 1, MIN_LOGITS_CHUNK)
        return {"fits": False, "microbatch_score": None, "microbatch_grad": None, "logits_chunk": None,
                "peak_bytes": max(p["peak_bytes"] for p in smallest.values()),
                "phases": {k: v["peak_bytes"] for k, v in smallest.items()}}
    _, rows_score, rows_grad, chunk = best
    phases = phase_peaks(shape, s, rows_score, rows_grad, chunk)
    peak = max(p["peak_bytes"] for p in phases.values())
    return {"fits": peak <= available, "microbatch_score": rows_score, "microbatch_grad": rows_grad,
            "logits_chunk": chunk, "peak_bytes": peak, "phases": {k: v["peak_bytes"] for k, v in phases.items()}}


def _fits_phases(shape, s, rows_score, rows_grad, chunk, available, names) -> bool:
    peaks = phase_peaks(shape, s, rows_score, rows_grad, chunk)
    return all(peaks[k]["peak_bytes"] <= available for k in names) and peaks["sample"]["peak_bytes"] <= available


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
        tail = (f" Largest sizes that fit: memory.microbatch_score={prop['microbatch_score']} "
                f"memory.microbatch_grad={prop['microbatch_grad']} memory.logits_chunk={prop['logits_chunk']} "
                f"(peak {_gib(prop['peak_bytes'])}).")
    else:
        phases = plan["phases"]
        static = {k: v for k, v in phases[plan["peak_phase"]]["components"].items()
                  if k in ("weights", "adapter", "optimizer_state", "ddp_buckets", "accumulators")}
        tail = (f" Does not fit at all: even microbatch 1 and logits_chunk {MIN_LOGITS_CHUNK} need "
                f"{_gib(prop['peak_bytes'])} (static part: "
                + ", ".join(f"{k} {_gib(v)}" for k, v in static.items())
                + "). Options: distributed.strategy=fsdp2 (shards the base weights over the GPUs), "
                  "precision.dtype=bfloat16 (halves weights and activations; quantises tiny η, see PITFALLS #1), "
                  "a shorter sampling.max_new_tokens or smaller G, or a GPU with more memory.")
    return head + tail


# ------------------------------------------------------------------------------------- run time
def auto_microbatch_plan(cfg, model, world_size: int, device: torch.device, tokenizer=None) -> dict | None:
    """memory.auto_microbatch at run time: plan from the live model and set memory.microbatch_* / logits_chunk.

    Returns the plan (None on CPU without memory.gpu_mem_gib: there the OOM retry alone adapts the sizes).
    """
    if device.type != "cuda" and cfg.memory.gpu_mem_gib is None:
        return None
    from probe_dist.model.policy import unwrap_causal_lm

    gpu_mem = (int(cfg.memory.gpu_mem_gib * GiB) if cfg.memory.gpu_mem_gib is not None
               else torch.cuda.get_device_properties(device).total_memory)
    prompt_tokens = None
    if tokenizer is not None:
        from probe_dist.data.prompts import load_prompts

        prompts = load_prompts(cfg.sampling.prompts, cfg.sampling.split)
        prompt_tokens = 1 + max(len(tokenizer(p["prompt"], add_special_tokens=False)["input_ids"]) for p in prompts)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = plan_memory(cfg, gpu_mem, unwrap_causal_lm(model).config, world_size=world_size,
                       prompt_tokens=prompt_tokens, adapter_params=trainable)
    prop = plan["proposal"]
    if prop["fits"]:
        cfg.memory.microbatch_score = prop["microbatch_score"]
        cfg.memory.microbatch_grad = prop["microbatch_grad"]
        cfg.memory.logits_chunk = prop["logits_chunk"]
        log.info("auto_microbatch: microbatch_score=%d microbatch_grad=%d logits_chunk=%d (planned peak %s)",
                 prop["microbatch_score"], prop["microbatch_grad"], prop["logits_chunk"], _gib(prop["peak_bytes"]))
    else:
        log.warning("auto_microbatch: %s", plan["message"])
    return plan


# ------------------------------------------------------------------------------------- CLI
def format_plan(plan: dict) -> str:
    inp, mdl = plan["inputs"], plan["model"]
    lines = [
        f"model {mdl['name']} ({mdl['model_type']}): {mdl['base_params']:,} base parameters, "
        f"{mdl['adapter_params']:,} trainable (LoRA r={plan['lora']['r']} on {', '.join(mdl['targets_found'])})",
        f"{inp['strategy']} × {inp['world_size']} GPUs, {inp['dtype']}, sequences {inp['prompt_tokens']} + "
        f"{inp['max_new_tokens']} tokens, G_E={inp['G_E']} G_U={inp['G_U']}, microbatch_score="
        f"{inp['microbatch_score']} microbatch_grad={inp['microbatch_grad']} logits_chunk={inp['logits_chunk']}",
        "",
        f"{'phase':<16} {'peak/GPU':>12}   largest components",
    ]
    for name, ph in plan["phases"].items():
        comps = sorted(((k, v) for k, v in ph["components"].items() if v), key=lambda kv: -kv[1])[:4]
        lines.append(f"{name:<16} {_gib(ph['peak_bytes']):>12}   " + ", ".join(f"{k} {_gib(v)}" for k, v in comps))
    lines += ["", plan["message"]]
    lines += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    import warnings

    from probe_dist.config import ConfigError, load_config

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    p = argparse.ArgumentParser(prog="python -m probe_dist.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file (as for probe_dist.main)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. memory.microbatch_grad=4")
    p.add_argument("--gpu-mem", help="memory per GPU, e.g. 40GiB or 80GB (default: memory.gpu_mem_gib)")
    p.add_argument("--model-config", help="qwen2.5-1.5b, toy, a model directory or a config.json "
                                          "(default: the checkpoint's base, else the toy model)")
    p.add_argument("--lora-r", type=int, help="LoRA rank when there is no adapter_config.json (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (does not change memory)")
    p.add_argument("--lora-targets", help="comma-separated LoRA target modules (default: all projections)")
    p.add_argument("--world-size", type=int, help="GPUs in the job (default: $WORLD_SIZE, else 8 for ddp/fsdp2)")
    p.add_argument("--prompt-tokens", type=int, help="longest prompt in tokens (default: measured, or 512)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="safety margin (fraction of GPU memory)")
    p.add_argument("--reserve", default="1GiB", help="CUDA context / workspace reserve outside the allocator")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        plan = plan_memory(cfg, parse_bytes(a.gpu_mem) if a.gpu_mem else None, a.model_config,
                           lora_r=a.lora_r, lora_alpha=a.lora_alpha,
                           lora_targets=[t for t in a.lora_targets.split(",") if t] if a.lora_targets else None,
                           world_size=a.world_size, prompt_tokens=a.prompt_tokens, margin=a.margin,
                           reserve_bytes=parse_bytes(a.reserve))
    except (ConfigError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if a.json else format_plan(plan))
    return 0 if plan["proposal"]["fits"] else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
