"""The outcomes a series gets without a result: skipped by a rule, failed, and their clock.

:func:`failed_outcome` turns a series-level exception into a ``failed`` outcome (a fatal output
error is raised again: the run must stop); :data:`RETRY_NOTE` marks the failures that another
try may cure, which the state store does not keep.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from ..domain import CtVolume, SeriesInfo, SeriesOutcome, SeriesStatus
from ..errors import OutputError, SeriesError

log = logging.getLogger(__name__)

RETRY_NOTE = " (retried by the next run)"
"""Ends the message of a failure that may pass on another try (a write error, a crash): the
state store does not keep such a result, so the next run retries the series without
``--force``. A :class:`~ggo_cli.errors.SeriesError` (bad geometry, missing attributes) is
deterministic and stays failed until the series' files change."""


def now_utc() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def skipped_outcome(series: SeriesInfo) -> SeriesOutcome:
    """The outcome of a series that broke a selection rule."""
    return SeriesOutcome(
        series=series,
        status=SeriesStatus.SKIPPED,
        message=series.skip_reason or "",
        n_slices=len(series.files),
        processed_at=now_utc(),
    )


def failed_outcome(
    series: SeriesInfo, exc: Exception, started: float, volume: CtVolume | None
) -> SeriesOutcome:
    """The outcome of a series that failed with ``exc`` (fatal output errors re-raised)."""
    if isinstance(exc, OutputError) and exc.fatal:
        raise exc
    if isinstance(exc, SeriesError | OutputError):
        log.error("%s failed: %s", series.label, series.redact(str(exc)))
        log.debug("%s is in %s", series.label, series.location)
        return SeriesOutcome(
            series=series,
            status=SeriesStatus.FAILED,
            message=str(exc) + ("" if isinstance(exc, SeriesError) else RETRY_NOTE),
            n_slices=volume.hu.shape[0] if volume is not None else len(series.files),
            slice_spacing_mm=volume.slice_spacing_mm if volume is not None else None,
            pixel_spacing_mm=volume.pixel_spacing_mm if volume is not None else None,
            seconds=time.perf_counter() - started,
            processed_at=now_utc(),
        )
    log.error(
        "%s failed with an unexpected %s (a bug; --debug shows the traceback)",
        series.label,
        type(exc).__name__,
    )
    log.debug("%s is in %s", series.label, series.location)
    log.debug("traceback", exc_info=exc)
    return SeriesOutcome(
        series=series,
        status=SeriesStatus.FAILED,
        message=f"unexpected {type(exc).__name__}: {exc}{RETRY_NOTE}",
        n_slices=len(series.files),
        seconds=time.perf_counter() - started,
        processed_at=now_utc(),
    )
