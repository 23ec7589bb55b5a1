"""Model shape: the numbers the byte model needs, read off the model built on the meta device.

The model is instantiated on the meta device (no weights, no download) and the LoRA adapter is attached with
peft on the meta model, so parameter counts are exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(ValueError):
    """The planner cannot work out the model or the settings; the message says what to pass."""


def builtin_model_config(name: str):
    """A transformers config for a model the planner knows by name.

    name: 'qwen2.5-1.5b' (also 'qwen2.5-1.5b-instruct', 'qwen-1.5b'; Qwen2.5-1.5B's shape) or 'toy' (the toy
    checkpoint's model); case and '_' / '-' do not matter. Raises PlanError for any other name.
    """
    import transformers

    key = name.lower().replace("_", "-")
    if key in ("qwen2.5-1.5b", "qwen2.5-1.5b-instruct", "qwen-1.5b"):
        return transformers.Qwen2Config(
            vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=True, attention_dropout=0.0, bos_token_id=151643,
            eos_token_id=151643)
    if key == "toy":
        from probe_dist.toy.task import model_config

        return model_config()
    raise PlanError(f"unknown model config name {name!r}: use 'qwen2.5-1.5b', 'toy', or a path to a model "
                    "directory (with config.json) or to a config.json file.")


def load_model_config(spec):
    """A transformers config from `spec`, or None when spec is None.

    spec: a transformers PretrainedConfig (returned as is), a dict (its "model_type", default qwen2, picks the
    class), a model directory holding config.json, a config.json file, or a built-in name (builtin_model_config).
    Raises PlanError for a name that is none of these; transformers' errors for an unreadable config.
    """
    import transformers

    if spec is None:
        return None
    if isinstance(spec, transformers.PretrainedConfig):
        return spec
    if isinstance(spec, dict):
        d = dict(spec)
        return transformers.AutoConfig.for_model(d.pop("model_type", "qwen2"), **d)
    path = Path(str(spec)).expanduser()
    from probe_dist.state.checks import read_json

    if path.is_dir() and (path / "config.json").is_file():
        read_json(path / "config.json", "model config", "Re-save the model with save_pretrained.")  # bounded
        return transformers.AutoConfig.from_pretrained(str(path))
    if path.is_file():
        return load_model_config(read_json(path, "model config", "Pass a config.json saved by save_pretrained."))
    return builtin_model_config(str(spec))


@dataclass(kw_only=True)
class LoraSpec:
    """The adapter to plan for: rank r (0 and no peft_config: full fine-tuning), alpha, target projections."""

    r: int = 64
    alpha: float = 128.0
    targets: tuple[str, ...] = ALL_PROJECTIONS
    source: str = "flags"
    peft_config: object | None = None  # a peft LoraConfig read from adapter_config.json, when there is one

    @property
    def full_finetune(self) -> bool:
        """Whether this plans full fine-tuning: r = 0 and no peft_config (no adapter; all weights train)."""
        return self.r == 0 and self.peft_config is None


@dataclass(kw_only=True)
class ModelShape:
    """Dimensions and exact parameter counts of a decoder-only model with its adapter (counts in elements)."""

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
        """The dimensions and parameter counts (elements) with `targets_found`, as plain data: the plan's
        "model" entry (plan/planner.py)."""
        return {k: getattr(self, k) for k in ("name", "model_type", "num_layers", "hidden", "intermediate", "heads",
                                              "kv_heads", "head_dim", "vocab", "tied", "base_params",
                                              "adapter_params", "layer_params")} | {"targets_found": self.targets_found}

    @property
    def targets_found(self) -> list[str]:
        """The projection kinds the adapter was found on (the keys of lora_modules), sorted."""
        return sorted(self.lora_modules)


def model_shape(model_config, lora: LoraSpec, name: str = "") -> ModelShape:
    """Instantiate the model (and the LoRA adapter) on the meta device and read the numbers off it.

    model_config: a transformers config. Parameter counts are exact (tied weights counted once); lora_modules
    holds, per adapted projection kind, the mean in_features and rank per decoder layer. Raises PlanError when
    the LoRA targets match no module of the model.
    """
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


def resolve_lora(adapter_dir: Path | None, model_name: str, *, r: int | None = None, alpha: float | None = None,
                 targets: list[str] | None = None) -> LoraSpec:
    """The adapter to plan for, first match wins.

    1. adapter_dir/adapter_config.json, when it exists and neither r nor targets is given (peft's LoraConfig);
    2. the toy recipe, for model_name 'toy' without r / targets;
    3. the flags: r (default 64; 0 = full fine-tuning), alpha (default 2r), targets (default all projections).
    """
    if adapter_dir is not None and (adapter_dir / "adapter_config.json").is_file() and r is None and not targets:
        from peft import LoraConfig

        pc = LoraConfig.from_pretrained(str(adapter_dir))
        tm = pc.target_modules
        return LoraSpec(r=int(pc.r), alpha=float(pc.lora_alpha),
                        targets=tuple(sorted(tm)) if not isinstance(tm, str) else (tm,),
                        source=str(adapter_dir / "adapter_config.json"), peft_config=pc)
    if model_name == "toy" and r is None and not targets:
        from probe_dist.toy.checkpoint import TRAINING_ARGS

        lo = TRAINING_ARGS["lora"]
        return LoraSpec(r=lo["r"], alpha=lo["lora_alpha"], targets=tuple(lo["target_modules"]), source="toy recipe")
    r = 64 if r is None else r
    return LoraSpec(r=r, alpha=float(alpha if alpha is not None else 2 * r),
                    targets=tuple(targets) if targets else ALL_PROJECTIONS, source="flags")
