"""Discovery: header-only walk, grouping, decoys ignored, explicit selection rules."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest

from ggo_cli.config import SelectionRules
from ggo_cli.dicom.budgets import file_tag
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


def test_too_few_slices_is_skipped_with_the_rule(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path, shape=(6, 32, 32))
    (series,) = discover_series([fs.root]).series
    assert series.skip_reason == "6 slices; at least 10 required (see --min-slices)"
    (series,) = discover_series([fs.root], SelectionRules(min_slices=5)).series
    assert series.eligible


def test_sagittal_series_is_not_axial(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path)
    _rewrite(fs.paths, ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    (series,) = discover_series([fs.root]).series
    assert series.skip_reason is not None and series.skip_reason.startswith(
        "not axial: slice normal is 90.0"
    )


def test_small_tilt_is_accepted_within_tolerance(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path)
    # 5 degrees about the x axis
    _rewrite(fs.paths, ImageOrientationPatient=[1, 0, 0, 0, 0.996195, -0.087156])
    assert discover_series([fs.root]).series[0].eligible
    (series,) = discover_series([fs.root], SelectionRules(axial_tolerance_deg=2)).series
    assert "tolerance 2" in (series.skip_reason or "")


def test_derived_images_are_skipped(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path)
    _rewrite(fs.paths, ImageType=["DERIVED", "SECONDARY", "AXIAL"])
    (series,) = discover_series([fs.root]).series
    assert series.skip_reason == "ImageType DERIVED/SECONDARY/AXIAL is not ORIGINAL"


def test_mixed_frames_of_reference_are_skipped(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path)
    _rewrite(fs.paths[:3], FrameOfReferenceUID="1.2.3.4.5")
    (series,) = discover_series([fs.root]).series
    assert series.skip_reason == "2 frames of reference; exactly one is required"


def test_mixed_image_sizes_are_skipped(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path, shape=(12, 32, 32))
    other = make_ct_series(tmp_path, shape=(12, 40, 40), folder="other")
    # move one 40 x 40 slice into the 32 x 32 series
    ds = pydicom.dcmread(other.paths[0])
    ds.SeriesInstanceUID = fs.series_instance_uid
    ds.FrameOfReferenceUID = fs.frame_of_reference_uid
    ds.save_as(fs.root / "intruder.dcm")
    found = discover_series([fs.root])
    (series,) = found.series
    assert "mixed image sizes" in (series.skip_reason or "")


def test_missing_position_is_skipped(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path)
    ds = pydicom.dcmread(fs.paths[4])
    del ds.ImagePositionPatient
    ds.save_as(fs.paths[4])
    (series,) = discover_series([fs.root]).series
    tag = file_tag(fs.paths[4].relative_to(fs.root))
    assert series.skip_reason == (
        f"instance without ImagePositionPatient (file {tag}); slice geometry is required "
        "(a truncated or damaged file?)"
    )


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
