"""Property-based fuzzing of the header budgets, the selection rules and the modality transform:
random header values (NaN, infinities, huge, negative, text, missing) give a skip reason or a
documented :class:`~ggo_cli.errors.SeriesError`, never anything else."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from ggo_cli.config import SelectionRules
from ggo_cli.dicom.budgets import HU_RANGE, RESCALE_SLOPE_RANGE, geometry_problem, rescale_of
from ggo_cli.dicom.discovery import discover_series
from ggo_cli.dicom.selection import skip_reason
from ggo_cli.dicom.slice_decoding import hu_slice
from ggo_cli.dicom.volume import load_volume
from ggo_cli.errors import SeriesError
from tests.dicom_factory import make_ct_series

NUMBERS = ["0", "-0", "1", "-1", "0.7", "1e38", "-1e38", "1e308", "1e-300", "NaN", "inf",
           "-inf", "65535", "-65536", "4294967296"]
TEXT = ["", " ", "abc", "1\\2", "1.2.3", "\\", "0x10", "--1", "1e", "\x00"]
"""Raw DICOM value strings: numbers of every kind and text that is none."""
MULTI_VALUED = {"PixelSpacing": 2, "ImagePositionPatient": 3, "ImageOrientationPatient": 6}
FIELDS = {
    "PixelSpacing": "DS",
    "ImagePositionPatient": "DS",
    "ImageOrientationPatient": "DS",
    "RescaleSlope": "DS",
    "RescaleIntercept": "DS",
    "SeriesNumber": "IS",
    "NumberOfFrames": "IS",
    "ImageType": "CS",
    "Rows": "US",
    "Columns": "US",
}


@pytest.fixture(autouse=True)
def lenient_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read as the CLI does (``quiet_pydicom``): values are never validated on read."""
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    fs = make_ct_series(tmp_path_factory.mktemp("fuzz-headers"), shape=(10, 16, 16))
    return [pydicom.dcmread(p) for p in fs.paths]


def _value(data: st.DataObject, keyword: str) -> bytes | None:
    """A random raw value for ``keyword`` (``None``: delete the element)."""
    if data.draw(st.integers(0, 9)) == 0:
        return None
    if FIELDS[keyword] == "US":
        return data.draw(st.integers(0, 65535)).to_bytes(2, "little")
    atom = st.sampled_from(NUMBERS + TEXT) | st.floats(allow_nan=True).map(repr)
    count = MULTI_VALUED.get(keyword, 1) + data.draw(st.sampled_from([0, 0, 0, -1, 1]))
    text = "\\".join(data.draw(atom) for _ in range(max(count, 1)))
    raw = text.encode("latin-1", "replace")
    return raw + b" " * (len(raw) % 2)


def _mutate(ds: Dataset, data: st.DataObject) -> None:
    for keyword in data.draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=4)):
        value = _value(data, keyword)
        tag = Tag(keyword)
        if value is None:
            if keyword in ds:
                del ds[keyword]
            continue
        ds[tag] = RawDataElement(tag, FIELDS[keyword], len(value), value, 0, False, True)


def _headers_mutated(headers: list[Dataset], data: st.DataObject) -> list[Dataset]:
    mutated = [copy.deepcopy(ds) for ds in headers]
    targets = data.draw(st.sampled_from(["all", "one"]))
    for ds in mutated if targets == "all" else mutated[:1]:
        _mutate(ds, data)
    if targets == "all":  # the same values on every slice, so later rules are reached
        for ds in mutated[1:]:
            for keyword in FIELDS:
                if keyword in mutated[0]:  # get_item: the raw element, not yet converted
                    ds[Tag(keyword)] = copy.deepcopy(mutated[0].get_item(keyword))
                elif keyword in ds:
                    del ds[keyword]
    return mutated


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_selection_gives_a_reason_and_never_raises(
    headers: list[Dataset], data: st.DataObject
) -> None:
    reason = skip_reason(_headers_mutated(headers, data), SelectionRules(min_slices=2))
    assert reason is None or (isinstance(reason, str) and "\n" not in reason)


finite_or_not = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.integers(-10, 70000),
    columns=st.integers(-10, 70000),
    spacing=st.lists(finite_or_not, min_size=0, max_size=3),
    orientation=st.lists(finite_or_not, min_size=0, max_size=7),
    positions=st.lists(st.lists(finite_or_not, min_size=2, max_size=4), min_size=1, max_size=4),
)
def test_geometry_budget_answers_with_a_reason(
    rows: int,
    columns: int,
    spacing: list[float],
    orientation: list[float],
    positions: list[list[float]],
) -> None:
    reason = geometry_problem(
        rows=rows, columns=columns, pixel_spacing=spacing, orientation=orientation,
        positions=positions,
    )
    if reason is None:
        assert 16 <= rows <= 2048 and all(math.isfinite(v) for v in spacing + orientation)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_modality_transform_is_plausible_or_a_series_error(
    headers: list[Dataset], data: st.DataObject
) -> None:
    ds = copy.deepcopy(headers[0])
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        value = _value(data, keyword)
        if value is None:
            del ds[keyword]
        else:
            tag = Tag(keyword)
            ds[tag] = RawDataElement(tag, "DS", len(value), value, 0, False, True)
    stored = data.draw(st.integers(0, 65535))
    ds.PixelData = np.full((16, 16), stored, np.uint16).tobytes()
    try:
        slope, _ = rescale_of(ds, "fuzz")
        assert RESCALE_SLOPE_RANGE[0] <= abs(slope) <= RESCALE_SLOPE_RANGE[1]
        hu = hu_slice(ds, "fuzz")
    except SeriesError as exc:
        assert "\n" not in str(exc)
        return
    assert HU_RANGE[0] <= float(hu.min()) and float(hu.max()) <= HU_RANGE[1]


@settings(
    max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_discovery_and_loading_of_mutated_files_fail_only_as_documented(
    headers: list[Dataset], tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    folder: Path = tmp_path_factory.mktemp("mutated")
    for k, ds in enumerate(_headers_mutated(headers, data)):
        ds.save_as(folder / f"{k}.dcm")
    for series in discover_series([folder], SelectionRules(min_slices=2)).series:
        if series.eligible:
            try:
                load_volume(series)
            except SeriesError as exc:
                assert "\n" not in str(exc)
