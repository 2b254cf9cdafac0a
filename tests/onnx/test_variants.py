"""Which variant runs: int8 recipes picked by CPU features, the next recipe after a failed check."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ggo_cli.analysis.segmenter import OnnxSegmenter
from ggo_cli.errors import ModelError
from ggo_cli.onnx.model_info import load_model_info
from ggo_cli.onnx.precision import Precision
from ggo_cli.onnx.variant_verdict import VariantCheck
from tests.onnx.test_precision import _conv_model_with_recipe
from tests.onnx.test_variant_check import _recipes


def test_recipes_are_picked_by_the_cpu_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import ggo_cli.onnx.variants as variants

    model_path = _conv_model_with_recipe(tmp_path, cpu_any=("avx512_vnni",))
    info = load_model_info(model_path)
    monkeypatch.setattr(variants, "cpu_flag_set", lambda: {"avx2", "fma"})
    caplog.set_level(logging.INFO, logger="ggo_cli")
    assert OnnxSegmenter(info, device="cpu").precision is Precision.FP32
    assert "int8 not used on this CPU (test needs avx512_vnni); running float32" in caplog.text
    with pytest.raises(ModelError, match="no int8 recipe for this CPU"):
        OnnxSegmenter(info, device="cpu", precision="int8")
    monkeypatch.setattr(variants, "cpu_flag_set", lambda: {"avx2", "avx512_vnni"})
    assert OnnxSegmenter(info, device="cpu").int8_recipe == "test"


def test_the_next_recipe_is_tried_when_the_first_fails_its_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ggo_cli.onnx.variants as variants

    model_path = _conv_model_with_recipe(tmp_path)
    recipe = _recipes(tmp_path)[0]
    _recipes(tmp_path, [{**recipe, "name": "fast"}, {**recipe, "name": "portable"}])
    real = variants.check_variant

    def failing_first(*args: object, **kwargs: object) -> VariantCheck:
        verdict = real(*args, **kwargs)  # type: ignore[arg-type]
        if kwargs["recipe"] == "fast":  # as on a CPU where the fast recipe saturates
            return VariantCheck("int8", "fast", ran=True, passed=False, reason="GGO pixels -37%")
        return verdict

    monkeypatch.setattr(variants, "check_variant", failing_first)
    segmenter = OnnxSegmenter(load_model_info(model_path), device="cpu")
    assert segmenter.precision is Precision.INT8 and segmenter.int8_recipe == "portable"
