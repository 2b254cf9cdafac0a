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
from .multiclass import class_mask

log = logging.getLogger(__name__)


def plane_targets(masks: np.ndarray, channel: int, channels: int) -> np.ndarray:
    """Explain targets ``[N, C, S, S]``: ``masks`` ``[N, S, S]`` in plane ``channel``, 0 else."""
    target = np.zeros((masks.shape[0], channels) + masks.shape[1:], dtype=np.float32)
    target[:, channel] = masks
    return target


def gradient_errors(
    proto_bytes: bytes,
    model: nn.Module,
    layers: Sequence[str],
    size: int,
    *,
    channels: int = 1,
    batch: int = 1,
) -> dict[str, float]:
    """max|ORT - float64 autograd| / max|autograd| per output on seeded random inputs.

    One seeded random image; for each output channel c a random 0/1 target with only plane c
    set (the score is linear in the target, so the C checks cover every target), each output's
    error being the worst over the channels. A channel whose gradients are all zero fails (its
    plane would not reach the score). Float64 is the reference because float32 autograd itself
    differs from exact arithmetic by up to a few 1e-3 of the maximum on deep gradients
    (measured on random 64 px networks).

    Raises:
        ModelError: an output's shape differs from autograd's, or a channel has no gradient.
    """
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    image = rng.random((batch, 1, size, size), dtype=np.float32)
    session = ort.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
    names = output_names(layers)
    errors = dict.fromkeys(names, 0.0)
    for channel in range(channels):
        masks = (rng.random((batch, size, size)) > 0.5).astype(np.float32)
        target = plane_targets(masks, channel, channels)
        got = run_explain(session, image, target)
        expected = reference_outputs(model, layers, image, target)
        for name, a, b in zip(names, got, expected, strict=True):
            if a.shape != b.shape:
                raise ModelError(f"explain output {name} has shape {a.shape}, expected {b.shape}")
            error = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
            errors[name] = max(errors[name], error)
        if not any(np.any(b != 0) for b in expected[2::2]):
            raise ModelError(f"channel {channel}'s target plane gives no gradient at any layer")
    return errors


def check_pairing(
    explain_bytes: bytes, model_session: Any, grid: Any, size: int, threshold: float
) -> None:
    """The explain graph's logits must give model.onnx's masks (same weights), every channel.

    Raises:
        ModelError: the logits' shapes differ, or fewer than 99.9 % equal mask pixels on up to
            4 slices (or noise).
    """
    import onnxruntime as ort

    if grid is not None:
        images = grid.images[:4, None]
    else:
        images = np.random.default_rng(1).random((2, 1, size, size), dtype=np.float32)
    session = ort.InferenceSession(explain_bytes, providers=["CPUExecutionProvider"])
    theirs = model_session.run(["logits"], {"image": np.ascontiguousarray(images)})[0]
    planes = session.get_inputs()[1].shape[1]
    ours = run_explain(session, images, np.zeros((len(images), planes, size, size)))[0]
    if ours.shape != theirs.shape:
        raise ModelError(
            f"the explain graph's logits are {ours.shape} but model.onnx's {theirs.shape}"
        )
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


def fp16_cam_inputs(
    grid: Any, size: int, channel: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[2, 1, S, S]`` and targets ``[2, C, S, S]`` explaining channel ``channel``.

    The (up to) 2 slices with the most pixels of class ``channel`` (its mask in plane
    ``channel``), or seeded noise with a disc where no slice has that class.
    """
    if grid is not None:
        masks = class_mask(grid.masks, channel)
        area = masks.reshape(len(masks), -1).sum(1, dtype=np.int64)
        order = np.argsort(-area, kind="stable")[:2]
        order = order[area[order] > 0]
        if order.size:
            targets = plane_targets(masks[order].astype(np.float32), channel, channels)
            return grid.images[order, None], targets
    images = np.random.default_rng(2).random((2, 1, size, size), dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (size / 6) ** 2).astype(np.float32)
    return images, plane_targets(np.stack([disc, disc]), channel, channels)


def fp16_cam_diff(
    fp16_bytes: bytes,
    fp32_bytes: bytes,
    layers: Sequence[str],
    grid: Any,
    size: int,
    *,
    channels: int = 1,
) -> dict[str, float]:
    """Max |CAM fp16 - CAM fp32| per layer over the channels (:func:`fp16_cam_inputs` each)."""
    import onnxruntime as ort

    sessions = [
        ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        for blob in (fp16_bytes, fp32_bytes)
    ]
    diff = dict.fromkeys(layers, 0.0)
    for channel in range(channels):
        images, targets = fp16_cam_inputs(grid, size, channel, channels)
        cams = [
            cams_from_outputs(run_explain(session, images, targets), layers, size)
            for session in sessions
        ]
        for layer in layers:
            diff[layer] = max(diff[layer], float(np.max(np.abs(cams[0][layer] - cams[1][layer]))))
    return diff
