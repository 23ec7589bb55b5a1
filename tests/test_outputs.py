"""Outputs are published as a whole: a run stages every file (every rank's log included) next to output.dir and
replaces output.dir only when it has finished; a failed run leaves output.dir byte-identical. Exit codes: 2 for a
user-input error (one paragraph, no traceback, nothing left behind), 1 for an internal error (logs kept, and the
message says where). Also the console table on partial summaries.

CLI subprocess tests on the toy checkpoint with tiny batches (~10 s a run on CPU), plus in-process unit tests.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from probe_dist.errors import OutputDirError, UserInputError
from probe_dist.report import publish as pub
from probe_dist.report.write import console_table, write_plot
from tests.test_cli import REPO, TOY_CPU, run_cli

SMALL = ["sampling.B_E=2", "sampling.B_U=2", "sampling.G_E=2", "sampling.G_U=2", "estimators.etas=[0,1e-4]"]


def probe_args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(TOY_CPU), f"checkpoint.path={ckpt}", f"output.dir={out}", *SMALL, *extra]


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root` → SHA-256 of its bytes ("dir" for directories): equal trees are byte-identical."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def siblings(out: Path) -> list[Path]:
    """Staging / old directories of `out` (hidden, next to it)."""
    return sorted(out.parent.glob(f".{out.name}.*"))


def error_paragraph(stderr: str) -> str:
    """The one `error:` paragraph a user-input error prints (everything before it is ordinary log lines)."""
    lines = stderr.rstrip("\n").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, stderr
    paragraph = lines[starts[0]:]
    assert all(line.strip() for line in paragraph), f"more than one paragraph:\n{stderr}"
    return "\n".join(paragraph)


@pytest.fixture(scope="module")
def published(toy_checkpoint, tmp_path_factory) -> Path:
    """One finished run: its output.dir, to be copied by the tests that rerun into an existing output.dir."""
    out = tmp_path_factory.mktemp("published") / "out"
    proc = run_cli(probe_args(toy_checkpoint, out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert siblings(out) == []  # nothing left next to it: the staging directory became output.dir
    return out


@pytest.fixture
def earlier(published, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(published, out)
    return out


# ------------------------------------------------------------------------------------------- success: replace all


@pytest.mark.slow
def test_rerun_replaces_every_file(toy_checkpoint, published, earlier):
    first_log = (earlier / "probe.log").read_text()
    # Files of earlier runs or versions that this run does not write: none may survive it.
    (earlier / "sequences.parquet").write_bytes(b"stale")
    (earlier / "summary.json.tmp").write_bytes(b"")
    (earlier / "probe.rank3.log").write_text("old rank 3\n")
    proc = run_cli(probe_args(toy_checkpoint, earlier, "sampling.seed=7"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(os.listdir(earlier)) == sorted(os.listdir(published))  # exactly the new run's set
    assert {"summary.json", "config.yaml", "sequences.jsonl", "probe.log"} <= set(os.listdir(earlier))
    summary = json.loads((earlier / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["provenance/seed"] == 7
    log = (earlier / "probe.log").read_text()
    assert log.count("probe_dist ") == 1 and log != first_log  # a fresh log: only the new run
    first_staging = re.search(r"staging this run in (\S+);", first_log).group(1)
    assert first_staging not in log and re.search(r"staging this run in (\S+);", log).group(1) != first_staging
    assert "status: completed" in proc.stdout
    assert siblings(earlier) == []  # neither the staging nor the old directory is left


# ------------------------------------------------------------------------------------------- failures: unchanged


@pytest.mark.slow
def test_internal_error_keeps_output_dir_and_the_logs(toy_checkpoint, earlier):
    before = tree(earlier)
    proc = run_cli(probe_args(toy_checkpoint, earlier, "debug.fault=0:update_gradient"))
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert tree(earlier) == before  # byte-identical
    assert "Traceback" in proc.stderr and "rank 0 failed: RuntimeError: injected fault" in proc.stderr
    [staging] = siblings(earlier)
    assert staging.name.startswith(".out.staging-")
    assert os.listdir(staging) == ["probe.log"]  # only the logs are kept
    assert "injected fault" in (staging / "probe.log").read_text()  # the log says why
    last = proc.stderr.rstrip().splitlines()[-1]
    expected = f"the logs of this run are in {staging.resolve()}; output.dir {earlier.resolve()} is unchanged."
    assert last == expected, proc.stderr[-2000:]


def test_interrupted_rerun_never_replaces_a_completed_run(toy_checkpoint, earlier):
    """Ctrl-C on a rerun: the completed run in output.dir is kept; the partial results stay in staging."""
    assert json.loads((earlier / "summary.json").read_text())["status"] == "completed"
    before = tree(earlier)
    proc = run_cli(probe_args(toy_checkpoint, earlier, "debug.signal=0:sample:SIGINT"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert tree(earlier) == before
    [staging] = siblings(earlier)
    assert json.loads((staging / "summary.json").read_text())["status"] == "interrupted"
    assert f"this run's partial results are in {staging.resolve()}" in proc.stderr


@pytest.mark.slow
def test_user_error_after_staging_leaves_nothing(toy_checkpoint, earlier, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "2+2="}\n')  # no answer
    before = tree(earlier)
    proc = run_cli(probe_args(toy_checkpoint, earlier, f"sampling.prompts={bad}"))
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert "answer" in error_paragraph(proc.stderr)
    assert tree(earlier) == before
    assert siblings(earlier) == []  # the staging directory is gone entirely


@pytest.mark.slow
def test_user_error_removes_the_parents_it_created(toy_checkpoint, tmp_path):
    """A missing reward package is a user error too; the directories created for output.dir go again."""
    if importlib.util.find_spec("math_verify") is not None:
        pytest.skip("math-verify is installed")
    out = tmp_path / "a" / "b" / "out"
    proc = run_cli(probe_args(toy_checkpoint, out, "sampling.reward=math_verify"))
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and "math-verify" in error_paragraph(proc.stderr)
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_full_disk_while_writing_leaves_output_dir_unchanged(toy_checkpoint, earlier):
    """ENOSPC halfway through the results (simulated in the writer): exit 1, output.dir as before, no *.tmp."""
    before = tree(earlier)
    script = textwrap.dedent(f"""
        import errno, sys
        import probe_dist.report.write as w
        def full(out_dir, summary):
            (out_dir / "summary.json").write_bytes(b"")  # what a full disk leaves: an empty file
            raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "summary.json"))
        w.write_summary = full
        from probe_dist.main import main
        sys.exit(main({probe_args(toy_checkpoint, earlier)!r}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "No space left on device" in proc.stderr
    assert tree(earlier) == before
    assert not list(earlier.glob("*.tmp"))
    [staging] = siblings(earlier)
    assert os.listdir(staging) == ["probe.log"]  # config.yaml, sequences.jsonl, the empty summary: removed


# ------------------------------------------------------------------------------------------- refused up front


@pytest.mark.parametrize("case", ["under_a_file", "is_a_file", "foreign_entries", "name_too_long"])
def test_unusable_output_dir_exits_2_before_anything(tmp_path, case):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file\n")
    if case == "name_too_long":  # NAME_MAX is 255 bytes on Linux filesystems: the staging directory cannot exist
        out, expected = tmp_path / ("x" * 300), "File name too long"
    elif case == "under_a_file":
        out, expected = blocker / "out", "is a file, not a directory"
    elif case == "is_a_file":
        out, expected = blocker, "exists and is not a directory"
    else:
        out, expected = tmp_path / "mine", "holds entries the probe did not write (notes.md, sub/)"
        (out / "sub").mkdir(parents=True)
        (out / "notes.md").write_text("keep me\n")
        (out / "summary.json").write_text("{}")
    before = tree(tmp_path)
    proc = run_cli(["--config", str(TOY_CPU), f"output.dir={out}", *SMALL])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr and proc.stdout == ""
    assert error_paragraph(proc.stderr) == proc.stderr.rstrip("\n")  # one paragraph and nothing else
    assert expected in proc.stderr, proc.stderr
    assert tree(tmp_path) == before  # nothing created, nothing changed


def test_cuda_without_cuda_exits_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    proc = run_cli(["--config", str(TOY_CPU), f"output.dir={out}", "device=cuda", *SMALL])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert error_paragraph(proc.stderr) == proc.stderr.rstrip("\n")
    assert "device=cuda" in proc.stderr and "no CUDA device" in proc.stderr
    assert not out.exists() and os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------- torchrun


def torchrun(n: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           "-m", "probe_dist.main", *args, "device=cpu", "distributed.strategy=ddp",
                           "distributed.timeout_s=60"], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_publishes_every_rank_log_and_a_failing_rank_changes_nothing(toy_checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = torchrun(2, probe_args(toy_checkpoint, out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {"probe.log", "probe.rank1.log", "summary.json"} <= set(os.listdir(out)) and siblings(out) == []
    assert "probe_dist " in (out / "probe.rank1.log").read_text()
    before = tree(out)
    proc = torchrun(2, probe_args(toy_checkpoint, out, "debug.fault=1:update_gradient"))
    assert proc.returncode != 0
    assert "rank 1 failed: RuntimeError: injected fault" in proc.stderr
    assert tree(out) == before
    [staging] = siblings(out)
    assert set(os.listdir(staging)) <= {"probe.log", "probe.rank1.log"}  # logs only (rank 0's may be cut short)
    assert "injected fault" in (staging / "probe.rank1.log").read_text()


# ------------------------------------------------------------------------------------------- publish (in process)


def staged(tmp_path: Path, files: dict[str, str]) -> pub.Staging:
    staging = pub.prepare(str(tmp_path / "out"), run_id="test")
    for name, text in files.items():
        (staging.path / name).write_text(text)
    return staging


def test_publish_creates_and_replaces(tmp_path):
    out = tmp_path / "out"
    pub.publish(staged(tmp_path, {"summary.json": "1", "probe.log": "run 1"}))
    assert sorted(os.listdir(out)) == ["probe.log", "summary.json"]
    (out / "sequences.parquet").write_text("stale")
    pub.publish(staged(tmp_path, {"summary.json": "2"}))
    assert os.listdir(out) == ["summary.json"] and (out / "summary.json").read_text() == "2"
    assert siblings(out) == []


def test_failed_publish_restores_output_dir(tmp_path, monkeypatch):
    out = tmp_path / "out"
    pub.publish(staged(tmp_path, {"summary.json": "1"}))
    before = tree(tmp_path)
    staging = staged(tmp_path, {"summary.json": "2"})
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # staging → output.dir
            raise OSError(errno.EIO, "I/O error")
        real_rename(src, dst)

    monkeypatch.setattr(pub.os, "rename", rename)
    with pytest.raises(pub.PublishError):
        pub.publish(staging)
    monkeypatch.undo()
    assert (out / "summary.json").read_text() == "1"
    assert (staging.path / "summary.json").read_text() == "2"  # the staged results stay, complete
    shutil.rmtree(staging.path)
    assert tree(tmp_path) == before


def test_discard_keeps_only_logs_or_nothing(tmp_path):
    staging = staged(tmp_path, {"probe.log": "0", "probe.rank1.log": "1", "config.yaml": "c", "summary.json": ""})
    (staging.path / "sub").mkdir()
    pub.discard(staging, keep_logs=True)
    assert sorted(os.listdir(staging.path)) == ["probe.log", "probe.rank1.log"]
    pub.discard(staging, keep_logs=False)
    assert os.listdir(tmp_path) == []


def test_output_dir_not_writable_is_refused(tmp_path, monkeypatch):
    """As root every directory is writable, so the permission answer is simulated."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(pub.os, "access", lambda path, mode: Path(path) != out)
    with pytest.raises(OutputDirError, match="is not writable"):
        pub.check_output_dir(out, str(out))
    monkeypatch.setattr(pub.os, "access", lambda path, mode: False)
    with pytest.raises(OutputDirError, match="cannot be created: .* is not writable"):
        pub.check_output_dir(tmp_path / "new" / "out", "new/out")
    assert issubclass(OutputDirError, UserInputError)


def test_live_log_finds_the_running_staging_log(tmp_path):
    staging = staged(tmp_path, {"probe.log": "running", "probe.rank1.log": "r1"})
    assert pub.live_log(tmp_path / "out") == staging.path / "probe.log"
    assert pub.live_log(tmp_path / "out", rank=1) == staging.path / "probe.rank1.log"
    assert pub.live_log(tmp_path / "other") is None


def test_probe_file_names():
    for name in ("summary.json", "summary.json.tmp", "probe.log", "probe.rank12.log", "sequences.parquet",
                 "update_vector.safetensors", "delta_h.png", "config.yaml"):
        assert pub.is_probe_file(name), name
    for name in ("notes.md", "probe.rank.log", "summary.json.bak", ".hidden"):
        assert not pub.is_probe_file(name), name


# ------------------------------------------------------------------------------------------- console table


FULL_ROW = {"eta": 1e-4, "delta_h_true": -3.9e-3, "delta_h_true_se": 8.8e-4, "delta_h1": -4.0e-3,
            "delta_h1_se": 9.0e-4, "ess": 3.9, "ess_frac": 0.98, "khat": None, "kl": 7.0e-6, "flags": []}


def test_console_table_interrupted_before_scoring():
    text = console_table({"status": "interrupted", "sweep": [], "restore/verified": True,
                          "restore/verified_ranks": [True], "provenance/seed": 1})
    assert "status: interrupted" in text and "not computed" in text
    assert "restore verified on all ranks: True" in text


@pytest.mark.parametrize("summary", [
    {},
    {"status": "interrupted"},
    {"status": "interrupted", "sweep": None},
    {"status": "interrupted", "entropy/base": 0.2},
    {"status": "interrupted", "entropy/base": None, "entropy/base_se": math.nan, "entropy/base_naive": math.inf},
    {"status": "interrupted", "update/u_norm": 3.0, "sweep": [{"eta": 0.0}, {"eta": None, "kl": None}, {}]},
    {"status": "completed", "sweep": [{k: None for k in FULL_ROW}, {k: math.nan for k in FULL_ROW}]},
    {"status": "completed", "sweep": [{**FULL_ROW, "ess_frac": "n/a"}], "warnings": None},
], ids=["empty", "status_only", "sweep_none", "entropy_only", "entropy_nan", "partial_rows", "rows_none_nan",
        "junk"])
def test_console_table_partial_summaries(summary):
    text = console_table(summary)
    assert f"status: {summary.get('status', 'unknown')}" in text.splitlines()[0]
    rows = [s for s in summary.get("sweep") or []]
    if rows:
        assert len(text.splitlines()) >= 2 + len(rows)


def test_console_table_full_and_warnings():
    summary = {"status": "completed", "entropy/base": 0.20315, "entropy/base_se": 0.033,
               "entropy/base_naive": 0.0396, "update/u_norm": 88.0, "delta_h1/per_eta": -39.9,
               "delta_h1/per_eta_se": 9.0, "restore/verified": True,
               "sweep": [{**FULL_ROW, "eta": 0.0}, {**FULL_ROW, "flags": ["weights overflow"]}],
               "warnings": ["η = 0.0001: weights overflow"]}
    lines = console_table(summary).splitlines()
    assert lines[0] == "entropy H(θ) = 0.20315 ± 0.033   (naive 0.0396)   status: completed"
    assert any(line.startswith(f"{0.0:>10.3g} ") for line in lines)
    assert any(line.startswith(f"{1e-4:>10.3g} ") and "-3.90000e-03" in line for line in lines)
    assert "warning: η = 0.0001: weights overflow" in lines
    del summary["warnings"]  # an older summary: the row flags are shown instead
    assert any("weights overflow" in line for line in console_table(summary).splitlines())


def test_plot_with_missing_values(tmp_path):
    pytest.importorskip("matplotlib")
    summary = {"sweep": [{"eta": 0.0}, {**FULL_ROW, "delta_h_true": None}, {"eta": 1e-3, "delta_h1": math.nan},
                         {"eta": None}]}
    assert write_plot(tmp_path, summary) == tmp_path / "delta_h.png"
    assert write_plot(tmp_path, {"status": "interrupted"}) is None
