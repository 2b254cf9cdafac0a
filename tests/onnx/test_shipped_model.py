"""The shipped default model: it meets the contract, says its licence, and segments real CT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ggo_cli.cli.app import app
from ggo_cli.config import default_model_path
from ggo_cli.onnx.model_info import load_model_info


def test_default_model_meets_the_contract() -> None:
    info = load_model_info(default_model_path())
    assert info.name == "ggo-resnet50-unet"
    assert info.input_size == 512
    assert (info.window_center_hu, info.window_width_hu) == (-600.0, 1500.0)
    ggo = info.segments[0].property_type
    assert (ggo.value, ggo.scheme_designator) == ("112120", "DCM")
    assert "non-commercial" in info.metadata["training_data"]["licence"]
    assert info.metadata["metrics"]["test"]["dice"] >= 0.65


def test_model_card_states_the_licence_and_matches_the_file() -> None:
    card = json.loads((default_model_path().parent / "model.json").read_text())
    assert "non-commercial" in card["training_data"]["licence"]
    assert card["sha256_file"] == load_model_info(default_model_path()).file_sha256


@pytest.mark.slow
def test_demo_runs_with_the_default_model(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--slices",
            "12",
            "--json",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    demo = json.loads(result.stdout)["demo"]
    assert demo["true_ggo_ml"] > 0
    assert (tmp_path / "demo" / "report.html").is_file()  # the demo's run gets its page too
    for true_ml, measured_ml in zip(demo["true_lung_ml"], demo["measured_lung_ml"], strict=True):
        assert measured_ml == pytest.approx(true_ml, rel=0.03)


@pytest.mark.slow
def test_real_series_with_the_default_model(real_ct_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "segment",
            str(real_ct_dir),
            "--out",
            str(tmp_path / "out"),
            "--json",
            "--no-progress",
            "--settle",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    (series,) = json.loads(result.stdout)["series"]
    assert series["status"] == "ok"


def test_the_shipped_model_has_reference_slices_and_recipes_per_cpu_class() -> None:
    import hashlib

    from ggo_cli.onnx.int8_recipes import VNNI_FLAGS, load_int8_spec
    from ggo_cli.onnx.reference_slices import REFERENCE_SET_NAME, load_reference_set

    info = load_model_info(default_model_path())
    reference = load_reference_set(info)
    assert reference is not None and reference.images.shape == (10, 512, 512)
    card = json.loads((default_model_path().parent / "model.json").read_text())
    recorded = card["reference_slices"]
    assert recorded["slices"] == list(reference.names)
    licences = " ".join(source["licence"] for source in recorded["sources"])
    assert "non-commercial" in licences and "CC BY 4.0" in licences
    sums = (default_model_path().parent / "SHA256SUMS").read_text()
    payload = (default_model_path().parent / REFERENCE_SET_NAME).read_bytes()
    assert f"{hashlib.sha256(payload).hexdigest()}  {REFERENCE_SET_NAME}" in sums
    spec = load_int8_spec(info)
    assert spec is not None
    by_name = {r.name: r for r in spec.recipes}
    assert list(by_name) == ["u8s8-vnni", "u8u8"]
    assert by_name["u8s8-vnni"].cpu_any == VNNI_FLAGS and by_name["u8u8"].cpu_any == ()
    assert by_name["u8s8-vnni"].fits({"avx2", "avx512_vnni"})
    assert not by_name["u8s8-vnni"].fits({"avx2", "fma"})
    assert all(r.acceptable for r in spec.recipes)


@pytest.mark.slow
def test_auto_precision_measures_within_2_percent_of_fp32_on_the_real_series(
    tmp_path: Path, real_ct_dir: Path
) -> None:
    """Issue 14's acceptance on whatever CPU runs it: ``auto`` (a variant only after its
    self-check) against ``--precision fp32`` on the shared real series."""
    volumes = {}
    for precision in ("auto", "fp32"):
        out = tmp_path / precision
        result = CliRunner().invoke(
            app,
            ["segment", str(real_ct_dir), "-o", str(out), "--no-progress", "--device", "cpu",
             "--precision", precision, "--json"],
        )
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "run_manifest.json").read_text())
        if precision == "auto" and manifest["device"]["precision"] == "int8":
            assert manifest["device"]["variant_check"]["passed"] is True
        (series,) = manifest["series"]
        volumes[precision] = series["ggo_volume_ml"]
    assert volumes["auto"] == pytest.approx(volumes["fp32"], rel=0.02)
