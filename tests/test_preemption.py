"""Pre-emption: SIGTERM mid-sweep ends every rank cleanly, restored, with a partial summary marked interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probe_dist.report.publish import live_log

REPO = Path(__file__).resolve().parents[1]
ETAS = [round(1e-4 * (k + 1), 6) for k in range(60)]


def _start(out: Path, ckpt: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "probe_dist.main", "--config", str(REPO / "configs/toy_cpu.yaml"), f"checkpoint.path={ckpt}",
           f"output.dir={out}", "distributed.strategy=ddp", "distributed.timeout_s=60", "sampling.B_E=4",
           "sampling.B_U=4", f"estimators.etas={ETAS}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_sweep(out: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = live_log(out)  # a running job's log is in its staging directory until it is published
        try:
            if log is not None and log.read_text().count("eta=") >= 2:
                return
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"probe ended before the sweep: {proc.stderr.read()[-2000:]}")
        time.sleep(0.3)
    pytest.fail("the sweep did not start in time")


def _workers(proc: subprocess.Popen) -> list[int]:
    ps = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "probe_dist.main"], capture_output=True, text=True)
    return [int(p) for p in ps.stdout.split()]


def _check_interrupted(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["restore/verified"] is True and summary["restore/verified_ranks"] == [True, True]
    done = [s["eta"] for s in summary["sweep"]]
    assert 1 <= len(done) < len(ETAS) and done == ETAS[: len(done)]  # the η values completed so far
    return summary


@pytest.mark.slow
def test_sigterm_to_every_rank_exits_cleanly(toy_checkpoint, tmp_path):
    """What Slurm does at a time limit (scancel --signal=TERM): every rank gets SIGTERM."""
    out = tmp_path / "run"
    proc = _start(out, toy_checkpoint)
    _wait_for_sweep(out, proc)
    workers = _workers(proc)
    assert len(workers) == 2
    sent = time.monotonic()
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60 + 30)
    assert time.monotonic() - sent < 60 + 30
    assert proc.returncode == 0, stderr[-3000:]  # every rank exited 0, so torchrun did too
    _check_interrupted(out)


@pytest.mark.slow
def test_sigterm_to_torchrun_is_forwarded(toy_checkpoint, tmp_path):
    """SIGTERM to the launcher: torchrun forwards it; ranks stop, restore, and rank 0 writes the summary."""
    out = tmp_path / "run"
    proc = _start(out, toy_checkpoint)
    _wait_for_sweep(out, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60 + 30)
    assert time.monotonic() - sent < 60 + 30
    _check_interrupted(out)
