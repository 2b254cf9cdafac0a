"""The test DICOM factory: its truth matches what is on disk, its traps and decoys are real."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.fileset import FileSet
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from tests.dciodvfy import dciodvfy_errors
from tests.dicom_factory import UNEVEN_GAP_FACTOR, FactorySeries, make_ct_series
from tests.phantoms import make_cube_phantom

GEOMETRIES = {
    "plain": {},
    "flip_columns": {"flip_columns": True},
    "flip_rows": {"flip_rows": True},
    "flip_both": {"flip_columns": True, "flip_rows": True},
    "descending_shuffled": {"descending_z": True, "shuffle_names": True},
    "descending_flip_columns": {"descending_z": True, "flip_columns": True},
}


def _sorted_by_normal(paths: tuple[Path, ...] | list[Path]) -> list[pydicom.Dataset]:
    """Read files and sort them by ascending position along row x column cosine."""
    datasets = [pydicom.dcmread(p) for p in paths]
    cosines = np.array(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(cosines[:3], cosines[3:])
    return sorted(datasets, key=lambda ds: float(np.dot(normal, ds.ImagePositionPatient)))


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    """A dataset's pixels in HU."""
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), np.float32)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_truth_matches_files_sorted_along_the_normal(tmp_path: Path, geometry: str) -> None:
    series = make_ct_series(tmp_path, **GEOMETRIES[geometry])  # type: ignore[arg-type]
    datasets = _sorted_by_normal(list(series.root.rglob("*.dcm")))
    assert [ds.SOPInstanceUID for ds in datasets] == list(series.sop_instance_uids)
    np.testing.assert_array_equal(np.stack([_hu(ds) for ds in datasets]), series.hu)
    for path, uid in zip(series.paths, series.sop_instance_uids, strict=True):
        assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == uid
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    np.testing.assert_allclose(positions, series.positions_mm, atol=1e-4)
    # highdicom stacks the same slices in the reverse order (slice axis column x row cosine).
    volume = hd.get_volume_from_series(datasets, dtype=np.float32)
    np.testing.assert_array_equal(volume.array[::-1], series.hu)


@pytest.mark.parametrize("geometry", ["plain", "flip_both", "flip_columns"])
def test_truth_masks_follow_the_phantom_into_loader_order(tmp_path: Path, geometry: str) -> None:
    series = make_ct_series(tmp_path, **GEOMETRIES[geometry])  # type: ignore[arg-type]
    phantom = series.phantom
    assert phantom is not None
    assert series.ggo_mask.sum() == phantom.ggo_mask.sum() > 0
    assert series.ggo_volume_ml == pytest.approx(phantom.ggo_volume_ml, rel=1e-12)
    # Every truth GGO voxel holds the HU the phantom put at the same patient position.
    np.testing.assert_array_equal(np.sort(series.hu[series.ggo_mask]),
                                  np.sort(phantom.hu[phantom.ggo_mask].astype(np.float32)))
    assert not (series.ggo_mask & ~series.lung_mask).any()


def test_positions_and_orientation_of_flipped_descending_series(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path, descending_z=True, flip_columns=True)
    assert series.image_orientation == (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
    # Normal (0, 0, -1): loader order runs from head to feet.
    assert np.all(np.diff(series.positions_mm[:, 2]) == pytest.approx(-series.spacing_mm[0]))
    numbers = {pydicom.dcmread(p).InstanceNumber: float(pydicom.dcmread(p).SliceLocation)
               for p in series.paths}
    assert numbers[1] == max(numbers.values())  # InstanceNumber 1 at the head


def test_shuffled_names_differ_from_slice_order(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path, shuffle_names=True)
    names = [p.name for p in series.paths]
    assert names != sorted(names) and names != sorted(names, reverse=True)


def test_uneven_spacing_has_one_larger_gap(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path, uneven_spacing=True)
    gaps = np.diff(series.positions_mm[:, 2])
    spacing = series.spacing_mm[0]
    assert sorted(np.round(gaps / spacing, 6).tolist())[-2:] == [1.0, UNEVEN_GAP_FACTOR]
    datasets = _sorted_by_normal(series.paths)
    np.testing.assert_allclose([float(ds.ImagePositionPatient[2]) for ds in datasets],
                               series.positions_mm[:, 2], atol=1e-4)
    with pytest.raises(ValueError, match="regularly-spaced"):
        hd.get_volume_from_series(datasets)


def test_missing_rescale_intercept_is_missing_from_every_file(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path, missing_rescale_intercept=True)
    for path in series.paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert "RescaleIntercept" not in ds and "RescaleSlope" in ds


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless,
                                    JPEGLosslessSV1], ids=lambda u: u.name)
