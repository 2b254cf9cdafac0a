"""``ggo-cli segment`` with a GGO + consolidation model on a phantom of known volumes (issue 20).

The phantom's lungs are found exactly and the band models segment its cubes exactly, so every
volume is checked to the CSV's last decimal (1e-6 mL), as the one-channel cube test does.
"""

from __future__ import annotations

import csv
from decimal import Decimal
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from ggo_cli.cli.app import app
from ggo_cli.writers.overlay_legend import CONSOLIDATION_RGB
from ggo_cli.writers.report_csv import CONSOLIDATION_COLUMNS, CSV_COLUMNS
from tests.dciodvfy import dciodvfy_errors
from tests.dicom_factory import FactorySeries, make_ct_series
from tests.onnx_models import write_band_model, write_two_channel_model
from tests.phantoms import LESION_PHANTOM_SHAPE, LesionPhantom, make_lesion_phantom

SIZE = LESION_PHANTOM_SHAPE[1]
"""The models' input side: the phantom's, so no resampling blurs the cubes' edges."""
VOLUME_ABS_ML = 1e-6
"""The CSV's volumes have 6 decimals: exact to that (test_app's cube test)."""

runner = CliRunner()


@pytest.fixture(scope="module")
def lesions() -> LesionPhantom:
    return make_lesion_phantom()


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory, lesions: LesionPhantom) -> FactorySeries:
    return make_ct_series(tmp_path_factory.mktemp("lesions"), phantom=lesions.phantom)


def _segment(series: FactorySeries, model: Path, out: Path) -> dict[str, str]:
    result = runner.invoke(app, ["segment", str(series.root), "-o", str(out), "-m", str(model),
                                 "--no-progress", "--settle", "0", "--sc", "none", "--no-sr"])
    assert result.exit_code == 0, result.output
    with (out / "ggo_volumes.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        (row,) = list(reader)
    assert row["status"] == "ok", row["message"]
    return row


def _ml(row: dict[str, str], column: str) -> Decimal:
    return Decimal(row[column])


def test_two_channel_csv_adds_up_and_matches_the_true_volumes(
    tmp_path: Path, series: FactorySeries, lesions: LesionPhantom
) -> None:
    model = write_two_channel_model(tmp_path / "two.onnx", SIZE)
    row = _segment(series, model, tmp_path / "out")
    truth = lesions.phantom
    ggo, consolidation = truth.ggo_mask, lesions.consolidation_mask
    right, left = truth.lung_right_mask, truth.lung_left_mask
    expected = {
        "ggo_volume_ml": lesions.volume_ml(ggo),
        "right_ggo_volume_ml": lesions.volume_ml(ggo & right),
        "left_ggo_volume_ml": lesions.volume_ml(ggo & left),
        "consolidation_volume_ml": lesions.volume_ml(consolidation),
        "right_consolidation_volume_ml": lesions.volume_ml(consolidation & right),
        "left_consolidation_volume_ml": lesions.volume_ml(consolidation & left),
        "lesion_volume_ml": lesions.volume_ml(ggo | consolidation),
        "right_lung_volume_ml": lesions.volume_ml(right),
        "left_lung_volume_ml": lesions.volume_ml(left),
    }
    for column, ml in expected.items():
        assert float(row[column]) == pytest.approx(ml, abs=VOLUME_ABS_ML), column
    assert 0 < expected["right_consolidation_volume_ml"] < expected["left_consolidation_volume_ml"]
    lung_ml = expected["right_lung_volume_ml"] + expected["left_lung_volume_ml"]
    assert float(row["lesion_percent_of_lung"]) == pytest.approx(
        100 * expected["lesion_volume_ml"] / lung_ml, abs=1e-4)
    assert float(row["left_lesion_percent"]) == pytest.approx(
        100 * lesions.volume_ml((ggo | consolidation) & left) / expected["left_lung_volume_ml"],
        abs=1e-4)
    # GGO + consolidation = lesion; left + right = both (to the CSV's rounding).
    tolerance = Decimal("0.000001")
    assert abs(_ml(row, "ggo_volume_ml") + _ml(row, "consolidation_volume_ml")
               - _ml(row, "lesion_volume_ml")) <= tolerance
    assert abs(_ml(row, "left_consolidation_volume_ml") + _ml(row, "right_consolidation_volume_ml")
               - _ml(row, "consolidation_volume_ml")) <= tolerance
    assert abs(_ml(row, "ggo_percent_of_lung") + _ml(row, "consolidation_percent_of_lung")
               - _ml(row, "lesion_percent_of_lung")) <= Decimal("0.0001")
    assert "ggo_outside_lungs" not in row["qc_flags"]

    seg_path = tmp_path / "out" / row["seg_path"]
    seg = hd.seg.segread(seg_path)
    described = [(str(s.SegmentLabel), str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue))
                 for s in seg.SegmentSequence]
    assert described == [("GGO", "112120"), ("Consolidation", "9656002"),
                         ("Right lung", "39607008"), ("Left lung", "39607008")]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(series.sop_instance_uids), segment_numbers=[1, 2, 3, 4]
    ).astype(bool)
    for k, mask in enumerate((ggo, consolidation, right, left)):
        np.testing.assert_array_equal(pixels[..., k], mask)
    assert dciodvfy_errors(seg_path) == []


