"""The package's layering as docs/architecture.md states it, and the training-state seam it describes.

- Imports (module level and inside functions alike) form no cycle, and no module imports one of a layer above its
  own; every module is placed by the table.
- The document's snippet (a Probe from an in-memory model, optimizer and tokenizer) runs as printed.
- A state built from objects in memory gives the numbers of the same state read from files, bit for bit, and
  leaves the trainer's objects untouched; an optimizer that has not stepped yet is AdamW's first step.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "probe_dist"
DOC = REPO / "docs" / "architecture.md"


def layer_table() -> dict[str, int]:
    """{module prefix: layer number} from the doc's table (rows "| 3 orchestration | `a`, `b` | ... |")."""
    table = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*(\d+) [^|]*\|([^|]*)\|", line)
        if m:
            for name in re.findall(r"`([\w.]+)`", m.group(2)):
                table[name] = int(m.group(1))
    return table


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The probe_dist modules `path` imports (anywhere in the file): `from a.b import c` names a.b.c when that is a
    module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("probe_dist"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("probe_dist"))
    return {m for m in found if m in known}


def place(module: str, table: dict[str, int]) -> int | None:
    """The layer of the most specific table entry naming `module` (the root package only by its exact name)."""
    hits = [p for p in table if module == p or (p != "probe_dist" and module.startswith(p + "."))]
    return table[max(hits, key=len)] if hits else None


def test_the_table_places_every_module_and_no_import_goes_up_or_round():
    table = layer_table()
    assert len(set(table.values())) >= 8, f"the layer table was not found in {DOC}: {table}"
    mods = modules()
    graph = {m: imports(p, set(mods)) - {m} for m, p in mods.items()}
    unplaced = sorted(m for m in mods if place(m, table) is None)
    assert not unplaced, f"modules the table in {DOC.name} does not place: {unplaced}"
    upward = sorted(f"{m} (layer {place(m, table)}) imports {d} (layer {place(d, table)})"
                    for m, deps in graph.items() for d in deps if place(d, table) < place(m, table))
    assert not upward, "imports of a layer above:\n" + "\n".join(upward)
    # Cycles: depth-first search for a back edge.
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path):
    """The two rules can fail: a layer-9 module importing the probe, and a two-module cycle."""
    table = layer_table()
    assert place("probe_dist.estimators.snis", table) > place("probe_dist.probe", table)
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from probe_dist.probe import Probe\n")
    b.write_text("def f():\n    from probe_dist.estimators import snis\n")
    known = {"probe_dist.probe", "probe_dist.estimators", "probe_dist.estimators.snis"}
    assert imports(a, known) == {"probe_dist.probe"} and imports(b, known) == {"probe_dist.estimators.snis"}


def _snippet() -> str:
    text = DOC.read_text()
    return text[text.index("```python\n") + len("```python\n"):text.index("```", text.index("```python\n") + 3)]


def test_the_documented_snippet_builds_and_runs_a_probe_from_objects(tmp_path):
    code = _snippet()
    assert len(code.strip().splitlines()) <= 15  # tol: exact the size limit for the snippet
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    per_eta, delta_true, restored = proc.stdout.split()[-3:]
    assert restored == "True" and math.isfinite(float(per_eta)) and float(per_eta) != 0.0  # tol: exact
    assert math.isfinite(float(delta_true)) and float(delta_true) != 0.0  # tol: exact a real step moved Ĥ
    assert not any(p.name != "__pycache__" for p in tmp_path.iterdir()), "the snippet wrote files"


SMALL = ["device=cpu", "sampling.B_E=4", "sampling.G_E=2", "sampling.B_U=4", "sampling.G_U=2",
         "estimators.etas=[0,1e-4,1e-3]", "output.plots=false"]


