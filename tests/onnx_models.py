"""Tiny real ONNX models that meet (or deliberately break) the model contract.

The band model marks pixels whose Hounsfield value lies in a band: with the lung window
``u = (hu - (c - w / 2)) / w``, it computes ``logits = k * min(u - lo, hi - u)``, positive
exactly inside ``(lo, hi)``. With the default threshold 0.5 (logit 0) a phantom blob at
-500 HU inside -1000 HU air is segmented exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper
from pydicom.sr.codedict import codes

from ggo_cli.model_info import code_to_json, stamp_metadata

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
