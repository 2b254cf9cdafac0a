"""A run's results in the delivery queue, and the passes that send them to the PACS.

Every series written gets its DICOM objects (SEG, SR, SC) registered in the state store's
delivery queue (:class:`~ggo_cli.delivery.queue.DeliveryQueue`), whether or not the run sends:
a destination added later finds them there. A run with destinations (``--send``) sends twice:
first what earlier runs left pending, before any series is segmented, then, after the last
series, what this run wrote (and what an added destination has not had yet). A destination
that is down never fails a series and never makes one be segmented again: its objects stay
``pending`` for the next run (or ``ggo-cli send``), the CSV's ``delivery`` column and the
manifest say so, and the run exits with :data:`~ggo_cli.errors.EXIT_UNDELIVERED`.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from ..config import SC_FOLDER, SC_GRADCAM_FOLDER, SEG_NAME, SR_NAME
from ..delivery.deliver import DestinationReport, Target, deliver
from ..delivery.queue import DeliveryQueue, ObjectKind, StoredObject
from ..errors import OutputError

log = logging.getLogger(__name__)

_TAGS = ("SOPClassUID", "SOPInstanceUID")


def _object(out_dir: Path, path: Path, kind: ObjectKind, series_uid: str) -> StoredObject:
    """The queue's record of one file ggo-cli wrote (its header's UIDs).

    Raises:
        OutputError: the file cannot be read or lacks its UIDs.
    """
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_TAGS))
    except (OSError, EOFError, InvalidDicomError) as exc:
        raise OutputError(f"cannot read {path.name} to queue it for delivery: {exc}") from exc
    sop_class = str(header.get("SOPClassUID", ""))
    sop_instance = str(header.get("SOPInstanceUID", ""))
    if not (sop_class and sop_instance):
        raise OutputError(f"{path.name} lacks SOPClassUID or SOPInstanceUID; not queued")
    return StoredObject(
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        kind=kind,
        series_instance_uid=series_uid,
        path=path.relative_to(out_dir).as_posix(),
    )


def _regular(path: Path) -> bool:
    """Whether ``path`` is a regular file (a link is not followed)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def folder_objects(out_dir: Path, folder: Path, series_uid: str) -> list[StoredObject]:
    """The DICOM objects a series folder holds: ``ggo.seg.dcm``, ``ggo.sr.dcm``, ``sc/*.dcm``
    and ``sc_gradcam/*.dcm`` (the GradCAM++ SC series of ``--explain``).

    Args:
        out_dir: the output folder.
        folder: the series' folder below it.
        series_uid: the source CT series' SeriesInstanceUID.

    Returns:
        The objects, SEG first, then SR, then the SC instances in file-name order, the
        overlay's before the GradCAM++ ones (all of kind SC).

    Raises:
        OutputError: a file there cannot be read.
    """
    found: list[tuple[Path, ObjectKind]] = [
        (folder / SEG_NAME, ObjectKind.SEG),
        (folder / SR_NAME, ObjectKind.SR),
    ]
    for name in (SC_FOLDER, SC_GRADCAM_FOLDER):
        sc_dir = folder / name
        if sc_dir.is_dir() and not sc_dir.is_symlink():
            found += [(path, ObjectKind.SC) for path in sorted(sc_dir.glob("*.dcm"))]
    return [
        _object(out_dir, path, kind, series_uid) for path, kind in found if _regular(path)
    ]


def register_series(queue: DeliveryQueue, out_dir: Path, folder: Path, series_uid: str) -> int:
    """Make the queue's objects of a series what its folder now holds; returns how many.

    Raises:
        OutputError: a file cannot be read, or the database cannot be written.
    """
    objects = folder_objects(out_dir, folder, series_uid)
    queue.register_series(series_uid, objects)
    return len(objects)


def deliver_pass(
    queue: DeliveryQueue,
    targets: Sequence[Target],
    out_dir: Path,
    *,
    at: str,
    enqueue: bool,
    include_failed: bool = False,
    force: bool = False,
) -> tuple[DestinationReport, ...]:
    """One delivery pass to every destination (nothing to do without destinations).

    Args:
        queue: the output folder's delivery queue.
        targets: the destinations and the kinds each receives.
        out_dir: the output folder.
        at: the time to record (ISO 8601, UTC).
        enqueue: queue the registered objects a destination has not had yet, before sending.
        include_failed: retry the objects a destination refused (``ggo-cli send``).
        force: send every object again (``ggo-cli send --force``).

    Returns:
        One report per destination.
    """
    if not targets:
        return ()
    return deliver(
        queue,
        targets,
        out_dir,
        at=at,
        enqueue=enqueue,
        include_failed=include_failed,
        force=force,
    )


def merge_reports(
    first: Sequence[DestinationReport], second: Sequence[DestinationReport]
) -> tuple[DestinationReport, ...]:
    """Two passes' reports as one per destination: counts of both, the queue after the second.

    Args:
        first: the reports of the first pass (may be empty).
        second: the reports of the second pass, one per destination.

    Returns:
        One report per destination, in ``second``'s order.
    """
    earlier = {report.destination: report for report in first}
    merged = []
    for report in second:
        before = earlier.get(report.destination)
        if before is not None:
            report = replace(
                report,
                attempted=before.attempted + report.attempted,
                stored=before.stored + report.stored,
                failed=before.failed + report.failed,
                transient=before.transient + report.transient,
                last_error=report.last_error or before.last_error,
            )
        merged.append(report)
    return tuple(merged)


def report_lines(reports: Sequence[DestinationReport]) -> list[tuple[int, str]]:
    """The summary's lines on delivery: ``(logging level, text)`` per destination.

    A destination with objects still pending or refused gets a WARNING naming the next step.
    """
    lines = []
    for report in reports:
        text = (
            f"delivery to {report.destination}: {report.stored} stored now; in all "
            f"{report.sent} sent, {report.pending} pending, {report.failed_total} failed"
        )
        if report.complete:
            lines.append((logging.INFO, text))
            continue
        reason = f" (last error: {report.last_error})" if report.last_error else ""
        advice = (
            "pending objects go with the next run or 'ggo-cli send OUT'"
            if report.pending
            else ""
        )
        if report.failed_total:
            advice += ("; " if advice else "") + (
                "refused objects are retried only by 'ggo-cli send OUT'"
            )
        lines.append((logging.WARNING, f"{text}{reason}; {advice}"))
    return lines
