"""The decode fast paths (header_scan, native_pixels) against pydicom's own path, bit for bit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, JPEGLSLossless, RLELossless

import ggo_cli.dicom.decode_pool as decode_pool_module
import ggo_cli.dicom.native_pixels as native_module
import ggo_cli.dicom.volume as volume_module
from ggo_cli.dicom.budgets import HEADER_CHUNK_BYTES, HEADER_READ_BYTES, read_bounded, scan_bounded
from ggo_cli.dicom.decode_pool import DecodePool
from ggo_cli.dicom.discovery import discover_series
from ggo_cli.domain import CtVolume
from ggo_cli.errors import UnsupportedSeriesError
from tests.dicom_factory import FactorySeries, make_ct_series


def _elements(ds: Dataset) -> list[tuple[Any, ...]]:
    """Every element as read: raw ones as their tuple, converted ones by value."""
    return [
        tuple(e) if isinstance(e, RawDataElement) else (e.tag, e.VR, e.value, e.file_tell)
        for e in ds._dict.values()
    ]


def _assert_same_header(fast: pydicom.FileDataset, slow: pydicom.FileDataset) -> None:
    assert _elements(fast) == _elements(slow)
    # pydicom converts some file meta values while reading; the fast path leaves them raw
    assert [(e.tag, e.VR, e.value) for e in fast.file_meta] == [
        (e.tag, e.VR, e.value) for e in slow.file_meta
    ]
    assert fast.preamble == slow.preamble
    assert (fast._read_implicit, fast._read_little) == (slow._read_implicit, slow._read_little)
    assert fast._character_set == slow._character_set
    assert fast.filename == slow.filename


def _pydicom_header(path: Path, tags: list[str] | None = None) -> pydicom.FileDataset:
    with open(path, "rb") as fh:
        return pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=tags)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", ImplicitVRLittleEndian, RLELossless])
@pytest.mark.parametrize("tags", [None, ["SOPInstanceUID", "ImagePositionPatient", "Rows"]])
def test_header_scan_builds_the_header_pydicom_builds(
    tmp_path: Path, syntax: str, tags: list[str] | None
) -> None:
    fs = make_ct_series(tmp_path, shape=(2, 32, 32), transfer_syntax=syntax)
    for path in fs.paths:
        found = scan_bounded(
            path,
            limit_bytes=HEADER_READ_BYTES,
            specific_tags=None if tags is None else frozenset(
                int(pydicom.tag.Tag(t)) for t in tags
            ),
        )
        assert found is not None  # the common shape takes the fast path
        _assert_same_header(found[0], _pydicom_header(path, tags))
        pixel = found[1]
        assert pixel is not None and pixel.tag == 0x7FE00010
        assert path.read_bytes()[pixel.offset : pixel.offset + 4] == b"\xe0\x7f\x10\x00"


def test_header_longer_than_the_first_chunk_is_read_to_its_end(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path, shape=(2, 32, 32))
    ds = pydicom.dcmread(fs.paths[0])
    ds.add_new(0x00091010, "LO", "GGO")  # a private creator and a large private block
    ds.add_new(0x00091011, "OB", bytes(HEADER_CHUNK_BYTES + 1000))
    ds.save_as(fs.paths[0])
    found = scan_bounded(fs.paths[0], limit_bytes=HEADER_READ_BYTES)
    assert found is not None
    _assert_same_header(found[0], _pydicom_header(fs.paths[0]))


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm"]
)
def test_header_reads_of_pydicom_files_agree(name: str) -> None:
    """Shipped files: the fast path where it applies, pydicom's reader elsewhere (big
    endian, deflated); read_bounded returns the same header either way."""
    path = Path(get_testdata_file(name, download=False))  # type: ignore[arg-type]
    found = scan_bounded(path, limit_bytes=HEADER_READ_BYTES)
    if name in ("MR_small_bigendian.dcm", "image_dfl.dcm"):
        assert found is None
    else:
        assert found is not None
    ds = read_bounded(path, limit_bytes=HEADER_READ_BYTES, stop_before_pixels=True)
    slow = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == slow.file_meta.TransferSyntaxUID
    assert [e.tag for e in ds] == [e.tag for e in slow]
    assert all(ds[e.tag].value == e.value for e in slow if e.VR != "SQ")


def _pydicom_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn the native pixel path off: every slice is decoded by pydicom, as before it."""
    monkeypatch.setattr(volume_module, "plan_native", lambda *args: None)
    monkeypatch.setattr(native_module, "plan_native", lambda *args: None)


