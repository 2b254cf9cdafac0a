"""What a run does with each series, decided from the state store, and what it records.

:class:`RunPlan` tells per series whether work is due (a series that is skipped, still
arriving or unchanged since an earlier run gets its outcome at once), stores each outcome
and rebuilds the CSV (with each series' delivery state and its follow-up against the patient's
prior study, :mod:`ggo_cli.run.followup`) and, at the end of a run, the patients' trend pictures.
Whether a stored result still stands is :mod:`ggo_cli.run.reuse`'s to say.
:func:`check_output_location` refuses inputs and outputs that nest.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from ..analysis.explain_target import target_channel
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
from ..fsutil import GROUP_FILE_MODE, OutputTree, set_file_mode
from ..host import HostLimits
from ..onnx.explain_graph import default_explain_path, load_explain_info
from ..onnx.model_info import ModelInfo
from ..onnx.sessions import Sessions
from ..writers.report_csv import (
    DELIVERY_COLUMN,
    PSEUDONYM_COLUMN,
    PSEUDONYM_SALT_TAG_KEY,
    followup_cells,
    outcome_row,
    pseudonymize_row,
    salt_tag,
    write_rows,
)
from ..writers.trend_png import remove_trend_png, write_trend_png
from .deliveries import register_series
from .followup import (
    LINK_KEY,
    SERIES_NUMBER_KEY,
    follow_up,
    link_key,
    result_from_row,
    trend_points,
)
from .outcomes import now_utc, skipped_outcome
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

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


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
    stored = store.rows()
    followups = follow_up([result_from_row(row) for row in stored])
    rows = [
        {
            **row,
            **followup_cells(followups.get(row.get("series_instance_uid", ""))),
            DELIVERY_COLUMN: states.get(row.get("series_instance_uid", ""), ""),
        }
        for row in stored
    ]
    path = write_rows(rows, out_dir / CSV_NAME, patient_column=patient_column)
    if group_readable:  # written owner-only like every output, then widened
        set_file_mode(path, GROUP_FILE_MODE)
    return path


def _series_folder(out_dir: Path, row: Mapping[str, str]) -> Path | None:
    """A stored series' output folder: its SEG's folder, else ``<study>/<series>`` by UID."""
    seg_path = row.get("seg_path", "")
    if seg_path:
        folder = (out_dir / seg_path).parent
    else:
        study, series = row.get("study_instance_uid", ""), row.get("series_instance_uid", "")
        if not (_UID.match(study) and _UID.match(series)):
            return None
        folder = out_dir / study / series
    try:
        folder.relative_to(out_dir)
    except ValueError:
        return None
    return folder if ".." not in folder.relative_to(out_dir).parts else None


def write_trend_pictures(store: StateStore, out_dir: Path, *, tree: OutputTree) -> int:
    """Write each patient's ``trend.png`` and remove the stale ones; returns how many written.

    A patient with at least two dated studies with a GGO percentage of lung gets the picture
    in the folder of the latest study's representative series; any other series folder of
    the store loses an earlier run's ``trend.png``.

    Raises:
        OutputError: a picture cannot be written or a stale one removed.
    """
    rows = {row.get("series_instance_uid", ""): row for row in store.rows()}
    wanted: dict[Path, int] = {}
    pictures = trend_points([result_from_row(row) for row in rows.values()])
    for k, points in enumerate(pictures):
        folder = _series_folder(out_dir, rows[points[-1].series_instance_uid])
        if folder is not None:
            wanted[folder] = k
    for row in rows.values():
        folder = _series_folder(out_dir, row)
        if folder is not None and folder not in wanted:
            remove_trend_png(folder, tree=tree)
    for folder, k in wanted.items():
        write_trend_png(pictures[k], folder, tree=tree)
    if wanted:
        log.info("trend pictures of %d patients written", len(wanted))
    return len(wanted)


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
        # Each series' link key (keyed digest of its PatientID, never stored in clear), taken
        # when planned, so that every executor's outcomes link alike.
        self.link_keys: dict[str, str] = {}
        self.link_secret = b"" if cfg.explain_only else store.link_secret()
        # PatientID is kept in the store only with --include-patient-id; --pseudonymize keeps
        # the pseudonym alone (no PHI at rest otherwise).
        self.patient_column = cfg.patient_column
        if not cfg.explain_only:
            scrubbed = store.scrub_patient_keys(_stale_patient_keys(cfg.patient_column))
            if scrubbed:
                log.info("erased the patient IDs of %d series from the state store", scrubbed)
        # Validate the explain graph and the explained class before any work (a missing
        # explain.onnx, or --target consolidation of a GGO-only model, fails at once).
        explain_info = (
            None
            if cfg.explain is ExplainMode.OFF
            else load_explain_info(default_explain_path(model.path), model)
        )
        if explain_info is not None:
            target_channel(model, explain_info, cfg.explain_target)
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
        return {**row, **self._hidden_cells(outcome.series)}

    def _hidden_cells(self, series: SeriesInfo) -> dict[str, str]:
        """A row's hidden follow-up cells: the link key and SeriesNumber (when known)."""
        key = self.link_keys.get(series.series_instance_uid)
        if key is None:
            key = link_key(self.link_secret, series.patient_id)
        cells = {LINK_KEY: key} if key else {}
        if series.series_number is not None:
            cells[SERIES_NUMBER_KEY] = str(series.series_number)
        return cells

    def _refresh_row(self, series: SeriesInfo, stored: StoredSeries) -> None:
        """Give a reused row what this run's CSV needs from the series' header, in one write.

        The patient column now asked for (a row stored without it, or with a pseudonym made
        with another salt, gets it anew) and the hidden follow-up cells (a row stored before
        them, or with a key of another secret); nothing else in the row changes.
        """
        row = dict(stored.row)
        for key in (LINK_KEY, SERIES_NUMBER_KEY):
            row.pop(key, None)
        row.update(self._hidden_cells(series))
        if self._patient_column_stale(stored):
            fresh = self._row(replace(outcome_from_row(series, stored), reused=False))
            for key in (PATIENT_ID_KEY, PSEUDONYM_COLUMN, PSEUDONYM_SALT_TAG_KEY):
                row.pop(key, None)
                if key in fresh:
                    row[key] = fresh[key]
        if row == stored.row:
            return
        self.store.put(
            series,
            fingerprint=stored.fingerprint,
            model_sha256=stored.model_sha256,
            options=stored.options_digest,
            row=row,
            updated_at=now_utc(),
            seen=self.seen.get(series.series_instance_uid, stored.seen),
        )

    def _patient_column_stale(self, stored: StoredSeries) -> bool:
        """Whether a stored row lacks the patient column asked for (or has another salt's)."""
        if self.patient_column == PATIENT_ID_KEY:
            return PATIENT_ID_KEY not in stored.row
        if self.cfg.pseudonym_salt is not None:
            return stored.row.get(PSEUDONYM_SALT_TAG_KEY) != salt_tag(self.cfg.pseudonym_salt)
        return False

    def write_csv(self, *, trends: bool = False) -> Path:
        """Rebuild the CSV from the state store; returns its path.

        Args:
            trends: also write the patients' trend pictures (:func:`write_trend_pictures`;
                once, at the end of a run, after the SRs got their change since the prior
                study in :func:`ggo_cli.run.runner.run_segment`).
        """
        path = write_results_csv(
            self.store,
            self.cfg.out_dir,
            patient_column=self.cfg.patient_column,
            group_readable=self.cfg.group_readable,
            destinations={target.key: target.kinds for target in self.cfg.targets},
        )
        if trends:
            write_trend_pictures(self.store, self.cfg.out_dir, tree=self.cfg.tree)
        return path

    def plan(self, series: SeriesInfo) -> SeriesOutcome | None:
        """The outcome of a series that needs no work (skipped, pending, unchanged), else None."""
        fingerprint = series_fingerprint(series)
        uid = series.series_instance_uid
        self.fingerprints[uid] = fingerprint
        self.seen[uid] = settle_digest(series)
        self.link_keys[uid] = link_key(self.link_secret, series.patient_id)
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
            self._refresh_row(series, stored)
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
