"""The model contract: valid files load, every kind of breach is a ModelError naming it."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from ggo_cli.errors import ModelError
from ggo_cli.onnx.model_info import METADATA_KEY, load_model_info, stamp_metadata
from tests.onnx_models import band_model, base_metadata, write_band_model


def test_valid_model_loads_with_its_metadata(band_model_path: Path) -> None:
    info = load_model_info(band_model_path)
    assert info.input_size == 64
    assert info.threshold == 0.5
    assert info.window_center_hu == -600.0 and info.window_width_hu == 1500.0
    assert info.segments[0].property_type.value == "112120"
    assert info.segments[0].property_type.scheme_designator == "DCM"
    assert len(info.file_sha256) == 64 and len(info.recorded_sha256) == 64


def test_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found.*--model"):
        load_model_info(tmp_path / "absent.onnx")


def test_garbage_file_is_not_onnx(tmp_path: Path) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x00\x01not a protobuf at all" * 10)
    with pytest.raises(ModelError, match="not a readable ONNX file"):
        load_model_info(path)


def test_model_without_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.onnx"
    onnx.save(band_model(64), str(path))
    with pytest.raises(ModelError, match="no 'ggo_cli' metadata"):
        load_model_info(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"threshold": 1.5}, "threshold must be in"),
        ({"window_width": 0}, "window_width must be positive"),
        ({"input_size": "512"}, "input_size must be an integer"),
        ({"segments": []}, "segments must be a non-empty list"),
        (
            {"segments": [{"label": "GGO", "property_category": {"value": "1"}}]},
            "property_category",
        ),
    ],
)
def test_malformed_metadata_names_the_key(tmp_path: Path, override: dict, message: str) -> None:
    path = write_band_model(tmp_path / "m.onnx", 64, metadata=base_metadata(64, **override))
    with pytest.raises(ModelError, match=message):
        load_model_info(path)


def test_missing_required_key_is_listed(tmp_path: Path) -> None:
    meta = base_metadata(64)
    del meta["training_data"]
    path = write_band_model(tmp_path / "m.onnx", 64, metadata=meta)
    with pytest.raises(ModelError, match=r"lacks required keys \['training_data'\]"):
        load_model_info(path)


def test_wrong_input_name_is_refused(tmp_path: Path) -> None:
    path = write_band_model(tmp_path / "m.onnx", 64, input_name="input")
    with pytest.raises(ModelError, match=r"inputs must be exactly \['image'\]"):
        load_model_info(path)


def test_wrong_output_name_is_refused(tmp_path: Path) -> None:
    path = write_band_model(tmp_path / "m.onnx", 64, output_name="output")
    with pytest.raises(ModelError, match="first output must be 'logits'"):
        load_model_info(path)


def test_size_mismatch_with_metadata_is_refused(tmp_path: Path) -> None:
    path = write_band_model(tmp_path / "m.onnx", 64, metadata=base_metadata(128))
    with pytest.raises(ModelError, match="does not match metadata input_size 128"):
        load_model_info(path)


def test_channel_count_must_match_segments(tmp_path: Path) -> None:
    meta = base_metadata(64)
    path = write_band_model(tmp_path / "m.onnx", 64, channels=2, metadata=meta)
    with pytest.raises(ModelError, match="has 2 channels, the metadata implies 1"):
        load_model_info(path)


def test_tampered_weights_fail_the_digest(tmp_path: Path) -> None:
    model = band_model(64)
    stamp_metadata(model, base_metadata(64))
    model.graph.initializer[2].float_data[0] = 7.0  # change the gain after stamping
    path = tmp_path / "tampered.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="does not match the recorded"):
        load_model_info(path)


def test_metadata_not_json_is_refused(tmp_path: Path) -> None:
    model = band_model(64)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, "{not json"
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="is not JSON"):
        load_model_info(path)


def test_stamp_replaces_an_old_entry(tmp_path: Path) -> None:
    model = band_model(64)
    stamp_metadata(model, base_metadata(64, version="1"))
    stamp_metadata(model, base_metadata(64, version="2"))
    entries = [p for p in model.metadata_props if p.key == METADATA_KEY]
    assert len(entries) == 1
    assert json.loads(entries[0].value)["version"] == "2"
