"""The int8 recipe file beside a model: its formats and the recipes a CPU may use."""

from __future__ import annotations

from pathlib import Path

import pytest

from ggo_cli.onnx.int8_recipes import INT8_SPEC_NAME


def test_a_format_1_recipe_file_loads_as_one_recipe_for_any_cpu(tmp_path: Path) -> None:
    from ggo_cli.onnx.int8_recipes import INT8_SPEC_FORMAT_1, parse_int8_spec

    data = {
        "format": INT8_SPEC_FORMAT_1,
        "model_sha256": "ab" * 32,
        "settings": {"activation_type": "QUInt8"},
        "int8_graph_sha256": "cd" * 32,
        "onnxruntime": "1.31.1",
        "validation": {"pooled_dice_change": 0.0003, "speed_cpu": {"speedup": 3.09}},
        "tensors_data": {"data": {}},
    }
    spec = parse_int8_spec(tmp_path / INT8_SPEC_NAME, data, "ef" * 32)
    (recipe,) = spec.recipes
    assert recipe.cpu_any == () and recipe.fits(set()) and recipe.speedup == 3.09
    assert spec.candidates({"avx2"}) == [recipe]
    with pytest.raises(ValueError, match="format 'other'"):
        parse_int8_spec(tmp_path / INT8_SPEC_NAME, {**data, "format": "other"}, "")
