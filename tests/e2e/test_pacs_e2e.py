"""Issue 17's acceptance on real Orthanc servers: the shipped model on the shared real chest CT,
its SEG, SR and SC sent by C-STORE and STOW-RS, and what each Orthanc then holds, read back
through its REST API (``/instances``, ``/instances/{id}/simplified-tags`` and
``/instances/{id}/file``).

The series is segmented once for the module (about a minute on two cores) and once more by the
destination-down test, which must segment. The other tests send copies of the first run's
results folder with ``ggo-cli send``. Orthanc keeps one instance per SOP Instance UID (a second
store of the same object is acknowledged and not kept), so "stored once" is checked on both
sides: per UID in Orthanc, and in the delivery reports, which count what was sent each time.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pynetdicom.association import Association
from typer.testing import CliRunner, Result

from ggo_cli.cli.app import app
from ggo_cli.config import ENV_MODEL
from ggo_cli.delivery.settings import ENV_CALLING_AE_TITLE, ENV_SEND, ENV_SEND_CONFIG
from ggo_cli.errors import EXIT_UNDELIVERED
from tests.dciodvfy import dciodvfy_errors
from tests.e2e.orthanc import HTTP_TIMEOUT_S, OrthancServer, running_orthanc
from tests.nightly_runs import csv_rows, manifest
from tests.shared_data import REAL_CT_DIR, require_shared

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
"""Comprehensive 3D SR Storage."""
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
"""Secondary Capture Image Storage."""
RESULT_CLASSES = {SEG_CLASS, SR_CLASS, SC_CLASS}
SERIES_FILES = ("ggo.seg.dcm", "ggo.sr.dcm", "sc/montage.dcm")
GGO_GROUP, RIGHT_LUNG_GROUP, LEFT_LUNG_GROUP = "GGO", "Right lung", "Left lung"
SR_COLUMNS = {
    (GGO_GROUP, codes.SCT.Volume, None): "ggo_volume_ml",
    (GGO_GROUP, codes.SCT.Volume, codes.SCT.Right): "right_ggo_volume_ml",
    (GGO_GROUP, codes.SCT.Volume, codes.SCT.Left): "left_ggo_volume_ml",
    (GGO_GROUP, codes.SCT.Ratio, codes.SCT.RightAndLeft): "ggo_percent_of_lung",
    (GGO_GROUP, codes.SCT.Ratio, codes.SCT.Right): "right_ggo_percent",
    (GGO_GROUP, codes.SCT.Ratio, codes.SCT.Left): "left_ggo_percent",
    (RIGHT_LUNG_GROUP, codes.SCT.Volume, None): "right_lung_volume_ml",
    (LEFT_LUNG_GROUP, codes.SCT.Volume, None): "left_lung_volume_ml",
}
"""Each NUM item of the SR, by (measurement group, concept, finding-site laterality), and the
CSV column that holds the same value (TID 1500 as ggo_cli/writers/sr_content.py codes it)."""
DEAD_PEER_LIMIT_S = 60.0
"""Far above a send of three files to a peer that dies (under a second here) and below the DIMSE
timeout (120 s) that a C-STORE to a dead peer used to wait out."""
QUALITATIVE_EVALUATIONS = ("UMLS", "C0034375")
"""TID 1500 row 12: the container of the QC flags."""
runner = CliRunner()
orthanc = contextmanager(running_orthanc)
"""A started Orthanc in a folder, stopped and removed on leaving the block."""


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """One instance Orthanc holds, with the UIDs its REST API reports."""

    orthanc_id: str
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str


@dataclass(frozen=True, slots=True)
class Run:
    """A ``segment`` run, with what it left in its folder and in its two destinations."""

    out: Path
    row: dict[str, str]
    manifest: dict[str, Any]
    objects: dict[str, str]
    """SOPInstanceUID -> SOPClassUID of the SEG, SR and SC the run wrote."""
    held: dict[str, list[StoredInstance]]
    """What each destination's Orthanc held after the run, by destination text."""


def _catalogue(server: OrthancServer) -> list[StoredInstance]:
    """Every instance ``server`` holds (``/instances`` and each one's simplified tags)."""
    held = []
    for orthanc_id in server.get("/instances"):
        tags = server.get(f"/instances/{orthanc_id}/simplified-tags")
        held.append(StoredInstance(
            orthanc_id=str(orthanc_id),
            sop_instance_uid=str(tags["SOPInstanceUID"]),
            sop_class_uid=str(tags["SOPClassUID"]),
            series_instance_uid=str(tags["SeriesInstanceUID"]),
            study_instance_uid=str(tags["StudyInstanceUID"]),
        ))
    return held


