"""Progress bars (output.progress) and experiment trackers (output.report_to), read back from what they wrote.

- Bars: each phase's last bar line says n/n with n the sequences that phase processed on the rank, computed here
  from the batch sizes and the phase's passes (an independent count, not the bar's own); none in the log files;
  none when stderr is not a terminal unless asked; under torchrun only rank 0 draws (each rank's stderr kept apart
  by torchrun's own --redirects).
- TensorBoard: the event file read back with tensorboard's EventAccumulator equals summary.json number for number
  (to float32 rounding: TensorBoard stores float32, relative error ≤ 2⁻²⁴ per value) at the checkpoint's training
  step, and the sweep series step by step.
- wandb (offline, the real package): the run file holds every key and the exact JSON text of each value that
  summary.json holds (wandb ≥ 0.2x has no public offline reader; the values are stored as JSON strings).
- A later run into the same output.dir replaces the tracker folders; a user's folder of that name is refused; a
  missing tracker package is refused before anything loads (exit 2); a failing tracker costs a warning only.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bad_inputs import run_in_process

REPO = Path(__file__).resolve().parents[1]
# E = 4 groups of 2, U = 2 groups of 2, η ∈ {0, 1e-4}: every phase runs, in a few seconds.
RUN = ["sampling.B_E=4", "sampling.G_E=2", "sampling.B_U=2", "sampling.G_U=2", "estimators.etas=[0,1e-4]", "device=cpu"]
BAR = re.compile(r"(?P<label>[\w =.\-η]+?): +100%\|[^|]*\| (?P<n>\d+)/(?P<total>\d+) seq")


def _final_bars(stderr: str) -> dict[str, tuple[int, int]]:
    """{bar label: (n, total)} of the last 100 % rendering of each bar (tqdm redraws with carriage returns)."""
    out = {}
    for line in re.split(r"[\r\n]", stderr):
        m = BAR.search(line)
        if m:
            out[m.group("label").strip()] = (int(m.group("n")), int(m.group("total")))
    return out


def _run(tmp_path: Path, capsys, *extra: str, out: str = "out") -> tuple[int, str, Path]:
    code, stderr = run_in_process([f"output.dir={tmp_path / out}", *RUN, *extra], capsys)
    return code, stderr, tmp_path / out


def test_progress_bars_count_every_phase_sequence(toy_checkpoint, tmp_path, capsys):
    code, stderr, out = _run(tmp_path, capsys, f"checkpoint.path={toy_checkpoint}", "output.progress=true")
    assert code == 0, stderr[-3000:]
    bars = _final_bars(stderr)
    e_rows, u_rows = 4 * 2, 2 * 2
    # Independent count of each phase's sequences: sampling draws E and U once; scoring and the sweep make one pass
    # over E per entry; the gradient one over U; δH₁ (forward mode) one over E; the explanation one over E and one
    # over U (its per-sequence δH₁ on U), plus ∇Ĥ's backward pass over E when δH₁ ran in forward mode.
    assert bars["sample"] == (e_rows + u_rows,) * 2
    assert bars["score_base"] == (e_rows,) * 2
    assert bars["update_gradient"] == (u_rows,) * 2
    assert bars["sweep η=0"] == bars["sweep η=0.0001"] == (e_rows,) * 2
    n, total = bars["delta_h1"]
    assert n == total and total % e_rows == 0 and total >= e_rows  # every pass it announced, finished
    n, total = bars["explain"]
    assert n == total and total >= e_rows + u_rows
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    log = (out / "probe.log").read_text()
    assert "\r" not in log and "seq [" not in log  # no bar in the log file


def test_no_bars_when_stderr_is_not_a_terminal(toy_checkpoint, tmp_path, capsys):
    code, stderr, _ = _run(tmp_path, capsys, f"checkpoint.path={toy_checkpoint}")  # output.progress: null
    assert code == 0, stderr[-3000:]
    assert not _final_bars(stderr) and "seq [" not in stderr
    code, stderr, _ = _run(tmp_path, capsys, f"checkpoint.path={toy_checkpoint}", "output.progress=false", out="o2")
    assert code == 0 and "seq [" not in stderr


def test_quiet_turns_off_the_bars_a_terminal_would_get(toy_checkpoint, tmp_path, capsys, monkeypatch):
    """output.progress null on a terminal draws bars; --quiet takes them away (and output.progress=true brings them
    back: an explicit request wins). The terminal is sys.stderr answering isatty() True."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, stderr, _ = _run(tmp_path, capsys, f"checkpoint.path={toy_checkpoint}")
    assert code == 0 and "sample" in _final_bars(stderr), stderr[-3000:]
    code, stderr, _ = _run(tmp_path, capsys, "--quiet", f"checkpoint.path={toy_checkpoint}", out="o2")
    assert code == 0 and not _final_bars(stderr) and "seq [" not in stderr, stderr[-3000:]
    code, stderr, _ = _run(tmp_path, capsys, "--quiet", f"checkpoint.path={toy_checkpoint}", "output.progress=true",
                           out="o3")
    assert code == 0 and "sample" in _final_bars(stderr), stderr[-3000:]


