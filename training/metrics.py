"""Pixel-level metrics of the paper: Dice, Precision, Recall, Accuracy (numpy only).

Two aggregations over a split, both reported:

- **pooled** (``dice``, ``precision``, ``recall``, ``accuracy``): TP, FP, FN and TN are summed
  over all pixels of all slices first, then the ratio is taken; large lesions weigh more.
- **mean over slices** (``dice_mean``): Dice per slice, then the plain mean; every slice counts
  once, so small lesions and empty slices weigh as much as large ones.

Empty cases: a ratio whose denominator is 0 is defined as 1.0. For Dice that means a slice
with no GGO in the ground truth and none predicted scores 1 (a correct "nothing here"); for
Precision, no positive prediction scores 1 (no false positives); for Recall, no positive
ground truth scores 1 (nothing missed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Confusion:
    """Pixel counts of one slice or of a pooled set.

    Attributes:
        tp: true positives.
        fp: false positives.
        fn: false negatives.
        tn: true negatives.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: Confusion) -> Confusion:
        """Sum counts (pooling)."""
        return Confusion(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn
        )

    @property
    def dice(self) -> float:
        """``2TP / (2TP + FP + FN)``; 1.0 when both masks are empty."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def precision(self) -> float:
        """``TP / (TP + FP)``; 1.0 when nothing is predicted."""
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        """``TP / (TP + FN)``; 1.0 when the ground truth is empty."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def accuracy(self) -> float:
        """``(TP + TN) / all``; 1.0 for zero pixels."""
        return _ratio(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn)


def _ratio(num: int, den: int) -> float:
    """``num / den``, defined as 1.0 when ``den`` is 0 (see the module docstring)."""
    return 1.0 if den == 0 else num / den


def confusion(pred: npt.NDArray[np.bool_], target: npt.NDArray[np.bool_]) -> Confusion:
    """Count TP, FP, FN, TN between a predicted and a true binary mask.

    Args:
        pred: predicted mask. Shape: any, equal to ``target``'s.
        target: ground-truth mask.

    Returns:
        The counts.

    Raises:
        ValueError: if the shapes differ.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    p = pred.astype(bool, copy=False)
    g = target.astype(bool, copy=False)
    tp = int(np.count_nonzero(p & g))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(g)) - tp
    return Confusion(tp, fp, fn, int(p.size) - tp - fp - fn)


@dataclass(frozen=True, slots=True)
class SegMetrics:
    """Metrics of a set of slices.

    Attributes:
        dice: pooled Dice (counts summed over all slices first).
        dice_mean: mean of the per-slice Dice (empty ground truth and prediction = 1).
        precision: pooled precision.
        recall: pooled recall.
        accuracy: pooled pixel accuracy.
        n_images: number of slices.
    """

    dice: float
    dice_mean: float
    precision: float
    recall: float
    accuracy: float
    n_images: int

    def to_dict(self) -> dict[str, float | int]:
        """Return the metrics as a JSON-ready dict (evaluate's ``--json`` keys)."""
        return asdict(self)


def summarize(per_slice: Iterable[Confusion]) -> SegMetrics:
    """Aggregate per-slice counts into pooled and mean-over-slices metrics.

    Args:
        per_slice: one :class:`Confusion` per slice.

    Returns:
        The metrics; all ratios 1.0 and ``n_images`` 0 for an empty input.
    """
    items = list(per_slice)
    pooled = sum(items, Confusion())
    dice_mean = float(np.mean([c.dice for c in items])) if items else 1.0
    return SegMetrics(
        dice=pooled.dice,
        dice_mean=dice_mean,
        precision=pooled.precision,
        recall=pooled.recall,
        accuracy=pooled.accuracy,
        n_images=len(items),
    )
