"""The int8 recipe of an exported model: calibrated, validated, rebuilt by ggo-cli; remade from
its own ranges for a change of the other settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from ggo_cli.errors import InputError
from ggo_cli.model_info import load_model_info
from ggo_cli.precision import int8_model_bytes, load_int8_spec
from training.export import ExportResult
from training.quantize import make_int8_recipe


def test_int8_recipe_rebuilds_in_ggo_cli_and_reuses_its_ranges(
    exported_model: ExportResult, tiny_npz: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(exported_model.model_path.parent, folder)
    model_path = folder / exported_model.model_path.name
    first = make_int8_recipe(model_path, tiny_npz, n_calibration=4, runs=1, batch=2)
    spec = first.spec
    assert spec["settings"]["upsampling"] == "depth_to_space"
    assert spec["validation"]["pixel_agreement"] > 0.95  # int8 masks close to the float ones
    card = json.loads((folder / "model.json").read_text())
    assert card["int8"]["int8_graph_sha256"] == spec["int8_graph_sha256"]
    # ggo-cli rebuilds the validated graph from the file: no ConvTranspose left
    info = load_model_info(model_path)
    loaded = load_int8_spec(info)
    assert loaded is not None
    data, validated = int8_model_bytes(info, loaded)
    assert validated
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
    assert "ConvTranspose" not in ops and "DepthToSpace" in ops
    # remade from its own ranges (no calibration): the same graph
    again = make_int8_recipe(model_path, tiny_npz, runs=1, batch=2, reuse_ranges=True)
    assert again.spec["int8_graph_sha256"] == spec["int8_graph_sha256"]
    assert again.spec["calibration"]["ranges_reused"] is True
    assert again.spec["calibration"]["ids"] == spec["calibration"]["ids"]
    # ranges calibrated otherwise are refused
    other = {**again.spec["settings"], "calibrate_method": "MinMax"}
    with pytest.raises(InputError, match="calibrated with other"):
        make_int8_recipe(model_path, tiny_npz, settings=other, runs=1, reuse_ranges=True)
