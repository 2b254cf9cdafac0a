"""The error hierarchy: each class's exit code (docs: one per failure kind), and OutputError's
``fatal`` flag."""

from __future__ import annotations

import pytest

from ggo_cli import errors
from ggo_cli.errors import (
    DeviceError,
    GgoError,
    InputError,
    ModelError,
    NoEligibleSeriesError,
    OutputError,
    RunLockedError,
    SeriesError,
    SeriesGeometryError,
    UnsupportedSeriesError,
)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (GgoError, 1),
        (InputError, 2),
        (NoEligibleSeriesError, 3),
        (SeriesError, 4),
        (UnsupportedSeriesError, 4),
        (SeriesGeometryError, 4),
        (ModelError, 5),
        (DeviceError, 5),
        (OutputError, 6),
        (RunLockedError, 8),
    ],
)
def test_each_error_class_has_its_exit_code(error: type[GgoError], code: int) -> None:
    assert error.exit_code == code
    assert error("x").exit_code == code
    assert issubclass(error, GgoError)


def test_the_exit_codes_decided_outside_the_hierarchy_are_distinct() -> None:
    """0 (all done), 1 (a bug) and 7 (some series failed) are set by the CLI, not raised;
    7 must not collide with any error's code."""
    assert (errors.EXIT_OK, errors.EXIT_BUG, errors.EXIT_PARTIAL) == (0, 1, 7)
    raised = {cls.exit_code for cls in (InputError, NoEligibleSeriesError, SeriesError,
                                        ModelError, OutputError, RunLockedError)}
    assert errors.EXIT_PARTIAL not in raised and errors.EXIT_OK not in raised


def test_an_output_error_is_per_series_unless_marked_fatal() -> None:
    assert OutputError("cannot write a.csv").fatal is False
    fatal = OutputError("no space left on device", fatal=True)
    assert fatal.fatal is True and str(fatal) == "no space left on device"
