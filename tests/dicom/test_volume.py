"""Volume loading: HU, ordering along the normal, spacing from positions, geometry errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from ggo_cli.config import SelectionRules
from ggo_cli.dicom.decode_pool import DecodePool
from ggo_cli.dicom.discovery import discover_series
from ggo_cli.dicom.volume import load_volume
from ggo_cli.errors import SeriesGeometryError, UnsupportedSeriesError
from tests.dicom_factory import FactorySeries, make_ct_series


def _load(fs: FactorySeries, rules: SelectionRules | None = None, pool=None):  # type: ignore[no-untyped-def]
    (series,) = [
        s
        for s in discover_series([fs.root]).series
        if s.series_instance_uid == fs.series_instance_uid
    ]
    return load_volume(series, rules, pool=pool)


@pytest.fixture(scope="module")
def pool():  # type: ignore[no-untyped-def]
    """Two decoder processes, shared by the tests of this module."""
    with DecodePool(2) as decoders:
        yield decoders


@pytest.mark.parametrize(
    "traps",
    [
        {},
        {"shuffle_names": True},
        {"descending_z": True, "shuffle_names": True},
        {"flip_columns": True},
        {"flip_rows": True, "descending_z": True},
    ],
    ids=["plain", "shuffled", "descending", "flip-columns", "flip-rows-descending"],
)
def test_slices_land_on_their_instances(tmp_path: Path, traps: dict[str, bool]) -> None:
    fs = make_ct_series(tmp_path, **traps)
    volume = _load(fs)
    assert volume.sop_instance_uids == fs.sop_instance_uids
    np.testing.assert_array_equal(volume.hu, fs.hu)
    assert volume.slice_spacing_mm == pytest.approx(fs.spacing_mm[0])
    assert volume.pixel_spacing_mm == pytest.approx(fs.spacing_mm[1:])


@pytest.mark.parametrize(
    "syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1], ids=str
)
def test_compressed_series_decode_to_the_same_hu(tmp_path: Path, syntax: str) -> None:
    fs = make_ct_series(tmp_path, shape=(10, 48, 48), transfer_syntax=syntax)
    assert pydicom.dcmread(fs.paths[0]).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(_load(fs).hu, fs.hu)


def test_uneven_spacing_is_a_geometry_error(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path, uneven_spacing=True)
    with pytest.raises(SeriesGeometryError, match=r"slice spacing varies 2\.5-3\.75 mm"):
        _load(fs)


def test_missing_rescale_intercept_is_unsupported(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path, missing_rescale_intercept=True)
    with pytest.raises(UnsupportedSeriesError, match="without RescaleIntercept/RescaleSlope"):
        _load(fs)


def test_duplicate_position_is_a_geometry_error(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path)
    ds = pydicom.dcmread(fs.paths[3])
    ds.ImagePositionPatient = pydicom.dcmread(fs.paths[2]).ImagePositionPatient
    ds.save_as(fs.paths[3])
    with pytest.raises(SeriesGeometryError, match="two slices share a position"):
        _load(fs)


def test_sheared_stack_is_a_geometry_error(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path)
    for k, path in enumerate(fs.paths):
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * k, z]  # gantry-tilt-like drift
        ds.save_as(path)
    with pytest.raises(SeriesGeometryError, match="drift"):
        _load(fs)


def test_pydicom_uneven_ct_series_is_refused() -> None:
    # pydicom's 4-slice CT2 series: z = -99.5, 103.0, 104.3, 105.5 (a ready-made negative case).
    first = get_testdata_file("dicomdirtests/77654033/CT2/17136", download=False)
    if first is None:
        pytest.skip("pydicom test data not installed")
    folder = Path(first).parent
    found = discover_series([folder], SelectionRules(min_slices=2))
    (series,) = found.eligible
    with pytest.raises(SeriesGeometryError, match="slice spacing varies"):
        load_volume(series)


def test_real_series_loads_in_hu(real_ct_dir: Path) -> None:
    (series,) = discover_series([real_ct_dir]).eligible
    volume = load_volume(series)
    assert volume.hu.shape == (30, 512, 512)
    assert volume.slice_spacing_mm == pytest.approx(8.0)
    assert volume.pixel_spacing_mm == pytest.approx((0.646484375, 0.646484375))
    assert volume.hu.min() == pytest.approx(-1024.0)
    # lungs: a large share of voxels inside the body in the -950..-700 HU range
    assert ((volume.hu > -950) & (volume.hu < -700)).mean() > 0.05
    positions = [float(ds.ImagePositionPatient[2]) for ds in volume.datasets]
    assert positions == sorted(positions)
    assert "PixelData" not in volume.datasets[0]


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEG2000Lossless], ids=str)
def test_decode_pool_gives_the_same_volume(tmp_path: Path, syntax: str, pool) -> None:  # type: ignore[no-untyped-def]
    fs = make_ct_series(tmp_path, shape=(20, 48, 48), transfer_syntax=syntax, shuffle_names=True)
    seen: list[int] = []
    volume = _load(fs, pool=pool)
    np.testing.assert_array_equal(volume.hu, fs.hu)
    assert volume.sop_instance_uids == fs.sop_instance_uids
    assert all("PixelData" not in ds for ds in volume.datasets)
    series = discover_series([fs.root]).series[0]
    load_volume(series, pool=pool, on_slice=seen.append)
    assert sum(seen) == 20


def test_decode_pool_reports_a_bad_file_and_keeps_working(tmp_path: Path, pool) -> None:  # type: ignore[no-untyped-def]
    fs = make_ct_series(tmp_path / "bad", shape=(12, 32, 32))
    series = discover_series([fs.root]).series[0]
    raw = fs.paths[5].read_bytes()
    fs.paths[5].write_bytes(raw[: len(raw) - 600])  # pixel data cut short
    with pytest.raises(UnsupportedSeriesError, match="series .*"):
        load_volume(series, pool=pool)
    good = make_ct_series(tmp_path / "good", shape=(12, 32, 32))
    np.testing.assert_array_equal(_load(good, pool=pool).hu, good.hu)


def test_decode_pool_checks_rescale_before_decoding(tmp_path: Path, pool) -> None:  # type: ignore[no-untyped-def]
    fs = make_ct_series(tmp_path, missing_rescale_intercept=True)
    with pytest.raises(UnsupportedSeriesError, match="without RescaleIntercept/RescaleSlope"):
        _load(fs, pool=pool)


def test_a_dead_decoder_fails_only_its_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ggo_cli.dicom.decode_pool as decode_pool_module

    fs = make_ct_series(tmp_path, shape=(12, 32, 32), transfer_syntax=RLELossless)
    series = discover_series([fs.root]).series[0]
    with DecodePool(1) as decoders:
        real = decode_pool_module._decode_file
        monkeypatch.setattr(decode_pool_module, "_decode_file", _die)
        with pytest.raises(UnsupportedSeriesError, match="decoder process died"):
            load_volume(series, pool=decoders)
        monkeypatch.setattr(decode_pool_module, "_decode_file", real)
        np.testing.assert_array_equal(load_volume(series, pool=decoders).hu, fs.hu)


def _die(task: tuple[str, str, int]) -> None:
    """A worker task that kills its process, as a crashing decoder would."""
    import os

    os._exit(1)


def test_integer_rescale_keeps_hu_as_exact_int16(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path, shape=(6, 40, 40))
    volume = _load(fs)
    assert volume.hu.dtype == np.int16  # half the memory of float32, same values
    np.testing.assert_array_equal(volume.hu, fs.hu)


def _rewrite_rescale(path: Path, slope: str, intercept: str) -> None:
    """Re-store one slice's pixels under a new rescale so that its HU stay the same."""
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    stored = np.rint((hu - float(intercept)) / float(slope))
    ds.PixelData = stored.astype(ds.pixel_array.dtype).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.save_as(path)


