"""Options are parsed and checked once, in the CLI, before any lock is taken or input walked."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ggo_cli.cli.app import app
from ggo_cli.cli.build import build_run_config
from ggo_cli.config import DeviceKind, DeviceRequest, ExplainMode, parse_device
from ggo_cli.errors import InputError
from ggo_cli.onnx.precision import Precision
from tests.dicom_factory import make_ct_series

runner = CliRunner()


@pytest.fixture
def no_walk(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Make any discovery walk fail the test (and record that it was tried)."""
    walks: list[object] = []

    def spy(*args: object, **kwargs: object) -> None:
        walks.append(args)
        raise AssertionError("the inputs were walked")

    monkeypatch.setattr("ggo_cli.run.runner.discover_series", spy)
    return walks


def _segment(*args: str | Path) -> object:
    return runner.invoke(app, ["segment", *map(str, args), "--no-progress"])


def test_bogus_device_exits_2_before_lock_or_walk(
    tmp_path: Path, band_model_path: Path, no_walk: list[object]
) -> None:
    fs = make_ct_series(tmp_path)
    out = tmp_path / "out"
    result = _segment(fs.root, "--out", out, "-m", band_model_path, "--device", "bogus")
    assert result.exit_code == 2, result.output
    assert "invalid --device 'bogus'; use auto, cpu, cuda or cuda:N" in result.stderr
    assert not (out / ".ggo-cli" / "lock").exists()
    assert not out.exists()
    assert no_walk == []


def test_bogus_device_of_explain_exits_2_before_lock_or_walk(
    tmp_path: Path, band_model_path: Path, no_walk: list[object]
) -> None:
    fs = make_ct_series(tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["explain", str(fs.root), "-o", str(out), "-m", str(band_model_path), "-d", "cpu:1"]
    )
    assert result.exit_code == 2, result.output
    assert "invalid --device 'cpu:1'" in result.stderr
    assert not out.exists() and no_walk == []


@pytest.mark.parametrize("number", ["0", "-3", "2147483648"])
def test_seg_series_number_out_of_range_exits_2(
    tmp_path: Path, band_model_path: Path, no_walk: list[object], number: str
) -> None:
    fs = make_ct_series(tmp_path)
    out = tmp_path / "out"
    result = _segment(fs.root, "-o", out, "-m", band_model_path, "--seg-series-number", number)
    assert result.exit_code == 2, result.output
    (line,) = [ln for ln in result.stderr.splitlines() if "--seg-series-number" in ln]
    assert line.endswith(f"invalid --seg-series-number {number}; DICOM allows 1 to 2147483647")
    assert not out.exists() and no_walk == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [("x" * 65, "65 characters"), ("a\\b", "no backslash"), ("a\tb", "control character")],
)
def test_bad_seg_series_description_exits_2(
    tmp_path: Path, band_model_path: Path, no_walk: list[object], text: str, reason: str
) -> None:
    fs = make_ct_series(tmp_path)
    out = tmp_path / "out"
    result = _segment(
        fs.root, "-o", out, "-m", band_model_path, "--seg-series-description", text
    )
    assert result.exit_code == 2, result.output
    assert reason in result.stderr
    assert not out.exists() and no_walk == []


def test_builder_types_every_option(tmp_path: Path, band_model_path: Path) -> None:
    cfg = build_run_config(
        [tmp_path],
        tmp_path / "out",
        model=band_model_path,
        device=" CUDA:1 ",
        precision=Precision.FP16,
        explain=ExplainMode.WITH_SEGMENT,
        series_number=1,
    )
    assert cfg.device == DeviceRequest(DeviceKind.CUDA, 1) and str(cfg.device) == "cuda:1"
    assert cfg.precision is Precision.FP16
    assert cfg.explain is ExplainMode.WITH_SEGMENT and not cfg.explain_only
    only = build_run_config(
        [tmp_path], tmp_path / "out", model=band_model_path, device="auto",
        explain=ExplainMode.ONLY,
    )
    assert only.explain_only and only.device == DeviceRequest()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("auto", "auto"),
        ("CPU", "cpu"), ("cuda", "cuda"), ("cuda:0", "cuda:0"),
        ("cuda:3", "cuda:3"),
    ],
)
def test_parse_device_keeps_the_value_as_written(value: str, expected: str) -> None:
    request = parse_device(value)
    assert str(request) == expected
    assert parse_device(request) is request
    assert request.index == (int(expected[5:]) if ":" in expected else 0)


@pytest.mark.parametrize("value", ["tpu", "cuda:", "cpu:0", "auto:1", "cuda:x", ""])
def test_parse_device_rejects_anything_else(value: str) -> None:
    with pytest.raises(InputError, match="use auto, cpu, cuda or cuda:N"):
        parse_device(value)
