"""Load base + LoRA adapter + AdamW state, remapped by parameter name, with guards that fail early and clearly.

probe_dist's own checkpoint layout (what `python -m probe_dist.toy build` writes; `resolve_paths`):
    base/  tokenizer/  adapter_config.json  adapter_model.safetensors  optimizer.pt  training_args.json
optimizer.pt holds {"optimizer_class": "AdamW", "param_names": [...], "state_dict": optimizer.state_dict()}, or a
bare state_dict whose names `name_optimizer_blob` rebuilds. The other formats (HF Trainer / TRL, accelerate,
DeepSpeed) are opened by `probe_dist.model.sources` and end in the same functions here.

No code runs from a checkpoint: optimizer.pt and any pickle weight file (*.bin) are read with
torch.load(weights_only=True), and a file that would need arbitrary code is refused (`model.checks.UnsafeCheckpointError`);
remote code (config auto_map) is never trusted. Every refusal is a `CheckpointError` (a `UserInputError`: exit 2)
naming the file or tensor and the fix; the value checks themselves live in `probe_dist/validate.py`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from probe_dist.errors import UserInputError

log = logging.getLogger("probe_dist")

ADAMW_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")
_NAME_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


class CheckpointError(UserInputError, RuntimeError):
    """A checkpoint that the probe refuses, with what is wrong and how to fix it."""


@dataclass
class CheckpointPaths:
    base: Path
    adapter: Path | None
    optimizer: Path
    tokenizer: Path
    training_args: dict = field(default_factory=dict)
    training_args_path: Path | None = None  # the training_args.json read (None: none found)
    tokenizer_source: str = ""  # how the tokenizer folder was chosen, for messages


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
    from probe_dist.validate import read_json

    if adapter is not None:
        adapter_config = adapter / "adapter_config.json"
        fix = "Re-save the adapter with peft's save_pretrained (or restore the file from the training run)."
        parsed = read_json(adapter_config, "adapter config", fix)
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
    from probe_dist.validate import read_json

    fix = ("Fix the file (one JSON object: loss, temperature, max_new_tokens, grad_clip, ...), or remove it and set "
           "sampling.temperature, sampling.max_new_tokens, update.loss and update.grad_clip explicitly.")
    args = read_json(path, "training settings file", fix)
    if not isinstance(args, dict):
        kind = {list: "a list", str: "a string", type(None): "null"}.get(type(args), type(args).__name__)
        raise CheckpointError(f"training settings file {str(path)!r} holds {kind}, not a JSON object. {fix}")
    return args


def load_tokenizer(path: Path, source: str = ""):
    """The tokenizer in `path`; CheckpointError when there is none, it cannot be loaded, or it is empty.

    source: how `path` was chosen (`CheckpointPaths.tokenizer_source`), for the message."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from probe_dist.validate import TOKENIZER_FILES

    path = Path(path)
    chosen = f" (chosen as {source})" if source else ""
    fix = ("Copy the tokenizer saved with the model (tokenizer.save_pretrained) into the checkpoint's tokenizer/ "
           "folder, or set checkpoint.tokenizer=DIR.")
    if not path.is_dir():
        raise CheckpointError(f"tokenizer folder {str(path)!r}{chosen} does not exist. {fix}")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"no tokenizer in {str(path)!r}{chosen}: none of {', '.join(TOKENIZER_FILES)} is there. "
                              f"{fix}")
    try:
        # A fast tokenizer saved next to a Qwen2 config reloads through AutoTokenizer with other ids: load it directly.
        if (path / "tokenizer.json").exists():
            tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        else:
            tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer file is the same problem whatever the parser says
        raise CheckpointError(f"the tokenizer in {str(path)!r}{chosen} cannot be loaded: {type(exc).__name__}: "
                              f"{str(exc)[:300]}. {fix}") from None
    if len(tok) == 0:
        raise CheckpointError(f"the tokenizer in {str(path)!r}{chosen} is empty (vocabulary size 0). {fix}")
    if tok.pad_token_id is None:
        log.info("tokenizer has no pad token: using EOS %r as pad (pad is never scored)", tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def _weight_pickles(directory: Path, names: tuple[str, ...]) -> str:
    found = [str(directory / n) for n in names if (directory / n).is_file()]
    found += [str(f) for f in sorted(Path(directory).glob("pytorch_model-*.bin"))]
    return ", ".join(repr(f) for f in found) or f"a pickle weight file in {str(directory)!r}"


def load_model(paths: CheckpointPaths, dtype: torch.dtype, device: torch.device):
    """Base + adapter (trainable), in eval mode on `device`.

    Before loading: the safetensors files are complete and the adapter's tensors finite (`validate.
    check_weight_files`); pickle weight files (*.bin) are read with weights_only=True, and one that would run code
    is refused (UnsafeCheckpointError). After loading: every weight finite. Any load failure is a CheckpointError
    naming the folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from probe_dist.model.checks import (
        check_finite_parameters,
        check_weight_files,
        is_unsafe_pickle_error,
        load_error_text,
        unsafe_pickle_error,
    )

    hf_logging.disable_progress_bar()  # rank-prefixed logs instead of one progress bar per rank
    check_weight_files(paths.base, paths.adapter)
    try:
        base = AutoModelForCausalLM.from_pretrained(str(paths.base), dtype=dtype, weights_only=True)
    except (torch.OutOfMemoryError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - an unloadable base is the user's to fix, whatever the loader raised
        if is_unsafe_pickle_error(exc):
            raise unsafe_pickle_error(_weight_pickles(paths.base, ("pytorch_model.bin",)), exc) from None
        raise CheckpointError(f"could not load the base model from {str(paths.base)!r}: {load_error_text(exc)}. "
                              "Check that it is a complete Hugging Face model folder "
                              "(config.json + *.safetensors, as written by save_pretrained).") from None
    base.to(device)  # the finiteness pass below runs on the device (fast on a GPU), with the base file's names
    check_finite_parameters([*base.named_parameters(), *base.named_buffers()], adapter=False, source=paths.base)
    if paths.adapter is not None:
        try:
            model = PeftModel.from_pretrained(base, str(paths.adapter), is_trainable=True)
        except (torch.OutOfMemoryError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - as above
            if is_unsafe_pickle_error(exc):
                raise unsafe_pickle_error(_weight_pickles(paths.adapter, ("adapter_model.bin",)), exc) from None
            raise CheckpointError(
                f"could not load the adapter from {str(paths.adapter)!r} onto the base {str(paths.base)!r}: "
                f"{load_error_text(exc)}. Check that adapter_config.json and adapter_model.safetensors "
                "are complete and were trained on this base model.") from None
        check_finite_parameters(trainable_parameters(model), adapter=True, source=paths.adapter)
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


def read_optimizer_file(path: Path) -> dict:
    """The saved optimizer file, checked before any model is loaded.

    Loaded with torch.load(weights_only=True): a pickle that would run code is refused (UnsafeCheckpointError) and
    never executed. Two forms are accepted: probe_dist's ({"optimizer_class", "param_names": [...], "state_dict"})
    and a bare `optimizer.state_dict()` as HF Trainer / TRL (optimizer.pt) and accelerate (optimizer.bin) write it,
    whose parameter names are rebuilt from the model later (`model.sources.param_names`; "param_names" is then None).
    Then its values (`model.checks.check_optimizer_values`: finite state, exp_avg_sq ≥ 0, usable hyperparameters),
    naming the parameter. Returns the probe_dist form; raises CheckpointError otherwise."""
    from probe_dist.model.checks import is_unsafe_pickle_error, load_error_text, unsafe_pickle_error

    try:
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        if is_unsafe_pickle_error(exc):
            raise unsafe_pickle_error(f"the optimizer state {str(path)!r}", exc) from None
        raise CheckpointError(f"could not read optimizer state {str(path)!r}: {load_error_text(exc)}. "
                              "It should be a torch.save file written by the training run; copy it again or re-save "
                              "it.") from None
    if isinstance(blob, dict) and "state" in blob and "param_groups" in blob and "state_dict" not in blob:
        blob = {"optimizer_class": None, "param_names": None, "state_dict": blob}  # bare state_dict: names later
    return check_optimizer_blob(blob, path)


def check_optimizer_blob(blob, path: Path) -> dict:
    """`blob` ({"optimizer_class", "param_names" (a list, or None until rebuilt), "state_dict"}) checked for
    structure and values; returned as is. Raises CheckpointError naming `path` (the file it came from)."""
    from probe_dist.model.checks import check_optimizer_values

    resave = ("Re-save it with torch.save(opt.state_dict(), path), or as probe_dist's form torch.save("
              "{'optimizer_class': 'AdamW', 'param_names': names, 'state_dict': opt.state_dict()}, path).")
    if not isinstance(blob, dict) or "state_dict" not in blob or "param_names" not in blob:
        raise CheckpointError(
            f"{str(path)!r} is not an optimizer state: expected a torch optimizer state_dict ({{'state', "
            f"'param_groups'}}) or probe_dist's {{'state_dict', 'param_names'}}. {resave}")
    sd, names = blob["state_dict"], blob["param_names"]
    groups = sd.get("param_groups") if isinstance(sd, dict) else None
    state = sd.get("state") if isinstance(sd, dict) else None
    if ((names is not None and (not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names)))
            or not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                       for g in groups)
            or not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values())):
        raise CheckpointError(f"optimizer file {str(path)!r} is malformed: 'param_names' must be a list of names and "
                              "'state_dict' an optimizer state dict ({'state': {id: {...}}, 'param_groups': "
                              f"[{{..., 'params': [ids]}}]}}). {resave}")
    ids = [i for g in groups for i in g["params"]]
    known = names or []  # None until rebuilt from the model: ids name the parameters in messages
    check_optimizer_values(((known[k] if k < len(known) else f"parameter id {pid}", state[pid])
                            for k, pid in enumerate(ids) if pid in state), groups, path)
    return blob


def name_optimizer_blob(blob: dict, model: torch.nn.Module, path: Path) -> dict:
    """A blob whose "param_names" is None gets names rebuilt from `model` (`model.sources.param_names`); its state
    dict is then restricted to the trainable parameters. Raises CheckpointError when no grouping rule fits or the
    fitting ones disagree."""
    if blob.get("param_names") is not None:
        return blob
    from probe_dist.model.sources.param_names import AmbiguousNames, rebuild_names

    try:
        state_dict, names, rule = rebuild_names(blob["state_dict"], model)
    except AmbiguousNames as exc:
        raise CheckpointError(
            f"the optimizer state {str(path)!r} has no parameter names, and they cannot be rebuilt from the model: "
            f"{exc}. Check that the adapter/model and the optimizer come from the same checkpoint, or re-save the "
            "optimizer with names: torch.save({'optimizer_class': 'AdamW', 'param_names': names, 'state_dict': "
            "opt.state_dict()}, path), names in param-group order.") from None
    log.info("optimizer state %s: parameter names rebuilt by the %s grouping rule (every group's size and every "
             "tensor's shape match)", path, rule)
    return {**blob, "param_names": names, "state_dict": state_dict, "naming": rule}


def load_optimizer(path: Path, trainable: list[tuple[str, torch.nn.Parameter]],
                   blob: dict | None = None) -> tuple[torch.optim.AdamW, dict]:
    """Build torch AdamW over exactly the trainable parameters and load the saved state remapped by name.

    blob: the file's contents from `read_optimizer_file` (read here when None)."""
    from probe_dist.model.checks import check_optimizer_values

    if blob is None:
        blob = read_optimizer_file(path)
    if blob.get("param_names") is None:
        raise CheckpointError(f"the optimizer state {str(path)!r} has no parameter names: rebuild them from the loaded "
                              "model first (model.load.name_optimizer_blob), as build_probe does.")
    cls = str(blob.get("optimizer_class") or "AdamW")  # a bare state dict: AdamW if its groups say so (below)
    sd = blob["state_dict"]
    groups = sd.get("param_groups", [])
    if cls.split(".")[-1] != "AdamW" or any("betas" not in g or "eps" not in g for g in groups):
        raise CheckpointError(f"optimizer in {str(path)!r} is {cls!r}, not torch AdamW: the probe reproduces the "
                              "exact AdamW step (docs/method.md §4) and refuses other optimizers.")
    if any(g.get("maximize") for g in groups):
        raise CheckpointError(f"optimizer in {str(path)!r} is AdamW with maximize=True, which the probe does not "
                              "support: re-save the state of a minimising AdamW.")
    if any(g.get("decoupled_weight_decay") is False for g in groups):
        raise CheckpointError(f"the optimizer in {str(path)!r} is Adam with L2 weight decay "
                              "(decoupled_weight_decay=False), not AdamW: the probe reproduces only AdamW's step.")
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
        raise CheckpointError(f"optimizer file {str(path)!r} lists {len(saved_names)} names but {len(ordered_ids)} "
                              "parameter ids: 'param_names' must name every parameter of the param groups, in order. "
                              "Re-save it from the training run.")
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
        raise CheckpointError(f"optimizer state in {str(path)!r} is incomplete or mismatched (every trainable "
                              "parameter needs exp_avg, exp_avg_sq and step of its shape): " + "; ".join(problems[:5])
                              + ". Check that the adapter and optimizer come from the same checkpoint.")
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
    # load_state_dict casts the moments to each parameter's dtype. An exact cast (fp32 moments of a float64 probe) is
    # kept; a lossy one (fp32 moments of a bf16 parameter would lose 16 bits) is undone: the saved tensor goes back
    # in its own dtype, on the parameter's device. `step` stays a CPU tensor.
    low, saved_dtypes = set(), set()
    for pid in ordered_ids:
        param = by_name[name_of_id[pid]]
        saved, live = sd["state"][pid], optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            value = saved.get(key)
            if not isinstance(value, torch.Tensor):
                continue
            saved_dtypes.add(str(value.dtype).replace("torch.", ""))
            if not torch.equal(live[key].detach().cpu().to(value.dtype), value.detach().cpu()):
                live[key] = value.detach().to(device=param.device, copy=True)
            if value.is_floating_point() and torch.finfo(value.dtype).bits < 32:
                low.add(str(value.dtype).replace("torch.", ""))
    if low:
        log.warning("the optimizer state in %s is stored in %s: the moments were rounded when saved, so u carries "
                    "that rounding (the probe computes u in float64 from the saved values)", path, ", ".join(sorted(low)))
    check_optimizer_values(((name_of_id[pid], optimizer.state[by_name[name_of_id[pid]]]) for pid in ordered_ids),
                           [], path)
    coverage = {"params": len(ordered_ids), "with_state": len(ordered_ids) - len(problems),
                "numel": sum(by_name[n].numel() for n in saved_names),
                "state_dtypes": sorted(saved_dtypes),
                "naming": blob.get("naming", "saved names")}
    return optimizer, coverage


def set_lr_ratios(optimizer: torch.optim.Optimizer, base_lrs: list[float] | None = None) -> list[float]:
    """Each param group's learning rate relative to the first group's, stored as group["lr_ratio"] and returned.

    η, the probe's learning rate, is the first group's; a group trained at k times that lr (LoRA+ trains B at 16×)
    moves k·η (`update.step`). The ratios are the saved lrs' — or, where the first group's saved lr is 0 (the end of
    a linear schedule), the scheduler's base lrs (`base_lrs`, else each group's "initial_lr" that torch schedulers
    record). With neither, every ratio is 1 and a warning says so when the groups' lrs could differ."""
    groups = optimizer.param_groups

    def ratios(lrs):
        lrs = [float(x) if x is not None else None for x in lrs]
        if len(lrs) == len(groups) and all(x is not None and math.isfinite(x) and x >= 0 for x in lrs) and lrs[0] > 0:
            return [x / lrs[0] for x in lrs], True
        return None, False

    found, ok = ratios([g.get("lr") for g in groups])
    if not ok and base_lrs is not None:
        found, ok = ratios(base_lrs)
    if not ok:
        found, ok = ratios([g.get("initial_lr") for g in groups])
    if not ok:
        found = [1.0] * len(groups)
        if len(groups) > 1:
            log.warning("the optimizer's param groups have lr 0 and no recorded base lr: every group is moved by the "
                        "same η (if training used different lrs per group, the update direction differs)")
    for g, r in zip(groups, found):
        g["lr_ratio"] = r
    return found


def optimizer_param_names(optimizer, trainable) -> list[str]:
    name_of = {id(p): n for n, p in trainable}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def save_optimizer(optimizer: torch.optim.Optimizer, trainable, path: Path) -> None:
    torch.save({"optimizer_class": type(optimizer).__name__,
                "param_names": optimizer_param_names(optimizer, trainable),
                "state_dict": optimizer.state_dict()}, str(path))
