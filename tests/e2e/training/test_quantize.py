"""The int8 recipe of an exported model: calibrated, validated, rebuilt by ggo-cli; remade from
its own ranges for a change of the other settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from ggo_cli.errors import InputError
from ggo_cli.onnx.int8_recipes import INT8_SPEC_FORMAT, VNNI_FLAGS, load_int8_spec
from ggo_cli.onnx.model_info import load_model_info
from ggo_cli.onnx.precision import int8_model_bytes
from training.export import ExportResult
from training.quantize import make_int8_recipe


def test_int8_recipe_rebuilds_in_ggo_cli_and_reuses_its_ranges(
    exported_model: ExportResult, tiny_npz: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(exported_model.model_path.parent, folder)
    model_path = folder / exported_model.model_path.name
    first = make_int8_recipe(model_path, tiny_npz, n_calibration=4, runs=1, batch=2)
    recipe = first.recipe
    assert first.spec["format"] == INT8_SPEC_FORMAT
    assert [r["name"] for r in first.spec["recipes"]] == ["u8s8-vnni"]
    assert recipe["cpu_any"] == list(VNNI_FLAGS)
    assert recipe["settings"]["upsampling"] == "depth_to_space"
    assert recipe["validation"]["pixel_agreement"] > 0.95  # int8 masks close to the float ones
    card = json.loads((folder / "model.json").read_text())
    assert card["int8"]["recipes"][0]["int8_graph_sha256"] == recipe["int8_graph_sha256"]
    # ggo-cli rebuilds the validated graph from the file: no ConvTranspose left
    info = load_model_info(model_path)
    loaded = load_int8_spec(info)
    assert loaded is not None
    data, validated = int8_model_bytes(info, loaded, loaded.recipes[0])
    assert validated
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
    assert "ConvTranspose" not in ops and "DepthToSpace" in ops
    # a second CPU class's recipe from the same ranges (no calibration): both kept, in order
    portable = make_int8_recipe(
        model_path, tiny_npz, runs=1, batch=2, reuse_ranges=True, recipe="u8u8"
    )
    assert [r["name"] for r in portable.spec["recipes"]] == ["u8s8-vnni", "u8u8"]
    assert portable.spec["recipes"][0] == recipe  # measured elsewhere: kept as it was
    assert portable.recipe["cpu_any"] == [] and portable.recipe["settings"]["weight_type"] == (
        "QUInt8"
    )
    assert portable.spec["calibration"]["ranges_reused"] is True
    assert portable.spec["calibration"]["ids"] == first.spec["calibration"]["ids"]
    loaded = load_int8_spec(load_model_info(model_path))
    assert loaded is not None and [r.name for r in loaded.recipes] == ["u8s8-vnni", "u8u8"]
    # remade from its own ranges: the same graph
    again = make_int8_recipe(model_path, tiny_npz, runs=1, batch=2, reuse_ranges=True)
    assert again.recipe["int8_graph_sha256"] == recipe["int8_graph_sha256"]
    # ranges calibrated otherwise are refused
    other = {**recipe["settings"], "calibrate_method": "MinMax"}
    with pytest.raises(InputError, match="calibrated with other"):
        make_int8_recipe(model_path, tiny_npz, settings=other, runs=1, reuse_ranges=True)


def test_two_class_int8_recipe_measures_each_class_and_rebuilds_in_ggo_cli(
    tmp_path: Path,
) -> None:
    """GGO and consolidation (issue 20): the recipe's validation has consolidation's pooled
    Dice beside GGO's, ggo-cli's limit reads both, and the int8 graph keeps two channels."""
    import numpy as np

    from ggo_cli.onnx.int8_recipes import MAX_INT8_DICE_CHANGE
    from tests.shared_data import COVID_SLICES_DIR, require_shared
    from tests.training.conftest import tiny_config
    from training.data import load_slices, pack
    from training.export import export_checkpoint
    from training.loop import train

    slices = load_slices(require_shared(COVID_SLICES_DIR), labels=(1, 2))
    slices.sort(key=lambda s: -int((s.mask == 2).sum()))  # those with most consolidation
    data = tmp_path / "two64.npz"
    pack(slices[:10], data, size=64, label=1, classes=("ggo", "consolidation"))
    config = tiny_config(
        data, tmp_path / "run", epochs=1, classes=("ggo", "consolidation"), out_channels=2
    )
    run = train(config, progress=False)
    exported = export_checkpoint(run.best_path, tmp_path / "model", data=data, name="two-test")
    result = make_int8_recipe(
        exported.model_path, data, n_calibration=4, runs=1, batch=2, recipe="u8u8"
    )
    validation = result.recipe["validation"]
    consolidation = validation["classes"]["consolidation"]
    for figures in (validation, consolidation):
        assert figures["pooled_dice_change"] == (
            figures["test_int8"]["dice"] - figures["test_fp32"]["dice"]
        )
        assert 0.0 <= figures["pixel_agreement"] <= 1.0
    info = load_model_info(exported.model_path)
    assert info.n_channels == 2
    loaded = load_int8_spec(info)
    assert loaded is not None
    (recipe,) = loaded.recipes
    assert recipe.dice_change in (
        validation["pooled_dice_change"], consolidation["pooled_dice_change"]
    )
    assert abs(recipe.dice_change) >= abs(validation["pooled_dice_change"])
    assert recipe.acceptable == (abs(recipe.dice_change) <= MAX_INT8_DICE_CHANGE)
    data_bytes, validated = int8_model_bytes(info, loaded, recipe)
    assert validated
    import onnxruntime as ort

    session = ort.InferenceSession(data_bytes, providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": np.zeros((1, 1, 64, 64), np.float32)})[0]
    assert logits.shape == (1, 2, 64, 64)