def _download(server: OrthancServer, orthanc_id: str) -> pydicom.Dataset:
    """The DICOM file Orthanc stored for an instance (``/instances/{id}/file``)."""
    url = f"{server.http_url}/instances/{orthanc_id}/file"
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        return pydicom.dcmread(io.BytesIO(response.read()))


def _assert_each_once(held: Sequence[StoredInstance], objects: dict[str, str]) -> None:
    """``held`` is exactly ``objects``: every one of them once, with its SOP class, nothing else."""
    per_uid = Counter(instance.sop_instance_uid for instance in held)
    assert per_uid == Counter(list(objects)), (per_uid, objects)
    assert {i.sop_instance_uid: i.sop_class_uid for i in held} == objects


def _code_of(item: pydicom.Dataset) -> tuple[str, str]:
    """(coding scheme, code value) of a code sequence item."""
    return str(item.CodingSchemeDesignator), str(item.CodeValue)


def _series_folder(out: Path) -> Path:
    """The one series folder of a results folder."""
    (seg,) = out.glob(f"*/*/{SERIES_FILES[0]}")
    return seg.parent


def _local_objects(out: Path) -> dict[str, str]:
    """SOPInstanceUID -> SOPClassUID of the SEG, SR and SC files a results folder holds."""
    folder = _series_folder(out)
    objects = {}
    for name in SERIES_FILES:
        header = pydicom.dcmread(folder / name, stop_before_pixels=True)
        objects[str(header.SOPInstanceUID)] = str(header.SOPClassUID)
    return objects


def _csv_row(out: Path) -> dict[str, str]:
    """The one row of the run's CSV."""
    (row,) = csv_rows(out)
    return row


