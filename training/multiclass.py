"""Several classes (GGO, consolidation): class maps, per-class metrics and bootstrap intervals.

A multi-class mask is a uint8 **class map**: 0 background, ``k + 1`` for class ``k`` in the
order of ``--classes`` (GGO first, so channel 0 stays GGO as the model contract requires). A
one-class mask is the bool GGO mask, which is the same map with one class. Each output channel
is an independent sigmoid probability; a pixel belongs to class ``k`` when channel ``k``'s
probability exceeds the model's threshold (the same threshold for every channel).

Bootstrap intervals (:func:`bootstrap_dice`): the test slices are resampled with replacement
(``n_boot`` times, a seeded ``numpy.random.default_rng``), the pooled Dice is recomputed from the
resampled slices' summed counts, and the 2.5 and 97.5 percentiles are reported. Resampling
slices, not pixels, keeps the pixels of one slice together (they are not independent); with
about ten test slices the interval is wide, and slices of one patient are still counted as
independent.

numpy only (used by ``evaluate`` on machines without torch).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .config import CLASS_LABELS
from .metrics import Confusion, SegMetrics, confusion, summarize

N_BOOT = 2000
BOOT_SEED = 0
BOOT_LEVEL = 0.95


def class_values(classes: Sequence[str], ggo_label: int = 1) -> tuple[int, ...]:
    """The mask value of each class: GGO's is ``--label``, the others' :data:`CLASS_LABELS`."""
    return tuple(ggo_label if c == "ggo" else CLASS_LABELS[c] for c in classes)


def class_mask(mask: npt.NDArray[Any], k: int) -> npt.NDArray[np.bool_]:
    """The binary mask of class ``k`` from a bool mask or a class map.

    Args:
        mask: bool GGO mask or uint8 class map. Shape: any.
        k: class index (0 = GGO).

    Returns:
        bool mask. Shape: as ``mask``.
    """
    result: npt.NDArray[np.bool_] = np.asarray(mask == k + 1)
    return result


def one_hot(masks: npt.NDArray[Any], n_classes: int) -> npt.NDArray[np.uint8]:
    """Class maps ``(n, H, W)`` -> channel targets ``(n, C, H, W)`` (channel k = class k)."""
    return np.stack([class_mask(masks, k) for k in range(n_classes)], axis=1).astype(np.uint8)


def class_confusions(
    probs: npt.NDArray[np.float32], mask: npt.NDArray[Any], threshold: float
) -> list[Confusion]:
    """Per-class counts of one slice.

    Args:
        probs: probabilities per channel. Shape: ``(C, rows, cols)``.
        mask: the slice's bool mask or class map. Shape: ``(rows, cols)``.
        threshold: a pixel is class ``k`` when ``probs[k] > threshold``.

    Returns:
        One :class:`Confusion` per channel.
    """
    return [confusion(probs[k] > threshold, class_mask(mask, k)) for k in range(probs.shape[0])]


def bootstrap_dice(
    per_slice: Sequence[Confusion],
    *,
    n_boot: int = N_BOOT,
    seed: int = BOOT_SEED,
    level: float = BOOT_LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled Dice over slices (see the module docstring).

    Args:
        per_slice: one :class:`Confusion` per slice.
        n_boot: resamples.
        seed: seed of the resampling.
        level: coverage (0.95: the 2.5 and 97.5 percentiles).

    Returns:
        ``(low, high)``; ``(dice, dice)`` for fewer than two slices.
    """
    if len(per_slice) < 2:
        d = summarize(per_slice).dice
        return d, d
    counts = np.array([[c.tp, c.fp, c.fn] for c in per_slice], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_slice), size=(n_boot, len(per_slice)))
    sums = counts[idx].sum(axis=1)  # (n_boot, 3)
    den = 2 * sums[:, 0] + sums[:, 1] + sums[:, 2]
    dice = np.where(den > 0, 2 * sums[:, 0] / np.maximum(den, 1e-12), 1.0)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(dice, [tail, 100 - tail])
    return float(low), float(high)


def class_report(
    classes: Sequence[str],
    per_class: Sequence[Sequence[Confusion]],
    *,
    intervals: bool = False,
    seed: int = BOOT_SEED,
) -> dict[str, Any]:
    """The flat metrics of ``evaluate --json``.

    GGO (channel 0) keeps the contract keys (``dice``, ``dice_mean``, ``precision``, ``recall``,
    ``accuracy``, ``n_images``); every further class ``c`` adds ``c_dice``, ``c_dice_mean``,
    ``c_precision``, ``c_recall`` and ``c_accuracy``. With ``intervals``, ``dice_ci95`` and
    ``c_dice_ci95`` (``[low, high]``, the bootstrap interval of the pooled Dice) are added.

    Args:
        classes: class names, channel order (GGO first).
        per_class: per class, one :class:`Confusion` per slice.
        intervals: add the bootstrap intervals.
        seed: bootstrap seed.

    Returns:
        The JSON-ready dict.
    """
    report: dict[str, Any] = {}
    for k, (name, counts) in enumerate(zip(classes, per_class, strict=True)):
        prefix = "" if k == 0 else f"{name}_"
        for key, value in summarize(counts).to_dict().items():
            if k == 0 or key != "n_images":
                report[prefix + key] = value
        if intervals:
            report[prefix + "dice_ci95"] = list(bootstrap_dice(counts, seed=seed))
    return report


def summarize_classes(per_class: Iterable[Sequence[Confusion]]) -> list[SegMetrics]:
    """:func:`~training.metrics.summarize` of each class."""
    return [summarize(c) for c in per_class]


CONSOLIDATION_SCT = ("9656002", "SCT", "Consolidation")
"""SNOMED CT 9656002 |Consolidation (morphologic abnormality)|, the morphology HL7 FHIR's
BodyStructure example "right-lung-consolidation" codes a lung consolidation with (included
structure: lung, SCT 39607008); as a morphologic abnormality it pairs with the category SCT
49755003 |Morphologically abnormal structure|, as GGO's DCM 112120 does."""


def segment_metadata(classes: Sequence[str]) -> list[dict[str, Any]]:
    """The model contract's ``segments``, one per class in channel order (GGO first).

    Raises:
        KeyError: a class without codes.
    """
    from pydicom.sr.codedict import codes  # deferred: pydicom is not on every GPU machine
    from pydicom.sr.coding import Code

    from ggo_cli.onnx.model_info import code_to_json

    category = code_to_json(codes.SCT.MorphologicallyAbnormalStructure)
    types = {
        "ggo": ("Ground glass opacity", codes.DCM.GroundGlassOpacity),
        "consolidation": ("Consolidation", Code(*CONSOLIDATION_SCT)),
    }
    return [
        {
            "label": types[c][0],
            "property_category": category,
            "property_type": code_to_json(types[c][1]),
        }
        for c in classes
    ]


def per_class_metrics(
    classes: Sequence[str], class_counts: dict[str, list[list[Confusion]]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Class -> split -> metrics with ``dice_ci95`` (bootstrap over the split's slices)."""
    return {
        c: {
            split: {
                **summarize(counts[k]).to_dict(),
                "dice_ci95": list(bootstrap_dice(counts[k])),
            }
            for split, counts in class_counts.items()
        }
        for k, c in enumerate(classes)
    }
