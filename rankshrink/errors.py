"""The project's own error types.

Every failure a user can cause (a bad file, a bad flag) is an :class:`InputError` and becomes one red
line and exit code 2 in the CLI. A gate that fails on a run that otherwise worked is a
:class:`GateError` (exit 3). Anything else escaping the package is a bug.
"""

from __future__ import annotations


class RankshrinkError(Exception):
    """Base class for all errors rankshrink raises on purpose."""

    exit_code = 1


class InputError(RankshrinkError):
    """Bad usage or bad input: a file that cannot be used, a flag out of range (exit 2)."""

    exit_code = 2


class UnsafeCheckpointError(InputError):
    """The checkpoint would execute code when loaded and ``--trust-pickle`` was not given."""


class UnsupportedModelError(InputError):
    """The model loads, but its architecture is outside what rankshrink can compress."""


class GateError(RankshrinkError):
    """A verification tolerance or a user gate (size, accuracy, agreement) failed (exit 3)."""

    exit_code = 3


class TrainingDivergedError(GateError):
    """Fine-tuning produced non-finite values it could not recover from (exit 3)."""
