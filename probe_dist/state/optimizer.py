"""The AdamW state: read without running code, checked, remapped by parameter name onto the trainable parameters.

optimizer.pt holds {"optimizer_class": "AdamW", "param_names": [...], "state_dict": optimizer.state_dict()}, or a
bare state_dict whose names `name_optimizer_blob` rebuilds from the model (`state.param_names`). The probe builds
its own torch AdamW over exactly the trainable parameters, in the saved group order (docs/method.md §4), and each
group's lr ratio to the first group's (LoRA+). Every refusal is a `CheckpointError` naming the file and the fix.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from probe_dist.errors import CheckpointError

log = logging.getLogger("probe_dist")


ADAMW_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


_NAME_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def canonical_name(name: str) -> str:
    """`name` without wrapper prefixes (module., _orig_mod., _fsdp_wrapped_module.,
    _checkpoint_wrapped_module., repeatedly) or inner wrapper segments: names under DDP, torch.compile,
    FSDP or activation checkpointing as the plain model's."""
    changed = True
    while changed:
        changed = False
        for prefix in _NAME_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name.replace("._fsdp_wrapped_module", "").replace("._checkpoint_wrapped_module", "")


def read_optimizer_file(path: Path) -> dict:
    """The saved optimizer file, checked before any model is loaded.

    Loaded with torch.load(weights_only=True) within the reading bounds (`state.checks.bounded_torch_load`): a
    pickle that would run code is refused (UnsafeCheckpointError) and never executed. Two forms are accepted: probe_dist's ({"optimizer_class", "param_names": [...], "state_dict"})
    and a bare `optimizer.state_dict()` as HF Trainer / TRL (optimizer.pt) and accelerate (optimizer.bin) write it,
    whose parameter names are rebuilt from the model later (`state.param_names`; "param_names" is then None).
    Then its values (`state.checks.check_optimizer_values`: finite state, exp_avg_sq ≥ 0, usable hyperparameters),
    naming the parameter. Returns the probe_dist form; raises CheckpointError otherwise."""
    from probe_dist.state.checks import bounded_torch_load, load_error_text

    blob = bounded_torch_load(path, "the optimizer state", lambda exc: CheckpointError(
        f"could not read optimizer state {str(path)!r}: {load_error_text(exc)}. It should be a torch.save file "
        "written by the training run; copy it again or re-save it."))
    if isinstance(blob, dict) and "state" in blob and "param_groups" in blob and "state_dict" not in blob:
        blob = {"optimizer_class": None, "param_names": None, "state_dict": blob}  # bare state_dict: names later
    return check_optimizer_blob(blob, path)


def check_optimizer_blob(blob, path: Path) -> dict:
    """`blob` ({"optimizer_class", "param_names" (a list, or None until rebuilt), "state_dict"}) checked for
    structure and values; returned as is. Raises CheckpointError naming `path` (the file it came from)."""
    from probe_dist.state.checks import check_optimizer_values

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
                                                       and all(isinstance(i, int) and not isinstance(i, bool)
                                                               for i in g["params"]) for g in groups)
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
    """A blob whose "param_names" is None gets names rebuilt from `model` (`state.param_names`); its state
    dict is then restricted to the trainable parameters. Raises CheckpointError when no grouping rule fits or the
    fitting ones disagree."""
    if blob.get("param_names") is not None:
        return blob
    from probe_dist.state.param_names import AmbiguousNames, rebuild_names

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
    from probe_dist.state.checks import check_optimizer_values

    if blob is None:
        blob = read_optimizer_file(path)
    if blob.get("param_names") is None:
        raise CheckpointError(f"the optimizer state {str(path)!r} has no parameter names: rebuild them from the loaded "
                              "model first (state.optimizer.name_optimizer_blob), as load_training_state does.")
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
    """The names of `optimizer`'s parameters in param-group order, found by identity among `trainable`
    ((name, parameter) pairs). Raises KeyError for a parameter not in `trainable`."""
    name_of = {id(p): n for n, p in trainable}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def save_optimizer(optimizer: torch.optim.Optimizer, trainable, path: Path) -> None:
    """torch.save probe_dist's optimizer form to `path`: {"optimizer_class", "param_names" (in optimizer
    order), "state_dict"}, what `read_optimizer_file` reads back."""
    torch.save({"optimizer_class": type(optimizer).__name__,
                "param_names": optimizer_param_names(optimizer, trainable),
                "state_dict": optimizer.state_dict()}, str(path))


def check_real_step_dtypes(optimizer, trainable) -> None:
    """update.route=real_step steps torch's AdamW, which needs the moments in the parameter's dtype."""
    for name, p in trainable:
        moments = [v for k, v in optimizer.state[p].items() if k in ("exp_avg", "exp_avg_sq")]
        if any(m.dtype != p.dtype for m in moments):
            raise CheckpointError(
                f"update.route=real_step cannot step {name}: its saved AdamW moments are {moments[0].dtype} and the "
                f"parameter {p.dtype}, and torch's AdamW needs one dtype (casting the moments would change u). Use "
                "update.route=update_vector (the default), which forms θ + ηu in float64 from the saved moments.")
