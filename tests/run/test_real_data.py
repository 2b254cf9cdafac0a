"""End to end on the real shared chest CT, uncompressed and as JPEG Lossless, with junk around."""

from __future__ import annotations

import csv
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLosslessSV1
from typer.testing import CliRunner

from ggo_cli.cli.app import app
from ggo_cli.synthetic.ct_writer import transcode_file
from tests.dciodvfy import dciodvfy_errors
from tests.shared_data import DCMQI_CT, DCMQI_SEG, require_shared

runner = CliRunner()


@pytest.fixture(scope="module")
def jpeg_lossless_study(real_ct_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 30-slice series transcoded to JPEG Lossless SV1, the dcmqi CT and junk files."""
    root = tmp_path_factory.mktemp("hospital")
    series = root / "patient_a" / "ct"
    series.mkdir(parents=True)
    for k, src in enumerate(sorted(real_ct_dir.glob("*.dcm"))):
        transcode_file(src, series / f"IMG{(k * 7919) % 1000:04d}", JPEGLosslessSV1)
    other = root / "patient_b"
    other.mkdir()
    for src in sorted(require_shared(DCMQI_CT).glob("*.dcm")):
        (other / src.name).write_bytes(src.read_bytes())
    (root / "README.txt").write_text("export from PACS")
    (root / "empty.dcm").write_bytes(b"")
    (root / "seg.dcm").write_bytes(require_shared(DCMQI_SEG).read_bytes())
    return root


def _run(inputs: Path, out: Path, model: Path) -> list[dict[str, str]]:
    result = runner.invoke(
        app,
        [
            "segment",
            str(inputs),
            "-o",
            str(out),
            "-m",
            str(model),
            "--no-progress",
            "--settle",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    with (out / "ggo_volumes.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


LUNG_CODES = {"Right lung": ("24028007", "SCT"), "Left lung": ("7771000", "SCT")}


def _check_lungs(seg: hd.seg.Segmentation, uids: list[str], row: dict[str, str]) -> None:
    """Issue 6: lung segments coded as asked, and the CSV's lung columns consistent with them."""
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2, 3]
    voxel_ml = float(row["voxel_volume_ml"])
    volumes = {}
    for segment in list(seg.SegmentSequence)[1:]:
        label = segment.SegmentLabel
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        prop = segment.SegmentedPropertyTypeCodeSequence[0]
        side = segment.SegmentedPropertyTypeModifierCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("91723000", "SCT")
        assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("39607008", "SCT")
        assert (side.CodeValue, side.CodingSchemeDesignator) == LUNG_CODES[label]
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[int(segment.SegmentNumber)]
        )
        volumes[label] = int(np.count_nonzero(pixels)) * voxel_ml
    right, left = volumes["Right lung"], volumes["Left lung"]
    assert float(row["right_lung_volume_ml"]) == pytest.approx(right, abs=1e-5)
    assert float(row["left_lung_volume_ml"]) == pytest.approx(left, abs=1e-5)
    total = float(row["lung_volume_ml"])
    assert total == pytest.approx(right + left, abs=1e-5)
    assert 1500.0 <= total <= 8000.0  # an adult's lungs
    assert min(right, left) >= 0.25 * total
    ggo_ml = float(row["ggo_volume_ml"])
    assert float(row["ggo_percent_of_lung"]) == pytest.approx(100 * ggo_ml / total, abs=1e-4)
    side_sum = float(row["left_ggo_volume_ml"]) + float(row["right_ggo_volume_ml"])
    assert side_sum == pytest.approx(ggo_ml, abs=1e-5)  # GGO kept inside the lungs


def _check_seg(seg_path: Path, source_dir: Path, row: dict[str, str]) -> int:
    seg = hd.seg.segread(seg_path)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(source_dir.iterdir())]
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    referenced = {
        i.ReferencedSOPInstanceUID
        for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == set(uids)
    assert seg.NumberOfFrames == 3 * len(uids)  # GGO, right lung, left lung
    segment = seg.SegmentSequence[0]
    prop = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("112120", "DCM")
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert (
        seg.PatientID == sources[0].PatientID
        and seg.StudyInstanceUID == sources[0].StudyInstanceUID
    )
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    voxels = int(np.count_nonzero(pixels))
    assert float(row["ggo_volume_ml"]) == pytest.approx(
        voxels * float(row["voxel_volume_ml"]), abs=1e-6
    )
    ggo = pixels[..., 0].astype(bool)
    lungs = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[2, 3]
    ).any(axis=-1)
    assert not (ggo & ~lungs).any()  # no GGO outside the lungs
    _check_lungs(seg, uids, row)
    assert dciodvfy_errors(seg_path) == []
    return voxels


def test_real_series_end_to_end(real_ct_dir: Path, tmp_path: Path, band_model_path: Path) -> None:
    (row,) = _run(real_ct_dir, tmp_path / "out", band_model_path)
    assert row["status"] == "ok" and row["n_slices"] == "30"
    assert float(row["slice_spacing_mm"]) == pytest.approx(8.0)
    voxels = _check_seg(tmp_path / "out" / row["seg_path"], real_ct_dir, row)
    assert voxels > 0  # the HU band marks partial-volume lung edges and vessels in this series


def test_jpeg_lossless_copy_gives_the_same_result(
    real_ct_dir: Path, jpeg_lossless_study: Path, tmp_path: Path, band_model_path: Path
) -> None:
    rows = _run(jpeg_lossless_study, tmp_path / "jpeg", band_model_path)
    by_status = {r["status"] for r in rows}
    assert by_status == {"ok", "skipped"}  # the 3-slice dcmqi CT is skipped, junk ignored
    (ok,) = [r for r in rows if r["status"] == "ok"]
    _check_seg(tmp_path / "jpeg" / ok["seg_path"], jpeg_lossless_study / "patient_a" / "ct", ok)
    (plain,) = _run(real_ct_dir, tmp_path / "plain", band_model_path)
    assert ok["ggo_voxels"] == plain["ggo_voxels"]


def test_seg_structure_matches_dcmqi(
    real_ct_dir: Path, tmp_path: Path, band_model_path: Path
) -> None:
    """Our SEG carries the same modules and references as the known-good dcmqi SEG."""
    (row,) = _run(real_ct_dir, tmp_path / "out", band_model_path)
    ours = pydicom.dcmread(tmp_path / "out" / row["seg_path"])
    theirs = pydicom.dcmread(require_shared(DCMQI_SEG))
    assert ours.SOPClassUID == theirs.SOPClassUID
    assert ours.SegmentationType == theirs.SegmentationType == "BINARY"
    for keyword in (
        "ReferencedSeriesSequence",
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
        "DimensionIndexSequence",
        "SegmentSequence",
        "FrameOfReferenceUID",
    ):
        assert keyword in ours and keyword in theirs, keyword
    frame = ours.PerFrameFunctionalGroupsSequence[0]
    for keyword in ("DerivationImageSequence", "FrameContentSequence", "PlanePositionSequence"):
        assert keyword in frame and keyword in theirs.PerFrameFunctionalGroupsSequence[0], keyword
    # one segment: highdicom states it once in the shared groups, dcmqi per frame (both valid)
    shared = ours.SharedFunctionalGroupsSequence[0]
    assert "SegmentIdentificationSequence" in shared or "SegmentIdentificationSequence" in frame
