"""Checkpoint sources: where the model, tokenizer, AdamW state, learning-rate schedule and training recipe come from.

    source = open_checkpoint(cfg.checkpoint)        # state.files: detects the format or uses the named one
    source.paths                                    # base, adapter, tokenizer, optimizer file, recorded recipe
    blob = source.read_optimizer()                  # AdamW state (weights_only), names None when the file has none
    source.load_weights(model)                      # trainable weights saved outside the adapter (accelerate, ZeRO)

Formats (each a module of `probe_dist.state`, behind this one interface):
- ``probe_dist``  — the probe's own layout (base/, tokenizer/, adapter files, optimizer.pt with names,
  training_args.json), what `python -m probe_dist.toy build` writes;
- ``hf_trainer``  — an HF Trainer / TRL ``checkpoint-N/`` (adapter or full model at the root, optimizer.pt as a bare
  state dict, scheduler.pt, trainer_state.json, training_args.bin read without running code);
- ``accelerate``  — an ``Accelerator.save_state`` folder (optimizer.bin, model.safetensors, scheduler.bin);
- ``deepspeed``   — a DeepSpeed ZeRO stage 1/2/3 checkpoint (``latest``, ``global_stepN/``), read with DeepSpeed's
  own universal-checkpoint conversion (fp32 master weights and moments per parameter).

Explicit pieces (checkpoint.base, .adapter, .tokenizer, .optimizer) override what a format finds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from probe_dist.errors import CheckpointError
from probe_dist.state.paths import CheckpointPaths
from probe_dist.state.recipe import Recipe

log = logging.getLogger("probe_dist")

FORMATS = ("probe_dist", "hf_trainer", "accelerate", "deepspeed")


@dataclass
class SchedulerState:
    """What the saved lr scheduler says: the groups' base lrs and the lrs the next optimizer step would use."""

    path: Path | str  # the file it was read from, or a description ("in memory: LambdaLR")
    base_lrs: list[float] | None = None
    next_lrs: list[float] | None = None


@dataclass
class CheckpointSource:
    """One checkpoint, whatever its format. `paths.training_args` is the recorded recipe (plain data) and
    `recipe_kind` says whose keys it uses ("probe_dist", "trl", "hf_trainer", or "none")."""

    format: str
    paths: CheckpointPaths
    recipe_kind: str = "none"
    recipe_class: str | None = None  # e.g. trl.trainer.grpo_config.GRPOConfig
    scheduler: SchedulerState | None = None
    trainer_state: dict = field(default_factory=dict)
    ref_adapter: Path | None = None  # TRL's KL-reference adapter (ref/), saved when it was given a peft model

    def read_optimizer(self) -> dict:
        """The AdamW state as probe_dist's optimizer blob ({"optimizer_class", "param_names" or None,
        "state_dict"}), checked, before the model loads. Raises CheckpointError."""
        from probe_dist.state.optimizer import read_optimizer_file

        return read_optimizer_file(self.paths.optimizer)

    @property
    def recipe(self) -> Recipe:
        """The recorded training settings (plain data), whose keys, and the file."""
        return Recipe(fields=self.paths.training_args, kind=self.recipe_kind, path=self.paths.training_args_path,
                      class_name=self.recipe_class)

    @property
    def has_adapter(self) -> bool:
        """Whether the checkpoint holds an adapter (else a full fine-tune: no reference policy)."""
        return self.paths.adapter is not None

    def load_weights(self, model: torch.nn.Module) -> int:
        """Copy trainable weights the format keeps outside the base/adapter folders into `model`; returns how many
        tensors were set (0: none to set)."""
        return 0

    def consistency_warnings(self, optimizer: torch.optim.Optimizer, naming: str) -> list[str]:
        """Cheap cross-checks of the optimizer state against the rest of the checkpoint (pieces from different
        saves): AdamW's step vs trainer_state's global step, the groups' lrs vs the scheduler's, the decay group's
        weight decay vs the recorded one. Each mismatch is one sentence."""
        out = []
        steps = {float(st["step"]) for st in optimizer.state.values() if "step" in st}
        global_step = self.trainer_state.get("global_step")
        if isinstance(global_step, int) and steps and max(steps) != global_step:
            out.append(f"the optimizer state has taken {max(steps):g} steps but trainer_state.json records global "
                       f"step {global_step}")
        lrs = [float(g["lr"]) for g in optimizer.param_groups]
        nxt = self.scheduler.next_lrs if self.scheduler else None
        if nxt and len(nxt) == len(lrs) and any(abs(a - b) > 1e-9 * max(abs(a), abs(b), 1e-30)
                                                for a, b in zip(lrs, nxt)):
            out.append(f"the optimizer's group lrs {lrs} differ from the saved scheduler's next lrs {nxt}")
        decay = self.paths.training_args.get("weight_decay")
        if naming.startswith("HF Trainer") and isinstance(decay, int | float) and optimizer.param_groups and (
                optimizer.param_groups[0]["params"]) and float(optimizer.param_groups[0]["weight_decay"]) != decay:
            out.append(f"the optimizer's decay group has weight_decay {optimizer.param_groups[0]['weight_decay']} "
                       f"but the recorded training used {decay}")
        return out

    def provenance(self) -> dict:
        """What summary.json records of the checkpoint (provenance/checkpoint_source): format, the pieces'
        paths, the recipe file and class, trainer_state's global step and last logged lr, and the scheduler
        file."""
        info = {"format": self.format, "base": str(self.paths.base), "optimizer": str(self.paths.optimizer),
                "adapter": str(self.paths.adapter) if self.paths.adapter else None,
                "tokenizer": str(self.paths.tokenizer),
                "recipe": str(self.paths.training_args_path) if self.paths.training_args_path else None,
                "recipe_class": self.recipe_class}
        if self.trainer_state:
            info["global_step"] = self.trainer_state.get("global_step")
            history = self.trainer_state.get("log_history")
            logged = [e for e in (history if isinstance(history, list) else []) if isinstance(e, dict)
                      and "learning_rate" in e]
            info["last_logged_lr"] = logged[-1]["learning_rate"] if logged else None  # the lr of the last step taken
        if self.scheduler is not None:
            info["scheduler"] = str(self.scheduler.path)
        return info


def detect_format(root: Path) -> str:
    """The format of the checkpoint folder `root` by the files each writer leaves (see the module docstring)."""
    if ((root / "latest").is_file() or any(p.is_dir() for p in root.glob("global_step*"))
            or any(root.glob("*_model_states.pt"))):
        return "deepspeed"
    if (root / "optimizer.bin").is_file():
        return "accelerate"
    if (root / "training_args.bin").is_file() or ((root / "trainer_state.json").is_file()
                                                   and not (root / "training_args.json").is_file()):
        return "hf_trainer"
    return "probe_dist"


# ------------------------------------------------------------------------------------------------ shared readers


def read_scheduler(path: Path) -> SchedulerState | None:
    """A torch lr scheduler's state_dict file (scheduler.pt / scheduler.bin), read with weights_only=True; None when
    absent. Raises CheckpointError when present but unreadable or code-bearing."""
    if not path.is_file():
        return None
    state = safe_torch_load(path, "lr scheduler state")
    if not isinstance(state, dict):
        raise CheckpointError(f"lr scheduler state {str(path)!r} is not a scheduler state_dict (a dict). Remove it or "
                              "copy it again from the training run.")

    return scheduler_state(state, path)


def scheduler_state(state: dict, path: Path) -> SchedulerState | None:
    """base_lrs and _last_lr of a torch scheduler's state_dict; None (with a warning) when it holds neither.
    Raises CheckpointError when an lr is not a finite number >= 0."""
    import math

    lists = {}
    for key in ("base_lrs", "_last_lr"):
        v = state.get(key)
        if v is None:
            continue
        ok = isinstance(v, list | tuple) and all(isinstance(x, int | float) and not isinstance(x, bool)
                                                 and math.isfinite(x) and x >= 0 for x in v)
        if not ok:
            raise CheckpointError(f"lr scheduler state {str(path)!r}: {key}={v!r} is not a list of finite learning "
                                  "rates >= 0. Copy the file again from the training run, or remove it (then no "
                                  "eta_train, and the group lr ratios come from the optimizer's own lrs).")
        lists[key] = [float(x) for x in v]
    if not lists:
        log.warning("%s holds no base_lrs or _last_lr: not a torch lr scheduler's state_dict; ignored (no eta_train)",
                    path)
        return None
    return SchedulerState(path=path, base_lrs=lists.get("base_lrs"), next_lrs=lists.get("_last_lr"))


def read_trainer_state(root: Path) -> dict:
    """trainer_state.json (global step, log history) as a dict; {} when absent. Raises CheckpointError when it is
    not a JSON object."""
    from probe_dist.state.checks import read_json

    path = root / "trainer_state.json"
    if not path.is_file():
        return {}
    state = read_json(path, "trainer state", "Copy trainer_state.json again from the training run, or remove it.",
                      limit="trainer_state_mib")
    if not isinstance(state, dict):
        raise CheckpointError(f"trainer state {str(path)!r} is not a JSON object. Copy it again from the training "
                              "run, or remove it.")
    return state


