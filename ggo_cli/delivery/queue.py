"""The delivery queue: each object ggo-cli wrote, to each destination, ``pending``, ``sent`` or
``failed``, kept in the run's SQLite state database beside the series table.

Two tables. ``delivery_objects`` lists the DICOM files written per source series (SEG, SR, SC),
keyed by SOPInstanceUID; ``deliveries`` holds one row per object and destination with its
status, the number of attempts and the last error. ggo-cli's UIDs are deterministic, so a series
processed again with an identical result registers the same SOPInstanceUIDs and keeps their
delivery rows: an object a PACS already holds is never sent twice. An object that disappears
from its series (a changed result) loses its rows, and its successor is queued as new.

Rows are served oldest first (insertion order), so earlier results reach the PACS first. Each
write is one committed transaction (the connection is in autocommit mode; multi-statement
writes run in ``BEGIN IMMEDIATE`` ... ``COMMIT``), so a run killed at any instant leaves the
queue consistent: at worst the last chunk's results are unrecorded, stay pending and are sent
again, which a PACS takes as the same SOP instance.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from ..errors import OutputError
from .queue_rows import _JOIN, _ROW_COLUMNS, _SCHEMA, _row
from .queue_rows import ALL_KINDS as ALL_KINDS
from .queue_rows import DeliveryRow as DeliveryRow
from .queue_rows import DeliveryStatus as DeliveryStatus
from .queue_rows import ObjectKind as ObjectKind
from .queue_rows import StoredObject as StoredObject
from .results import SendOutcome, SendResult

log = logging.getLogger(__name__)


def _in(column: str, values: Collection[str]) -> tuple[str, tuple[str, ...]]:
    """An SQL ``column IN (?, ...)`` test and its parameters (false for no values)."""
    ordered = tuple(sorted(values))
    if not ordered:
        return "0", ()
    return f"{column} IN ({', '.join('?' for _ in ordered)})", ordered


def _uid_of_path(path: Path, by_path: Mapping[str, str], out_dir: Path | None) -> str | None:
    """The SOPInstanceUID registered at ``path`` (see :meth:`DeliveryQueue.record`), or ``None``."""
    text = PurePosixPath(path).as_posix()
    if out_dir is not None and path.is_relative_to(out_dir):
        return by_path.get(PurePosixPath(path.relative_to(out_dir)).as_posix())
    ends = [known for known in by_path if text == known or text.endswith(f"/{known}")]
    return by_path[max(ends, key=len)] if ends else None


class DeliveryQueue:
    """The delivery queue in an open SQLite database (the state store's).

    Args:
        db: a connection in autocommit mode (``isolation_level=None``); its tables are created
            if they do not exist.

    Raises:
        ValueError: the connection is not in autocommit mode (a programming error).
        OutputError: the database cannot be read or written (fatal).
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        if db.isolation_level is not None:
            raise ValueError("DeliveryQueue needs a connection opened with isolation_level=None")
        self._db = db
        self._path = "the state database"
        with self._errors("open"):
            for entry in db.execute("PRAGMA database_list"):
                if entry[1] == "main" and entry[2]:
                    self._path = f"the state database {entry[2]}"
            for statement in _SCHEMA:
                db.execute(statement)

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """SQLite and OS errors as a fatal :class:`OutputError` naming the database."""
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise OutputError(
                f"cannot {action} the delivery queue in {self._path}: {exc}; check free space "
                "and permissions of the --out folder (or move the damaged file away to start "
                "afresh)",
                fatal=True,
            ) from exc

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One committed write transaction, rolled back on any exception."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def register_series(self, series_uid: str, objects: Sequence[StoredObject]) -> None:
        """Make a source series' objects exactly ``objects`` (one transaction).

        An object already registered (same SOPInstanceUID) keeps its delivery rows (its path
        updated); one no longer listed loses them. New objects are appended in the order given.

        Args:
            series_uid: the source CT series' SeriesInstanceUID.
            objects: every object written for it now (each with that ``series_instance_uid``).

        Raises:
            ValueError: an object belongs to another series (a programming error).
            OutputError: the database cannot be written (fatal).
        """
        strays = [o for o in objects if o.series_instance_uid != series_uid]
        if strays:
            raise ValueError(f"objects registered for series {series_uid} belong to "
                             f"{strays[0].series_instance_uid}")
        keep = {o.sop_instance_uid for o in objects}
        with self._errors("write"), self._transaction():
            known = [uid for (uid,) in self._db.execute(
                "SELECT sop_instance_uid FROM delivery_objects WHERE series_instance_uid = ?",
                (series_uid,),
            )]
            gone = [(uid,) for uid in known if uid not in keep]
            self._db.executemany("DELETE FROM deliveries WHERE sop_instance_uid = ?", gone)
            self._db.executemany("DELETE FROM delivery_objects WHERE sop_instance_uid = ?", gone)
            self._db.executemany(
                "INSERT INTO delivery_objects "
                "(sop_instance_uid, sop_class_uid, kind, series_instance_uid, path) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (sop_instance_uid) DO UPDATE SET "
                "sop_class_uid = excluded.sop_class_uid, kind = excluded.kind, "
                "series_instance_uid = excluded.series_instance_uid, path = excluded.path",
                [(o.sop_instance_uid, o.sop_class_uid, str(o.kind), o.series_instance_uid,
                  o.path) for o in objects],
            )

    def objects(self) -> list[StoredObject]:
        """Every registered object, in registration order."""
        with self._errors("read"):
            found = self._db.execute(
                "SELECT sop_instance_uid, sop_class_uid, kind, series_instance_uid, path "
                "FROM delivery_objects ORDER BY seq"
            ).fetchall()
        return [StoredObject(uid, cls, ObjectKind(kind), series, path)
                for uid, cls, kind, series, path in found]

    def enqueue(self, destination: str, kinds: Collection[ObjectKind], *, at: str = "") -> int:
        """Queue every registered object of ``kinds`` that has no row for ``destination`` yet.

        Args:
            destination: the destination's text.
            kinds: which objects go there.
            at: the time to stamp the new rows with.

        Returns:
            How many rows were added (0 when every object already has one).

        Raises:
            OutputError: the database cannot be written (fatal).
        """
        test, values = _in("o.kind", {str(kind) for kind in kinds})
        with self._errors("write"):
            cursor = self._db.execute(
                "INSERT INTO deliveries (sop_instance_uid, destination, status, updated_at) "
                "SELECT o.sop_instance_uid, ?, ?, ? FROM delivery_objects o "
                f"WHERE {test} AND NOT EXISTS (SELECT 1 FROM deliveries d "
                "WHERE d.sop_instance_uid = o.sop_instance_uid AND d.destination = ?) "
                "ORDER BY o.seq",
                (destination, str(DeliveryStatus.PENDING), at, *values, destination),
            )
        return max(cursor.rowcount, 0)

    def rows(self, destination: str, *, kinds: Collection[ObjectKind] | None = None,
             statuses: Collection[DeliveryStatus] | None = None) -> list[DeliveryRow]:
        """The rows of ``destination``, oldest first, optionally of some kinds and statuses."""
        where = ["d.destination = ?"]
        params: list[str] = [destination]
        for column, chosen in (("o.kind", kinds), ("d.status", statuses)):
            if chosen is not None:
                test, values = _in(column, {str(value) for value in chosen})
                where.append(test)
                params.extend(values)
        with self._errors("read"):
            found = self._db.execute(
                f"SELECT {_ROW_COLUMNS} FROM {_JOIN} WHERE {' AND '.join(where)} ORDER BY d.seq",
                params,
            ).fetchall()
        return [_row(values) for values in found]

    def due(self, destination: str, *, include_failed: bool = False,
            kinds: Collection[ObjectKind] | None = None) -> list[DeliveryRow]:
        """The rows of ``destination`` still to send, oldest first (earlier results go first).

        Args:
            destination: the destination's text.
            include_failed: also the ``failed`` rows (retry what the destination refused).
            kinds: only objects of these kinds (default all).

        Returns:
            The pending (and failed) rows in insertion order.
        """
        statuses = {DeliveryStatus.PENDING}
        if include_failed:
            statuses.add(DeliveryStatus.FAILED)
        return self.rows(destination, kinds=kinds, statuses=statuses)

    def reset(self, destination: str, kinds: Collection[ObjectKind], *, at: str = "") -> int:
        """Put every row of ``destination`` of ``kinds`` back to pending (``--force``).

        Args:
            destination: the destination's text.
            kinds: which objects.
            at: the time to stamp the rows with (default: keep their time).

        Returns:
            How many rows were reset (whatever their status was).

        Raises:
            OutputError: the database cannot be written (fatal).
        """
        test, values = _in("kind", {str(kind) for kind in kinds})
        with self._errors("write"):
            cursor = self._db.execute(
                "UPDATE deliveries SET status = ?, "
                "updated_at = CASE WHEN ? = '' THEN updated_at ELSE ? END "
                "WHERE destination = ? AND sop_instance_uid IN "
                f"(SELECT sop_instance_uid FROM delivery_objects WHERE {test})",
                (str(DeliveryStatus.PENDING), at, at, destination, *values),
            )
        return max(cursor.rowcount, 0)

    def record(self, destination: str, results: Sequence[SendResult], *, at: str,
               out_dir: Path | None = None) -> None:
        """Record what sending came to (one transaction).

        Each result is matched to its row by SOPInstanceUID; a result without one (the file was
        unreadable) is matched by its path: relative to ``out_dir`` when given, else by the
        longest registered path its path ends with. A delivered object becomes ``sent`` (its
        error cleared), a ``FAILED`` one ``failed``, a ``TRANSIENT`` one stays ``pending``;
        every matched row counts one more attempt and keeps the result's reason.

        Args:
            destination: the destination's text.
            results: the sender's results.
            at: the time to stamp the rows with.
            out_dir: the output folder the sent paths lie in.

        Raises:
            OutputError: the database cannot be written (fatal).
        """
        if not results:
            return
        with self._errors("write"), self._transaction():
            known = self._db.execute(
                f"SELECT o.sop_instance_uid, o.path FROM {_JOIN} WHERE d.destination = ?",
                (destination,),
            ).fetchall()
            uids = {uid for uid, _ in known}
            by_path = {path: uid for uid, path in known}
            updates: list[tuple[str, str, str, str, str]] = []
            for result in results:
                uid = result.sop_instance_uid if result.sop_instance_uid in uids else None
                if uid is None and not result.sop_instance_uid:
                    uid = _uid_of_path(result.path, by_path, out_dir)
                if uid is None:
                    log.debug("delivery queue: a result for %s matches no row of %s",
                              result.path.name, destination)
                    continue
                if result.outcome.delivered:
                    status, error = DeliveryStatus.SENT, ""
                elif result.outcome is SendOutcome.FAILED:
                    status, error = DeliveryStatus.FAILED, result.reason
                else:
                    status, error = DeliveryStatus.PENDING, result.reason
                updates.append((str(status), error, at, uid, destination))
            self._db.executemany(
                "UPDATE deliveries SET status = ?, attempts = attempts + 1, "
                "last_error = ?, updated_at = ? "
                "WHERE sop_instance_uid = ? AND destination = ?",
                updates,
            )


    def series_states(
        self, destinations: Collection[str] | Mapping[str, Collection[ObjectKind]]
    ) -> dict[str, str]:
        """Each source series' delivery state over some destinations (the CSV column).

        Args:
            destinations: the destinations' texts; a mapping also limits each destination to
                its kinds (``{target.key: target.kinds}``).

        Returns:
            Source SeriesInstanceUID -> ``"failed"`` when any of its rows failed, else
            ``"pending"`` when any is pending, else ``"sent"``. Series without a row for those
            destinations are absent.
        """
        with self._errors("read"):
            found = self._db.execute(
                f"SELECT o.series_instance_uid, d.destination, o.kind, d.status FROM {_JOIN}"
            ).fetchall()
        chosen: Mapping[str, Collection[ObjectKind] | None] = (
            dict(destinations) if isinstance(destinations, Mapping)
            else dict.fromkeys(destinations)
        )
        seen: dict[str, set[str]] = {}
        for series, destination, kind, status in found:
            if destination not in chosen:
                continue
            kinds = chosen[destination]
            if kinds is not None and ObjectKind(kind) not in kinds:
                continue
            seen.setdefault(series, set()).add(status)
        states: dict[str, str] = {}
        for series, statuses in seen.items():
            for state in (DeliveryStatus.FAILED, DeliveryStatus.PENDING, DeliveryStatus.SENT):
                if state in statuses:
                    states[series] = str(state)
                    break
        return states

    def destinations(self) -> list[str]:
        """Every destination the queue has rows for, in the order first queued."""
        with self._errors("read"):
            found = self._db.execute(
                "SELECT destination FROM deliveries GROUP BY destination ORDER BY MIN(seq)"
            ).fetchall()
        return [destination for (destination,) in found]

    def counts(self, destination: str, *,
               kinds: Collection[ObjectKind] | None = None) -> dict[DeliveryStatus, int]:
        """How many rows of ``destination`` (of ``kinds``, default all) are in each status."""
        totals = dict.fromkeys(DeliveryStatus, 0)
        for row in self.rows(destination, kinds=kinds):
            totals[row.status] += 1
        return totals

    def last_error(self, destination: str, *,
                   kinds: Collection[ObjectKind] | None = None) -> str:
        """The error of the most recently updated undelivered row of ``destination`` (or ``""``)."""
        rows = [row for row in self.rows(destination, kinds=kinds,
                                         statuses=(DeliveryStatus.PENDING, DeliveryStatus.FAILED))
                if row.last_error]
        # newest first on a tie of times, so the latest row wins
        return max(reversed(rows), key=lambda row: row.updated_at).last_error if rows else ""
