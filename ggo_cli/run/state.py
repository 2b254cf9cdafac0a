"""Per-output-folder state, so a nightly run never redoes finished work.

One SQLite database, ``<out>/.ggo-cli/state.sqlite``, keyed by SeriesInstanceUID. Each entry
holds the fingerprint of the series' instance set (file names and sizes), the model file's
SHA-256 (weights and metadata), a digest of the options that change the outputs, and the
series' CSV row. A series whose three keys match, and whose SEG is still in place, is skipped
without decoding a pixel; a series that gained or lost instances, a new model or changed
options reprocess it. Every update is its own committed transaction, so a run killed at any
instant leaves the store consistent, and ``ggo_volumes.csv`` is rebuilt from it (one row per
series, latest status).

The database holds PatientID only with ``--include-patient-id``. With ``--pseudonymize`` a row
holds the salted pseudonym (and a digest naming the salt, so a changed salt redoes it from the
header), never the ID; otherwise rows hold neither. What an earlier run stored and this run does
not ask for is erased (:meth:`StateStore.scrub_patient_keys`, with SQLite's ``secure_delete``
so that the freed pages are zeroed). The file is created owner-only (``0600``, ``0640`` with
``--group-readable``; SQLite gives its journal the same mode), through ``O_NOFOLLOW`` in a
folder checked for links.

``seen`` records, per series, the digest of its files' names, sizes and modification times as
the latest run saw them (:func:`settle_digest`): a series whose files a clock-skewed modality
stamped in the future is settled once a later run sees them unchanged.

The same database holds the delivery queue (:attr:`StateStore.queue`): every DICOM object the
folder holds and, per destination, whether it was sent.

Every row also keeps, in hidden cells that never reach the CSV, the series' *link key* (a keyed
digest of PatientID, :func:`ggo_cli.run.followup.link_key`) and its SeriesNumber, so that the
follow-up of a patient's studies works whatever the patient options. The key's secret, random
and made on first use, is kept apart from the keys, in ``.ggo-cli/link.key``
(:meth:`StateStore.link_secret`), owner-only (``0600``) even with ``--group-readable``:
PatientIDs are short enough to guess, so whoever holds both the keys and the secret could find
them by trying every ID; a group member who may read the database does not get the secret.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..delivery.queue import DeliveryQueue
from ..domain import SeriesInfo
from ..errors import OutputError
from ..fsutil import CLOEXEC, NOFOLLOW, OutputTree, create_temp_file, output_error

log = logging.getLogger(__name__)

STATE_FOLDER = ".ggo-cli"
STATE_NAME = "state.sqlite"
SCHEMA_VERSION = 2
PATIENT_ID_KEY = "patient_id"
LINK_SECRET_NAME = "link.key"
"""The file of the folder's link secret, beside the database."""
LINK_SECRET_BYTES = 32
"""Random bytes of the folder's link secret (:func:`ggo_cli.run.followup.link_key`)."""
LINK_SECRET_MODE = 0o600
"""The link secret's mode, whatever ``--group-readable`` says."""
_SEEN_COLUMN = "ALTER TABLE series ADD COLUMN seen TEXT NOT NULL DEFAULT ''"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    options_digest TEXT NOT NULL,
    status TEXT NOT NULL,
    row_json TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    seen TEXT NOT NULL DEFAULT ''
)
"""


@dataclass(frozen=True, slots=True)
class StoredSeries:
    """What the store remembers of one series.

    Attributes:
        fingerprint: instance-set fingerprint when it was processed.
        model_sha256: the model file's SHA-256 then.
        options_digest: digest of the output-changing options then.
        status: its status then (``ok``, ``failed``, ``skipped``, ``pending``).
        row: its CSV row (``patient_id`` only when the CSV needs it).
        seen: :func:`settle_digest` of the series as the latest run saw it (``""``: unknown).
    """

    fingerprint: str
    model_sha256: str
    options_digest: str
    status: str
    row: dict[str, str]
    seen: str = ""


def series_fingerprint(series: SeriesInfo) -> str:
    """Digest of a series' instance set: its files' names within the series and sizes.

    Discovery keeps one file per SOPInstanceUID, so a series that gains or loses an instance,
    or whose file is rewritten with another size, gets a new fingerprint. No pixel is read.
    """
    digest = hashlib.sha256()
    for path in series.files:
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        digest.update(f"{path.name}\0{size}\n".encode())
    digest.update(str(len(series.files)).encode())
    return digest.hexdigest()


def settle_digest(series: SeriesInfo) -> str:
    """Digest of a series' files' names, sizes and modification times (ns); no pixel is read.

    Two runs that compute the same digest saw the series unchanged in between, whatever the
    clocks say (see ``--settle``).
    """
    digest = hashlib.sha256()
    for path in series.files:
        try:
            info = path.stat()
            digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0?\n".encode())
    return digest.hexdigest()


def options_digest(options: Mapping[str, object]) -> str:
    """Digest of the options that change a series' outputs (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


