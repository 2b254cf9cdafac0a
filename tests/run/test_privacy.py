"""Hardening (issue 15): patient-named folders and forged UIDs in logs, the CSV and the manifest.

Hospital exports often name folders and files after the patient ("DOE^JANE_12345"). A series is
named by its UID and a digest of its folder (``folder #1a2b3c4d``) in INFO logs, messages, the
CSV and the manifest; the path itself only at DEBUG. Control characters in a UID or a name are
escaped in every log line and CSV cell.
"""

from __future__ import annotations

import csv
import hashlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pydicom
import pytest

from ggo_cli.cli.display import review_lines
from ggo_cli.domain import SeriesInfo, SeriesOutcome, SeriesStatus
from tests.dicom_factory import make_ct_series

REPO = Path(__file__).resolve().parents[2]
PATIENT_FOLDER = "DOE^JANE_12345"
SECOND_PATIENT = "ROE^RICHARD_67890"
FORGED_UID = "1.2.9.7\n2026-01-01 00:00:00,000 INFO ggo_cli.x: forged\x1b[31m"  # 64 chars
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ |^  \| ")


def test_folder_id_is_the_start_of_the_sha256_of_the_location() -> None:
    series = SeriesInfo("1.2", "1.2.3", (), f"{PATIENT_FOLDER}/CT")
    expected = hashlib.sha256(f"{PATIENT_FOLDER}/CT".encode()).hexdigest()[:8]
    assert series.folder_id == expected
    assert series.label == f"series 1.2.3 (folder #{expected})"


def test_redact_replaces_whole_names_only() -> None:
    folder = Path("/data/in") / PATIENT_FOLDER / "CT"
    files = (folder / "0001.dcm", folder / "IM_JANE.dcm")
    series = SeriesInfo("1.2", "1.2.12345.3", files, f"{PATIENT_FOLDER}/CT", patient_id="12345")
    tag = f"<folder #{series.folder_id}>"
    assert series.redact(f"cannot read {folder}/0001.dcm") == "cannot read <file>"
    assert series.redact(f"cannot list {folder}: denied") == f"cannot list {tag}: denied"
    assert series.redact("IM_JANE cannot be decoded") == "<file> cannot be decoded"
    # UIDs, short names ("CT") and words that merely contain a name are kept.
    kept = "series 1.2.12345.3: 3 CT slices; 123456 voxels"
    assert series.redact(kept) == kept
    assert series.redact("PatientID 12345.") == "PatientID <PatientID>."
    assert series.redact("") == ""


def test_review_lines_name_the_folder_by_its_digest() -> None:
    series = SeriesInfo("1.2", "1.2.3", (), f"{PATIENT_FOLDER}/CT")
    outcome = SeriesOutcome(series, SeriesStatus.OK, qc_flags=("low_lung_volume",))
    lines = review_lines([outcome])
    assert lines[1] == f"  series 1.2.3 (folder #{series.folder_id}): low_lung_volume"
    assert all("DOE" not in line for line in lines)


def _rename_files(folder: Path, stem: str) -> list[Path]:
    """Name a series' files after the patient, as some exports do."""
    renamed = []
    for i, path in enumerate(sorted(folder.glob("*.dcm"))):
        target = path.with_name(f"{stem}_{i:04d}.dcm")
        path.rename(target)
        renamed.append(target)
    return renamed


def _forge_uid(folder: Path, uid: str) -> None:
    """Give every file of a series a SeriesInstanceUID with a newline and an escape sequence."""
    saved = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns of the invalid UID on assignment
            for path in folder.glob("*.dcm"):
                ds = pydicom.dcmread(path)
                ds.SeriesInstanceUID = uid
                ds.save_as(path)
    finally:
        pydicom.config.settings.writing_validation_mode = saved


