"""Pre-emption: SIGTERM / SIGUSR1 (Slurm time limit, scancel, torchrun forwarding) and SIGINT (Ctrl-C) request
a stop.

The handler only sets a flag; the probe checks it at safe points — after every prompt group of every phase and
between phases and η values — agrees on it across ranks with one all-reduce, restores the training state, and
writes a summary marked "interrupted". Installed at the very start of main() so a signal during model loading is
not fatal either.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("probe_dist")
_requested = {"signal": None}


class StopRequested(Exception):
    """A stop signal reached this job (pre-emption, time limit, Ctrl-C); raised on every rank at the same safe point."""


def _handler(signum, _frame):
    if _requested["signal"] is None:
        log.warning("received signal %d: stopping at the next safe point", signum)
    _requested["signal"] = signum


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
