"""What a two-channel model adds to the outputs (issue 20): CSV cells, follow-up, pictures."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from ggo_cli.domain import (
    Comparison,
    ConsolidationMeasurement,
    CtVolume,
    Followup,
    GgoMeasurement,
    LungMeasurement,
    SeriesInfo,
    SeriesOutcome,
    SeriesStatus,
    Trend,
)
from ggo_cli.run.followup import compare, result_from_row
from ggo_cli.writers.overlay_legend import CONSOLIDATION_RGB
from ggo_cli.writers.overlay_png import (
    CAPTION_PX,
    GGO_RGB,
    render_overlay,
    select_overlay_slices,
)
from ggo_cli.writers.report_csv import (
    CONSOLIDATION_COLUMNS,
    CSV_COLUMNS,
    LESION_FOLLOWUP_COLUMNS,
    followup_cells,
    outcome_row,
)
from ggo_cli.writers.sc_render import overlay_panels, sc_text_lines
from ggo_cli.writers.seg_segments import SEGMENT_COLORS_RGB
from ggo_cli.writers.slice_png import slice_overlays

SERIES = SeriesInfo("1.2.3", "1.2.3.4", (), "synthetic", study_date="20240131")
GGO = GgoMeasurement(voxel_volume_ml=0.5, ggo_voxels=3, ggo_volume_ml=1.5, ggo_slice_count=1)
LUNGS = LungMeasurement(1000.0, 400.0, 600.0, 0.15, 0.5, 1.0, 0.125, 1.0 / 6.0)
CONSOLIDATION = ConsolidationMeasurement(
    consolidation_voxels=5,
    consolidation_volume_ml=2.5,
    consolidation_slice_count=2,
    lesion_voxels=8,
    lesion_volume_ml=4.0,
    left_consolidation_volume_ml=2.0,
    right_consolidation_volume_ml=0.5,
    consolidation_percent_of_lung=0.25,
    lesion_percent_of_lung=0.4,
    left_lesion_percent=0.625,
    right_lesion_percent=0.25,
)


def _row(consolidation: ConsolidationMeasurement | None, tmp_path: Path) -> dict[str, str]:
    outcome = SeriesOutcome(SERIES, SeriesStatus.OK, measurement=GGO, lungs=LUNGS,
                            consolidation=consolidation)
    return outcome_row(outcome, tmp_path, model_name="m", model_version="1")


def test_csv_columns_follow_the_ggo_columns_and_add_up(tmp_path: Path) -> None:
    start = CSV_COLUMNS.index("right_ggo_percent") + 1
    assert CSV_COLUMNS[start:start + 8] == (
        "consolidation_volume_ml",
        "left_consolidation_volume_ml",
        "right_consolidation_volume_ml",
        "consolidation_percent_of_lung",
        "lesion_volume_ml",
        "lesion_percent_of_lung",
        "left_lesion_percent",
        "right_lesion_percent",
    )
    assert set(CONSOLIDATION_COLUMNS) == set(CSV_COLUMNS[start:start + 8])
    assert set(LESION_FOLLOWUP_COLUMNS) < set(CSV_COLUMNS)
    row = _row(CONSOLIDATION, tmp_path)
    assert row["consolidation_volume_ml"] == "2.500000"
    assert row["lesion_volume_ml"] == "4.000000"
    assert row["consolidation_percent_of_lung"] == "0.2500"
    assert row["left_lesion_percent"] == "0.6250" and row["right_lesion_percent"] == "0.2500"
    assert Decimal(row["ggo_volume_ml"]) + Decimal(row["consolidation_volume_ml"]) == Decimal(
        row["lesion_volume_ml"]
    )
    assert Decimal(row["left_consolidation_volume_ml"]) + Decimal(
        row["right_consolidation_volume_ml"]
    ) == Decimal(row["consolidation_volume_ml"])


def test_a_one_channel_row_is_unchanged_with_the_new_cells_empty(tmp_path: Path) -> None:
    one, two = _row(None, tmp_path), _row(CONSOLIDATION, tmp_path)
    assert all(one[column] == "" for column in CONSOLIDATION_COLUMNS)
    assert {k: v for k, v in one.items() if k not in CONSOLIDATION_COLUMNS} == {
        k: v for k, v in two.items() if k not in CONSOLIDATION_COLUMNS
    }
    no_lungs = outcome_row(
        SeriesOutcome(SERIES, SeriesStatus.OK, measurement=GGO,
                      consolidation=ConsolidationMeasurement(5, 2.5, 2, 8, 4.0)),
        tmp_path, model_name="m", model_version="1",
    )
    assert no_lungs["consolidation_volume_ml"] == "2.500000"
    assert no_lungs["left_consolidation_volume_ml"] == no_lungs["lesion_percent_of_lung"] == ""


def _stored(date: str, consolidation: str, lesion: str) -> dict[str, str]:
    return {
        "series_instance_uid": f"1.{date}", "study_instance_uid": f"2.{date}",
        "study_date": date, "status": "ok", "ggo_volume_ml": "1.000000",
        "ggo_percent_of_lung": "1.0000", "consolidation_volume_ml": consolidation,
        "lesion_percent_of_lung": lesion, "_link_key": "k",
    }


def test_follow_up_carries_the_consolidation_and_lesion_changes_where_both_have_them() -> None:
    now = result_from_row(_stored("2024-02-01", "7.250000", "3.5000"))
    then = result_from_row(_stored("2024-01-01", "2.000000", "1.2500"))
    comparison = compare(now, then)
    assert comparison.consolidation_change_ml == Decimal("5.25")
    assert comparison.lesion_percent_of_lung_change == Decimal("2.25")
    cells = followup_cells(Followup(True, comparison))
    assert cells["consolidation_change_ml"] == "5.250000"
    assert cells["lesion_percent_of_lung_change"] == "2.2500"
    # A prior stored before the columns existed (or by a one-channel model): no change.
    older = result_from_row({k: v for k, v in _stored("2024-01-01", "", "").items() if v})
    comparison = compare(now, older)
    assert comparison.consolidation_change_ml is None
    assert comparison.lesion_percent_of_lung_change is None
    cells = followup_cells(Followup(True, comparison))
    assert all(cells.get(column, "") == "" for column in LESION_FOLLOWUP_COLUMNS)
    plain = Comparison(dt.date(2024, 1, 1), 31, Decimal(1), Decimal(0), Trend.STABLE)
    assert plain.consolidation_change_ml is None  # older callers' Comparisons still build


@pytest.fixture
def volume() -> CtVolume:
    hu = np.full((6, 48, 64), -850, dtype=np.int16)
    headers = tuple(Dataset() for _ in range(6))
    return CtVolume(SERIES, hu, headers, slice_spacing_mm=5.0, pixel_spacing_mm=(1.0, 1.0))


def _colour(rgb: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Pixels within 2 of an exact colour (the opaque outline of a class)."""
    found: np.ndarray = np.all(np.abs(rgb.astype(int) - np.array(colour)) <= 2, axis=-1)
    return found