def _segment(
    inputs: Path, out: Path, model: Path, log_file: Path
) -> subprocess.CompletedProcess[str]:
    """``ggo-cli segment`` in a fresh process (its real stderr), with a log file."""
    command = [sys.executable, "-m", "ggo_cli", "--log-file", str(log_file), "segment"]
    command += [str(inputs), "-o", str(out), "-m", str(model), "--no-progress"]
    command += ["--no-lung-mask", "--decode-workers", "0"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def patient_named_run(
    tmp_path_factory: pytest.TempPathFactory, band_model_path: Path
) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """A run over three series: one fine, one with a truncated file, one with a forged UID,
    each in a folder (and files) named after a patient."""
    root = tmp_path_factory.mktemp("privacy")
    inputs = root / "in"
    good = make_ct_series(root, shape=(12, 64, 64), folder=f"in/{PATIENT_FOLDER}")
    _rename_files(good.paths[0].parent, PATIENT_FOLDER)
    broken = make_ct_series(root, shape=(12, 64, 64), folder=f"in/{SECOND_PATIENT}", seed=1)
    files = _rename_files(broken.paths[0].parent, SECOND_PATIENT)
    data = files[5].read_bytes()
    files[5].write_bytes(data[: len(data) - 3000])  # header intact, pixel data cut short
    forged = make_ct_series(root, shape=(12, 64, 64), folder="in/forged\n\x1b[31mname", seed=2)
    _forge_uid(forged.paths[0].parent, FORGED_UID)
    result = _segment(inputs, root / "out", band_model_path, root / "run.log")
    return result, root / "out", root / "run.log"


def test_a_patient_named_folder_reaches_no_log_line_csv_cell_or_manifest(
    patient_named_run: tuple[subprocess.CompletedProcess[str], Path, Path],
) -> None:
    result, out, log_file = patient_named_run
    assert result.returncode in (4, 7), result.stderr  # some series failed
    texts = {
        "stderr": result.stderr,
        "log file": log_file.read_text(encoding="utf-8"),
        "CSV": (out / "ggo_volumes.csv").read_text(encoding="utf-8"),
        "manifest": (out / "run_manifest.json").read_text(encoding="utf-8"),
    }
    for where, text in texts.items():
        for name in ("DOE", "JANE", "12345", "ROE^", "RICHARD", "67890"):
            assert name not in text, f"{name!r} in the {where}:\n{text}"
    assert "(folder #" in result.stderr


def test_a_forged_uid_gives_one_log_line_per_record_and_one_csv_row_per_series(
    patient_named_run: tuple[subprocess.CompletedProcess[str], Path, Path],
) -> None:
    result, out, log_file = patient_named_run
    for text in (result.stderr, log_file.read_text(encoding="utf-8")):
        assert "\x1b" not in text
        lines = text.splitlines()
        assert all(RECORD_START.match(line) for line in lines), text
        assert not any(" INFO ggo_cli.x: forged" in line[:40] for line in lines)
        assert any("1.2.9.7\\n2026-01-01" in line for line in lines), text
    data = (out / "ggo_volumes.csv").read_bytes()
    assert b"\x1b" not in data and data.count(b"\n") == 4  # header + three series
    with (out / "ggo_volumes.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    assert any(r["series_instance_uid"].startswith("1.2.9.7\\n2026") for r in rows)


def test_redact_removes_patient_attribute_values_read_from_the_header(tmp_path: Path) -> None:
    """A library's exception may quote a header value: the patient's are replaced."""
    made = make_ct_series(tmp_path, shape=(10, 32, 32), folder="in/s1")
    saved = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        ds = pydicom.dcmread(made.paths[0])
        ds.PatientName = "DOE^JANE^MARIE"
        ds.PatientBirthDate = "19800101"
        ds.OtherPatientIDs = ["A-998877", "B-112233"]
        ds.save_as(made.paths[0])
    finally:
        pydicom.config.settings.writing_validation_mode = saved
    series = SeriesInfo("1.2", "1.2.3", tuple(made.paths), "s1")
    message = (
        "unexpected ValueError: PatientName 'DOE^JANE^MARIE' (JANE DOE) born 19800101 "
        "is invalid; other IDs A-998877 and B-112233"
    )
    redacted = series.redact(message)
    for value in ("DOE", "JANE", "MARIE", "19800101", "998877", "112233"):
        assert value not in redacted, redacted
    assert redacted.startswith("unexpected ValueError: PatientName '<PatientName>'")
