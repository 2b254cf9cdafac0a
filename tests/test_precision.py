"""Model variants: the fp16 graph made in memory, and which precision runs where."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from ggo_cli.config import default_model_path
from ggo_cli.errors import InputError
from ggo_cli.inference import OnnxSegmenter
from ggo_cli.model_info import load_model_info
from ggo_cli.precision import Precision, fp16_model_bytes


def test_fp16_variant_of_the_shipped_model_computes_in_fp16_with_fp32_io() -> None:
    info = load_model_info(default_model_path())
    half = onnx.load_from_string(fp16_model_bytes(info.path, info.file_sha256))
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [float32]
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [float32]
    assert {i.data_type for i in half.graph.initializer} == {float16}
    # only the two casts at the inputs and outputs remain (weights are no longer widened)
    casts = [n for n in half.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2
    original = onnx.load(str(info.path))
    convs = [n for n in original.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert len([n for n in half.graph.node if n.op_type in ("Conv", "ConvTranspose")]) == len(
        convs
    )
    assert {p.key for p in half.metadata_props} == {p.key for p in original.metadata_props}


def test_fp16_variant_gives_the_same_masks_on_the_cpu(band_model_path: Path) -> None:
    import onnxruntime as ort

    info = load_model_info(band_model_path)
    half = fp16_model_bytes(info.path, info.file_sha256)
    rng = np.random.default_rng(0)
    image = rng.random((2, 1, 64, 64), dtype=np.float32)
    want = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"image": image}
    )[0]
    got = ort.InferenceSession(half, providers=["CPUExecutionProvider"]).run(
        ["logits"], {"image": image}
    )[0]
    assert got.dtype == np.float32 and got.shape == want.shape
    decided = np.abs(want) > 0.05  # away from the threshold, fp16 rounding cannot flip a voxel
    np.testing.assert_array_equal((got > 0)[decided], (want > 0)[decided])


def test_cpu_runs_fp32_by_default_and_refuses_fp16(band_model_path: Path) -> None:
    info = load_model_info(band_model_path)
    assert OnnxSegmenter(info, device="cpu").precision is Precision.FP32
    with pytest.raises(InputError, match="CUDA only"):
        OnnxSegmenter(info, device="cpu", precision="fp16")
    with pytest.raises(InputError, match="invalid --precision"):
        OnnxSegmenter(info, device="cpu", precision="bf16")
