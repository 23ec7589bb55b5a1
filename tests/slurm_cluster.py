"""A real, throw-away Slurm cluster on this machine, for tests of the sbatch scripts.

`local_slurm_cluster(workdir, nodes=2, cpus_per_node=2)` writes a slurm.conf under `workdir`, makes sure
munged runs, starts one slurmctld and one slurmd per node (Debian's Slurm supports several slurmd on one
host: `slurmd -N nodeX`, each on its own port), waits until every node is idle, and yields a
`LocalSlurmCluster` that submits batch scripts and waits for them. On exit it cancels its jobs and stops
exactly the daemons it started (pids from their pid files, checked against their command lines).

Needs root and the Debian packages slurmctld, slurmd, slurm-client and munge (scripts/install_slurm.sh);
works without systemd or cgroups (proctrack/linuxproc, task/none). No accounting, no /etc changes other
than creating /run/munge (and /etc/munge/munge.key when no key exists).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
MUNGE_KEY = Path("/etc/munge/munge.key")
TERMINAL_JOB_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
    "REVOKED",
}


class SlurmClusterError(RuntimeError):
    """The local cluster could not be started (the message carries the daemons' log tails)."""


def _sbin(tool: str) -> str:
    """Daemons live in /usr/sbin, which is not always on PATH."""
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise SlurmClusterError(f"{tool} not found; run scripts/install_slurm.sh")
    return found


def free_ports(count: int) -> list[int]:
    """Distinct TCP ports that are free right now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(missing)"


def _pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _read_pid(pid_file: Path, timeout: float = 10.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return int(pid_file.read_text().split()[0])
        time.sleep(0.1)
    return None


def _stop_pid(pid: int, must_contain: str, timeout: float = 15.0) -> None:
    """SIGTERM one daemon we started (only if its command line still is ours), SIGKILL if it lingers."""
    if not _pid_alive(pid) or must_contain not in _pid_cmdline(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _munge_works() -> bool:
    """True when a munged answers on the default socket (encode + decode a credential)."""
    munge, unmunge = shutil.which("munge"), shutil.which("unmunge")
    if not (munge and unmunge and MUNGE_SOCKET.exists()):
        return False
    try:
        cred = subprocess.run([munge, "-n"], capture_output=True, timeout=10, check=True).stdout
        subprocess.run([unmunge], input=cred, capture_output=True, timeout=10, check=True)
    except (subprocess.SubprocessError, OSError):
        return False
    return True


@dataclass
class LocalSlurmCluster:
    """Handle on a running local cluster; use `local_slurm_cluster()` to get one."""

    root: Path
    conf: Path
    node_names: list[str]
    cpus_per_node: int
    _started: list[tuple[Path, str]] = field(default_factory=list)  # (pid file, command-line marker)

    @property
    def env(self) -> dict[str, str]:
        """The caller's environment pointed at this cluster (stray SLURM_* job variables removed)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        return env

    def _run(self, args: Sequence[str], timeout: float = 30.0, check: bool = True) -> str:
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SlurmClusterError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def submit(
        self,
        script: str | Path,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        sbatch_options: Sequence[str] = (),
        workdir: str | Path | None = None,
        output: str | Path | None = None,
    ) -> str:
        """sbatch the script (with the given extra environment, exported to the job); returns the job id."""
        job_env = self.env
        job_env.update(env or {})
        output = Path(output) if output else self.root / "jobs" / "slurm-%j.out"
        output.parent.mkdir(parents=True, exist_ok=True)
        cmd = ["sbatch", "--parsable", f"--output={output}", "--export=ALL"]
        if workdir is not None:
            cmd.append(f"--chdir={workdir}")
        cmd += [*sbatch_options, str(script), *args]
        proc = subprocess.run(cmd, env=job_env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise SlurmClusterError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}\n{cmd}")
        return proc.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (empty once the job has been purged)."""
        out = self._run(["scontrol", "show", "job", "--oneliner", job_id], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float = 300.0, poll: float = 0.5) -> str:
        """Poll until the job reaches a terminal state; return it. On timeout cancel it and raise."""
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_info(job_id).get("JobState", state)
            if state in TERMINAL_JOB_STATES:
                return state
            time.sleep(poll)
        self._run(["scancel", job_id], check=False)
        raise TimeoutError(
            f"Slurm job {job_id} still {state} after {timeout:.0f} s (cancelled)\n{self.job_output(job_id)}"
        )

    def job_output_path(self, job_id: str) -> Path:
        path = self.job_info(job_id).get("StdOut")
        return Path(path) if path else self.root / "jobs" / f"slurm-{job_id}.out"

    def job_output(self, job_id: str, lines: int = 60) -> str:
        """Tail of the job's stdout/stderr file (for assertion messages)."""
        path = self.job_output_path(job_id)
        return f"--- {path} (last {lines} lines) ---\n{_tail(path, lines)}"

    def logs(self, lines: int = 30) -> str:
        """Tails of the daemons' logs."""
        parts = [f"--- slurmctld.log ---\n{_tail(self.root / 'log' / 'slurmctld.log', lines)}"]
        for node in self.node_names:
            parts.append(
                f"--- slurmd-{node}.log ---\n{_tail(self.root / 'log' / f'slurmd-{node}.log', lines)}"
            )
        parts.append(f"--- munged.log ---\n{_tail(Path('/var/log/munge/munged.log'), 10)}")
        return "\n".join(parts)

    def node_states(self) -> dict[str, str]:
        out = self._run(["sinfo", "--noheader", "--Node", "--format=%N %T"], check=False)
        return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.node_states()
            if all(states.get(node, "").rstrip("*~#") == "idle" for node in self.node_names):
                return
            time.sleep(0.5)
        raise SlurmClusterError(
            f"local Slurm nodes not idle after {timeout:.0f} s (states: {states or 'none'})\n{self.logs()}"
        )

    def _start_daemon(self, args: Sequence[str], pid_file: Path, what: str) -> None:
        """Run a self-daemonising command, record its pid file; raise with the logs if it fails."""
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        # Record before checking, so a half-started daemon is still stopped by the teardown.
        self._started.append((pid_file, str(self.conf) if "munged" not in what else str(pid_file)))
        if proc.returncode != 0 or _read_pid(pid_file) is None:
            raise SlurmClusterError(
                f"{what} did not start (exit {proc.returncode}): {proc.stderr.strip()}\n{self.logs()}"
            )

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons this object started, newest first."""
        if shutil.which("scancel") and any(marker == str(self.conf) for _, marker in self._started):
            with contextlib.suppress(Exception):
                self._run(["scancel", "--full", "--user", str(os.getuid())], check=False, timeout=15)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    out = self._run(["squeue", "--noheader", "--format=%i"], check=False, timeout=10)
                    if not out.strip():
                        break
                    time.sleep(0.5)
        for pid_file, marker in reversed(self._started):
            pid = _read_pid(pid_file, timeout=0.5)
            if pid is not None:
                _stop_pid(pid, marker)
        self._started.clear()


def _write_conf(root: Path, node_names: list[str], cpus_per_node: int) -> Path:
    ctld_port, *node_ports = free_ports(1 + len(node_names))
    for sub in ("state", "log", "jobs", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for node in node_names:
        (root / "spool" / node).mkdir(parents=True, exist_ok=True)
    node_lines = "\n".join(
        f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
        f"CPUs={cpus_per_node} RealMemory=1024 State=UNKNOWN"
        for node, port in zip(node_names, node_ports)
    )
    conf = root / "slurm.conf"
    conf.write_text(
        f"""# Generated by tests/slurm_cluster.py: a throw-away local cluster.
ClusterName=probetest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
StateSaveLocation={root}/state
SlurmctldPidFile={root}/slurmctld.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdPidFile={root}/slurmd-%n.pid
SlurmdSpoolDir={root}/spool/%n
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=600
KillWait=10
Waittime=0
{node_lines}
PartitionName=debug Nodes={",".join(node_names)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
    )
    return conf


def _ensure_munged(cluster: LocalSlurmCluster) -> None:
    """Reuse a working munged; otherwise start one as the munge user (recorded for the teardown)."""
    if _munge_works():
        return
    MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
    MUNGE_SOCKET.parent.chmod(0o755)
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["runuser", "-u", "munge", "--", _sbin("mungekey"), "--create", f"--keyfile={MUNGE_KEY}"],
            check=True,
            capture_output=True,
            timeout=30,
        )
    # The pid file name is unique to this cluster, so the teardown can tell our munged from any other.
    pid_file = MUNGE_SOCKET.parent / f"munged-{cluster.root.name}-{os.getpid()}.pid"
    cluster._start_daemon(
        ["runuser", "-u", "munge", "--", _sbin("munged"), f"--pid-file={pid_file}"], pid_file, "munged"
    )
    deadline = time.monotonic() + 10
    while not _munge_works():
        if time.monotonic() > deadline:
            raise SlurmClusterError(f"munged started but does not answer\n{cluster.logs()}")
        time.sleep(0.2)


@contextlib.contextmanager
def local_slurm_cluster(
    workdir: str | Path, nodes: int = 2, cpus_per_node: int = 2, ready_timeout: float = 60.0
) -> Iterator[LocalSlurmCluster]:
    """Bring up a local cluster under `workdir` (node1..nodeN, partition `debug`); tear it down on exit."""
    if os.geteuid() != 0:
        raise SlurmClusterError("a local Slurm cluster needs root (slurmd runs jobs as their owner)")
    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    node_names = [f"node{i}" for i in range(1, nodes + 1)]
    conf = _write_conf(root, node_names, cpus_per_node)
    cluster = LocalSlurmCluster(root=root, conf=conf, node_names=node_names, cpus_per_node=cpus_per_node)
    try:
        _ensure_munged(cluster)
        cluster._start_daemon([_sbin("slurmctld"), "-f", str(conf)], root / "slurmctld.pid", "slurmctld")
        for node in node_names:
            cluster._start_daemon(
                [_sbin("slurmd"), "-f", str(conf), "-N", node], root / f"slurmd-{node}.pid", f"slurmd {node}"
            )
        cluster._wait_idle(ready_timeout)
        yield cluster
    finally:
        cluster.stop()
