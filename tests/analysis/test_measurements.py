"""Volumetry: voxel counts to millilitres, for the GGO and per lung, on hand-built masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ggo_cli.analysis.lungs import LungMasks
from ggo_cli.analysis.measurements import lung_measurements, measure_ggo


def test_lung_measurements_are_volumes_and_percentages() -> None:
    right = np.zeros((2, 4, 8), bool)
    left = np.zeros_like(right)
    ggo = np.zeros_like(right)
    right[0, :, :5] = True  # 20 voxels
    left[1, :, 3:8] = True  # 20 voxels
    left[0, 0, 6:8] = True  # 22 in all
    ggo[0, 0, :2] = True  # 2 in the right lung
    ggo[1, :, 7] = True  # 4 in the left lung
    ggo[0, 3, 6] = True  # 1 outside both: not counted
    m = lung_measurements(LungMasks(right=right, left=left), ggo, 0.5)
    assert (m.right_lung_volume_ml, m.left_lung_volume_ml, m.lung_volume_ml) == (10.0, 11.0, 21.0)
    assert (m.right_ggo_volume_ml, m.left_ggo_volume_ml) == (1.0, 2.0)
    assert m.right_ggo_percent == pytest.approx(10.0)
    assert m.left_ggo_percent == pytest.approx(100.0 * 2.0 / 11.0)
    assert m.ggo_percent_of_lung == pytest.approx(100.0 * 3.0 / 21.0)


def test_lung_measurements_of_an_empty_lung_are_nan_percent() -> None:
    right = np.ones((1, 2, 2), bool)
    empty = np.zeros_like(right)
    m = lung_measurements(LungMasks(right=right, left=empty), right, 1.0)
    assert m.left_lung_volume_ml == 0.0 and math.isnan(m.left_ggo_percent)
    assert m.right_ggo_percent == 100.0 and m.ggo_percent_of_lung == 100.0
    m = lung_measurements(LungMasks(right=empty, left=empty), empty, 1.0)
    assert math.isnan(m.ggo_percent_of_lung) and m.lung_volume_ml == 0.0


def test_lung_measurements_reject_bad_input() -> None:
    lungs = LungMasks(right=np.zeros((1, 2, 2), bool), left=np.zeros((1, 2, 2), bool))
    with pytest.raises(ValueError, match=r"GGO shape \(1, 2, 3\) differs"):
        lung_measurements(lungs, np.zeros((1, 2, 3), bool), 1.0)
    with pytest.raises(ValueError, match="voxel_volume_ml 0.0 must be positive"):
        lung_measurements(lungs, np.zeros((1, 2, 2), bool), 0.0)


def test_ggo_volume_is_voxels_times_voxel_volume_and_slices_are_counted() -> None:
    """7 GGO voxels of 0.25 mL on 2 of 4 slices: 1.75 mL, 2 slices."""
    ggo = np.zeros((4, 3, 5), bool)
    ggo[0, 1, 1:4] = True  # 3 voxels
    ggo[2, :, 0] = True  # 3 voxels
    ggo[2, 0, 4] = True  # 1 more on the same slice
    m = measure_ggo(ggo, 0.25)
    assert (m.ggo_voxels, m.ggo_slice_count) == (7, 2)
    assert m.ggo_volume_ml == pytest.approx(1.75)
    assert m.voxel_volume_ml == 0.25


def test_an_empty_ggo_mask_measures_zero() -> None:
    m = measure_ggo(np.zeros((3, 4, 4), bool), 0.7)
    assert (m.ggo_voxels, m.ggo_slice_count, m.ggo_volume_ml) == (0, 0, 0.0)
