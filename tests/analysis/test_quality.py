"""Quality flags per series (ggo_cli.analysis.quality): each rule on data that triggers it and
on data
that does not, the marginal-call count of predict on every path, and the flags through the
CSV, the log, --json, the manifest, the summary, the worker processes and the state store."""

from __future__ import annotations

import csv
import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from typer.testing import CliRunner, Result

from ggo_cli.analysis.lungs import LungMasks
from ggo_cli.analysis.preprocessing import preprocess_hu, sigmoid, to_source_grid
from ggo_cli.analysis.quality import (
    LungCoverage,
    QcFacts,
    QcFlag,
    format_flags,
    lung_coverage,
    near_threshold_logit,
    parse_flags,
    series_flags,
)
from ggo_cli.analysis.segmenter import OnnxSegmenter
from ggo_cli.cli.app import app
from ggo_cli.domain import CtVolume, LungMeasurement, SeriesInfo
from ggo_cli.onnx.model_info import load_model_info
from tests.dicom_factory import make_ct_series
from tests.phantoms import make_cube_phantom

runner = CliRunner()

# The band model (tests/onnx_models.py) gives logit 50 * (hu + 750) / 1500 near the band's
# low end: -745 HU -> logit 0.167, probability 0.54 (marginal at threshold 0.5); -700 HU ->
# logit 1.67, probability 0.84 (confident); -1000 HU -> no GGO.
MARGINAL_HU, CONFIDENT_HU, AIR_HU = -745, -700, -1000


def _lungs(total_ml: float = 4600.0, left_ml: float = 2200.0) -> LungMeasurement:
    right_ml = total_ml - left_ml
    return LungMeasurement(total_ml, left_ml, right_ml, 1.0, 10.0, 10.0, 1.0, 1.0)


CLEAN = QcFacts(
    slice_spacing_mm=1.25,
    voxel_volume_ml=0.01,
    lungs=_lungs(),
    coverage=LungCoverage(at_fov_edge=False, end_area_fraction=0.05),
    predicted_ggo_voxels=1000,
    kept_ggo_voxels=950,
    near_threshold_voxels=200,
    variant_checked=True,
)
"""A series that raises no flag; each case below changes one value."""


def test_a_clean_series_has_no_flags() -> None:
    assert series_flags(CLEAN) == ()


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"slice_spacing_mm": 5.5}, QcFlag.THICK_SLICES),
        ({"slice_spacing_mm": 8.0}, QcFlag.THICK_SLICES),
        ({"lungs": _lungs(total_ml=1900.0, left_ml=950.0)}, QcFlag.LUNG_VOLUME_OUT_OF_RANGE),
        ({"lungs": _lungs(total_ml=9100.0, left_ml=4500.0)}, QcFlag.LUNG_VOLUME_OUT_OF_RANGE),
        ({"lungs": _lungs(total_ml=3000.0, left_ml=650.0)}, QcFlag.LUNG_VOLUME_OUT_OF_RANGE),
        ({"lungs": _lungs(total_ml=7000.0, left_ml=1900.0)}, QcFlag.LUNG_VOLUME_OUT_OF_RANGE),
        ({"coverage": LungCoverage(True, 0.05)}, QcFlag.LUNG_AT_FOV_EDGE),
        ({"coverage": LungCoverage(False, 0.25)}, QcFlag.LUNG_AT_SCAN_END),
        ({"coverage": LungCoverage(False, 1.0)}, QcFlag.LUNG_AT_SCAN_END),
        ({"kept_ggo_voxels": 750}, QcFlag.GGO_OUTSIDE_LUNGS),  # 25 %, 2.5 mL removed
        ({"kept_ggo_voxels": 0}, QcFlag.GGO_OUTSIDE_LUNGS),
        ({"near_threshold_voxels": 501}, QcFlag.LOW_CONFIDENCE),
        ({"variant_checked": False}, QcFlag.VARIANT_UNCHECKED),
    ],
)
def test_each_rule_raises_its_flag(changes: dict[str, object], flag: QcFlag) -> None:
    assert series_flags(replace(CLEAN, **changes)) == (flag,)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"slice_spacing_mm": 5.0},  # at the limit, not thicker
        {"slice_spacing_mm": 5.000001},  # rounding of positions
        {"lungs": _lungs(total_ml=2000.0, left_ml=1000.0)},
        {"lungs": _lungs(total_ml=9000.0, left_ml=4500.0)},
        {"lungs": _lungs(total_ml=5700.0, left_ml=700.0)},  # right 5000
        {"coverage": LungCoverage(False, 0.24)},
        {"kept_ggo_voxels": 751},  # 24.9 % removed
        # all removed but under 1 mL: 99 voxels of 0.01 mL
        {"predicted_ggo_voxels": 99, "kept_ggo_voxels": 0, "near_threshold_voxels": 0},
        {"near_threshold_voxels": 500},  # exactly half: not more than half
        # too few voxels to judge, however marginal
        {"predicted_ggo_voxels": 99, "kept_ggo_voxels": 99, "near_threshold_voxels": 99},
        {"predicted_ggo_voxels": 0, "kept_ggo_voxels": 0, "near_threshold_voxels": 0},
    ],
)
def test_values_inside_the_limits_raise_nothing(changes: dict[str, object]) -> None:
    assert series_flags(replace(CLEAN, **changes)) == ()  # type: ignore[arg-type]


def test_without_the_lung_mask_the_lung_rules_are_not_applied() -> None:
    facts = replace(CLEAN, lungs=None, coverage=None, kept_ggo_voxels=CLEAN.predicted_ggo_voxels)
    assert series_flags(facts) == ()


def test_flags_come_in_the_fixed_order() -> None:
    everything = QcFacts(
        slice_spacing_mm=10.0,
        voxel_volume_ml=0.01,
        lungs=_lungs(total_ml=1000.0, left_ml=500.0),
        coverage=LungCoverage(True, 0.9),
        predicted_ggo_voxels=1000,
        kept_ggo_voxels=100,
        near_threshold_voxels=900,
        variant_checked=False,
    )
    flags = series_flags(everything)
    assert flags == tuple(QcFlag)
    assert [f.value for f in flags] == [
        "thick_slices",
        "lung_volume_out_of_range",
        "lung_at_fov_edge",
        "lung_at_scan_end",
        "ggo_outside_lungs",
        "low_confidence",
        "variant_unchecked",
    ]
    cell = format_flags(flags)
    assert cell == ";".join(f.value for f in QcFlag)
    assert parse_flags(cell) == tuple(f.value for f in QcFlag)
    assert parse_flags("") == () and format_flags(()) == ""


# --- lung coverage from masks -----------------------------------------------------------------


def _tissue(shape: tuple[int, int, int] = (4, 20, 20)) -> npt.NDArray[np.int16]:
    return np.full(shape, 40, dtype=np.int16)


def _two_lungs(shape: tuple[int, int, int] = (4, 20, 20)) -> LungMasks:
    right, left = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    right[1:3, 5:10, 3:8] = True
    left[1:3, 5:10, 12:17] = True
    return LungMasks(right=right, left=left)


def test_lungs_inside_the_field_of_view_and_the_scan_are_not_at_an_edge() -> None:
    coverage = lung_coverage(_tissue(), _two_lungs())
    assert coverage == LungCoverage(at_fov_edge=False, end_area_fraction=0.0)


@pytest.mark.parametrize("where", ["top", "bottom", "left", "right"])
def test_a_lung_on_the_image_border_is_at_the_fov_edge(where: str) -> None:
    lungs = _two_lungs()
    spot = {"top": (1, 0, 5), "bottom": (1, 19, 5), "left": (1, 7, 0), "right": (2, 7, 19)}
    lungs.left[spot[where]] = True
    assert lung_coverage(_tissue(), lungs).at_fov_edge


@pytest.mark.parametrize(
    ("padding_hu", "lung_col", "at_edge"),
    [
        (-2000, 2, True),  # 4-adjacent to the padding
        (-3024, 2, True),
        (-1500, 2, True),  # at the padding limit
        (-2000, 3, False),  # one pixel of tissue between
        (-1400, 2, False),  # very low air, not padding
    ],
)
def test_a_lung_beside_the_padding_outside_the_circle_is_at_the_fov_edge(
    padding_hu: int, lung_col: int, at_edge: bool
) -> None:
    hu = _tissue()
    hu[:, :, :2] = padding_hu  # outside the reconstructed circle
    lungs = _two_lungs()
    lungs.right[1, 7, lung_col] = True
    assert lung_coverage(hu, lungs).at_fov_edge is at_edge


