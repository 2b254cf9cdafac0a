"""What sending one file to one destination came to, shared by the C-STORE and STOW-RS senders.

The outcome tells the delivery queue what to do next: nothing (stored, possibly with a warning),
give up until someone forces it (the peer refused this object for good), or try again on a
later run (the peer was unreachable, busy, or the exchange broke off).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

STATUS_SUCCESS = 0x0000
STATUS_CANCEL = 0xFE00
STATUS_PROCESSING_FAILURE = 0x0110
"""PS3.7 Annex C.4: a general failure of the peer while processing (Orthanc sends it when its
storage fails), retried since a later attempt may succeed."""
STATUS_RESOURCE_LIMITATION = 0x0213
_WARNING_STATUSES = (0x0001, 0x0107, 0x0116)
"""PS3.7 Annex C: attribute list error, attribute value out of range, and the general warning."""
_WARNING_RANGE = range(0xB000, 0xC000)
"""PS3.4 B.2.3: coercion of data elements (B000), element discarded (B006), data set does not
match SOP class (B007)."""
_OUT_OF_RESOURCES = range(0xA700, 0xA800)
"""PS3.4 B.2.3: refused, out of resources."""


class SendOutcome(enum.Enum):
    """The outcome of sending one file to one destination."""

    STORED = "stored"
    """The peer stored it (C-STORE Success, or listed in the STOW-RS ReferencedSOPSequence)."""
    WARNING = "warning"
    """The peer stored it with a warning (coercion, elements discarded)."""
    FAILED = "failed"
    """The peer refused this object, or the file cannot be sent; sending it again will not help."""
    TRANSIENT = "transient"
    """Not delivered now (peer unreachable, association refused or aborted, HTTP error, out of
    resources): try again later."""

    @property
    def delivered(self) -> bool:
        """Whether the peer holds the object."""
        return self in (SendOutcome.STORED, SendOutcome.WARNING)


@dataclass(frozen=True, slots=True)
class SendResult:
    """One file's result.

    Attributes:
        path: the file sent.
        sop_instance_uid: its SOPInstanceUID (empty when the file could not be read).
        outcome: what happened.
        status: the DICOM status (C-STORE Status, STOW-RS FailureReason or WarningReason),
            ``None`` when none came back.
        reason: one line for the log and the queue (no patient data, no secret).
    """

    path: Path
    sop_instance_uid: str
    outcome: SendOutcome
    status: int | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class FileToSend:
    """What a sender needs to know of a file before sending it (read from its header).

    Attributes:
        path: the file.
        sop_class_uid: SOPClassUID.
        sop_instance_uid: SOPInstanceUID.
        transfer_syntax_uid: the file's transfer syntax (file meta information).
    """

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def read_file_to_send(path: Path) -> FileToSend | SendResult:
    """Read the header of a file to send.

    Args:
        path: a DICOM Part 10 file.

    Returns:
        Its identity, or a ``FAILED`` result when it cannot be read or lacks SOPClassUID,
        SOPInstanceUID or the transfer syntax.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, EOFError, InvalidDicomError) as exc:
        return SendResult(path, "", SendOutcome.FAILED, None,
                          f"cannot read {path.name}: {type(exc).__name__}")
    sop_class = str(ds.get("SOPClassUID", ""))
    sop_instance = str(ds.get("SOPInstanceUID", ""))
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not (sop_class and sop_instance and syntax):
        return SendResult(path, sop_instance, SendOutcome.FAILED, None,
                          f"{path.name} lacks SOPClassUID, SOPInstanceUID or TransferSyntaxUID")
    return FileToSend(path, sop_class, sop_instance, syntax)


def outcome_of_status(status: int) -> SendOutcome:
    """Classify a storage status (C-STORE Status, or a STOW-RS FailureReason/WarningReason).

    Args:
        status: the 16-bit status code.

    Returns:
        ``STORED`` for success, ``WARNING`` for the warning statuses, ``TRANSIENT`` for out of
        resources (PS3.4 B.2.3 A7xx), resource limitation (0213), processing failure (0110) and
        cancel, and ``FAILED`` for every other failure (SOP class not supported, data set does
        not match the SOP class, cannot understand, not authorised, ...).
    """
    if status == STATUS_SUCCESS:
        return SendOutcome.STORED
    if status in _WARNING_STATUSES or status in _WARNING_RANGE:
        return SendOutcome.WARNING
    if status in _OUT_OF_RESOURCES or status in (
        STATUS_RESOURCE_LIMITATION,
        STATUS_PROCESSING_FAILURE,
        STATUS_CANCEL,
    ):
        return SendOutcome.TRANSIENT
    return SendOutcome.FAILED


def result_of_status(item: FileToSend, status: int, *, what: str) -> SendResult:
    """The result of a file whose peer answered with ``status``.

    Args:
        item: the file.
        status: the status code.
        what: the kind of status for the reason (``"C-STORE status"``, ``"FailureReason"``).

    Returns:
        The result, its reason naming the status in hexadecimal.
    """
    outcome = outcome_of_status(status)
    reason = "" if outcome is SendOutcome.STORED else f"{what} 0x{status:04X}"
    return SendResult(item.path, item.sop_instance_uid, outcome, status, reason)


def transient(item: FileToSend, reason: str) -> SendResult:
    """A ``TRANSIENT`` result for ``item`` (not delivered now; retry later)."""
    return SendResult(item.path, item.sop_instance_uid, SendOutcome.TRANSIENT, None, reason)


def failed(item: FileToSend, reason: str) -> SendResult:
    """A ``FAILED`` result for ``item`` (sending it again will not help)."""
    return SendResult(item.path, item.sop_instance_uid, SendOutcome.FAILED, None, reason)


def send_in_order(
    paths: Sequence[Path], send: Callable[[list[FileToSend]], list[SendResult]]
) -> list[SendResult]:
    """Read each file's header, send the readable ones, and give one result per path in order.

    Args:
        paths: DICOM Part 10 files.
        send: sends the readable files; returns one result per file, in the order given.

    Returns:
        The results in the order of ``paths``; an unreadable file is ``FAILED`` and not sent.
    """
    read = [read_file_to_send(Path(path)) for path in paths]
    sent = iter(send([entry for entry in read if isinstance(entry, FileToSend)]))
    return [next(sent) if isinstance(entry, FileToSend) else entry for entry in read]

