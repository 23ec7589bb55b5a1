"""Progress bars: one tqdm bar per phase on rank 0 (output.progress), sequences done / total, tokens/s and ETA.

The loops report where they already iterate: `runtime.oom.run_groups` (every teacher-forced pass: scoring, gradients,
forward-mode passes, the sweep) announces a pass's sequences when it starts (`expect`) and reports each block or
group when its step is done (`advance`); sampling reports each decoded block. A phase that makes
several passes over its batch (δH₁'s two, the explanation's) grows its total as each pass starts, so the bar's
total is the work of the passes started so far. Other ranks and disabled runs pay one attribute test per
block. The bars write to stderr only: the log files (logging.FileHandler) never see them, and log records
printed to stderr during a phase go through `tqdm.write` so they do not tear a bar.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

_enabled = False
_label = None    # the open phase's title (bars on)
_bar = None      # its tqdm bar, from the first pass announced
_tokens = 0


def configure(enabled: bool) -> None:
    """Turn the bars on (rank 0 of a run with output.progress true, or null and stderr a terminal) or off."""
    global _enabled
    _enabled = bool(enabled)


def wanted(setting: bool | None, rank: int) -> bool:
    """Whether this rank shows bars: never on ranks > 0; with output.progress null, only when stderr is a TTY
    (a batch job's stderr is a file, where bars are carriage-return noise)."""
    if rank != 0:
        return False
    if setting is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(setting)


@contextmanager
def phase(label: str):
    """A bar for the duration of one phase entry, shown from the first `expect` (nothing when bars are off).
    Nested entries keep the outer bar."""
    global _label, _bar, _tokens
    if not _enabled or _label is not None:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    _label, _tokens = label, 0
    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger("probe_dist")]):
            yield
    finally:
        if _bar is not None:
            _bar.close()
        _label = _bar = None


def active() -> bool:
    """Whether a bar is open (loops skip counting tokens otherwise)."""
    return _bar is not None


def expect(rows: int) -> None:
    """A pass over `rows` sequences starts in the open phase: the bar's total grows by `rows`."""
    global _bar
    if _label is None:
        return
    if _bar is None:
        import shutil

        from tqdm.auto import tqdm

        # The terminal's size, 100 × 24 where it reports none: a pseudo-terminal of size 0x0 (some job launchers)
        # made tqdm draw bars 0 wide, and with 0 rows it hides every bar as "off screen".
        size = shutil.get_terminal_size((100, 24))
        width, height = size.columns or 100, size.lines or 24
        _bar = tqdm(total=int(rows), desc=_label, unit="seq", file=sys.stderr, ncols=width, nrows=height,
                    leave=True,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} seq "
                               "[{elapsed}<{remaining}{postfix}]")
    else:
        _bar.total += int(rows)
        _bar.refresh()


def withdraw(rows: int, done: int) -> None:
    """A pass of `rows` sequences, `done` of them counted, is abandoned (an out-of-memory retry restarts it)."""
    if _bar is not None:
        _bar.total = max(_bar.total - int(rows), 0)
        _bar.n = max(_bar.n - int(done), 0)
        _bar.refresh()


def advance(rows: int, tokens: int = 0) -> None:
    """`rows` sequences (holding `tokens` response tokens) are done in the open phase."""
    global _tokens
    if _bar is not None:
        _tokens += int(tokens)
        if _bar.n + rows > _bar.total:  # work outside an announced pass: never above 100 %
            _bar.total = _bar.n + int(rows)
        elapsed = max(_bar.format_dict.get("elapsed", 0.0), 1e-9)
        _bar.set_postfix_str(f"{_tokens / elapsed:,.0f} tok/s", refresh=False)
        _bar.update(int(rows))
