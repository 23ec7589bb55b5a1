"""A DeepSpeed ZeRO stage 1/2/3 checkpoint: ``latest`` + ``global_stepN/`` (model states, per-rank optimizer shards).

The shards are merged per parameter by DeepSpeed's own universal-checkpoint converter
(`deepspeed.checkpoint.ds_to_universal`, in-process, into a temporary folder), which gives every trainable
parameter's fp32 master weight, exp_avg, exp_avg_sq and step by its module name, and the optimizer's param groups.
θ is set from the fp32 master weights (`load_weights`), the AdamW state from the merged moments.

DeepSpeed's utilities call torch.load(weights_only=False) on every file. Here each of those calls is made with
weights_only=True and an allow-list of the three DeepSpeed classes a ZeRO checkpoint pickles (LossScaler,
ZeroStageEnum, fragment_address; loaded as plain attribute records, none of their code runs): a file that asks for
anything else is refused before any code in it runs.

Where the model comes from: a Trainer-written checkpoint-N (adapter_config.json or config.json next to
global_stepN/) as `hf_trainer`; otherwise checkpoint.base (and checkpoint.adapter for LoRA). Each rank converts into
its own temporary folder (the converter reads every rank's shard; its time and memory are those of one copy of
the trainable state).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
from pathlib import Path

import torch

from probe_dist.errors import CheckpointError
from probe_dist.state.optimizer import canonical_name
from probe_dist.state.paths import CheckpointPaths
from probe_dist.state.source import (
    CheckpointSource,
    pick_tokenizer,
    read_recipe,
    read_scheduler,
    read_trainer_state,
    scheduler_state,
)

log = logging.getLogger("probe_dist")

INSTALL = ("install DeepSpeed to read it: pip install 'probe-dist[deepspeed]' (CPU-only: DS_BUILD_OPS=0 pip install "
           "deepspeed), or convert it in the training environment with DeepSpeed's zero_to_fp32.py and save the "
           "optimizer state with names")


def _allowed_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Within the block every torch.load is weights_only=True (map_location cpu) with the ZeRO allow-list, whatever
    the caller passes, and a file within the reading bounds (`state.bounds`). Not thread-safe (it replaces
    torch.load for the block)."""
    from probe_dist.state.bounds import check_pickle_record, check_structure

    original = torch.load

    def guarded(*args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.setdefault("map_location", "cpu")
        source = args[0] if args else kwargs.get("f")
        if isinstance(source, str | Path):  # a file: the reading bounds (`state.bounds`) before and after
            check_pickle_record(Path(source), "the DeepSpeed checkpoint file")
        loaded = original(*args, **kwargs)
        if isinstance(source, str | Path):
            check_structure(loaded, source, "the DeepSpeed checkpoint file")
        return loaded

    torch.load = guarded
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            yield
    finally:
        torch.load = original


def tag_folder(root: Path) -> Path:
    """The global_stepN folder: `root` itself, the one `root/latest` names, else the only global_step* in root."""
    if any(root.glob("*_model_states.pt")):
        return root
    latest = root / "latest"
    if latest.is_file():
        from probe_dist.state.bounds import read_bytes

        tag = read_bytes(latest, "DeepSpeed's tag file", "json_mib").decode("utf-8", "replace").strip()
        try:
            found = len(tag) <= 255 and (root / tag).is_dir()
        except (OSError, ValueError):  # a NUL byte, a name the filesystem cannot hold
            found = False
        if found:
            return root / tag
        tag = tag if len(tag) <= 100 else tag[:100] + f"... ({len(tag)} characters)"
        raise CheckpointError(f"{str(latest)!r} names {tag!r}, which is not a folder in {str(root)!r}: copy the whole "
                              "DeepSpeed checkpoint, or point checkpoint.path at its global_stepN folder.")
    tags = sorted(p for p in root.glob("global_step*") if p.is_dir())
    if len(tags) != 1:
        raise CheckpointError(f"{str(root)!r} holds {len(tags)} global_step* folders and no 'latest' file: point "
                              "checkpoint.path at the global_stepN folder to probe.")
    return tags[0]


def read_zero(tag_dir: Path, param_shapes: list[dict]) -> tuple[dict, list[dict]]:
    """({name: {"fp32", "exp_avg", "exp_avg_sq", "step", "group"}}, param groups) of a ZeRO checkpoint's trainable
    parameters, merged by deepspeed.checkpoint.ds_to_universal. param_shapes: the model states' "param_shapes" (one
    {name: shape} per flat group, `read_model_states`). Tensors are float32 in the parameter's shape; each group is
    the saved torch param group without "params", plus "names" in the saved order.
    Raises CheckpointError (deepspeed missing, unreadable or code-bearing files)."""
    try:
        import deepspeed.checkpoint.ds_to_universal as ds_to_universal
    except ImportError:
        raise CheckpointError(f"{str(tag_dir)!r} is a DeepSpeed checkpoint: {INSTALL}.") from None
    from probe_dist.state.checks import is_unsafe_pickle_error, load_error_text, unsafe_pickle_error

    def load(path):
        return torch.load(str(path), map_location="cpu", weights_only=True)

    try:
        with tempfile.TemporaryDirectory(prefix="probe-zero-") as tmp, weights_only_loads():
            out = Path(tmp) / "universal" / "step"  # the converter also writes <parent>/latest_universal
            args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True)  # ZeRO-1/2 files lack universal_checkpoint_info
            with contextlib.redirect_stdout(None):
                ds_to_universal.main(args)
            optimizer_state = load(out / "zero" / "optimizer_state.pt")
            stage = int(optimizer_state["zero_stage"])
            saved_groups = optimizer_state["param_groups"]
            flat_to_group = {fi: gi for gi, g in enumerate(saved_groups) for fi in g["params"]}
            flat_steps = ({fi: s.get("step") for fi, s in optimizer_state["optimizer_state_dict"]["state"].items()}
                          if stage == 3 else {})
            groups = [{**{k: v for k, v in g.items() if k != "params"}, "names": []} for g in saved_groups]
            params = {}
            for fi, shapes in enumerate(param_shapes):
                gi = flat_to_group[fi]
                for name, shape in shapes.items():
                    folder = out / "zero" / name
                    entry = {"group": gi}
                    for key in ("fp32", "exp_avg", "exp_avg_sq"):
                        value = load(folder / f"{key}.pt")
                        value = value["param"] if isinstance(value, dict) else value  # stage 1/2: {param, cat_dim}
                        entry[key] = value.reshape(tuple(shape)).clone()
                    step = load(folder / "step.pt") if stage <= 2 else flat_steps.get(fi)
                    entry["step"] = torch.tensor(float(step))
                    params[name] = entry
                    groups[gi]["names"].append(name)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a shard the converter cannot read is the user's to fix
        if is_unsafe_pickle_error(exc):
            raise unsafe_pickle_error(f"a file of the DeepSpeed checkpoint {str(tag_dir)!r}", exc) from None
        raise CheckpointError(f"could not read the DeepSpeed checkpoint {str(tag_dir)!r} with DeepSpeed's "
                              f"ds_to_universal: {load_error_text(exc)}. Check that every rank's "
                              "zero_pp_rank_*_optim_states.pt file was copied.") from None
    return params, groups


