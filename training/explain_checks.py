"""Checks of the explain graph: gradients against float64 autograd, pairing with model.onnx,
float16 weights against float32 (used by :func:`training.explain_export.export_explain`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from ggo_cli.errors import ModelError

from .explain_export import output_names, reference_outputs, run_explain
from .faithfulness import cams_from_outputs

log = logging.getLogger(__name__)


def gradient_errors(
    proto_bytes: bytes, model: nn.Module, layers: Sequence[str], size: int, *, batch: int = 1
) -> dict[str, float]:
    """max|ORT - float64 autograd| / max|autograd| per output on seeded random inputs.

    Float64 is the reference because float32 autograd itself differs from exact arithmetic by
    up to a few 1e-3 of the maximum on deep gradients (measured on random 64 px networks).
    """
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    image = rng.random((batch, 1, size, size), dtype=np.float32)
    target = (rng.random((batch, 1, size, size)) > 0.5).astype(np.float32)
    session = ort.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
    got = run_explain(session, image, target)
    expected = reference_outputs(model, layers, image, target)
    errors = {}
    for name, a, b in zip(output_names(layers), got, expected, strict=True):
        if a.shape != b.shape:
            raise ModelError(f"explain output {name} has shape {a.shape}, expected {b.shape}")
        errors[name] = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
    return errors


def check_pairing(
    explain_bytes: bytes, model_session: Any, grid: Any, size: int, threshold: float
) -> None:
    """The explain graph's logits must give model.onnx's masks (same weights).

    Raises:
        ModelError: fewer than 99.9 % equal mask pixels on up to 4 slices (or noise).
    """
    import onnxruntime as ort

    if grid is not None:
        images = grid.images[:4, None]
    else:
        images = np.random.default_rng(1).random((2, 1, size, size), dtype=np.float32)
    session = ort.InferenceSession(explain_bytes, providers=["CPUExecutionProvider"])
    ours = run_explain(session, images, np.zeros_like(images))[0][:, 0]
    theirs = model_session.run(["logits"], {"image": np.ascontiguousarray(images)})[0][:, 0]
    logit_t = float(np.log(threshold / (1.0 - threshold)))
    agreement = float(np.mean((ours > logit_t) == (theirs > logit_t)))
    log.info(
        "explain vs model.onnx: masks agree on %.5f, max |logit diff| %.3g",
        agreement,
        float(np.max(np.abs(ours - theirs))),
    )
    if agreement < 0.999:
        raise ModelError(
            f"the explain graph's masks agree with model.onnx on only {agreement:.4f} of pixels: "
            "is the checkpoint the one the model was exported from?"
        )


def fp16_cam_diff(
    fp16_bytes: bytes, fp32_bytes: bytes, layers: Sequence[str], grid: Any, size: int
) -> dict[str, float]:
    """Max |CAM fp16 - CAM fp32| per layer on up to 2 GGO slices (or noise with a disc)."""
    import onnxruntime as ort

    if grid is not None:
        area = grid.masks.reshape(len(grid.masks), -1).sum(1, dtype=np.int64)
        order = np.argsort(-area, kind="stable")[:2]
        images, targets = grid.images[order, None], grid.masks[order, None].astype(np.float32)
    else:
        images = np.random.default_rng(2).random((2, 1, size, size), dtype=np.float32)
        yy, xx = np.mgrid[:size, :size]
        disc = ((yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (size / 6) ** 2).astype(np.float32)
        targets = np.broadcast_to(disc, images.shape).copy()
    cams = []
    for blob in (fp16_bytes, fp32_bytes):
        session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        cams.append(cams_from_outputs(run_explain(session, images, targets), layers, size))
    return {layer: float(np.max(np.abs(cams[0][layer] - cams[1][layer]))) for layer in layers}