def _reports(delivery: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Delivery reports (manifest or ``--json``) by destination."""
    return {report["destination"]: report for report in delivery}


def _segment(out: Path, *destinations: str) -> Result:
    """``ggo-cli segment REAL --out OUT --send ...``, as a hospital user runs it (the shipped
    model, default options)."""
    args = ["segment", str(require_shared(REAL_CT_DIR)), "--out", str(out)]
    for destination in destinations:
        args += ["--send", destination]
    return runner.invoke(app, args)


def _send(out: Path, destination: str, *options: str) -> Result:
    """``ggo-cli send OUT --send DEST --json [options]``."""
    return runner.invoke(app, ["send", str(out), "--send", destination, "--json", *options])


def _send_report(result: Result) -> dict[str, Any]:
    """The one destination report ``ggo-cli send --json`` printed."""
    (report,) = json.loads(result.stdout)["delivery"]
    return report  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def clean_environ() -> Iterator[None]:
    """No model, destination or AE title from the environment: the runs use the options alone."""
    with pytest.MonkeyPatch.context() as patch:
        for name in (ENV_MODEL, ENV_SEND, ENV_SEND_CONFIG, ENV_CALLING_AE_TITLE):
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def dimse_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """The Orthanc the module's run sends to by C-STORE."""
    yield from running_orthanc(tmp_path_factory.mktemp("pacs-dimse") / "orthanc")


@pytest.fixture(scope="module")
def web_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """The Orthanc the module's run sends to by STOW-RS."""
    yield from running_orthanc(tmp_path_factory.mktemp("pacs-web") / "orthanc")


@pytest.fixture(scope="module")
def first_run(
    clean_environ: None,
    dimse_pacs: OrthancServer,
    web_pacs: OrthancServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Run:
    """Done-when 1's run: the real series segmented and sent to both Orthancs."""
    out = tmp_path_factory.mktemp("first-run") / "out"
    dests = (dimse_pacs.dicom_destination, web_pacs.dicomweb_url)
    result = _segment(out, *dests)
    assert result.exit_code == 0, result.output
    return Run(
        out=out,
        row=_csv_row(out),
        manifest=manifest(out),
        objects=_local_objects(out),
        held={dest: _catalogue(server) for dest, server in zip(dests, (dimse_pacs, web_pacs),
                                                                 strict=True)},
    )


@pytest.fixture
def results_copy(first_run: Run, tmp_path: Path) -> Path:
    """A copy of the first run's results folder (its queue knows only the first run's two
    destinations), for ``ggo-cli send``."""
    return Path(shutil.copytree(first_run.out, tmp_path / "out", symlinks=True))


def test_segment_sends_one_seg_sr_and_sc_series_into_each_orthanc_in_the_ct_study(
    first_run: Run,
) -> None:
    ct = sorted(require_shared(REAL_CT_DIR).glob("*.dcm"))[0]
    study_uid = str(pydicom.dcmread(ct, stop_before_pixels=True).StudyInstanceUID)
    assert set(first_run.objects.values()) == RESULT_CLASSES
    assert first_run.row["status"] == "ok"
    assert first_run.row["delivery"] == "sent"
    for destination, held in first_run.held.items():
        _assert_each_once(held, first_run.objects)
        series_of_class = {i.sop_class_uid: i.series_instance_uid for i in held}
        assert len(set(series_of_class.values())) == len(RESULT_CLASSES), destination
        assert {instance.study_instance_uid for instance in held} == {study_uid}, destination
    reports = _reports(first_run.manifest["delivery"])
    assert set(reports) == set(first_run.held)
    for report in reports.values():
        assert (report["stored"], report["sent"], report["pending"]) == (3, 3, 0), report
        assert report["complete"] is True


def test_the_sr_stored_in_orthanc_holds_the_csv_volumes_to_the_last_printed_digit(
    first_run: Run, web_pacs: OrthancServer
) -> None:
    held = first_run.held[web_pacs.dicomweb_url]
    (sr_id,) = [i.orthanc_id for i in held if i.sop_class_uid == SR_CLASS]
    (seg_uid,) = [i.sop_instance_uid for i in held if i.sop_class_uid == SEG_CLASS]
    sr = hd.sr.Comprehensive3DSR.from_dataset(_download(web_pacs, sr_id))
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    found: dict[str, str] = {}
    for group in report.get_volumetric_roi_measurement_groups():
        assert group.referenced_segment is not None
        assert group.referenced_segment.referenced_sop_instance_uid == seg_uid
        for measurement in group.get_measurements():
            lateralities = [
                hd.sr.CodedConcept.from_dataset(item.ConceptCodeSequence[0])
                for site in measurement.finding_sites
                for item in site.get("ContentSequence", [])
            ]
            key = (str(group.tracking_identifier), measurement.name,
                   lateralities[0] if lateralities else None)
            column = SR_COLUMNS[key]
            assert column not in found, key
            found[column] = str(measurement[0].MeasuredValueSequence[0].NumericValue)
    assert set(found) == set(SR_COLUMNS.values())
    for column, text in found.items():
        cell = first_run.row[column]
        assert cell and Decimal(text) == Decimal(cell), (column, text, cell)
    assert Decimal(found["ggo_volume_ml"]) > 0
    flags = [
        flag.TextValue
        for item in sr.ContentSequence
        if _code_of(item.ConceptNameCodeSequence[0]) == QUALITATIVE_EVALUATIONS
        for flag in item.ContentSequence
    ]
    assert ";".join(flags) == first_run.row["qc_flags"]


@pytest.mark.parametrize("name", SERIES_FILES[1:])
def test_dciodvfy_reports_no_error_on_the_written_sr_and_sc(first_run: Run, name: str) -> None:
    assert dciodvfy_errors(_series_folder(first_run.out) / name) == []


def test_a_second_identical_run_sends_nothing(
    first_run: Run, dimse_pacs: OrthancServer, web_pacs: OrthancServer
) -> None:
    again = _segment(first_run.out, dimse_pacs.dicom_destination, web_pacs.dicomweb_url)
    assert again.exit_code == 0, again.output
    after = manifest(first_run.out)
    assert after["counts"]["unchanged"] == 1
    assert after["counts"]["slices_segmented"] == 0
    for report in _reports(after["delivery"]).values():
        assert (report["attempted"], report["sent"], report["pending"]) == (0, 3, 0), report
    for destination, server in ((dimse_pacs.dicom_destination, dimse_pacs),
                                (web_pacs.dicomweb_url, web_pacs)):
        assert server.instance_count() == len(first_run.objects)
        assert set(_catalogue(server)) == set(first_run.held[destination])
    assert _csv_row(first_run.out)["delivery"] == "sent"


def test_orthancs_down_during_the_run_get_everything_once_from_the_next_run_without_segmenting(
    clean_environ: None, tmp_path: Path
) -> None:
    servers = (OrthancServer(tmp_path / "dimse"), OrthancServer(tmp_path / "web"))
    dests = (servers[0].dicom_destination, servers[1].dicomweb_url)
    out = tmp_path / "out"
    try:
        for server in servers:
            server.start()
            server.stop()
        down = _segment(out, *dests)
        assert down.exit_code == EXIT_UNDELIVERED, down.output
        objects = _local_objects(out)  # every local output is written
        assert set(objects.values()) == RESULT_CLASSES
        assert (_series_folder(out) / "overlay.png").is_file()
        row = _csv_row(out)
        assert (row["status"], row["delivery"]) == ("ok", "pending")
        assert float(row["ggo_volume_ml"]) > 0
        reports = _reports(manifest(out)["delivery"])
        assert set(reports) == set(dests)
        for report in reports.values():
            assert (report["stored"], report["sent"], report["pending"]) == (0, 0, 3), report
            assert report["complete"] is False and report["last_error"]

        for server in servers:
            server.start()  # same ports, same (empty) storage
        up = _segment(out, *dests)
        assert up.exit_code == 0, up.output
        after = manifest(out)
        assert after["counts"]["unchanged"] == 1
        assert after["counts"]["slices_segmented"] == 0
        assert _local_objects(out) == objects  # nothing written again
        assert _csv_row(out)["delivery"] == "sent"
        for report in _reports(after["delivery"]).values():
            assert (report["attempted"], report["stored"]) == (3, 3), report
            assert (report["sent"], report["pending"], report["complete"]) == (3, 0, True)
        for server in servers:
            _assert_each_once(_catalogue(server), objects)
    finally:
        for server in servers:
            server.remove()


def test_an_orthanc_killed_in_the_middle_of_a_send_ends_with_every_object_stored_once(
    clean_environ: None, results_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orthanc dies (SIGKILL) right after storing the first object of the association; the
    send stops there, and the send after the restart delivers exactly the rest, once."""
    objects = _local_objects(results_copy)
    server = OrthancServer(tmp_path / "orthanc")
    store = Association.send_c_store
    stores: list[int] = []

    def store_then_crash(assoc: Association, *args: Any, **kwargs: Any) -> pydicom.Dataset:
        status = store(assoc, *args, **kwargs)
        if not stores:
            server.kill()  # the next C-STORE follows at once, before pynetdicom sees the close
        stores.append(1)
        return status

    try:
        server.start()
        with monkeypatch.context() as patch:
            patch.setattr(Association, "send_c_store", store_then_crash)
            started = time.monotonic()
            cut = _send(results_copy, server.dicom_destination)
            seconds = time.monotonic() - started
        assert cut.exit_code == EXIT_UNDELIVERED, cut.output
        # Not the 120 s DIMSE timeout per dead peer: the wait ends once the association has.
        assert seconds < DEAD_PEER_LIMIT_S, f"the send waited {seconds:.0f} s for a dead peer"
        report = _send_report(cut)
        assert (report["attempted"], report["stored"], report["transient"]) == (3, 1, 2), report
        assert (report["sent"], report["pending"]) == (1, 2), report

        server.start()
        (first,) = _catalogue(server)  # the one object stored before the crash survived it
        assert first.sop_instance_uid in objects
        resumed = _send(results_copy, server.dicom_destination)
        assert resumed.exit_code == 0, resumed.output
        report = _send_report(resumed)
        assert (report["attempted"], report["stored"], report["sent"]) == (2, 2, 3), report
        _assert_each_once(_catalogue(server), objects)
        assert _send_report(_send(results_copy, server.dicom_destination))["attempted"] == 0
        assert _csv_row(results_copy)["delivery"] == "sent"
    finally:
        server.remove()


def test_send_delivers_a_results_folder_by_stow_rs_into_an_empty_orthanc(
    clean_environ: None, results_copy: Path, tmp_path: Path
) -> None:
    objects = _local_objects(results_copy)
    with orthanc(tmp_path / "orthanc") as server:
        assert server.instance_count() == 0
        sent = _send(results_copy, server.dicomweb_url)
        assert sent.exit_code == 0, sent.output
        report = _send_report(sent)
        assert (report["stored"], report["sent"], report["complete"]) == (3, 3, True), report
        _assert_each_once(_catalogue(server), objects)


def test_send_objects_sr_and_sc_stores_no_seg(
    clean_environ: None, results_copy: Path, tmp_path: Path
) -> None:
    objects = _local_objects(results_copy)
    wanted = {uid: cls for uid, cls in objects.items() if cls != SEG_CLASS}
    with orthanc(tmp_path / "orthanc") as server:
        sent = _send(results_copy, server.dicomweb_url, "--send-objects", "sr,sc")
        assert sent.exit_code == 0, sent.output
        assert _send_report(sent)["sent"] == 2
        _assert_each_once(_catalogue(server), wanted)
        assert SEG_CLASS not in {i.sop_class_uid for i in _catalogue(server)}
