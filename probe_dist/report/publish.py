"""Stage a run's files next to `output.dir` and publish them as a whole: all of a run's files, or none.

For `output.dir = <parent>/<name>`, a run with id R writes every file — results and every rank's log — into the
staging directory `<parent>/.<name>.staging-R` (the same filesystem, so publishing is a rename). Only when the run
succeeds (status `completed` or `interrupted`) does rank 0 publish it:

    rename <parent>/<name>                  → <parent>/.<name>.old-R     (only if an earlier output.dir exists)
    rename <parent>/.<name>.staging-R       → <parent>/<name>
    delete <parent>/.<name>.old-R

so `output.dir` holds exactly one run's files at any time, and a failed run leaves it byte-identical to before
(`discard` removes the staging directory, or keeps only the logs in it). Nothing is ever written into an existing
`output.dir`; it is only ever renamed away, whole, by a run that has finished.

`check_output_dir` runs before anything is created and refuses, with an `OutputDirError` saying why: an
`output.dir` under a regular file, one that is itself a file, one that is not writable, and one holding entries the
probe does not write (a run replaces `output.dir` as a whole, so those would be deleted: `output.dir=$HOME` must
not wipe a home directory).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from probe_dist.errors import OutputDirError
from probe_dist.report.trackers import MARKER, TRACKERS, foreign_entries

log = logging.getLogger("probe_dist")

RESULT_FILES = frozenset({"summary.json", "config.yaml", "sequences.jsonl", "sequences.parquet", "delta_h.png",
                          "report.html", "update_vector.safetensors"})
_LOG_NAME = re.compile(r"probe(\.rank\d+)?\.log")


def log_name(rank: int) -> str:
    """The log file of `rank`: `probe.log` for rank 0, `probe.rankN.log` for the others."""
    return "probe.log" if rank == 0 else f"probe.rank{rank}.log"


def is_log(name: str) -> bool:
    """Whether `name` is a probe log file: `probe.log` or `probe.rankN.log`."""
    return _LOG_NAME.fullmatch(name) is not None


def is_probe_file(name: str) -> bool:
    """A file name the probe writes (or wrote: `*.tmp` leftovers of earlier versions' atomic writes)."""
    if name.endswith(".tmp"):
        name = name[: -len(".tmp")]
    return name in RESULT_FILES or is_log(name)


def _foreign_name(entry: os.DirEntry) -> str | None:
    """How an entry of output.dir that the probe did not write is named in the refusal; None for the probe's own
    files and for a tracker folder (output.report_to: `tensorboard/`, `wandb/`) holding just what an earlier run
    wrote there (its marker lists every path), which is replaced with the rest. A tracker-named folder with a
    user's file in it is named by that file's path."""
    if entry.is_file(follow_symlinks=False) and is_probe_file(entry.name):
        return None
    if entry.name in TRACKERS and entry.is_dir(follow_symlinks=False):
        folder = Path(entry.path)
        inside = foreign_entries(folder)
        if not inside and (folder / MARKER).is_file():
            return None
        return f"{entry.name}/{inside[0]}" if inside else f"{entry.name}/"
    return entry.name + ("/" if entry.is_dir() else "")


def new_run_id() -> str:
    """`YYYYmmdd-HHMMSS-<6 hex>`: sortable, and unique even for runs started in the same second."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def resolve_output_dir(path: str | os.PathLike) -> Path:
    """Absolute, symlinks resolved (a symlinked output.dir publishes into its target, keeping the link)."""
    return Path(path).expanduser().resolve()


def staging_path(out_dir: Path, run_id: str) -> Path:
    """`<parent>/.<name>.staging-<run_id>`: the staging directory of run `run_id` next to `out_dir`."""
    return out_dir.parent / f".{out_dir.name}.staging-{run_id}"


def old_path(out_dir: Path, run_id: str) -> Path:
    """`<parent>/.<name>.old-<run_id>`: where run `run_id` moves an earlier `out_dir` while publishing."""
    return out_dir.parent / f".{out_dir.name}.old-{run_id}"


def live_log(output_dir: str | os.PathLike, rank: int = 0) -> Path | None:
    """The log of the newest staged (running, or failed) run for `output_dir`, or None: to follow a run in progress,
    whose files appear in output.dir only once it has finished."""
    out_dir = resolve_output_dir(output_dir)
    found = sorted(out_dir.parent.glob(f".{glob_escape(out_dir.name)}.staging-*/{log_name(rank)}"))
    return found[-1] if found else None


def glob_escape(name: str) -> str:
    """`name` with the glob metacharacters *, ? and [ bracketed, so a glob pattern matches it literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)


@dataclass(frozen=True)
class Staging:
    """One run's staging directory. Picklable: rank 0 creates it and broadcasts it to every rank."""

    out_dir: Path                  # output.dir, resolved
    path: Path                     # <parent>/.<name>.staging-<run_id>
    run_id: str
    shown: str                     # output.dir as the user wrote it (for messages)
    created: tuple[Path, ...] = ()  # parent directories this run created, outermost first


def _nearest_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (as anything: a file under which nothing can be created, too)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def check_output_dir(out_dir: Path, shown: str) -> None:
    """Refuse an output.dir that cannot be staged next to and replaced; raises OutputDirError. Creates nothing."""
    if out_dir == out_dir.parent:
        raise OutputDirError(f"output.dir {shown!r} is the filesystem root; choose a directory below it.")
    existing = _nearest_existing(out_dir)
    if existing != out_dir:
        if not existing.is_dir():
            raise OutputDirError(f"output.dir {shown!r} cannot be created: {str(existing)!r} is a file, not a "
                                 "directory. Choose an output.dir that is not under a file.")
        if not _writable(existing):
            raise OutputDirError(f"output.dir {shown!r} cannot be created: {str(existing)!r} is not writable by "
                                 "this user. Choose an output.dir in a directory you can write to.")
        return
    if not out_dir.is_dir():
        raise OutputDirError(f"output.dir {shown!r} exists and is not a directory; choose another output.dir or "
                             "remove that file.")
    foreign = sorted(name for name in map(_foreign_name, os.scandir(out_dir)) if name is not None)
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputDirError(f"output.dir {shown!r} holds entries the probe did not write ({listed}). A run "
                             "replaces output.dir as a whole, so they would be deleted: move them away, or choose "
                             "a new or empty output.dir.")
    for where in (out_dir, out_dir.parent):
        if not _writable(where):
            raise OutputDirError(f"output.dir {shown!r} is not writable: {str(where)!r} does not allow this user to "
                                 "write (a run is staged next to output.dir and replaces it by renaming). Fix the "
                                 "permissions or choose another output.dir.")


def create_staging(out_dir: Path, run_id: str, shown: str) -> Staging:
    """Create the (missing parents and the) staging directory; an OSError that the user can fix → OutputDirError."""
    missing = []
    p = out_dir.parent
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    path = staging_path(out_dir, run_id)
    try:
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
            created.append(d)
        path.mkdir()
    except OSError as exc:
        for d in reversed(created):
            _rmdir_quietly(d)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.ENOSPC,
                         errno.EDQUOT, errno.ENOENT, errno.ENAMETOOLONG, errno.EINVAL, errno.ELOOP):
            raise OutputDirError(f"output.dir {shown!r} cannot be used: creating {str(exc.filename or path)!r} "
                                 f"failed ({exc.strerror}). Choose an output.dir you can write to.") from exc
        raise
    return Staging(out_dir=out_dir, path=path, run_id=run_id, shown=shown, created=tuple(created))


