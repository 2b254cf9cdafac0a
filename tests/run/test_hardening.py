"""Issue 15 hardening of the output folder: links, nesting, permissions, PatientID at rest,
write errors (full disk, transient failures), clock-skewed settling and kept rows."""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from ggo_cli.cli.app import app
from tests.dicom_factory import FactorySeries, make_ct_series
from tests.phantoms import make_cube_phantom

runner = CliRunner()
PATIENT_ID = "PHANTOM-001"  # what ct_writer writes by default


def _segment(*args: str | Path, settle: str = "0") -> Any:
    """``ggo-cli segment`` without the lung mask (the cube phantoms have no lungs)."""
    return runner.invoke(
        app, ["segment", *map(str, args), "--no-progress", "--settle", settle, "--no-lung-mask"]
    )


def _study(tmp_path: Path, *, seed: int = 1) -> tuple[Path, FactorySeries]:
    root = tmp_path / "in"
    series = make_ct_series(
        root,
        phantom=make_cube_phantom((12, 48, 48), (2.5, 0.7, 0.7), cube_voxels=(4, 6, 6)),
        folder=f"study{seed}",
        seed=seed,
    )
    return root, series


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "ggo_volumes.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _tree_digest(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with its bytes' SHA-256 and its mtime (links not followed)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = hashlib.sha256(path.read_bytes()).hexdigest()
            found[str(path.relative_to(folder))] = f"{data} {path.stat().st_mtime_ns}"
    return found


def _mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o777


# -- links planted in the output folder -------------------------------------------------------


