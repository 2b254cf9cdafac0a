"""``ggo-cli explain`` and ``segment --explain`` end to end on the analytic conv model pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ggo_cli.cli.app import app
from tests.dicom_factory import make_ct_series
from tests.onnx_models import write_conv_explain_pair

runner = CliRunner()


def _explain_args(study, out: Path, model: Path, *extra: str) -> list[str]:  # type: ignore[no-untyped-def]
    """``ggo-cli explain`` on the study with the conv model, no lung mask, no settling."""
    return [
        "explain",
        str(study.root),
        "-o",
        str(out),
        "-m",
        str(model),
        "--settle",
        "0",
        "--no-lung-mask",
        *extra,
    ]


@pytest.fixture
def study(tmp_path: Path):  # type: ignore[no-untyped-def]
    """12 slices of air with a dense block on 4 of them (the conv model fires on it)."""
    hu = np.full((12, 64, 64), -1000.0, dtype=np.float32)
    hu[4:8, 20:36, 24:40] = 40.0
    return make_ct_series(tmp_path, phantom=hu)


def test_explain_writes_npz_and_panels_only(tmp_path: Path, study) -> None:  # type: ignore[no-untyped-def]
    model, _ = write_conv_explain_pair(tmp_path / "model")
    out = tmp_path / "out"
    result = runner.invoke(app, _explain_args(study, out, model, "--no-progress", "--json"))
    assert result.exit_code == 0, result.output
    folder = out / study.study_instance_uid / study.series_instance_uid
    maps = np.load(folder / "gradcam.npz")
    cam, mask = maps["cam"], maps["mask"].astype(bool)
    assert cam.dtype == np.float32 and cam.shape == mask.shape and cam.shape[1:] == (64, 64)
    assert 0.0 <= cam.min() and cam.max() <= 1.0
    assert list(maps["sop_instance_uids"]) == [study.sop_instance_uids[i] for i in range(4, 8)]
    assert cam[mask].mean() >= 2 * cam[~mask].mean()
    assert len(list((folder / "gradcam").glob("slice_*.png"))) == 4
    assert not (folder / "ggo.seg.dcm").exists() and not (out / "ggo_volumes.csv").exists()


def test_segment_explain_does_both_in_one_pass(tmp_path: Path, study) -> None:  # type: ignore[no-untyped-def]
    model, _ = write_conv_explain_pair(tmp_path / "model")
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "segment",
            str(study.root),
            "-o",
            str(out),
            "-m",
            str(model),
            "--settle",
            "0",
            "--no-lung-mask",
            "--no-progress",
            "--explain",
            "--slices",
            "all",
            "--layer",
            "head",
        ],
    )
    assert result.exit_code == 0, result.output
    folder = out / study.study_instance_uid / study.series_instance_uid
    assert (folder / "ggo.seg.dcm").is_file() and (folder / "gradcam.npz").is_file()
    assert np.load(folder / "gradcam.npz")["cam"].shape[0] == 12


def test_missing_explain_graph_is_a_model_error(tmp_path: Path, study) -> None:  # type: ignore[no-untyped-def]
    model, explain = write_conv_explain_pair(tmp_path / "model")
    explain.unlink()
    result = runner.invoke(app, _explain_args(study, tmp_path / "o", model))
    assert result.exit_code == 5, result.output
    assert "export-explain" in result.stderr


def test_unknown_layer_lists_the_choices(tmp_path: Path, study) -> None:  # type: ignore[no-untyped-def]
    model, _ = write_conv_explain_pair(tmp_path / "model")
    result = runner.invoke(app, _explain_args(study, tmp_path / "o", model, "--layer", "nope"))
    assert result.exit_code == 2, result.output
    assert "conv" in result.stderr and "head" in result.stderr


def test_explain_runs_with_torch_unimportable(tmp_path: Path, study) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    model, _ = write_conv_explain_pair(tmp_path / "model")
    script = "import sys; sys.modules['torch'] = None\nfrom ggo_cli.cli.app import app\napp()\n"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            *_explain_args(study, tmp_path / "o", model, "--no-progress"),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert list((tmp_path / "o").rglob("gradcam.npz"))


def test_target_consolidation_writes_its_own_maps_beside_ggo(tmp_path: Path, study) -> None:  # type: ignore[no-untyped-def]
    model, _ = write_conv_explain_pair(tmp_path / "model", channels=2)
    out = tmp_path / "out"
    args = _explain_args(study, out, model, "--no-progress", "--target", "consolidation")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    folder = out / study.study_instance_uid / study.series_instance_uid
    with np.load(folder / "gradcam_consolidation.npz") as maps:
        assert str(maps["target"]) == "consolidation"
        labels, mask, cam = maps["labels"], maps["mask"].astype(bool), maps["cam"]
    np.testing.assert_array_equal(mask, labels == 2)
    assert mask.any() and (labels == 1).any()  # the block's core, and its GGO rim
    assert cam[mask].mean() >= 2 * cam[~mask].mean()
    assert len(list((folder / "gradcam_consolidation").glob("slice_*.png"))) == 4
    assert not (folder / "gradcam").exists() and not (folder / "gradcam.npz").exists()
    # Explaining GGO afterwards adds its own maps and leaves consolidation's alone.
    result = runner.invoke(app, _explain_args(study, out, model, "--no-progress"))
    assert result.exit_code == 0, result.output
    with np.load(folder / "gradcam.npz") as maps:
        assert str(maps["target"]) == "ggo"
        np.testing.assert_array_equal(maps["mask"].astype(bool), maps["labels"] == 1)
    assert (folder / "gradcam_consolidation.npz").is_file()


def test_target_consolidation_of_a_ggo_only_model_is_refused_before_any_work(
    tmp_path: Path, study  # type: ignore[no-untyped-def]
) -> None:
    model, _ = write_conv_explain_pair(tmp_path / "model")
    out = tmp_path / "out"
    result = runner.invoke(app, _explain_args(study, out, model, "--target", "consolidation"))
    assert result.exit_code == 2, result.output
    assert "no consolidation channel" in result.stderr
    assert not list(out.rglob("*.npz")) and not list(out.rglob("*.png"))


def test_target_consolidation_with_a_ggo_only_explain_graph_is_a_model_error(
    tmp_path: Path, study  # type: ignore[no-untyped-def]
) -> None:
    model, _ = write_conv_explain_pair(tmp_path / "model", channels=2, explain_channels=1)
    out = tmp_path / "out"
    result = runner.invoke(app, _explain_args(study, out, model, "--target", "consolidation"))
    assert result.exit_code == 5, result.output
    assert "explains GGO only" in result.stderr and "export-explain" in result.stderr
    assert not list(out.rglob("*.npz"))


def test_unknown_target_is_a_usage_error(tmp_path: Path, study) -> None:  # type: ignore[no-untyped-def]
    model, _ = write_conv_explain_pair(tmp_path / "model", channels=2)
    result = runner.invoke(app, _explain_args(study, tmp_path / "o", model, "--target", "lesion"))
    assert result.exit_code == 2, result.output
