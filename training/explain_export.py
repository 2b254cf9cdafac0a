"""Export the explain graph ``explain.onnx``: GradCAM++ inputs computed by ONNX Runtime alone.

Contract (read by ``ggo_cli.onnx.explain_graph``; written next to the paired ``model.onnx``):

- inputs ``image`` float32 ``[N, 1, S, S]`` (preprocessed as for model.onnx) and ``target``
  float32 ``[N, C, S, S]`` with C the model's number of output channels (static in the graph:
  the runtime reads it from the input's shape): one plane per channel, the explanation target.
  To explain class k, plane k holds the binary mask of class k on the model grid and the other
  planes are zero (channel 0 is GGO, channel 1 consolidation in a two-class model);
- outputs, in order: ``logits`` ``[N, C, S, S]``, then per exported layer ``L`` (the order of
  the metadata's ``layers``) ``activations.L`` ``[N, K, h, w]`` and ``gradients.L``
  ``[N, K, h, w]`` = dScore/dA with Score_n = sum over channels c and pixels of
  sigmoid(logits[n, c]) * target[n, c] (the metadata's ``score``: SCORE); samples are
  independent in eval mode, so sample n's gradient depends on sample n only. For a one-channel
  model (C = 1) this is sum(sigmoid(logits[:, 0]) * target), as before issue 20;
- dynamic batch axis ``N``;
- ``metadata_props`` key ``ggo_cli_explain``: JSON with ``model_sha256`` (the ``sha256`` of the
  paired model.onnx's ``ggo_cli`` metadata), ``layers``, ``default_layer``, ``score``,
  ``sha256`` (graph digest as in :func:`ggo_cli.onnx.model_info.graph_sha256`) and ``faithfulness``.

How the graph is traced and exported (STYLE.md section 12): :mod:`training.explain_trace`. The
gradients are checked against float64 PyTorch autograd, once per output channel with only that
channel's target plane set (:mod:`training.explain_checks`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ggo_cli.errors import InputError, ModelError, OutputError

from .checkpoints import load_checkpoint, model_from_checkpoint
from .explain_trace import (
    EXPLAIN_NAME,
    OPSET,
    TRACE_BATCH,
    explain_function,
    export_explain_proto,
    output_channels,
    output_names,
    prepare_model,
    reference_outputs,
    rewrite_convolution_backward,
    run_explain,
    trace_explain,
)

__all__ = [
    "EXPLAIN_LAYERS",
    "EXPLAIN_NAME",
    "FALLBACK_DEFAULT_LAYER",
    "FP16_CAM_TOLERANCE",
    "GRADIENT_TOLERANCE",
    "METADATA_KEY",
    "OPSET",
    "SCORE",
    "TRACE_BATCH",
    "ExplainResult",
    "explain_function",
    "export_explain",
    "export_explain_proto",
    "output_channels",
    "output_names",
    "prepare_model",
    "reference_outputs",
    "rewrite_convolution_backward",
    "run_explain",
    "trace_explain",
    "update_model_folder",
]

log = logging.getLogger(__name__)

METADATA_KEY = "ggo_cli_explain"
SCORE = "sum(sigmoid(logits) * target)"
GRADIENT_TOLERANCE = 1e-4
"""Largest allowed max|ORT - float64 autograd| / max|autograd| per output."""
FP16_CAM_TOLERANCE = 0.02
"""Largest allowed max |CAM(fp16 weights) - CAM(fp32)| of normalised CAMs (in [0, 1])."""

EXPLAIN_LAYERS: dict[str, tuple[str, ...]] = {
    "resnet50-unet": ("encoder.layer3", "decoder.0", "decoder.1", "decoder.2", "decoder.3"),
    "densenet121-unet": (
        "encoder.features.denseblock3",
        "decoder.0",
        "decoder.1",
        "decoder.2",
        "decoder.3",
    ),
    "unet": ("down.3", "dec.0", "dec.1", "dec.2", "dec.3"),
}
"""Candidate layers per architecture: the encoder's last stage and each decoder block."""
FALLBACK_DEFAULT_LAYER = "decoder.2"
"""Default layer when faithfulness cannot be measured (no data); first-choice if present."""


@dataclass(frozen=True, slots=True)
class ExplainResult:
    """What export_explain wrote and measured.

    Attributes:
        path: the explain graph.
        layers: exported layer names.
        default_layer: the chosen default layer.
        gradient_errors: relative max error per output vs float64 autograd (float32 graph).
        fp16_cam_diff: max |CAM fp16 - CAM fp32| per layer (empty without --fp16-weights).
        faithfulness: the faithfulness record (see :mod:`training.faithfulness`).
        size_bytes: file size.
        sha256: graph digest.
    """

    path: Path
    layers: tuple[str, ...]
    default_layer: str
    gradient_errors: dict[str, float]
    fp16_cam_diff: dict[str, float]
    faithfulness: dict[str, Any]
    size_bytes: int
    sha256: str


