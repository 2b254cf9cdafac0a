"""Export a checkpoint to a self-describing ONNX model (STYLE.md section 9).

In order: (1) ``torch.onnx.export`` (opset 17, input ``image`` [N, 1, S, S] float32, output
``logits`` [N, C, S, S], dynamic batch); optionally float16 initializers with in-graph casts to
float32; (2) ``onnx.checker``; (3) ONNX Runtime parity with PyTorch at a batch size other than
the export's (rtol 1e-3, atol 1e-4; for float16 weights against the same fp16-rounded weights,
plus agreement of the binary masks with the float32 model, >= 99.9 %); (4) the threshold chosen
on the validation split and per-split metrics, measured with the exported file itself; (5) the
``ggo_cli`` metadata via :func:`ggo_cli.onnx.model_info.stamp_metadata`, checked by
``load_model_info``; (6) the model card ``model.json`` and ``SHA256SUMS``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ggo_cli.errors import ModelError, OutputError

from .checkpoints import git_commit, load_checkpoint, model_from_checkpoint
from .config import ARCH_DISPLAY_NAMES, TrainConfig
from .data import load_slices
from .evaluate import OnnxPredictor, evaluate_splits
from .metrics import SegMetrics
from .multiclass import class_values, per_class_metrics, segment_metadata
from .splits import Split

log = logging.getLogger(__name__)

OPSET = 17
EXPORT_BATCH = 1
PARITY_BATCH = 2
PARITY_RTOL = 1e-3
PARITY_ATOL = 1e-4
FP16_MASK_AGREEMENT = 0.999
AGREEMENT_SLICES = 16
"""Slices on which float16 and float32 masks are compared (enough pixels, bounded time)."""
DEFAULT_VERSION = "1.0.0"
SIZE_LIMIT_BYTES = 100 * 1024 * 1024
MODEL_NAME = "model.onnx"
CARD_NAME = "model.json"
SUMS_NAME = "SHA256SUMS"

SHARED_TRAINING_DATA: dict[str, str] = {
    "name": "COVID-SemiSeg training slices (MedSeg COVID-19 CT segmentation dataset)",
    "source": (
        "Inf-Net (github.com/DengPingFan/Inf-Net, commit fb3a03b5), "
        "Dataset/TrainingSet/MultiClassInfection-Train; 8-bit display images, GGO = label 1"
    ),
    "licence": "research and non-commercial use only (Inf-Net / MedSeg)",
    "citation": (
        "Fan D.-P. et al., Inf-Net: Automatic COVID-19 Lung Infection Segmentation from CT "
        "Images, IEEE TMI 39(8), 2020; MedSeg COVID-19 CT segmentation dataset "
        "(medicalsegmentation.com/covid19)"
    ),
}


UNLABELED_TRAINING_DATA: dict[str, str] = {
    "name": "COVID-SemiSeg unlabelled slices (1600 slices of 20 COVID-19 CT volumes)",
    "source": (
        "Inf-Net (github.com/DengPingFan/Inf-Net, commit fb3a03b5), "
        "Dataset/TrainingSet/LungInfection-Train/Pseudo-label/Imgs (images only; pseudo-labels "
        "made by our own teacher)"
    ),
    "licence": (
        "research and non-commercial use only (COVID-SemiSeg; Radiopaedia cases CC BY-NC-SA 3.0)"
    ),
    "citation": (
        "Fan D.-P. et al., IEEE TMI 39(8), 2020; Ma J. et al., COVID-19 CT Lung and Infection "
        "Segmentation Dataset, Zenodo 2020"
    ),
}


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


def build_metadata(
    *,
    config: TrainConfig,
    checkpoint: Mapping[str, Any],
    name: str,
    version: str,
    threshold: float,
    metrics: Mapping[str, SegMetrics],
    val_search: Mapping[float, float],
    training_data: Mapping[str, str],
    fp16: bool,
    class_metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``ggo_cli`` metadata object of the model contract (without sha256).

    Args:
        config: the training configuration.
        checkpoint: the checkpoint (split, git commit, epochs).
        name: model name.
        version: model version.
        threshold: probability threshold.
        metrics: per-split metrics.
        val_search: validation pooled Dice per searched threshold.
        training_data: name, source, licence, citation of the data.
        fp16: whether weights are stored as float16.
        class_metrics: class -> split -> metrics with bootstrap intervals.

    Returns:
        The metadata dict.
    """
    if config.out_channels != len(config.classes):
        raise ModelError(
            f"the model has {config.out_channels} output channels for classes {config.classes}; "
            "export needs one channel per class"
        )
    semi = checkpoint.get("semi_supervised")
    return {
        "name": name,
        "version": version,
        "architecture": config.arch,
        "architecture_display": ARCH_DISPLAY_NAMES[config.arch],
        "input_size": config.size,
        "window_center": config.window_center,
        "window_width": config.window_width,
        "threshold": threshold,
        "threshold_rule": "probability > threshold, chosen on the validation split",
        "segments": segment_metadata(config.classes),
        "classes": list(config.classes),
        "training_data": {
            **training_data,
            "label": config.label,
            "class_labels": dict(
                zip(config.classes, class_values(config.classes, config.label), strict=True)
            ),
            "split": checkpoint["split"],
            **({"unlabeled": {**UNLABELED_TRAINING_DATA, **semi}} if semi else {}),
        },
        "metrics": {
            "definition": (
                "pixel level at each slice's own resolution; dice/precision/recall/accuracy "
                "pooled over the split, dice_mean = mean per-slice Dice (empty vs empty = 1)"
            ),
            **{k: v.to_dict() for k, v in metrics.items()},
            "per_class": dict(class_metrics or {}),
            "interval": (
                "dice_ci95: 2.5 and 97.5 percentiles of the pooled Dice over 2000 bootstrap "
                "resamples of the split's slices (numpy default_rng seed 0)"
            ),
            "val_threshold_search": {f"{t:.2f}": d for t, d in val_search.items()},
        },
        "training": {
            "loss": config.loss,
            "epochs_run": int(checkpoint.get("epoch", 0)),
            "best_epoch": int(checkpoint.get("best_epoch", 0)),
            "best_val_dice_model_grid": float(checkpoint.get("best_val_dice", 0.0)),
            "batch_size": config.batch_size,
            "lr": config.lr,
            "seed": config.seed,
            "pretrained": config.pretrained,
        },
        "weights": "float16 initializers cast to float32" if fp16 else "float32",
        "opset": OPSET,
        "git_commit": checkpoint.get("git_commit", "unknown"),
        "export_git_commit": git_commit(),
    }


