"""Model variants: the fp16 graph made in memory, and which precision runs where."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from ggo_cli.analysis.segmenter import OnnxSegmenter
from ggo_cli.config import default_model_path
from ggo_cli.errors import InputError
from ggo_cli.onnx.model_info import load_model_info
from ggo_cli.onnx.precision import Precision, fp16_model_bytes


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


MINMAX_SETTINGS = {
    "per_channel": True,
    "activation_type": "QUInt8",
    "weight_type": "QInt8",
    "calibrate_method": "MinMax",
    "nodes_to_exclude": [],
    "extra_options": {},
}
"""Quantizer settings of the test recipes: MinMax ranges (exact for the values seen)."""


class ImageReader:
    """An ONNX Runtime calibration reader over a list of ``image`` batches."""

    def __init__(self, images: list[np.ndarray]) -> None:
        self.batches = iter({"image": x} for x in images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _scaled_ranges(tensors: dict[str, Any], factor: float) -> dict[str, Any]:
    """Calibration ranges with every bound multiplied by ``factor`` (a deliberately wrong
    recipe: its activations clip)."""

    def scale(value: Any) -> Any:
        if isinstance(value, dict) and "data" in value:
            return {**value, "data": scale(value["data"])}
        if isinstance(value, list):
            return [scale(v) for v in value]
        return value * factor if isinstance(value, int | float) else value

    data = {
        name: {**entry, "lowest": scale(entry["lowest"]), "highest": scale(entry["highest"])}
        for name, entry in tensors["data"].items()
    }
    return {**tensors, "data": data}


def _conv_model_with_recipe(
    folder: Path,
    *,
    dice_change: float = 0.0,
    tamper_digest: bool = False,
    cpu_any: tuple[str, ...] = (),
    range_factor: float = 1.0,
    reference: bool = True,
) -> Path:
    """The conv test model plus an int8 recipe calibrated on random images (MinMax) and, with
    ``reference``, reference slices for the self-check.

    ``range_factor`` != 1 scales the recipe's ranges after calibration and records the digest
    of the graph they make: a variant that is "validated" by digest but disagrees with float32.
    """
    import json

    import onnxruntime as ort

    from ggo_cli.onnx.int8_recipes import INT8_SPEC_FORMAT, INT8_SPEC_NAME
    from ggo_cli.onnx.precision import graph_digest, quantize_int8
    from ggo_cli.onnx.reference_slices import REFERENCE_SET_NAME, write_reference_set
    from tests.onnx_models import write_conv_explain_pair

    model_path, _ = write_conv_explain_pair(folder)
    info = load_model_info(model_path)
    rng = np.random.default_rng(0)
    # piecewise-constant images (8 x 8 blocks) whose values stay 0.25 away from 0.4, where the
    # conv model's logit crosses 0: float32 and a good int8 variant agree on (nearly) every pixel
    r = rng.random((7, 8, 8))
    values = np.where(r < 0.5, r * 0.3, 0.65 + (r - 0.5) * 0.7)
    blocks = np.kron(values, np.ones((8, 8))).astype(np.float32)
    # U8U8: with int8 weights this toy model's sums saturate on AVX2-only CPUs (U8S8 and S8S8
    # alike: logits off by up to 22), so its self-check would rightly fail there
    settings = {"quant_format": "QDQ", **MINMAX_SETTINGS, "weight_type": "QUInt8"}
    work = folder / "work"
    work.mkdir()
    cache = work / "cache.json"
    reader = ImageReader([blocks[i : i + 1, None] for i in range(len(blocks))])
    int8 = quantize_int8(model_path, settings, cache, work, reader=reader).read_bytes()
    tensors = json.loads(cache.read_text())
    if range_factor != 1.0:
        tensors = _scaled_ranges(tensors, range_factor)
        cache.write_text(json.dumps(tensors))
        again = work / "again"
        again.mkdir()
        int8 = quantize_int8(model_path, settings, cache, again).read_bytes()
    digest = graph_digest(int8)
    spec = {
        "format": INT8_SPEC_FORMAT,
        "model_sha256": info.recorded_sha256,
        "onnxruntime": ort.__version__,
        "recipes": [
            {
                "name": "test",
                "cpu_any": list(cpu_any),
                "settings": settings,
                "int8_graph_sha256": "0" * 64 if tamper_digest else digest,
                "validation": {"pooled_dice_change": dice_change},
            }
        ],
        "tensors_data": tensors,
    }
    (folder / INT8_SPEC_NAME).write_text(json.dumps(spec))
    if reference:
        write_reference_set(
            folder / REFERENCE_SET_NAME, blocks[1:], [f"r{i}" for i in range(6)]
        )
    return model_path


def test_int8_recipe_is_rebuilt_and_chosen_on_the_cpu(tmp_path: Path) -> None:
    import onnxruntime as ort

    model_path = _conv_model_with_recipe(tmp_path)
    info = load_model_info(model_path)
    seg = OnnxSegmenter(info, device="cpu")
    assert seg.precision is Precision.INT8
    assert seg.batch_size == 4  # int8's default on the CPU (float32's is 1)
    ops = {n.op_type for n in onnx.load_from_string(seg_bytes(seg)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    image = np.random.default_rng(1).random((3, 1, 64, 64), dtype=np.float32)
    want = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"image": image}
    )[0]
    got = seg.predict_logits(image)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.mean((got > 0) == (want > 0)) > 0.97
    assert OnnxSegmenter(info, device="cpu", precision="fp32").precision is Precision.FP32


def seg_bytes(seg: OnnxSegmenter) -> bytes:
    """The model bytes a segmenter's int8 session was built from (rebuilt, it is cached)."""
    from ggo_cli.onnx.int8_recipes import load_int8_spec
    from ggo_cli.onnx.precision import int8_model_bytes

    spec = load_int8_spec(seg.model)
    assert spec is not None
    return int8_model_bytes(seg.model, spec, spec.recipes[0])[0]


