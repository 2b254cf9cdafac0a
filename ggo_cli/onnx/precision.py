"""Model variants for speed, made in memory from the shipped model: fp16 (CUDA), int8 (CPU).

The shipped ``model.onnx`` stores float16 weights that ``Cast`` nodes widen to float32, so every
provider computes in float32. On CUDA, :func:`fp16_model_bytes` makes the float16-compute
variant with float32 inputs and outputs (the model contract is unchanged): the ``Cast`` nodes
on weights are folded, then ``onnxruntime.transformers.float16.convert_float_to_float16``
(``keep_io_types=True``) converts the graph. It is quick and deterministic, so no second
40 MB file is shipped. With the CUDA provider's ``prefer_nhwc`` it runs faster than the
float32 graph in NCHW (measured on an H200: docs/benchmarks.md).

On the CPU, :func:`int8_model_bytes` makes a static int8 (QDQ) variant with ONNX Runtime's
quantizer from the calibration ranges shipped beside the model (``int8_calibration.json``,
written by ``python -m training quantize``; its recipes per CPU class are read by
:mod:`ggo_cli.onnx.int8_recipes`). The same steps run here (fold the weight casts,
``quant_pre_process`` without symbolic shapes, ``quantize_static`` from the calibration
cache). A variant is considered only when its graph digest equals the validated one (this
ONNX Runtime quantizes exactly as the one that was measured), and used only after it agreed
with float32 on this machine (:mod:`ggo_cli.onnx.variant_check`). No 20 MB int8 file ships.
"""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from ..scratch import scratch_folder
from .int8_recipes import Int8Recipe, Int8Spec
from .model_info import ModelInfo, graph_sha256

log = logging.getLogger(__name__)


class Precision(StrEnum):
    """``--precision``: which variant of the model runs."""

    AUTO = "auto"  # fp16 on CUDA; on CPU int8 where a validated int8 model ships, else fp32
    FP32 = "fp32"
    FP16 = "fp16"  # CUDA only
    INT8 = "int8"  # CPU only, needs int8_calibration.json beside the model


CUDA_NHWC_OPTIONS = {"prefer_nhwc": 1}
"""CUDA provider options of the segmentation session (NHWC kernels where ORT has them)."""


UPSAMPLING_AS_IS = "as_is"
UPSAMPLING_DEPTH_TO_SPACE = "depth_to_space"
"""The int8 recipe's ``upsampling`` setting: 2 x 2 stride-2 ``ConvTranspose`` nodes kept, or
rewritten as 1 x 1 ``Conv`` + ``DepthToSpace`` before quantizing
(:func:`upsampling_as_depth_to_space`); recipes without the setting keep them."""


def fp32_model(path: Path) -> Any:
    """The model as a plain float32 graph: ``Cast``s of float16 weights folded into them.

    Returns:
        An ``onnx.ModelProto`` (logits identical to the file's: the casts are exact).
    """
    import onnx  # deferred: keeps `ggo-cli --help` fast
    from onnx import numpy_helper

    model = onnx.load(str(path))
    initializers = {i.name: i for i in model.graph.initializer}
    kept_nodes = []
    widened = []
    for node in model.graph.node:
        source = initializers.get(node.input[0]) if node.input else None
        if (
            node.op_type == "Cast"
            and source is not None
            and source.data_type == onnx.TensorProto.FLOAT16
        ):
            values = numpy_helper.to_array(source).astype(np.float32)
            widened.append(numpy_helper.from_array(values, node.output[0]))
            continue
        kept_nodes.append(node)
    used = {name for node in kept_nodes for name in node.input}
    kept_initializers = [i for i in model.graph.initializer if i.name in used]
    kept_initializers += [i for i in widened if i.name in used]
    del model.graph.node[:]
    model.graph.node.extend(kept_nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_initializers)
    return model


@lru_cache(maxsize=2)
def fp16_model_bytes(path: Path, file_sha256: str) -> bytes:
    """The float16-compute variant of an ONNX model, serialized (float32 inputs and outputs).

    Args:
        path: the (verified) model file.
        file_sha256: its digest (the cache key: a changed file is converted again).

    Returns:
        The converted model, with the original ``metadata_props``.

    Raises:
        ModelError: the conversion failed.
    """
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        half = convert_float_to_float16(
            fp32_model(path), keep_io_types=True, disable_shape_infer=True
        )
    except Exception as exc:  # noqa: BLE001 - onnx and the converter raise untyped errors
        raise ModelError(f"cannot make the float16 variant of {path.name}: {exc}") from exc
    log.debug("float16 variant of %s made (%d nodes)", path.name, len(half.graph.node))
    return bytes(half.SerializeToString())


