"""A training state from files: open a checkpoint of any supported trainer, then load it into a `TrainingState`.

    source = open_checkpoint(cfg.checkpoint)     # cheap: format, paths, JSON files, recipe, scheduler (all checked)
    state = load_training_state(source, tokenizer, dtype=..., device=...)   # optimizer file, weights, AdamW

Opening reads only small files, so the config can be resolved against the recorded recipe (`probe_dist.resolve`)
and the prompts checked against the tokenizer before any weight is read. Every refusal is a `CheckpointError` (a
`UserInputError`: exit 2) naming the file and the fix.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from probe_dist.errors import CheckpointError
from probe_dist.state.model import (
    check_adapter_complete,
    check_trainable_count,
    load_model,
    model_max_positions,
    trainable_parameters,
)
from probe_dist.state.optimizer import load_optimizer, name_optimizer_blob, set_lr_ratios
from probe_dist.state.paths import resolve_paths
from probe_dist.state.source import CheckpointSource, detect_format, read_scheduler, read_trainer_state
from probe_dist.state.training import TrainingState

log = logging.getLogger("probe_dist")


def open_checkpoint(ck) -> CheckpointSource:
    """The checkpoint `ck` (a CheckpointConfig) names, opened by its format. Raises CheckpointError (a user-input
    error) when the folder or a piece is missing or unreadable."""
    root = Path(ck.path) if ck.path else None
    if root is not None and not root.is_dir():
        raise CheckpointError(f"checkpoint.path {str(root)!r} is not a directory. Point it at a checkpoint directory "
                              "(probe_dist's layout, an HF Trainer/TRL checkpoint-N, an accelerate save_state folder "
                              "or a DeepSpeed checkpoint), or give checkpoint.base/adapter/optimizer.")
    if root is not None and ck.format == "auto" and not any(root.glob("*optimizer*")) and not any(
            (root / f).exists() for f in ("latest", "base", "adapter_config.json", "training_args.json")):
        runs = sorted((p for p in root.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
                      key=lambda p: int(p.name[11:]))
        if runs:
            raise CheckpointError(f"checkpoint.path {str(root)!r} is a training output folder holding "
                                  f"{len(runs)} checkpoints ({', '.join(p.name for p in runs[-3:])}): point "
                                  f"checkpoint.path at one of them, e.g. checkpoint.path={runs[-1]}")
    fmt = ck.format
    if fmt == "auto":
        fmt = detect_format(root) if root is not None else "probe_dist"
    if fmt != "probe_dist" and root is None:
        raise CheckpointError(f"checkpoint.format={fmt} needs checkpoint.path (the folder the trainer saved).")
    if fmt == "hf_trainer":
        from probe_dist.state.hf_trainer import open_hf_trainer

        source = open_hf_trainer(ck, root)
    elif fmt == "accelerate":
        from probe_dist.state.accelerate import open_accelerate

        source = open_accelerate(ck, root)
    elif fmt == "deepspeed":
        from probe_dist.state.deepspeed import open_deepspeed

        source = open_deepspeed(ck, root)
    else:
        paths = resolve_paths(ck)
        source = CheckpointSource("probe_dist", paths, recipe_kind="probe_dist" if paths.training_args_path else "none",
                                  scheduler=read_scheduler(root / "scheduler.pt") if root else None,
                                  trainer_state=read_trainer_state(root) if root else {})
    log.info("checkpoint format %r%s: base %s, adapter %s, optimizer %s, recipe %s", source.format,
             " (detected)" if ck.format == "auto" and root is not None else "", source.paths.base,
             source.paths.adapter or "none (full model)", source.paths.optimizer,
             source.paths.training_args_path or "none")
    return source


def load_training_state(source: CheckpointSource, tokenizer, *, dtype: torch.dtype, device: torch.device,
                        max_trainable_params: int, allow_full_finetune: bool, is_main: bool = True) -> TrainingState:
    """Load what `source` names: the optimizer file (weights_only, finite state) before the model, then base +
    adapter (complete files, finite weights) and the trainable weights the format keeps elsewhere, then the probe's
    AdamW over the trainable parameters with the saved state remapped by name and each group's lr ratio.

    tokenizer: the checkpoint's tokenizer (`state.model.load_tokenizer`, loaded first for the prompt checks);
    dtype/device: of the probe's forwards. Raises CheckpointError for any file or value the probe cannot use, and
    when the trainable parameters exceed max_trainable_params (unless allow_full_finetune)."""
    paths = source.paths
    optimizer_blob = source.read_optimizer()  # weights_only; finite state, before the model loads
    notes: list[str] = []  # loaded, but looks edited: the summary's warnings carry them
    model = load_model(paths, dtype, device, notes)  # complete weight files, finite weights
    if not source.load_weights(model) and paths.adapter is not None:  # θ is the adapter file's: all of it there
        check_adapter_complete(model, paths.adapter)
    trainable = trainable_parameters(model)
    n_trainable = check_trainable_count(trainable, max_trainable_params, allow_full_finetune)
    optimizer_blob = name_optimizer_blob(optimizer_blob, model, paths.optimizer)
    optimizer, coverage = load_optimizer(paths.optimizer, trainable, blob=optimizer_blob)
    lr_ratios = set_lr_ratios(optimizer, source.scheduler.base_lrs if source.scheduler else None)
    inconsistent = source.consistency_warnings(optimizer, coverage["naming"])
    for note in notes if is_main else ():
        log.warning("%s", note)
    if inconsistent and is_main:
        log.warning("the checkpoint's pieces may come from different saves: %s. Check that optimizer, scheduler and "
                    "trainer state are from the same checkpoint.", "; ".join(inconsistent))
    by_id = {id(p): (n, p) for n, p in trainable}
    ordered = [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]
    log.info("loaded %s: %d trainable tensors (%s parameters), optimizer state coverage %d/%d, lr ratios %s",
             paths.base, len(ordered), f"{n_trainable:,}", coverage["with_state"], coverage["params"],
             [round(r, 6) for r in lr_ratios])
    return TrainingState(model=model, trainable=ordered, optimizer=optimizer, tokenizer=tokenizer,
                         recipe=source.recipe, scheduler=source.scheduler, ref_adapter=source.ref_adapter,
                         max_positions=model_max_positions(paths.base), config_file=Path(paths.base) / "config.json",
                         provenance={"provenance/optimizer_coverage": coverage,
                                     "provenance/trainable_params": n_trainable,
                                     "provenance/checkpoint_source": source.provenance(),
                                     "provenance/lr_ratios": lr_ratios,
                                     "provenance/checkpoint_inconsistencies": inconsistent,
                                     "provenance/load_warnings": notes})