def test_a_lung_diagonal_to_padding_is_not_at_the_fov_edge() -> None:
    hu = _tissue()
    hu[1, 4, 2] = -2000
    lungs = _two_lungs()
    lungs.right[1, 5, 3] = True  # diagonal neighbour of the padding pixel only
    assert not lung_coverage(hu, lungs).at_fov_edge
    hu[1, 5, 2] = -2000  # now 4-adjacent
    assert lung_coverage(hu, lungs).at_fov_edge


def test_a_large_lung_section_on_an_end_slice_is_measured() -> None:
    shape = (5, 20, 20)
    lungs = LungMasks(np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool))
    lungs.right[2, 5:15, 5:15] = True  # 100 pixels, the largest section
    lungs.right[0, 5:10, 5:10] = True  # 25 pixels on the first slice
    lungs.left[4, 5:8, 5:8] = True  # 9 pixels on the last slice
    coverage = lung_coverage(_tissue(shape), lungs)
    assert coverage.end_area_fraction == pytest.approx(0.25)
    facts = replace(CLEAN, coverage=coverage)
    assert series_flags(facts) == (QcFlag.LUNG_AT_SCAN_END,)
    lungs.right[0, 5:10, 9] = False  # 20 pixels: 20 % of the largest
    assert series_flags(replace(CLEAN, coverage=lung_coverage(_tissue(shape), lungs))) == ()


def test_the_shared_real_series_has_whole_lungs_and_thick_slices(real_ct_dir: Path) -> None:
    """Lung-PET-CT-Dx A0002: 30 slices 8 mm apart covering both lungs (lung sections on the
    end slices 3 % and 0 % of the largest), lungs 2797 mL, not at the field of view's edge:
    of the rules that need no model, only thick_slices (the shipped model adds
    ggo_outside_lungs: README "Quality flags")."""
    from ggo_cli.analysis.lungs import segment_lungs
    from ggo_cli.analysis.measurements import lung_measurements
    from ggo_cli.dicom.discovery import discover_series
    from ggo_cli.dicom.volume import load_volume

    volume = load_volume(discover_series([real_ct_dir]).eligible[0])
    lungs = segment_lungs(volume)
    coverage = lung_coverage(volume.hu, lungs)
    assert not coverage.at_fov_edge and coverage.end_area_fraction < 0.05
    measured = lung_measurements(lungs, np.zeros(volume.hu.shape, bool), volume.voxel_volume_ml)
    facts = QcFacts(
        slice_spacing_mm=volume.slice_spacing_mm,
        voxel_volume_ml=volume.voxel_volume_ml,
        lungs=measured,
        coverage=coverage,
        predicted_ggo_voxels=0,
        kept_ggo_voxels=0,
        near_threshold_voxels=0,
        variant_checked=True,
    )
    assert series_flags(facts) == (QcFlag.THICK_SLICES,)


# --- marginal calls counted by predict ------------------------------------------------------


def _volume(hu: npt.NDArray[np.int16] | npt.NDArray[np.float32]) -> CtVolume:
    return CtVolume(SeriesInfo("1.2.3", "1.2.3.4", (), "x"), hu, (), 2.0, (0.5, 0.5))


