"""Export a checkpoint to a self-describing ONNX model (STYLE.md section 9).

In order: (1) ``torch.onnx.export`` (opset 17, input ``image`` [N, 1, S, S] float32, output
``logits`` [N, C, S, S], dynamic batch); optionally float16 initializers with in-graph casts to
float32; (2) ``onnx.checker``; (3) ONNX Runtime parity with PyTorch at a batch size other than
the export's (rtol 1e-3, atol 1e-4; for float16 weights against the same fp16-rounded weights,
plus agreement of the binary masks with the float32 model, >= 99.9 %); (4) the threshold chosen
on the validation split and per-split metrics, measured with the exported file itself; (5) the
``ggo_cli`` metadata via :func:`ggo_cli.onnx.model_info.stamp_metadata`, checked by
``load_model_info``; (6) the model card ``model.json`` and ``SHA256SUMS``. Steps 1 to 3 are in
:mod:`training.onnx_export`, the metadata and the card in :mod:`training.model_card`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ggo_cli.errors import ModelError, OutputError

from .checkpoints import load_checkpoint, model_from_checkpoint
from .data import load_slices
from .evaluate import OnnxPredictor, evaluate_splits
from .metrics import SegMetrics
from .model_card import (
    SHARED_TRAINING_DATA,
    UNLABELED_TRAINING_DATA,
    build_metadata,
    model_card,
)
from .multiclass import class_values, per_class_metrics
from .onnx_export import (
    EXPORT_BATCH,
    OPSET,
    PARITY_ATOL,
    PARITY_BATCH,
    PARITY_RTOL,
    _agreement_images,
    _export_onnx,
    _mask_agreement,
    _parity,
    cast_initializers_fp16,
)
from .splits import Split

__all__ = [
    "AGREEMENT_SLICES",
    "CARD_NAME",
    "DEFAULT_VERSION",
    "EXPORT_BATCH",
    "FP16_MASK_AGREEMENT",
    "MODEL_NAME",
    "OPSET",
    "PARITY_ATOL",
    "PARITY_BATCH",
    "PARITY_RTOL",
    "SHARED_TRAINING_DATA",
    "SIZE_LIMIT_BYTES",
    "SUMS_NAME",
    "UNLABELED_TRAINING_DATA",
    "ExportResult",
    "build_metadata",
    "cast_initializers_fp16",
    "export_checkpoint",
    "model_card",
    "write_sums",
]

log = logging.getLogger(__name__)

FP16_MASK_AGREEMENT = 0.999
AGREEMENT_SLICES = 16
"""Slices on which float16 and float32 masks are compared (enough pixels, bounded time)."""
DEFAULT_VERSION = "1.0.0"
SIZE_LIMIT_BYTES = 100 * 1024 * 1024
MODEL_NAME = "model.onnx"
CARD_NAME = "model.json"
SUMS_NAME = "SHA256SUMS"


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What an export wrote and measured.

    Attributes:
        model_path: the ONNX file.
        card_path: the model card.
        threshold: the recorded threshold.
        metrics: per-split metrics (empty without data).
        parity_max_abs: largest |ORT - PyTorch| logit difference in the parity check.
        mask_agreement: fraction of equal mask pixels, float16 weights vs float32 (1.0 for fp32).
        size_bytes: size of the ONNX file.
    """

    model_path: Path
    card_path: Path
    threshold: float
    metrics: dict[str, SegMetrics]
    parity_max_abs: float
    mask_agreement: float
    size_bytes: int