def model_card(meta: Mapping[str, Any], file_sha256: str) -> dict[str, Any]:
    """The ``model.json`` model card (intended use, data licence, metrics, limitations)."""
    return {
        "name": meta["name"],
        "version": meta["version"],
        "architecture": meta["architecture_display"],
        "intended_use": (
            "Research: segmentation of "
            + " and ".join(s["label"].lower() for s in meta["segments"])
            + " on axial chest CT slices (lung window, 2-D per slice; one sigmoid channel per "
            "class, channel 0 ground-glass opacity), for volumetry and method comparison."
        ),
        "not_intended_for": (
            "Clinical diagnosis or treatment decisions; it is not a medical device. Not for "
            "commercial use: the training data are licensed for research and non-commercial "
            "use only."
        ),
        "training_data": meta["training_data"],
        "input": {
            "name": "image",
            "shape": ["N", 1, meta["input_size"], meta["input_size"]],
            "window_center_hu": meta["window_center"],
            "window_width_hu": meta["window_width"],
        },
        "output": {
            "name": "logits",
            "channels": [s["label"] for s in meta["segments"]],
            "threshold": meta["threshold"],
        },
        "metrics": meta["metrics"],
        "limitations": [
            "Trained on few slices (COVID-19 pneumonia, mostly one data source); performance "
            "on other diseases, scanners, kernels and slice thicknesses is unknown.",
            "Training images were 8-bit display renderings (window about W1300/L-480), not "
            "Hounsfield units; intensity augmentation bridges to the W1500/L-600 inference "
            "window, but results on real DICOM must be checked locally.",
            "Slice-wise 2-D model: no 3-D context; GGO versus consolidation boundaries are "
            "uncertain at the pixel level.",
            "Test-split metrics come from a handful of slices; their uncertainty is large.",
        ],
        "git_commit": meta["git_commit"],
        "sha256_graph": meta["sha256"],
        "sha256_file": file_sha256,
    }


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


def _agreement_images(slices: Any, size: int) -> np.ndarray:
    """Model-grid images for the fp16 check: the data when known, else seeded noise."""
    from ggo_cli.analysis.preprocessing import to_model_grid

    if slices:
        return np.stack([to_model_grid(s.image_float(), size) for s in slices])
    return np.random.default_rng(0).random((PARITY_BATCH, size, size), dtype=np.float32)


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
