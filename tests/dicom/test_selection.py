"""The selection rules: which series are eligible, and the reason given for each one skipped."""

from __future__ import annotations

from pathlib import Path

import pydicom

from ggo_cli.config import SelectionRules
from ggo_cli.dicom.budgets import file_tag
from ggo_cli.dicom.discovery import discover_series
from tests.dicom.test_discovery import _rewrite
from tests.dicom_factory import make_ct_series


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
