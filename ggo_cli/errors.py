"""The ggo-cli error hierarchy and its exit codes (STYLE.md section 5).

Only ``cli/`` catches these (one boundary, ``guarded`` in ``cli/app.py``); everything else
raises them with a message that names what failed, the offending value and the fix. Messages
never contain patient identifiers.
"""

from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
EXIT_BUG = 1
EXIT_PARTIAL = 7
"""The batch finished but at least one series failed while others succeeded."""
EXIT_UNDELIVERED = 9
"""Every series is done, but objects are still pending or refused at a destination (``--send``,
``ggo-cli send``): they stay queued for the next run or ``ggo-cli send``."""


class GgoError(Exception):
    """Base class of every expected ggo-cli failure."""

    exit_code: ClassVar[int] = 1


class InputError(GgoError):
    """A bad path or option given by the user."""

    exit_code = 2


class NoEligibleSeriesError(GgoError):
    """The inputs hold no series that passes the selection rules."""

    exit_code = 3


class SeriesError(GgoError):
    """One series cannot be processed; recorded in its outcome, never stops a batch."""

    exit_code = 4


class UnsupportedSeriesError(SeriesError):
    """A series lacks required attributes or uses an unsupported encoding."""


class SeriesGeometryError(SeriesError):
    """A series' slices do not form a regular axial volume (gaps, uneven spacing, tilt)."""


class ModelError(GgoError):
    """The model is missing, corrupt, breaks the model contract or cannot run."""

    exit_code = 5


class DeviceError(ModelError):
    """The requested execution device is not usable.

    For example ``--device cuda`` without a GPU.
    """


class RunLockedError(GgoError):
    """Another ggo-cli run holds the output folder's lock."""

    exit_code = 8


class OutputError(GgoError):
    """An output (SEG, CSV, PNG, manifest) cannot be written or fails its read-back check.

    Args:
        message: what failed, where, and the fix.
        fatal: the output folder itself is unusable (disk full, read-only, no permission), so
            the run stops instead of failing one series after another.
    """

    exit_code = 6

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal
