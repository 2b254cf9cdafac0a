"""Tiny real ONNX models that meet (or deliberately break) the model contract.

The band model marks pixels whose Hounsfield value lies in a band: with the lung window
``u = (hu - (c - w / 2)) / w``, it computes ``logits = k * min(u - lo, hi - u)``, positive
exactly inside ``(lo, hi)``. With the default threshold 0.5 (logit 0) a phantom blob at
-500 HU inside -1000 HU air is segmented exactly. The two-channel model does the same with a
band per channel: GGO, then consolidation, coded as ggo-cli recognises it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper
from pydicom.sr.codedict import codes

from ggo_cli.analysis.measurements import CONSOLIDATION_TYPE
from ggo_cli.onnx.model_info import code_to_json, stamp_metadata

WINDOW_CENTER = -600.0
WINDOW_WIDTH = 1500.0
GGO_SEGMENT = {
    "label": "GGO",
    "property_category": code_to_json(codes.SCT.MorphologicallyAbnormalStructure),
    "property_type": code_to_json(codes.DCM.GroundGlassOpacity),
}


def hu_to_unit(hu: float) -> float:
    """The default lung window applied to one HU value."""
    return (hu - (WINDOW_CENTER - WINDOW_WIDTH / 2)) / WINDOW_WIDTH


def base_metadata(size: int, **overrides: Any) -> dict[str, Any]:
    """Contract metadata for a test model (sha256 is filled in by stamp_metadata)."""
    meta: dict[str, Any] = {
        "name": "test-band",
        "version": "0.0.1",
        "architecture": "hu-band",
        "input_size": size,
        "window_center": WINDOW_CENTER,
        "window_width": WINDOW_WIDTH,
        "threshold": 0.5,
        "segments": [GGO_SEGMENT],
        "training_data": {"name": "none", "licence": "n/a"},
        "metrics": {},
        "sha256": "",
    }
    meta.update(overrides)
    return meta


def band_model(
    size: int = 64,
    *,
    lo_hu: float = -750.0,
    hi_hu: float = -300.0,
    gain: float = 50.0,
    channels: int = 1,
    input_name: str = "image",
    output_name: str = "logits",
    static_batch: int | None = None,
) -> onnx.ModelProto:
    """Build the band model graph (no metadata)."""
    batch: int | str = static_batch if static_batch is not None else "N"
    image = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 1, size, size])
    logits = helper.make_tensor_value_info(
        output_name, TensorProto.FLOAT, [batch, channels, size, size]
    )
    inits = [
        helper.make_tensor("lo", TensorProto.FLOAT, [], [hu_to_unit(lo_hu)]),
        helper.make_tensor("hi", TensorProto.FLOAT, [], [hu_to_unit(hi_hu)]),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [gain]),
    ]
    nodes = [
        helper.make_node("Sub", [input_name, "lo"], ["above"]),
        helper.make_node("Sub", ["hi", input_name], ["below"]),
        helper.make_node("Min", ["above", "below"], ["margin"]),
        helper.make_node("Mul", ["margin", "gain"], ["one" if channels > 1 else output_name]),
    ]
    if channels > 1:
        nodes.append(helper.make_node("Concat", ["one"] * channels, [output_name], axis=1))
    graph = helper.make_graph(nodes, "band", [image], [logits], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_band_model(
    path: Path, size: int = 64, *, metadata: dict[str, Any] | None = None, **kw: Any
) -> Path:
    """Write a contract-conforming band model to ``path``."""
    model = band_model(size, **kw)
    meta = metadata if metadata is not None else base_metadata(size)
    if kw.get("channels", 1) > 1 and metadata is None:
        meta["segments"] = [GGO_SEGMENT] * kw["channels"]
    stamp_metadata(model, meta)
    onnx.save(model, str(path))
    return path


# --- Explain graphs (GradCAM++ contract, see ggo_cli.onnx.explain_graph) -----------------

EXPLAIN_GAIN = 50.0
"""Gain of the conv model's detector channels (logit per unit of windowed intensity)."""
EXPLAIN_LO_HU = -750.0
"""The conv model marks pixels whose 3 x 3 mean exceeds this HU value."""
EXPLAIN_HI_HU = -300.0
"""The two-channel conv model's channel 1 (consolidation) marks 3 x 3 means above this."""


