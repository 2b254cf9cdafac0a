"""The synthetic CT writer: geometry, attributes, transfer syntaxes, transcoding, no PHI in logs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from ggo_cli.errors import OutputError
from ggo_cli.synthetic.ct_writer import (
    SUPPORTED_TRANSFER_SYNTAXES,
    SeriesAttributes,
    transcode_file,
    write_ct_series,
)
from ggo_cli.synthetic.phantom import Phantom, make_chest_phantom
from tests.dciodvfy import dciodvfy_errors
from tests.synthetic.chest_grid import SHAPE, SMALL_SHAPE, SMALL_SPACING_MM, SPACING_MM


def _read_hu(path: Path) -> np.ndarray:
    """Decode one file and apply its modality LUT."""
    ds = pydicom.dcmread(path)
    return np.asarray(apply_modality_lut(ds.pixel_array, ds))


@pytest.mark.parametrize(("flip_columns", "flip_rows"), [(False, False), (True, False),
                                                          (False, True), (True, True)])
def test_written_series_puts_every_voxel_at_its_patient_position(
    tmp_path: Path, chest: Phantom, flip_columns: bool, flip_rows: bool
) -> None:
    origin = (-100.0, -80.0, -400.0)
    paths = write_ct_series(chest, tmp_path, flip_columns=flip_columns, flip_rows=flip_rows,
                            first_position_mm=origin, descending_z=True)
    dz, dy, dx = SPACING_MM
    rng = np.random.default_rng(0)
    for k in (0, 11, 23):
        ds = pydicom.dcmread(paths[k])
        hu = _read_hu(paths[k])
        cosines = np.array(ds.ImageOrientationPatient, float)
        position = np.array(ds.ImagePositionPatient, float)
        assert ds.InstanceNumber == SHAPE[0] - k  # descending: 1 at the head
        assert paths[k].name == f"CT{SHAPE[0] - k:04d}.dcm"
        assert float(ds.SliceLocation) == pytest.approx(origin[2] + k * dz)
        for r, c in rng.integers(0, SHAPE[1], size=(20, 2)):
            # PS3.3 C.7.6.2.1.1: P = S + c * dx * row cosine + r * dy * column cosine.
            x, y, z = position + c * dx * cosines[:3] + r * dy * cosines[3:]
            index = np.rint([(z - origin[2]) / dz, (y - origin[1]) / dy, (x - origin[0]) / dx])
            slice_k, row, col = (int(v) for v in index)
            assert slice_k == k and 0 <= row < SHAPE[1] and 0 <= col < SHAPE[2]
            assert hu[r, c] == chest.hu[k, row, col]


def test_written_files_carry_the_ct_image_attributes(tmp_path: Path, chest: Phantom) -> None:
    attrs = SeriesAttributes(series_number=5)
    paths = write_ct_series(chest, tmp_path, attributes=attrs, study_uid="1.2.3.4",
                            seed=11)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    first = headers[0]
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert first.StudyInstanceUID == "1.2.3.4"
    assert first.Modality == "CT" and first.SeriesNumber == 5
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert str(first.PatientName) == "GGO^Phantom" and first.PatientID == "PHANTOM-001"
    assert (first.Rows, first.Columns, first.BitsAllocated) == (SHAPE[1], SHAPE[2], 16)
    assert [float(v) for v in first.PixelSpacing] == [SPACING_MM[1], SPACING_MM[2]]
    assert float(first.RescaleIntercept) == -1024 and first.RescaleType == "HU"
    assert len({h.SOPInstanceUID for h in headers}) == SHAPE[0]
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    # Deterministic: the same seed writes the same UIDs.
    again = write_ct_series(chest, tmp_path / "again", study_uid="1.2.3.4", seed=11)
    assert pydicom.dcmread(again[3]).SOPInstanceUID == headers[3].SOPInstanceUID


def test_shuffled_names_do_not_follow_slice_order(tmp_path: Path, chest: Phantom) -> None:
    paths = write_ct_series(chest, tmp_path, shuffle_names=True,
                            file_name_pattern="IMG{index:03d}")
    assert sorted(p.name for p in paths) == [f"IMG{i:03d}" for i in range(1, SHAPE[0] + 1)]
    assert [p.name for p in paths] != sorted(p.name for p in paths)


@pytest.mark.parametrize("syntax", SUPPORTED_TRANSFER_SYNTAXES, ids=lambda u: u.name)
def test_every_transfer_syntax_round_trips_pixel_identical(tmp_path: Path, syntax: str) -> None:
    phantom = make_chest_phantom(SMALL_SHAPE, SMALL_SPACING_MM, seed=1)
    paths = write_ct_series(phantom, tmp_path, transfer_syntax=syntax, flip_columns=True,
                            rescale_intercept=0.0, bits_stored=12)  # signed 12-bit pixels
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == syntax
        assert ds.PixelRepresentation == 1
        np.testing.assert_array_equal(_read_hu(path), phantom.hu[k, ::-1])


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEGLSLossless, JPEGLosslessSV1])
def test_dciodvfy_finds_no_error_in_written_ct(tmp_path: Path, syntax: str) -> None:
    phantom = make_chest_phantom(SMALL_SHAPE, SMALL_SPACING_MM)
    paths = write_ct_series(phantom, tmp_path, transfer_syntax=syntax)
    assert dciodvfy_errors(paths[0]) == []


def test_transcode_keeps_instance_and_pixels(tmp_path: Path) -> None:
    phantom = make_chest_phantom(SMALL_SHAPE, SMALL_SPACING_MM)
    src = write_ct_series(phantom, tmp_path / "src")[1]
    jpeg = transcode_file(src, tmp_path / "jpeg.dcm", JPEGLosslessSV1)
    rle = transcode_file(jpeg, tmp_path / "rle.dcm", RLELossless)
    transcode_file(rle, rle, ExplicitVRLittleEndian)  # in place
    original = pydicom.dcmread(src)
    for path in (jpeg, rle):
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID == original.SOPInstanceUID
        assert ds.RescaleType == "HU"
        np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)
    assert pydicom.dcmread(rle).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not list(tmp_path.glob(".*.tmp"))


def test_transcode_real_ct_to_jpeg_lossless(tmp_path: Path, real_ct_dir: Path) -> None:
    src = sorted(real_ct_dir.glob("*.dcm"))[0]
    dst = transcode_file(src, tmp_path / "real70.dcm", JPEGLosslessSV1)
    ds, original = pydicom.dcmread(dst), pydicom.dcmread(src)
    assert ds.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)
    assert "RescaleType" not in ds  # gdcm would add RescaleType US; the source has none
    assert dciodvfy_errors(dst) == []


def test_unsupported_syntax_and_bit_depth_are_refused(tmp_path: Path) -> None:
    phantom = make_chest_phantom(SMALL_SHAPE, SMALL_SPACING_MM)
    with pytest.raises(ValueError, match="not supported"):
        write_ct_series(phantom, tmp_path, transfer_syntax="1.2.840.10008.1.2.4.50")
    with pytest.raises(ValueError, match="do not fit 12 stored bits"):
        write_ct_series(phantom.hu.astype(np.int32) + 3000, tmp_path, spacing_mm=(1, 1, 1),
                        bits_stored=12)
    with pytest.raises(ValueError, match="spacing_mm"):
        write_ct_series(phantom.hu, tmp_path)
    with pytest.raises(ValueError, match="not supported"):
        transcode_file(tmp_path / "x.dcm", tmp_path / "y.dcm", "1.2.840.10008.1.2.4.50")


def test_transcode_of_a_non_dicom_file_is_an_output_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_text("not DICOM")
    with pytest.raises(OutputError, match="cannot transcode junk.dcm"):
        transcode_file(junk, tmp_path / "out.dcm", RLELossless)


def test_writing_logs_no_patient_identifiers(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                             chest: Phantom) -> None:
    with caplog.at_level(logging.DEBUG, logger="ggo_cli"):
        paths = write_ct_series(chest, tmp_path, transfer_syntax=JPEGLosslessSV1)
        make_chest_phantom(SMALL_SHAPE, SMALL_SPACING_MM)
    assert caplog.records
    for text in ("GGO^Phantom", "PHANTOM-001", "19600101"):
        assert text not in caplog.text
    assert pydicom.dcmread(paths[0]).PatientID == "PHANTOM-001"
