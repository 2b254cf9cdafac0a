"""export: ONNX contract, parity, metadata, model card; compare: the Table 1 layout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ggo_cli.onnx.model_info import load_model_info
from training.cli import main
from training.compare import compare_runs, render_markdown
from training.evaluate import THRESHOLD_GRID
from training.export import ExportResult, export_checkpoint
from training.loop import TrainResult


def test_export_meets_the_model_contract(
    exported_model: ExportResult, tiny_run: TrainResult
) -> None:
    info = load_model_info(exported_model.model_path)
    assert (info.name, info.version, info.architecture) == ("ggo-test", "0.0.1", "resnet50-unet")
    assert info.input_size == 64
    assert (info.window_center_hu, info.window_width_hu) == (-600.0, 1500.0)
    assert info.threshold in THRESHOLD_GRID
    (segment,) = info.segments
    assert (
        segment.property_type.value == "112120" and segment.property_type.scheme_designator == "DCM"
    )
    assert segment.property_category.value == "49755003"
    meta = info.metadata
    assert "non-commercial" in meta["training_data"]["licence"]
    split = json.loads((tiny_run.run_dir / "split.json").read_text())
    assert meta["training_data"]["split"] == split
    assert set(meta["metrics"]) >= {"train", "val", "test", "val_threshold_search"}
    assert meta["metrics"]["test"]["n_images"] == 2
    assert meta["git_commit"]
    assert meta["parity"]["max_abs_diff_fp32"] < 1e-3
    proto = onnx.load(str(exported_model.model_path))
    assert proto.opset_import[0].version >= 17


def test_exported_graph_takes_any_batch(exported_model: ExportResult) -> None:
    session = ort.InferenceSession(
        str(exported_model.model_path), providers=["CPUExecutionProvider"]
    )
    out = session.run(["logits"], {"image": np.zeros((3, 1, 64, 64), np.float32)})[0]
    assert out.shape == (3, 1, 64, 64)


def test_model_card_and_checksums(exported_model: ExportResult) -> None:
    folder = exported_model.model_path.parent
    card = json.loads((folder / "model.json").read_text())
    assert "not a medical device" in card["not_intended_for"]
    assert "non-commercial" in card["training_data"]["licence"]
    assert card["limitations"] and card["metrics"]["test"]
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest


def test_evaluate_reproduces_the_recorded_test_metrics(
    exported_model: ExportResult,
    tiny_run: TrainResult,
    tiny_npz: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [
        "evaluate",
        "--model",
        str(exported_model.model_path),
        "--data",
        str(tiny_npz),
        "--split",
        "test",
        "--split-file",
        str(tiny_run.run_dir / "split.json"),
        "--json",
        "-q",
    ]
    assert main(args) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == pytest.approx(exported_model.metrics["test"].to_dict())


def test_fp16_weights_halve_the_file_and_keep_the_masks(
    exported_model: ExportResult, tiny_run: TrainResult, tiny_npz: Path, tmp_path: Path
) -> None:
    result = export_checkpoint(
        tiny_run.best_path, tmp_path / "fp16", data=tiny_npz, fp16_weights=True
    )
    assert result.size_bytes < 0.6 * exported_model.size_bytes
    assert result.mask_agreement >= 0.999
    meta = load_model_info(result.model_path).metadata
    assert meta["weights"].startswith("float16")


def test_compare_renders_table_1(
    tiny_run: TrainResult, exported_model: ExportResult, tiny_npz: Path
) -> None:
    results = compare_runs([tiny_run.run_dir, exported_model.model_path.parent], data=tiny_npz)
    text = render_markdown(results)
    assert "| split | ResNet-50U-Net | ResNet-50U-Net (ggo-test) |" in text
    for row in ("| train |", "| validation |", "| test |"):
        assert row in text
    assert results[1].evaluation.threshold == exported_model.threshold