class DeepSpeedSource(CheckpointSource):
    """A DeepSpeed ZeRO stage 1-3 checkpoint (`open_deepspeed`): tag_dir the global_stepN folder,
    param_shapes the model states' {name: shape} per flat group, masters the fp32 master weights (set by
    read_optimizer)."""

    tag_dir: Path
    param_shapes: list[dict]
    masters: dict | None = None

    def read_optimizer(self) -> dict:
        """The merged AdamW state (`read_zero`) as probe_dist's optimizer blob, checked, keeping the fp32
        master weights for `load_weights`. Raises CheckpointError when a group is not AdamW with bias
        correction or a file cannot be read."""
        from probe_dist.state.optimizer import check_optimizer_blob

        params, groups = read_zero(self.tag_dir, self.param_shapes)
        self.masters = {canonical_name(n): e["fp32"] for n, e in params.items()}
        state, out_groups, names, pid = {}, [], [], 0
        for g in groups:
            if g.get("adam_w_mode") is False or g.get("bias_correction") is False:
                raise CheckpointError(f"the DeepSpeed optimizer in {str(self.tag_dir)!r} is not AdamW with bias "
                                      "correction (adam_w_mode/bias_correction false): the probe reproduces only "
                                      "AdamW's step.")
            hyper = {k: v for k, v in g.items() if k not in ("names", "adam_w_mode", "bias_correction")}
            ids = []
            for name in g["names"]:
                e = params[name]
                state[pid] = {"exp_avg": e["exp_avg"], "exp_avg_sq": e["exp_avg_sq"], "step": e["step"]}
                ids.append(pid)
                names.append(name)
                pid += 1
            out_groups.append({**hyper, "params": ids})
        blob = {"optimizer_class": "AdamW", "param_names": names,
                "state_dict": {"state": state, "param_groups": out_groups}, "naming": "DeepSpeed parameter names"}
        return check_optimizer_blob(blob, self.tag_dir)

    def load_weights(self, model: torch.nn.Module) -> int:
        """θ ← the fp32 master weights of every trainable parameter (cast to the model's dtype)."""
        if self.masters is None:
            self.read_optimizer()
        named = {canonical_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(set(named) - set(self.masters))
        extra = sorted(set(self.masters) - set(named))
        if missing or extra:
            raise CheckpointError(
                f"the DeepSpeed checkpoint {str(self.tag_dir)!r} trains other parameters than the loaded model: "
                f"{len(missing)} trainable without a master weight (e.g. {missing[:3]}), {len(extra)} saved for "
                f"unknown parameters (e.g. {extra[:3]}). Check checkpoint.base and checkpoint.adapter.")
        with torch.no_grad():
            for n, p in named.items():
                if tuple(self.masters[n].shape) != tuple(p.shape):
                    raise CheckpointError(f"the DeepSpeed master weight of {n} is {tuple(self.masters[n].shape)}, the "
                                          f"model's {tuple(p.shape)}: checkpoint.base/adapter is not the trained model.")
                p.copy_(self.masters[n].to(device=p.device, dtype=p.dtype))
        return len(named)


def open_deepspeed(ck, root: Path) -> DeepSpeedSource:
    """The DeepSpeedSource of the ZeRO checkpoint at `root` (the folder with `latest`, or global_stepN
    itself); the model from checkpoint.base/.adapter, else the adapter_config.json or config.json next to
    global_stepN (as hf_trainer). Raises CheckpointError when neither gives it, or the tag folder or model
    states are missing or unreadable."""
    from probe_dist.state.hf_trainer import trainer_model_paths

    tag_dir = tag_folder(root)
    model_root = root if tag_dir != root else root.parent
    if ck.base or ck.adapter or (model_root / "adapter_config.json").is_file() or (model_root / "config.json").is_file():
        base, adapter = trainer_model_paths(ck, model_root)
    else:
        raise CheckpointError(f"the DeepSpeed checkpoint {str(root)!r} does not record the model it trains: pass "
                              "checkpoint.base=DIR (the model training started from) and, for LoRA, "
                              "checkpoint.adapter=DIR (where the peft model's save_pretrained wrote "
                              "adapter_config.json; its weights are replaced by the checkpoint's).")
    tokenizer, tokenizer_source = pick_tokenizer(ck, model_root, base)
    recipe, recipe_path, kind, cls = read_recipe(model_root)
    paths = CheckpointPaths(base=base, adapter=adapter, optimizer=tag_dir, tokenizer=tokenizer, training_args=recipe,
                            training_args_path=recipe_path, tokenizer_source=tokenizer_source)
    model_states = read_model_states(tag_dir)
    scheduler = read_scheduler(model_root / "scheduler.pt")
    if scheduler is None and isinstance(model_states.get("lr_scheduler"), dict):  # a DeepSpeed-managed scheduler
        scheduler = scheduler_state(model_states["lr_scheduler"], tag_dir)
    ref = model_root / "ref"  # TRL's KL-reference adapter, as in hf_trainer
    source = DeepSpeedSource("deepspeed", paths, recipe_kind=kind, recipe_class=cls, scheduler=scheduler,
                             trainer_state=read_trainer_state(model_root),
                             ref_adapter=ref if (ref / "adapter_config.json").is_file() else None)
    source.tag_dir, source.param_shapes = tag_dir, model_states["param_shapes"]
    return source


def read_model_states(tag_dir: Path) -> dict:
    """The rank-0 model states of a ZeRO checkpoint (param_shapes, lr_scheduler, ...), read once with the guarded
    weights_only loads. Raises CheckpointError when missing, unreadable or code-bearing."""
    from probe_dist.state.checks import is_unsafe_pickle_error, load_error_text, unsafe_pickle_error

    files = sorted(tag_dir.glob("*_model_states.pt"))
    if not files:
        raise CheckpointError(f"no *_model_states.pt in the DeepSpeed checkpoint folder {str(tag_dir)!r}: copy the "
                              "whole global_stepN folder.")
    try:
        with weights_only_loads():
            states = torch.load(str(files[0]), map_location="cpu", weights_only=True)
    except ImportError:
        raise CheckpointError(f"{str(tag_dir)!r} is a DeepSpeed checkpoint: {INSTALL}.") from None
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unreadable file is the user's to fix
        if is_unsafe_pickle_error(exc):
            raise unsafe_pickle_error(f"the DeepSpeed model states {str(files[0])!r}", exc) from None
        raise CheckpointError(f"could not read the DeepSpeed model states {str(files[0])!r}: {load_error_text(exc)}. "
                              "Copy the whole global_stepN folder again.") from None
    if not isinstance(states, dict) or not isinstance(states.get("param_shapes"), list):
        raise CheckpointError(f"{str(files[0])!r} is not a ZeRO checkpoint's model states (no param_shapes): probe a "
                              "checkpoint written by DeepSpeed's engine.save_checkpoint with ZeRO stage 1-3.")
    return states
