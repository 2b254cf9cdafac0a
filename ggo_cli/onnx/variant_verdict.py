"""What a model variant's self-check measures against float32, and its verdict.

:func:`compare_masks` compares the variant's GGO masks with float32's on the reference slices
(:mod:`ggo_cli.onnx.variant_check` runs both); :class:`CheckFigures` holds the agreement and
names the tolerances it breaks; :class:`VariantCheck` is the verdict recorded in the cache, the
manifest and ``ggo-cli info``.

Every output channel is compared (issue 20): :func:`compare_channels` takes the masks of all
channels; channel 0 (GGO) keeps :class:`CheckFigures`' own fields, and each further channel
(consolidation of a two-class model) gets a :class:`ChannelFigures` in
:attr:`CheckFigures.channels`, with the same three tests and the same tolerances. A further
channel with fewer than :data:`MIN_SLICE_PIXELS` pixels pooled over all reference slices in
*both* masks enters no test (its figures say ``compared=False`` and the summary "too few
pixels"): every slice of it is then below the size at which a slice's Dice is trusted, and the
two masks differ by fewer than that many pixels. A channel with that many pixels in one mask
only is compared, and fails on its change. Channel 0 is always tested as before (the reference
slices are chosen for their GGO).

A one-channel model's verdict reads as before (``GGO pixels ...``, ``mask Dice ...``, ``Dice
... on slice ...``) and its record has no ``channels`` entry. In a model with more channels each
failure names its channel: channel 0 "GGO" (as its pixel phrase always did, whatever its
segment label), the others by the model's segment label (``GGO: mask Dice 0.912 (limit
0.95)``, ``Consolidation pixels +3.1% (limit ±2%)``, ``Consolidation: Dice 0.700 on slice
covid-3 (limit 0.9)``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
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


def _failures(
    label: str, prefix: str, change: float, dice: float, worst_dice: float, worst_slice: str
) -> list[str]:
    """The broken tolerances of one channel, in words: ``label`` names its pixels, ``prefix``
    starts its Dice phrases."""
    broken = []
    if abs(change) > MAX_GGO_CHANGE:
        broken.append(f"{label} pixels {change:+.1%} (limit ±{MAX_GGO_CHANGE:.0%})")
    if dice < MIN_POOLED_DICE:
        broken.append(f"{prefix}mask Dice {dice:.3f} (limit {MIN_POOLED_DICE})")
    if worst_dice < MIN_SLICE_DICE:
        broken.append(
            f"{prefix}Dice {worst_dice:.3f} on slice {worst_slice} (limit {MIN_SLICE_DICE})"
        )
    return broken


@dataclass(frozen=True, slots=True)
class ChannelFigures:
    """How a variant's masks of one output channel after GGO compare with float32's.

    Attributes:
        channel: the output channel (1, 2, ...).
        label: its segment label (the model's metadata), which names it in the verdict.
        pixels_fp32: its pixels in the float32 masks, all slices.
        pixels_variant: its pixels in the variant's masks.
        change: ``variant / fp32 - 1`` (0 when both are 0).
        dice: pooled Dice of the two masks.
        worst_slice_dice: the lowest Dice among slices with enough pixels (1 if none).
        worst_slice: that slice's name.
        compared: ``False`` when both pooled counts are below :data:`MIN_SLICE_PIXELS`: the
            channel entered no test (see the module docstring).
    """

    channel: int
    label: str
    pixels_fp32: int
    pixels_variant: int
    change: float
    dice: float
    worst_slice_dice: float
    worst_slice: str
    compared: bool = True

    def failures(self) -> list[str]:
        """Which tolerances are broken, in words, each naming the channel."""
        if not self.compared:
            return []
        return _failures(self.label, f"{self.label}: ", self.change, self.dice,
                         self.worst_slice_dice, self.worst_slice)

    def summary(self) -> str:
        """The figures in one phrase."""
        if not self.compared:
            return (
                f"{self.label}: too few pixels to compare ({self.pixels_fp32} float32, "
                f"{self.pixels_variant} variant)"
            )
        return (
            f"{self.label} pixels {self.change:+.2%}, mask Dice {self.dice:.3f} "
            f"(worst slice {self.worst_slice_dice:.3f})"
        )


@dataclass(frozen=True, slots=True)
class CheckFigures:
    """How a variant's masks compare with float32's on the reference slices: GGO's in the
    fields, the other channels' in ``channels``.

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
        channels: the further output channels' figures (empty for a one-channel model).
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
    channels: tuple[ChannelFigures, ...] = ()

    def failures(self) -> list[str]:
        """Which tolerances are broken, in words (empty when the variant passes); GGO's
        first, unprefixed for a one-channel model (the wording of its cached verdicts)."""
        prefix = "GGO: " if self.channels else ""
        broken = _failures("GGO", prefix, self.ggo_change, self.dice, self.worst_slice_dice,
                           self.worst_slice)
        for channel in self.channels:
            broken += channel.failures()
        return broken

    def summary(self) -> str:
        """The figures in one phrase."""
        further = "".join(f"; {channel.summary()}" for channel in self.channels)
        return (
            f"GGO pixels {self.ggo_change:+.2%} against float32, mask Dice {self.dice:.3f} "
            f"(worst slice {self.worst_slice_dice:.3f}){further} on {self.n_slices} "
            "reference slices"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record; a one-channel model's has no ``channels`` (as before
        issue 20)."""
        record = asdict(self)  # nested ChannelFigures become dicts
        if not self.channels:
            del record["channels"]
        return record

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckFigures:
        """The inverse of :meth:`to_dict` (also reads records written before issue 20)."""
        channels = tuple(ChannelFigures(**c) for c in data.get("channels") or ())
        return cls(**{**data, "channels": channels})


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
        record = asdict(self)
        record["figures"] = self.figures.to_dict() if self.figures is not None else None
        return record

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantCheck:
        """The inverse of :meth:`to_dict`."""
        figures = data.get("figures")
        return cls(**{**data, "figures": CheckFigures.from_dict(figures) if figures else None})


def _agreement(
    reference: npt.NDArray[np.bool_], variant: npt.NDArray[np.bool_], names: tuple[str, ...]
) -> tuple[int, int, float, float, float, str]:
    """Pooled counts, change and Dice, and the worst slice's Dice and name, of one channel's
    masks (shape ``(n, S, S)``)."""
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
    return total_a, total_b, float(change), float(pooled), float(worst), worst_name


def compare_masks(
    reference: npt.NDArray[np.bool_], variant: npt.NDArray[np.bool_], names: tuple[str, ...]
) -> CheckFigures:
    """Compare a variant's GGO masks with float32's.

    Args:
        reference: float32 masks. Shape: ``(n, S, S)``.
        variant: the variant's masks. Shape: ``(n, S, S)``.
        names: slice names.
    """
    total_a, total_b, change, pooled, worst, worst_name = _agreement(reference, variant, names)
    return CheckFigures(
        n_slices=len(names),
        ggo_pixels_fp32=total_a,
        ggo_pixels_variant=total_b,
        ggo_change=change,
        dice=pooled,
        worst_slice_dice=worst,
        worst_slice=worst_name,
    )


def compare_channels(
    reference: npt.NDArray[np.bool_],
    variant: npt.NDArray[np.bool_],
    names: tuple[str, ...],
    labels: tuple[str, ...],
) -> CheckFigures:
    """Compare a variant's masks of every output channel with float32's.

    Args:
        reference: float32 masks. Shape: ``(n, C, S, S)``; channel 0 is GGO.
        variant: the variant's masks. Shape: ``(n, C, S, S)``.
        names: slice names.
        labels: the channels' segment labels (``C`` of them).

    Returns:
        Channel 0's figures as :func:`compare_masks` gives them, the other channels' in
        ``channels`` (none for a one-channel model).

    Raises:
        ValueError: the shapes or the labels do not match.
    """
    if reference.shape != variant.shape or reference.ndim != 4 or (
        reference.shape[1] != len(labels)
    ):
        raise ValueError(
            f"need two (n, C, S, S) masks and C labels, got {reference.shape}, "
            f"{variant.shape}, {len(labels)}"
        )
    figures = compare_masks(reference[:, 0], variant[:, 0], names)
    channels = []
    for k in range(1, len(labels)):
        total_a, total_b, change, pooled, worst, worst_name = _agreement(
            reference[:, k], variant[:, k], names
        )
        channels.append(
            ChannelFigures(
                channel=k,
                label=labels[k],
                pixels_fp32=total_a,
                pixels_variant=total_b,
                change=change,
                dice=pooled,
                worst_slice_dice=worst,
                worst_slice=worst_name,
                compared=max(total_a, total_b) >= MIN_SLICE_PIXELS,
            )
        )
    return replace(figures, channels=tuple(channels))
