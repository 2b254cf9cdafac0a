"""What a run does with each series, decided from the state store, and what it records.

:class:`RunPlan` tells per series whether work is due (a series that is skipped, still
arriving or unchanged since an earlier run gets its outcome at once), stores each outcome
and rebuilds the CSV (with each series' delivery state). Whether a stored result still stands
is :mod:`ggo_cli.run.reuse`'s to say. :func:`check_output_location` refuses inputs and outputs
that nest.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from ..config import (
    CSV_NAME,
    ExplainMode,
    RunConfig,
)
from ..delivery.queue import ObjectKind
from ..domain import (
    SeriesInfo,
    SeriesOutcome,
    SeriesStatus,
)
from ..errors import InputError
from ..fsutil import GROUP_FILE_MODE, set_file_mode
from ..host import HostLimits
from ..onnx.explain_graph import default_explain_path, load_explain_info
from ..onnx.model_info import ModelInfo
from ..onnx.sessions import Sessions
from ..writers.report_csv import (
    DELIVERY_COLUMN,
    PSEUDONYM_COLUMN,
    PSEUDONYM_SALT_TAG_KEY,
    outcome_row,
    pseudonymize_row,
    salt_tag,
    write_rows,
)
from .deliveries import register_series
from .pipeline import now_utc, skipped_outcome
from .reuse import (
    outcome_from_row,
    output_options,
    reusable,
    still_arriving,
)
from .state import (
    PATIENT_ID_KEY,
    StateStore,
    StoredSeries,
    options_digest,
    series_fingerprint,
    settle_digest,
)

log = logging.getLogger(__name__)



def check_output_location(inputs: Sequence[Path], out_dir: Path) -> None:
    """Refuse missing inputs and input and output folders nested either way.

    An output folder inside an input would be walked as input; an input inside the output
    folder could be touched by the run (the sweep of stale temporary files, replaced outputs).
    Both are compared after resolving links, so a link cannot hide the nesting.

    Raises:
        InputError: an input is missing, or an input and the output folder nest.
    """
    out = out_dir.resolve()
    for source in inputs:
        if not source.exists():
            raise InputError(f"input not found: {source} (give an existing file or folder)")
        resolved = source.resolve()
        root = resolved if resolved.is_dir() else resolved.parent
        if out == root or root in out.parents:
            raise InputError(
                f"output folder {out_dir} is inside the input {source}; choose an output "
                "folder outside the input tree (the input is never modified)"
            )
        if out in resolved.parents:
            raise InputError(
                f"input {source} is inside the output folder {out_dir}; move the input "
                "or choose an output folder outside it (ggo-cli cleans its output folder)"
            )


def _stale_patient_keys(patient_column: str | None) -> tuple[str, ...]:
    """The patient keys stored rows must lose for this run's CSV (a PatientID unless asked)."""
    if patient_column == PATIENT_ID_KEY:
        return (PSEUDONYM_COLUMN, PSEUDONYM_SALT_TAG_KEY)
    if patient_column == PSEUDONYM_COLUMN:
        return (PATIENT_ID_KEY,)
    return (PATIENT_ID_KEY, PSEUDONYM_COLUMN, PSEUDONYM_SALT_TAG_KEY)


def write_results_csv(
    store: StateStore,
    out_dir: Path,
    *,
    patient_column: str | None,
    group_readable: bool,
    destinations: Mapping[str, Collection[ObjectKind]] | None = None,
) -> Path:
    """Rebuild ``ggo_volumes.csv`` from the state store, with each series' delivery state.

    Args:
        store: the output folder's state store.
        out_dir: the output folder.
        patient_column: the patient column the CSV gets (``None``, ``patient_id`` or
            ``patient_pseudonym``).
        group_readable: widen the CSV to ``0640`` (``--group-readable``).
        destinations: the destinations the ``delivery`` column reports on, each with the
            kinds it receives; ``None`` or empty: every destination the queue has rows for
            (the state an earlier run left).

    Returns:
        The CSV's path.
    """
    queue = store.queue
    states = queue.series_states(destinations or queue.destinations())
    rows = [
        {**row, DELIVERY_COLUMN: states.get(row.get("series_instance_uid", ""), "")}
        for row in store.rows()
    ]
    path = write_rows(rows, out_dir / CSV_NAME, patient_column=patient_column)
    if group_readable:  # written owner-only like every output, then widened
        set_file_mode(path, GROUP_FILE_MODE)
    return path


