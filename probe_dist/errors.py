"""Errors that are the user's to fix: the CLI exits 2 on them, with one paragraph and no traceback.

Anything raised as a `UserInputError` (or a subclass) means "what you gave the probe is wrong or cannot be used":
the configuration, the checkpoint, the prompt file, the output directory, the requested device, a missing optional
package. Its message is written for the person running the probe: what is wrong, where, and how to fix it. The CLI
(`probe_dist.main.main`) prints it as ``error: <message>``, logs the traceback at debug level, removes the run's
staging directory and exits 2, leaving `output.dir` untouched. Every other exception is an internal error (exit 1,
traceback printed, logs kept).

Subclasses usually also derive from the built-in exception they replace (ValueError, ImportError, …), so code that
caught the built-in keeps working.
"""

from __future__ import annotations


class UserInputError(Exception):
    """A problem with the probe's inputs or environment that the user can fix; the message says what and how."""


class OutputDirError(UserInputError):
    """`output.dir` cannot be used: under a regular file, not writable, or holding files the probe did not write."""


class DeviceUnavailableError(UserInputError, RuntimeError):
    """The requested device does not exist on this machine (e.g. device=cuda without a visible CUDA device)."""


class MissingDependencyError(UserInputError, ImportError):
    """An optional package that the configuration asks for is not installed."""


class RewardError(UserInputError, ValueError):
    """An unknown reward function name."""


class CheckpointError(UserInputError, RuntimeError):
    """A checkpoint that the probe refuses, with what is wrong and how to fix it."""