def _load(fs: FactorySeries, pool: DecodePool | None = None) -> CtVolume:
    (series,) = [
        s for s in discover_series([fs.root]).series
        if s.series_instance_uid == fs.series_instance_uid
    ]
    return volume_module.load_volume(series, pool=pool)


def _count_pydicom_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = decode_pool_module.hu_slice

    def counted(ds: Dataset, where: str) -> Any:
        calls.append(where)
        return real(ds, where)

    monkeypatch.setattr(decode_pool_module, "hu_slice", counted)
    return calls


def _restore(
    path: Path, *, slope: str, intercept: str, signed: bool, bits_stored: int, seed: int
) -> None:
    """Rewrite a slice with random stored values (and random bits above BitsStored)."""
    ds = pydicom.dcmread(path)
    rng = np.random.default_rng(seed)
    low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (
        0, 2**bits_stored - 1)
    # stored values whose HU stay within -3000..30000 (plausible CT)
    ends = sorted((hu - float(intercept)) / float(slope) for hu in (-3000, 30000))
    low, high = max(low, int(np.ceil(ends[0]))), min(high, int(np.floor(ends[1])))
    values = rng.integers(low, high + 1, size=(int(ds.Rows), int(ds.Columns)), dtype=np.int64)
    stored = values.astype(np.int16 if signed else np.uint16)
    if bits_stored < 16:  # pydicom clears (or sign-extends over) the unused high bits
        junk = rng.integers(0, 2 ** (16 - bits_stored), size=stored.shape, dtype=np.uint16)
        stored = (stored.view(np.uint16) & np.uint16(2**bits_stored - 1)) | (
            junk << np.uint16(bits_stored)
        )
    ds.PixelData = stored.tobytes()
    ds.PixelRepresentation = int(signed)
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.save_as(path)


@pytest.mark.parametrize(
    ("slope", "intercept", "signed", "bits_stored"),
    [
        ("1", "-1024", False, 16),
        ("1", "0", True, 16),
        ("2", "-1024", False, 12),
        ("-1", "1000", True, 12),
        ("1", "-1024", True, 11),
        ("0.5", "-1024.25", False, 12),  # fractional: float32
    ],
)
def test_native_path_gives_the_pydicom_volume(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    slope: str,
    intercept: str,
    signed: bool,
    bits_stored: int,
) -> None:
    fs = make_ct_series(tmp_path, shape=(5, 32, 32))
    for k, path in enumerate(fs.paths):
        _restore(path, slope=slope, intercept=intercept, signed=signed, bits_stored=bits_stored,
                 seed=k)
    pydicom_decodes = _count_pydicom_decodes(monkeypatch)
    fast = _load(fs)
    assert pydicom_decodes == []  # every slice took the native path
    with monkeypatch.context() as patch:
        _pydicom_only(patch)
        slow = _load(fs)
    assert len(pydicom_decodes) == len(fs.paths)
    assert fast.hu.dtype == slow.hu.dtype == (np.float32 if "." in slope else np.int16)
    np.testing.assert_array_equal(fast.hu, slow.hu)
    assert [_elements(ds) for ds in fast.datasets] == [_elements(ds) for ds in slow.datasets]