def _objects_from_files(ckpt: Path):
    """The checkpoint's model, AdamW and tokenizer loaded the way a training script holds them (transformers,
    peft and torch only: a second path, independent of the probe's readers)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    base = AutoModelForCausalLM.from_pretrained(str(ckpt / "base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(ckpt), is_trainable=True)
    blob = torch.load(str(ckpt / "optimizer.pt"), weights_only=True)
    params = dict(model.named_parameters())
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [params[blob["param_names"][i]] for i in g["params"]]}
              for g in blob["state_dict"]["param_groups"]]
    optimizer = torch.optim.AdamW(groups)
    optimizer.load_state_dict(blob["state_dict"])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(ckpt / "tokenizer"))
    recipe = json.loads((ckpt / "training_args.json").read_text())
    return model, optimizer, tokenizer, recipe


def test_state_from_objects_gives_the_numbers_of_the_same_state_from_files(tmp_path):
    from probe_dist.assemble import build_probe, probe_from_state
    from probe_dist.config import load_config
    from probe_dist.runtime.dist import Runtime
    from probe_dist.state import TrainingState
    from tests.synthetic_checkpoint import build_synthetic_checkpoint

    ckpt = build_synthetic_checkpoint(tmp_path / "ckpt", lora_r=4, max_new_tokens=3)
    from_files = build_probe(load_config(None, [f"checkpoint.path={ckpt}", *SMALL]), Runtime()).run()
    model, optimizer, tokenizer, recipe = _objects_from_files(ckpt)
    model.train()  # a trainer's model between steps: the probe must put this flag back
    before = copy.deepcopy(optimizer.state_dict())
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = TrainingState.from_objects(model, optimizer, tokenizer, recipe=recipe)
    probe = probe_from_state(load_config(None, SMALL), state)
    from_objects = probe.run()
    a, b = from_files.summary(), from_objects.summary()
    for key in ("entropy/base", "entropy/base_se", "delta_h1/per_eta", "delta_h1/per_eta_se", "update/u_norm",
                "update/grad_norm", "explain/sum_contrib_e", "explain/sum_contrib_u", "curvature/d2H_deta2"):
        assert a[key] == b[key], (key, a[key], b[key])  # tol: exact the same state through two seams
    for row_a, row_b in zip(a["sweep"], b["sweep"]):
        assert row_a["delta_h_true"] == row_b["delta_h_true"] and row_a["ess"] == row_b["ess"]  # tol: exact
    assert b["restore/verified"] is True and probe.load_info["provenance/checkpoint_source"]["format"] == "in_memory"
    # The trainer's objects are as they were: train mode, weights, optimizer state and groups (no lr_ratio).
    assert model.training
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(before["state"][i][k], after["state"][i][k]) for i in before["state"]
               for k in before["state"][i])


def test_an_optimizer_that_has_not_stepped_gives_adamw_first_step(tmp_path):
    """A fresh AdamW (no state yet): u is what torch's first step does with the probe's gradient, in float64."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    from probe_dist.assemble import probe_from_state
    from probe_dist.config import load_config
    from probe_dist.data.rewards import register_reward, reward_names
    from probe_dist.state import TrainingState
    from probe_dist.toy.task import build_tokenizer
    from tests.synthetic_checkpoint import synthetic_model_config

    if "test_first_digit" not in reward_names():  # mixed rewards on a random model: P(digit first) ≈ 10/16
        register_reward("test_first_digit")(lambda response, answer: float(response[:1].isdigit()))
    torch.manual_seed(0)
    model = get_peft_model(Qwen2ForCausalLM(synthetic_model_config()).double(),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    state = TrainingState.from_objects(model, optimizer, build_tokenizer(),
                                       recipe={"temperature": 1.0, "max_new_tokens": 3, "loss": "grpo"})
    # Precondition, built: U has 8 groups of 4, each with mixed rewards unless all 4 agree (p ≈ 0.17), so the
    # gradient is zero with probability ≈ 0.17⁸ ≈ 1e-6; asserted below.
    overrides = [*SMALL, "estimators.explain=false", "sampling.reward=test_first_digit", "sampling.B_U=8",
                 "sampling.G_U=4"]
    res = probe_from_state(load_config(None, overrides), state).run()
    assert optimizer.state == {} or all(len(s) == 0 for s in optimizer.state.values())
    assert any(bool((g != 0).any()) for g in res.update.grad), "a zero gradient would not test the step"
    reference = copy.deepcopy(optimizer)  # torch's own first step on the same gradient, lr 1 (u per unit lr)
    params = [p for g in reference.param_groups for p in g["params"]]
    theta = [p.detach().clone() for p in params]
    for p, g in zip(params, res.update.grad):
        p.grad = g.to(p.dtype)
    for group in reference.param_groups:
        group["lr"] = 1.0
    reference.step()
    for p, t0, u in zip(params, theta, res.update.u):
        # tol: fp θ' = θ − (wd·θ + m̂/(√v̂+ε)) in float64 rounds each coordinate at |θ| + |u|: ≤ 8 u₆₄ (|θ| + |u|)
        bound = 8 * torch.finfo(torch.float64).eps / 2 * (t0.abs() + u.abs())
        assert bool(((p.detach() - t0) - u).abs().le(bound).all())