def upsampling_as_depth_to_space(model: Any) -> dict[str, str]:
    """Rewrite 2 x 2 stride-2 ``ConvTranspose`` nodes as a 1 x 1 ``Conv`` and ``DepthToSpace``.

    Such a transposed convolution writes each input pixel's own 2 x 2 output block, ``y[co,
    2i+a, 2j+b] = sum_ci x[ci, i, j] W[ci, co, a, b] + bias[co]``: a 1 x 1 convolution to
    ``4 * C_out`` channels (weight ``W'[4 co + 2 a + b, ci] = W[ci, co, a, b]``) followed by
    ``DepthToSpace`` (block 2, mode CRD) computes the same sums, as a plain matrix product.
    ONNX Runtime's CPU quantizer turns that ``Conv`` into an int8 ``QLinearConv``, while it
    leaves a ``ConvTranspose`` in float32 (a large share of the int8 model's time on the CPU:
    docs/benchmarks.md, "Training and quantization times"), so the int8 recipe can ask for it
    (``"upsampling": "depth_to_space"``).
    On an H200 in fp16 + NHWC it was slower (docs/benchmarks.md), so CUDA does not use it.
    Nodes with other kernels, strides, pads, groups, output padding or non-constant weights
    are left alone.

    Args:
        model: an ``onnx.ModelProto`` with float32 weights (``ggo_cli.onnx.precision.fp32_model``);
            changed in place.

    Returns:
        For each rewritten node, the ``Conv``'s output (the packed ``4 * C_out`` channels)
        and the node's own output, which ``DepthToSpace`` now writes: the same values,
        rearranged.
    """
    import onnx
    from onnx import helper, numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    nodes = []
    rewritten: dict[str, str] = {}
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        bias = initializers.get(node.input[2]) if len(node.input) > 2 else None
        plain = (
            node.op_type == "ConvTranspose"
            and weight is not None
            and weight.data_type == onnx.TensorProto.FLOAT
            and (len(node.input) < 3 or bias is not None)
            and list(attrs.get("kernel_shape", [2, 2])) == [2, 2]
            and list(attrs.get("strides", [1, 1])) == [2, 2]
            and list(attrs.get("pads", [0, 0, 0, 0])) == [0, 0, 0, 0]
            and list(attrs.get("dilations", [1, 1])) == [1, 1]
            and int(attrs.get("group", 1)) == 1
            and not any(attrs.get("output_padding", []))
            and "output_shape" not in attrs
            and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        )
        if not plain or weight is None:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight)  # (C_in, C_out, 2, 2)
        if w.ndim != 4 or w.shape[2:] != (2, 2):
            nodes.append(node)
            continue
        c_in, c_out = w.shape[:2]
        stem = node.name or node.output[0]
        w1 = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(4 * c_out, c_in, 1, 1))
        inputs = [node.input[0], f"{stem}/d2s_weight"]
        new_inits = [numpy_helper.from_array(w1, inputs[1])]
        if bias is not None:
            b1 = np.repeat(numpy_helper.to_array(bias), 4).astype(np.float32)
            inputs.append(f"{stem}/d2s_bias")
            new_inits.append(numpy_helper.from_array(b1, inputs[2]))
        model.graph.initializer.extend(new_inits)
        packed = f"{stem}/d2s_packed"
        nodes.append(helper.make_node("Conv", inputs, [packed], name=f"{stem}/d2s_conv",
                                      kernel_shape=[1, 1]))
        nodes.append(helper.make_node("DepthToSpace", [packed], list(node.output),
                                      name=f"{stem}/d2s", blocksize=2, mode="CRD"))
        rewritten[packed] = node.output[0]
    if rewritten:
        used = {name for node in nodes for name in node.input}
        kept = [i for i in model.graph.initializer if i.name in used]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return rewritten