def conv_explain_weights(
    *,
    gain: float = EXPLAIN_GAIN,
    lo_hu: float = EXPLAIN_LO_HU,
    channels: int = 1,
    hi_hu: float = EXPLAIN_HI_HU,
) -> dict[str, Any]:
    """Weights of the conv model: ``A = Relu(Conv3x3(image))`` (K = 2), ``logits = v . A + b``.

    Channel 0 fires on pixels brighter than ``lo_hu`` (3 x 3 mean), channel 1 on darker ones;
    ``v = (1, -1)``, ``b = 0``, so the logit is ``gain * (mean3x3(u) - lo)``. With
    ``channels=2`` two more activation channels do the same about ``hi_hu`` (K = 4) and the
    second logit (consolidation) is ``gain * (mean3x3(u) - hi)``.
    """
    import numpy as np

    thresholds = [hu_to_unit(lo_hu)] + ([hu_to_unit(hi_hu)] if channels == 2 else [])
    k = 2 * len(thresholds)
    w1 = np.zeros((k, 1, 3, 3), dtype=np.float32)
    w1[0::2] = gain / 9.0
    w1[1::2] = -gain / 9.0
    b1 = np.array([x for t in thresholds for x in (-gain * t, gain * t)], dtype=np.float32)
    v = np.zeros((len(thresholds), k, 1, 1), dtype=np.float32)
    for c in range(len(thresholds)):
        v[c, 2 * c, 0, 0], v[c, 2 * c + 1, 0, 0] = 1.0, -1.0
    return {"w1": w1, "b1": b1, "v": v, "b": np.zeros(len(thresholds), dtype=np.float32)}