def test_one_fractional_slice_makes_the_volume_float32(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path, shape=(5, 40, 40))
    target = fs.paths[2]
    _rewrite_rescale(target, "0.5", "-1024.25")
    volume = _load(fs)
    assert volume.hu.dtype == np.float32
    index = volume.sop_instance_uids.index(str(pydicom.dcmread(target).SOPInstanceUID))
    expected = fs.hu.astype(np.float32)
    # the rewritten slice: HU rounded to the new 0.5 HU grid offset by 0.25
    expected[index] = np.rint((fs.hu[index] + 1024.25) / 0.5) * 0.5 - 1024.25
    np.testing.assert_array_equal(volume.hu, expected)


def test_padding_outside_int16_is_kept_as_float32(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path, shape=(3, 40, 40))
    for path in fs.paths:
        _rewrite_rescale(path, "1", "-1024")  # same HU
    ds = pydicom.dcmread(fs.paths[0])
    ds.RescaleSlope = "2"  # 2 x stored + intercept: beyond 32767 for the padding value
    pixels = ds.pixel_array.copy()
    pixels[:4] = 20000
    ds.add_new(0x00280120, "US", 20000)  # PixelPaddingValue
    ds.PixelData = pixels.tobytes()
    ds.save_as(fs.paths[0])
    volume = _load(fs)
    assert volume.hu.dtype == np.float32
    index = volume.sop_instance_uids.index(str(ds.SOPInstanceUID))
    assert (volume.hu[index][:4] == 2 * 20000 - 1024).all()


def test_hu_beyond_the_plausible_range_fail_the_series(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path, shape=(3, 40, 40))
    ds = pydicom.dcmread(fs.paths[0])
    ds.RescaleSlope = "2"
    ds.PixelData = np.full(ds.pixel_array.shape, 20000, ds.pixel_array.dtype).tobytes()
    ds.save_as(fs.paths[0])
    with pytest.raises(UnsupportedSeriesError, match=r"38976\.\.38976 HU, outside the plausible"):
        _load(fs)
