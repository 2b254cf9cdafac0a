"""Nightly-cron safety: idempotent reruns, the run lock, settle, faults, bad input (kill -9 and
the other runs across processes: tests/e2e/test_nightly_e2e.py)."""

from __future__ import annotations

import errno
import os
import shlex
import time
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ggo_cli.cli.app import app
from ggo_cli.dicom.discovery import read_header
from tests.dicom_factory import make_ct_series
from tests.nightly_runs import csv_rows, cube_studies, manifest, runner, segment
from tests.onnx_models import base_metadata, write_band_model

REPO = Path(__file__).resolve().parents[2]




def test_second_run_only_skips_and_keeps_the_csv(tmp_path: Path, band_model_path: Path) -> None:
    root, series = cube_studies(tmp_path)
    out = tmp_path / "out"
    assert segment(root, "-o", out, "-m", band_model_path).exit_code == 0
    csv_before = (out / "ggo_volumes.csv").read_bytes()
    seg = out / csv_rows(out)[0]["seg_path"]
    seg_mtime = seg.stat().st_mtime_ns
    result = segment(root, "-o", out, "-m", band_model_path)
    assert result.exit_code == 0, result.output
    assert manifest(out)["counts"]["unchanged"] == len(series)
    assert manifest(out)["counts"]["slices_segmented"] == 0
    assert (out / "ggo_volumes.csv").read_bytes() == csv_before
    assert seg.stat().st_mtime_ns == seg_mtime
    assert len(list((out / ".ggo-cli" / "runs").glob("*.json"))) == 2


