"""probe_dist's own checkpoint layout (what `python -m probe_dist.toy build` writes):

    base/  tokenizer/  adapter_config.json  adapter_model.safetensors  optimizer.pt  training_args.json

`resolve_paths` finds the pieces (explicit checkpoint.base/adapter/optimizer/tokenizer win) and reads the recorded
recipe; the other formats (`state.hf_trainer`, `state.accelerate`, `state.deepspeed`) end in the same
`CheckpointPaths`. Every refusal is a `CheckpointError` naming the file and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from probe_dist.errors import CheckpointError
from probe_dist.state.checks import read_json


@dataclass
class CheckpointPaths:
    """Where a checkpoint's pieces are, whatever its format: base model folder, adapter folder (None: full
    fine-tune), optimizer state (a file; deepspeed: the global_stepN folder), tokenizer folder, and the
    recorded training settings (plain data) with the file they came from."""

    base: Path
    adapter: Path | None
    optimizer: Path
    tokenizer: Path
    training_args: dict = field(default_factory=dict)
    training_args_path: Path | None = None  # the training_args.json read (None: none found)
    tokenizer_source: str = ""  # how the tokenizer folder was chosen, for messages


def resolve_paths(checkpoint_cfg) -> CheckpointPaths:
    """The CheckpointPaths of probe_dist's own layout at checkpoint.path (explicit checkpoint.base/adapter/
    optimizer/tokenizer win), with training_args.json from the root or next to the optimizer file. Raises
    CheckpointError when a piece is missing or not given, or an adapter config is not a peft config."""
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
            raise CheckpointError(f"checkpoint.adapter {str(adapter)!r} has no adapter_config.json. Point it at the "
                                  "folder a peft model was saved to (adapter_config.json + adapter_model.safetensors).")
        adapter = None  # full fine-tuning checkpoint: the base itself is trainable (guarded below)
    if checkpoint_cfg.tokenizer:
        tokenizer, tokenizer_source = Path(checkpoint_cfg.tokenizer), "checkpoint.tokenizer"
    elif root is not None and (root / "tokenizer").is_dir():
        tokenizer, tokenizer_source = root / "tokenizer", "the checkpoint's tokenizer/ folder"
    else:
        missing = f"{str(root / 'tokenizer')!r} does not exist, so " if root is not None else ""
        tokenizer, tokenizer_source = base, f"{missing}the base model folder"
    for path, what in ((base, "base"), (optimizer, "optimizer")):
        if not path.exists():
            raise CheckpointError(f"checkpoint {what} {str(path)!r} does not exist. Check checkpoint.path (or "
                                  f"set checkpoint.{what}=PATH explicitly).")

    if adapter is not None:
        adapter_config = adapter / "adapter_config.json"
        fix = "Re-save the adapter with peft's save_pretrained (or restore the file from the training run)."
        parsed = read_json(adapter_config, "adapter config", fix, finite=True)
        if not isinstance(parsed, dict) or not isinstance(parsed.get("peft_type"), str):
            raise CheckpointError(f"adapter config {str(adapter_config)!r} is not a peft adapter config (a JSON "
                                  f"object with a 'peft_type' such as \"LORA\"). {fix}")
    args, args_path = {}, None
    for cand in ([root / "training_args.json"] if root else []) + [optimizer.parent / "training_args.json"]:
        if cand.is_file():
            args, args_path = read_training_args_json(cand), cand
            break
    return CheckpointPaths(base=base, adapter=adapter, optimizer=optimizer, tokenizer=tokenizer, training_args=args,
                           training_args_path=args_path, tokenizer_source=tokenizer_source)


def read_training_args_json(path: Path) -> dict:
    """probe_dist's recorded training recipe (training_args.json) as a dict. Raises CheckpointError when the file is
    not valid UTF-8 JSON or not an object."""

    fix = ("Fix the file (one JSON object: loss, temperature, max_new_tokens, grad_clip, ...), or remove it and set "
           "sampling.temperature, sampling.max_new_tokens, update.loss and update.grad_clip explicitly.")
    args = read_json(path, "training settings file", fix)
    if not isinstance(args, dict):
        kind = {list: "a list", str: "a string", type(None): "null"}.get(type(args), type(args).__name__)
        raise CheckpointError(f"training settings file {str(path)!r} holds {kind}, not a JSON object. {fix}")
    return args