def test_bars_on_a_terminal_that_reports_no_size(toy_checkpoint, tmp_path):
    """A pseudo-terminal of 0 columns × 0 rows (what some job launchers hand a process): the default setting sees a
    terminal and must draw every phase's bar, full width — tqdm, left to itself, draws bars 0 wide and hides every
    bar as off screen when the terminal has 0 rows. A real subprocess on a real pty (os.openpty, size set to 0x0)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "probe_dist.main", f"checkpoint.path={toy_checkpoint}",
                             f"output.dir={tmp_path / 'out'}", *RUN], cwd=REPO, env=env, stdin=slave, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=600) == 0, b"".join(chunks)[-3000:]
    text = b"".join(chunks).decode(errors="replace")
    bars = _final_bars(text)
    assert {"sample", "score_base", "update_gradient", "delta_h1", "sweep η=0"} <= set(bars), text[-3000:]
    drawn = [line for line in re.split(r"[\r\n]", text) if BAR.search(line)]
    assert min(len(line) for line in drawn) >= 60, drawn[:3]  # 100 columns assumed, not 0


@pytest.mark.slow
def test_only_rank_zero_draws_bars(toy_checkpoint, tmp_path):
    """torchrun, 2 ranks, output.progress=true: rank 0's stderr has every phase's bar, rank 1's none (torchrun's
    --redirects writes each rank's stderr to its own file)."""
    logs = tmp_path / "logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--redirects=2",
           f"--log-dir={logs}", "-m", "probe_dist.main", f"checkpoint.path={toy_checkpoint}",
           f"output.dir={tmp_path / 'out'}", *RUN, "distributed.strategy=ddp", "output.progress=true",
           "memory.microbatch_generate=4"]  # blocks of 2 groups: E's 4 groups are 2 blocks, one per rank
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    assert sorted(per_rank) == [0, 1]
    bars = _final_bars(per_rank[0])
    assert {"sample", "score_base", "update_gradient", "delta_h1", "sweep η=0"} <= set(bars)
    assert bars["score_base"] == (2 * 2,) * 2  # rank 0's share: one block, 2 of E's 4 groups of 2
    assert "seq [" not in per_rank[1]


def _event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _close32(a: float, b: float) -> bool:
    """b is a's float32 rounding: |a − b| ≤ 2⁻²⁴·|a| (+ the smallest normal float32 for values near 0)."""
    if math.isnan(a):
        return math.isnan(b)
    if math.isinf(a):
        return a == b
    # tol: fp float32 round-to-nearest of a float64: relative error ≤ 2⁻²⁴ (unit roundoff), + the smallest normal
    return abs(a - b) <= 2.0 ** -24 * abs(a) + 1.2e-38


