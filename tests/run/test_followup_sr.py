"""The change since the prior study in the SRs of real runs (issue 21): the later study's SR
holds the CSV's comparison, the first study's none; an identical second run writes and queues
nothing; a third study leaves the second's SR as it is and gets a comparison of its own."""

from __future__ import annotations

import csv
import logging
import shutil
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from typer.testing import CliRunner

from ggo_cli.cli.app import app
from ggo_cli.config import SR_NAME
from ggo_cli.fsutil import OutputTree
from ggo_cli.onnx.model_info import load_model_info
from ggo_cli.run.followup_sr import update_followup_srs
from ggo_cli.run.state import StateStore
from ggo_cli.synthetic.ct_writer import SeriesAttributes, write_ct_series
from ggo_cli.synthetic.phantom import GgoLesion, make_chest_phantom
from ggo_cli.writers.sr_change import CHANGE_TRACKING_ID
from tests.dciodvfy import dciodvfy_errors, dciodvfy_path
from tests.shared_data import in_ci
from tests.writers.test_sr_change import assert_sr_dciodvfy_warnings

SHAPE = (12, 64, 64)
SPACING_MM = (5.0, 5.0, 5.0)
PATIENT = "PAT-FOLLOWUP-SR"
RADII = {"20240101": 8.0, "20240201": 14.0, "20240315": 20.0}


def _study(root: Path, date: str, seed: int) -> None:
    lesion = GgoLesion((6.0, 32.0, 18.0), (RADII[date],) * 3)
    phantom = make_chest_phantom(SHAPE, SPACING_MM, seed=3, ggo_lesions=[lesion])
    attributes = SeriesAttributes(patient_id=PATIENT, patient_name="DOE^JANE", study_date=date)
    write_ct_series(phantom, root / f"study-{seed}", attributes=attributes, seed=seed)


def _segment(inputs: Path, out: Path, model: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["segment", str(inputs), "-o", str(out), "-m", str(model), "--no-progress", "--settle",
         "0", "--decode-workers", "0", "--png", "none", "--sc", "none"],
    )
    assert result.exit_code == 0, result.output


@dataclass(frozen=True)
class State:
    """What a run left: CSV rows and SR files by study date, SRs' (mtime, SOP UID), queue."""

    rows: dict[str, dict[str, str]]
    srs: dict[str, Path]
    stamps: dict[str, tuple[int, str]]
    queue: list[tuple[str, str, str]]


def _state(out: Path) -> State:
    with (out / "ggo_volumes.csv").open(newline="", encoding="utf-8") as fh:
        rows = {row["study_date"]: row for row in csv.DictReader(fh)}
    srs = {date: (out / row["seg_path"]).parent / SR_NAME for date, row in rows.items()}
    stamps = {
        date: (path.stat().st_mtime_ns, str(pydicom.dcmread(path).SOPInstanceUID))
        for date, path in srs.items()
    }
    with sqlite3.connect(out / ".ggo-cli" / "state.sqlite") as db:
        queue = db.execute(
            "SELECT sop_instance_uid, kind, path FROM delivery_objects ORDER BY seq"
        ).fetchall()
    db.close()
    return State(rows, srs, stamps, queue)


@dataclass(frozen=True)
class Runs:
    first: State
    second: State
    third: State


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, band_model_path: Path) -> Runs:
    """Run 1: two studies of one patient; run 2: the same again; run 3: a third study."""
    root = tmp_path_factory.mktemp("followup-sr")
    inputs, out = root / "in", root / "out"
    _study(inputs, "20240101", 1)
    _study(inputs, "20240201", 2)
    _segment(inputs, out, band_model_path)
    first = _state(out)
    _segment(inputs, out, band_model_path)
    second = _state(out)
    _study(inputs, "20240315", 3)
    _segment(inputs, out, band_model_path)
    return Runs(first, second, _state(out))


def _change(path: Path) -> dict[str, object] | None:
    """The SR's change group read back with highdicom (``None`` when it has none)."""
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(path).content)
    groups = report.get_image_measurement_groups()
    if not groups:
        return None
    (group,) = groups
    assert str(group.tracking_identifier) == CHANGE_TRACKING_ID
    found: dict[str, object] = {m.name.value: float(m.value) for m in group.get_measurements()}
    found["trend"] = [e[0].ConceptCodeSequence[0].CodeValue
                      for e in group.get_qualitative_evaluations() if e.name.value == "GGO-TREND"]
    prior = next(item for item in group[0].ContentSequence if item.ValueType == "CONTAINER")
    found["prior"] = {item.ValueType: str(item.get("UID") or item.get("Date"))
                      for item in prior.ContentSequence}
    return found


def _expected(rows: dict[str, dict[str, str]], date: str, prior: str) -> dict[str, object]:
    """The CSV's follow-up cells of a study as the SR's change group holds them."""
    row = rows[date]
    return {
        "DAYS-SINCE-PRIOR": float(row["days_since_prior"]),
        "GGO-VOL-CHANGE": float(row["ggo_change_ml"]),
        "GGO-PCT-CHANGE": float(row["ggo_percent_of_lung_change"]),
        "trend": [{"increased": "35105006", "decreased": "1250004", "stable": "58158008"}[
            row["trend"]]],
        "prior": {"UIDREF": rows[prior]["study_instance_uid"], "DATE": prior},
    }


