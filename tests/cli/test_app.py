"""End to end through the command line: outputs, volumes, SEG pixels, exit codes, privacy."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from typer.testing import CliRunner

from ggo_cli.cli.app import app
from tests.dciodvfy import dciodvfy_errors
from tests.dicom_factory import FactorySeries, make_ct_series
from tests.phantoms import make_cube_phantom

runner = CliRunner()
PHI = ("GGO^Phantom", "PHANTOM-001", "19600101")


def _segment(*args: str | Path) -> object:
    """``ggo-cli segment`` without the lung mask: these cube phantoms have no lungs."""
    return runner.invoke(
        app, ["segment", *map(str, args), "--no-progress", "--settle", "0", "--no-lung-mask"]
    )


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "ggo_volumes.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _tree_state(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture
def cube(tmp_path: Path) -> FactorySeries:
    """A cube of -500 HU (6 x 10 x 12 voxels) in lung, with decoys and shuffled names."""
    phantom = make_cube_phantom((14, 64, 64), (2.5, 0.7, 0.7), cube_voxels=(6, 10, 12))
    return make_ct_series(
        tmp_path, phantom=phantom, shuffle_names=True, localizer=True, non_dicom_file=True
    )


def test_cube_volume_is_exact_and_seg_pixels_match(
    tmp_path: Path, cube: FactorySeries, band_model_path: Path
) -> None:
    before = _tree_state(cube.root)
    out = tmp_path / "out"
    result = _segment(cube.root, "--out", out, "--model", band_model_path)
    assert result.exit_code == 0, result.output
    rows = {r["series_instance_uid"]: r for r in _rows(out)}
    row = rows[cube.series_instance_uid]
    assert row["status"] == "ok"
    assert float(row["ggo_volume_ml"]) == pytest.approx(cube.ggo_volume_ml, abs=1e-6)
    assert int(row["ggo_voxels"]) == 6 * 10 * 12
    assert int(row["ggo_slice_count"]) == 6
    assert any(r["status"] == "skipped" and "localizer" in r["message"] for r in rows.values())
    seg_path = out / row["seg_path"]
    assert seg_path == out / cube.study_instance_uid / cube.series_instance_uid / "ggo.seg.dcm"
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(cube.sop_instance_uids), segment_numbers=[1]
    )
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), cube.ggo_mask)
    assert str(seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue) == "112120"
    assert (seg_path.parent / "overlay.png").is_file()
    assert dciodvfy_errors(seg_path) == []
    assert _tree_state(cube.root) == before, "the input tree changed"
    assert not list(out.rglob("*.tmp")), "temporary files left behind"
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["counts"]["ok"] == 1 and manifest["device"]["used"] == "cpu"
    assert manifest["model"]["graph_sha256"]


def test_json_summary_on_stdout(tmp_path: Path, cube: FactorySeries, band_model_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "segment",
            str(cube.root),
            "-o",
            str(out),
            "-m",
            str(band_model_path),
            "--json",
            "--settle",
            "0",
            "--no-lung-mask",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["counts"] == {
        "series": 2,
        "ok": 1,
        "skipped": 1,
        "failed": 0,
        "pending": 0,
        "unchanged": 0,
    }
    ok = [s for s in summary["series"] if s["status"] == "ok"]
    assert ok[0]["ggo_volume_ml"] == pytest.approx(cube.ggo_volume_ml)


def test_ggo_free_study_still_gets_a_complete_seg(tmp_path: Path, band_model_path: Path) -> None:
    fs = make_ct_series(tmp_path, phantom=np.full((10, 32, 32), -1000.0, dtype=np.float32))
    out = tmp_path / "out"
    result = _segment(fs.root, "--out", out, "--model", band_model_path)
    assert result.exit_code == 0, result.output
    (row,) = _rows(out)
    assert row["status"] == "ok" and float(row["ggo_volume_ml"]) == 0.0
    seg = hd.seg.segread(out / row["seg_path"])
    assert seg.NumberOfFrames == 10
    referenced = {
        item.ReferencedSOPInstanceUID
        for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == set(fs.sop_instance_uids)


def test_png_all_writes_one_png_per_ggo_slice(
    tmp_path: Path, cube: FactorySeries, band_model_path: Path
) -> None:
    out = tmp_path / "out"
    result = _segment(cube.root, "--out", out, "--model", band_model_path, "--png", "all")
    assert result.exit_code == 0, result.output
    slices = list(
        (out / cube.study_instance_uid / cube.series_instance_uid / "slices").glob("*.png")
    )
    assert len(slices) == 6


def test_partial_failure_exits_7_and_runs_the_rest(tmp_path: Path, band_model_path: Path) -> None:
    good = make_ct_series(tmp_path, folder="good", seed=1)
    bad = make_ct_series(tmp_path, folder="bad", uneven_spacing=True, seed=2)
    out = tmp_path / "out"
    result = _segment(good.root, bad.root, "--out", out, "--model", band_model_path)
    assert result.exit_code == 7, result.output
    status = {r["series_instance_uid"]: (r["status"], r["message"]) for r in _rows(out)}
    assert status[good.series_instance_uid][0] == "ok"
    assert status[bad.series_instance_uid][0] == "failed"
    assert "slice spacing varies" in status[bad.series_instance_uid][1]
    assert not (out / bad.study_instance_uid / bad.series_instance_uid / "ggo.seg.dcm").exists()


def test_all_failed_exits_4(tmp_path: Path, band_model_path: Path) -> None:
    bad = make_ct_series(tmp_path, missing_rescale_intercept=True)
    result = _segment(bad.root, "--out", tmp_path / "out", "--model", band_model_path)
    assert result.exit_code == 4, result.output


def test_no_eligible_series_exits_3_with_reasons_in_the_csv(
    tmp_path: Path, band_model_path: Path
) -> None:
    fs = make_ct_series(tmp_path, shape=(5, 32, 32))
    out = tmp_path / "out"
    result = _segment(fs.root, "--out", out, "--model", band_model_path)
    assert result.exit_code == 3, result.output
    (row,) = _rows(out)
    assert row["status"] == "skipped" and "at least 10 required" in row["message"]


def test_folder_without_dicom_exits_3(tmp_path: Path, band_model_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no images here")
    result = _segment(tmp_path / "in", "--out", tmp_path / "out", "--model", band_model_path)
    assert result.exit_code == 3, result.output


def test_missing_input_exits_2(tmp_path: Path, band_model_path: Path) -> None:
    result = _segment(tmp_path / "absent", "--out", tmp_path / "out", "--model", band_model_path)
    assert result.exit_code == 2, result.output
    assert "input not found" in result.stderr


def test_output_inside_input_exits_2(tmp_path: Path, band_model_path: Path) -> None:
    fs = make_ct_series(tmp_path)
    result = _segment(fs.root, "--out", fs.root / "results", "--model", band_model_path)
    assert result.exit_code == 2, result.output
    assert "inside the input" in result.stderr
    assert not (fs.root / "results").exists()


def test_bad_device_exits_2(tmp_path: Path, band_model_path: Path) -> None:
    fs = make_ct_series(tmp_path)
    result = _segment(fs.root, "-o", tmp_path / "out", "-m", band_model_path, "--device", "tpu")
    assert result.exit_code == 2, result.output


def test_missing_model_exits_5_and_says_how(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path)
    result = _segment(fs.root, "--out", tmp_path / "out", "--model", tmp_path / "none.onnx")
    assert result.exit_code == 5, result.output
    assert "--model" in result.stderr


def test_corrupt_model_exits_5(tmp_path: Path) -> None:
    fs = make_ct_series(tmp_path)
    model = tmp_path / "broken.onnx"
    model.write_bytes(b"\x08\x07garbage")
    result = _segment(fs.root, "--out", tmp_path / "out", "--model", model)
    assert result.exit_code == 5, result.output


def test_explicit_cuda_without_gpu_exits_5(tmp_path: Path, band_model_path: Path) -> None:
    if Path("/proc/driver/nvidia/gpus").is_dir():
        pytest.skip("a GPU is present")
    fs = make_ct_series(tmp_path)
    result = _segment(fs.root, "-o", tmp_path / "out", "-m", band_model_path, "--device", "cuda")
    assert result.exit_code == 5, result.output


def test_unwritable_output_exits_6(tmp_path: Path, band_model_path: Path) -> None:
    fs = make_ct_series(tmp_path)
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    result = _segment(fs.root, "--out", blocker, "--model", band_model_path)
    assert result.exit_code == 6, result.output


def test_logs_never_contain_patient_identifiers(
    tmp_path: Path, cube: FactorySeries, band_model_path: Path
) -> None:
    log_file = tmp_path / "ggo.log"
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "-vv",
            "--log-file",
            str(log_file),
            "segment",
            str(cube.root),
            "-o",
            str(out),
            "-m",
            str(band_model_path),
            "--no-progress",
            "--settle",
            "0",
            "--no-lung-mask",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    logged = log_file.read_text() + result.stderr + result.stdout
    logged += (out / "run_manifest.json").read_text() + (out / "ggo_volumes.csv").read_text()
    assert "series" in log_file.read_text()
    for identifier in PHI:
        assert identifier not in logged


def test_patient_id_column_only_on_request(
    tmp_path: Path, cube: FactorySeries, band_model_path: Path
) -> None:
    out = tmp_path / "out"
    result = _segment(cube.root, "-o", out, "-m", band_model_path, "--include-patient-id")
    assert result.exit_code == 0, result.output
    assert {r["patient_id"] for r in _rows(out)} == {"PHANTOM-001"}


def test_rerun_reproduces_the_seg_uids(
    tmp_path: Path, cube: FactorySeries, band_model_path: Path
) -> None:
    out = tmp_path / "out"
    uids = []
    for _ in range(2):
        assert _segment(cube.root, "-o", out, "-m", band_model_path).exit_code == 0
        (row,) = [r for r in _rows(out) if r["status"] == "ok"]
        seg = hd.seg.segread(out / row["seg_path"])
        uids.append((seg.SeriesInstanceUID, seg.SOPInstanceUID))
    assert uids[0] == uids[1]


def test_version_and_help() -> None:
    assert runner.invoke(app, ["--version"]).stdout.startswith("ggo-cli ")
    helped = runner.invoke(app, ["segment", "--help"])
    assert helped.exit_code == 0 and "Examples" in helped.stdout


def test_info_reports_decoders_and_model(band_model_path: Path) -> None:
    result = runner.invoke(app, ["info", "--model", str(band_model_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"]["ok"] is True
    assert "pylibjpeg" in report["decoders"]["JPEG Lossless SV1 (1.2.840.10008.1.2.4.70)"]
    host = report["host"]
    assert host["usable_cores"] >= 1 and host["auto_jobs_300_slices"] >= 1
    if not report["nvidia_gpu_visible"]:
        assert host["auto_jobs_300_slices"] == 1  # the CPU: one process


def test_info_flags_a_broken_model(tmp_path: Path) -> None:
    model = tmp_path / "broken.onnx"
    model.write_bytes(b"junk")
    result = runner.invoke(app, ["info", "--model", str(model), "--json"])
    assert result.exit_code == 5
    assert json.loads(result.stdout)["model"]["ok"] is False


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_output_exits_6(tmp_path: Path, band_model_path: Path) -> None:
    fs = make_ct_series(tmp_path)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        result = _segment(fs.root, "--out", out, "--model", band_model_path)
    finally:
        out.chmod(0o700)
    assert result.exit_code == 6, result.output


def test_unexpected_error_exits_1_with_one_line(
    tmp_path: Path, band_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ggo_cli.run.runner

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(ggo_cli.run.runner, "run_segment", boom)
    fs = make_ct_series(tmp_path)
    result = _segment(fs.root, "--out", tmp_path / "out", "--model", band_model_path)
    assert result.exit_code == 1, result.output
    assert "unexpected RuntimeError: simulated bug" in result.stderr
    assert "Traceback" not in result.stderr


def test_info_checks_the_output_folder(tmp_path: Path, band_model_path: Path) -> None:
    ok = runner.invoke(
        app, ["info", "-m", str(band_model_path), "--out", str(tmp_path / "o"), "--json"]
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["output_folder"]["writable"] is True
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    bad = runner.invoke(app, ["info", "-m", str(band_model_path), "--out", str(blocker), "--json"])
    assert bad.exit_code == 6
    assert json.loads(bad.stdout)["output_folder"]["writable"] is False


def test_lung_mask_on_a_chest_phantom(tmp_path: Path, band_model_path: Path) -> None:
    """Issue 6 through the CLI: lung volumes, GGO kept inside the lungs, lung segments."""
    from ggo_cli.synthetic.phantom import make_chest_phantom

    phantom = make_chest_phantom((24, 128, 128), (5.0, 2.5, 2.5), seed=3)
    fs = make_ct_series(tmp_path, phantom=phantom)
    runs = {}
    for flag in ("--lung-mask", "--no-lung-mask"):
        out = tmp_path / flag.strip("-")
        result = runner.invoke(
            app,
            [
                "segment",
                str(fs.root),
                "-o",
                str(out),
                "-m",
                str(band_model_path),
                flag,
                "--no-progress",
                "--settle",
                "0",
            ],
        )
        assert result.exit_code == 0, result.output
        with (out / "ggo_volumes.csv").open(newline="") as fh:
            (row,) = list(csv.DictReader(fh))
        runs[flag] = (row, hd.seg.segread(out / row["seg_path"]))
    row, seg = runs["--lung-mask"]
    assert float(row["right_lung_volume_ml"]) == pytest.approx(
        phantom.lung_right_volume_ml, rel=0.03
    )
    assert float(row["left_lung_volume_ml"]) == pytest.approx(phantom.lung_left_volume_ml, rel=0.03)
    assert [s.SegmentLabel for s in seg.SegmentSequence][1:] == ["Right lung", "Left lung"]
    uids = list(fs.sop_instance_uids)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1, 2, 3]
    ).astype(bool)
    assert pixels[..., 0].any() and not (pixels[..., 0] & ~pixels[..., 1:].any(axis=-1)).any()
    ggo_ml = float(row["ggo_volume_ml"])
    lung_ml = float(row["lung_volume_ml"])
    assert float(row["ggo_percent_of_lung"]) == pytest.approx(100 * ggo_ml / lung_ml, abs=1e-4)
    assert dciodvfy_errors(tmp_path / "lung-mask" / row["seg_path"]) == []
    plain, plain_seg = runs["--no-lung-mask"]
    assert all(plain[c] == "" for c in ("lung_volume_ml", "ggo_percent_of_lung"))
    assert len(plain_seg.SegmentSequence) == 1
    # The HU band also marks partial-volume voxels at the body's surface: outside the lungs.
    assert int(plain["ggo_voxels"]) > int(row["ggo_voxels"])
