"""The run's SR and SC, and its delivery to a PACS: queue, retries, exit codes, ``ggo-cli send``.

A real pynetdicom Storage SCP on 127.0.0.1 (tests/delivery/storage_scp.py) stands in for the
PACS; the Orthanc tests in tests/e2e/test_pacs_e2e.py do the same against a real server.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage
from typer.testing import CliRunner

from ggo_cli.cli.app import app
from ggo_cli.errors import EXIT_UNDELIVERED
from tests.delivery.storage_scp import LOOPBACK, SCP_AE_TITLE, storage_scp
from tests.nightly_runs import csv_rows, cube_studies, manifest, segment

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
runner = CliRunner()


def _series_folder(out: Path) -> Path:
    """The one series folder of ``out``."""
    (seg,) = out.glob("*/*/ggo.seg.dcm")
    return seg.parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def test_the_sr_and_sc_are_written_and_follow_the_options(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, _ = cube_studies(tmp_path, n=1)
    out = tmp_path / "out"
    result = segment(root, "-o", out, "--model", band_model_path)
    assert result.exit_code == 0, result.output
    folder = _series_folder(out)
    seg = pydicom.dcmread(folder / "ggo.seg.dcm", stop_before_pixels=True)
    sr = pydicom.dcmread(folder / "ggo.sr.dcm")
    sc = pydicom.dcmread(folder / "sc" / "montage.dcm", stop_before_pixels=True)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR_CLASS
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == sc.StudyInstanceUID
    evidence = {
        item.SeriesInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for item in study.ReferencedSeriesSequence
    }
    assert seg.SeriesInstanceUID in evidence
    assert len({seg.SeriesInstanceUID, sr.SeriesInstanceUID, sc.SeriesInstanceUID}) == 3

    # Asking for fewer objects reprocesses once and leaves no outdated object behind.
    result = segment(root, "-o", out, "--model", band_model_path, "--no-sr", "--sc", "none")
    assert result.exit_code == 0, result.output
    assert manifest(out)["counts"]["unchanged"] == 0
    assert not (folder / "ggo.sr.dcm").exists()
    assert list((folder / "sc").glob("*.dcm")) == []


def test_a_deleted_sr_makes_the_series_be_written_again(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, _ = cube_studies(tmp_path, n=1)
    out = tmp_path / "out"
    assert segment(root, "-o", out, "--model", band_model_path).exit_code == 0
    sr_path = _series_folder(out) / "ggo.sr.dcm"
    sr_path.unlink()
    assert segment(root, "-o", out, "--model", band_model_path).exit_code == 0
    assert manifest(out)["counts"]["unchanged"] == 0
    assert sr_path.is_file()
    assert segment(root, "-o", out, "--model", band_model_path).exit_code == 0
    assert manifest(out)["counts"]["unchanged"] == 1


def test_send_stores_seg_sr_and_sc_once(tmp_path: Path, band_model_path: Path) -> None:
    root, _ = cube_studies(tmp_path, n=1)
    out = tmp_path / "out"
    with storage_scp() as scp:
        dest = scp.destination()
        result = segment(root, "-o", out, "--model", band_model_path, "--send", dest)
        assert result.exit_code == 0, result.output
        classes = sorted(sop_class for _, sop_class, _ in scp.received.stores)
        assert classes == sorted(
            [SEG_CLASS, COMPREHENSIVE_3D_SR_CLASS, SecondaryCaptureImageStorage]
        )
        assert {ae for ae, _, _ in scp.received.stores} == {"GGO_CLI"}
        assert csv_rows(out)[0]["delivery"] == "sent"
        (report,) = manifest(out)["delivery"]
        assert (report["destination"], report["sent"], report["pending"]) == (dest, 3, 0)
        assert report["complete"] is True

        again = segment(root, "-o", out, "--model", band_model_path, "--send", dest)
        assert again.exit_code == 0, again.output
        assert len(scp.received.stores) == 3  # nothing sent twice
        assert manifest(out)["counts"]["unchanged"] == 1


def test_a_destination_down_keeps_the_results_and_the_next_run_delivers_them(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, _ = cube_studies(tmp_path, n=2)
    out = tmp_path / "out"
    port = _free_port()
    dest = f"dicom://{SCP_AE_TITLE}@{LOOPBACK}:{port}"
    down = segment(root, "-o", out, "--model", band_model_path, "--send", dest)
    assert down.exit_code == EXIT_UNDELIVERED, down.output
    assert len(list(out.glob("*/*/ggo.seg.dcm"))) == 2  # every local output is written
    assert len(list(out.glob("*/*/ggo.sr.dcm"))) == 2
    assert [row["status"] for row in csv_rows(out)] == ["ok", "ok"]
    assert [row["delivery"] for row in csv_rows(out)] == ["pending", "pending"]
    (report,) = manifest(out)["delivery"]
    assert (report["sent"], report["pending"], report["complete"]) == (0, 6, False)
    assert report["last_error"]
    # One WARNING for the destination in the log, none of pynetdicom's own ERROR lines.
    warnings = [line for line in down.output.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and f"delivery to {dest}" in warnings[0]
    assert "pynetdicom" not in down.output and "Association request failed" not in down.output

    with storage_scp(port=port) as scp:
        up = segment(root, "-o", out, "--model", band_model_path, "--send", dest)
        assert up.exit_code == 0, up.output
        assert manifest(out)["counts"]["unchanged"] == 2  # nothing segmented again
        assert manifest(out)["counts"]["slices_segmented"] == 0
        uids = scp.received.uids()
        assert len(uids) == 6 and len(set(uids)) == 6
        assert [row["delivery"] for row in csv_rows(out)] == ["sent", "sent"]


def test_send_objects_chooses_what_goes(tmp_path: Path, band_model_path: Path) -> None:
    root, _ = cube_studies(tmp_path, n=1)
    out = tmp_path / "out"
    with storage_scp() as scp:
        result = segment(
            root, "-o", out, "--model", band_model_path,
            "--send", scp.destination(), "--send-objects", "sr",
        )
        assert result.exit_code == 0, result.output
        assert [c for _, c, _ in scp.received.stores] == [COMPREHENSIVE_3D_SR_CLASS]


def test_the_send_command_delivers_a_results_folder_without_inference(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, _ = cube_studies(tmp_path, n=1)
    out = tmp_path / "out"
    assert segment(root, "-o", out, "--model", band_model_path).exit_code == 0
    assert csv_rows(out)[0]["delivery"] == ""
    with storage_scp() as scp:
        dest = scp.destination()
        first = runner.invoke(app, ["send", str(out), "--send", dest])
        assert first.exit_code == 0, first.output
        assert len(scp.received.stores) == 3
        assert csv_rows(out)[0]["delivery"] == "sent"
        page = (out / "report.html").read_text(encoding="utf-8")
        assert "Delivery" in page and ">sent<" in page  # the page was rebuilt with the column
        second = runner.invoke(app, ["send", str(out), "--send", dest])
        assert second.exit_code == 0, second.output
        assert len(scp.received.stores) == 3
        forced = runner.invoke(app, ["send", str(out), "--send", dest, "--force"])
        assert forced.exit_code == 0, forced.output
        assert len(scp.received.stores) == 6
    # The next run without --send still shows the state the queue holds.
    assert segment(root, "-o", out, "--model", band_model_path).exit_code == 0
    assert csv_rows(out)[0]["delivery"] == "sent"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--send", "dicom://PACS@127.0.0.1:104"], "holds no ggo-cli results"),
        ([], "no destination"),
        (["--send", "ftp://pacs/x"], "not supported"),
    ],
)
def test_the_send_command_refuses_with_one_line(
    tmp_path: Path, args: list[str], needle: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GGO_SEND", raising=False)
    monkeypatch.delenv("GGO_SEND_CONFIG", raising=False)
    result = runner.invoke(app, ["send", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output


def test_info_checks_each_destination_as_a_send_would(
    tmp_path: Path, band_model_path: Path
) -> None:
    """``ggo-cli info --send``: C-ECHO each DICOM destination; 9 when one does not answer."""
    with storage_scp() as scp:
        up = runner.invoke(
            app, ["info", "--model", str(band_model_path), "--send", scp.destination(), "--json"]
        )
        assert up.exit_code == 0, up.output
        (entry,) = json.loads(up.stdout)["destinations"]
        assert (entry["destination"], entry["reachable"]) == (scp.destination(), True)
        assert scp.received.stores == []
    down = runner.invoke(
        app,
        ["info", "--model", str(band_model_path), "--send",
         f"dicom://{SCP_AE_TITLE}@{LOOPBACK}:{_free_port()}", "--json"],
    )
    assert down.exit_code == EXIT_UNDELIVERED, down.output
    assert json.loads(down.stdout)["destinations"][0]["reachable"] is False