def test_tensorboard_holds_the_summary_and_the_sweep(toy_checkpoint, tmp_path, capsys):
    from probe_dist.report.trackers import scalars

    code, stderr, out = _run(tmp_path, capsys, f"checkpoint.path={toy_checkpoint}", "output.report_to=tensorboard")
    assert code == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    step = summary["provenance/checkpoint_source"]["global_step"]
    assert isinstance(step, int) and step > 0  # the toy records its training step
    events = _event_scalars(out / "tensorboard")
    expected = scalars(summary)
    # the flattening itself, against the summary by hand
    assert expected["entropy/base"] == summary["entropy/base"]
    assert expected["restore/verified"] == 1.0
    assert expected["provenance/phase_seconds/sample"] == summary["provenance/phase_seconds"]["sample"]
    assert not any(k.startswith("sweep") for k in expected)
    tracker_only = {k for k in events if not k.startswith("sweep/")}
    assert tracker_only == set(expected)
    for key, value in expected.items():
        assert [s for s, _ in events[key]] == [step], key
        assert _close32(value, events[key][0][1]), (key, value, events[key])
    for field in ("eta", "delta_h_true", "delta_h_true_se", "delta_h1", "ess_frac", "kl"):
        series = events[f"sweep/{field}"]
        assert [s for s, _ in series] == list(range(len(summary["sweep"])))
        for (_, got), row in zip(series, summary["sweep"]):
            assert _close32(row[field], got), (field, row[field], got)
    # A second run into the same output.dir replaces the tracker folder with everything else.
    code, stderr, out = _run(tmp_path, capsys, f"checkpoint.path={toy_checkpoint}", "output.report_to=tensorboard")
    assert code == 0, stderr[-3000:]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_wandb_offline_run_holds_the_numbers(toy_checkpoint, tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, stderr, out = _run(tmp_path, capsys, f"checkpoint.path={toy_checkpoint}", "output.report_to=wandb")
    assert code == 0, stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").rglob("*"))
    assert f"wandb sync {runs[0]}" in stderr  # the published path, not the staging directory's
    data = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("entropy/base", "delta_h1/per_eta", "update/u_norm", "restore/verified"):
        assert key.encode() in data, key
        assert json.dumps(summary[key]).encode() in data, (key, summary[key])
    for row in summary["sweep"]:
        assert json.dumps(row["delta_h_true"]).encode() in data and json.dumps(row["eta"]).encode() in data
    assert b"sweep/delta_h1" in data


def test_a_users_folder_named_like_a_tracker_is_refused(toy_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "mine.txt").write_text("not the probe's")
    code, stderr, _ = _run(tmp_path, capsys, f"checkpoint.path={toy_checkpoint}", "output.report_to=tensorboard")
    assert code == 2 and "tensorboard/" in stderr and "did not write" in stderr
    assert (out / "tensorboard" / "mine.txt").read_text() == "not the probe's"


@pytest.mark.parametrize("added", ["notes.txt", "events.out.tfevents.my-own-experiment", "runs/a/data.csv"])
def test_a_users_file_in_the_probes_tracker_folder_is_refused(toy_checkpoint, tmp_path, capsys, added):
    """The probe's own tensorboard/ (marker and event files) with a user's file added — any name, even one the
    tracker itself would write, at any depth: replacing output.dir would delete it, so the run refuses, names it
    and leaves output.dir as it was."""
    code, stderr, out = _run(tmp_path, capsys, f"checkpoint.path={toy_checkpoint}", "output.report_to=tensorboard")
    assert code == 0, stderr[-3000:]
    (out / "tensorboard" / added).parent.mkdir(parents=True, exist_ok=True)
    (out / "tensorboard" / added).write_text("mine")
    before = sorted((p.relative_to(out).as_posix(), p.stat().st_mtime_ns) for p in out.rglob("*"))
    code, stderr, _ = _run(tmp_path, capsys, f"checkpoint.path={toy_checkpoint}", "output.report_to=tensorboard")
    shown = added.split("/")[0] + "/" if "/" in added else added
    assert code == 2 and f"tensorboard/{shown}" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert (out / "tensorboard" / added).read_text() == "mine"
    assert sorted((p.relative_to(out).as_posix(), p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_missing_tracker_package_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code, stderr, out = _run(tmp_path, capsys, "checkpoint.path=/nonexistent", "output.report_to=tensorboard,wandb")
    assert code == 2  # refused on the tracker, before the (missing) checkpoint is even looked at
    assert "output.report_to" in stderr and "pip install wandb" in stderr and "/nonexistent" not in stderr
    assert not out.exists()


def test_a_failing_tracker_costs_a_warning_not_the_run(toy_checkpoint, tmp_path, capsys, monkeypatch):
    import torch.utils.tensorboard

    class Broken:
        def __init__(self, *args, **kwargs):
            raise OSError("disk quota exceeded")

    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", Broken)
    code, stderr, out = _run(tmp_path, capsys, f"checkpoint.path={toy_checkpoint}", "output.report_to=tensorboard")
    assert code == 0, stderr[-3000:]
    assert "logging to tensorboard failed (OSError: disk quota exceeded)" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert any("logging to tensorboard failed" in w for w in summary["warnings"]), summary["warnings"]
    assert not (out / "tensorboard").exists()  # nothing half-written published