def export_checkpoint(
    checkpoint_path: Path,
    out_dir: Path,
    *,
    data: Path | None = None,
    fp16_weights: bool = False,
    name: str | None = None,
    version: str = DEFAULT_VERSION,
    threshold: float | None = None,
    training_data: Mapping[str, str] | None = None,
) -> ExportResult:
    """Export a checkpoint to ``out_dir/{model.onnx, model.json, SHA256SUMS}``.

    Args:
        checkpoint_path: ``best.pt`` (or ``best_fp16.pt``, or a run folder).
        out_dir: the model folder, e.g. ``exported_models/ggo-resnet50-unet``.
        data: the data of the checkpoint's split (default: the path in its config); without
            it, no metrics and threshold 0.5 unless ``threshold`` is given.
        fp16_weights: store weights as float16 (half the size).
        name: model name (default ``ggo-<arch>``).
        version: model version.
        threshold: fixed threshold instead of the validation search.
        training_data: name/source/licence/citation (default: the shared COVID-SemiSeg set).

    Returns:
        The export result.

    Raises:
        InputError: unreadable checkpoint or data.
        ModelError: checker or parity failure, or metadata the contract rejects.
        OutputError: the files cannot be written.
    """
    import onnx

    from ggo_cli.onnx.model_info import file_sha256, load_model_info, stamp_metadata

    checkpoint = load_checkpoint(checkpoint_path)
    model, config = model_from_checkpoint(checkpoint, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / MODEL_NAME
        _export_onnx(model, config.size, raw)
        proto = onnx.load(str(raw))
    onnx.checker.check_model(proto)
    # Strict parity on the float32 graph; float16 storage is then judged by its masks.
    fp32_bytes = proto.SerializeToString()
    parity = _parity(fp32_bytes, model, config.size)
    log.info("ORT parity at batch %d: max |diff| %.3g", PARITY_BATCH, parity)
    if fp16_weights:
        converted = cast_initializers_fp16(proto)
        log.info("stored %d initializers as float16", converted)

    tmp_path = out_dir / (MODEL_NAME + ".tmp")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(tmp_path))
    except OSError as exc:
        raise OutputError(f"cannot write into {out_dir}: {exc}") from exc

    metrics: dict[str, SegMetrics] = {}
    class_metrics: dict[str, Any] = {}
    search: dict[float, float] = {}
    data_path = data if data is not None else (Path(config.data) if config.data else None)
    slices = None
    if data_path is not None and data_path.exists():
        slices = load_slices(
            data_path,
            label=config.label,
            window_center=config.window_center,
            window_width=config.window_width,
            labels=class_values(config.classes, config.label) if len(config.classes) > 1 else None,
        )
        import onnxruntime as ort

        provisional = OnnxPredictor(
            ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]),
            input_size=config.size,
            threshold=0.5,
            window_center=config.window_center,
            window_width=config.window_width,
        )
        provisional.classes = config.classes
        evaluation = evaluate_splits(
            provisional, slices, Split.from_dict(dict(checkpoint["split"])), threshold=threshold
        )
        threshold, metrics, search = evaluation.threshold, evaluation.metrics, evaluation.val_search
        class_metrics = per_class_metrics(config.classes, evaluation.class_counts or {})
        log.info("threshold %.2f; test pooled Dice %.4f", threshold, metrics["test"].dice)
    elif threshold is None:
        log.warning("no data at %s: threshold 0.5 and no metrics recorded", data_path)
        threshold = 0.5
    agreement, fp16_diff = 1.0, 0.0
    if fp16_weights:
        images = _agreement_images(slices[:AGREEMENT_SLICES] if slices else None, config.size)
        agreement, fp16_diff = _mask_agreement(
            proto.SerializeToString(), fp32_bytes, images, threshold
        )
        if agreement < FP16_MASK_AGREEMENT:
            raise ModelError(
                f"float16 weights change {100 * (1 - agreement):.3f} % of mask pixels "
                f"(> {100 * (1 - FP16_MASK_AGREEMENT):.1f} %); export without --fp16-weights"
            )
        log.info(
            "float16 vs float32: masks agree on %.5f of pixels, max |logit diff| %.3g",
            agreement,
            fp16_diff,
        )

    meta = build_metadata(
        config=config,
        checkpoint=checkpoint,
        name=name or f"ggo-{config.arch}",
        version=version,
        threshold=float(threshold),
        metrics=metrics,
        val_search=search,
        training_data=training_data or SHARED_TRAINING_DATA,
        fp16=fp16_weights,
        class_metrics=class_metrics,
    )
    meta["parity"] = {
        "batch": PARITY_BATCH,
        "max_abs_diff_fp32": parity,
        "fp16_max_abs_logit_diff": fp16_diff,
        "fp16_mask_agreement": agreement,
    }
    stamped = stamp_metadata(proto, meta)
    model_path = out_dir / MODEL_NAME
    try:
        onnx.save(proto, str(tmp_path))
        os.replace(tmp_path, model_path)
    except OSError as exc:
        raise OutputError(f"cannot write {model_path}: {exc}") from exc
    info = load_model_info(model_path)  # the contract reader must accept what we wrote
    card = model_card(stamped, info.file_sha256)
    card_path = out_dir / CARD_NAME
    _write_text(card_path, json.dumps(card, indent=2) + "\n")
    sums = "".join(f"{file_sha256(out_dir / n)}  {n}\n" for n in (MODEL_NAME, CARD_NAME))
    _write_text(out_dir / SUMS_NAME, sums)
    size = model_path.stat().st_size
    total = sum(p.stat().st_size for p in out_dir.parent.rglob("*") if p.is_file())
    if total > SIZE_LIMIT_BYTES:
        log.warning("%s holds %.1f MB (> 100 MB); use --fp16-weights", out_dir.parent, total / 1e6)
    return ExportResult(
        model_path=model_path,
        card_path=card_path,
        threshold=float(threshold),
        metrics=metrics,
        parity_max_abs=parity,
        mask_agreement=agreement,
        size_bytes=size,
    )


def write_sums(folder: Path) -> None:
    """Write ``SHA256SUMS`` of the model folder's files that exist (model, card, explain
    graph, int8 recipes, reference slices), atomically."""
    from ggo_cli.onnx.explain_graph import EXPLAIN_NAME
    from ggo_cli.onnx.int8_recipes import INT8_SPEC_NAME
    from ggo_cli.onnx.model_info import file_sha256
    from ggo_cli.onnx.reference_slices import REFERENCE_SET_NAME

    listed = (MODEL_NAME, CARD_NAME, EXPLAIN_NAME, INT8_SPEC_NAME, REFERENCE_SET_NAME)
    names = [n for n in listed if (folder / n).is_file()]
    _write_text(folder / SUMS_NAME, "".join(f"{file_sha256(folder / n)}  {n}\n" for n in names))


def _write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc
