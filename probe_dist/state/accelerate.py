"""An `accelerate.Accelerator.save_state` folder.

    state/  model.safetensors (or pytorch_model.bin)   the prepared model's state_dict (peft names for LoRA)
            optimizer.bin      a bare optimizer.state_dict() — parameter names rebuilt from the model
            scheduler.bin      the lr scheduler's state_dict, if one was prepared
            random_states_0.pkl (never read)

save_state records neither the base model nor the adapter's structure, so they come from the config:
checkpoint.base (the model training started from) and, for LoRA, checkpoint.adapter (the folder `save_pretrained`
wrote adapter_config.json to; its weights are replaced by the state's). Every trainable weight is then taken from
the state's model file, and every frozen weight in it must equal the loaded base's (else the base is not the one
trained). A training recipe (training_args.json or .bin) is read when the folder holds one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from probe_dist.errors import CheckpointError
from probe_dist.state.optimizer import canonical_name
from probe_dist.state.paths import CheckpointPaths
from probe_dist.state.source import (
    CheckpointSource,
    local_base,
    pick_tokenizer,
    read_json_object,
    read_recipe,
    read_scheduler,
    safe_torch_load,
)

MODEL_FILES = ("model.safetensors", "pytorch_model.bin")


class AccelerateSource(CheckpointSource):
    """An accelerate save_state folder (`open_accelerate`): the trainable weights come from `weights_file`
    (model.safetensors or pytorch_model.bin), checked against the base built from checkpoint.base/.adapter."""

    weights_file: Path

    def load_weights(self, model: torch.nn.Module) -> int:
        """Trainable weights from the state's model file; frozen ones checked equal to the loaded base. Returns the
        number of tensors set. Raises CheckpointError naming the parameter."""
        saved = _read_model_file(self.weights_file)
        saved = {canonical_name(k): v for k, v in saved.items()}
        named = {canonical_name(n): p for n, p in model.named_parameters()}
        missing = [n for n, p in named.items() if p.requires_grad and n not in saved]
        if missing:
            raise CheckpointError(
                f"the accelerate state's model file {str(self.weights_file)!r} has no weights for {len(missing)} "
                f"trainable parameters (e.g. {missing[:3]}): the model built from checkpoint.base and "
                "checkpoint.adapter is not the one that was trained. Check both paths.")
        changed = [n for n, p in named.items() if not p.requires_grad and n in saved
                   and not torch.equal(saved[n].to(p.dtype), p.detach().cpu())]
        if changed:
            raise CheckpointError(
                f"checkpoint.base {str(self.paths.base)!r} is not the model this accelerate state was trained from: "
                f"{len(changed)} frozen weights differ from the state's (e.g. {changed[:2]}). Point checkpoint.base "
                "at the model training started from.")
        count = 0
        with torch.no_grad():
            for n, p in named.items():
                if p.requires_grad:
                    value = saved[n]
                    if tuple(value.shape) != tuple(p.shape):
                        raise CheckpointError(f"the accelerate state's {n} is {tuple(value.shape)}, the model's "
                                              f"{tuple(p.shape)}: checkpoint.base/adapter is not the trained model.")
                    p.copy_(value.to(device=p.device, dtype=p.dtype))
                    count += 1
        from probe_dist.state.checks import check_finite_parameters

        check_finite_parameters([(n, p) for n, p in model.named_parameters() if p.requires_grad], adapter=True,
                                source=self.weights_file)
        return count


def _read_model_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from probe_dist.state.checks import check_safetensors

        check_safetensors(path, "accelerate model state")
        return load_file(str(path))
    state = safe_torch_load(path, "accelerate model state")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"the accelerate model state {str(path)!r} is not a state_dict of tensors. Copy it "
                              "again from the training run.")
    return state


def open_accelerate(ck, root: Path) -> AccelerateSource:
    """The AccelerateSource of the save_state folder `root` (`ck`: the checkpoint config section): its model
    state, optimizer.bin (or checkpoint.optimizer), scheduler.bin and recipe, with the base from
    checkpoint.base or the adapter config. Raises CheckpointError when the model state or optimizer state is
    missing, a LoRA state has no checkpoint.adapter (or one without adapter_config.json), or no base."""
    weights = next((root / f for f in MODEL_FILES if (root / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"no model state in the accelerate folder {str(root)!r} (expected "
                              f"{' or '.join(MODEL_FILES)}, as Accelerator.save_state writes). With several prepared "
                              "models the probe reads the first (model.safetensors).")
    optimizer = Path(ck.optimizer) if ck.optimizer else root / "optimizer.bin"
    adapter = Path(ck.adapter) if ck.adapter else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(f"checkpoint.adapter {str(adapter)!r} has no adapter_config.json. Point it at the folder "
                              "model.save_pretrained wrote for the peft model (its weights are replaced by the "
                              "state's).")
    if adapter is None and _has_lora_weights(weights):
        raise CheckpointError(
            f"the accelerate state {str(root)!r} is of a LoRA model, and save_state does not record the adapter's "
            "structure: pass checkpoint.adapter=DIR, the folder where the peft model's save_pretrained wrote "
            "adapter_config.json (the probe replaces its weights with the state's), and checkpoint.base=DIR.")
    if ck.base:
        base = Path(ck.base)
    elif adapter is not None:
        config = read_json_object(adapter / "adapter_config.json", "adapter config", "Re-save the adapter.")
        base = local_base(str(config.get("base_model_name_or_path") or ""), f"adapter config in {str(adapter)!r}")
    else:
        raise CheckpointError(f"the accelerate state {str(root)!r} does not record the model it was trained from: "
                              "pass checkpoint.base=DIR (the model's folder, config.json + weights).")
    if not base.is_dir():
        raise CheckpointError(f"checkpoint base {str(base)!r} does not exist. Set checkpoint.base=PATH.")
    tokenizer, tokenizer_source = pick_tokenizer(ck, None, base)
    recipe, recipe_path, kind, cls = read_recipe(root)
    paths = CheckpointPaths(base=base, adapter=adapter, optimizer=optimizer, tokenizer=tokenizer, training_args=recipe,
                            training_args_path=recipe_path, tokenizer_source=tokenizer_source)
    source = AccelerateSource("accelerate", paths, recipe_kind=kind, recipe_class=cls,
                              scheduler=read_scheduler(root / "scheduler.bin"))
    source.weights_file = weights
    if not optimizer.is_file():
        raise CheckpointError(f"no optimizer state in the accelerate folder {str(root)!r} (optimizer.bin): prepare "
                              "the optimizer with the accelerator before save_state, or set checkpoint.optimizer=PATH.")
    return source


def _has_lora_weights(path: Path) -> bool:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        from probe_dist.state.bounds import check_safetensors_header

        check_safetensors_header(path, "accelerate model state")
        with safe_open(str(path), "pt") as f:
            return any("lora_" in k for k in f.keys())
    return False