def export_explain(
    checkpoint_path: Path,
    model_path: Path,
    out_path: Path,
    *,
    fp16_weights: bool = False,
    data: Path | None = None,
    layers: Sequence[str] | None = None,
    max_slices: int | None = None,
    update_card: bool = True,
) -> ExplainResult:
    """Export ``explain.onnx`` for a checkpoint, paired with its exported ``model.onnx``.

    Args:
        checkpoint_path: the checkpoint model.onnx was exported from.
        model_path: the paired model.onnx (its metadata digest and threshold are used).
        out_path: where to write the explain graph.
        fp16_weights: store weights as float16 (checked: CAMs move by < FP16_CAM_TOLERANCE).
        data: labelled slices for the faithfulness measurement (default: the checkpoint's
            recorded data path); without data the default layer is FALLBACK_DEFAULT_LAYER.
        layers: layers to export (default: EXPLAIN_LAYERS of the architecture).
        max_slices: use at most this many slices for faithfulness (default all).
        update_card: add the ``explain`` entry to model.json and rewrite SHA256SUMS beside it.

    Returns:
        The export result.

    Raises:
        InputError: unreadable checkpoint, model or data; unknown layer.
        ModelError: gradient check or fp16 check failed, or checkpoint and model do not pair.
        OutputError: the files cannot be written.
    """
    import onnx
    import onnxruntime as ort

    from ggo_cli.onnx.model_info import graph_sha256, load_model_info

    from .explain_checks import check_pairing, fp16_cam_diff, gradient_errors
    from .export import cast_initializers_fp16
    from .faithfulness import FAITHFULNESS_TARGET, measure_faithfulness, model_grid_slices
    from .multiclass import class_values

    info = load_model_info(model_path)
    checkpoint = load_checkpoint(checkpoint_path)
    model, config = model_from_checkpoint(checkpoint, "cpu")
    if config.size != info.input_size:
        raise ModelError(
            f"{model_path} takes {info.input_size} px but the checkpoint {config.size}"
        )
    layers = tuple(layers or EXPLAIN_LAYERS.get(config.arch, ()))
    if not layers:
        raise InputError(f"no explain layers known for {config.arch}; pass layers")
    channels = config.out_channels
    proto = export_explain_proto(model, layers, config.size, channels=channels)
    fp32_bytes = proto.SerializeToString()
    errors = gradient_errors(fp32_bytes, model, layers, config.size, channels=channels)
    worst = max(errors.values())
    log.info("explain graph vs float64 autograd: max relative error %.3g", worst)
    if worst > GRADIENT_TOLERANCE:
        raise ModelError(
            f"explain graph differs from autograd by {worst:.3g} (> {GRADIENT_TOLERANCE}): "
            + ", ".join(f"{k} {v:.2g}" for k, v in errors.items())
        )

    data_path = data if data is not None else (Path(config.data) if config.data else None)
    grid = None
    if data_path is not None and data_path.exists():
        labels = class_values(config.classes, config.label) if channels > 1 else None
        grid = model_grid_slices(data_path, config.size, max_slices=max_slices, labels=labels)
    model_session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    check_pairing(fp32_bytes, model_session, grid, config.size, info.threshold)

    fp16_diff: dict[str, float] = {}
    if fp16_weights:
        cast_initializers_fp16(proto, keep_per_channel=True)
        fp16_diff = fp16_cam_diff(
            proto.SerializeToString(), fp32_bytes, layers, grid, config.size, channels=channels
        )
        log.info("float16 vs float32 weights: max |CAM diff| %s", fp16_diff)
        if max(fp16_diff.values()) > FP16_CAM_TOLERANCE:
            raise ModelError(
                f"float16 weights move the CAM by {max(fp16_diff.values()):.3g} "
                f"(> {FP16_CAM_TOLERANCE}); export without --fp16-weights"
            )
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    if grid is not None:
        faith = measure_faithfulness(session, model_session, grid, layers, threshold=info.threshold)
        default_layer = str(faith["best_layer"])
    else:
        log.warning("no data at %s: faithfulness not measured", data_path)
        faith = {"measured": False, "target": FAITHFULNESS_TARGET}
        default_layer = FALLBACK_DEFAULT_LAYER if FALLBACK_DEFAULT_LAYER in layers else layers[-1]

    digest = graph_sha256(proto.graph.SerializeToString(deterministic=True))
    meta = {
        "model_sha256": info.recorded_sha256,
        "layers": list(layers),
        "default_layer": default_layer,
        "score": SCORE,
        "sha256": digest,
        "faithfulness": faith,
        "gradient_check": {
            "reference": (
                "float64 PyTorch autograd, batch 1, seeded random image; one random 0/1 target "
                "per output channel with only that channel's plane set"
            ),
            "max_relative_error": worst,
            "per_output": errors,
        },
        "weights": "float16 initializers cast to float32" if fp16_weights else "float32",
        "fp16_max_abs_cam_diff": fp16_diff,
        "opset": OPSET,
    }
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(tmp))
        os.replace(tmp, out_path)
    except OSError as exc:
        raise OutputError(f"cannot write {out_path}: {exc}") from exc
    check = graph_sha256(onnx.load(str(out_path)).graph.SerializeToString(deterministic=True))
    if check != digest:
        raise ModelError(f"{out_path}: graph digest changed on reload ({check} != {digest})")
    if update_card:
        update_model_folder(out_path.parent, out_path, meta)
    return ExplainResult(
        path=out_path,
        layers=layers,
        default_layer=default_layer,
        gradient_errors=errors,
        fp16_cam_diff=fp16_diff,
        faithfulness=faith,
        size_bytes=out_path.stat().st_size,
        sha256=digest,
    )


def update_model_folder(folder: Path, explain_path: Path, meta: Mapping[str, Any]) -> None:
    """Add the ``explain`` entry to ``model.json`` and list explain.onnx in ``SHA256SUMS``."""
    from ggo_cli.onnx.model_info import file_sha256

    from .export import CARD_NAME, _write_text, write_sums

    card_path = folder / CARD_NAME
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {card_path}: {exc}") from exc
        card["explain"] = {
            "file": explain_path.name,
            "sha256": meta["sha256"],
            "sha256_file": file_sha256(explain_path),
            "model_sha256": meta["model_sha256"],
            "layers": meta["layers"],
            "default_layer": meta["default_layer"],
            "score": meta["score"],
            "method": "GradCAM++ (Chattopadhyay et al. 2018, eq. 19)",
        }
        _write_text(card_path, json.dumps(card, indent=2) + "\n")
    write_sums(folder)
