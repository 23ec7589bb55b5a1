"""The sbatch scripts on a real Slurm cluster (two slurmd on this machine), in CPU mode.

The module starts one local cluster (tests/slurm_cluster.py) and submits slurm/probe_multinode.sbatch to
it: 2 nodes x 2 gloo ranks, rendezvous on 127.0.0.1. It needs root and Debian's Slurm packages, which
scripts/install_slurm.sh installs when missing; where that is impossible the tests skip with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from probe_dist.report.publish import live_log

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import LocalSlurmCluster, free_ports, local_slurm_cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MULTINODE = REPO / "slurm" / "probe_multinode.sbatch"
SINGLENODE = REPO / "slurm" / "probe_singlenode.sbatch"
HELPERS = REPO / "tests" / "helpers"
NODES, RANKS_PER_NODE, CPUS_PER_NODE = 2, 2, 2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _install_slurm_or_skip() -> None:
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (slurmd runs jobs as their owner)")
    try:
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / "install_slurm.sh")], capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"Slurm cannot be installed here: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"Slurm cannot be installed here: {(proc.stderr or proc.stdout).strip()}")


@pytest.fixture(scope="module")
def slurm_cluster():
    _install_slurm_or_skip()
    # A short path under /tmp: slurmd puts Unix sockets in its spool dir (108-byte path limit).
    root = Path(tempfile.mkdtemp(prefix="probe-slurm-"))
    with local_slurm_cluster(root, nodes=NODES, cpus_per_node=CPUS_PER_NODE) as cluster:
        yield cluster
    shutil.rmtree(root, ignore_errors=True)


def _job_env(output_root: Path, module: str, pythonpath: list[Path]) -> dict[str, str]:
    """What the sbatch script reads in CPU mode (sbatch exports the submitting environment)."""
    return {
        "PROBE_PYTHON": sys.executable,
        "PROBE_MODULE": module,
        "PROBE_CONFIG": str(REPO / "configs" / "toy_cpu.yaml"),
        "PROBE_DEVICE": "cpu",
        "PROBE_NPROC_PER_NODE": str(RANKS_PER_NODE),
        "PROBE_OUTPUT_ROOT": str(output_root),
        # Both "nodes" are this machine: node1 does not resolve, 127.0.0.1 does.
        "PROBE_RDZV_HOST": "127.0.0.1",
        "PROBE_MASTER_PORT": str(free_ports(1)[0]),
        "PYTHONPATH": os.pathsep.join(
            [str(p) for p in pythonpath]
            + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        ),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def _submit_multinode(cluster: LocalSlurmCluster, env: dict[str, str], args: list[str]) -> str:
    return cluster.submit(
        MULTINODE,
        args=args,
        env=env,
        sbatch_options=[
            f"--nodes={NODES}",
            "--ntasks-per-node=1",
            f"--cpus-per-task={CPUS_PER_NODE}",
            "--time=20:00",
        ],
        workdir=REPO,
    )


def _read_summary(cluster: LocalSlurmCluster, path: Path, job_id: str) -> dict:
    assert path.is_file(), f"job {job_id} wrote no {path}\n{cluster.job_output(job_id)}"
    return json.loads(path.read_text())



def _wait_while_running(cluster: LocalSlurmCluster, job_id: str, ready, what: str, timeout: float) -> None:
    """Poll until ready() while the job is still queued or running; fail if it ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        state = cluster.job_info(job_id).get("JobState", "")
        assert state in ("PENDING", "CONFIGURING", "RUNNING", ""), (
            f"job {job_id} ended {state} before {what}\n{cluster.job_output(job_id)}"
        )
        assert time.monotonic() < deadline, f"timed out waiting until {what}\n{cluster.job_output(job_id)}"
        time.sleep(0.2)


def _preempt(cluster: LocalSlurmCluster, job_id: str) -> None:
    """What Slurm does before a time limit (--signal=B:USR1@120): USR1 to the batch shell."""
    subprocess.run(
        ["scancel", "--batch", "--signal=USR1", job_id], env=cluster.env, check=True, capture_output=True, timeout=30
    )

def test_sbatch_multinode_echo(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    """The harness itself: 2 nodes x 2 ranks join one gloo group through the c10d rendezvous."""
    env = _job_env(tmp_path, "dist_echo", [HELPERS, REPO])
    started = time.monotonic()
    job_id = _submit_multinode(slurm_cluster, env, ["echo.passthrough=yes"])
    state = slurm_cluster.wait(job_id, timeout=240)
    elapsed = time.monotonic() - started
    assert state == "COMPLETED", f"job {job_id} ended {state}\n{slurm_cluster.job_output(job_id)}"

    summary = _read_summary(slurm_cluster, tmp_path / job_id / "summary.json", job_id)
    world_size = NODES * RANKS_PER_NODE
    assert summary["world_size"] == world_size
    assert summary["rank_sum"] == world_size * (world_size - 1) / 2
    assert summary["slurm_nodenames"] == [f"node{i}" for i in range(1, NODES + 1)]
    assert sorted(r["rank"] for r in summary["ranks"]) == list(range(world_size))
    # OMP threads per rank = cpus-per-task / ranks per node.
    assert {r["omp_num_threads"] for r in summary["ranks"]} == {str(max(1, CPUS_PER_NODE // RANKS_PER_NODE))}
    # Script arguments and CPU mode reach the module as overrides.
    assert f"output.dir={tmp_path / job_id}" in summary["argv"]
    assert "device=cpu" in summary["argv"] and "echo.passthrough=yes" in summary["argv"]
    print(f"multinode echo job {job_id}: {elapsed:.1f} s from submit to COMPLETED")


def test_sbatch_singlenode_echo(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    """The single-node script: one torchrun --standalone with 2 gloo ranks on one Slurm node."""
    env = _job_env(tmp_path, "dist_echo", [HELPERS, REPO])
    job_id = slurm_cluster.submit(
        SINGLENODE,
        args=["echo.passthrough=yes"],
        env=env,
        workdir=REPO,
        sbatch_options=["--nodes=1", f"--cpus-per-task={CPUS_PER_NODE}", "--time=20:00"],
    )
    state = slurm_cluster.wait(job_id, timeout=240)
    assert state == "COMPLETED", f"job {job_id} ended {state}\n{slurm_cluster.job_output(job_id)}"
    summary = _read_summary(slurm_cluster, tmp_path / job_id / "summary.json", job_id)
    assert summary["world_size"] == RANKS_PER_NODE
    assert summary["rank_sum"] == RANKS_PER_NODE * (RANKS_PER_NODE - 1) / 2
    assert len(summary["slurm_nodenames"]) == 1
    assert "device=cpu" in summary["argv"] and "echo.passthrough=yes" in summary["argv"]


def test_sbatch_forwards_preemption_signal(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    """SIGUSR1 to the batch shell (what --signal=B:USR1@120 sends) reaches every rank as SIGTERM."""
    env = _job_env(tmp_path, "dist_echo", [HELPERS, REPO])
    job_id = _submit_multinode(slurm_cluster, env, ["echo.wait_for_signal=180"])
    out_dir = tmp_path / job_id
    world_size = NODES * RANKS_PER_NODE

    _wait_while_running(
        slurm_cluster, job_id, lambda: len(list(out_dir.glob("ready.*"))) >= world_size, "all ranks were ready", 180
    )
    _preempt(slurm_cluster, job_id)
    state = slurm_cluster.wait(job_id, timeout=120)
    output = slurm_cluster.job_output(job_id)
    summary = _read_summary(slurm_cluster, out_dir / "summary.json", job_id)
    assert summary["signalled_ranks"] == world_size, output
    assert state != "TIMEOUT", output
    full_output = slurm_cluster.job_output_path(job_id).read_text(errors="replace")
    assert "received SIGUSR1" in full_output, output
    # The step was signalled, not killed: srun itself would turn SIGTERM into SIGKILL.
    assert "forcing job termination" not in full_output, output


# -- the real probe under Slurm vs a plain torchrun run ----------------------------------------------------

PROBE_OVERRIDES = ["sampling.B_E=6", "sampling.B_U=4", "distributed.strategy=ddp", "device=cpu"]
SWEEP_FIELDS = (
    "eta",
    "delta_h_true",
    "delta_h_true_se",
    "delta_h1",
    "delta_h1_se",
    "ess",
    "ess_frac",
    "khat",
    "kl",
)


def _numeric_leaves(value: object, prefix: str) -> dict[str, float]:
    if isinstance(value, bool):
        return {}
    if isinstance(value, int | float):
        return {prefix: float(value)}
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for key, sub in value.items():
            out.update(_numeric_leaves(sub, f"{prefix}/{key}"))
        return out
    if isinstance(value, list):
        out = {}
        for i, sub in enumerate(value):
            out.update(_numeric_leaves(sub, f"{prefix}[{i}]"))
        return out
    return {}


def _compared_values(summary: dict) -> dict[str, float]:
    """entropy/*, delta_h1* (flat slash keys or nested), and the listed fields of every sweep entry."""
    values: dict[str, float] = {}
    for key, value in summary.items():
        if key.startswith(("entropy", "delta_h1")):
            values.update(_numeric_leaves(value, key))
    for i, entry in enumerate(summary.get("sweep", [])):
        for name in SWEEP_FIELDS:
            if name in entry:
                values.update(_numeric_leaves(entry[name], f"sweep[{i}]/{name}"))
    return values


@pytest.mark.skipif(
    importlib.util.find_spec("probe_dist.main") is None, reason="probe_dist.main not available yet"
)
def test_sbatch_multinode_probe_matches_torchrun(
    slurm_cluster: LocalSlurmCluster, tmp_path: Path, toy_checkpoint: Path
) -> None:
    """The probe gives the same numbers on 2 Slurm nodes x 2 ranks as under one torchrun with 4 ranks."""
    world_size = NODES * RANKS_PER_NODE
    overrides = [*PROBE_OVERRIDES, f"checkpoint.path={toy_checkpoint}"]
    env = _job_env(tmp_path / "slurm", "probe_dist.main", [REPO])
    job_id = _submit_multinode(slurm_cluster, env, overrides)
    state = slurm_cluster.wait(job_id, timeout=480)
    assert state == "COMPLETED", f"job {job_id} ended {state}\n{slurm_cluster.job_output(job_id)}"
    slurm_summary = _read_summary(slurm_cluster, tmp_path / "slurm" / job_id / "summary.json", job_id)

    plain_dir = tmp_path / "torchrun"
    plain_env = {**slurm_cluster.env, **env, "OMP_NUM_THREADS": str(max(1, CPUS_PER_NODE // RANKS_PER_NODE))}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(world_size),
            "-m",
            "probe_dist.main",
            "--config",
            env["PROBE_CONFIG"],
            *overrides,
            f"output.dir={plain_dir}",
        ],
        cwd=REPO,
        env=plain_env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert proc.returncode == 0, f"torchrun failed\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    plain_summary = json.loads((plain_dir / "summary.json").read_text())

    slurm_values, plain_values = _compared_values(slurm_summary), _compared_values(plain_summary)
    assert slurm_values, f"nothing to compare in {sorted(slurm_summary)}"
    assert any(k.startswith("sweep[") for k in slurm_values), "summary has no sweep entries"
    assert slurm_values.keys() == plain_values.keys()
    # tol: fp the same ranks run the same float32/float64 ops on the same data on this one CPU; what placement may
    # change is the order of gloo's float64 all-reduces over 4 ranks: ≤ 3·u₆₄ = 3.3e-16 of Σ|x| per sum, times the
    # cancellation of the quantities built from the sums (ΔH_true at the smallest η: |Ĥ|/|ΔH| ≲ 1e4) ≲ 1e-11
    # relative; rel 1e-9 leaves 100× and still fails any real difference (a different sample, a missed rank: ≥ 1e-3).
    # abs 1e-12: the η = 0 entries are exactly 0 on both (their relative error is undefined).
    mismatches = {
        key: (slurm_values[key], plain_values[key])
        for key in slurm_values
        if not math.isclose(slurm_values[key], plain_values[key], rel_tol=1e-9, abs_tol=1e-12)  # tol: fp (above)
    }
    assert not mismatches, f"Slurm vs torchrun differ: {mismatches}"
    for summary in (slurm_summary, plain_summary):
        assert summary.get("provenance/world_size", world_size) == world_size


@pytest.mark.skipif(
    importlib.util.find_spec("probe_dist.main") is None, reason="probe_dist.main not available yet"
)
def test_sbatch_preemption_stops_probe_at_safe_point(
    slurm_cluster: LocalSlurmCluster, tmp_path: Path, toy_checkpoint: Path
) -> None:
    """Pre-emption warning mid-sweep: every rank stops at the next η, restores, and rank 0 writes a summary."""
    # A long η sweep (each η is one scoring pass over E), so the signal lands well inside it.
    etas = [0.0] + [1e-5 * (i + 1) for i in range(119)]
    overrides = [
        "sampling.B_E=16",
        "sampling.B_U=4",
        "distributed.strategy=ddp",
        "device=cpu",
        f"checkpoint.path={toy_checkpoint}",
        "estimators.etas=[" + ",".join(f"{eta:.6g}" for eta in etas) + "]",
    ]
    env = _job_env(tmp_path, "probe_dist.main", [REPO])
    job_id = _submit_multinode(slurm_cluster, env, overrides)

    def rank0_log_text() -> str:
        log = live_log(tmp_path / job_id)  # staged until the job publishes its outputs
        try:
            return log.read_text(errors="replace") if log is not None else ""
        except FileNotFoundError:
            return ""

    # The first sweep line (η = 0) is logged inside the run, after the stop handlers are installed.
    _wait_while_running(
        slurm_cluster,
        job_id,
        lambda: "eta=0 " in rank0_log_text(),
        "the sweep started",
        300,
    )
    _preempt(slurm_cluster, job_id)
    signalled_at = time.monotonic()
    state = slurm_cluster.wait(job_id, timeout=180)
    stop_seconds = time.monotonic() - signalled_at

    output = slurm_cluster.job_output(job_id)
    summary = _read_summary(slurm_cluster, tmp_path / job_id / "summary.json", job_id)
    assert summary["status"] == "interrupted", output
    assert summary["restore/verified"] is True, output
    assert 1 <= len(summary["sweep"]) < len(etas), output
    # tol: exact the run parses the .6g text it was given: its η are those floats, bit for bit (JSON round-trips them)
    sent = [float(f"{eta:.6g}") for eta in etas]
    assert [entry["eta"] for entry in summary["sweep"]] == sent[: len(summary["sweep"])]
    full_output = slurm_cluster.job_output_path(job_id).read_text(errors="replace")
    assert "forcing job termination" not in full_output, output
    print(
        f"pre-empted job {job_id}: {state} {stop_seconds:.1f} s after SIGUSR1, "
        f"{len(summary['sweep'])}/{len(etas)} etas done"
    )