def test_overlay_draws_consolidation_in_the_seg_colour_with_a_legend(volume: CtVolume) -> None:
    assert CONSOLIDATION_RGB == SEGMENT_COLORS_RGB[1]
    ggo = np.zeros(volume.hu.shape, dtype=bool)
    consolidation = np.zeros(volume.hu.shape, dtype=bool)
    ggo[1, 10:20, 10:20] = True
    consolidation[4, 20:40, 30:50] = True  # a slice with consolidation only is shown too
    assert select_overlay_slices(ggo, consolidation=consolidation) == (1, 4)
    assert select_overlay_slices(ggo) == (1,)
    window = {"window_center_hu": -600.0, "window_width_hu": 1500.0}
    one = np.asarray(render_overlay(volume, ggo, **window))
    two = np.asarray(render_overlay(volume, ggo, consolidation=consolidation, **window))
    assert not _colour(one, CONSOLIDATION_RGB).any()
    assert _colour(two[CAPTION_PX:], CONSOLIDATION_RGB).sum() > 60  # the outline of 20 x 20
    assert _colour(two[CAPTION_PX:], GGO_RGB).sum() > 30
    # The legend's swatches: both colours in the caption strip, neither without consolidation.
    assert _colour(two[:CAPTION_PX], CONSOLIDATION_RGB).sum() >= 40
    assert _colour(two[:CAPTION_PX], GGO_RGB).sum() >= 40
    assert not _colour(one[:CAPTION_PX], GGO_RGB).any()
    shown = [index for index, _ in slice_overlays(volume, ggo, consolidation=consolidation,
                                                  **window)]
    assert shown == [1, 4]


def test_sc_lines_and_descriptions_name_consolidation(volume: CtVolume) -> None:
    names = {"model_name": "m", "model_version": "1", "software_version": "0"}
    one = sc_text_lines(GGO, LUNGS, **names)
    two = sc_text_lines(GGO, LUNGS, consolidation=CONSOLIDATION, **names)
    assert two[: len(one) - 1] == one[:-1] and two[-1] == one[-1]
    assert two[len(one) - 1:-1] == (
        "consolidation 2.500000 mL, lesion (GGO + consolidation) 4.000000 mL",
        "consolidation 0.2500 % of lungs, lesion 0.4000 % (right 0.2500 %, left 0.6250 %)",
    )
    ggo = np.zeros(volume.hu.shape, dtype=bool)
    consolidation = np.zeros(volume.hu.shape, dtype=bool)
    consolidation[2, 5:9, 5:9] = True
    window = {"window_center_hu": -600.0, "window_width_hu": 1500.0}
    panels = overlay_panels(volume, ggo, two, per_slice=True, consolidation=consolidation,
                            **window)
    assert [p.source_indices for p in panels[1:]] == [(2,)]
    assert all("consolidation in blue" in p.description for p in panels)
    plain = overlay_panels(volume, ggo, one, **window)
    assert "AI GGO segmentation in red" in plain[0].description


def test_a_row_stored_before_the_columns_existed_gets_them_empty(tmp_path: Path) -> None:
    import csv

    from ggo_cli.writers.report_csv import write_rows

    old = {k: v for k, v in _row(None, tmp_path).items() if k not in CONSOLIDATION_COLUMNS}
    path = write_rows([old, _row(CONSOLIDATION, tmp_path)], tmp_path / "ggo_volumes.csv")
    with path.open(newline="", encoding="utf-8") as fh:
        first, second = list(csv.DictReader(fh))
    assert all(first[column] == "" for column in CONSOLIDATION_COLUMNS)
    assert second["lesion_volume_ml"] == "4.000000"
