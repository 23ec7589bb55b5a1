"""Pre-emption: SIGTERM / SIGUSR1 (Slurm time limit, scancel, torchrun forwarding) and SIGINT (Ctrl-C) request
a stop.

The handler only sets a flag; the probe checks it at safe points — after every prompt group of every phase and
between phases and η values — agrees on it across ranks with one all-reduce, restores the training state, and
writes a summary marked "interrupted". Installed at the very start of main() so a signal during model loading is
not fatal either.

Reading the checkpoint has no safe point (a read can block on a slow filesystem, a parse can run long), and
nothing read yet needs restoring: within `interruptible()` the handler raises `StoppedWhileLoading` at once — in
the middle of a blocking read (the system call returns EINTR and Python runs the handler) or of any Python loop —
and `assemble.build_probe` turns it into a stop agreed by every rank.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("probe_dist")
_requested = {"signal": None}
_interruptible = {"depth": 0}


class StopRequested(Exception):
    """A stop signal reached this job (pre-emption, time limit, Ctrl-C); raised on every rank at the same safe point."""


class StoppedWhileLoading(BaseException):
    """A stop signal arrived while the checkpoint was being read (`interruptible`). A BaseException, like
    KeyboardInterrupt, so that the readers' `except Exception` clauses let it through."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum} while loading")
        self.signum = signum


def _handler(signum, _frame):
    first = _requested["signal"] is None
    _requested["signal"] = signum
    if _interruptible["depth"]:
        if first:
            log.warning("received signal %d while reading the checkpoint: stopping now", signum)
        raise StoppedWhileLoading(signum)
    if first:
        log.warning("received signal %d: stopping at the next safe point", signum)


@contextmanager
def interruptible() -> Iterator[None]:
    """Within the block a stop signal raises StoppedWhileLoading at once (also one already received before the
    block); for work with nothing to restore and no collective inside (reading files). Outside it, and in threads
    other than the main one, a signal only sets the flag."""
    if _requested["signal"] is not None:
        raise StoppedWhileLoading(_requested["signal"])
    _interruptible["depth"] += 1
    try:
        yield
    finally:
        _interruptible["depth"] -= 1


def install() -> None:
    """Make SIGTERM, SIGUSR1 and SIGINT record a stop request (`requested`) instead of ending the process;
    left at their defaults off the main thread, where signal.signal raises ValueError."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        try:
            signal.signal(sig, _handler)
        except ValueError:  # not the main thread (e.g. embedded use): leave default handling
            pass


def requested() -> bool:
    """Whether a stop signal has arrived since `install` (or the last `reset`); this process only."""
    return _requested["signal"] is not None


def reset() -> None:
    """Forget a recorded stop request."""
    _requested["signal"] = None
