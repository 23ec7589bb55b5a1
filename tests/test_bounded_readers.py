"""Checkpoint readers are bounded (issue 30): a small hostile file must not exhaust memory, recurse to a traceback,
or outlive SIGTERM.

Each hostile checkpoint is a copy of a trainer checkpoint with one file replaced; the probe runs on it as a real
`python -m probe_dist.main` subprocess, and each case asserts: exit 2 with one `error:` paragraph naming the file
and the bound (no traceback), peak RSS of that process ≤ 2 GiB (os.wait4's rusage of exactly that child), wall
time ≤ 30 s, and the checkpoint directory byte-identical afterwards (names, modes, contents). Before the bounds,
the shared-reference file below grew to 24 GiB and was killed by the OOM killer after 249 s.

The fast tier's checkpoint is the toy's with a training_args.bin written the way HF Trainer writes it
(`torch.save(GRPOConfig(...))`, TRL's own class); the slow tier repeats the two issue files on a checkpoint-N
that TRL's GRPOTrainer trained and saved. The control run (the same copy, unmodified) must exit 0, so the exit 2
is the hostile file's doing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
HELPERS = REPO / "tests" / "helpers"
SMALL = ["device=cpu", "sampling.B_E=2", "sampling.G_E=2", "sampling.B_U=2", "sampling.G_U=2",
         "estimators.etas=[0,1e-4]", "estimators.explain=false", "output.plots=false"]
# tol: bound the issue's acceptance: a bounded reader refuses within seconds using a few hundred MB (a toy run peaks
# at ~0.5 GiB); the unbounded one ran to 24 GiB / 249 s, so these separate bounded from unbounded by 10x
RSS_LIMIT_BYTES = 2 << 30
WALL_LIMIT_S = 30.0
ISSUE_FILE_BYTES = 16 * 1024  # the hostile training_args.bin stays a small file (the issue's is 8 KB)


# ------------------------------------------------------------------------------------------------ hostile values


def shared_reference_bomb(levels: int = 40) -> list:
    """x = [x, x] `levels` times: `levels` distinct lists, 2**levels leaves once shared references are expanded."""
    x: list = []
    for _ in range(levels):
        x = [x, x]
    return x


def self_containing_list() -> list:
    x: list = []
    x.append(x)
    return x


# ------------------------------------------------------------------------------------------------ running


def tree_digest(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (not following symlinks): its mode and, for a regular file, its sha256."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = None
        if path.is_file() and not path.is_symlink():  # hashed in chunks: a sparse 3 GiB file stays cheap
            h = hashlib.sha256()
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    h.update(chunk)
            digest = h.hexdigest()
        out[str(path.relative_to(root))] = (st.st_mode, digest)
    return out


# The probe runs as a grandchild: a child's peak RSS (ru_maxrss) starts at its parent's RSS when it is spawned
# (Linux carries the high-water mark across fork and exec), so measured from this test process it would include
# whatever the test worker holds. A small wrapper spawns the probe and reports the probe's own rusage.
_WRAPPER = """
import os, subprocess, sys, threading
child = subprocess.Popen(sys.argv[2:])
timer = threading.Timer(float(sys.argv[1]), child.kill)
timer.start()
_, status, usage = os.wait4(child.pid, 0)
timer.cancel()
sys.stderr.write(f"\\nPEAK_RSS_KIB {usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_probe(ckpt: Path, out: Path, *extra: str, timeout: float = 120.0) -> tuple[int, str, float, int]:
    """(exit code, stderr, wall seconds, peak RSS bytes) of the CLI on `ckpt`; the RSS is the probe process's own
    (os.wait4 in a small wrapper), not inherited from the test process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "probe_dist.main", f"checkpoint.path={ckpt}", f"output.dir={out}", *SMALL, *extra]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(timeout), *cmd], cwd=REPO, env=env,
                          capture_output=True, text=True, errors="replace", timeout=timeout + 30)
    stderr, _, rss = proc.stderr.rpartition("\nPEAK_RSS_KIB ")
    return proc.returncode, stderr, time.monotonic() - start, int(rss.strip()) * 1024  # ru_maxrss: KiB on Linux


def assert_refused(ckpt: Path, tmp_path: Path, *needles: str, extra: tuple[str, ...] = ()) -> str:
    """The run on `ckpt` exits 2 with one readable paragraph containing `needles`, within the time and memory
    bounds, and leaves `ckpt` byte-identical and output.dir absent."""
    before = tree_digest(ckpt)
    out = tmp_path / "out"
    code, stderr, wall, rss = run_probe(ckpt, out, *extra)
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    error = stderr[stderr.index("error: "):]
    assert error.count("\n") <= 1, error  # one paragraph
    for needle in needles:
        assert needle in error, (needle, error)
    assert wall <= WALL_LIMIT_S, wall
    assert rss <= RSS_LIMIT_BYTES, rss
    assert tree_digest(ckpt) == before
    assert not out.exists() and not list(tmp_path.glob(".out.staging-*"))
    return error


# ------------------------------------------------------------------------------------------------ checkpoints


def trl_training_args(output_dir: str):
    """TRL's GRPOConfig as train_trl.py builds it (the object HF Trainer pickles into training_args.bin)."""
    from trl import GRPOConfig

    return GRPOConfig(output_dir=output_dir, use_cpu=True, report_to="none", per_device_train_batch_size=8,
                      num_generations=4, max_completion_length=4, max_steps=3, save_steps=2, logging_steps=1,
                      learning_rate=1e-3, weight_decay=0.01, beta=0.0, dataloader_num_workers=0, seed=0)


@pytest.fixture(scope="module")
def trainer_checkpoint(toy_checkpoint, tmp_path_factory) -> Path:
    """The toy's files in HF Trainer's layout: training_args.bin written by torch.save of TRL's GRPOConfig (what
    Trainer._save does), no training_args.json; the base named by checkpoint.base."""
    root = tmp_path_factory.mktemp("trainer") / "checkpoint-2"
    shutil.copytree(toy_checkpoint, root, ignore=shutil.ignore_patterns("training_args.json", "base"))
    torch.save(trl_training_args(str(root.parent)), str(root / "training_args.bin"))
    cfg = json.loads((root / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(toy_checkpoint / "base")
    (root / "adapter_config.json").write_text(json.dumps(cfg))
    return root


def hostile_copy(ckpt: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    return copy


def test_control_the_unmodified_copy_runs(trainer_checkpoint, tmp_path):
    """Precondition of every refusal below: the same checkpoint without the hostile file is probed (exit 0)."""
    code, stderr, wall, rss = run_probe(hostile_copy(trainer_checkpoint, tmp_path), tmp_path / "out")
    assert code == 0, stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "completed"  # and the recipe came from training_args.bin (GRPOConfig's field):
    assert summary["provenance/settings"]["sampling.max_new_tokens"]["origin"] == "checkpoint (max_completion_length)"
    assert rss <= RSS_LIMIT_BYTES, rss


def _rewrite_training_args(ckpt: Path, **fields) -> None:
    args = torch.load(str(ckpt / "training_args.bin"), weights_only=False)  # written by this test: trusted here
    for key, value in fields.items():
        setattr(args, key, value)
    torch.save(args, str(ckpt / "training_args.bin"))


def test_shared_reference_bomb_in_training_args_bin(trainer_checkpoint, tmp_path):
    """The issue's file: an 8 KB training_args.bin whose field holds x = [x, x] forty times (2^40 leaves)."""
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    _rewrite_training_args(ckpt, temperature=shared_reference_bomb(40))
    # tol: exact the issue's file is "8 KB": 40 memoised lists add ~200 bytes to TRL's 7.6 KB file
    assert (ckpt / "training_args.bin").stat().st_size < ISSUE_FILE_BYTES
    assert_refused(ckpt, tmp_path, "training_args.bin", "shared references are expanded", "read_limits")


def test_self_containing_list_in_training_args_bin(trainer_checkpoint, tmp_path):
    """The issue's second file: a field holding a list that contains itself (was a RecursionError traceback)."""
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    _rewrite_training_args(ckpt, temperature=self_containing_list())
    assert_refused(ckpt, tmp_path, "training_args.bin", "contains itself")


def test_deep_nesting_in_training_args_bin(trainer_checkpoint, tmp_path):
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    deep: list = []
    for _ in range(200):
        deep = [deep]
    _rewrite_training_args(ckpt, temperature=deep)
    assert_refused(ckpt, tmp_path, "training_args.bin", "nests deeper than 64")


def test_compressed_record_in_training_args_bin(trainer_checkpoint, tmp_path):
    """A zip whose data.pkl is deflated: 64 KB on disk, 64 MiB once inflated (torch.save stores records raw)."""
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    with zipfile.ZipFile(ckpt / "training_args.bin", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"(" * (64 << 20))
    assert (ckpt / "training_args.bin").stat().st_size < 1 << 20
    assert_refused(ckpt, tmp_path, "training_args.bin", "inflates past")


def test_memo_slot_far_beyond_the_pickle_in_training_args_bin(trainer_checkpoint, tmp_path):
    """A 10-byte pickle that stores into memo slot 4*10^8: Python's C unpickler would zero-fill an 8*10^8-slot memo
    (6 GB) before reading on."""
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    with zipfile.ZipFile(ckpt / "training_args.bin", "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02]r" + (4 * 10**8).to_bytes(4, "little") + b".")
    assert_refused(ckpt, tmp_path, "training_args.bin", "memo slot")


def _rewrite_optimizer(ckpt: Path, value) -> None:
    blob = torch.load(str(ckpt / "optimizer.pt"), weights_only=True)
    state_dict = blob["state_dict"] if "state_dict" in blob else blob
    state_dict["param_groups"][0]["hostile"] = value
    torch.save(blob, str(ckpt / "optimizer.pt"))


@pytest.mark.parametrize("kind", ["shared_references", "cycle"])
def test_optimizer_pt_structure(trainer_checkpoint, tmp_path, kind):
    """torch.load(weights_only=True) accepts lists, so both shapes reach the walk after it."""
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    _rewrite_optimizer(ckpt, shared_reference_bomb(40) if kind == "shared_references" else self_containing_list())
    needle = "shared references are expanded" if kind == "shared_references" else "contains itself"
    assert_refused(ckpt, tmp_path, "optimizer.pt", needle)


def test_scheduler_pt_structure(trainer_checkpoint, tmp_path):
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    torch.save({"base_lrs": [1e-3], "_last_lr": [1e-3], "hostile": shared_reference_bomb(40)},
               str(ckpt / "scheduler.pt"))
    assert_refused(ckpt, tmp_path, "scheduler.pt", "shared references are expanded")


def test_pickle_record_size_bound_and_its_override(trainer_checkpoint, tmp_path):
    """The byte bound on a torch file's pickle record, named with its override; the override then lets it through
    to the next check (so the bound, not something else, refused it)."""
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    record = max(i.file_size for i in zipfile.ZipFile(ckpt / "optimizer.pt").infolist()
                 if i.filename.endswith("data.pkl"))
    low = record / 2 / (1 << 20)
    error = assert_refused(ckpt, tmp_path, "optimizer.pt", "pickle record",
                           extra=(f"checkpoint.read_limits=pickle_mib={low}",))
    assert 'checkpoint.read_limits="pickle_mib=<larger>"' in error
    code, stderr, _, _ = run_probe(ckpt, tmp_path / "out2", f"checkpoint.read_limits=pickle_mib={2 * record / 2**20}")
    assert code == 0, stderr[-3000:]


def test_trainer_state_json(trainer_checkpoint, tmp_path):
    """Deep nesting (json's parser would raise RecursionError) and a too-large file (bound lowered to 1 KiB)."""
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    (ckpt / "trainer_state.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_refused(ckpt, tmp_path, "trainer_state.json", "nests deeper")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": [{"loss": 0.0}] * 200}))
    assert_refused(ckpt, tmp_path, "trainer_state.json", "larger than",
                   extra=(f"checkpoint.read_limits=trainer_state_mib={1 / 1024}",))


def test_adapter_config_json(toy_checkpoint, trainer_checkpoint, tmp_path):
    """A 5000-digit integer (Python's int parser refuses past 4300: a ValueError, not a JSONDecodeError), and the
    file replaced by /dev/zero (endless) or by a FIFO nobody writes (opening it blocks forever): refused before
    opening (in probe_dist's layout, whose reader takes an adapter_config.json that exists — HF Trainer's takes
    only a regular file and calls anything else absent)."""
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg)[:-1] + ', "r2": ' + "9" * 5000 + "}")
    assert_refused(ckpt, tmp_path, "adapter_config.json", "cannot read")
    shutil.rmtree(ckpt)
    ckpt = hostile_copy(toy_checkpoint, tmp_path)  # probe_dist's layout reads any adapter_config.json that exists
    (ckpt / "adapter_config.json").unlink()
    (ckpt / "adapter_config.json").symlink_to("/dev/zero")
    assert_refused(ckpt, tmp_path, "adapter_config.json", "not a regular file")
    (ckpt / "adapter_config.json").unlink()
    os.mkfifo(ckpt / "adapter_config.json")  # no writer: opening it would block forever
    assert_refused(ckpt, tmp_path, "adapter_config.json", "not a regular file")


