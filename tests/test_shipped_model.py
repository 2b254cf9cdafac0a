"""The shipped default model: it meets the contract, says its licence, and segments real CT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ggo_cli.cli import app
from ggo_cli.config import default_model_path
from ggo_cli.model_info import load_model_info


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


def test_explain_on_real_covid_ct_without_torch(covid_ct_dir: Path, tmp_path: Path) -> None:
    """Issue 4's acceptance: PNGs and gradcam.npz, and the CAM concentrates on the GGO."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    out = tmp_path / "out"
    script = "import sys; sys.modules['torch'] = None\nfrom ggo_cli.cli import app\napp()\n"
    # --no-lung-mask: these display images are cropped at the chest wall, so no closed body
    # surrounds the lungs and the density lung mask (made for whole CT sections) finds none.
    args = ["explain", str(covid_ct_dir), "-o", str(out), "--settle", "0", "--no-progress"]
    args.append("--no-lung-mask")
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    (npz_path,) = out.rglob("gradcam.npz")
    with np.load(npz_path) as npz:
        cam, mask, uids = npz["cam"], npz["mask"].astype(bool), npz["sop_instance_uids"]
    assert cam.dtype == np.float32 and cam.shape[1:] == (512, 512)
    assert mask.shape == cam.shape and len(uids) == len(cam) >= 8  # GGO on most test slices
    assert cam.min() >= 0.0 and cam.max() <= 1.0
    assert mask.reshape(len(mask), -1).any(axis=1).all()  # default: slices with GGO only
    pngs = sorted((npz_path.parent / "gradcam").glob("slice_*.png"))
    assert len(pngs) == len(cam)
    assert Image.open(pngs[0]).size[0] > 3 * 512  # three panels side by side
    inside, outside = float(cam[mask].mean()), float(cam[~mask].mean())
    assert inside >= 2.0 * outside, (inside, outside)
