"""Evaluate an ONNX model or a training checkpoint exactly as inference runs it.

Per slice: the windowed image (``pixel / 255`` for display images, ``window_hu`` for DICOM and
NIfTI, with the model's window) is letterboxed and resized bilinearly to the model's input size
(:func:`ggo_cli.analysis.preprocessing.to_model_grid`), the network gives logits, ``sigmoid`` gives
probabilities, which go back bilinearly onto the slice's own pixel grid
(:func:`~ggo_cli.analysis.preprocessing.to_source_grid`), and ``probability > threshold`` is
compared with
the ground truth there. Metrics are defined in :mod:`training.metrics`; the predictors (ONNX
Runtime, checkpoint) in :mod:`training.predictors`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ggo_cli.analysis.preprocessing import sigmoid, to_model_grid, to_source_grid
from ggo_cli.errors import InputError, ModelError

from .data import SourceSlice, load_slices
from .metrics import Confusion, SegMetrics, summarize
from .multiclass import class_confusions, class_report
from .predictors import (
    DEFAULT_THRESHOLD,
    FloatArray,
    OnnxPredictor,
    Predictor,
    TorchPredictor,
    make_predictor,
    predictor_classes,
)
from .splits import SPLIT_NAMES, Split, load_split

__all__ = [
    "BATCH",
    "DEFAULT_THRESHOLD",
    "THRESHOLD_GRID",
    "THRESHOLD_MIN_GAIN",
    "FloatArray",
    "OnnxPredictor",
    "Predictor",
    "SplitEvaluation",
    "TorchPredictor",
    "choose_threshold",
    "evaluate_classes",
    "evaluate_model",
    "evaluate_report",
    "evaluate_splits",
    "evaluate_thresholds",
    "make_predictor",
    "metrics_json",
    "predict_probabilities",
    "predictor_classes",
    "select_slices",
]

log = logging.getLogger(__name__)

THRESHOLD_GRID = tuple(round(0.20 + 0.05 * i, 2) for i in range(15))
"""Thresholds searched on the validation split: 0.20, 0.25, ..., 0.90."""
THRESHOLD_MIN_GAIN = 0.005
"""Validation pooled Dice a threshold must gain over 0.5 to be chosen."""
BATCH = 4


def predict_probabilities(
    predictor: Predictor, slices: Sequence[SourceSlice], channels: int = 1
) -> Iterable[FloatArray]:
    """Yield each slice's class probabilities on its own pixel grid.

    Args:
        predictor: the model.
        slices: the slices.
        channels: how many output channels (classes) to return; 1 gives GGO alone.

    Yields:
        float32 probabilities. Shape: ``(rows, cols)`` for one channel, else
        ``(channels, rows, cols)``.
    """
    size = predictor.input_size
    for start in range(0, len(slices), BATCH):
        chunk = slices[start : start + BATCH]
        batch = np.stack([to_model_grid(s.image_float(), size) for s in chunk])[:, None]
        logits = predictor.logits(batch)
        probs = sigmoid(logits[:, 0] if channels == 1 else logits[:, :channels])
        for s, p in zip(chunk, probs, strict=True):
            yield to_source_grid(p, s.mask.shape[0], s.mask.shape[1])


def evaluate_thresholds(
    predictor: Predictor, slices: Sequence[SourceSlice], thresholds: Sequence[float]
) -> dict[float, list[Confusion]]:
    """Per-slice confusion counts at several thresholds from one pass of the model.

    Args:
        predictor: the model.
        slices: the slices.
        thresholds: probability thresholds (a pixel is GGO when probability > threshold).

    Returns:
        ``threshold -> one Confusion per slice``.
    """
    per_threshold = evaluate_classes(predictor, slices, thresholds)
    return {t: per_class[0] for t, per_class in per_threshold.items()}


def evaluate_classes(
    predictor: Predictor,
    slices: Sequence[SourceSlice],
    thresholds: Sequence[float],
    channels: int = 1,
) -> dict[float, list[list[Confusion]]]:
    """Per-class, per-slice confusion counts at several thresholds from one pass.

    Args:
        predictor: the model.
        slices: the slices (bool GGO masks or class maps).
        thresholds: probability thresholds (the same for every channel).
        channels: classes to count (channel ``k`` against class ``k`` of the masks).

    Returns:
        ``threshold -> [class][slice] Confusion``.
    """
    result: dict[float, list[list[Confusion]]] = {
        t: [[] for _ in range(channels)] for t in thresholds
    }
    for s, prob in zip(slices, predict_probabilities(predictor, slices, channels), strict=True):
        probs = prob if channels > 1 else prob[None]
        for t in thresholds:
            for k, counts in enumerate(class_confusions(probs, s.mask, t)):
                result[t][k].append(counts)
    return result


def choose_threshold(per_threshold: dict[float, list[Confusion]]) -> float:
    """The threshold with the best pooled Dice, if it beats 0.5 by a margin; else 0.5.

    With few validation slices, differences of a fraction of a Dice point are noise (trained
    models give saturated probabilities, so the Dice curve is nearly flat); moving away from
    0.5 needs a gain of at least :data:`THRESHOLD_MIN_GAIN`.
    """
    dice = {t: summarize(c).dice for t, c in per_threshold.items()}
    best = max(dice, key=lambda t: (dice[t], -abs(t - DEFAULT_THRESHOLD)))
    if DEFAULT_THRESHOLD in dice and dice[best] - dice[DEFAULT_THRESHOLD] < THRESHOLD_MIN_GAIN:
        return DEFAULT_THRESHOLD
    return best


@dataclass(frozen=True, slots=True)
class SplitEvaluation:
    """Metrics of a model on every split, with the threshold chosen on validation.

    Attributes:
        threshold: the chosen (or given) threshold.
        metrics: split name -> metrics at that threshold.
        val_search: threshold -> validation pooled Dice (empty when the threshold was given).
        classes: the classes, channel order.
        class_counts: split name -> class -> per-slice counts at the threshold.
    """

    threshold: float
    metrics: dict[str, SegMetrics]
    val_search: dict[float, float]
    classes: tuple[str, ...] = ("ggo",)
    class_counts: dict[str, list[list[Confusion]]] | None = None

    def class_metrics(self, split: str) -> dict[str, SegMetrics]:
        """Class name -> metrics of one split."""
        counts = (self.class_counts or {}).get(split)
        if counts is None:
            return {self.classes[0]: self.metrics[split]}
        return {c: summarize(n) for c, n in zip(self.classes, counts, strict=True)}


def evaluate_splits(
    predictor: Predictor,
    slices: Sequence[SourceSlice],
    split: Split,
    *,
    threshold: float | None = None,
) -> SplitEvaluation:
    """Evaluate train/val/test; choose the threshold on val unless one is given.

    Args:
        predictor: the model.
        slices: all slices named by the split.
        split: the split.
        threshold: a fixed threshold, or None to search :data:`THRESHOLD_GRID` on val.

    Returns:
        The evaluation.

    Raises:
        InputError: the split names slices the data lacks.
    """
    by_id = {s.id: s for s in slices}
    thresholds = list(THRESHOLD_GRID) if threshold is None else [threshold]
    classes = predictor_classes(predictor)
    per_split: dict[str, dict[float, list[list[Confusion]]]] = {}
    for name in SPLIT_NAMES:
        ids = split.ids(name)
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise InputError(
                f"split {name} names {len(missing)} slices not in the data (e.g. {missing[:3]})"
            )
        per_split[name] = evaluate_classes(
            predictor, [by_id[i] for i in ids], thresholds, len(classes)
        )
    search: dict[float, float] = {}
    if threshold is None:
        if split.val:
            val_ggo = {t: c[0] for t, c in per_split["val"].items()}
            search = {t: summarize(c).dice for t, c in val_ggo.items()}
            threshold = choose_threshold(val_ggo)
        else:
            threshold = DEFAULT_THRESHOLD
    metrics: dict[str, SegMetrics] = {
        name: summarize(per_split[name][threshold][0]) for name in SPLIT_NAMES
    }
    return SplitEvaluation(
        threshold=threshold,
        metrics=metrics,
        val_search=search,
        classes=classes,
        class_counts={name: per_split[name][threshold] for name in SPLIT_NAMES},
    )


def select_slices(
    slices: Sequence[SourceSlice], split_name: str | None, split_file: Path | None
) -> list[SourceSlice]:
    """Keep only the slices of one split (all when ``split_name`` is None).

    Raises:
        InputError: a split name without a split file, or ids missing from the data.
    """
    if split_name is None:
        return list(slices)
    if split_file is None:
        raise InputError(f"--split {split_name} needs --split-file (a run's split.json)")
    wanted = load_split(split_file).ids(split_name)
    by_id = {s.id: s for s in slices}
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise InputError(
            f"split {split_name} of {split_file} names {len(missing)} slices not in the data "
            f"(e.g. {missing[:3]}); evaluate on the data the split was drawn from"
        )
    return [by_id[i] for i in wanted]


def evaluate_model(
    model: Path,
    data: Path,
    *,
    label: int = 1,
    split_name: str | None = None,
    split_file: Path | None = None,
    threshold: float | None = None,
    device: str = "cpu",
) -> SegMetrics:
    """Evaluate a model file's GGO channel on a data set.

    Args:
        model: ``model.onnx`` or a checkpoint / run folder.
        data: a folder in a supported layout or a packed ``.npz``.
        label: the GGO label value in the masks.
        split_name: evaluate only this split (``train``, ``val``, ``test``).
        split_file: the split.json that defines it.
        threshold: override the model's threshold.
        device: ``cpu`` or ``cuda[:N]``.

    Returns:
        The metrics.

    Raises:
        InputError: bad paths, split or data.
        ModelError: a model that breaks the contract, or a threshold outside (0, 1).
    """
    report = evaluate_report(
        model,
        data,
        label=label,
        split_name=split_name,
        split_file=split_file,
        threshold=threshold,
        device=device,
        ggo_only=True,
    )
    return SegMetrics(**{k: report[k] for k in SegMetrics.__dataclass_fields__})


def evaluate_report(
    model: Path,
    data: Path,
    *,
    label: int = 1,
    split_name: str | None = None,
    split_file: Path | None = None,
    threshold: float | None = None,
    device: str = "cpu",
    intervals: bool = False,
    ggo_only: bool = False,
) -> dict[str, Any]:
    """Evaluate every class of a model file (the ``evaluate`` command).

    Args:
        model: ``model.onnx`` or a checkpoint / run folder.
        data: a folder in a supported layout or a packed ``.npz`` (a two-class model needs
            data with both classes: the shared PNGs, or a file packed with ``--classes``).
        label: the GGO label value in the masks.
        split_name: evaluate only this split (``train``, ``val``, ``test``).
        split_file: the split.json that defines it.
        threshold: override the model's threshold.
        device: ``cpu`` or ``cuda[:N]``.
        intervals: add seeded bootstrap 95 % intervals of the pooled Dice per class.
        ggo_only: evaluate channel 0 alone.

    Returns:
        :func:`training.multiclass.class_report`'s keys.

    Raises:
        InputError: bad paths, split or data.
        ModelError: a model that breaks the contract, or a threshold outside (0, 1).
    """
    from .multiclass import class_values

    predictor = make_predictor(model, device)
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise ModelError(f"--threshold must be in (0, 1), got {threshold}")
    classes = ("ggo",) if ggo_only else predictor_classes(predictor)
    slices = load_slices(
        data,
        label=label,
        window_center=predictor.window_center,
        window_width=predictor.window_width,
        labels=class_values(classes, label) if len(classes) > 1 else None,
    )
    if len(classes) > 1 and not any(s.mask.dtype == np.uint8 for s in slices):
        raise InputError(
            f"{data} holds GGO masks only; a {len(classes)}-class model needs class maps "
            "(the shared PNGs, or `pack --classes`)"
        )
    chosen = select_slices(slices, split_name, split_file)
    t = predictor.threshold if threshold is None else threshold
    counts = evaluate_classes(predictor, chosen, [t], len(classes))[t]
    return class_report(classes, counts, intervals=intervals)


def metrics_json(metrics: SegMetrics) -> dict[str, Any]:
    """The ``--json`` object: dice (pooled), dice_mean, precision, recall, accuracy, n_images."""
    return metrics.to_dict()
