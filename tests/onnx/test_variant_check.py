"""The numeric self-check of model variants against float32 on this machine (issue 14)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from ggo_cli.analysis.segmenter import OnnxSegmenter
from ggo_cli.cli.app import app
from ggo_cli.errors import ModelError
from ggo_cli.onnx import variant_check, verdict_cache
from ggo_cli.onnx.int8_recipes import INT8_SPEC_NAME
from ggo_cli.onnx.model_info import load_model_info
from ggo_cli.onnx.precision import Precision
from ggo_cli.onnx.reference_slices import REFERENCE_SET_NAME, write_reference_set
from ggo_cli.onnx.verdict_cache import VerdictCache
from tests.dicom_factory import make_ct_series
from tests.onnx.test_precision import _conv_model_with_recipe

runner = CliRunner()
BAD_RANGES = 0.05
"""Calibration ranges scaled by this make an int8 variant whose activations clip: its digest
is the recorded one, its masks are not float32's."""


def _recipes(folder: Path, replace: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The int8 recipes of the model in ``folder`` (replaced first when ``replace`` is given)."""
    path = folder / INT8_SPEC_NAME
    spec = json.loads(path.read_text())
    if replace is not None:
        spec["recipes"] = replace
        path.write_text(json.dumps(spec))
    return list(spec["recipes"])


def test_a_good_int8_variant_passes_once_and_its_verdict_is_cached(
    tmp_path: Path, variant_check_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = load_model_info(_conv_model_with_recipe(tmp_path))
    first = OnnxSegmenter(info, device="cpu")
    assert first.precision is Precision.INT8 and first.variant_checked
    verdict = first.variant_check
    assert verdict is not None and verdict.passed and verdict.ran and not verdict.cached
    assert verdict.figures is not None and verdict.figures.n_slices == 6
    assert verdict.machine is not None and verdict.machine["onnxruntime"]
    entries = list((variant_check_cache / "variant-checks").glob("*.json"))
    assert len(entries) == 1
    assert json.loads(entries[0].read_text())["verdict"]["passed"] is True
    # a later segmenter (its own verdicts, as in a new process) reads the cache
    again = OnnxSegmenter(info, device="cpu").variant_check
    assert again is not None and again.cached and again.passed
    assert again.figures == verdict.figures
    # segmenters sharing their verdicts settle a key once: the first one's verdict, unread
    shared = VerdictCache()
    settled = OnnxSegmenter(info, device="cpu", verdicts=shared).variant_check
    assert OnnxSegmenter(info, device="cpu", verdicts=shared).variant_check is settled
    # --force measures again (a verdict written before this process started is not reused)
    monkeypatch.setattr(variant_check, "_PROCESS_STARTED", time.time() + 1.0)
    forced = OnnxSegmenter(info, device="cpu", force_check=True).variant_check
    assert forced is not None and not forced.cached and forced.passed


def test_a_changed_key_measures_again(tmp_path: Path) -> None:
    model_path = _conv_model_with_recipe(tmp_path)
    info = load_model_info(model_path)
    assert OnnxSegmenter(info, device="cpu").variant_check is not None
    images = np.full((2, 64, 64), 0.9)
    write_reference_set(tmp_path / REFERENCE_SET_NAME, images, ["bright0", "bright1"])
    verdict = OnnxSegmenter(info, device="cpu").variant_check
    assert verdict is not None and not verdict.cached and verdict.figures is not None
    assert verdict.figures.n_slices == 2


def test_a_disagreeing_int8_variant_falls_back_under_auto_and_is_an_error_when_asked_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ggo_cli")
    info = load_model_info(_conv_model_with_recipe(tmp_path, range_factor=BAD_RANGES))
    auto = OnnxSegmenter(info, device="cpu")
    assert auto.precision is Precision.FP32
    assert auto.variant_check is not None and not auto.variant_check.passed
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    line = warnings[0].getMessage()
    assert "failed its self-check on this machine" in line and "running float32" in line
    assert "GGO pixels" in line and "\n" not in line
    with pytest.raises(ModelError, match=r"--precision int8: int8 \(test\) variant failed its "
                       r"self-check on this machine: GGO pixels [-+]\d"):
        OnnxSegmenter(info, device="cpu", precision="int8")


def test_segment_exits_5_on_a_disagreeing_int8_and_auto_runs_fp32(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _conv_model_with_recipe(tmp_path / "model", range_factor=BAD_RANGES)
    series = make_ct_series(tmp_path, shape=(10, 64, 64))
    common = ["--no-progress", "--no-lung-mask", "-m", str(model), "--device", "cpu"]
    explicit = runner.invoke(
        app, ["segment", str(series.root), "-o", str(tmp_path / "a"), *common,
              "--precision", "int8"]
    )
    assert explicit.exit_code == 5, explicit.output
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("--precision int8: int8 (test) variant failed its self-check" in e for e in errors)
    auto = runner.invoke(app, ["segment", str(series.root), "-o", str(tmp_path / "b"), *common])
    assert auto.exit_code == 0, auto.output
    manifest = json.loads((tmp_path / "b" / "run_manifest.json").read_text())
    assert manifest["device"]["precision"] == "fp32"
    check = manifest["device"]["variant_check"]
    assert check["variant"] == "int8" and check["passed"] is False and check["ran"] is True
    assert check["figures"]["ggo_pixels_fp32"] > 0


def test_without_reference_slices_auto_runs_fp32_and_an_explicit_int8_runs_unchecked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ggo_cli")
    info = load_model_info(_conv_model_with_recipe(tmp_path, reference=False))
    assert OnnxSegmenter(info, device="cpu").precision is Precision.FP32
    assert f"no {REFERENCE_SET_NAME} beside" in caplog.text
    explicit = OnnxSegmenter(info, device="cpu", precision="int8")
    assert explicit.precision is Precision.INT8 and explicit.variant_checked is False
    assert "--precision int8 runs unchecked" in caplog.text


def test_a_corrupt_reference_file_is_a_model_error(tmp_path: Path) -> None:
    model_path = _conv_model_with_recipe(tmp_path)
    (tmp_path / REFERENCE_SET_NAME).write_bytes(b"not an npz")
    info = load_model_info(model_path)
    with pytest.raises(ModelError, match=f"{REFERENCE_SET_NAME} beside model.onnx"):
        OnnxSegmenter(info, device="cpu", precision="int8")
    assert OnnxSegmenter(info, device="cpu").precision is Precision.FP32  # auto: warned


def test_a_recipe_measured_no_faster_than_fp32_is_used_only_when_asked_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_path = _conv_model_with_recipe(tmp_path)
    (recipe,) = _recipes(tmp_path)
    recipe["validation"].update(
        speed_cpu={"speedup": 0.98}, cpu={"model": "AMD EPYC", "flags": ["avx2"]}
    )
    _recipes(tmp_path, [recipe])
    info = load_model_info(model_path)
    caplog.set_level(logging.INFO, logger="ggo_cli")
    assert OnnxSegmenter(info, device="cpu").precision is Precision.FP32
    assert "0.98 times float32's speed where it was measured (AMD EPYC, avx2)" in caplog.text
    explicit = OnnxSegmenter(info, device="cpu", precision="int8")
    assert explicit.precision is Precision.INT8 and explicit.variant_checked


def test_an_unwritable_cache_folder_only_costs_a_check_per_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = load_model_info(_conv_model_with_recipe(tmp_path / "m"))
    # The int8 rebuild needs a scratch folder in the cache folder: made while it is writable
    # (this process keeps the rebuilt graph, keyed by the model's and the recipe's digests).
    monkeypatch.setenv(verdict_cache.CACHE_ENV, str(tmp_path / "writable-cache"))
    assert OnnxSegmenter(info, device="cpu").precision is Precision.INT8
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv(verdict_cache.CACHE_ENV, str(blocker / "cache"))
    for _ in range(2):  # no verdict can be stored: each segmenter checks again, and runs int8
        segmenter = OnnxSegmenter(info, device="cpu")
        assert segmenter.precision is Precision.INT8
        assert segmenter.variant_check is not None and segmenter.variant_check.passed
        assert not segmenter.variant_check.cached
