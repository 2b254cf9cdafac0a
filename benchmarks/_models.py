"""The benchmarks' stand-in model: a contract ONNX model that marks a Hounsfield band as GGO.

Its inference costs next to nothing, so a benchmark run with it times the CPU stages alone
(decode, lung mask, SEG build and read-back, overlay), as if a GPU did the network. It is
built here, not imported from ``tests/``, so that the benchmarks never depend on the test
suite.

With the lung window ``u = (hu - (c - w / 2)) / w`` the graph computes
``logits = k * min(u - lo, hi - u)``: positive exactly inside ``(lo_hu, hi_hu)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper
from pydicom.sr.codedict import codes

from ggo_cli.onnx.model_info import code_to_json, stamp_metadata

WINDOW_CENTER_HU = -600.0
WINDOW_WIDTH_HU = 1500.0
BAND_LO_HU = -750.0
BAND_HI_HU = -300.0
GAIN = 50.0
"""Logit per unit of windowed intensity at the band's edges."""
OPSET = 17


def _unit(hu: float) -> float:
    """One HU value through the lung window."""
    return (hu - (WINDOW_CENTER_HU - WINDOW_WIDTH_HU / 2)) / WINDOW_WIDTH_HU


def _band_graph(size: int) -> onnx.ModelProto:
    """The band graph, ``image [N, 1, size, size]`` to ``logits [N, 1, size, size]``."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, size, size])
    inits = [
        helper.make_tensor("lo", TensorProto.FLOAT, [], [_unit(BAND_LO_HU)]),
        helper.make_tensor("hi", TensorProto.FLOAT, [], [_unit(BAND_HI_HU)]),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [GAIN]),
    ]
    nodes = [
        helper.make_node("Sub", ["image", "lo"], ["above"]),
        helper.make_node("Sub", ["hi", "image"], ["below"]),
        helper.make_node("Min", ["above", "below"], ["margin"]),
        helper.make_node("Mul", ["margin", "gain"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "band", [image], [logits], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_stand_in_model(path: Path, size: int = 512) -> Path:
    """Write the stand-in model, stamped with the model contract's metadata, to ``path``.

    Args:
        path: the ``.onnx`` file to write (its folder must exist).
        size: the model grid's side in pixels (the slices' own 512 avoids any resize).

    Returns:
        ``path``.
    """
    model = _band_graph(size)
    meta: dict[str, Any] = {
        "name": "benchmark-stand-in-band",
        "version": "0.0.1",
        "architecture": "hu-band",
        "input_size": size,
        "window_center": WINDOW_CENTER_HU,
        "window_width": WINDOW_WIDTH_HU,
        "threshold": 0.5,
        "segments": [
            {
                "label": "GGO",
                "property_category": code_to_json(codes.SCT.MorphologicallyAbnormalStructure),
                "property_type": code_to_json(codes.DCM.GroundGlassOpacity),
            }
        ],
        "training_data": {"name": "none", "licence": "n/a"},
        "metrics": {},
        "sha256": "",
    }
    stamp_metadata(model, meta)
    onnx.save(model, str(path))
    return path
