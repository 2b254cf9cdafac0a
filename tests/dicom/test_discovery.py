"""Discovery: header-only walk, grouping, decoys ignored, explicit selection rules."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from ggo_cli.config import SelectionRules
from ggo_cli.dicom.discovery import discover_series, iter_files
from ggo_cli.errors import InputError
from tests.dicom_factory import make_ct_series


def _rewrite(paths: tuple[Path, ...], **values: object) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def test_decoys_are_ignored_and_the_localizer_is_skipped(tmp_path: Path) -> None:
    fs = make_ct_series(
        tmp_path,
        localizer=True,
        second_series=True,
        non_dicom_file=True,
        duplicate_instance=True,
        sr_document=True,
        shuffle_names=True,
    )
    found = discover_series([fs.root])
    by_uid = {s.series_instance_uid: s for s in found.series}
    assert by_uid[fs.series_instance_uid].eligible
    assert len(by_uid[fs.series_instance_uid].files) == len(fs.paths)
    assert by_uid[fs.second_series_instance_uid].eligible
    localizers = [s for s in found.series if s.skip_reason and "localizer" in s.skip_reason]
    assert len(localizers) == 1
    assert found.n_duplicates == len(fs.duplicate_paths) >= 1
    # junk (text, zero-byte, random bytes) and the SR are not CT series
    assert found.n_ignored >= len(fs.junk_paths) + 1
    assert len(found.series) == 3


def test_dicomdir_file_set_is_walked_and_dicomdir_ignored(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path, dicomdir=True)
    found = discover_series([fs.root])
    assert [s.series_instance_uid for s in found.eligible] == [fs.series_instance_uid]
    assert found.n_ignored == 1  # the DICOMDIR itself


def test_series_option_selects_by_uid(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path, second_series=True)
    found = discover_series([fs.root], SelectionRules(series_uids=(fs.series_instance_uid,)))
    eligible = [s.series_instance_uid for s in found.eligible]
    assert eligible == [fs.series_instance_uid]
    assert any(s.skip_reason == "not selected (--series)" for s in found.series)


def test_symlink_loop_terminates(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path)
    os.symlink(fs.root, fs.root / "loop")
    found = discover_series([fs.root])
    assert len(found.eligible) == 1
    assert len(found.eligible[0].files) == len(fs.paths)


def test_files_and_folders_may_be_mixed(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path)
    files = list(iter_files([fs.paths[0], fs.root]))
    assert files[0] == (fs.paths[0], fs.paths[0].parent)


def test_missing_input_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="input not found: .*absent"):
        discover_series([tmp_path / "absent"])


def test_invalid_uid_is_skipped_not_used_as_a_folder(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path)
    _rewrite(fs.paths, StudyInstanceUID="../../etc")
    (series,) = discover_series([fs.root], SelectionRules()).series
    assert series.skip_reason == "StudyInstanceUID is not a valid DICOM UID"


@pytest.mark.parametrize("raw", [b"inf", b"x12", b"1e999"])
def test_a_malformed_series_number_is_none_not_an_error(tmp_path: Path, raw: bytes) -> None:
    """pydicom converts an IS value when it is read: ``inf`` overflows, ``x12`` is no number."""
    series = make_ct_series(tmp_path)
    _rewrite(series.paths, SeriesNumber=987654)  # six characters, then the raw bytes in place
    for path in series.paths:
        data = path.read_bytes()
        assert data.count(b"987654") == 1
        path.write_bytes(data.replace(b"987654", raw.ljust(6)))
    (found,) = discover_series([tmp_path]).series
    assert found.series_number is None
    assert found.eligible