def test_int8_is_not_chosen_when_unvalidated_or_inaccurate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="ggo_cli")
    tampered = load_model_info(_conv_model_with_recipe(tmp_path / "a", tamper_digest=True))
    assert OnnxSegmenter(tampered, device="cpu").precision is Precision.FP32
    assert "quantizes differently" in caplog.text
    explicit = OnnxSegmenter(tampered, device="cpu", precision="int8")
    assert explicit.precision is Precision.INT8  # the user asked; warned, not validated
    worse = load_model_info(_conv_model_with_recipe(tmp_path / "b", dice_change=-0.05))
    assert OnnxSegmenter(worse, device="cpu").precision is Precision.FP32
    assert "Dice changed by -0.0500" in caplog.text


def test_int8_recipe_of_another_model_or_missing(tmp_path: Path, band_model_path: Path) -> None:
    import shutil

    from ggo_cli.errors import ModelError
    from ggo_cli.onnx.int8_recipes import INT8_SPEC_NAME

    _conv_model_with_recipe(tmp_path / "conv")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(band_model_path, other / "model.onnx")
    info = load_model_info(other / "model.onnx")
    with pytest.raises(InputError, match="needs int8_calibration.json"):
        OnnxSegmenter(info, device="cpu", precision="int8")
    shutil.copy(tmp_path / "conv" / INT8_SPEC_NAME, other / INT8_SPEC_NAME)
    assert OnnxSegmenter(info, device="cpu").precision is Precision.FP32  # warned
    with pytest.raises(ModelError, match="belongs to another model"):
        OnnxSegmenter(info, device="cpu", precision="int8")


def test_info_reports_whether_int8_runs_on_the_cpu(tmp_path: Path, band_model_path: Path) -> None:
    from ggo_cli.cli.info import model_status

    good = _conv_model_with_recipe(tmp_path / "good")
    status = model_status(good)["int8"]
    assert status["used_on_cpu"] is True and status["recipe_used"] == "test"
    assert status["self_check"]["passed"] is True
    assert status["self_check"]["figures"]["n_slices"] == 6 and "if_forced" not in status
    tampered = _conv_model_with_recipe(tmp_path / "bad", tamper_digest=True)
    status = model_status(tampered)["int8"]
    assert status["used_on_cpu"] is False and status["self_check"] is None
    # --precision int8 would run it there (a warning: not the validated graph), checked
    assert status["if_forced"]["recipe"] == "test"
    assert status["if_forced"]["self_check"]["passed"] is True
    assert model_status(band_model_path)["int8"] is None