def test_changed_series_new_model_and_force_reprocess(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, series = cube_studies(tmp_path)
    out = tmp_path / "out"
    assert segment(root, "-o", out, "-m", band_model_path).exit_code == 0
    series[0].paths[0].unlink()  # the series lost an instance (end slice: spacing stays even)
    assert segment(root, "-o", out, "-m", band_model_path).exit_code == 0
    assert manifest(out)["counts"]["unchanged"] == len(series) - 1
    rows = {r["series_instance_uid"]: r for r in csv_rows(out)}
    assert rows[series[0].series_instance_uid]["n_slices"] == "11"
    assert len(rows) == len(series)
    other = write_band_model(tmp_path / "m2.onnx", 64, metadata=base_metadata(64, version="2"))
    assert segment(root, "-o", out, "-m", other).exit_code == 0
    assert manifest(out)["counts"]["unchanged"] == 0
    assert {r["model_version"] for r in csv_rows(out)} == {"2"}
    assert segment(root, "-o", out, "-m", other, "--force").exit_code == 0
    assert manifest(out)["counts"]["unchanged"] == 0


def test_deleted_seg_is_rebuilt(tmp_path: Path, band_model_path: Path) -> None:
    root, _ = cube_studies(tmp_path, 1)
    out = tmp_path / "out"
    assert segment(root, "-o", out, "-m", band_model_path).exit_code == 0
    seg = out / csv_rows(out)[0]["seg_path"]
    seg.unlink()
    assert segment(root, "-o", out, "-m", band_model_path).exit_code == 0
    assert seg.is_file()


def test_a_fresh_copy_is_segmented_with_the_default_settle(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, series = cube_studies(tmp_path, 1)  # files written just now, as by a hand copy
    out = tmp_path / "out"
    command = ["segment", str(root), "-o", str(out), "-m", str(band_model_path), "--no-progress"]
    result = runner.invoke(app, [*command, "--no-lung-mask"])  # no --settle: the default applies
    assert result.exit_code == 0, result.output
    (row,) = csv_rows(out)
    assert row["status"] == "ok", row["message"]
    assert (out / row["seg_path"]).is_file()
    assert "still arriving" not in result.stderr


def test_series_still_arriving_waits_for_a_later_run(tmp_path: Path, band_model_path: Path) -> None:
    root, series = cube_studies(tmp_path, 1)
    out = tmp_path / "out"
    command = ["segment", str(root), "-o", str(out), "-m", str(band_model_path), "--no-progress"]
    command += ["--no-lung-mask", "--settle", "5"]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    (row,) = csv_rows(out)
    assert row["status"] == "pending" and "--settle" in row["message"]
    assert not list(out.rglob("*.seg.dcm"))
    (warning,) = [line for line in result.stderr.splitlines() if "eligible series are" in line]
    assert " WARNING ggo_cli.cli.app: " in warning and warning.endswith(
        "all 1 eligible series are still arriving (a file modified within the last 5 min, "
        "--settle 5); nothing was segmented: rerun later or with --settle 0"
    )
    old = time.time() - 600
    for path in series[0].paths:
        os.utime(path, (old, old))
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert csv_rows(out)[0]["status"] == "ok"
    assert "still arriving" not in result.stderr


def test_no_all_pending_warning_while_some_series_are_done(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, series = cube_studies(tmp_path, 2)
    old = time.time() - 600
    for path in series[0].paths:
        os.utime(path, (old, old))
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["segment", str(root), "-o", str(out), "-m", str(band_model_path), "--no-progress",
         "--no-lung-mask", "--settle", "5"],
    )
    assert result.exit_code == 0, result.output
    status = {r["series_instance_uid"]: r["status"] for r in csv_rows(out)}
    assert status == {series[0].series_instance_uid: "ok", series[1].series_instance_uid: "pending"}
    assert "eligible series are still arriving" not in result.stderr


def _scheduled_commands() -> list[list[str]]:
    """The ``ggo-cli`` arguments of the README's crontab and systemd ExecStart lines."""
    commands = []
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        if "bin/ggo-cli " in line and not line.lstrip().startswith("#"):
            words = shlex.split(line.split("ExecStart=")[-1])
            start = next(k for k, word in enumerate(words) if word.endswith("bin/ggo-cli"))
            commands.append(words[start + 1 :])
    return commands


def test_the_readme_schedules_still_settle(tmp_path: Path, band_model_path: Path) -> None:
    commands = _scheduled_commands()
    assert len(commands) == 2  # crontab and systemd
    root, _ = cube_studies(tmp_path, 1)  # still being written by the PACS export
    for k, words in enumerate(commands):
        assert "--settle" in words and float(words[words.index("--settle") + 1]) >= 1
        out, log_file = tmp_path / f"out{k}", tmp_path / f"ggo{k}.log"
        local = {"/data/pacs-export": root, "/data/ggo-results": out}
        args = [str(local.get(word, word)) for word in words]
        args[args.index("--log-file") + 1] = str(log_file)
        args += ["-m", str(band_model_path), "--no-lung-mask"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert [r["status"] for r in csv_rows(out)] == ["pending"]
        assert "nothing was segmented" in log_file.read_text(encoding="utf-8")


def test_disk_full_is_a_clean_output_error(
    tmp_path: Path, band_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ggo_cli.atomic_output

    root, _ = cube_studies(tmp_path, 2)
    out = tmp_path / "out"

    def full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ggo_cli.atomic_output.os, "replace", full)
    result = segment(root, "-o", out, "-m", band_model_path)
    assert result.exit_code == 6, result.output
    assert "no space left on device" in result.stderr
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.dcm"))
    assert not (out / "ggo_volumes.csv").exists()


def test_bad_files_fail_their_series_and_the_run_goes_on(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, series = cube_studies(tmp_path, 2)
    odd = root / "Patiënt Ünïcode ü"
    odd.mkdir()
    for path in series[1].paths:
        path.rename(odd / path.name)
    truncated = series[0].paths[5]
    truncated.write_bytes(truncated.read_bytes()[:3000])
    (root / "garbage.dcm").write_bytes(b"DICM" * 100)
    (root / "empty").write_bytes(b"")
    os.symlink(root, root / "loop")
    result = segment(root, "-o", tmp_path / "out", "-m", band_model_path)
    assert result.exit_code == 7, result.output
    status = {
        r["series_instance_uid"]: (r["status"], r["message"]) for r in csv_rows(tmp_path / "out")
    }
    assert status[series[1].series_instance_uid][0] == "ok"
    bad_status, message = status[series[0].series_instance_uid]
    assert bad_status == "failed" and message and "\n" not in message


def test_enhanced_multiframe_ct_is_skipped_with_a_reason(
    tmp_path: Path, band_model_path: Path
) -> None:
    fs = make_ct_series(tmp_path)
    for path in fs.paths:
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(path)
    result = segment(fs.root, "-o", tmp_path / "out", "-m", band_model_path)
    assert result.exit_code == 3, result.output
    (row,) = csv_rows(tmp_path / "out")
    assert "multi-frame (enhanced) CT is not supported" in row["message"]


def test_pseudonym_column_is_salted_and_stable(
    tmp_path: Path, band_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = cube_studies(tmp_path, 1)
    monkeypatch.setenv("GGO_PSEUDONYM_SALT", "a-long-site-secret-salt")
    out = tmp_path / "out"
    assert segment(root, "-o", out, "-m", band_model_path, "--pseudonymize").exit_code == 0
    (row,) = csv_rows(out)
    assert len(row["patient_pseudonym"]) == 16 and "PHANTOM" not in row["patient_pseudonym"]
    assert "patient_id" not in row
    monkeypatch.setenv("GGO_PSEUDONYM_SALT", "short")
    assert segment(root, "-o", out, "-m", band_model_path, "--pseudonymize").exit_code == 2


@pytest.fixture(scope="module", params=["real", "synthetic"])
def seed_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real CT file from the shared data (when present) and a small synthetic one."""
    from tests.shared_data import REAL_CT_DIR, require_shared

    if request.param == "real":
        return sorted(require_shared(REAL_CT_DIR).glob("*.dcm"))[0].read_bytes()
    fs = make_ct_series(tmp_path_factory.mktemp("fuzz"), shape=(10, 16, 16))
    return fs.paths[0].read_bytes()


@settings(
    max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_header_reader_never_raises_on_mutated_files(
    seed_file: bytes, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    blob = bytearray(seed_file)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(blob) - 1))
        blob[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    path = tmp_path_factory.mktemp("mutant") / "x.dcm"
    path.write_bytes(bytes(blob))
    result = read_header(path)
    assert result is None or hasattr(result, "SOPInstanceUID")


def test_seg_frames_nonempty_writes_fewer_frames_and_reprocesses_once(
    tmp_path: Path, band_model_path: Path
) -> None:
    """``--seg-frames nonempty`` is an output option: switching to it redoes each series once
    (SEGs of non-empty frames only, same volumes); the default leaves a store reusable."""
    import numpy as np
    import pydicom

    hu = np.full((12, 48, 48), -1000.0, np.float32)  # slices 1-4: air only, nothing in the band
    hu[4:, 6:42, 6:42] = 40.0
    hu[6:9, 20:26, 20:26] = -500.0
    make_ct_series(tmp_path / "in", phantom=hu, folder="study", seed=1)
    root, out = tmp_path / "in", tmp_path / "out"
    assert segment(root, "-o", out, "-m", band_model_path).exit_code == 0
    (seg_path,) = out.rglob("*.seg.dcm")
    assert int(pydicom.dcmread(seg_path).NumberOfFrames) == 12
    (row,) = csv_rows(out)
    assert 0 < int(row["ggo_slice_count"]) <= 8
    assert segment(root, "-o", out, "-m", band_model_path).exit_code == 0
    assert manifest(out)["counts"]["unchanged"] == 1  # the default: nothing to redo
    result = segment(root, "-o", out, "-m", band_model_path, "--seg-frames", "nonempty")
    assert result.exit_code == 0, result.output
    assert manifest(out)["counts"]["unchanged"] == 0
    assert manifest(out)["options"]["seg_frames"] == "nonempty"
    assert int(pydicom.dcmread(seg_path).NumberOfFrames) == int(row["ggo_slice_count"])
    assert [r["ggo_volume_ml"] for r in csv_rows(out)] == [row["ggo_volume_ml"]]
    again = segment(root, "-o", out, "-m", band_model_path, "--seg-frames", "nonempty")
    assert again.exit_code == 0
    assert manifest(out)["counts"]["unchanged"] == 1