def test_base_config_json_deeply_nested(toy_checkpoint, trainer_checkpoint, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(toy_checkpoint / "base", base)
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
    config = json.loads((base / "config.json").read_text())
    deep: dict = {}
    for _ in range(100):
        deep = {"a": deep}
    config["hostile"] = deep
    (base / "config.json").write_text(json.dumps(config))
    before = tree_digest(base)
    assert_refused(ckpt, tmp_path, "config.json", "nests deeper than 64")
    assert tree_digest(base) == before


def test_safetensors_header_length(trainer_checkpoint, tmp_path):
    """An adapter file whose first 8 bytes declare a 1 TiB header (the library would try to read it)."""
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    path = ckpt / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    path.write_bytes(bytes(data))
    assert_refused(ckpt, tmp_path, "adapter_model.safetensors", "header")


def test_tokenizer_file_size_bound(trainer_checkpoint, tmp_path):
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    tokenizer = next(p for p in (ckpt / "tokenizer").iterdir() if p.name == "tokenizer.json")
    size_mib = tokenizer.stat().st_size / (1 << 20)
    assert_refused(ckpt, tmp_path, "tokenizer.json", "larger than",
                   extra=(f"checkpoint.read_limits=tokenizer_mib={size_mib / 2}",))


def test_read_limits_are_checked(trainer_checkpoint, tmp_path):
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    for bad, needle in (("nonsense=1", "is not name=value"), ("depth=-1", "must be > 0"),
                        ("depth=100000", "at most 500"), ("json_mib=many", "is not a number"),
                        ("json_mib=inf", "finite"), ("depth=1.5", "whole number")):
        assert_refused(ckpt, tmp_path, needle, extra=(f"checkpoint.read_limits={bad}",))


# ------------------------------------------------------------------------------------------------ damaged values
# Files within the size bounds whose values no trainer writes. Each mutation edits a copy of the HF-Trainer-layout
# checkpoint; each must end in exit 2 with a readable paragraph naming the file (found by a fresh-user trial: each
# of these was a traceback, hours of work, gigabytes, or a completed run on the wrong model).


def _json_edit(name: str, **fields):
    def mutate(ckpt: Path) -> None:
        data = json.loads((ckpt / name).read_text())
        data.update(fields)
        (ckpt / name).write_text(json.dumps(data))
    return mutate


def _optimizer_edit(edit):
    def mutate(ckpt: Path) -> None:
        blob = torch.load(str(ckpt / "optimizer.pt"), weights_only=True)
        edit(blob["state_dict"] if "state_dict" in blob else blob)
        torch.save(blob, str(ckpt / "optimizer.pt"))
    return mutate


def _first_state(sd: dict) -> dict:
    return sd["state"][next(iter(sd["state"]))]


def _deflated_record(ckpt: Path) -> None:
    """optimizer.pt with its byteorder record deflated: 64 MiB inflated from ~64 KB (torch.save stores records)."""
    path = ckpt / "optimizer.pt"
    records = {i.filename: zipfile.ZipFile(path).read(i) for i in zipfile.ZipFile(path).infolist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in records.items():
            if name.endswith("byteorder"):
                archive.writestr(name, b"l" * (64 << 20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                archive.writestr(name, data, compress_type=zipfile.ZIP_STORED)


def _adapter_without_weights(ckpt: Path) -> None:
    """An adapter file holding one of its tensors: peft only warns and starts the others fresh."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ckpt / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    save_file({first: tensors[first]}, str(ckpt / "adapter_model.safetensors"))


def _base_elsewhere(ckpt: Path, edit) -> None:
    """A copy of the base next to the checkpoint, edited, and named by adapter_config.json."""
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    base = ckpt.parent / "base"
    shutil.copytree(cfg["base_model_name_or_path"], base)
    edit(base)
    cfg["base_model_name_or_path"] = str(base)
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg))


def _long_shard_name(base: Path) -> None:
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "s" * 300}}))


def _nan_config(base: Path) -> None:
    cfg = json.loads((base / "config.json").read_text())
    cfg["rms_norm_eps"] = float("nan")
    (base / "config.json").write_text(json.dumps(cfg))


DAMAGED = {
    "optimizer_lr_beyond_a_float": (_optimizer_edit(lambda sd: sd["param_groups"][0].update(lr=10**400)),
                                    ("optimizer.pt", "integer of 1329 bits")),
    "optimizer_params_not_ids": (_optimizer_edit(lambda sd: sd["param_groups"][0].update(params=[[0]])),
                                 ("optimizer.pt", "malformed")),
    "optimizer_stride_zero_view": (_optimizer_edit(lambda sd: _first_state(sd).update(
        exp_avg=torch.zeros(1).expand(2**40))), ("optimizer.pt", "over a storage of 1 elements")),
    "optimizer_deflated_record": (_deflated_record, ("optimizer.pt", "compressed record")),
    "scheduler_lr_beyond_a_float": (lambda c: torch.save({"base_lrs": [10**400], "_last_lr": [1e-3]},
                                                         str(c / "scheduler.pt")), ("scheduler.pt", "integer of")),
    "adapter_config_nan_alpha": (_json_edit("adapter_config.json", lora_alpha=float("nan")),
                                 ("adapter_config.json", "NaN or infinite")),
    "adapter_missing_tensors": (_adapter_without_weights, ("adapter_model.safetensors", "lacks")),
    "adapter_base_name_too_long": (_json_edit("adapter_config.json", base_model_name_or_path="b" * 300),
                                   ("neither a local folder",)),
    "base_config_nan": (lambda c: _base_elsewhere(c, _nan_config), ("config.json", "NaN or infinite")),
    "base_index_shard_name_too_long": (lambda c: _base_elsewhere(c, _long_shard_name), ("cannot be looked up",)),
    "chat_template_sparse_3_gib": (lambda c: os.truncate(_touch(c / "tokenizer" / "chat_template.jinja"), 3 << 30),
                                   ("chat_template.jinja", "larger than 16 MiB")),
    "trainer_state_many_objects": (lambda c: (c / "trainer_state.json").write_text("[" + "{}," * 5000 + "{}]"),
                                   ("trainer_state.json", "objects and arrays")),
}


def _touch(path: Path) -> Path:
    path.touch()
    return path


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_values_are_refused_readably(trainer_checkpoint, tmp_path, case):
    mutate, needles = DAMAGED[case]
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    mutate(ckpt)
    extra = ("checkpoint.read_limits=objects=1000",) if case == "trainer_state_many_objects" else ()
    assert_refused(ckpt, tmp_path, *needles, extra=extra)


@pytest.mark.parametrize("case", ["log_history_not_a_list", "generation_kwargs_deep_string"])
def test_odd_but_harmless_values_do_not_crash(trainer_checkpoint, tmp_path, case):
    """Values the probe does not need: ignored (exit 0), never a traceback."""
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    if case == "log_history_not_a_list":
        _json_edit("trainer_state.json", log_history=7)(ckpt)
    else:
        _rewrite_training_args(ckpt, generation_kwargs="[" * 100_000)
    code, stderr, _, _ = run_probe(ckpt, tmp_path / "out")
    assert code == 0 and "Traceback" not in stderr, stderr[-3000:]


def test_long_error_text_is_shortened(trainer_checkpoint, tmp_path):
    """A value echoed from a damaged file (here a 500,000-character optimizer name) keeps the paragraph short."""
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    _rewrite_training_args(ckpt, optim="x" * 500_000)
    code, stderr, _, _ = run_probe(ckpt, tmp_path / "out")
    error = stderr[stderr.index("error: "):]
    assert code == 2 and "Traceback" not in stderr and len(error) < 5000 and "characters left out" in error, error[:300]


# ------------------------------------------------------------------------------------------------ pure functions


def test_structure_walk_is_linear_in_distinct_containers():
    """The walk visits each distinct container once: the 2^40 bomb is refused, a 2^10 one (1,023 lists, 2,047
    expanded nodes... with 1,024 empty leaves) passes and reports nothing, both in well under a second."""
    from probe_dist.state import bounds

    start = time.monotonic()
    with pytest.raises(bounds.ReadLimitError, match="shared references"):
        bounds.check_structure(shared_reference_bomb(40), "f", "the file")
    bounds.check_structure(shared_reference_bomb(10), "f", "the file")
    assert time.monotonic() - start < WALL_LIMIT_S
    with bounds.using("expanded=2000"), pytest.raises(bounds.ReadLimitError, match="2,000 elements"):
        bounds.check_structure(shared_reference_bomb(10), "f", "the file")  # 2,047 nodes expanded
    with bounds.using("expanded=2047"):
        bounds.check_structure(shared_reference_bomb(10), "f", "the file")
    assert bounds.limits() == bounds.DEFAULTS


@pytest.mark.parametrize("which", ["toy", pytest.param("trl", marks=pytest.mark.slow)])
def test_real_files_are_far_inside_the_bounds(which, request):
    """The headroom the defaults claim, measured on the files at hand: depth, containers and expanded size of
    training_args.bin, optimizer.pt, scheduler.pt and the JSON files at least 10x below each bound. The TRL
    checkpoint's case is slow (it trains one)."""
    trainer_checkpoint = request.getfixturevalue("trainer_checkpoint" if which == "toy" else "trl_checkpoint")
    from probe_dist.state import bounds
    from probe_dist.state.restricted_pickle import _RecordingUnpickler, _references

    def measure(obj, children):
        sizes, depth = {}, [0]

        def visit(node, d):
            depth[0] = max(depth[0], d)
            refs = children(node)
            if refs is None:
                return 1
            if id(node) not in sizes:
                sizes[id(node)] = 1 + sum(visit(c, d + 1) for c in refs)
            return sizes[id(node)]

        return depth[0] if visit(obj, 0) else 0, len(sizes), visit(obj, 0)

    with zipfile.ZipFile(trainer_checkpoint / "training_args.bin") as archive:
        record = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    files = {"training_args.bin": (_RecordingUnpickler(io.BytesIO(record)).load(), _references)}
    for name in ("optimizer.pt", "scheduler.pt"):
        if (trainer_checkpoint / name).is_file():
            files[name] = (torch.load(str(trainer_checkpoint / name), weights_only=True), bounds.containers)
    for name in ("adapter_config.json", "trainer_state.json", "training_args.json"):
        if (trainer_checkpoint / name).is_file():
            files[name] = (json.loads((trainer_checkpoint / name).read_text()), bounds.containers)
    assert len(files) >= 4, files.keys()
    d = bounds.DEFAULTS
    for name, (obj, children) in files.items():
        depth, distinct, expanded = measure(obj, children)
        assert 10 * depth <= d.depth and 10 * distinct <= d.objects and 10 * expanded <= d.expanded, name
    assert 10 * (trainer_checkpoint / "training_args.bin").stat().st_size <= d.training_args_mib * (1 << 20)


# ------------------------------------------------------------------------------------------------ SIGTERM


def _slow_optimizer_file(path: Path, opcodes: int) -> None:
    """`path` becomes an optimizer.pt whose pickle record is `opcodes` BININT1 opcodes (each pushes a cached small
    int: ~8 bytes of memory, ~1 µs of torch's weights_only unpickler) then an empty dict: a regular file that takes
    tens of seconds to load and is then refused (not an optimizer state) — a file slow to read."""
    buf = io.BytesIO()
    torch.save({}, buf)
    template = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    record = b"\x80\x02" + b"K\x00" * opcodes + b"}."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info in template.infolist():
            archive.writestr(info.filename, record if info.filename.endswith("data.pkl") else template.read(info))


def _children_of(pid: int) -> list[int]:
    """The process ids whose parent is `pid` (torchrun's workers), from /proc."""
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            out.append(int(status.parent.name))
    return out


def _stop_while_reading(ckpt: Path, out: Path, sig: int, nproc: int,
                        extra: tuple[str, ...]) -> tuple[subprocess.Popen, str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = [*launcher, "-m", "probe_dist.main", f"checkpoint.path={ckpt}", f"output.dir={out}", *SMALL,
           "distributed.timeout_s=120", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any("staging this run" in line for line in lines) or len(
            [line for line in lines if "staging this run" in line]) < nproc:
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.2)
    time.sleep(3.0)  # now every rank is reading the checkpoint (the optimizer file alone takes tens of seconds)
    assert proc.poll() is None, "".join(lines)[-3000:]
    sent = time.monotonic()
    for pid in (_children_of(proc.pid) if nproc > 1 else [proc.pid]):
        os.kill(pid, sig)  # every rank, as Slurm's scancel signals every process of the step (the torchrun agent
        # itself, when signalled, tears its workers down and exits 1 with its own traceback: torchrun's behaviour)
    try:
        proc.wait(timeout=WALL_LIMIT_S + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    return proc, "".join(lines), time.monotonic() - sent


@pytest.mark.parametrize(("sig", "nproc"), [pytest.param(signal.SIGTERM, 1, id="sigterm-one_process"),
                                            pytest.param(signal.SIGINT, 1, id="sigint-one_process",
                                                         marks=pytest.mark.slow),
                                            pytest.param(signal.SIGTERM, 2, id="sigterm-two_ranks",
                                                         marks=pytest.mark.slow)])
def test_stop_signal_while_a_file_is_slow_to_read(toy_checkpoint, tmp_path, sig, nproc):
    """A stop signal while the checkpoint is read — here an optimizer.pt whose 64 MiB pickle record (allowed by
    checkpoint.read_limits) takes tens of seconds to unpickle — ends the run within 30 s like at any other phase:
    exit 0, an `interrupted` summary (nothing computed, nothing to restore), no traceback, the checkpoint as it
    was. Not stopped, the same run would exit 2 once the record is read (not an optimizer state), so exit 0 with
    `interrupted_while: loading` is the signal's doing."""
    ckpt = hostile_copy(toy_checkpoint, tmp_path)
    _slow_optimizer_file(ckpt / "optimizer.pt", opcodes=32 << 20)
    before = tree_digest(ckpt)
    out = tmp_path / "out"
    proc, stderr, after_signal = _stop_while_reading(ckpt, out, sig, nproc, ("checkpoint.read_limits=pickle_mib=80",))
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert after_signal <= WALL_LIMIT_S, after_signal
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_while"] == "loading"
    assert summary["restore/verified_ranks"] == [True] * nproc and "entropy/base" not in summary
    assert tree_digest(ckpt) == before


def test_a_blocked_read_is_interrupted(tmp_path):
    """The mechanism for a read blocked in the kernel (a stalled network filesystem): within
    `signals.interruptible()` the handler raises out of the blocked system call (EINTR). A FIFO nobody writes
    stands in for the stalled file (the probe itself refuses FIFOs before opening them)."""
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    code = ("import sys\nfrom probe_dist.runtime import signals\nsignals.install()\nprint('reading', flush=True)\n"
            "try:\n    with signals.interruptible():\n        open(sys.argv[1], 'rb').read()\n"
            "except signals.StoppedWhileLoading as exc:\n    print('stopped', exc.signum)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(fifo)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "reading"
    time.sleep(1.0)  # now blocked in open(): no writer will ever come
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=WALL_LIMIT_S)
    assert out.strip() == f"stopped {int(signal.SIGTERM)}" and proc.returncode == 0


# ------------------------------------------------------------------------------------------------ real TRL


@pytest.fixture(scope="module")
def trl_checkpoint(toy_checkpoint, tmp_path_factory) -> Path:
    """A checkpoint-N that TRL's GRPOTrainer trained and saved (tests/helpers/train_trl.py, ~1 min)."""
    out = tmp_path_factory.mktemp("trl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(HELPERS / "train_trl.py"), str(toy_checkpoint / "base"),
                           str(toy_checkpoint / "tokenizer"), str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "checkpoint-2"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shared_references", "cycle"])
def test_issue_files_from_a_real_trl_checkpoint(trl_checkpoint, tmp_path, kind):
    ckpt = hostile_copy(trl_checkpoint, tmp_path)
    code, stderr, _, _ = run_probe(ckpt, tmp_path / "control")
    assert code == 0, stderr[-3000:]  # precondition: the real checkpoint itself is probed
    shutil.rmtree(tmp_path / "control")
    value = shared_reference_bomb(40) if kind == "shared_references" else self_containing_list()
    _rewrite_training_args(ckpt, temperature=value)
    # tol: exact the issue's file is "8 KB": 40 memoised lists add ~200 bytes to TRL's 7.6 KB file
    assert (ckpt / "training_args.bin").stat().st_size < ISSUE_FILE_BYTES
    assert_refused(ckpt, tmp_path, "training_args.bin",
                   "shared references are expanded" if kind == "shared_references" else "contains itself")
