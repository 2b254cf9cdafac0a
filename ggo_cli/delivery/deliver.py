"""One delivery pass: the queued objects of each destination go out, oldest first, in chunks.

Per target: ``force`` puts its rows back to pending, ``enqueue`` queues the registered objects
that have no row yet, then the due rows are sent in chunks of ``chunk`` files, each chunk's
results recorded before the next is sent (a run killed mid-way re-sends at most one chunk, which
a PACS stores as the same SOP instance). A destination that answers a whole chunk with
``TRANSIENT`` and stores nothing is down: the pass stops sending to it and its remaining rows
stay pending for the next run. A destination never fails a run: its problems end up in its
:class:`DestinationReport`, one log line each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import GgoError
from .destinations import Destination, DimseDestination
from .dicomweb import send_stow
from .dimse import send_dimse
from .queue import DeliveryQueue, DeliveryRow, DeliveryStatus, ObjectKind
from .results import SendOutcome, SendResult

log = logging.getLogger(__name__)

Sender = Callable[[Destination, Sequence[Path]], list[SendResult]]
"""Sends files to a destination: one result per path, in the order given."""
DEFAULT_CHUNK = 64
"""Files per sender call; results are recorded after each."""


def send_files(dest: Destination, paths: Sequence[Path]) -> list[SendResult]:
    """Send files by C-STORE or STOW-RS, as the destination says.

    Args:
        dest: a DIMSE peer or a DICOMweb server.
        paths: DICOM Part 10 files.

    Returns:
        One result per path, in the order given (see :func:`send_dimse`, :func:`send_stow`).
    """
    if isinstance(dest, DimseDestination):
        return send_dimse(dest, paths)
    return send_stow(dest, paths)


@dataclass(frozen=True, slots=True)
class Target:
    """A destination and the kinds of object it receives.

    Attributes:
        destination: where to send.
        kinds: which objects (SEG, SR, SC) go there.
    """

    destination: Destination
    kinds: frozenset[ObjectKind]

    @property
    def key(self) -> str:
        """The destination's text, the queue's key (no secret in it)."""
        return str(self.destination)


@dataclass(frozen=True, slots=True)
class DestinationReport:
    """What a pass did for one destination, and where its queue stands afterwards.

    Attributes:
        destination: the destination's text.
        attempted: objects this pass tried to send.
        stored: of those, stored (possibly with a warning).
        failed: of those, refused for good or unsendable (missing or unreadable file).
        transient: of those, not delivered now (kept pending).
        sent: the queue afterwards: objects of the target's kinds the destination holds.
        pending: the queue afterwards: objects still to send.
        failed_total: the queue afterwards: objects refused (retried only when asked).
        last_error: the latest reason an object was not delivered (``""`` when none).
    """

    destination: str
    attempted: int
    stored: int
    failed: int
    transient: int
    sent: int
    pending: int
    failed_total: int
    last_error: str

    @property
    def complete(self) -> bool:
        """Whether the destination holds every queued object of its kinds."""
        return self.pending == 0 and self.failed_total == 0

    def to_dict(self) -> dict[str, object]:
        """The report as JSON-ready values (for the run manifest), with ``complete``."""
        values: dict[str, object] = asdict(self)
        values["complete"] = self.complete
        return values


@dataclass(slots=True)
class _Tally:
    """The running counts of one destination's pass."""

    attempted: int = 0
    stored: int = 0
    failed: int = 0
    transient: int = 0
    down_reason: str = ""
    not_sent: int = 0
    last_reason: str = ""
    refusal: str = ""

    def add(self, results: Sequence[SendResult]) -> None:
        """Count a chunk's results."""
        for result in results:
            self.attempted += 1
            if result.outcome.delivered:
                self.stored += 1
                continue
            if result.outcome is SendOutcome.FAILED:
                self.failed += 1
                self.refusal = result.reason
            else:
                self.transient += 1
            self.last_reason = result.reason


def _missing(row: DeliveryRow, path: Path) -> SendResult:
    """The ``FAILED`` result of a queued object whose file is gone."""
    return SendResult(path, row.obj.sop_instance_uid, SendOutcome.FAILED, None,
                      f"{path.name} is missing from the output folder")


def _checked(rows: Sequence[DeliveryRow], paths: Sequence[Path],
             results: Sequence[SendResult]) -> list[SendResult]:
    """The sender's results, each tied to its row's SOPInstanceUID.

    A file that now holds another SOP instance than the one queued (rewritten since it was
    registered) is ``FAILED``: the destination may have stored an object the queue does not know.

    Raises:
        RuntimeError: the sender broke its contract (not one result per path).
    """
    if len(results) != len(paths):
        raise RuntimeError(f"the sender returned {len(results)} results for {len(paths)} files")
    checked: list[SendResult] = []
    for row, path, result in zip(rows, paths, results, strict=True):
        uid = row.obj.sop_instance_uid
        if result.sop_instance_uid and result.sop_instance_uid != uid:
            checked.append(SendResult(path, uid, SendOutcome.FAILED, result.status,
                                      f"{path.name} holds another SOP instance than the one "
                                      "queued; run the series again to register it"))
        else:
            checked.append(SendResult(path, uid, result.outcome, result.status, result.reason))
    return checked