def conv_explain_model(
    size: int = 64,
    *,
    stride: int = 1,
    explain: bool = True,
    channels: int = 1,
    target_planes: int | None = None,
    **kw: float,
) -> onnx.ModelProto:
    """The conv model (``explain=False``) or its explain graph with analytic gradients.

    Layer ``conv`` is ``A = Relu(Conv3x3(image, stride))`` ``[N, K, S/stride, S/stride]``;
    layer ``head`` is ``z = Conv1x1(A, v) + b`` ``[N, C, S/stride, S/stride]``; ``logits`` is
    ``z`` repeated ``stride x stride`` (nearest). With ``Score = sum(sigmoid(logits) * target)``
    (``target`` ``[N, C, S, S]``) and ``q = s (1 - s) target``: ``dScore/dz = sum of q over
    each stride x stride block`` and ``dScore/dA_k = sum_c v_ck dScore/dz_c``, built here from
    ONNX operators. ``target_planes=1`` with two channels gives the graph a one-plane target
    (GGO only, zero-padded inside the graph), as graphs exported before issue 20.
    """
    import numpy as np
    from onnx import numpy_helper

    weights = conv_explain_weights(channels=channels, **kw)
    k = weights["w1"].shape[0]
    small = size // stride
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])
    planes = channels if target_planes is None else target_planes
    target = helper.make_tensor_value_info("target", TensorProto.FLOAT, ["N", planes, size, size])
    logits = helper.make_tensor_value_info(
        "logits", TensorProto.FLOAT, ["N", channels, size, size]
    )
    inits = [numpy_helper.from_array(value, name) for name, value in weights.items()]
    if stride > 1:
        inits.append(helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, stride, stride]))
    nodes = [
        helper.make_node(
            "Conv", ["image", "w1", "b1"], ["pre"], pads=[1, 1, 1, 1], strides=[stride, stride]
        ),
        helper.make_node("Relu", ["pre"], ["activations.conv"]),
        helper.make_node("Conv", ["activations.conv", "v", "b"], ["activations.head"]),
    ]
    if stride > 1:
        nodes.append(
            helper.make_node(
                "Resize",
                ["activations.head", "", "scales"],
                ["logits"],
                mode="nearest",
                coordinate_transformation_mode="asymmetric",
                nearest_mode="floor",
            )
        )
    else:
        nodes.append(helper.make_node("Identity", ["activations.head"], ["logits"]))
    outputs = [logits]
    inputs = [image]
    if explain:
        inputs.append(target)
        inits.append(helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]))
        if stride > 1:
            inits.append(helper.make_tensor("block", TensorProto.FLOAT, [], [stride * stride]))
        nodes += [
            helper.make_node("Sigmoid", ["logits"], ["s"]),
            helper.make_node("Sub", ["one", "s"], ["one_minus_s"]),
            helper.make_node("Mul", ["s", "one_minus_s"], ["ds"]),
            helper.make_node(
                "Mul", ["ds", "target" if planes == channels else "target_padded"], ["q"]
            ),
        ]
        if planes != channels:
            pads = [0, 0, 0, 0, 0, channels - planes, 0, 0]
            inits.append(helper.make_tensor("target_pads", TensorProto.INT64, [8], pads))
            nodes.insert(-1, helper.make_node("Pad", ["target", "target_pads"], ["target_padded"]))
        if stride > 1:
            nodes += [
                helper.make_node(
                    "AveragePool",
                    ["q"],
                    ["q_mean"],
                    kernel_shape=[stride, stride],
                    strides=[stride, stride],
                ),
                helper.make_node("Mul", ["q_mean", "block"], ["gradients.head"]),
            ]
        else:
            nodes.append(helper.make_node("Identity", ["q"], ["gradients.head"]))
        if channels == 1:
            nodes.append(helper.make_node("Mul", ["gradients.head", "v"], ["gradients.conv"]))
        else:  # dScore/dA = v^T dScore/dz: a 1 x 1 convolution with the transposed weights
            v_t = np.ascontiguousarray(weights["v"].transpose(1, 0, 2, 3))
            inits.append(numpy_helper.from_array(v_t, "v_t"))
            nodes.append(helper.make_node("Conv", ["gradients.head", "v_t"], ["gradients.conv"]))
        for name, planes in (("conv", k), ("head", channels)):
            for kind in ("activations", "gradients"):
                outputs.append(
                    helper.make_tensor_value_info(
                        f"{kind}.{name}", TensorProto.FLOAT, ["N", planes, small, small]
                    )
                )
    graph = helper.make_graph(nodes, "conv-explain", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def stamp_explain_metadata(proto: onnx.ModelProto, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``ggo_cli_explain`` metadata with the graph digest filled in (unless given)."""
    import json

    from ggo_cli.onnx.model_info import graph_sha256

    stamped = dict(meta)
    stamped.setdefault("sha256", graph_sha256(proto.graph.SerializeToString(deterministic=True)))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = "ggo_cli_explain", json.dumps(stamped, sort_keys=True)
    return stamped


def write_conv_explain_pair(
    folder: Path,
    size: int = 64,
    *,
    stride: int = 1,
    channels: int = 1,
    explain_channels: int | None = None,
    **overrides: Any,
) -> tuple[Path, Path]:
    """Write the conv ``model.onnx`` and its ``explain.onnx`` into ``folder``.

    ``channels=2`` writes the two-class model (GGO, consolidation with its SNOMED CT code);
    ``explain_channels=1`` then pairs it with a GGO-only explain graph (the one-channel graph
    of the same GGO weights, as exported before two-class models).
    ``overrides`` replace keys of the explain metadata (e.g. ``model_sha256``).

    Returns:
        ``(model path, explain path)``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    model = conv_explain_model(size, stride=stride, explain=False, channels=channels)
    segments = [GGO_SEGMENT, CONSOLIDATION_SEGMENT][:channels]
    model_meta = stamp_metadata(
        model, base_metadata(size, name="test-conv", segments=segments)
    )
    model_path = folder / "model.onnx"
    onnx.save(model, str(model_path))
    explain = conv_explain_model(
        size, stride=stride, explain=True, channels=channels, target_planes=explain_channels
    )
    meta: dict[str, Any] = {
        "model_sha256": model_meta["sha256"],
        "layers": ["conv", "head"],
        "default_layer": "conv",
        "score": "sum(sigmoid(logits) * target)",
        "faithfulness": {"measured": False},
    }
    meta.update(overrides)
    stamp_explain_metadata(explain, meta)
    explain_path = folder / "explain.onnx"
    onnx.save(explain, str(explain_path))
    return model_path, explain_path


# --- A two-channel model: GGO and consolidation (issue 20) ----------------------------------

CONSOLIDATION_SEGMENT = {
    "label": "Consolidation",
    "property_category": code_to_json(codes.SCT.MorphologicallyAbnormalStructure),
    # SNOMED CT 9656002 "Consolidation (morphologic abnormality)", the code ggo-cli looks for
    # (ggo_cli.analysis.measurements.CONSOLIDATION_TYPE; HL7 FHIR R5 codes consolidation of
    # the lung as this morphology in lung structure 39607008, BodyStructure example
    # "right-lung-consolidation").
    "property_type": code_to_json(CONSOLIDATION_TYPE),
}
GGO_BAND_HU = (-750.0, -300.0)
CONSOLIDATION_BAND_HU = (-100.0, 100.0)
"""Channel 1 of the two-channel model: soft-tissue density, as consolidation replaces air."""


def two_channel_band_model(
    size: int = 64,
    *,
    ggo_band_hu: tuple[float, float] = GGO_BAND_HU,
    consolidation_band_hu: tuple[float, float] = CONSOLIDATION_BAND_HU,
    gain: float = 50.0,
) -> onnx.ModelProto:
    """The band model with two channels: 0 marks ``ggo_band_hu``, 1 ``consolidation_band_hu``.

    Each channel is ``gain * min(u - lo, hi - u)`` of its own band (see the module docstring).
    """
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, size, size])
    inits = [helper.make_tensor("gain", TensorProto.FLOAT, [], [gain])]
    nodes = []
    for k, (lo_hu, hi_hu) in enumerate((ggo_band_hu, consolidation_band_hu)):
        inits += [
            helper.make_tensor(f"lo{k}", TensorProto.FLOAT, [], [hu_to_unit(lo_hu)]),
            helper.make_tensor(f"hi{k}", TensorProto.FLOAT, [], [hu_to_unit(hi_hu)]),
        ]
        nodes += [
            helper.make_node("Sub", ["image", f"lo{k}"], [f"above{k}"]),
            helper.make_node("Sub", [f"hi{k}", "image"], [f"below{k}"]),
            helper.make_node("Min", [f"above{k}", f"below{k}"], [f"margin{k}"]),
            helper.make_node("Mul", [f"margin{k}", "gain"], [f"channel{k}"]),
        ]
    nodes.append(helper.make_node("Concat", ["channel0", "channel1"], ["logits"], axis=1))
    graph = helper.make_graph(nodes, "two-band", [image], [logits], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_two_channel_model(
    path: Path,
    size: int = 64,
    *,
    segments: list[dict[str, Any]] | None = None,
    **kw: Any,
) -> Path:
    """Write the two-channel contract model: GGO, then consolidation (its SNOMED CT code).

    Args:
        path: the ONNX file.
        size: the model's input side.
        segments: the metadata's segments (default: GGO, then consolidation).
        **kw: the bands and gain of :func:`two_channel_band_model`.

    Returns:
        ``path``.
    """
    model = two_channel_band_model(size, **kw)
    meta = base_metadata(
        size,
        name="test-two-band",
        segments=segments if segments is not None else [GGO_SEGMENT, CONSOLIDATION_SEGMENT],
    )
    stamp_metadata(model, meta)
    onnx.save(model, str(path))
    return path
