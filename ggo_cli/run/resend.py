"""``ggo-cli send``: deliver what a results folder holds, without any inference.

The folder's lock is taken as a run takes it; every series the state store records as ``ok``
has the DICOM objects of its folder registered again (a folder written by an older ggo-cli, or
one whose files were replaced, is brought up to date), and one delivery pass sends what each
destination lacks, what it refused before (a person asked), and with ``force`` everything.
The CSV's ``delivery`` column is rebuilt; nothing else in the folder changes.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..domain import SeriesStatus
from ..errors import InputError
from ..writers.report_csv import PSEUDONYM_COLUMN
from .deliveries import deliver_pass, register_series
from .lock import RunLock
from .outcomes import now_utc
from .plan import write_results_csv
from .state import PATIENT_ID_KEY, STATE_FOLDER, STATE_NAME, StateStore

if TYPE_CHECKING:
    from ..delivery.deliver import DestinationReport, Target

log = logging.getLogger(__name__)


def _patient_column(rows: Sequence[dict[str, str]]) -> str | None:
    """The patient column the folder's CSV has (what its last run stored), or ``None``."""
    for key in (PATIENT_ID_KEY, PSEUDONYM_COLUMN):
        if any(key in row for row in rows):
            return key
    return None


def _series_folder(out_dir: Path, seg_path: str) -> Path | None:
    """The series folder of a stored ``seg_path``, or ``None`` when it is not below ``out_dir``."""
    if not seg_path:
        return None
    folder = (out_dir / seg_path).parent
    try:
        folder.resolve().relative_to(out_dir.resolve())
    except ValueError:
        return None
    return folder


def send_results(
    out_dir: Path, targets: Sequence[Target], *, force: bool = False
) -> tuple[DestinationReport, ...]:
    """Deliver a results folder's DICOM objects to ``targets``.

    Args:
        out_dir: the ``--out`` folder of earlier ``segment`` runs.
        targets: the destinations and the kinds each receives.
        force: send every object again, also those a destination already holds.

    Returns:
        One report per destination.

    Raises:
        InputError: the folder holds no ggo-cli state.
        RunLockedError: a run holds the folder.
        OutputError: the state database or an object cannot be read or written.
    """
    state = out_dir / STATE_FOLDER / STATE_NAME
    try:
        mode = os.lstat(state).st_mode
    except OSError:
        mode = 0
    if not stat.S_ISREG(mode):
        raise InputError(
            f"{out_dir} holds no ggo-cli results ({STATE_FOLDER}/{STATE_NAME} is missing); give "
            "the --out folder of a segment run"
        )
    group_readable = bool(mode & stat.S_IRGRP)  # keep the mode its runs gave it
    with (
        RunLock(out_dir, group_readable=group_readable),
        StateStore(out_dir, group_readable=group_readable) as store,
    ):
        rows = store.rows()
        registered = 0
        for row in rows:
            folder = _series_folder(out_dir, row.get("seg_path", ""))
            if row.get("status") != SeriesStatus.OK.value or folder is None:
                continue
            registered += register_series(
                store.queue, out_dir, folder, row.get("series_instance_uid", "")
            )
        log.info("%d DICOM objects of %d series in %s", registered, len(rows), out_dir)
        reports = deliver_pass(
            store.queue,
            targets,
            out_dir,
            at=now_utc(),
            enqueue=True,
            include_failed=True,
            force=force,
        )
        write_results_csv(
            store,
            out_dir,
            patient_column=_patient_column(rows),
            group_readable=group_readable,
            destinations={target.key: target.kinds for target in targets},
        )
    return reports
