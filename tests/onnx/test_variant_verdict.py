"""A variant's agreement with float32: the figures, the tolerances, the verdict record."""

from __future__ import annotations

import numpy as np
import pytest

from ggo_cli.onnx.variant_verdict import MAX_GGO_CHANGE, VariantCheck, compare_masks


def _masks(counts: list[int], size: int = 40) -> np.ndarray:
    """Masks of ``size x size`` with the first ``counts[i]`` pixels of slice i set."""
    masks = np.zeros((len(counts), size * size), dtype=bool)
    for i, n in enumerate(counts):
        masks[i, :n] = True
    return masks.reshape(len(counts), size, size)


def test_compare_masks_passes_equal_masks_and_names_each_broken_tolerance() -> None:
    names = ("a", "b", "c")
    ref = _masks([1000, 800, 10])
    same = compare_masks(ref, ref.copy(), names)
    assert same.failures() == [] and same.dice == 1.0 and same.ggo_change == 0.0
    fewer = compare_masks(ref, _masks([1000, 400, 10]), names)  # slice b loses half
    assert fewer.ggo_pixels_fp32 == 1810 and fewer.ggo_pixels_variant == 1410
    assert fewer.worst_slice == "b" and fewer.worst_slice_dice == pytest.approx(2 * 400 / 1200)
    broken = " ".join(fewer.failures())
    assert "GGO pixels -22.1%" in broken and "mask Dice" in broken and "on slice b" in broken
    # a small slice's change counts in the pool but not as a slice of its own
    small = compare_masks(ref, _masks([1000, 800, 30]), names)
    assert small.worst_slice_dice == 1.0 and abs(small.ggo_change) < MAX_GGO_CHANGE
    assert small.failures() == []


def test_a_verdict_record_round_trips_with_its_figures() -> None:
    """to_dict/from_dict (the manifest and the cache) keep every field, figures included."""
    figures = compare_masks(_masks([900, 500]), _masks([900, 450]), ("x", "y"))
    verdict = VariantCheck(
        "int8", "portable", ran=True, passed=False, reason=figures.summary(), figures=figures,
        machine={"cpu": "test"}, checked_at="2026-01-01T00:00:00+00:00", seconds=1.5,
    )
    again = VariantCheck.from_dict(verdict.to_dict())
    assert again == verdict
    assert again.figures is not None and again.figures.worst_slice == "y"
    unchecked = VariantCheck("fp16", "", ran=False, passed=False, reason="no reference slices")
    assert VariantCheck.from_dict(unchecked.to_dict()) == unchecked
