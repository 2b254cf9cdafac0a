"""The in-graph HU window and threshold: a model that takes int16 HU and returns masks.

On a GPU the host then neither windows nor thresholds, and copies 2 bytes a pixel in and 1 out
instead of 4 and 4 (issue 7 part 5); :class:`ggo_cli.analysis.segmenter.OnnxSegmenter` runs it
on int16 series on the model's own grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ModelError

HU_INPUT_NAME = "hu"
MASK_OUTPUT_NAME = "mask"
NEAR_OUTPUT_NAME = "near"


def windowed_model_bytes(
    model_bytes: bytes,
    *,
    low_hu: float,
    width_hu: float,
    logit_threshold: float,
    input_name: str,
    output_name: str,
    near_logit_threshold: float | None = None,
) -> bytes:
    """The model with the lung window before it and the threshold after it, serialized.

    Input ``hu`` (int16 Hounsfield units on the model grid, ``(n, 1, S, S)``); output
    ``mask`` (bool, ``(n, C, S, S)``): ``Cast`` to float32, ``Sub`` the window's low end,
    ``Mul`` by ``1 / width``, ``Clip`` to ``[0, 1]``, the model, then ``Greater`` than the
    logit threshold. Every step is the float32 arithmetic of
    :func:`ggo_cli.analysis.preprocessing.window_hu` and of the logit decision in ``predict``,
    so the
    masks are the same; on a GPU the host then neither windows nor thresholds, and copies
    2 bytes a pixel in and 1 out instead of 4 and 4 (issue 7 part 5).

    With ``near_logit_threshold``, a second output ``near`` (bool, ``(n, 1, S, S)``) marks the
    GGO channel's marginal calls, ``logit_threshold < logit < near_logit_threshold``, which
    ``predict`` counts for the ``low_confidence`` quality flag (:mod:`ggo_cli.analysis.quality`).

    Args:
        model_bytes: the serialized model (any precision variant with float32 input and output).
        low_hu: the window's low end in HU (centre - width / 2).
        width_hu: the window width in HU.
        logit_threshold: ``ln(t / (1 - t))`` for the probability threshold ``t``.
        input_name: the model's image input.
        output_name: the model's logits output.
        near_logit_threshold: ``ln(p / (1 - p))`` for ``p = t + 0.1`` (``inf`` allowed);
            ``None``: no ``near`` output.

    Raises:
        ModelError: the model cannot be parsed or has other inputs or outputs.
    """
    import onnx  # deferred: keeps `ggo-cli --help` fast
    from onnx import TensorProto, helper

    try:
        model = onnx.load_from_string(model_bytes)
    except Exception as exc:  # noqa: BLE001 - protobuf raises untyped errors
        raise ModelError(f"cannot parse the model to add the window: {exc}") from exc
    graph = model.graph
    inputs = [i for i in graph.input if i.name == input_name]
    outputs = [o for o in graph.output if o.name == output_name]
    if len(inputs) != 1 or len(outputs) != 1 or len(graph.output) != 1:
        raise ModelError(f"cannot add the window: no single {input_name!r} -> {output_name!r}")
    image, logits = inputs[0], outputs[0]
    hu = helper.make_tensor_value_info(HU_INPUT_NAME, TensorProto.INT16, None)
    hu.type.tensor_type.shape.CopyFrom(image.type.tensor_type.shape)
    mask = helper.make_tensor_value_info(MASK_OUTPUT_NAME, TensorProto.BOOL, None)
    mask.type.tensor_type.shape.CopyFrom(logits.type.tensor_type.shape)
    constants = {
        "ggo_window_low": np.float32(low_hu),
        "ggo_window_scale": np.float32(1.0 / width_hu),
        "ggo_zero": np.float32(0.0),
        "ggo_one": np.float32(1.0),
        "ggo_logit_threshold": np.float32(logit_threshold),
    }
    for name, value in constants.items():
        graph.initializer.append(helper.make_tensor(name, TensorProto.FLOAT, [], [float(value)]))
    before = [
        helper.make_node("Cast", [HU_INPUT_NAME], ["ggo_hu_f32"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["ggo_hu_f32", "ggo_window_low"], ["ggo_shifted"]),
        helper.make_node("Mul", ["ggo_shifted", "ggo_window_scale"], ["ggo_scaled"]),
        helper.make_node("Clip", ["ggo_scaled", "ggo_zero", "ggo_one"], [input_name]),
    ]
    after = helper.make_node("Greater", [output_name, "ggo_logit_threshold"], [MASK_OUTPUT_NAME])
    nodes = [*before, *graph.node, after]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.remove(image)
    graph.input.insert(0, hu)
    graph.output.remove(logits)
    graph.output.append(mask)
    if near_logit_threshold is not None:
        _add_near_output(graph, logits, output_name, near_logit_threshold)
    return bytes(model.SerializeToString())


def _add_near_output(graph: Any, logits: Any, output_name: str, near_logit: float) -> None:
    """Add output ``near``: GGO-channel logits in ``(threshold, near_logit)`` (see
    :func:`windowed_model_bytes`); channel 0 only, so the host copies 1 byte a pixel more."""
    from onnx import TensorProto, helper

    near = helper.make_tensor_value_info(NEAR_OUTPUT_NAME, TensorProto.BOOL, None)
    near.type.tensor_type.shape.CopyFrom(logits.type.tensor_type.shape)
    if len(near.type.tensor_type.shape.dim) > 1:
        channels = near.type.tensor_type.shape.dim[1]
        channels.ClearField("dim_param")
        channels.dim_value = 1
    for name, values in (("ggo_near_start", [0]), ("ggo_near_stop", [1]), ("ggo_near_axis", [1])):
        graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], values))
    graph.initializer.append(
        helper.make_tensor("ggo_near_logit", TensorProto.FLOAT, [], [float(near_logit)])
    )
    graph.node.extend(
        [
            helper.make_node(
                "Slice",
                [output_name, "ggo_near_start", "ggo_near_stop", "ggo_near_axis"],
                ["ggo_logits_ggo"],
            ),
            helper.make_node("Greater", ["ggo_logits_ggo", "ggo_logit_threshold"], ["ggo_called"]),
            helper.make_node("Less", ["ggo_logits_ggo", "ggo_near_logit"], ["ggo_below_near"]),
            helper.make_node("And", ["ggo_called", "ggo_below_near"], [NEAR_OUTPUT_NAME]),
        ]
    )
    graph.output.append(near)