def _marginal_and_confident(shape: tuple[int, int, int]) -> npt.NDArray[np.int16]:
    hu = np.full(shape, AIR_HU, dtype=np.int16)
    hu[:, : shape[1] // 3] = MARGINAL_HU
    hu[:, shape[1] // 3 : shape[1] // 2] = CONFIDENT_HU
    return hu


@pytest.mark.parametrize("window_in_graph", [False, True])
def test_predict_counts_marginal_calls_on_the_model_grid(
    band_model_path: Path, window_in_graph: bool
) -> None:
    """On the model's grid (host logits, or the windowed graph's ``near`` output): exactly the
    -745 HU pixels are marginal, the -700 HU ones confident."""
    hu = _marginal_and_confident((5, 64, 64))
    seg = OnnxSegmenter(
        load_model_info(band_model_path),
        device="cpu",
        batch_size=2,
        window_in_graph=window_in_graph,
    )
    prediction = seg.predict(_volume(hu))
    assert (seg._windowed is not None) is window_in_graph
    assert prediction.predicted_ggo_voxels == int(prediction.ggo.sum())
    assert prediction.predicted_ggo_voxels == int((hu > AIR_HU).sum())
    assert prediction.near_threshold_voxels == int((hu == MARGINAL_HU).sum())


@pytest.mark.parametrize("window_in_graph", [False, True])
def test_with_the_threshold_near_one_every_call_is_marginal(
    band_model_path: Path, window_in_graph: bool
) -> None:
    """t = 0.95: t + 0.1 is above 1 (logit +inf), so every GGO call counts as marginal."""
    assert near_threshold_logit(0.95) == float("inf")
    hu = np.full((2, 64, 64), AIR_HU, dtype=np.int16)
    hu[:, :20] = -600  # logit 5, probability 0.993
    seg = OnnxSegmenter(
        load_model_info(band_model_path),
        device="cpu",
        threshold=0.95,
        window_in_graph=window_in_graph,
    )
    prediction = seg.predict(_volume(hu))
    assert prediction.predicted_ggo_voxels == 2 * 20 * 64
    assert prediction.near_threshold_voxels == prediction.predicted_ggo_voxels


def test_predict_counts_marginal_calls_on_the_source_grid_after_resizing(
    band_model_path: Path,
) -> None:
    """96 x 80 slices through the 64 x 64 model: marginal calls are counted on the resized
    probabilities, as the mask is decided."""
    hu = _marginal_and_confident((3, 96, 80)).astype(np.float32)
    model = load_model_info(band_model_path)
    seg = OnnxSegmenter(model, device="cpu")
    prediction = seg.predict(_volume(hu))
    logits = seg.predict_logits(
        preprocess_hu(
            hu,
            size=model.input_size,
            center_hu=model.window_center_hu,
            width_hu=model.window_width_hu,
        )
    )
    p = to_source_grid(sigmoid(logits), 96, 80)[:, 0]
    called = p > np.float32(0.5)
    assert prediction.predicted_ggo_voxels == int(called.sum()) == int(prediction.ggo.sum())
    assert prediction.near_threshold_voxels == int((called & (p < np.float32(0.6))).sum())
    marginal_rows = int((hu == MARGINAL_HU).sum())
    assert 0.9 * marginal_rows < prediction.near_threshold_voxels < 1.1 * marginal_rows


def test_an_unchecked_variant_flags_the_series_in_the_pipeline(
    tmp_path: Path, band_model_path: Path
) -> None:
    from ggo_cli.config import RunConfig
    from ggo_cli.dicom.discovery import discover_series
    from ggo_cli.run.pipeline import ComputedSeries, compute_series

    fs = make_ct_series(tmp_path, phantom=make_cube_phantom((12, 48, 48), cube_voxels=(4, 6, 6)))
    cfg = RunConfig(
        inputs=(fs.root,), out_dir=tmp_path / "out", model_path=band_model_path, lung_mask=False
    )
    seg = OnnxSegmenter(load_model_info(band_model_path), device="cpu")
    series = discover_series([fs.root]).eligible[0]
    done = compute_series(cfg, series, seg, cores=1)
    assert isinstance(done, ComputedSeries) and done.qc_flags == ()
    seg.variant_checked = False  # as the numeric self-check leaves a variant it did not run
    done = compute_series(cfg, series, seg, cores=1)
    assert isinstance(done, ComputedSeries)
    assert done.qc_flags == (QcFlag.VARIANT_UNCHECKED,)


# --- end to end -----------------------------------------------------------------------------


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "ggo_volumes.csv").open(newline="", encoding="utf-8") as fh:
        return {r["series_instance_uid"]: r for r in csv.DictReader(fh)}


def _segment(root: Path, out: Path, model: Path, *extra: str) -> Result:
    """``segment`` without the lung mask (cube phantoms have no lungs)."""
    args = ["segment", str(root), "-o", str(out), "-m", str(model), "--no-progress"]
    return runner.invoke(app, [*args, "--settle", "0", "--no-lung-mask", *extra])


def test_flags_reach_the_csv_log_json_manifest_and_summary(
    tmp_path: Path, band_model_path: Path
) -> None:
    """A series with 6 mm slices is flagged thick_slices everywhere; one with 2.5 mm slices
    has an empty cell. Worker processes and a rerun from the state store keep the flags; a
    store written before the column existed gives empty flags."""
    root = tmp_path / "in"
    thick, thin = (
        make_ct_series(
            root,
            phantom=make_cube_phantom((12, 48, 48), (slice_mm, 0.7, 0.7), cube_voxels=(4, 6, 6)),
            folder=name,
            seed=seed,
        )
        for name, slice_mm, seed in (("thick", 6.0, 1), ("thin", 2.5, 2))
    )
    out = tmp_path / "out"
    result = _segment(root, out, band_model_path, "--json")
    assert result.exit_code == 0, result.output
    stderr = result.stderr
    rows = _rows(out)
    assert rows[thick.series_instance_uid]["qc_flags"] == "thick_slices"
    assert rows[thin.series_instance_uid]["qc_flags"] == ""
    columns = list(rows[thin.series_instance_uid])
    assert columns.index("qc_flags") + 1 == columns.index("status")
    # the INFO line and the "review these" summary (UID, folder digest, flags)
    assert f"series {thick.series_instance_uid}: " in stderr and ", QC: thick_slices" in stderr
    assert "review these 1 series" in stderr
    review = [line for line in stderr.splitlines() if thick.series_instance_uid + " (" in line]
    assert len(review) == 1 and "(folder #" in review[0] and review[0].endswith(": thick_slices")
    assert f"{thin.series_instance_uid} (" not in stderr
    summary = json.loads(result.stdout)
    by_uid = {s["series_instance_uid"]: s for s in summary["series"]}
    assert by_uid[thick.series_instance_uid]["qc_flags"] == ["thick_slices"]
    assert by_uid[thin.series_instance_uid]["qc_flags"] == []
    manifest = json.loads((out / "run_manifest.json").read_text())
    entries = {s["series_instance_uid"]: s for s in manifest["series"]}
    assert entries[thick.series_instance_uid]["qc_flags"] == ["thick_slices"]
    assert entries[thin.series_instance_uid]["qc_flags"] == []
    assert manifest["qc_flag_counts"] == {f.value: int(f is QcFlag.THICK_SLICES) for f in QcFlag}

    # Worker processes pass the outcomes through intact.
    out2 = tmp_path / "out2"
    result = _segment(root, out2, band_model_path, "--jobs", "2")
    assert result.exit_code == 0, result.output
    assert json.loads((out2 / "run_manifest.json").read_text())["device"]["jobs"] == 2
    assert {k: r["qc_flags"] for k, r in _rows(out2).items()} == {
        k: r["qc_flags"] for k, r in rows.items()
    }

    # A rerun reuses both series from the state store: the rebuilt CSV keeps the flags.
    result = _segment(root, out, band_model_path)
    assert result.exit_code == 0, result.output
    assert _rows(out)[thick.series_instance_uid]["qc_flags"] == "thick_slices"
    assert "and 1 flagged in earlier runs" in result.stderr
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["counts"]["unchanged"] == 2
    assert manifest["qc_flag_counts"]["thick_slices"] == 1

    # A store from before the column: no flags, no crash.
    with sqlite3.connect(out / ".ggo-cli" / "state.sqlite") as db:
        for uid, row_json in db.execute("SELECT series_instance_uid, row_json FROM series"):
            row = json.loads(row_json)
            row.pop("qc_flags", None)
            db.execute(
                "UPDATE series SET row_json = ? WHERE series_instance_uid = ?",
                (json.dumps(row), uid),
            )
    db.close()
    result = _segment(root, out, band_model_path)
    assert result.exit_code == 0, result.output
    assert {r["qc_flags"] for r in _rows(out).values()} == {""}
    assert "review these" not in result.stderr