def test_the_later_studys_sr_holds_the_csvs_comparison(runs: Runs) -> None:
    rows = runs.first.rows
    assert rows["2024-02-01"]["trend"] == "increased"
    assert _change(runs.first.srs["2024-02-01"]) == _expected(
        {k.replace("-", ""): v for k, v in rows.items()}, "20240201", "20240101"
    )
    sr = pydicom.dcmread(runs.first.srs["2024-02-01"])
    prior_seg = pydicom.dcmread(runs.first.srs["2024-01-01"].parent / "ggo.seg.dcm",
                                stop_before_pixels=True)
    assert [str(item.ReferencedSOPInstanceUID)
            for study in sr.PertinentOtherEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence] == [prior_seg.SOPInstanceUID]


def test_the_first_studys_sr_holds_none(runs: Runs) -> None:
    assert _change(runs.first.srs["2024-01-01"]) is None


def test_the_rewritten_sr_is_queued_in_place_of_the_first(runs: Runs) -> None:
    queued_srs = {path: uid for uid, kind, path in runs.first.queue if kind == "sr"}
    out = runs.first.srs["2024-01-01"].parents[2]
    assert queued_srs == {
        path.relative_to(out).as_posix(): runs.first.stamps[date][1]
        for date, path in runs.first.srs.items()
    }


def test_dciodvfy_passes_on_the_rewritten_sr(runs: Runs) -> None:
    if dciodvfy_path() is None and in_ci():
        pytest.fail("dciodvfy (Debian package dicom3tools) is not installed")
    path = runs.first.srs["2024-02-01"]
    assert dciodvfy_errors(path) == []
    assert_sr_dciodvfy_warnings(path)


def test_a_second_identical_run_writes_and_queues_nothing(runs: Runs) -> None:
    assert runs.second.stamps == runs.first.stamps
    assert runs.second.queue == runs.first.queue


def test_a_third_study_leaves_the_second_sr_and_gets_a_comparison(runs: Runs) -> None:
    third = runs.third
    for date in ("2024-01-01", "2024-02-01"):
        assert third.stamps[date] == runs.second.stamps[date]
    rows = {k.replace("-", ""): v for k, v in third.rows.items()}
    assert rows["20240315"]["prior_study_date"] == "2024-02-01"
    assert _change(third.srs["2024-03-15"]) == _expected(rows, "20240315", "20240201")
    # queued: the earlier objects as they were, then the new study's SEG and its final SR
    assert third.queue[: len(runs.second.queue)] == runs.second.queue
    added = third.queue[len(runs.second.queue):]
    assert [(kind, uid) for uid, kind, _ in added][1:] == [("sr", third.stamps["2024-03-15"][1])]
    assert [kind for _, kind, _ in added] == ["seg", "sr"]


def _stale_copy(runs: Runs, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the output folder whose latest SR is the first study's (so not up to date)."""
    out = tmp_path / "out"
    shutil.copytree(runs.third.srs["2024-01-01"].parents[2], out)
    latest = out / runs.third.srs["2024-03-15"].relative_to(runs.third.srs["2024-01-01"]
                                                            .parents[2])
    shutil.copyfile(runs.third.srs["2024-01-01"], latest)
    return out, latest


def test_an_sr_that_cannot_be_written_again_costs_a_warning(
    runs: Runs, band_model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out, latest = _stale_copy(runs, tmp_path)
    (latest.parent / "ggo.seg.dcm").write_bytes(b"not a SEG")
    before = latest.read_bytes()
    with StateStore(out) as store, caplog.at_level(logging.WARNING):
        written = update_followup_srs(store, out, load_model_info(band_model_path),
                                      tree=OutputTree(out))
    assert written == 0
    assert latest.read_bytes() == before
    series_uid = runs.third.rows["2024-03-15"]["series_instance_uid"]
    assert [r.levelname for r in caplog.records if series_uid in r.getMessage()] == ["WARNING"]


def test_a_series_of_another_model_keeps_its_sr(
    runs: Runs, band_model_path: Path, tmp_path: Path
) -> None:
    out, latest = _stale_copy(runs, tmp_path)
    before = latest.read_bytes()
    other = replace(load_model_info(band_model_path), file_sha256="0" * 64)
    with StateStore(out) as store:
        assert update_followup_srs(store, out, other, tree=OutputTree(out)) == 0
    assert latest.read_bytes() == before
    with StateStore(out) as store:  # with the run's model it is written again
        model = load_model_info(band_model_path)
        assert update_followup_srs(store, out, model, tree=OutputTree(out)) == 1
    assert _change(latest) == _change(runs.third.srs["2024-03-15"])


def test_a_send_run_delivers_the_sr_with_its_comparison_and_the_next_run_sends_nothing(
    tmp_path: Path, band_model_path: Path
) -> None:
    """The SRs get their comparison before the run's second delivery pass, so the PACS gets
    the final SR of the later study (and not the one written with the series first)."""
    from tests.delivery.storage_scp import storage_scp

    inputs, out = tmp_path / "in", tmp_path / "out"
    _study(inputs, "20240101", 1)
    _study(inputs, "20240201", 2)
    args = ["-m", str(band_model_path), "--no-progress", "--settle", "0", "--decode-workers",
            "0", "--png", "none", "--sc", "none"]
    with storage_scp() as scp:
        dest = scp.destination()
        first = CliRunner().invoke(app, ["segment", str(inputs), "-o", str(out), *args,
                                         "--send", dest])
        assert first.exit_code == 0, first.output
        state = _state(out)
        on_disk = {uid for _, uid in state.stamps.values()}
        stored = {uid for _, _, uid in scp.received.stores}
        assert on_disk <= stored  # both SRs as they are now, the later one with its comparison
        assert len(scp.received.stores) == 4  # two SEGs and two SRs, each once
        again = CliRunner().invoke(app, ["segment", str(inputs), "-o", str(out), *args,
                                         "--send", dest])
        assert again.exit_code == 0, again.output
        assert len(scp.received.stores) == 4  # nothing new to send
