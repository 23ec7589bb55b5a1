"""A tiny stand-in for probe_dist.main, run under torchrun to test the launch harness (Slurm, torchrun).

    python -m torch.distributed.run ... -m dist_echo --config ANY output.dir=DIR [echo.wait_for_signal=SECONDS]

Every rank joins a gloo process group from the torchrun environment, all-reduces its rank (float64) and
gathers where it ran; rank 0 writes DIR/summary.json with the world size, the sum and the placement.
Arguments other than `output.dir=` and `echo.*` are accepted and ignored (like the probe's overrides).

With echo.wait_for_signal=S every rank writes DIR/ready.<rank>, then waits up to S seconds for SIGTERM
(what the sbatch scripts forward on pre-emption) and the summary records which ranks received it.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

_signalled = False


def _on_sigterm(signum: int, frame: object) -> None:
    global _signalled
    _signalled = True


def _parse_args(argv: list[str]) -> tuple[Path, float]:
    output_dir: Path | None = None
    wait_for_signal = 0.0
    for arg in argv:
        if arg.startswith("output.dir="):
            output_dir = Path(arg.split("=", 1)[1])
        elif arg.startswith("echo.wait_for_signal="):
            wait_for_signal = float(arg.split("=", 1)[1])
    if output_dir is None:
        raise SystemExit("dist_echo: pass output.dir=DIR")
    return output_dir, wait_for_signal


def main(argv: list[str]) -> None:
    output_dir, wait_for_signal = _parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    output_dir.mkdir(parents=True, exist_ok=True)

    rank_sum = torch.tensor([float(rank)], dtype=torch.float64)
    dist.all_reduce(rank_sum)

    if wait_for_signal > 0:
        dist.barrier()
        (output_dir / f"ready.{rank}").write_text(str(os.getpid()))
        deadline = time.monotonic() + wait_for_signal
        while not _signalled and time.monotonic() < deadline:
            time.sleep(0.05)
    signalled = torch.tensor([1.0 if _signalled else 0.0], dtype=torch.float64)
    dist.all_reduce(signalled)

    placement = {
        "rank": rank,
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "hostname": socket.gethostname(),
        "slurm_nodename": os.environ.get("SLURMD_NODENAME"),
        "slurm_procid": os.environ.get("SLURM_PROCID"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "signalled": _signalled,
    }
    placements: list[dict | None] = [None] * world_size
    dist.all_gather_object(placements, placement)

    if rank == 0:
        summary = {
            "world_size": world_size,
            "rank_sum": rank_sum.item(),
            "signalled_ranks": int(signalled.item()),
            "hostnames": sorted({p["hostname"] for p in placements if p}),
            "slurm_nodenames": sorted({str(p["slurm_nodename"]) for p in placements if p}),
            "ranks": placements,
            "argv": argv,
        }
        tmp = output_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(output_dir / "summary.json")

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
