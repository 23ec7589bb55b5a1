"""An HF Trainer / TRL ``checkpoint-N/`` folder, as `Trainer._save_checkpoint` writes it.

    checkpoint-N/  adapter_config.json  adapter_model.safetensors     (LoRA; or config.json + model.safetensors)
                   optimizer.pt     a bare optimizer.state_dict() — parameter names rebuilt from the model
                   scheduler.pt     the lr scheduler's state_dict (base_lrs, _last_lr)
                   trainer_state.json  training_args.bin (a pickled TrainingArguments / GRPOConfig)
                   tokenizer files, rng_state.pth (never read)

The base is checkpoint.base, else adapter_config.json's base_model_name_or_path (a local folder, or a hub id already
in the local cache); a full fine-tune's model is the folder itself.
"""

from __future__ import annotations

from pathlib import Path

from probe_dist.errors import CheckpointError
from probe_dist.state.paths import CheckpointPaths
from probe_dist.state.source import (
    CheckpointSource,
    local_base,
    pick_tokenizer,
    read_json_object,
    read_recipe,
    read_scheduler,
    read_trainer_state,
)


def trainer_model_paths(ck, root: Path) -> tuple[Path, Path | None]:
    """(base folder, adapter folder or None) of a Trainer-saved model at `root` (explicit pieces win)."""
    adapter = Path(ck.adapter) if ck.adapter else (root if (root / "adapter_config.json").is_file() else None)
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(f"checkpoint.adapter {str(adapter)!r} has no adapter_config.json. Point it at the folder "
                              "a peft model was saved to (adapter_config.json + adapter_model.safetensors).")
    if ck.base:
        base = Path(ck.base)
    elif adapter is not None:
        config_path = adapter / "adapter_config.json"
        config = read_json_object(config_path, "adapter config", "Re-save the adapter with peft's save_pretrained.")
        name = config.get("base_model_name_or_path")
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"adapter config {str(config_path)!r} does not name its base model "
                                  "(base_model_name_or_path): pass checkpoint.base=/path/to/the/base/model.")
        base = local_base(name, f"adapter config {str(config_path)!r}")
    elif (root / "config.json").is_file():
        base = root  # full fine-tuning: the checkpoint holds the whole model
    else:
        raise CheckpointError(f"checkpoint {str(root)!r} holds neither an adapter (adapter_config.json) nor a model "
                              "(config.json + weights). Point checkpoint.path at the checkpoint-N folder the trainer "
                              "wrote, or give checkpoint.base and checkpoint.adapter.")
    if not base.is_dir():
        raise CheckpointError(f"checkpoint base {str(base)!r} does not exist. Set checkpoint.base=PATH to the base "
                              "model's folder.")
    return base, adapter


def open_hf_trainer(ck, root: Path) -> CheckpointSource:
    """The CheckpointSource of an HF Trainer / TRL checkpoint-N folder `root`: the model
    (`trainer_model_paths`), optimizer.pt (or checkpoint.optimizer), scheduler.pt, trainer_state.json, the
    recipe and TRL's ref/ adapter. Raises CheckpointError when the optimizer state or the model is missing."""
    base, adapter = trainer_model_paths(ck, root)
    optimizer = Path(ck.optimizer) if ck.optimizer else root / "optimizer.pt"
    if not optimizer.is_file():
        runs = sorted(p.name for p in root.glob("checkpoint-*") if p.is_dir())
        hint = (f" This folder holds {', '.join(runs[-3:])}: point checkpoint.path at one of them (the final "
                "save_model writes no optimizer state)." if runs else "")
        raise CheckpointError(f"no optimizer state in {str(root)!r} (optimizer.pt). HF Trainer writes it unless "
                              "save_only_model=True: probe a checkpoint saved with the optimizer, or set "
                              f"checkpoint.optimizer=PATH.{hint}")
    tokenizer, tokenizer_source = pick_tokenizer(ck, root, base)
    recipe, recipe_path, kind, cls = read_recipe(root)
    paths = CheckpointPaths(base=base, adapter=adapter, optimizer=optimizer, tokenizer=tokenizer, training_args=recipe,
                            training_args_path=recipe_path, tokenizer_source=tokenizer_source)
    return CheckpointSource("hf_trainer", paths, recipe_kind=kind, recipe_class=cls,
                            scheduler=read_scheduler(root / "scheduler.pt"), trainer_state=read_trainer_state(root),
                            ref_adapter=root / "ref" if (root / "ref" / "adapter_config.json").is_file() else None)
