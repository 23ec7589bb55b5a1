"""Experiment trackers (output.report_to): the summary's numbers once per run and the sweep as a series over η.

What is logged, for `tensorboard` (torch.utils.tensorboard, event files in output.dir/tensorboard/) and `wandb`
(files in output.dir/wandb/, project from WANDB_PROJECT, default "probe_dist"; WANDB_MODE=offline works as with
any wandb run):
- every numeric value of summary.json under its own slash name (`entropy/base`, `delta_h1/per_eta`, nested
  dicts joined with "/": `provenance/phase_seconds/sample`), booleans as 0/1, at step = the checkpoint's
  training step (`provenance/checkpoint_source.global_step`, 0 when unknown), so probes of several checkpoints
  of one training run line up on the training axis;
- the sweep: every numeric field of each η row under `sweep/<field>` (with `sweep/eta`), at step k for the k-th η
  (TensorBoard's steps are integers; wandb also gets `sweep/eta` as the series' x axis);
- the status and the resolved config as text (TensorBoard) or run config (wandb).

A tracker that fails while logging costs a warning, never the run: the numbers are in summary.json either way.
Like HF Trainer's `report_to`, this reproduces no tracker's format; it calls the trackers' own APIs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
from pathlib import Path

from probe_dist.errors import MissingDependencyError

log = logging.getLogger("probe_dist")

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # output.report_to name → the package it needs
MARKER = ".probe_dist"  # in a tracker folder the probe wrote: output.dir's check knows it is the probe's own


def _entries(folder: Path) -> set[str]:
    """Every path under `folder` relative to it (folders with a trailing "/"; links not followed), the marker
    left out."""
    out = set()
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out.update(f"{(rel / d).as_posix()}/" for d in dirs)
        out.update((rel / f).as_posix() for f in files)
    out.discard(MARKER)
    return out


def seal(folder: Path) -> None:
    """Write the marker of a tracker folder the probe has finished writing: it lists every entry then present,
    so a later run knows what it may replace."""
    entries = sorted(_entries(folder))
    (folder / MARKER).write_text(json.dumps({"written_by": "probe_dist (output.report_to)", "entries": entries},
                                            indent=0) + "\n")


def foreign_entries(folder: Path) -> list[str]:
    """Paths under a tracker-named folder (`tensorboard/`, `wandb/` in output.dir) that the probe's marker does
    not list, relative to it and sorted: what a user added (at any depth, whatever its name); every top-level
    entry when the folder has no readable marker (then it is not a probe's folder at all)."""
    try:
        listed = set(json.loads((folder / MARKER).read_text())["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(os.listdir(folder))
    return sorted(_entries(folder) - listed)


def requested(report_to: str) -> list[str]:
    """The trackers output.report_to names ("none", "tensorboard", "wandb" or "tensorboard,wandb"), in order."""
    return [t for t in (x.strip() for x in report_to.split(",")) if t and t != "none"]


def check_available(report_to: str) -> None:
    """Before anything loads: every requested tracker's package is importable; MissingDependencyError (exit 2,
    naming the pip command) otherwise."""
    missing = [TRACKERS[t] for t in requested(report_to) if importlib.util.find_spec(TRACKERS[t]) is None]
    if missing:
        raise MissingDependencyError(
            f"output.report_to={report_to!r} needs the package(s) {', '.join(missing)}, which are not installed in "
            f"this environment. Install them (pip install {' '.join(missing)}), or set output.report_to=none.")


def scalars(summary: dict, prefix: str = "") -> dict[str, float]:
    """{slash name: float} for every number (and boolean, as 0/1) of summary.json outside the sweep; nested dicts
    are joined with "/", lists and strings left out. Non-finite numbers are kept (trackers show NaN)."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if key == "sweep" and not prefix:
            continue
        if isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, int | float):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
    return out


def sweep_series(summary: dict) -> list[dict[str, float]]:
    """One {"sweep/<field>": float} per η row of summary.json's sweep, in the sweep's order (numbers only)."""
    return [{f"sweep/{k}": float(v) for k, v in row.items() if isinstance(v, int | float)}
            for row in summary.get("sweep") or []]


def training_step(summary: dict) -> int:
    """The checkpoint's training step (global_step of its trainer state), 0 when the checkpoint records none."""
    step = (summary.get("provenance/checkpoint_source") or {}).get("global_step")
    return int(step) if isinstance(step, int | float) and math.isfinite(step) and step >= 0 else 0


def log_run(report_to: str, summary: dict, out_dir: Path, *, config: dict, final_dir: Path) -> list[str]:
    """Send the run's numbers to every tracker in output.report_to (rank 0, into the staging directory
    `out_dir`). config: the resolved config as plain data; final_dir: output.dir, where the staging directory is
    published (its name is the tracker's run name). Returns one warning per tracker that failed (its folder is
    removed: nothing half-written is published); each finished folder is sealed with its marker."""
    warnings = []
    for tracker in requested(report_to):
        folder = Path(out_dir) / tracker
        try:
            {"tensorboard": _tensorboard, "wandb": _wandb}[tracker](summary, Path(out_dir), config, Path(final_dir))
            seal(folder)
        except Exception as exc:  # noqa: BLE001 - a tracker's failure must not cost the run; the numbers are kept
            shutil.rmtree(folder, ignore_errors=True)
            text = (f"output.report_to: logging to {tracker} failed ({type(exc).__name__}: {exc}); the results are "
                    "in summary.json and the other output files")
            log.warning("%s", text)
            warnings.append(text)
    return warnings


def _folder(out_dir: Path, name: str) -> Path:
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _tensorboard(summary: dict, out_dir: Path, config: dict, final_dir: Path) -> None:
    import yaml
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(_folder(out_dir, "tensorboard")))
    try:
        step = training_step(summary)
        for name, value in scalars(summary).items():
            writer.add_scalar(name, value, global_step=step)
        for k, row in enumerate(sweep_series(summary)):
            for name, value in row.items():
                writer.add_scalar(name, value, global_step=k)
        writer.add_text("status", str(summary.get("status")), global_step=step)
        writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", global_step=step)
    finally:
        writer.close()


def _wandb(summary: dict, out_dir: Path, config: dict, final_dir: Path) -> None:
    import wandb

    _folder(out_dir, "wandb")  # wandb writes into <dir>/wandb/
    run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "probe_dist", name=final_dir.name, job_type="entropy_probe",
                     dir=str(out_dir), config=config, reinit="create_new",
                     settings=wandb.Settings(silent=True))  # its paths name the staging directory, not output.dir
    where = Path(run.dir).parent.relative_to(out_dir)
    try:
        run.define_metric("sweep/eta")
        run.define_metric("sweep/*", step_metric="sweep/eta")
        for row in sweep_series(summary):
            run.log(row)
        run.summary.update({**scalars(summary), "status": summary.get("status"),
                            "training_step": training_step(summary)})
    finally:
        run.finish()
    offline = run.settings.mode in ("offline", "dryrun")
    log.info("output.report_to: wandb run %s%s", final_dir / where,
             f" (offline: upload it with `wandb sync {final_dir / where}`)" if offline else f" ({run.url})")
