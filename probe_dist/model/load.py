"""Load base + LoRA adapter + AdamW state, remapped by parameter name, with guards that fail early and clearly.

Checkpoint directory layout (what `python -m probe_dist.toy build` writes, and what HF Trainer LoRA checkpoints
almost are):  base/  tokenizer/  adapter_config.json  adapter_model.safetensors  optimizer.pt
              training_args.json  trainer_state.json
optimizer.pt holds {"optimizer_class": "AdamW", "param_names": [...], "state_dict": optimizer.state_dict()}.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("probe_dist")

ADAMW_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")
_NAME_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


class CheckpointError(RuntimeError):
    """A checkpoint that the probe refuses, with what is wrong and how to fix it."""


@dataclass
class CheckpointPaths:
    base: Path
    adapter: Path | None
    optimizer: Path
    tokenizer: Path
    training_args: dict = field(default_factory=dict)


def canonical_name(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _NAME_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name.replace("._fsdp_wrapped_module", "").replace("._checkpoint_wrapped_module", "")


def resolve_paths(checkpoint_cfg) -> CheckpointPaths:
    root = Path(checkpoint_cfg.path) if checkpoint_cfg.path else None
    if root is not None and not root.is_dir():
        raise CheckpointError(f"checkpoint.path {str(root)!r} is not a directory. Point it at a checkpoint "
                              "directory (base/, adapter files, optimizer.pt) or give checkpoint.base/adapter/optimizer.")

    def pick(explicit, default_rel, what):
        if explicit:
            return Path(explicit)
        if root is None:
            raise CheckpointError(f"no {what} given: set checkpoint.path, or checkpoint.{what} explicitly.")
        return root / default_rel

    base = pick(checkpoint_cfg.base, "base", "base")
    optimizer = pick(checkpoint_cfg.optimizer, "optimizer.pt", "optimizer")
    adapter = Path(checkpoint_cfg.adapter) if checkpoint_cfg.adapter else root
    if adapter is not None and not (adapter / "adapter_config.json").exists():
        if checkpoint_cfg.adapter:
            raise CheckpointError(f"checkpoint.adapter {str(adapter)!r} has no adapter_config.json.")
        adapter = None  # full fine-tuning checkpoint: the base itself is trainable (guarded below)
    tokenizer = Path(checkpoint_cfg.tokenizer) if checkpoint_cfg.tokenizer else (
        root / "tokenizer" if root is not None and (root / "tokenizer").is_dir() else base)
    for path, what in ((base, "base"), (optimizer, "optimizer")):
        if not path.exists():
            raise CheckpointError(f"checkpoint {what} {str(path)!r} does not exist.")
    args = {}
    for cand in ([root / "training_args.json"] if root else []) + [optimizer.parent / "training_args.json"]:
        if cand.is_file():
            args = json.loads(cand.read_text())
            break
    return CheckpointPaths(base=base, adapter=adapter, optimizer=optimizer, tokenizer=tokenizer, training_args=args)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # A fast tokenizer saved next to a Qwen2 config reloads through AutoTokenizer with other ids: load it directly.
    if (path / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        log.info("tokenizer has no pad token: using EOS %r as pad (pad is never scored)", tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def load_model(paths: CheckpointPaths, dtype: torch.dtype, device: torch.device):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rank-prefixed logs instead of one progress bar per rank

    base = AutoModelForCausalLM.from_pretrained(str(paths.base), dtype=dtype)
    if paths.adapter is not None:
        model = PeftModel.from_pretrained(base, str(paths.adapter), is_trainable=True)
    else:
        model = base
    model.to(device)
    model.eval()  # dropout (LoRA dropout included) off for every probe pass
    return model


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def check_trainable_count(trainable, max_params: int, allow_full: bool) -> int:
    count = sum(p.numel() for _, p in trainable)
    if count == 0:
        raise CheckpointError("the model has no trainable parameters: was the adapter loaded with is_trainable=True?")
    if count > max_params and not allow_full:
        raise CheckpointError(
            f"{count:,} trainable parameters exceed memory.max_trainable_params={max_params:,}. This usually means "
            "full-model gradients by accident (adapter missing or base not frozen). Load a LoRA adapter, or set "
            "memory.allow_full_finetune=true (and raise memory.max_trainable_params) if you really fine-tune fully.")
    return count


def load_optimizer(path: Path, trainable: list[tuple[str, torch.nn.Parameter]]) -> tuple[torch.optim.AdamW, dict]:
    """Build torch AdamW over exactly the trainable parameters and load the saved state remapped by name."""
    try:
        blob = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise CheckpointError(f"could not read optimizer state {str(path)!r}: {exc}") from exc
    if not isinstance(blob, dict) or "state_dict" not in blob or "param_names" not in blob:
        raise CheckpointError(
            f"{str(path)!r} is not a probe_dist optimizer file: expected a dict with 'state_dict' and 'param_names' "
            "(the trainable parameter names in optimizer order). Re-save it with "
            "torch.save({'optimizer_class': 'AdamW', 'param_names': names, 'state_dict': opt.state_dict()}, path).")
    cls = str(blob.get("optimizer_class", "AdamW"))
    sd = blob["state_dict"]
    groups = sd.get("param_groups", [])
    if cls.split(".")[-1] != "AdamW" or any("betas" not in g or "eps" not in g for g in groups):
        raise CheckpointError(f"optimizer in {str(path)!r} is {cls!r}, not torch AdamW: the probe reproduces the "
                              "exact AdamW step (docs/method.md §4) and refuses other optimizers.")
    if any(g.get("maximize") for g in groups):
        raise CheckpointError("AdamW with maximize=True is not supported.")
    if any(g.get("decoupled_weight_decay") is False for g in groups):
        raise CheckpointError("the optimizer is Adam with L2 weight decay (decoupled_weight_decay=False), not AdamW.")
    saved_names = [canonical_name(n) for n in blob["param_names"]]
    by_name = {canonical_name(n): p for n, p in trainable}
    missing = sorted(set(by_name) - set(saved_names))
    extra = sorted(set(saved_names) - set(by_name))
    if missing or extra:
        raise CheckpointError(
            f"optimizer state in {str(path)!r} does not match the trainable parameters: "
            f"{len(missing)} trainable without state (e.g. {missing[:3]}), {len(extra)} saved for unknown parameters "
            f"(e.g. {extra[:3]}). Check that the adapter and optimizer come from the same checkpoint.")
    # Saved param ids, group by group, in order: id k ↔ saved_names[k].
    ordered_ids = [i for g in groups for i in g["params"]]
    if len(ordered_ids) != len(saved_names):
        raise CheckpointError(f"optimizer file lists {len(saved_names)} names but {len(ordered_ids)} parameter ids.")
    name_of_id = dict(zip(ordered_ids, saved_names))
    new_groups = []
    for g in groups:
        hyper = {k: v for k, v in g.items() if k != "params"}
        new_groups.append({**hyper, "params": [by_name[name_of_id[i]] for i in g["params"]]})
    for g in new_groups:
        for key in ("foreach", "fused", "capturable", "differentiable"):
            g.pop(key, None)  # implementation choices of the saving machine, not math
    optimizer = torch.optim.AdamW(new_groups)
    problems = []
    for pid in ordered_ids:
        name = name_of_id[pid]
        param = by_name[name]
        state = sd.get("state", {}).get(pid)
        if state is None or any(k not in state for k in ADAMW_STATE_KEYS):
            problems.append(f"{name}: missing {[k for k in ADAMW_STATE_KEYS if state is None or k not in state]}")
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if tuple(state[key].shape) != tuple(param.shape):
                problems.append(f"{name}: {key} shape {tuple(state[key].shape)} != parameter {tuple(param.shape)}")
    if problems:
        raise CheckpointError("optimizer state is incomplete or mismatched (every trainable parameter needs "
                              "exp_avg, exp_avg_sq and step of its shape): " + "; ".join(problems[:5]))
    # Remapped state dict in the new optimizer's own id space (our groups follow the saved group order).
    remapped = {"state": {}, "param_groups": []}
    new_id = 0
    for g in groups:
        ids = []
        for pid in g["params"]:
            remapped["state"][new_id] = sd["state"][pid]
            ids.append(new_id)
            new_id += 1
        remapped["param_groups"].append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
    optimizer.load_state_dict(remapped)
    # load_state_dict casts exp_avg/exp_avg_sq to the parameter's dtype/device; `step` stays a CPU float tensor.
    coverage = {"params": len(ordered_ids), "with_state": len(ordered_ids) - len(problems),
                "numel": sum(by_name[n].numel() for n in saved_names)}
    return optimizer, coverage


def optimizer_param_names(optimizer, trainable) -> list[str]:
    name_of = {id(p): n for n, p in trainable}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def save_optimizer(optimizer: torch.optim.Optimizer, trainable, path: Path) -> None:
    torch.save({"optimizer_class": type(optimizer).__name__,
                "param_names": optimizer_param_names(optimizer, trainable),
                "state_dict": optimizer.state_dict()}, str(path))
