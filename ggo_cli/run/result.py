"""What a run reports: the progress events it sends and the frozen result it returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..dicom.discovery import Discovery
from ..domain import SeriesInfo, SeriesOutcome, SeriesStatus
from ..onnx.model_info import ModelInfo

if TYPE_CHECKING:
    from ..delivery.deliver import DestinationReport


class ProgressSink(Protocol):
    """Receives progress events (implemented by ``cli.py`` with rich)."""

    def discovered(self, n_series: int) -> None:
        """Discovery found ``n_series`` CT series (eligible or not)."""

    def series_started(self, series: SeriesInfo, n_slices: int) -> None:
        """A series starts; ``n_slices`` units of work follow."""

    def work_started(self, n_units: int, description: str) -> None:
        """Units of work not tied to one series follow (series in worker processes)."""

    def advance(self, n: int) -> None:
        """``n`` more units of the current series are done."""

    def series_finished(self, outcome: SeriesOutcome) -> None:
        """A series ended (ok, skipped or failed)."""


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """Where inference ran (for the manifest and the summary).

    Attributes:
        device: ``cpu`` or ``cuda:N``.
        providers: ONNX Runtime providers in use.
        batch_size: the final batch size.
        precision: the model variant that ran.
        int8_recipe: the int8 recipe in use (``""`` unless int8).
        variant_check: the last variant self-check's verdict
            (:meth:`ggo_cli.onnx.variant_verdict.VariantCheck.to_dict`), or ``None`` when no variant
            was considered.
    """

    device: str
    providers: tuple[str, ...]
    batch_size: int
    precision: str
    int8_recipe: str = ""
    variant_check: dict[str, Any] | None = None


NO_SESSION = SessionSummary(device="", providers=(), batch_size=0, precision="")
"""The summary of a run in which no series needed the model."""


@dataclass(frozen=True, slots=True)
class RunResult:
    """Everything a run produced, for the summary, the manifest and the exit code.

    Attributes:
        outcomes: one per CT series found, in discovery order (unchanged series from the state
            store included, marked ``reused``).
        discovery: what the walk found.
        model: the model used.
        session: where inference ran (:data:`NO_SESSION` when no series needed the model).
        csv_path: the CSV written (``None`` in explain-only runs).
        manifest_path: the manifest written (``None`` in explain-only runs).
        timings_s: named wall times in seconds.
        jobs: series processed at once (worker processes when more than 1).
        deliveries: per destination, what the run's delivery passes sent and what the queue
            holds afterwards (empty without ``--send``).
    """

    outcomes: tuple[SeriesOutcome, ...]
    discovery: Discovery
    model: ModelInfo
    session: SessionSummary = NO_SESSION
    csv_path: Path | None = None
    manifest_path: Path | None = None
    timings_s: Mapping[str, float] = field(default_factory=dict)
    jobs: int = 1
    deliveries: tuple[DestinationReport, ...] = ()

    @property
    def delivered(self) -> bool:
        """Whether every destination holds every object it should (true without ``--send``)."""
        return all(report.complete for report in self.deliveries)

    @property
    def device(self) -> str:
        """``cpu`` or ``cuda:N`` (``""`` when no series needed the model)."""
        return self.session.device

    @property
    def n_unchanged(self) -> int:
        """Series skipped because the state store showed them already done."""
        return sum(o.reused for o in self.outcomes)

    def count(self, status: SeriesStatus) -> int:
        """Number of series with the given status."""
        return sum(o.status is status for o in self.outcomes)
