"""No code runs from a checkpoint: every pickle-based file the probe reads is loaded with weights_only=True, and a
crafted pickle is refused with a UserInputError (exit 2) naming the file — its payload never runs.

The payload of every crafted file would create a marker file (via os.system, or via exec); each test asserts the
marker never appears. Positions: optimizer.pt (torch.save zip and a plain pickle), the adapter as
adapter_model.bin, and the base model as base/pytorch_model.bin (the loaders read .bin files when no safetensors is
there). One position also runs through a real `python -m probe_dist.main` subprocess.
"""

from __future__ import annotations

import ast
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from probe_dist.errors import UserInputError
from probe_dist.state.checks import UnsafeCheckpointError
from probe_dist.state.optimizer import read_optimizer_file
from tests.test_cli import run_cli

REPO = Path(__file__).resolve().parents[1]
TOY_CPU = REPO / "configs" / "toy_cpu.yaml"
SMALL = ["sampling.B_E=2", "sampling.G_E=2", "sampling.B_U=2", "sampling.G_U=2", "estimators.etas=[0,1e-4]",
         "device=cpu"]


class TouchViaSystem:
    """Unpickling this runs `touch <marker>` through os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class TouchViaExec:
    """Unpickling this runs Python that creates <marker> through exec."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


PAYLOADS = {"os_system": TouchViaSystem, "exec": TouchViaExec}


def crafted_file(path: Path, payload: type, marker: Path, *, plain_pickle: bool = False,
                 template: dict | None = None) -> None:
    """A file at `path` that looks like what the loader expects but carries the payload."""
    blob = dict(template or {})
    blob["state_dict" if "state_dict" in blob else "weight"] = payload(marker)
    if plain_pickle:
        path.write_bytes(pickle.dumps(blob, protocol=2))
    else:
        torch.save(blob, str(path))


def copy_toy(toy: Path, dest: Path) -> Path:
    shutil.copytree(toy, dest)
    return dest


def place(ckpt: Path, position: str, payload: type, marker: Path) -> str:
    """Put the crafted file in `position`; returns the file name the refusal must mention."""
    if position in ("optimizer", "optimizer_plain_pickle"):
        template = torch.load(str(ckpt / "optimizer.pt"), map_location="cpu", weights_only=True)
        crafted_file(ckpt / "optimizer.pt", payload, marker, plain_pickle=position.endswith("pickle"),
                     template=template)
        return "optimizer.pt"
    if position == "adapter_bin":
        (ckpt / "adapter_model.safetensors").unlink()
        crafted_file(ckpt / "adapter_model.bin", payload, marker)
        return "adapter_model.bin"
    if position == "base_bin":
        (ckpt / "base" / "model.safetensors").unlink()
        crafted_file(ckpt / "base" / "pytorch_model.bin", payload, marker)
        return "pytorch_model.bin"
    raise ValueError(position)


def run_main_in_process(argv: list[str], capsys) -> tuple[int, str]:
    from tests.test_bad_inputs import run_in_process

    return run_in_process(argv, capsys)


POSITIONS = ["optimizer", "optimizer_plain_pickle", "adapter_bin", "base_bin"]


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("position", POSITIONS)
def test_crafted_pickle_refused_and_never_run(toy_checkpoint, tmp_path, capsys, position, payload):
    marker = tmp_path / "MARKER"
    ckpt = copy_toy(toy_checkpoint, tmp_path / "ckpt")
    name = place(ckpt, position, PAYLOADS[payload], marker)
    out = tmp_path / "out"
    code, stderr = run_main_in_process(["--config", str(TOY_CPU), f"checkpoint.path={ckpt}", f"output.dir={out}",
                                        *SMALL], capsys)
    assert not marker.exists(), "the crafted pickle's code ran"
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    error = stderr[stderr.index("error: "):]
    assert "refused to load" in error and name in error and "never runs code from a checkpoint" in error, error
    assert "weights_only=False" not in error  # torch's advice to retry unsafely is not passed on
    assert not out.exists()


def test_crafted_optimizer_refused_through_the_cli(toy_checkpoint, tmp_path):
    marker = tmp_path / "MARKER"
    ckpt = copy_toy(toy_checkpoint, tmp_path / "ckpt")
    place(ckpt, "optimizer", TouchViaSystem, marker)
    out = tmp_path / "out"
    proc = run_cli(["--config", str(TOY_CPU), f"checkpoint.path={ckpt}", f"output.dir={out}", *SMALL], timeout=180)
    assert not marker.exists(), "the crafted pickle's code ran"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "refused to load the optimizer state" in proc.stderr and "optimizer.pt" in proc.stderr
    assert "posix.system" in proc.stderr  # names what the pickle asked to call
    assert not out.exists()


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_read_optimizer_file_raises_a_user_input_error(tmp_path, payload):
    marker = tmp_path / "MARKER"
    path = tmp_path / "optimizer.pt"
    crafted_file(path, PAYLOADS[payload], marker, template={"optimizer_class": "AdamW", "param_names": [],
                                                           "state_dict": None})
    with pytest.raises(UnsafeCheckpointError) as info:
        read_optimizer_file(path)
    assert isinstance(info.value, UserInputError)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    """A static guard: each torch.load(...) call in probe_dist passes weights_only=True literally."""
    calls = []
    for path in sorted((REPO / "probe_dist").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", safe))
    assert calls, "expected at least the optimizer load"
    assert all(safe for _, safe in calls), [where for where, safe in calls if not safe]
    assert not any("pickle.load" in p.read_text(encoding="utf-8") for p in (REPO / "probe_dist").rglob("*.py"))
