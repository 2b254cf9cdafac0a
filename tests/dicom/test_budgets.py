"""Budgets on untrusted input (issue 15): implausible headers are refused before anything is
allocated, bombs cost a bounded amount, bad rescales and damaged pixels fail their series."""

from __future__ import annotations

import csv
import io
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from typer.testing import CliRunner

from ggo_cli.cli.app import app
from ggo_cli.config import SelectionRules
from ggo_cli.dicom.budgets import file_tag
from ggo_cli.dicom.discovery import discover_series, read_header
from ggo_cli.dicom.volume import load_volume
from ggo_cli.errors import UnsupportedSeriesError
from tests.dicom_factory import FactorySeries, make_ct_series

runner = CliRunner()
DEFLATE_BOMB_BYTES = 1 << 30
"""Zero bytes of pixel data deflated into about 1 MB."""


@pytest.fixture
def lax_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test write the invalid values it is about (the autouse fixture restores)."""
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)


def _rewrite(paths: tuple[Path, ...], **values: object) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def _only(fs: FactorySeries, rules: SelectionRules | None = None):  # type: ignore[no-untyped-def]
    (series,) = discover_series([fs.root], rules).series
    return series


def _small_series(tmp_path: Path, **kwargs: object) -> FactorySeries:
    return make_ct_series(tmp_path, shape=(12, 32, 32), **kwargs)  # type: ignore[arg-type]


def test_huge_rows_and_columns_are_skipped_before_any_allocation(tmp_path: Path) -> None:
    fs = _small_series(tmp_path)
    _rewrite(fs.paths, Rows=65535, Columns=65535)
    series = _only(fs)
    assert series.skip_reason == (
        "Rows 65535 outside 16..2048; not a CT slice this tool supports"
    )
    # loading it anyway (a series from elsewhere) fails before the 96 GiB np.empty
    eligible = type(series)(**{**_fields(series), "skip_reason": None})
    with pytest.raises(UnsupportedSeriesError, match="Rows 65535 outside 16..2048"):
        load_volume(eligible)


def _fields(series: object) -> dict[str, object]:
    return {name: getattr(series, name) for name in series.__slots__}  # type: ignore[attr-defined]


def test_tiny_pixel_spacing_is_skipped(tmp_path: Path) -> None:
    fs = _small_series(tmp_path)
    _rewrite(fs.paths, PixelSpacing=[0.002, 0.002])
    assert _only(fs).skip_reason == "PixelSpacing 0.002/0.002 mm outside 0.1..5 mm"


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        ("ImagePositionPatient", ["NaN", "0", "0"], "ImagePositionPatient is not three finite"),
        ("ImagePositionPatient", ["1e300", "0", "0"], "ImagePositionPatient is not three finite"),
        ("ImageOrientationPatient", ["1", "0", "0", "0", "NaN", "0"], "not six finite"),
        ("ImageOrientationPatient", ["2", "0", "0", "0", "1", "0"], "not two orthogonal unit"),
        ("PixelSpacing", ["inf", "inf"], "PixelSpacing inf/inf mm outside"),
        ("PixelSpacing", ["0.7", "NaN"], "pixel spacing differs between slices (or is invalid)"),
    ],
    ids=["nan-position", "huge-position", "nan-orientation", "non-unit-orientation",
         "inf-spacing", "nan-spacing"],
)
def test_non_finite_geometry_is_skipped_at_selection(
    tmp_path: Path, lax_writing: None, keyword: str, value: list[str], reason: str
) -> None:
    fs = _small_series(tmp_path)
    _rewrite(fs.paths[3:4] if keyword == "ImagePositionPatient" else fs.paths, **{keyword: value})
    skip = _only(fs).skip_reason
    assert skip is not None and reason in skip, skip


def test_too_many_voxels_are_skipped(tmp_path: Path) -> None:
    fs = _small_series(tmp_path)
    _rewrite(fs.paths, Rows=2048, Columns=2048)
    rules = SelectionRules()
    assert _only(fs, rules).eligible  # 12 x 2048 x 2048 is within the budget
    import ggo_cli.dicom.budgets as budgets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(budgets, "MAX_SERIES_VOXELS", 11 * 2048 * 2048)
        assert "exceed the series budget" in (_only(fs, rules).skip_reason or "")


def _deflate_bomb(
    path: Path, template: Path, inflated_bytes: int, *, new_uids: bool = False
) -> None:
    """A CT file in Deflated Explicit VR Little Endian whose pixel data inflates to
    ``inflated_bytes`` zeros (about 1000:1); ``new_uids``: an instance of a series of its own."""
    ds = pydicom.dcmread(template)
    del ds.PixelData
    if new_uids:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    header = io.BytesIO()
    meta = pydicom.filebase.DicomFileLike(header)
    meta.is_little_endian, meta.is_implicit_VR = True, False
    header.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(meta, ds.file_meta)
    body = pydicom.filebase.DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    body.write(b"\xe0\x7f\x10\x00OW\0\0" + inflated_bytes.to_bytes(4, "little"))
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1 << 24)
    with path.open("wb") as out:
        out.write(header.getvalue())
        out.write(deflater.compress(body.getvalue()))
        for _ in range(inflated_bytes // len(chunk)):
            out.write(deflater.compress(chunk))
        out.write(deflater.flush())


def test_a_deflate_bomb_is_refused_within_the_inflate_budget(tmp_path: Path) -> None:
    fs = _small_series(tmp_path)
    bomb = tmp_path / "bomb.dcm"
    _deflate_bomb(bomb, fs.paths[0], DEFLATE_BOMB_BYTES)
    assert bomb.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        header = read_header(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert header is None  # refused: it inflates beyond the largest plausible slice
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB"


def test_a_deflate_bomb_in_a_series_is_named_at_discovery(tmp_path: Path) -> None:
    fs = _small_series(tmp_path)
    _deflate_bomb(fs.paths[4], fs.paths[4], 256 << 20)  # same instance, pixel data 256 MiB
    tracemalloc.start()
    try:
        skip = _only(fs).skip_reason
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert skip is not None and "1 unreadable, truncated or oversized DICOM file(s)" in skip
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB"


def test_a_deflate_bomb_swapped_in_after_discovery_fails_at_loading(tmp_path: Path) -> None:
    fs = _small_series(tmp_path)
    series = _only(fs)
    assert series.eligible
    _deflate_bomb(fs.paths[4], fs.paths[4], 256 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(UnsupportedSeriesError, match="inflates beyond .*decompression bomb"):
            load_volume(series)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB"


def test_a_deflated_series_still_loads(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path, shape=(10, 32, 32))
    for path in fs.paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(fs.paths[0]).file_meta.TransferSyntaxUID.is_deflated
    np.testing.assert_array_equal(load_volume(_only(fs)).hu, fs.hu)


def test_a_large_zero_filled_file_is_not_dicom_at_once(tmp_path: Path) -> None:
    fs = _small_series(tmp_path)
    (fs.root / "zeros.dcm").write_bytes(bytes(64 << 20))
    started = time.perf_counter()
    found = discover_series([fs.root])
    assert time.perf_counter() - started < 5
    assert found.eligible and found.n_ignored == 1


def test_a_header_truncated_file_is_named_by_digest(tmp_path: Path) -> None:
    fs = _small_series(tmp_path)
    raw = fs.paths[6].read_bytes()
    fs.paths[6].write_bytes(raw[:600])  # ends inside the header, before the series UID
    skip = _only(fs).skip_reason
    assert skip is not None and "unreadable, truncated or oversized DICOM file(s) in its" in skip
    assert "file #" in skip and fs.paths[6].name not in skip
    assert "slice spacing" not in skip


def test_a_truncated_file_in_a_flat_folder_holds_back_only_its_own_series(
    tmp_path: Path,
) -> None:
    """Two series in one folder: a file of A truncated inside its header skips A only,
    naming the file."""
    fs = _small_series(tmp_path, second_series=True)
    folder = fs.paths[0].parent
    for path in fs.second_series_paths:  # a flat export: both series in one folder
        path.rename(folder / f"b-{path.name}")
    raw = fs.paths[6].read_bytes()
    spacing = raw.index(b"\x28\x00\x30\x00DS")  # (0028,0030) Pixel Spacing, after the UIDs
    fs.paths[6].write_bytes(raw[: spacing + 9])  # the header ends inside Pixel Spacing
    found = {s.series_instance_uid: s for s in discover_series([fs.root]).series}
    hit = found[fs.series_instance_uid].skip_reason
    tag = file_tag(fs.paths[6].relative_to(fs.root))
    assert hit is not None and "instance without PixelSpacing" in hit and tag in hit, hit
    assert found[fs.second_series_instance_uid].eligible  # type: ignore[index]
    # A file whose header ends before its series UID may belong to either: both wait.
    fs.paths[6].write_bytes(raw[:600])
    found = {s.series_instance_uid: s for s in discover_series([fs.root]).series}
    assert not any(s.eligible for s in found.values())


def test_an_unreadable_file_at_loading_is_named_by_index_and_digest(tmp_path: Path) -> None:
    fs = _small_series(tmp_path, folder="Patiënt Doe")
    series = _only(fs)
    fs.paths[2].write_bytes(b"")  # emptied between discovery and loading
    with pytest.raises(UnsupportedSeriesError, match=r"instance \d+ of 12 \(file #[0-9a-f]{6}\)"):
        load_volume(series)
    try:
        load_volume(series)
    except UnsupportedSeriesError as exc:
        assert "Doe" not in str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize(
    ("slope", "match"),
    [
        ("0", "RescaleSlope 0 outside"),
        ("NaN", "RescaleSlope nan outside"),
        ("1e38", "RescaleSlope 1e[+]38 outside"),
        ("abc", "RescaleSlope 'abc' is not a number"),
    ],
)
def test_implausible_rescale_slope_fails_the_series(
    tmp_path: Path, lax_writing: None, slope: str, match: str
) -> None:
    fs = _small_series(tmp_path)
    _set_slope(fs.paths[5], slope)
    with pytest.raises(UnsupportedSeriesError, match=match):
        load_volume(_only(fs))


def _set_slope(path: Path, slope: str) -> None:
    """Write ``slope`` as the RescaleSlope text, byte for byte (pydicom refuses to write
    some of these values at all)."""
    _rewrite((path,), RescaleSlope="7.77")
    raw = path.read_bytes()
    assert raw.count(b"7.77") == 1
    text = slope.encode("ascii")
    assert len(text) <= 4
    path.write_bytes(raw.replace(b"7.77", text.ljust(4, b" ")))


def test_bad_rescales_are_failed_rows_never_bugs(
    tmp_path: Path, band_model_path: Path, lax_writing: None
) -> None:
    root = tmp_path / "in"
    slopes = ["0", "NaN", "1e38", "abc"]
    for k, slope in enumerate(slopes):
        fs = make_ct_series(root, shape=(12, 32, 32), folder=f"s{k}", seed=k + 1)
        _set_slope(fs.paths[3], slope)
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["segment", str(root), "-o", str(out), "-m", str(band_model_path), "--no-progress",
         "--settle", "0", "--no-lung-mask"],
    )
    assert result.exit_code == 4 or result.exit_code == 7, result.output
    with (out / "ggo_volumes.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(slopes)
    for row in rows:
        assert row["status"] == "failed", row
        assert "RescaleSlope" in row["message"] and "unexpected" not in row["message"]


def _j2k_series_with_frame(tmp_path: Path, damage: object) -> FactorySeries:
    fs = make_ct_series(tmp_path, shape=(10, 32, 32), transfer_syntax=JPEG2000Lossless)
    ds = pydicom.dcmread(fs.paths[4])
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([damage(bytearray(frame))])  # type: ignore[operator]
    ds.save_as(fs.paths[4])
    return fs


def _wrong_precision(frame: bytearray) -> bytes:
    """Rewrite the SIZ marker's component precision (Ssiz) from 16 to 12 bits."""
    siz = frame.index(b"\xff\x51")
    ssiz = siz + 2 + 2 + 2 + 32 + 2  # Lsiz, Rsiz, 8 x 4 bytes of sizes, Csiz
    frame[ssiz] = 11  # precision - 1, unsigned
    return bytes(frame)


