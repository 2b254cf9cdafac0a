"""evaluate: hand-computed metrics from a tiny ONNX threshold model, resized as inference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image
from pydicom.sr.codedict import codes

from ggo_cli.analysis.preprocessing import sigmoid, to_model_grid, to_source_grid
from ggo_cli.onnx.model_info import code_to_json, stamp_metadata
from training.cli import main
from training.evaluate import evaluate_model
from training.metrics import confusion, summarize
from training.splits import make_split, save_split

SIZE = 32
GAIN = 20.0


def _threshold_model(path: Path, *, threshold: float = 0.5) -> Path:
    """logits = GAIN * (image - 0.5): a bright pixel is GGO."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["image", "half"], ["centred"]),
            helper.make_node("Mul", ["centred", "gain"], ["logits"]),
        ],
        "threshold",
        [image],
        [logits],
        [
            helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
            helper.make_tensor("gain", TensorProto.FLOAT, [], [GAIN]),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    stamp_metadata(
        proto,
        {
            "name": "threshold-test",
            "version": "0",
            "architecture": "threshold",
            "input_size": SIZE,
            "window_center": -600.0,
            "window_width": 1500.0,
            "threshold": threshold,
            "segments": [
                {
                    "label": "GGO",
                    "property_category": code_to_json(codes.SCT.MorphologicallyAbnormalStructure),
                    "property_type": code_to_json(codes.DCM.GroundGlassOpacity),
                }
            ],
            "training_data": {},
            "metrics": {},
        },
    )
    onnx.save(proto, str(path))
    return path


def _write_folder(root: Path, items: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for stem, (image, mask) in items.items():
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "labels" / f"{stem}.png")
    return root


@pytest.fixture
def hand_case(tmp_path: Path) -> tuple[Path, Path]:
    """Slice a: 4 predicted pixels, 4 true, 2 shared. Slice b: nothing anywhere."""
    image_a = np.zeros((SIZE, SIZE), np.uint8)
    image_a[0, 0:4] = 255
    mask_a = np.zeros((SIZE, SIZE), np.uint8)
    mask_a[0, 2:6] = 1
    blank = np.zeros((SIZE, SIZE), np.uint8)
    data = _write_folder(tmp_path / "data", {"a": (image_a, mask_a), "b": (blank, blank)})
    return _threshold_model(tmp_path / "t.onnx"), data


def test_evaluate_equals_hand_computed_metrics(hand_case: tuple[Path, Path]) -> None:
    model, data = hand_case
    m = evaluate_model(model, data)
    # Pooled: TP 2, FP 2, FN 2, TN 2 * 1024 - 6.  Per slice: a 0.5, b (empty vs empty) 1.
    assert m.dice == pytest.approx(0.5)
    assert m.dice_mean == pytest.approx(0.75)
    assert m.precision == pytest.approx(0.5)
    assert m.recall == pytest.approx(0.5)
    assert m.accuracy == pytest.approx((2 + 2042) / 2048)
    assert m.n_images == 2


def test_cli_json_prints_exactly_the_contract_keys(
    hand_case: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = hand_case
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {
        "dice": 0.5,
        "dice_mean": 0.75,
        "precision": 0.5,
        "recall": 0.5,
        "accuracy": pytest.approx(2044 / 2048),
        "n_images": 2,
    }


def test_split_option_evaluates_one_split(hand_case: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = hand_case
    split = make_split(["a", "b", "c"], [None] * 3, seed=0)
    split = type(split)(train=("b",), val=(), test=("a",), seed=0, grouped=False)
    save_split(split, tmp_path / "split.json")
    m = evaluate_model(model, data, split_name="test", split_file=tmp_path / "split.json")
    assert m.n_images == 1 and m.dice == pytest.approx(0.5)


def test_other_sizes_go_through_the_inference_resize(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = (rng.random((20, 30)) * 255).astype(np.uint8)
    mask = rng.random((20, 30)) > 0.5
    data = _write_folder(tmp_path / "data", {"x": (image, mask)})
    model = _threshold_model(tmp_path / "t.onnx", threshold=0.4)
    grid = to_model_grid(image.astype(np.float32) / 255, SIZE)
    prob = to_source_grid(sigmoid(GAIN * (grid - 0.5)), 20, 30)
    expected = summarize([confusion(prob > 0.4, mask)])
    assert evaluate_model(model, data) == expected


def test_threshold_outside_unit_interval_exits_5(
    hand_case: tuple[Path, Path],
) -> None:
    model, data = hand_case
    assert (
        main(["evaluate", "--model", str(model), "--data", str(data), "--threshold", "1.5", "-q"])
        == 5
    )


def test_threshold_moves_from_half_only_for_a_real_gain() -> None:
    from training.evaluate import choose_threshold
    from training.metrics import Confusion

    flat = {0.5: [Confusion(tp=100, fp=10, fn=10)], 0.9: [Confusion(tp=100, fp=9, fn=10)]}
    assert choose_threshold(flat) == 0.5
    clear = {0.5: [Confusion(tp=100, fp=50, fn=10)], 0.7: [Confusion(tp=100, fp=5, fn=12)]}
    assert choose_threshold(clear) == 0.7