def _upsampling_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """x (1, 3, 5, 4) -> ConvTranspose 2x2/2 with bias -> ConvTranspose 2x2/2 without bias,
    and a 3x3/2 ConvTranspose (not rewritable) on the side; all outputs concatenated."""
    from onnx import helper, numpy_helper

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)

    nodes = [
        helper.make_node("ConvTranspose", ["x", "w1", "b1"], ["u1"], kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("ConvTranspose", ["u1", "w2"], ["u2"], kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("ConvTranspose", ["x", "w3"], ["side"], kernel_shape=[3, 3],
                         strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "upsampling",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 5, 4])],
        [
            helper.make_tensor_value_info("u2", onnx.TensorProto.FLOAT, [1, 2, 20, 16]),
            helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, [1, 2, 10, 8]),
        ],
        [init("w1", 3, 6, 2, 2), init("b1", 6), init("w2", 6, 2, 2, 2), init("w3", 3, 2, 3, 3)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_upsampling_rewrite_computes_the_same_outputs() -> None:
    import onnxruntime as ort

    from ggo_cli.onnx.precision import upsampling_as_depth_to_space

    rng = np.random.default_rng(4)
    original = _upsampling_graph(rng)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(original)
    packed = upsampling_as_depth_to_space(rewritten)
    assert sorted(packed.values()) == ["u1", "u2"]  # the 3x3 one stays
    onnx.checker.check_model(rewritten)
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("DepthToSpace") == 2 and ops.count("ConvTranspose") == 1
    x = rng.normal(size=(1, 3, 5, 4)).astype(np.float32)
    want = ort.InferenceSession(original.SerializeToString()).run(None, {"x": x})
    got = ort.InferenceSession(rewritten.SerializeToString()).run(None, {"x": x})
    assert got[0].shape == (1, 2, 20, 16)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[1], want[1])


def _upsampling_model_file(path: Path) -> Path:
    """image (1, 1, 16, 16) -> 3x3 Conv -> Relu -> 2x2 stride-2 ConvTranspose -> 1x1 Conv."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(7)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["image", "w0", "b0"], ["c0"], kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("ConvTranspose", ["r0", "wt", "bt"], ["up"], kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Conv", ["up", "w1"], ["logits"], kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "upsampling",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 1, 16, 16])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 1, 32, 32])],
        [init("w0", 4, 1, 3, 3), init("b0", 4), init("wt", 4, 3, 2, 2), init("bt", 3),
         init("w1", 1, 3, 1, 1)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), str(path))
    return path


def test_int8_upsampling_rewrite_quantizes_it_and_its_ranges_follow_from_the_output(
    tmp_path: Path,
) -> None:
    """With ``"upsampling": "depth_to_space"`` the transposed convolution becomes an int8
    1 x 1 convolution; ranges read from a cache without the packed tensor give the graph that
    calibrating them gives (the packed tensor holds the output's values)."""
    import json

    import onnxruntime as ort

    from ggo_cli.onnx.precision import graph_digest, quantize_int8

    model = _upsampling_model_file(tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    images = [rng.random((1, 1, 16, 16), dtype=np.float32) for _ in range(4)]
    settings = {**MINMAX_SETTINGS, "upsampling": "depth_to_space"}
    measured_dir, from_cache_dir = tmp_path / "measured", tmp_path / "from_cache"
    measured_dir.mkdir()
    from_cache_dir.mkdir()
    measured_cache = measured_dir / "cache.json"
    measured = quantize_int8(
        model, settings, measured_cache, measured_dir, reader=ImageReader(images)
    )
    ops = [n.op_type for n in onnx.load(str(measured)).graph.node]
    assert "ConvTranspose" not in ops and ops.count("DepthToSpace") == 1
    cache = json.loads(measured_cache.read_text())
    packed = [name for name in cache["data"] if name.endswith("/d2s_packed")]
    assert len(packed) == 1
    del cache["data"][packed[0]]
    cache_path = from_cache_dir / "cache.json"
    cache_path.write_text(json.dumps(cache))
    rebuilt = quantize_int8(model, settings, cache_path, from_cache_dir)
    assert graph_digest(rebuilt.read_bytes()) == graph_digest(measured.read_bytes())
    assert packed[0] in json.loads(cache_path.read_text())["data"]
    session = ort.InferenceSession(str(rebuilt), providers=["CPUExecutionProvider"])
    assert {n.op_type for n in onnx.load(str(rebuilt)).graph.node} >= {"QuantizeLinear"}
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": images[0]})[0]
    ref = want.run(None, {"image": images[0]})[0]
    assert got.shape == (1, 1, 32, 32)
    np.testing.assert_allclose(got, ref, atol=0.05 * float(np.abs(ref).max()))
    with pytest.raises(ValueError, match="unknown upsampling"):
        quantize_int8(model, {**settings, "upsampling": "nearest"}, cache_path, from_cache_dir)