def safe_torch_load(path: Path, what: str):
    """torch.load(weights_only=True) of `path` within the reading bounds (`bounded_torch_load`); a pickle that would
    run code is refused (UnsafeCheckpointError), any other failure is a CheckpointError naming the file."""
    from probe_dist.state.checks import bounded_torch_load, load_error_text

    return bounded_torch_load(path, f"the {what}", lambda exc: CheckpointError(
        f"could not read the {what} {str(path)!r}: {load_error_text(exc)}. Copy it again from the training run."))


def read_json_object(path: Path, what: str, fix: str) -> dict:
    """The JSON object in `path` (a model or adapter config: NaN and Infinity refused). Raises CheckpointError
    naming `what` and `fix` when the file cannot be read, is not valid UTF-8 JSON, or holds anything but an
    object; ReadLimitError past the reading bounds (`state.bounds`)."""
    from probe_dist.state.checks import read_json

    parsed = read_json(path, what, fix, finite=True)
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{what} {str(path)!r} is not a JSON object. {fix}")
    return parsed


def local_base(name: str, where: str) -> Path:
    """The local folder of the base model an adapter names (adapter_config.json's base_model_name_or_path): the
    path itself, or a Hugging Face hub id already in the local cache (nothing is downloaded). Raises
    CheckpointError telling the user to pass checkpoint.base otherwise."""
    if not name:  # Path("") is the working directory: never take it for a model folder
        raise CheckpointError(f"{where} does not name its base model (base_model_name_or_path): pass "
                              "checkpoint.base=/path/to/the/base/model.")
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            return path
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte: not a local folder
        pass
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(name, local_files_only=True))
        if (cached / "config.json").is_file():
            return cached
    except Exception:  # noqa: BLE001 - not a hub id, or not cached: the message below says what to do
        pass
    raise CheckpointError(
        f"{where} names the base model {name!r}, which is neither a local folder nor in the local Hugging Face "
        "cache, and the probe downloads nothing. Pass checkpoint.base=/path/to/the/base/model (the folder with "
        "config.json and the weights, e.g. from `huggingface-cli download` on a machine with network access).")


def pick_tokenizer(ck, root: Path | None, base: Path) -> tuple[Path, str]:
    """(tokenizer folder, how it was chosen): checkpoint.tokenizer, the checkpoint root when it holds tokenizer
    files (HF Trainer saves them there), root/tokenizer, else the base model's folder."""
    from probe_dist.state.checks import TOKENIZER_FILES

    if ck.tokenizer:
        return Path(ck.tokenizer), "checkpoint.tokenizer"
    if root is not None and any((root / f).is_file() for f in TOKENIZER_FILES):
        return root, "the tokenizer files in the checkpoint folder"
    if root is not None and (root / "tokenizer").is_dir():
        return root / "tokenizer", "the checkpoint's tokenizer/ folder"
    return base, "the base model folder"


def read_recipe(root: Path, explicit_optimizer: str | None = None) -> tuple[dict, Path | None, str, str | None]:
    """The recorded training recipe in `root`: (fields as plain data, file, kind, class name). training_args.bin (HF
    Trainer / TRL; read without running code, `restricted_pickle`) first, then probe_dist's training_args.json."""
    from probe_dist.state.restricted_pickle import UnreadableTrainingArgs, read_training_args_bin

    binary = root / "training_args.bin"
    if binary.is_file():
        try:
            cls, fields = read_training_args_bin(binary)
        except UnreadableTrainingArgs as exc:
            raise CheckpointError(f"cannot read the training settings {str(binary)!r}: {exc}. Copy it again from the "
                                  "training run, or remove it and set the recipe explicitly (sampling.temperature, "
                                  "sampling.max_new_tokens, update.loss, update.grad_clip, ...).") from None
        kind = "trl" if cls.startswith("trl.") else "hf_trainer"
        return fields, binary, kind, cls
    text = root / "training_args.json"
    if text.is_file():
        from probe_dist.state.paths import read_training_args_json

        return read_training_args_json(text), text, "probe_dist", None
    return {}, None, "none", None


__all__ = ["CheckpointSource", "FORMATS", "SchedulerState", "detect_format", "read_scheduler", "read_trainer_state",
           "safe_torch_load"]
