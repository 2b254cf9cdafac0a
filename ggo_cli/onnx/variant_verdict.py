"""What a model variant's self-check measures against float32, and its verdict.

:func:`compare_masks` compares the variant's GGO masks with float32's on the reference slices
(:mod:`ggo_cli.onnx.variant_check` runs both); :class:`CheckFigures` holds the agreement and
names the tolerances it breaks; :class:`VariantCheck` is the verdict recorded in the cache, the
manifest and ``ggo-cli info``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

MAX_GGO_CHANGE = 0.02
"""Largest relative change of the pooled GGO pixel count (the 2 % that issue 14 allows a
volume to move against float32)."""
MIN_POOLED_DICE = 0.95
"""Smallest pooled Dice of variant and float32 masks. The AVX2-safe S8S8 recipe gave 0.987, a
saturating one 0.892 (docs/benchmarks.md)."""
MIN_SLICE_DICE = 0.90
"""Smallest Dice on any slice with :data:`MIN_SLICE_PIXELS` GGO pixels (S8S8 worst 0.940)."""
MIN_SLICE_PIXELS = 500
"""Slices with fewer GGO pixels in both masks do not enter the per-slice test (a few pixels'
change would dominate their Dice)."""


@dataclass(frozen=True, slots=True)
class CheckFigures:
    """How a variant's GGO masks compare with float32's on the reference slices.

    Attributes:
        n_slices: reference slices.
        ggo_pixels_fp32: GGO pixels of the float32 model, all slices.
        ggo_pixels_variant: GGO pixels of the variant.
        ggo_change: ``variant / fp32 - 1`` (0 when both are 0).
        dice: pooled Dice of the two masks.
        worst_slice_dice: the lowest Dice among slices with enough GGO (1 if none).
        worst_slice: that slice's name.
        fp32_s_per_slice: float32's seconds per slice here (CPU; first batch included, so a
            rough figure: speeds are quoted from benchmarks).
        variant_s_per_slice: the variant's seconds per slice here.
    """

    n_slices: int
    ggo_pixels_fp32: int
    ggo_pixels_variant: int
    ggo_change: float
    dice: float
    worst_slice_dice: float
    worst_slice: str
    fp32_s_per_slice: float = math.nan
    variant_s_per_slice: float = math.nan

    def failures(self) -> list[str]:
        """Which tolerances are broken, in words (empty when the variant passes)."""
        broken = []
        if abs(self.ggo_change) > MAX_GGO_CHANGE:
            broken.append(f"GGO pixels {self.ggo_change:+.1%} (limit ±{MAX_GGO_CHANGE:.0%})")
        if self.dice < MIN_POOLED_DICE:
            broken.append(f"mask Dice {self.dice:.3f} (limit {MIN_POOLED_DICE})")
        if self.worst_slice_dice < MIN_SLICE_DICE:
            broken.append(
                f"Dice {self.worst_slice_dice:.3f} on slice {self.worst_slice} "
                f"(limit {MIN_SLICE_DICE})"
            )
        return broken

    def summary(self) -> str:
        """The figures in one phrase."""
        return (
            f"GGO pixels {self.ggo_change:+.2%} against float32, mask Dice {self.dice:.3f} "
            f"(worst slice {self.worst_slice_dice:.3f}) on {self.n_slices} reference slices"
        )


@dataclass(frozen=True, slots=True)
class VariantCheck:
    """The verdict of a variant's self-check on this machine.

    Attributes:
        variant: ``int8`` or ``fp16``.
        recipe: the int8 recipe's name (``""`` for fp16).
        ran: whether a check was possible (``False``: no reference slices beside the model).
        passed: whether the variant agreed with float32 within the tolerances.
        reason: one line: the figures, or why it failed or did not run.
        figures: the measured agreement, when it ran.
        machine: the machine part of the cache key (CPU, GPU, ONNX Runtime).
        cached: read from the cache instead of measured by this process.
        checked_at: UTC time of the measurement.
        seconds: how long the measurement took.
    """

    variant: str
    recipe: str
    ran: bool
    passed: bool
    reason: str
    figures: CheckFigures | None = None
    machine: dict[str, str] | None = None
    cached: bool = False
    checked_at: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record (manifest, ``info``, the cache)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantCheck:
        """The inverse of :meth:`to_dict`."""
        figures = data.get("figures")
        return cls(**{**data, "figures": CheckFigures(**figures) if figures else None})


def compare_masks(
    reference: npt.NDArray[np.bool_], variant: npt.NDArray[np.bool_], names: tuple[str, ...]
) -> CheckFigures:
    """Compare a variant's GGO masks with float32's.

    Args:
        reference: float32 masks. Shape: ``(n, S, S)``.
        variant: the variant's masks. Shape: ``(n, S, S)``.
        names: slice names.
    """
    a = reference.reshape(len(names), -1)
    b = variant.reshape(len(names), -1)
    count_a, count_b = a.sum(axis=1), b.sum(axis=1)
    inter = np.logical_and(a, b).sum(axis=1)
    total_a, total_b, total_inter = int(count_a.sum()), int(count_b.sum()), int(inter.sum())
    pooled = 2.0 * total_inter / (total_a + total_b) if total_a + total_b else 1.0
    change = total_b / total_a - 1.0 if total_a else (0.0 if total_b == 0 else math.inf)
    worst, worst_name = 1.0, ""
    for i, name in enumerate(names):
        if max(count_a[i], count_b[i]) >= MIN_SLICE_PIXELS:
            dice = 2.0 * float(inter[i]) / float(count_a[i] + count_b[i])
            if dice < worst:
                worst, worst_name = dice, name
    return CheckFigures(
        n_slices=len(names),
        ggo_pixels_fp32=total_a,
        ggo_pixels_variant=total_b,
        ggo_change=float(change),
        dice=float(pooled),
        worst_slice_dice=float(worst),
        worst_slice=worst_name,
    )