def prepare(output_dir: str, *, run_id: str | None = None) -> Staging:
    """Check output.dir and create this run's staging directory next to it (rank 0 only)."""
    out_dir = resolve_output_dir(output_dir)
    check_output_dir(out_dir, output_dir)
    return create_staging(out_dir, run_id or new_run_id(), output_dir)


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def discard(staging: Staging, *, keep_logs: bool) -> None:
    """A failed run: remove its staging directory (and the parents it created), or everything in it but the logs."""
    if not staging.path.is_dir():
        return
    if keep_logs:
        for entry in os.scandir(staging.path):
            if entry.is_file(follow_symlinks=False) and is_log(entry.name):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except OSError as exc:
                log.warning("could not remove %s from the staging directory: %s", entry.path, exc)
        return
    shutil.rmtree(staging.path, ignore_errors=True)
    if staging.path.exists():
        log.warning("could not remove the staging directory %s entirely; delete it by hand", staging.path)
        return
    for d in reversed(staging.created):
        _rmdir_quietly(d)


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not support fsync on directories
        pass
    finally:
        os.close(fd)


class PublishError(RuntimeError):
    """Publishing failed; output.dir is as it was before and the staged results are complete."""


def publish(staging: Staging) -> None:
    """Replace output.dir by the staging directory (rank 0, after every rank has finished writing).

    The files are flushed to disk first, so a crash right after the rename cannot publish empty files. If either
    rename fails, output.dir is restored and PublishError is raised (the staged results stay, complete). Failing
    to delete the earlier results afterwards only logs a warning: the new results are already published.
    """
    for entry in os.scandir(staging.path):
        if entry.is_file(follow_symlinks=False):
            _fsync(Path(entry.path))
    _fsync(staging.path, directory=True)
    out, old = staging.out_dir, old_path(staging.out_dir, staging.run_id)
    had_old = os.path.lexists(out)
    try:
        if had_old:
            os.rename(out, old)
        os.rename(staging.path, out)
    except OSError as exc:
        if had_old and not os.path.lexists(out):
            try:
                os.rename(old, out)
            except OSError as undo:
                raise PublishError(f"could not publish the results to output.dir {staging.shown!r} ({exc}), and "
                                   f"could not move the earlier results back from {str(old)!r} ({undo})") from exc
        raise PublishError(f"could not publish the results to output.dir {staging.shown!r}: {exc}") from exc
    _fsync(out.parent, directory=True)
    if had_old:
        shutil.rmtree(old, ignore_errors=True)
        if os.path.lexists(old):
            log.warning("published %s, but could not delete the earlier results moved to %s; delete them by hand",
                        out, old)
