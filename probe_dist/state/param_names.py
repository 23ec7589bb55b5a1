"""Which parameter each id of a bare optimizer state dict belongs to, rebuilt from the model.

`torch.optim.Optimizer.state_dict()` numbers parameters 0, 1, … in param-group order and keeps no names. A
checkpoint written by HF Trainer / TRL (optimizer.pt) or accelerate (optimizer.bin) holds only that, so the names
are rebuilt by re-running the grouping rule that built the optimizer over the loaded model, with the libraries' own
code where they have it:

- "HF Trainer": transformers `Trainer.create_optimizer` — trainable parameters in `named_parameters` order, those
  in `Trainer.get_decay_parameter_names` first (weight-decay group), then the rest (no-decay group);
- "peft LoRA+": `peft.optimizers.create_loraplus_optimizer` (A matrices, embedding adapters, B matrices, B
  no-decay), run on the model itself;
- "one group of trainable parameters" (`AdamW(p for p in model.parameters() if p.requires_grad)`);
- "one group of all parameters" (`AdamW(model.parameters())`: frozen parameters hold no state and are dropped).

A rule fits when it gives the saved number of groups, every group's size, and every saved moment the shape of its
parameter (and no frozen parameter holds state). Fitting rules that name the parameters differently make the file
ambiguous, and it is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("probe_dist")

Groups = list[list[tuple[str, torch.nn.Parameter]]]


class AmbiguousNames(ValueError):
    """No grouping rule fits the saved state, or several fit with different names (the message says which)."""


def _hf_trainer(model) -> Groups:
    from transformers import Trainer

    # A method that does not use `self` (transformers 4.x and 5.x): the exact rule HF Trainer applies.
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    return [[(n, p) for n, p in named if n in decay and p.requires_grad],
            [(n, p) for n, p in named if n not in decay and p.requires_grad]]


def _loraplus(model) -> Groups:
    from peft.optimizers import create_loraplus_optimizer

    name_of = {id(p): n for n, p in model.named_parameters()}
    optimizer = create_loraplus_optimizer(model, torch.optim.SGD, lr=1.0, loraplus_lr_ratio=2.0)
    return [[(name_of[id(p)], p) for p in g["params"]] for g in optimizer.param_groups]


def _one_group_trainable(model) -> Groups:
    return [[(n, p) for n, p in model.named_parameters() if p.requires_grad]]


def _one_group_all(model) -> Groups:
    return [list(model.named_parameters())]


RULES: dict[str, Callable[[torch.nn.Module], Groups]] = {
    "HF Trainer (decay, no-decay)": _hf_trainer,
    "peft LoRA+": _loraplus,
    "one group of trainable parameters": _one_group_trainable,
    "one group of all parameters": _one_group_all,
}


def _mismatch(groups: Groups, state_dict: dict) -> str | None:
    """Why `groups` does not fit the saved state (None: it fits)."""
    saved = state_dict["param_groups"]
    if len(groups) != len(saved):
        return f"{len(groups)} groups, the file has {len(saved)}"
    for k, (mine, theirs) in enumerate(zip(groups, saved)):
        if len(mine) != len(theirs["params"]):
            return f"group {k} has {len(mine)} parameters, the file's has {len(theirs['params'])}"
        for (name, param), pid in zip(mine, theirs["params"]):
            st = state_dict["state"].get(pid)
            if st is None:
                continue
            if not param.requires_grad:
                return f"frozen parameter {name} would hold optimizer state"
            shape = getattr(st.get("exp_avg"), "shape", None)
            if shape is not None and tuple(shape) != tuple(param.shape):
                return f"{name} is {tuple(param.shape)}, its saved exp_avg {tuple(shape)}"
    return None


def rebuild_names(state_dict: dict, model: torch.nn.Module) -> tuple[dict, list[str], str]:
    """(the state dict restricted to trainable parameters, their names in its id order, the rule's name).

    state_dict: a torch optimizer state dict ({"state": {id: {...}}, "param_groups": [{"params": [ids], ...}]});
    model: the loaded model, wrapped as in training (a peft model for LoRA). Raises AmbiguousNames when no rule fits
    or fitting rules disagree."""
    fits, tried = {}, []
    for rule, build in RULES.items():
        try:
            groups = build(model)
        except Exception as exc:  # noqa: BLE001 - a rule that does not apply to this model (e.g. LoRA+ without LoRA)
            tried.append(f"{rule}: not applicable ({type(exc).__name__})")
            continue
        why = _mismatch(groups, state_dict)
        if why is None:
            fits[rule] = groups
        else:
            tried.append(f"{rule}: {why}")
    if not fits:
        raise AmbiguousNames("no known way of building the optimizer fits it (" + "; ".join(tried) + ")")
    orders = {}
    for rule, groups in fits.items():
        kept = tuple((pid, n) for g, sg in zip(groups, state_dict["param_groups"]) for (n, p), pid
                     in zip(g, sg["params"]) if p.requires_grad)
        orders.setdefault(kept, []).append(rule)
    if len(orders) > 1:
        raise AmbiguousNames("several ways of building the optimizer fit it and name its parameters differently ("
                             + "; ".join(" = ".join(rules) for rules in orders.values()) + ")")
    (kept, rules), = orders.items()
    name_of_id = dict(kept)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [i for i in g["params"] if i in name_of_id]}
              for g in state_dict["param_groups"]]
    restricted = {"state": {i: s for i, s in state_dict["state"].items() if i in name_of_id}, "param_groups": groups}
    names = [name_of_id[i] for g in groups for i in g["params"]]
    return restricted, names, rules[0]