def test_a_planted_lock_link_is_refused_and_its_target_untouched(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, _ = _study(tmp_path)
    out = tmp_path / "out"
    (out / ".ggo-cli").mkdir(parents=True)
    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    (out / ".ggo-cli" / "lock").symlink_to(victim)
    result = _segment(root, "-o", out, "-m", band_model_path)
    assert result.exit_code == 6, result.output
    assert "lock: it is a symbolic link inside the output folder" in result.stderr
    assert victim.read_text() == "precious\n"


def test_a_planted_state_link_is_refused(tmp_path: Path, band_model_path: Path) -> None:
    root, _ = _study(tmp_path)
    out = tmp_path / "out"
    (out / ".ggo-cli").mkdir(parents=True)
    victim = tmp_path / "victim.db"
    victim.touch()  # empty: SQLite would make it a database
    (out / ".ggo-cli" / "state.sqlite").symlink_to(victim)
    result = _segment(root, "-o", out, "-m", band_model_path)
    assert result.exit_code == 6, result.output
    assert "state.sqlite: it is a symbolic link" in result.stderr
    assert victim.read_bytes() == b""


def test_a_planted_study_link_is_refused_and_nothing_lands_elsewhere(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, series = _study(tmp_path)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / series.study_instance_uid).symlink_to(elsewhere, target_is_directory=True)
    before = _tree_digest(root)
    result = _segment(root, "-o", out, "-m", band_model_path)
    assert result.exit_code == 6, result.output
    assert f"{series.study_instance_uid}: it is a symbolic link" in result.stderr
    assert list(elsewhere.rglob("*")) == []
    assert _tree_digest(root) == before


def test_the_stale_temporary_sweep_never_follows_a_link(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, _ = _study(tmp_path)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    bait = elsewhere / ".data.0123456789ab.tmp"  # named like a temporary of ours
    bait.write_text("keep")
    (out / "planted").symlink_to(elsewhere, target_is_directory=True)
    _segment(root, "-o", out, "-m", band_model_path)
    assert bait.read_text() == "keep"


# -- input and output nesting ----------------------------------------------------------------


def test_an_input_inside_the_output_folder_is_refused(
    tmp_path: Path, band_model_path: Path
) -> None:
    out = tmp_path / "out"
    root, _ = _study(out)  # out/in/study1/...
    bait = root / ".IM0001.0123456789ab.tmp"  # an input file named like our temporaries
    bait.write_bytes(b"input")
    before = _tree_digest(root)
    result = _segment(root, "-o", out, "-m", band_model_path)
    assert result.exit_code == 2, result.output
    assert "is inside the output folder" in result.stderr
    assert _tree_digest(root) == before


# -- permissions -----------------------------------------------------------------------------


def _written(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if not p.name.startswith(".") or p.name == ".ggo-cli"]


def test_every_output_is_owner_only_whatever_the_umask(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, _ = _study(tmp_path)
    out = tmp_path / "out"
    before = _tree_digest(root)
    old = os.umask(0o022)
    try:
        result = _segment(root, "-o", out, "-m", band_model_path, "--png", "all")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert _tree_digest(root) == before  # the input is byte-identical
    assert _mode(out) == 0o700
    paths = list(out.rglob("*"))
    assert {p.name for p in paths} >= {
        "ggo.seg.dcm",
        "overlay.png",
        "ggo_volumes.csv",
        "run_manifest.json",
        "state.sqlite",
        "lock",
        "runs",
        "slices",
    }
    for path in paths:
        expected = 0o700 if path.is_dir() else 0o600
        assert _mode(path) == expected, path


def test_group_readable_gives_the_group_read_access(tmp_path: Path, band_model_path: Path) -> None:
    root, _ = _study(tmp_path)
    out = tmp_path / "out"
    result = _segment(root, "-o", out, "-m", band_model_path, "--group-readable")
    assert result.exit_code == 0, result.output
    secret = out / ".ggo-cli" / "link.key"
    assert _mode(secret) == 0o600  # the follow-up's link secret stays the owner's
    assert secret.read_bytes() not in _state_bytes(out)  # and apart from the keys
    for path in [out, *out.rglob("*")]:
        expected = 0o750 if path.is_dir() else 0o640
        assert path == secret or _mode(path) == expected, path


# -- PatientID at rest -----------------------------------------------------------------------


def _state_bytes(out: Path) -> bytes:
    return (out / ".ggo-cli" / "state.sqlite").read_bytes()


def test_the_state_store_holds_no_patient_id_unless_asked(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, _ = _study(tmp_path)
    out = tmp_path / "out"
    assert _segment(root, "-o", out, "-m", band_model_path).exit_code == 0
    assert PATIENT_ID.encode() not in _state_bytes(out)
    # Asked for: the unchanged series' row gets it without being reprocessed.
    result = _segment(root, "-o", out, "-m", band_model_path, "--include-patient-id")
    assert result.exit_code == 0, result.output
    assert [r["patient_id"] for r in _rows(out)] == [PATIENT_ID]
    # No longer asked for: erased from the store, freed pages included.
    assert _segment(root, "-o", out, "-m", band_model_path).exit_code == 0
    assert PATIENT_ID.encode() not in _state_bytes(out)
    with sqlite3.connect(out / ".ggo-cli" / "state.sqlite") as db:
        assert db.execute("SELECT status FROM series").fetchall() == [("ok",)]


def test_pseudonymize_keeps_the_pseudonym_at_rest_never_the_patient_id(
    tmp_path: Path, band_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = _study(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setenv("GGO_PSEUDONYM_SALT", "first-site-secret-salt")
    assert _segment(root, "-o", out, "-m", band_model_path, "--pseudonymize").exit_code == 0
    assert PATIENT_ID.encode() not in _state_bytes(out)
    (first,) = [r["patient_pseudonym"] for r in _rows(out)]
    assert len(first) == 16 and first.encode() in _state_bytes(out)
    # A new salt: the unchanged series gets the new pseudonym from its header, unprocessed.
    monkeypatch.setenv("GGO_PSEUDONYM_SALT", "second-site-secret-salt")
    result = _segment(root, "-o", out, "-m", band_model_path, "--pseudonymize")
    assert result.exit_code == 0, result.output
    (second,) = [r["patient_pseudonym"] for r in _rows(out)]
    assert len(second) == 16 and second != first
    assert PATIENT_ID.encode() not in _state_bytes(out)
    # Then the real ID, asked for: the pseudonym goes, the ID comes.
    assert _segment(root, "-o", out, "-m", band_model_path, "--include-patient-id").exit_code == 0
    assert [r["patient_id"] for r in _rows(out)] == [PATIENT_ID]
    assert second.encode() not in _state_bytes(out)
    # Neither asked for: neither at rest.
    assert _segment(root, "-o", out, "-m", band_model_path).exit_code == 0
    assert PATIENT_ID.encode() not in _state_bytes(out)
    assert "patient_pseudonym" not in _rows(out)[0]


# -- write errors ----------------------------------------------------------------------------


def _failing_dcmwrite(code: int) -> Callable[..., None]:
    """A dcmwrite that fails as pydicom does: the OSError re-raised without its errno."""

    def write(*args: object, **kwargs: object) -> None:
        try:
            raise OSError(code, os.strerror(code))
        except OSError as exc:
            raise OSError(f"{exc}\nfor data_element:\n(7FE0,0010) Pixel Data") from None

    return write


def test_a_full_disk_while_writing_the_seg_is_fatal_and_retried_later(
    tmp_path: Path, band_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = _study(tmp_path)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr("ggo_cli.writers.seg_file.dcmwrite", _failing_dcmwrite(errno.ENOSPC))
        result = _segment(root, "-o", out, "-m", band_model_path)
    assert result.exit_code == 6, result.output
    assert "no space left on device" in result.stderr
    assert not list(out.rglob("*.dcm")) and not list(out.rglob("*.tmp"))
    result = _segment(root, "-o", out, "-m", band_model_path)  # space is free again
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in _rows(out)] == ["ok"]


def test_a_transient_write_failure_is_retried_without_force(
    tmp_path: Path, band_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = _study(tmp_path)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr("ggo_cli.writers.seg_file.dcmwrite", _failing_dcmwrite(errno.EIO))
        result = _segment(root, "-o", out, "-m", band_model_path)
    assert result.exit_code == 4, result.output
    [row] = _rows(out)
    assert row["status"] == "failed"
    assert row["message"].endswith("(retried by the next run)")
    result = _segment(root, "-o", out, "-m", band_model_path)
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in _rows(out)] == ["ok"]


def test_a_deterministic_failure_stays_failed_until_the_files_change(
    tmp_path: Path, band_model_path: Path
) -> None:
    root = tmp_path / "in"
    make_ct_series(
        root,
        phantom=make_cube_phantom((12, 48, 48), (2.5, 0.7, 0.7), cube_voxels=(4, 6, 6)),
        uneven_spacing=True,
    )
    out = tmp_path / "out"
    assert _segment(root, "-o", out, "-m", band_model_path).exit_code == 4
    first = _rows(out)
    assert first[0]["status"] == "failed"
    result = _segment(root, "-o", out, "-m", band_model_path)
    assert result.exit_code == 4, result.output
    assert _rows(out) == first  # reused, not recomputed


# -- settling --------------------------------------------------------------------------------


def test_a_future_mtime_settles_after_one_unchanged_run(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, series = _study(tmp_path)
    future = time.time() + 30 * 86400  # a modality clock a month ahead
    for path in series.paths:
        os.utime(path, (future, future))
    out = tmp_path / "out"
    assert _segment(root, "-o", out, "-m", band_model_path, settle="5").exit_code == 0
    assert [r["status"] for r in _rows(out)] == ["pending"]
    result = _segment(root, "-o", out, "-m", band_model_path, settle="5")
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in _rows(out)] == ["ok"]


def test_a_touched_finished_series_keeps_its_row_until_replaced(
    tmp_path: Path, band_model_path: Path
) -> None:
    root, series = _study(tmp_path)
    out = tmp_path / "out"
    assert _segment(root, "-o", out, "-m", band_model_path).exit_code == 0
    [done] = _rows(out)
    assert done["status"] == "ok" and float(done["ggo_volume_ml"]) > 0
    os.utime(series.paths[3])  # touched just now: inside the settle window
    result = _segment(root, "-o", out, "-m", band_model_path, settle="5")
    assert result.exit_code == 0, result.output
    assert "pending" in result.stderr
    assert _rows(out) == [done]  # the last good row, volumes and status, stays


# -- native decoders never run in the main process -------------------------------------------


def _refuse_in_this_process(task: tuple[str, str, int]) -> object:
    raise AssertionError(f"decoded in the main process: {task[1]}")


# Pickled by reference under the real function's name, so a worker process (which imports
# ggo_cli.dicom.decode_pool afresh) runs the real decoder while this process would run the refusal.
_refuse_in_this_process.__module__ = "ggo_cli.dicom.decode_pool"
_refuse_in_this_process.__qualname__ = "_decode_file"


@pytest.mark.parametrize("workers", [0, 2])
def test_short_compressed_series_decode_in_a_worker_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """A crash inside a native decoder (JPEG, JPEG-LS, RLE, JPEG 2000) must not end the run:
    compressed pixel data is decoded in a child process even for a short series and with
    ``--decode-workers 0``. The main process's decode function is replaced by one that
    fails: the volume still loads, so the child decoded it."""
    from pydicom.uid import RLELossless

    from ggo_cli.dicom.decode_pool import DecodePool
    from ggo_cli.dicom.discovery import discover_series
    from ggo_cli.dicom.volume import load_volume

    fs = make_ct_series(tmp_path, shape=(12, 32, 32), transfer_syntax=RLELossless)
    (series,) = discover_series([fs.root]).series
    monkeypatch.setattr("ggo_cli.dicom.decode_pool._decode_file", _refuse_in_this_process)
    with DecodePool(workers) as pool:
        np.testing.assert_array_equal(load_volume(series, pool=pool).hu, fs.hu)
    # Uncompressed data of a short series stays in this process (no process start-up).
    plain = make_ct_series(tmp_path, shape=(12, 32, 32), folder="plain")
    (series,) = discover_series([plain.root]).series
    with DecodePool(workers) as pool, pytest.raises(AssertionError, match="main process"):
        load_volume(series, pool=pool)
