"""Consolidation beside GGO (issue 20): which channel, the lesion rule, the volumes adding up."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ggo_cli.analysis.lungs import LungMasks
from ggo_cli.analysis.measurements import (
    CONSOLIDATION_TYPE,
    consolidation_channel,
    lung_measurements,
    measure_consolidation,
    measure_ggo,
    resolve_overlap,
)
from ggo_cli.domain import Prediction
from ggo_cli.onnx.model_info import SegmentSpec

VOXEL_ML = 0.0098
GGO = SegmentSpec("GGO", codes.SCT.MorphologicallyAbnormalStructure, codes.DCM.GroundGlassOpacity)
CONSOLIDATION = SegmentSpec(
    "Consolidation", codes.SCT.MorphologicallyAbnormalStructure, CONSOLIDATION_TYPE
)


def _spec(label: str, code: Code) -> SegmentSpec:
    return SegmentSpec(label, codes.SCT.MorphologicallyAbnormalStructure, code)


def test_consolidation_is_found_by_its_snomed_code_not_by_position() -> None:
    assert CONSOLIDATION_TYPE.value == "9656002" and CONSOLIDATION_TYPE.scheme_designator == "SCT"
    assert consolidation_channel([GGO]) is None
    assert consolidation_channel([GGO, CONSOLIDATION]) == 1
    # Channel 1 that is something else: no consolidation columns for it.
    assert consolidation_channel([GGO, GGO]) is None
    assert consolidation_channel([GGO, _spec("Effusion", Code("60046008", "SCT", "x"))]) is None
    # The code, with any label, wins over an earlier channel that is only so labelled.
    coded = _spec("opacity, dense", CONSOLIDATION_TYPE)
    assert consolidation_channel([GGO, _spec("consolidation", codes.SCT.Lung), coded]) == 2
    # Without the code, the label (any case, spaces trimmed) names it.
    assert consolidation_channel([GGO, _spec(" CONSOLIDATION ", Code("1", "99X", "c"))]) == 1
    # Channel 0 is GGO by contract, whatever its metadata says.
    assert consolidation_channel([CONSOLIDATION]) is None


def _masks(shape: tuple[int, int, int] = (4, 6, 8)) -> np.ndarray:
    return np.zeros((*shape, 2), dtype=bool)


def test_a_voxel_called_both_becomes_consolidation_only() -> None:
    masks = _masks()
    masks[1, :3, :4, 0] = True  # 12 GGO voxels
    masks[1, 2:5, 2:6, 1] = True  # 12 consolidation voxels, 2 of them also GGO
    consolidation_before = masks[..., 1].copy()
    prediction = Prediction(masks, 0.5, predicted_ggo_voxels=12, near_threshold_voxels=3)
    resolved = resolve_overlap(prediction, 1)
    assert resolved.masks is masks  # in place: the SEG's planes themselves
    assert not np.any(masks[..., 0] & masks[..., 1])
    assert int(masks[..., 0].sum()) == 10
    np.testing.assert_array_equal(masks[..., 1], consolidation_before)
    assert resolved.predicted_ggo_voxels == 10 and resolved.near_threshold_voxels == 3
    assert resolve_overlap(resolved, 1) is resolved  # nothing left to resolve
    with pytest.raises(ValueError, match="consolidation channel 0 is not in 1..1"):
        resolve_overlap(prediction, 0)


def _lungs(shape: tuple[int, int, int]) -> LungMasks:
    right = np.zeros(shape, dtype=bool)
    left = np.zeros(shape, dtype=bool)
    right[:, :, :4] = True
    left[:, :, 4:7] = True  # column 7: outside both lungs
    return LungMasks(right=right, left=left)


def test_ggo_plus_consolidation_is_the_lesion_in_both_lungs_and_each() -> None:
    shape = (4, 6, 8)
    masks = _masks(shape)
    masks[0, :2, 1:3, 0] = True  # 4 GGO right
    masks[2, 1:4, 5:7, 0] = True  # 6 GGO left
    masks[3, 0:3, 0:4, 1] = True  # 12 consolidation right
    masks[1, 0:5, 4:6, 1] = True  # 10 consolidation left
    masks[0, 0, 7, 1] = True  # 1 consolidation outside both lungs
    lungs = _lungs(shape)
    ggo, consolidation = masks[..., 0], masks[..., 1]
    found = measure_consolidation(ggo, consolidation, VOXEL_ML, lungs=lungs)
    ggo_found = measure_ggo(ggo, VOXEL_ML)
    lung_found = lung_measurements(lungs, ggo, VOXEL_ML)
    assert found.consolidation_voxels == 23 and found.consolidation_slice_count == 3
    assert found.lesion_voxels == ggo_found.ggo_voxels + found.consolidation_voxels == 33
    assert found.lesion_volume_ml == pytest.approx(33 * VOXEL_ML, abs=1e-12)
    assert found.right_consolidation_volume_ml == pytest.approx(12 * VOXEL_ML, abs=1e-12)
    assert found.left_consolidation_volume_ml == pytest.approx(10 * VOXEL_ML, abs=1e-12)
    right_ml, left_ml = 4 * 6 * 4 * VOXEL_ML, 4 * 6 * 3 * VOXEL_ML
    assert found.consolidation_percent_of_lung == pytest.approx(
        100 * 22 * VOXEL_ML / (right_ml + left_ml)
    )
    assert found.lesion_percent_of_lung == pytest.approx(
        lung_found.ggo_percent_of_lung + found.consolidation_percent_of_lung
    )
    assert found.right_lesion_percent == pytest.approx(100 * 16 * VOXEL_ML / right_ml)
    assert found.left_lesion_percent == pytest.approx(100 * 16 * VOXEL_ML / left_ml)


def test_without_lungs_only_the_volumes_and_with_an_empty_lung_its_percent_undefined() -> None:
    shape = (2, 4, 8)
    masks = _masks(shape)
    masks[0, :2, :2, 1] = True
    found = measure_consolidation(masks[..., 0], masks[..., 1], VOXEL_ML)
    assert found.consolidation_voxels == found.lesion_voxels == 4
    assert found.left_consolidation_volume_ml is None and found.lesion_percent_of_lung is None
    lungs = _lungs(shape)
    empty = LungMasks(right=lungs.right, left=np.zeros(shape, dtype=bool))
    found = measure_consolidation(masks[..., 0], masks[..., 1], VOXEL_ML, lungs=empty)
    assert found.left_consolidation_volume_ml == 0.0
    assert found.left_lesion_percent is not None and math.isnan(found.left_lesion_percent)
    assert found.right_lesion_percent == pytest.approx(100 * 4 / (2 * 4 * 4))


def test_overlapping_masks_are_refused_so_the_sum_cannot_double_count() -> None:
    masks = _masks()
    masks[2, 1, 1, :] = True
    with pytest.raises(ValueError, match="overlap on slice 2; resolve_overlap first"):
        measure_consolidation(masks[..., 0], masks[..., 1], VOXEL_ML)
    with pytest.raises(ValueError, match="voxel_volume_ml 0.0 must be positive"):
        measure_consolidation(masks[..., 0], masks[..., 1], 0.0)
