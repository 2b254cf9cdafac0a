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


def test_every_class_counts_in_the_dice_change() -> None:
    """A two-class recipe is acceptable only when consolidation moved no more than GGO may."""
    import math

    from ggo_cli.onnx.int8_recipes import MAX_INT8_DICE_CHANGE, Int8Recipe

    def recipe(validation: dict[str, object]) -> Int8Recipe:
        return Int8Recipe("s8s8", (), {}, "ab" * 32, "1.31.1", validation)

    one = recipe({"pooled_dice_change": -0.004})
    assert one.dice_change == -0.004 and one.acceptable
    bad = recipe(
        {"pooled_dice_change": 0.001, "classes": {"consolidation": {"pooled_dice_change": -0.03}}}
    )
    assert bad.dice_change == -0.03 and not bad.acceptable
    good = recipe(
        {"pooled_dice_change": -0.006, "classes": {"consolidation": {"pooled_dice_change": 0.002}}}
    )
    assert good.dice_change == -0.006 and abs(good.dice_change) <= MAX_INT8_DICE_CHANGE
    assert good.acceptable
    unmeasured = recipe({"pooled_dice_change": 0.0, "classes": {"consolidation": {}}})
    assert math.isnan(unmeasured.dice_change) and not unmeasured.acceptable
