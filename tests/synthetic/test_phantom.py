"""The synthetic chest phantom, its DICOM writer and the lossless transcoder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from ggo_cli.errors import OutputError
from ggo_cli.synthetic.anatomy import AIR_HU, CORTICAL_BONE_HU, FAT_HU, LUNG_HU
from ggo_cli.synthetic.ct_writer import (
    SUPPORTED_TRANSFER_SYNTAXES,
    SeriesAttributes,
    transcode_file,
    write_ct_series,
)
from ggo_cli.synthetic.phantom import GGO_HU_RANGE, GgoLesion, Phantom, make_chest_phantom
from tests.dciodvfy import dciodvfy_errors
from tests.phantoms import make_cube_phantom

# A whole chest at a coarse grid: 36 x 30 cm field of view, 30 cm long, fast to draw.
SHAPE = (24, 128, 128)
SPACING_MM = (12.5, 2.8, 2.8)
SMALL_SHAPE = (4, 32, 32)
SMALL_SPACING_MM = (2.5, 5.0, 5.0)


@pytest.fixture(scope="module")
def chest() -> Phantom:
    """The default chest phantom, with noise."""
    return make_chest_phantom(SHAPE, SPACING_MM, seed=7)


@pytest.fixture(scope="module")
def clean_chest() -> Phantom:
    """The same chest without noise (exact tissue values)."""
    return make_chest_phantom(SHAPE, SPACING_MM, seed=7, noise_sd_hu=0.0)


def _read_hu(path: Path) -> np.ndarray:
    """Decode one file and apply its modality LUT."""
    ds = pydicom.dcmread(path)
    return np.asarray(apply_modality_lut(ds.pixel_array, ds))


def test_same_seed_gives_identical_phantoms_and_another_seed_does_not() -> None:
    a = make_chest_phantom(SMALL_SHAPE, SMALL_SPACING_MM, seed=3)
    b = make_chest_phantom(SMALL_SHAPE, SMALL_SPACING_MM, seed=3)
    c = make_chest_phantom(SMALL_SHAPE, SMALL_SPACING_MM, seed=4)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.ggo_mask, b.ggo_mask)
    assert a.lesions == b.lesions
    assert not np.array_equal(a.hu, c.hu)


def test_phantom_arrays_are_read_only_and_shaped(chest: Phantom) -> None:
    for array in (chest.hu, chest.ggo_mask, chest.lung_right_mask, chest.lung_left_mask):
        assert array.shape == SHAPE
        assert not array.flags.writeable
    assert chest.hu.dtype == np.int16
    assert chest.spacing_mm == SPACING_MM


def test_noise_free_phantom_holds_the_expected_tissues(clean_chest: Phantom) -> None:
    values = set(np.unique(clean_chest.hu).tolist())
    for tissue_hu in (AIR_HU, FAT_HU, CORTICAL_BONE_HU):
        assert tissue_hu in values
    assert clean_chest.hu.min() >= -1024
    assert clean_chest.hu.max() <= int(CORTICAL_BONE_HU)


def test_hu_ranges_of_air_lung_and_noise(chest: Phantom) -> None:
    corner = chest.hu[:, :8, :8].astype(float)
    assert abs(np.median(corner) - AIR_HU) < 5
    assert 14 < corner.std() < 22  # Gaussian noise of about 18 HU
    parenchyma = chest.hu[chest.lung_mask & ~chest.ggo_mask]
    assert abs(np.median(parenchyma) - LUNG_HU) < 40
    assert (chest.hu > 500).sum() > 100  # ribs and spine


def test_lungs_lie_inside_the_body_on_their_own_sides(chest: Phantom) -> None:
    right, left = chest.lung_right_mask, chest.lung_left_mask
    assert right.any() and left.any() and not (right & left).any()
    cols = np.arange(SHAPE[2])
    assert (right * cols).sum() / right.sum() < SHAPE[2] / 2 < (left * cols).sum() / left.sum()
    assert chest.lung_right_volume_ml > chest.lung_left_volume_ml  # the heart sits left
    for k in range(SHAPE[0]):
        lung = chest.lung_mask[k]
        if not lung.any():
            continue
        body_rows, body_cols = np.nonzero(chest.hu[k] > -300)
        rows, cols_k = np.nonzero(lung)
        assert body_rows.min() < rows.min() and rows.max() < body_rows.max()
        assert body_cols.min() < cols_k.min() and cols_k.max() < body_cols.max()


def test_lungs_are_smaller_at_apex_and_base(chest: Phantom) -> None:
    area = chest.lung_mask.sum(axis=(1, 2))
    peak = int(np.argmax(area))
    assert 0 < peak < SHAPE[0] - 1
    assert area[0] < area[peak] / 2 and area[-1] < area[peak] / 2
    lung_slices = np.flatnonzero(area)
    assert area[lung_slices[-1]] < area[peak] / 3  # the apex narrows


def test_vessels_branch_inside_the_lungs(clean_chest: Phantom) -> None:
    lung = clean_chest.lung_mask
    vessel = lung & (clean_chest.hu > -200)
    assert 0.005 < vessel.sum() / lung.sum() < 0.2
    # Vessels reach several slices, not just the hilum.
    assert (vessel.sum(axis=(1, 2)) > 0).sum() >= SHAPE[0] // 3


def test_ggo_volume_is_mask_voxels_times_voxel_volume(chest: Phantom) -> None:
    voxel_ml = SPACING_MM[0] * SPACING_MM[1] * SPACING_MM[2] / 1000.0
    assert chest.voxel_volume_ml == pytest.approx(voxel_ml, rel=1e-12)
    assert chest.ggo_mask.sum() > 0
    assert chest.ggo_volume_ml == pytest.approx(chest.ggo_mask.sum() * voxel_ml, rel=1e-12)
    assert not (chest.ggo_mask & ~chest.lung_mask).any()
    assert chest.lung_right_volume_ml == pytest.approx(chest.lung_right_mask.sum() * voxel_ml)


def test_ggo_mask_is_exactly_where_density_was_raised(clean_chest: Phantom) -> None:
    without = make_chest_phantom(SHAPE, SPACING_MM, seed=7, noise_sd_hu=0.0, ggo_lesions=[])
    again = make_chest_phantom(SHAPE, SPACING_MM, seed=7, noise_sd_hu=0.0,
                               ggo_lesions=clean_chest.lesions)
    np.testing.assert_array_equal(again.ggo_mask, clean_chest.ggo_mask)
    raised = again.hu > without.hu
    np.testing.assert_array_equal(raised, again.ggo_mask)
    assert (again.hu >= without.hu).all()


def test_ggo_is_hazy_and_leaves_vessels_visible(clean_chest: Phantom) -> None:
    ggo = clean_chest.hu[clean_chest.ggo_mask].astype(float)
    edge_hu = LUNG_HU + 0.5 * (GGO_HU_RANGE[0] - LUNG_HU) - 60  # half the rise, minus gradient
    assert edge_hu < ggo.min()
    assert np.percentile(ggo, 80) <= GGO_HU_RANGE[1] + 1  # the rest: vessel fringes (< half)
    assert GGO_HU_RANGE[0] - 120 < np.median(ggo) < GGO_HU_RANGE[1]
    # Voxels at least half vessel keep vessel density and stay out of the mask.
    assert (clean_chest.lung_mask & (clean_chest.hu > -150)).any()
    assert not (clean_chest.ggo_mask & (clean_chest.hu > -150)).any()


def test_ggo_free_phantom_has_empty_mask() -> None:
    phantom = make_chest_phantom(SMALL_SHAPE, SMALL_SPACING_MM, ggo_lesions=0)
    assert not phantom.ggo_mask.any()
    assert phantom.ggo_volume_ml == 0.0
    assert phantom.lesions == ()


def test_explicit_lesion_lands_at_its_centre_in_the_lung(clean_chest: Phantom) -> None:
    parenchyma = np.argwhere(clean_chest.lung_right_mask & (clean_chest.hu < -800))
    k, r, c = (int(v) for v in parenchyma[len(parenchyma) // 2])
    lesion = GgoLesion((k, r, c), radii_mm=(15.0, 12.0, 12.0), hu=-500.0)
    phantom = make_chest_phantom(SHAPE, SPACING_MM, seed=7, ggo_lesions=[lesion], noise_sd_hu=0)
    assert phantom.ggo_mask[k, r, c]
    assert -500 <= phantom.hu[k, r, c] < -450  # the plateau (a faint vessel fringe at most)
    assert phantom.lesions == (lesion,)


def test_cube_phantom_volume_is_exact() -> None:
    phantom = make_cube_phantom((12, 64, 64), (2.5, 0.7, 0.7), cube_voxels=(4, 8, 8))
    assert phantom.ggo_mask.sum() == 4 * 8 * 8
    assert phantom.ggo_volume_ml == pytest.approx(256 * 2.5 * 0.7 * 0.7 / 1000, abs=1e-12)
    assert not (phantom.ggo_mask & ~phantom.lung_right_mask).any()
    assert set(np.unique(phantom.hu[phantom.ggo_mask]).tolist()) == {-500}
    with pytest.raises(ValueError, match="does not fit"):
        make_cube_phantom((4, 16, 16), (1.0, 1.0, 1.0), cube_voxels=(8, 8, 8))


def test_phantom_rejects_bad_shape_and_lesions_lighter_than_lung() -> None:
    with pytest.raises(ValueError, match="3 positive values"):
        make_chest_phantom((0, 64, 64), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="must exceed -800.0 HU"):
        make_chest_phantom(SMALL_SHAPE, SMALL_SPACING_MM,
                           ggo_lesions=[GgoLesion((1, 16, 8), (5.0, 5.0, 5.0), hu=-900.0)])


@pytest.mark.slow
def test_full_size_phantom_takes_under_two_seconds() -> None:
    start = time.perf_counter()
    phantom = make_chest_phantom()
    assert time.perf_counter() - start < 2.0
    assert phantom.hu.shape == (60, 512, 512)
    assert phantom.ggo_volume_ml > 1.0


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