def test_compressed_series_decode_to_the_truth(tmp_path: Path, syntax: str) -> None:
    series = make_ct_series(tmp_path, transfer_syntax=syntax, flip_rows=True)
    datasets = _sorted_by_normal(series.paths)
    assert {ds.file_meta.TransferSyntaxUID for ds in datasets} == {syntax}
    np.testing.assert_array_equal(np.stack([_hu(ds) for ds in datasets]), series.hu)


def test_decoys_are_written_where_promised(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path, localizer=True, second_series=True, non_dicom_file=True,
                            duplicate_instance=True, sr_document=True)
    assert len(series.localizer_paths) == 2
    for path in series.localizer_paths:
        ds = pydicom.dcmread(path)
        assert "LOCALIZER" in ds.ImageType
        assert ds.StudyInstanceUID == series.study_instance_uid
        assert ds.SeriesInstanceUID != series.series_instance_uid
        assert abs(float(ds.ImageOrientationPatient[5])) == 1.0  # column runs along z
        assert ds.pixel_array.shape == (series.hu.shape[0], series.hu.shape[1])
    second = [pydicom.dcmread(p, stop_before_pixels=True) for p in series.second_series_paths]
    assert len(second) == len(series.paths)
    assert {ds.SeriesInstanceUID for ds in second} == {series.second_series_instance_uid}
    assert {ds.StudyInstanceUID for ds in second} == {series.study_instance_uid}
    assert not {ds.SOPInstanceUID for ds in second} & set(series.sop_instance_uids)
    sizes = {p.name: p.stat().st_size for p in series.junk_paths}
    assert sizes["empty.dcm"] == 0 and sizes["README.txt"] > 0 and sizes["random.dcm"] > 0
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(series.root / "junk" / "README.txt")
    assert len(series.duplicate_paths) == 2
    for copy, original in zip(series.duplicate_paths, series.paths, strict=False):
        assert copy.read_bytes() == original.read_bytes()
    assert series.sr_path is not None
    sr = pydicom.dcmread(series.sr_path)
    assert sr.Modality == "SR" and "PixelData" not in sr
    assert sr.StudyInstanceUID == series.study_instance_uid


def test_decoys_pass_dciodvfy(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path, localizer=True, sr_document=True)
    assert series.sr_path is not None
    for path in (*series.localizer_paths, series.sr_path):
        assert dciodvfy_errors(path) == [], path.name


def test_dicomdir_file_set_holds_the_series(tmp_path: Path) -> None:
    series = make_ct_series(tmp_path, dicomdir=True, transfer_syntax=JPEGLSLossless)
    assert series.dicomdir_path == series.root / "DICOMDIR"
    file_set = FileSet(pydicom.dcmread(series.dicomdir_path))
    assert {str(i.SOPInstanceUID) for i in file_set} == set(series.sop_instance_uids)
    assert all(p.is_relative_to(series.root) and p.suffix == "" for p in series.paths)
    assert not list(tmp_path.glob(".*staging"))
    datasets = _sorted_by_normal(series.paths)
    np.testing.assert_array_equal(np.stack([_hu(ds) for ds in datasets]), series.hu)


def test_cube_and_array_phantoms(tmp_path: Path) -> None:
    cube = make_ct_series(tmp_path, phantom=False, folder="cube")
    assert cube.ggo_mask.sum() == 4 * 8 * 8
    assert cube.ggo_volume_ml == pytest.approx(256 * 2.5 * 0.7 * 0.7 / 1000, abs=1e-12)
    hu = np.full((10, 16, 16), -850, np.int16)
    mask = np.zeros(hu.shape, bool)
    mask[2:4, 5:9, 5:9] = True
    hu[mask] = -500
    raw = make_ct_series(tmp_path, (10, 16, 16), (1.0, 1.0, 1.0), phantom=hu, ggo_mask=mask,
                         folder="raw", flip_columns=True)
    assert raw.phantom is None
    np.testing.assert_array_equal(raw.ggo_mask, mask[::-1, ::-1])  # normal -z, rows stored up
    np.testing.assert_array_equal(raw.hu, hu[::-1, ::-1].astype(np.float32))
    given = make_cube_phantom((12, 32, 32), (1.0, 2.0, 2.0))
    series = make_ct_series(tmp_path, phantom=given, folder="given")
    assert series.phantom is given and series.spacing_mm == (1.0, 2.0, 2.0)


def test_two_studies_in_one_tmp_path_are_distinct(tmp_path: Path) -> None:
    a: FactorySeries = make_ct_series(tmp_path, folder="a", seed=1)
    b = make_ct_series(tmp_path, folder="b", seed=2)
    assert a.study_instance_uid != b.study_instance_uid
    assert not set(a.sop_instance_uids) & set(b.sop_instance_uids)
    assert a.root != b.root and not set(a.root.rglob("*")) & set(b.root.rglob("*"))
