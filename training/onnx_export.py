"""The ONNX graph of a checkpoint: ``torch.onnx.export``, float16 initializers, the parity checks.

Used by :func:`training.export.export_checkpoint` (steps 1 to 3 of its module docstring): the
export itself (opset 17, dynamic batch), float16 initializers with in-graph casts to float32,
ONNX Runtime parity with PyTorch and the float16-vs-float32 mask agreement.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ggo_cli.errors import ModelError

log = logging.getLogger(__name__)

OPSET = 17
EXPORT_BATCH = 1
PARITY_BATCH = 2
PARITY_RTOL = 1e-3
PARITY_ATOL = 1e-4


def _export_onnx(model: nn.Module, size: int, path: Path) -> None:
    """torch.onnx.export with the legacy exporter, the dynamo exporter as fallback."""
    dummy = torch.rand(EXPORT_BATCH, 1, size, size)
    # Exporters print progress to stdout; stdout carries only the command's result.
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        # The TorchScript exporter is chosen deliberately (mature, folds BatchNorm into convs).
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
            return
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            log.warning("legacy ONNX exporter failed (%s); trying the dynamo exporter", exc)
        program = torch.onnx.export(
            model,
            (dummy,),
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("N", min=1, max=4096)},),
            opset_version=max(OPSET, 18),
            dynamo=True,
        )
        if program is None:
            raise ModelError("the dynamo ONNX exporter returned no program")
        program.save(str(path))


def cast_initializers_fp16(proto: Any, *, keep_per_channel: bool = False) -> int:
    """Store float32 weights as float16 initializers, cast back to float32 inside the graph.

    Halves the file; ONNX Runtime computes in float32 as before.

    Args:
        proto: an ``onnx.ModelProto`` (modified in place).
        keep_per_channel: keep float32 for tensors with one non-unit dimension (per-channel
            scales and shifts, e.g. unfolded BatchNorm): tiny, and not float16-exact.

    Returns:
        The number of initializers converted.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    kept, casts, converted = [], [], 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < 16:
            kept.append(init)
            continue
        if keep_per_channel and sum(int(d) != 1 for d in init.dims) <= 1:
            kept.append(init)
            continue
        values = numpy_helper.to_array(init)
        if not np.all(np.abs(values) < 65504.0):
            kept.append(init)
            continue
        half = numpy_helper.from_array(values.astype(np.float16), name=init.name + "__fp16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT))
        converted += 1
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(proto)
    return converted


def _parity(proto_bytes: bytes, model: nn.Module, size: int) -> float:
    """ORT vs PyTorch on a batch of PARITY_BATCH random slices; returns max |diff|.

    Raises:
        ModelError: outside rtol 1e-3 / atol 1e-4.
    """
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(PARITY_BATCH, 1, size, size, generator=generator)
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": x.numpy()})[0]
    diff = float(np.max(np.abs(got - expected)))
    try:
        np.testing.assert_allclose(got, expected, rtol=PARITY_RTOL, atol=PARITY_ATOL)
    except AssertionError as exc:
        raise ModelError(
            f"ONNX Runtime output differs from PyTorch at batch {PARITY_BATCH} (max |diff| "
            f"{diff:.3g}); the export is wrong, do not ship it"
        ) from exc
    return diff


def _mask_agreement(
    fp16_bytes: bytes, fp32_bytes: bytes, images: np.ndarray, threshold: float
) -> tuple[float, float]:
    """Fraction of equal binary-mask pixels and max |logit diff| between two ONNX models."""
    import onnxruntime as ort

    logit_t = float(np.log(threshold / (1.0 - threshold)))
    a = ort.InferenceSession(fp16_bytes, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(fp32_bytes, providers=["CPUExecutionProvider"])
    equal = total = 0
    max_diff = 0.0
    for start in range(0, images.shape[0], 4):
        batch = np.ascontiguousarray(images[start : start + 4, None], dtype=np.float32)
        la = a.run(["logits"], {"image": batch})[0][:, 0]
        lb = b.run(["logits"], {"image": batch})[0][:, 0]
        max_diff = max(max_diff, float(np.max(np.abs(la - lb))))
        equal += int(np.count_nonzero((la > logit_t) == (lb > logit_t)))
        total += la.size
    return (equal / total if total else 1.0), max_diff

def _agreement_images(slices: Any, size: int) -> np.ndarray:
    """Model-grid images for the fp16 check: the data when known, else seeded noise."""
    from ggo_cli.analysis.preprocessing import to_model_grid

    if slices:
        return np.stack([to_model_grid(s.image_float(), size) for s in slices])
    return np.random.default_rng(0).random((PARITY_BATCH, size, size), dtype=np.float32)