def test_overlapping_channels_give_the_voxel_to_consolidation(
    tmp_path: Path, series: FactorySeries, lesions: LesionPhantom
) -> None:
    # Channel 1's band takes in the GGO cubes (-500 HU) too: every GGO voxel is called both.
    model = write_two_channel_model(tmp_path / "wide.onnx", SIZE,
                                    consolidation_band_hu=(-600.0, 100.0))
    row = _segment(series, model, tmp_path / "out")
    lesion_ml = lesions.volume_ml(lesions.phantom.ggo_mask | lesions.consolidation_mask)
    assert int(row["ggo_voxels"]) == 0 and float(row["ggo_volume_ml"]) == 0.0
    assert float(row["consolidation_volume_ml"]) == pytest.approx(lesion_ml, abs=VOLUME_ABS_ML)
    assert float(row["lesion_volume_ml"]) == pytest.approx(lesion_ml, abs=VOLUME_ABS_ML)
    # The GGO given to consolidation is not counted as GGO the lung mask removed.
    assert "ggo_outside_lungs" not in row["qc_flags"]
    seg = hd.seg.segread(tmp_path / "out" / row["seg_path"])
    ggo_pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(series.sop_instance_uids), segment_numbers=[1, 2]
    ).astype(bool)
    assert not ggo_pixels[..., 0].any()


def test_a_one_channel_model_keeps_its_columns_with_the_new_ones_empty(
    tmp_path: Path, series: FactorySeries, lesions: LesionPhantom
) -> None:
    model = write_band_model(tmp_path / "one.onnx", SIZE)
    row = _segment(series, model, tmp_path / "out")
    assert all(row[column] == "" for column in CONSOLIDATION_COLUMNS)
    assert float(row["ggo_volume_ml"]) == pytest.approx(
        lesions.volume_ml(lesions.phantom.ggo_mask), abs=VOLUME_ABS_ML)
    seg = hd.seg.segread(tmp_path / "out" / row["seg_path"])
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["GGO", "Right lung",
                                                                  "Left lung"]


def test_overlay_png_and_sc_draw_consolidation_in_blue(
    tmp_path: Path, series: FactorySeries
) -> None:
    model = write_two_channel_model(tmp_path / "two.onnx", SIZE)
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(series.root), "-o", str(out), "-m", str(model),
                                 "--no-progress", "--settle", "0", "--no-sr"])
    assert result.exit_code == 0, result.output
    folder = out / series.study_instance_uid / series.series_instance_uid
    with Image.open(folder / "overlay.png") as image:
        png = np.asarray(image.convert("RGB")).astype(int)
    sc = pydicom.dcmread(folder / "sc" / "montage.dcm")
    for rgb in (png, sc.pixel_array.astype(int)):
        blue = np.all(np.abs(rgb - np.array(CONSOLIDATION_RGB)) <= 2, axis=-1)
        assert blue.sum() > 100
    texts = str(sc.DerivationDescription)
    assert "consolidation in blue" in texts