class StateStore:
    """The SQLite state of one output folder. Use as a context manager.

    Args:
        out_dir: the output folder (the database lives in its ``.ggo-cli`` subfolder).
        group_readable: the database's mode is ``0640`` rather than ``0600``.

    Raises:
        OutputError: the database cannot be created, opened or written (fatal); the database
            or its journal is a link (fatal).
    """

    def __init__(self, out_dir: Path, *, group_readable: bool = False) -> None:
        self.path = out_dir / STATE_FOLDER / STATE_NAME
        tree = OutputTree(out_dir, group_readable)
        tree.file(self.path)
        tree.file(self.path.with_name(self.path.name + "-journal"))
        with self._errors("open"):
            # Created here, not by SQLite: never through a link, and with an explicit mode.
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(self.path, flags, tree.file_mode)
            try:
                if hasattr(os, "fchmod"):
                    os.fchmod(fd, tree.file_mode)
            finally:
                os.close(fd)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=DELETE")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA secure_delete=ON")  # erased patient IDs are zeroed
            self._db.execute(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(series)")}
            if "seen" not in columns:  # a store written by an older ggo-cli
                self._db.execute(_SEEN_COLUMN)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self.queue = DeliveryQueue(self._db)
        """The delivery queue of the folder's DICOM objects (tables of their own here)."""

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise OutputError(
                f"cannot {action} the state database {self.path}: {exc}; check free space and "
                "permissions of the --out folder (or move the damaged file away to start afresh)",
                fatal=True,
            ) from exc

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def link_secret(self) -> bytes:
        """The folder's link secret: :data:`LINK_SECRET_BYTES` random bytes, made on first use.

        Kept in :data:`LINK_SECRET_NAME` beside the database, mode :data:`LINK_SECRET_MODE`
        (never read through a link). Made once: written to a temporary file, then linked to
        its name, which fails if another process made it first (its secret is then used); and
        kept for good, since a new secret would unlink every earlier study from the later ones.

        Raises:
            OutputError: the file cannot be read or written, or is not a secret of this kind.
        """
        path = self.path.with_name(LINK_SECRET_NAME)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_RDONLY | NOFOLLOW | CLOEXEC)
            except FileNotFoundError:
                self._make_link_secret(path)
                continue
            except OSError as exc:
                raise output_error(exc, path, "read") from exc
            with os.fdopen(fd, "rb") as fh:
                secret = fh.read(LINK_SECRET_BYTES + 1)
            if len(secret) != LINK_SECRET_BYTES:
                raise OutputError(f"{path} is not a link secret of {LINK_SECRET_BYTES} bytes; "
                                  "move it away (later studies will not link to earlier ones)")
            return secret
        raise OutputError(f"cannot make the link secret {path}")

    @staticmethod
    def _make_link_secret(path: Path) -> None:
        """Write a new secret to ``path`` unless one appears there first."""
        try:
            temp = create_temp_file(path, LINK_SECRET_MODE)
        except OSError as exc:
            raise output_error(exc, path) from exc
        try:
            with open(temp, "wb") as fh:
                fh.write(secrets.token_bytes(LINK_SECRET_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(temp, path)
            except FileExistsError:
                pass  # another process made it first: its secret wins
        except OSError as exc:
            raise output_error(exc, path) from exc
        finally:
            temp.unlink(missing_ok=True)

    def get(self, series_uid: str) -> StoredSeries | None:
        """The stored entry of a series, or ``None``."""
        with self._errors("read"):
            found = self._db.execute(
                "SELECT fingerprint, model_sha256, options_digest, status, row_json, seen "
                "FROM series WHERE series_instance_uid = ?",
                (series_uid,),
            ).fetchone()
        if found is None:
            return None
        return StoredSeries(found[0], found[1], found[2], found[3], json.loads(found[4]), found[5])

    def put(
        self,
        series: SeriesInfo,
        *,
        fingerprint: str,
        model_sha256: str,
        options: str,
        row: Mapping[str, str],
        updated_at: str,
        seen: str = "",
    ) -> None:
        """Record (or replace) a series' latest state in one committed transaction."""
        with self._errors("write"):
            self._db.execute(
                "INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    series.series_instance_uid,
                    series.study_instance_uid,
                    fingerprint,
                    model_sha256,
                    options,
                    row["status"],
                    json.dumps(dict(row), sort_keys=True),
                    updated_at,
                    seen,
                ),
            )

    def mark_seen(self, series_uid: str, seen: str) -> None:
        """Remember how a series looked to this run, keeping its stored row and status."""
        with self._errors("write"):
            self._db.execute(
                "UPDATE series SET seen = ? WHERE series_instance_uid = ?", (seen, series_uid)
            )

    def scrub_patient_keys(self, keys: Sequence[str] = (PATIENT_ID_KEY,)) -> int:
        """Erase the given patient keys from every stored row (one transaction); returns how many.

        With ``secure_delete`` on, the pages that held them are zeroed, not just unlinked.
        """
        if not keys:
            return 0
        where = " OR ".join("row_json LIKE ?" for _ in keys)
        with self._errors("write"):
            found = self._db.execute(
                f"SELECT series_instance_uid, row_json FROM series WHERE {where}",
                tuple(f'%"{key}"%' for key in keys),
            ).fetchall()
            changed = []
            for uid, row_json in found:
                row = json.loads(row_json)
                if any(key in row for key in keys):
                    for key in keys:
                        row.pop(key, None)
                    changed.append((json.dumps(row, sort_keys=True), uid))
            if not changed:
                return 0
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "UPDATE series SET row_json = ? WHERE series_instance_uid = ?", changed
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return len(changed)

    def rows(self) -> list[dict[str, str]]:
        """Every stored CSV row, ordered by study and series UID."""
        with self._errors("read"):
            found = self._db.execute(
                "SELECT row_json FROM series ORDER BY study_instance_uid, series_instance_uid"
            ).fetchall()
        return [json.loads(r[0]) for r in found]