def quantize_int8(
    model_path: Path,
    settings: dict[str, Any],
    calibration_cache: Path,
    work: Path,
    *,
    reader: Any = None,
) -> Path:
    """Run ggo-cli's int8 recipe: fold casts, ``quant_pre_process``, ``quantize_static``.

    With ``reader`` (an ONNX Runtime ``CalibrationDataReader``) the ranges are measured and
    written to ``calibration_cache``; without it they are read from there.

    Args:
        model_path: the float model.
        settings: ``activation_type``/``weight_type`` (``QUInt8``/``QInt8``),
            ``calibrate_method`` (``MinMax``, ``Percentile``, ``Entropy``), ``per_channel``,
            ``nodes_to_exclude``, ``extra_options``, ``reduce_range`` (7-bit weights; default
            off), and ``upsampling`` (``as_is``, the
            default, or ``depth_to_space``: see :data:`UPSAMPLING_DEPTH_TO_SPACE`).
        calibration_cache: ONNX Runtime's calibration cache (JSON). Read from, it gains the
            ranges of the rewritten upsamplings' packed tensors.
        work: a scratch folder.
        reader: calibration data, or ``None`` to use the cache.

    Returns:
        The int8 model file in ``work``.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, prep_path, int8_path = work / "fp32.onnx", work / "prep.onnx", work / "int8.onnx"
    fp32 = fp32_model(model_path)
    upsampling = settings.get("upsampling", UPSAMPLING_AS_IS)
    if upsampling == UPSAMPLING_DEPTH_TO_SPACE:
        packed = upsampling_as_depth_to_space(fp32)
        if reader is None:
            _add_packed_ranges(calibration_cache, packed)
    elif upsampling != UPSAMPLING_AS_IS:
        raise ValueError(f"unknown upsampling setting {upsampling!r}")
    onnx.save(fp32, str(fp32_path))
    # No symbolic shape inference: it needs sympy, which is not a runtime dependency.
    quant_pre_process(str(fp32_path), str(prep_path), skip_symbolic_shape=True)
    quantize_static(
        str(prep_path),
        str(int8_path),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=bool(settings["per_channel"]),
        reduce_range=bool(settings.get("reduce_range", False)),
        activation_type=QuantType[settings["activation_type"]],
        weight_type=QuantType[settings["weight_type"]],
        calibrate_method=CalibrationMethod[settings["calibrate_method"]],
        nodes_to_exclude=list(settings.get("nodes_to_exclude", [])),
        extra_options=dict(settings.get("extra_options", {})),
        calibration_cache_path=str(calibration_cache),
    )
    return int8_path


def _add_packed_ranges(calibration_cache: Path, packed: dict[str, str]) -> None:
    """Give each rewritten upsampling's packed tensor the range of the output it is a
    rearrangement of (the same values, so the same range however it was estimated)."""
    cache = json.loads(calibration_cache.read_text(encoding="utf-8"))
    ranges = cache["data"]  # ONNX Runtime's TensorsData: {"CLS": ..., "data": {name: ...}}
    for packed_name, output_name in packed.items():
        if packed_name not in ranges:
            if output_name not in ranges:
                raise ValueError(f"the calibration ranges lack {output_name!r}")
            ranges[packed_name] = ranges[output_name]
    calibration_cache.write_text(json.dumps(cache), encoding="utf-8")


def graph_digest(model_bytes: bytes) -> str:
    """The model contract's graph digest (:func:`ggo_cli.onnx.model_info.graph_sha256`)."""
    import onnx

    graph = onnx.load_from_string(model_bytes).graph
    return graph_sha256(graph.SerializeToString(deterministic=True))


_INT8_CACHE: dict[tuple[str, str, str], tuple[bytes, str]] = {}


def int8_model_bytes(model: ModelInfo, spec: Int8Spec, recipe: Int8Recipe) -> tuple[bytes, bool]:
    """The int8 variant of a model from one of its recipes, and whether it is the validated one.

    Returns:
        ``(serialized model, graph digest equals the recipe's)``.

    Raises:
        ModelError: quantization failed (e.g. an ONNX Runtime without calibration caches).
    """
    key = (model.file_sha256, spec.file_sha256, recipe.name)
    if key not in _INT8_CACHE:
        try:
            # Not the system temp folder: a killed run would leave ~160 MB there (scratch.py).
            with scratch_folder("int8-") as work:
                cache = work / "calibration.json"
                cache.write_text(json.dumps(spec.tensors), encoding="utf-8")
                int8_path = quantize_int8(model.path, recipe.settings, cache, work)
                data = int8_path.read_bytes()
        except Exception as exc:  # noqa: BLE001 - the quantizer raises many untyped errors
            raise ModelError(
                f"cannot make the int8 variant ({recipe.name}) of {model.path.name}: {exc}"
            ) from exc
        _INT8_CACHE[key] = (data, graph_digest(data))
    data, digest = _INT8_CACHE[key]
    return data, digest == recipe.int8_graph_sha256
