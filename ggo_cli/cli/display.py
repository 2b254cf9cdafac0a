"""What ``ggo-cli`` shows on stderr while and after it runs (progress bars, the summary table,
the all-pending note) and the exit code a run's outcomes give."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from ..analysis.quality import format_flags
from ..domain import SeriesInfo, SeriesOutcome, SeriesStatus
from ..errors import EXIT_PARTIAL, EXIT_UNDELIVERED, NoEligibleSeriesError, SeriesError
from ..logs import escape_control

stderr_console = Console(stderr=True)


class RichProgress:
    """A two-bar rich progress display (series, slices) on stderr."""

    def __init__(self, progress: Progress, n_series: int) -> None:
        self._progress = progress
        self._series = progress.add_task("series", total=n_series)
        self._slices = progress.add_task("slices", total=0)

    def discovered(self, n_series: int) -> None:
        self._progress.update(self._series, total=n_series)

    def series_started(self, series: SeriesInfo, n_slices: int) -> None:
        self.work_started(n_slices, f"series …{series.series_instance_uid[-12:]}")

    def work_started(self, n_units: int, description: str) -> None:
        self._progress.reset(self._slices, total=n_units, description=description)

    def advance(self, n: int) -> None:
        self._progress.advance(self._slices, n)

    def series_finished(self, outcome: SeriesOutcome) -> None:
        self._progress.advance(self._series, 1)


@contextmanager
def progress_display(enabled: bool, n_series: int) -> Iterator[RichProgress | None]:
    """Rich progress bars on stderr while the block runs; None when off or not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr_console, transient=True) as progress:
        yield RichProgress(progress, n_series)


def summary_table(outcomes: Sequence[SeriesOutcome]) -> Table:
    """One row per series: slices, GGO and lung volumes, quality flags, status and message."""
    table = Table(title="ggo-cli segment", show_lines=False)
    for name in ("series", "slices", "GGO mL", "lung mL", "GGO %", "QC", "status", "message"):
        table.add_column(name, overflow="fold")
    for o in outcomes:
        volume = f"{o.measurement.ggo_volume_ml:.2f}" if o.measurement else ""
        lung = f"{o.lungs.lung_volume_ml:.0f}" if o.lungs else ""
        share = f"{o.lungs.ggo_percent_of_lung:.2f}" if o.lungs else ""
        table.add_row(
            Text(escape_control(o.series.series_instance_uid)),
            str(o.n_slices),
            volume,
            lung,
            share,
            format_flags(o.qc_flags),
            o.status.value,
            Text(escape_control(o.series.redact(o.message))),  # Text: no rich markup
        )
    return table


def exit_code(outcomes: Sequence[SeriesOutcome], *, delivered: bool = True) -> int:
    """The run's exit code: 0, 3 none eligible, 4 all failed, 7 some failed, 9 undelivered.

    Args:
        outcomes: the run's outcomes.
        delivered: whether every destination holds every object it should (a series failure
            takes precedence over a delivery that is not complete).
    """
    ok = sum(o.status is SeriesStatus.OK for o in outcomes)
    failed = sum(o.status is SeriesStatus.FAILED for o in outcomes)
    pending = sum(o.status is SeriesStatus.PENDING for o in outcomes)
    if ok == 0 and failed == 0 and pending == 0:
        return NoEligibleSeriesError.exit_code
    if failed == 0:
        return 0 if delivered else EXIT_UNDELIVERED
    return EXIT_PARTIAL if ok else SeriesError.exit_code


def all_pending_note(outcomes: Sequence[SeriesOutcome], settle_minutes: float) -> str | None:
    """The one-line warning for a run whose every eligible series is still arriving.

    Such a run writes nothing and still exits 0 (pending never fails a run), so a person who
    runs it on a folder copied a minute ago must be told why and what to do.

    Args:
        outcomes: the run's outcomes (skipped series are not eligible).
        settle_minutes: the run's ``--settle``.

    Returns:
        The message, or ``None`` when no series is pending or some eligible series is not.
    """
    eligible = [o for o in outcomes if o.status is not SeriesStatus.SKIPPED]
    if not eligible or any(o.status is not SeriesStatus.PENDING for o in eligible):
        return None
    return (
        f"all {len(eligible)} eligible series are still arriving (a file modified within the "
        f"last {settle_minutes:g} min, --settle {settle_minutes:g}); nothing was segmented: "
        "rerun later or with --settle 0"
    )


def review_lines(outcomes: Sequence[SeriesOutcome]) -> list[str]:
    """The run summary's "review these" list: series with quality flags, no patient data.

    Lists the series analysed in this run with flags (UID, the digest of its folder, flags);
    series reused from an earlier run were listed then and are only counted.

    Args:
        outcomes: the run's outcomes.

    Returns:
        A heading and one line per flagged series; empty when no series is flagged.
    """
    flagged = [o for o in outcomes if o.qc_flags and not o.reused]
    earlier = sum(bool(o.qc_flags) and o.reused for o in outcomes)
    if not flagged and not earlier:
        return []
    lines = [f"review these {len(flagged)} series (quality flags; see README 'Quality flags'):"]
    lines += [
        f"  {o.series.label}: {format_flags(o.qc_flags)}"
        for o in flagged
    ]
    if earlier:
        lines.append(f"  and {earlier} flagged in earlier runs (qc_flags column of the CSV)")
    return lines