def test_a_damaged_j2k_header_that_decodes_silently_fails_the_series(tmp_path: Path) -> None:
    # openjpeg decodes this frame to zeros without a word; the header disagrees with it
    fs = _j2k_series_with_frame(tmp_path, _wrong_precision)
    with pytest.raises(UnsupportedSeriesError, match="codestream has precision 12, the header 16"):
        load_volume(_only(fs))


def test_gdcm_never_sees_a_malformed_j2k_codestream_in_process(tmp_path: Path) -> None:
    # python-gdcm aborts the process (SIGABRT) on this; pylibjpeg-openjpeg raises.
    garbage = bytes(range(256)) * 4
    fs = _j2k_series_with_frame(tmp_path, lambda _frame: b"\xff\x4f\xff\x51" + garbage)
    with pytest.raises(UnsupportedSeriesError, match="JPEG 2000 codestream cannot be read"):
        load_volume(_only(fs))


def test_a_decoder_warning_fails_the_series(tmp_path: Path) -> None:
    fs = _small_series(tmp_path)
    ds = pydicom.dcmread(fs.paths[7])
    ds.PixelData = ds.PixelData + bytes(200)  # pydicom warns and drops the excess
    ds.save_as(fs.paths[7])
    with pytest.raises(UnsupportedSeriesError, match="decoder reported damaged pixel data"):
        load_volume(_only(fs))


def test_implausible_slice_spacing_is_a_geometry_error(tmp_path: Path) -> None:
    from ggo_cli.errors import SeriesGeometryError

    fs = _small_series(tmp_path)
    for k, path in enumerate(fs.paths):
        ds = pydicom.dcmread(path)
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, 50.0 * k]  # 50 mm apart: not a CT volume
        ds.save_as(path)
    with pytest.raises(SeriesGeometryError, match="slice spacing 50 mm outside 0.1..20 mm"):
        load_volume(_only(fs))