def test_mixed_series_take_each_slice_by_its_own_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One implicit-VR slice with a fractional rescale among native ones: int16 slices read
    in place before it turn float32 with it, and the rest follow."""
    fs = make_ct_series(tmp_path, shape=(6, 32, 32))
    _restore(fs.paths[3], slope="0.5", intercept="-1024.5", signed=False, bits_stored=12,
             seed=3)
    ds = pydicom.dcmread(fs.paths[1])
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(fs.paths[1], enforce_file_format=True)
    fast = _load(fs)
    with monkeypatch.context() as patch:
        _pydicom_only(patch)
        slow = _load(fs)
    assert fast.hu.dtype == np.float32
    np.testing.assert_array_equal(fast.hu, slow.hu)


def test_a_file_changed_after_its_header_was_read_is_decoded_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same size, new pixels: the stamp differs, so the file is read again from its start
    and decoded as it is now (as the pydicom path would)."""
    fs = make_ct_series(tmp_path, shape=(4, 32, 32))
    target = fs.paths[2]
    real = volume_module.read_native

    def change_then_read(plan: Any, out: Any, *, limit_bytes: int) -> bool:
        if plan.path == str(target):
            _restore(target, slope="1", intercept="-1024", signed=False, bits_stored=16, seed=9)
            os.utime(target, ns=(plan.stamp.mtime_ns + 10**9,) * 2)
        return bool(real(plan, out, limit_bytes=limit_bytes))

    monkeypatch.setattr(volume_module, "read_native", change_then_read)
    rereads: list[Path] = []
    reread = decode_pool_module.read_native_file

    def counted(path: Path, limit_bytes: int) -> Any:
        rereads.append(path)
        return reread(path, limit_bytes)

    monkeypatch.setattr(decode_pool_module, "read_native_file", counted)
    volume = _load(fs)
    assert rereads == [target]  # read again from its start, as the file is now
    now = pydicom.dcmread(target)
    index = volume.sop_instance_uids.index(str(now.SOPInstanceUID))
    np.testing.assert_array_equal(volume.hu[index], now.pixel_array.astype(np.int32) - 1024)


def test_a_file_cut_short_after_its_header_was_read_fails_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = make_ct_series(tmp_path, shape=(4, 32, 32))
    real = volume_module.read_native

    def cut_then_read(plan: Any, out: Any, *, limit_bytes: int) -> bool:
        if plan.path == str(fs.paths[1]):
            os.truncate(plan.path, plan.stamp.size - 100)
        return bool(real(plan, out, limit_bytes=limit_bytes))

    monkeypatch.setattr(volume_module, "read_native", cut_then_read)
    with pytest.raises(UnsupportedSeriesError, match=r"instance \d of 4 \(file #[0-9a-f]{6}\): "
                       r"pixel data cannot be decoded .*less than expected"):
        _load(fs)


def test_trailing_bytes_after_the_pixel_data_leave_the_file_to_pydicom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = make_ct_series(tmp_path, shape=(4, 32, 32))
    with open(fs.paths[0], "ab") as fh:
        fh.write(b"\xfc\xff\xfc\xffOB\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00")  # padding
    pydicom_decodes = _count_pydicom_decodes(monkeypatch)
    volume = _load(fs)
    assert len(pydicom_decodes) == 1
    np.testing.assert_array_equal(volume.hu, fs.hu)


@pytest.mark.parametrize("workers", [0, 1])
def test_compressed_and_pooled_series_still_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """Compressed data goes to the decode pool's processes; uncompressed data stays in this
    thread whatever the pool's size; a series with one compressed file goes to the pool whole,
    where its uncompressed files take the native path too."""
    compressed = make_ct_series(tmp_path, shape=(6, 32, 32), transfer_syntax=JPEGLSLossless,
                                folder="jls")
    plain = make_ct_series(tmp_path, shape=(40, 32, 32), folder="plain")
    mixed = make_ct_series(tmp_path, shape=(6, 32, 32), folder="mixed")
    ds = pydicom.dcmread(mixed.paths[3])
    ds.compress(RLELossless)
    ds.save_as(mixed.paths[3])
    pooled: list[int] = []
    iter_decode = DecodePool.iter_decode

    def counting(self: DecodePool, tasks: Any, series_uid: str) -> Any:
        pooled.append(len(tasks))
        return iter_decode(self, tasks, series_uid)

    monkeypatch.setattr(DecodePool, "iter_decode", counting)
    with DecodePool(workers) as pool:
        np.testing.assert_array_equal(_load(compressed, pool).hu, compressed.hu)
        np.testing.assert_array_equal(_load(plain, pool).hu, plain.hu)
        np.testing.assert_array_equal(_load(mixed, pool).hu, mixed.hu)
    assert pooled == [6, 6]  # the JPEG-LS series and the mixed one, not the 40 plain slices
    np.testing.assert_array_equal(_load(compressed).hu, compressed.hu)
