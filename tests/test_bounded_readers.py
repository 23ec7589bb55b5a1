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
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else None
        out[str(path.relative_to(root))] = (st.st_mode, digest)
    return out


def run_probe(ckpt: Path, out: Path, *extra: str, timeout: float = 120.0) -> tuple[int, str, float, int]:
    """(exit code, stderr, wall seconds, peak RSS bytes) of the CLI on `ckpt`; the RSS is this child's own
    (os.wait4), not the maximum over every child the test process ever had."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "probe_dist.main", f"checkpoint.path={ckpt}", f"output.dir={out}", *SMALL, *extra]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    stderr = proc.stderr.read().decode("utf-8", "replace")
    proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, stderr, time.monotonic() - start, usage.ru_maxrss * 1024  # ru_maxrss: KiB on Linux


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
    file replaced by /dev/zero (endless: stopped at the byte bound; in probe_dist's layout, whose reader takes an
    adapter_config.json that exists — HF Trainer's takes only a regular file and calls anything else absent)."""
    ckpt = hostile_copy(trainer_checkpoint, tmp_path)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg)[:-1] + ', "r2": ' + "9" * 5000 + "}")
    assert_refused(ckpt, tmp_path, "adapter_config.json", "cannot read")
    shutil.rmtree(ckpt)
    ckpt = hostile_copy(toy_checkpoint, tmp_path)  # probe_dist's layout reads any adapter_config.json that exists
    (ckpt / "adapter_config.json").unlink()
    (ckpt / "adapter_config.json").symlink_to("/dev/zero")
    assert_refused(ckpt, tmp_path, "adapter_config.json", "larger than 16 MiB")


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
                        ("depth=100000", "at most 500"), ("json_mib=many", "is not a number")):
        assert_refused(ckpt, tmp_path, needle, extra=(f"checkpoint.read_limits={bad}",))


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


def _slow_fifo(path: Path, stop: threading.Event) -> threading.Thread:
    """`path` becomes a FIFO whose writer sends one byte a second and never finishes: a file slow to read (a
    stalled network filesystem); reading it blocks in the read system call."""
    os.mkfifo(path)

    def trickle():
        try:
            fd = os.open(path, os.O_WRONLY)  # blocks until the probe opens it for reading
        except OSError:
            return
        try:
            os.write(fd, b"{")
            while not stop.wait(1.0):
                os.write(fd, b" ")
        except OSError:  # the reader went away (BrokenPipe): the probe stopped
            pass
        finally:
            os.close(fd)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    return thread


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


def _stop_while_reading(ckpt: Path, out: Path, sig: int, nproc: int) -> tuple[subprocess.Popen, str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    cmd = [*launcher, "-m", "probe_dist.main", f"checkpoint.path={ckpt}", f"output.dir={out}", *SMALL,
           "distributed.timeout_s=120"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any("staging this run" in line for line in lines) or len(
            [line for line in lines if "staging this run" in line]) < nproc:
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.2)
    time.sleep(3.0)  # now every rank is blocked reading the FIFO (it never finishes)
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
    """SIGTERM while adapter_config.json is being read from a file that never finishes: the run stops within 30 s
    like at any other phase — exit 0, an `interrupted` summary (nothing computed, nothing to restore), no
    traceback — and the checkpoint is as it was."""
    ckpt = hostile_copy(toy_checkpoint, tmp_path)
    (ckpt / "adapter_config.json").unlink()
    stop = threading.Event()
    _slow_fifo(ckpt / "adapter_config.json", stop)
    before = tree_digest(ckpt)
    out = tmp_path / "out"
    try:
        proc, stderr, after_signal = _stop_while_reading(ckpt, out, sig, nproc)
    finally:
        stop.set()
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert after_signal <= WALL_LIMIT_S, after_signal
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_while"] == "loading"
    assert summary["restore/verified_ranks"] == [True] * nproc and "entropy/base" not in summary
    assert tree_digest(ckpt) == before


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