def _send_chunk(target: Target, rows: Sequence[DeliveryRow], out_dir: Path, *,
                sender: Sender) -> tuple[list[SendResult], bool]:
    """Send one chunk; returns its results and whether the destination is down."""
    paths = [out_dir / row.obj.path for row in rows]
    present: list[tuple[DeliveryRow, Path]] = []
    by_path: dict[Path, SendResult] = {}
    for row, path in zip(rows, paths, strict=True):
        if path.is_file():
            present.append((row, path))
        else:
            by_path[path] = _missing(row, path)
    if present:
        sent_paths = [path for _, path in present]
        try:
            answers = sender(target.destination, sent_paths)
        except GgoError as exc:
            # An expected failure of the destination (say, its TLS files became unreadable)
            # makes it down for this pass; anything else is a bug and propagates.
            answers = [SendResult(path, row.obj.sop_instance_uid, SendOutcome.TRANSIENT, None,
                                  str(exc)) for row, path in present]
        for result in _checked([row for row, _ in present], sent_paths, answers):
            by_path[result.path] = result
    results = [by_path[path] for path in paths]
    sent = [by_path[path] for _, path in present]
    down = bool(sent) and all(r.outcome is SendOutcome.TRANSIENT for r in sent)
    return results, down


def _deliver_target(queue: DeliveryQueue, target: Target, out_dir: Path, *, at: str,
                    enqueue: bool, include_failed: bool, force: bool, sender: Sender,
                    chunk: int) -> DestinationReport:
    """One destination's pass (see :func:`deliver`)."""
    key, kinds = target.key, target.kinds
    if force:
        queue.reset(key, kinds, at=at)
    if enqueue:
        queue.enqueue(key, kinds, at=at)
    due = queue.due(key, include_failed=include_failed, kinds=kinds)
    tally = _Tally()
    for start in range(0, len(due), chunk):
        rows = due[start:start + chunk]
        results, down = _send_chunk(target, rows, out_dir, sender=sender)
        queue.record(key, results, at=at, out_dir=out_dir)
        tally.add(results)
        if down:
            tally.down_reason = next(r.reason for r in results
                                     if r.outcome is SendOutcome.TRANSIENT)
            tally.not_sent = len(due) - start - len(rows)
            break
    counts = queue.counts(key, kinds=kinds)
    _log_pass(key, tally, counts)
    return DestinationReport(
        destination=key,
        attempted=tally.attempted,
        stored=tally.stored,
        failed=tally.failed,
        transient=tally.transient,
        sent=counts[DeliveryStatus.SENT],
        pending=counts[DeliveryStatus.PENDING],
        failed_total=counts[DeliveryStatus.FAILED],
        last_error=tally.last_reason or queue.last_error(key, kinds=kinds),
    )


def _log_pass(key: str, tally: _Tally, counts: dict[DeliveryStatus, int]) -> None:
    """One INFO line of counts (DEBUG when the pass had nothing to send) and one INFO line each
    for undelivered and refused objects; the command's summary gives the one WARNING per
    destination (:func:`ggo_cli.run.deliveries.report_lines`)."""
    log.log(
        logging.INFO if tally.attempted or tally.not_sent else logging.DEBUG,
        "%s: %d objects attempted this run (%d stored, %d refused, %d not delivered); queue: "
        "%d sent, %d pending, %d failed",
        key, tally.attempted, tally.stored, tally.failed, tally.transient,
        counts[DeliveryStatus.SENT], counts[DeliveryStatus.PENDING],
        counts[DeliveryStatus.FAILED],
    )
    undelivered = tally.transient + tally.not_sent
    if undelivered:
        reason = tally.down_reason or tally.last_reason
        log.info("%s: %d objects not delivered (%s); they stay queued for the next run",
                 key, undelivered, reason)
    if tally.failed:
        log.info("%s: %d objects refused (%s); they are not sent again unless forced",
                 key, tally.failed, tally.refusal)


def deliver(
    queue: DeliveryQueue,
    targets: Sequence[Target],
    out_dir: Path,
    *,
    at: str,
    enqueue: bool = True,
    include_failed: bool = False,
    force: bool = False,
    sender: Sender = send_files,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[DestinationReport, ...]:
    """Send what is queued for each target (one pass).

    Args:
        queue: the delivery queue (objects already registered).
        targets: the destinations and their kinds, served in this order.
        out_dir: the output folder the objects' paths are relative to.
        at: the time to stamp the queue's rows with (ISO 8601).
        enqueue: first queue the registered objects that have no row for a target.
        include_failed: also send the rows that failed before.
        force: first put every row of each target back to pending (send everything again).
        sender: what sends files (default :func:`send_files`; tests pass a fake).
        chunk: files per sender call; the queue is updated after each.

    Returns:
        One report per target, in order.

    Raises:
        ValueError: ``chunk`` is below 1.
        OutputError: the queue cannot be read or written (fatal).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, not {chunk}")
    return tuple(
        _deliver_target(queue, target, out_dir, at=at, enqueue=enqueue,
                        include_failed=include_failed, force=force, sender=sender, chunk=chunk)
        for target in targets
    )