class RunPlan:
    """One locked run over an output folder: decides per series, records, rebuilds the CSV.

    Args:
        cfg: the run configuration.
        model: the validated model.
        store: the output folder's state store (opened under the run's lock).
        limits: the cores of the run's process (:meth:`ggo_cli.host.HostLimits.of_this_process`).
    """

    def __init__(
        self, cfg: RunConfig, model: ModelInfo, store: StateStore, *, limits: HostLimits
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.store = store
        self.limits = limits
        self.options = options_digest(output_options(cfg, model))
        # Fingerprint of each series as planned (before any work), recorded with its outcome,
        # and how its files looked (names, sizes, mtimes) for settling.
        self.fingerprints: dict[str, str] = {}
        self.seen: dict[str, str] = {}
        # PatientID is kept in the store only with --include-patient-id; --pseudonymize keeps
        # the pseudonym alone (no PHI at rest otherwise).
        self.patient_column = cfg.patient_column
        if not cfg.explain_only:
            scrubbed = store.scrub_patient_keys(_stale_patient_keys(cfg.patient_column))
            if scrubbed:
                log.info("erased the patient IDs of %d series from the state store", scrubbed)
        # Validate the explain graph before any work (a missing explain.onnx fails at once).
        explain_info = (
            None
            if cfg.explain is ExplainMode.OFF
            else load_explain_info(default_explain_path(model.path), model)
        )
        self.sessions = Sessions(cfg, model, explain_info, limits=limits)

    def record(self, outcome: SeriesOutcome, fingerprint: str) -> None:
        """Store a series' outcome and rebuild the CSV.

        A ``pending`` series that has a result (``ok``, ``failed`` or ``skipped``) keeps it:
        its row, volumes included, stays in the CSV until the new result replaces it; only
        how its files looked is remembered (and the log says it is pending).
        """
        uid = outcome.series.series_instance_uid
        seen = self.seen.get(uid, "")
        if outcome.status is SeriesStatus.PENDING:
            stored = self.store.get(uid)
            if stored is not None and stored.status != SeriesStatus.PENDING.value:
                self.store.mark_seen(uid, seen)
                return
        row = self._row(outcome)
        self.store.put(
            outcome.series,
            fingerprint=fingerprint,
            model_sha256=self.model.file_sha256,
            options=self.options,
            row=row,
            updated_at=now_utc(),
            seen=seen,
        )
        self.write_csv()

    def _row(self, outcome: SeriesOutcome) -> dict[str, str]:
        """The row to store: the CSV cells plus the patient column asked for (ID or pseudonym)."""
        row = outcome_row(
            outcome,
            self.cfg.out_dir,
            model_name=self.model.name,
            model_version=self.model.version,
            include_patient_id=self.patient_column is not None,
        )
        if self.cfg.pseudonym_salt is not None:
            row = pseudonymize_row(row, self.cfg.pseudonym_salt)
        return row

    def _add_patient_column(self, series: SeriesInfo, stored: StoredSeries) -> None:
        """Give a reused row the patient column the CSV now asks for, from the series' header.

        A row stored without it, or with a pseudonym made with another salt, gets it anew;
        nothing else in the row changes.
        """
        if self.patient_column == PATIENT_ID_KEY:
            if PATIENT_ID_KEY in stored.row:
                return
        elif self.cfg.pseudonym_salt is not None:
            if stored.row.get(PSEUDONYM_SALT_TAG_KEY) == salt_tag(self.cfg.pseudonym_salt):
                return
        else:
            return
        fresh = self._row(replace(outcome_from_row(series, stored), reused=False))
        row = dict(stored.row)
        for key in (PATIENT_ID_KEY, PSEUDONYM_COLUMN, PSEUDONYM_SALT_TAG_KEY):
            row.pop(key, None)
            if key in fresh:
                row[key] = fresh[key]
        self.store.put(
            series,
            fingerprint=stored.fingerprint,
            model_sha256=stored.model_sha256,
            options=stored.options_digest,
            row=row,
            updated_at=now_utc(),
            seen=self.seen.get(series.series_instance_uid, stored.seen),
        )

    def write_csv(self) -> Path:
        """Rebuild the CSV from the state store; returns its path."""
        return write_results_csv(
            self.store,
            self.cfg.out_dir,
            patient_column=self.cfg.patient_column,
            group_readable=self.cfg.group_readable,
            destinations={target.key: target.kinds for target in self.cfg.targets},
        )

    def plan(self, series: SeriesInfo) -> SeriesOutcome | None:
        """The outcome of a series that needs no work (skipped, pending, unchanged), else None."""
        fingerprint = series_fingerprint(series)
        uid = series.series_instance_uid
        self.fingerprints[uid] = fingerprint
        self.seen[uid] = settle_digest(series)
        if not series.eligible:
            return skipped_outcome(series)
        stored = self.store.get(uid)
        if still_arriving(
            series,
            self.cfg.settle_minutes,
            seen_before=stored.seen if stored is not None else "",
            seen_now=self.seen[uid],
        ):
            outcome = SeriesOutcome(
                series=series,
                status=SeriesStatus.PENDING,
                message=f"files modified within the last {self.cfg.settle_minutes:g} minutes "
                "(still arriving?); left for a later run (see --settle)",
                n_slices=len(series.files),
                processed_at=now_utc(),
            )
            log.info("%s pending: %s", series.label, outcome.message)
            log.debug("%s is in %s", series.label, series.location)
            return outcome
        if self.cfg.explain_only:
            stored = None
        if stored is not None and reusable(
            stored, self.cfg, fingerprint, self.model, self.options
        ):
            log.debug(
                "series %s unchanged since %s",
                series.series_instance_uid,
                stored.row.get("processed_at", "?"),
            )
            self._add_patient_column(series, stored)
            return outcome_from_row(series, stored)
        return None

    def finish(self, outcome: SeriesOutcome) -> SeriesOutcome:
        """Record a series' outcome (not for unchanged ones, nor in explain-only runs).

        The DICOM objects of a series written in this run are registered in the delivery
        queue first, so that a run killed after the record still has them queued.
        """
        if not self.cfg.explain_only and not outcome.reused:
            uid = outcome.series.series_instance_uid
            if outcome.status is SeriesStatus.OK and outcome.seg_path is not None:
                register_series(self.store.queue, self.cfg.out_dir, outcome.seg_path.parent, uid)
            self.record(outcome, self.fingerprints[uid])
        return outcome
