"""What the delivery queue stores: the kinds of object and the statuses, the objects and
delivery rows it returns, and the SQLite tables that hold them.

:class:`~ggo_cli.delivery.queue.DeliveryQueue` reads and writes these tables; the public names
here are re-exported by :mod:`ggo_cli.delivery.queue` (import them from either).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class ObjectKind(StrEnum):
    """The kinds of DICOM object ggo-cli writes and can send."""

    SEG = "seg"
    """DICOM Segmentation."""
    SR = "sr"
    """TID 1500 measurement report (Comprehensive 3D SR)."""
    SC = "sc"
    """RGB Secondary Capture of the overlay."""


ALL_KINDS: frozenset[ObjectKind] = frozenset(ObjectKind)


class DeliveryStatus(StrEnum):
    """Where one object stands with one destination."""

    PENDING = "pending"
    """Not delivered yet (new, or the destination was down): sent on the next pass."""
    SENT = "sent"
    """The destination stored it (possibly with a warning)."""
    FAILED = "failed"
    """The destination refused it, or the file cannot be sent; retried only when asked."""


# Insertion order (``seq``, a rowid alias) is the serving order: oldest results first.
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS delivery_objects (seq INTEGER PRIMARY KEY, "
    "sop_instance_uid TEXT NOT NULL UNIQUE, sop_class_uid TEXT NOT NULL, kind TEXT NOT NULL, "
    "series_instance_uid TEXT NOT NULL, path TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS delivery_objects_series "
    "ON delivery_objects (series_instance_uid)",
    "CREATE TABLE IF NOT EXISTS deliveries (seq INTEGER PRIMARY KEY, "
    "sop_instance_uid TEXT NOT NULL, destination TEXT NOT NULL, status TEXT NOT NULL, "
    "attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '', "
    "updated_at TEXT NOT NULL DEFAULT '', UNIQUE (sop_instance_uid, destination))",
    "CREATE INDEX IF NOT EXISTS deliveries_destination ON deliveries (destination, status)",
)
_ROW_COLUMNS = (
    "o.sop_instance_uid, o.sop_class_uid, o.kind, o.series_instance_uid, o.path, "
    "d.destination, d.status, d.attempts, d.last_error, d.updated_at"
)
_JOIN = "deliveries d JOIN delivery_objects o ON o.sop_instance_uid = d.sop_instance_uid"


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One DICOM file ggo-cli wrote.

    Attributes:
        sop_instance_uid: its SOPInstanceUID.
        sop_class_uid: its SOPClassUID.
        kind: SEG, SR or SC.
        series_instance_uid: the SeriesInstanceUID of the source CT series it belongs to (the
            state store's key), not the object's own series.
        path: the file, relative to the output folder, with ``/`` separators.
    """

    sop_instance_uid: str
    sop_class_uid: str
    kind: ObjectKind
    series_instance_uid: str
    path: str


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """One object's delivery to one destination.

    Attributes:
        obj: the object.
        destination: the destination's text (``str(Destination)``: no secret in it).
        status: pending, sent or failed.
        attempts: how many times it was sent.
        last_error: the reason of the last attempt that did not deliver it (``""`` when sent).
        updated_at: when its status last changed (ISO 8601, as the caller gave it).
    """

    obj: StoredObject
    destination: str
    status: DeliveryStatus
    attempts: int
    last_error: str
    updated_at: str


def _row(values: tuple[Any, ...]) -> DeliveryRow:
    """A :class:`DeliveryRow` from a ``SELECT`` of :data:`_ROW_COLUMNS`."""
    uid, sop_class, kind, series, path, destination, status, attempts, error, at = values
    obj = StoredObject(uid, sop_class, ObjectKind(kind), series, path)
    return DeliveryRow(obj, destination, DeliveryStatus(status), int(attempts), error, at)
