"""Volumetry: voxel counts to millilitres, for the GGO, the consolidation, and per lung.

**Which channel is consolidation.** Channel 0 is GGO (the model contract). Another channel is
consolidation when its segment's property type is SNOMED CT 9656002 "Consolidation" (the
morphologic abnormality; :data:`CONSOLIDATION_TYPE`), or, failing a channel with that code, when
its label is "consolidation" in any case: by what the model's metadata says the channel is,
never by its position, so a model whose channel 1 is something else gets no consolidation
columns.

**The lesion rule.** Lesion = GGO or consolidation, voxel by voxel (the union of the masks). A
model with one sigmoid per channel may call a voxel both; :func:`resolve_overlap` then makes it
consolidation only, in the masks themselves, before anything is measured or written. The
Fleischner Society's definitions exclude each other (Hansell et al., Radiology 2008, 246:697):
ground glass is hazy opacity *with* the bronchial and vascular margins preserved,
consolidation an increase in attenuation that *obscures* them, so a voxel that meets the
denser definition is not ground glass; models that pick one class per pixel (softmax, as
Inf-Net's multi-class network) never call both. The SEG, the CSV, the SR and the pictures thus
show the same masks, and ``GGO + consolidation = lesion`` holds exactly in voxels and lung
percentages (in the CSV's 6-decimal mL to within 1e-6 mL of rounding).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from pydicom.sr.coding import Code

from ..domain import ConsolidationMeasurement, GgoMeasurement, LungMeasurement, Prediction

if TYPE_CHECKING:
    from ..onnx.model_info import SegmentSpec
    from .lungs import LungMasks

CONSOLIDATION_TYPE = Code("9656002", "SCT", "Consolidation")
"""SNOMED CT 9656002 "Consolidation (morphologic abnormality)": the segmented property type of
a consolidation channel, with category SCT 49755003 "Morphologically abnormal structure" as
GGO's; the lung is the anatomic region. HL7 FHIR R5 codes consolidation of the lung the same
way, as morphology 9656002 in the lung structure 39607008 (the BodyStructure example
"right-lung-consolidation", build.fhir.org/bodystructure-example-right-lung-consolidation)."""
CONSOLIDATION_LABEL = "consolidation"
"""A channel so labelled (any case) is consolidation when no channel has the code."""
OVERLAP_SLAB_SLICES = 64
"""Slices resolved at a time by :func:`resolve_overlap` (bounds its temporary)."""


def consolidation_channel(segments: Sequence[SegmentSpec]) -> int | None:
    """The model channel that segments consolidation (see the module docstring).

    Args:
        segments: the model's segments, one per output channel (channel 0 is GGO).

    Returns:
        The first channel after 0 coded SCT 9656002, else the first labelled
        "consolidation"; ``None`` when there is none (a one-channel model).
    """
    for k, spec in enumerate(segments):
        code = spec.property_type
        if k > 0 and (code.scheme_designator, code.value) == (
            CONSOLIDATION_TYPE.scheme_designator, CONSOLIDATION_TYPE.value
        ):
            return k
    for k, spec in enumerate(segments):
        if k > 0 and spec.label.strip().casefold() == CONSOLIDATION_LABEL:
            return k
    return None


def resolve_overlap(prediction: Prediction, channel: int) -> Prediction:
    """Make GGO and consolidation exclusive: a voxel called both is consolidation only.

    The GGO mask is changed in place, slab by slab. Call it before the lung restriction:
    :attr:`Prediction.predicted_ggo_voxels` loses the voxels given to consolidation, so the
    ``ggo_outside_lungs`` quality flag still counts only what the lung mask removes.

    Args:
        prediction: the masks. Shape: ``(slices, rows, cols, channels)``.
        channel: the consolidation channel (> 0).

    Returns:
        The prediction with the same masks (GGO changed) and the predicted GGO count adjusted.

    Raises:
        ValueError: ``channel`` is not a channel after GGO.
    """
    masks = prediction.masks
    if not 0 < channel < masks.shape[-1]:
        raise ValueError(f"consolidation channel {channel} is not in 1..{masks.shape[-1] - 1}")
    overlap = 0
    for start in range(0, masks.shape[0], OVERLAP_SLAB_SLICES):
        z = slice(start, start + OVERLAP_SLAB_SLICES)
        both = np.logical_and(masks[z, ..., 0], masks[z, ..., channel])
        overlap += int(np.count_nonzero(both))
        masks[z, ..., 0] &= ~both
    if not overlap:
        return prediction
    predicted = max(prediction.predicted_ggo_voxels - overlap, 0)
    return dataclasses.replace(prediction, predicted_ggo_voxels=predicted)


def measure_ggo(ggo: npt.NDArray[np.bool_], voxel_ml: float) -> GgoMeasurement:
    """Measure a GGO mask.

    Args:
        ggo: the GGO mask. Shape: ``(slices, rows, cols)``.
        voxel_ml: volume of one voxel in mL.

    Returns:
        Voxel count, volume (voxels x voxel volume) and the number of slices with GGO.
    """
    per_slice = ggo.reshape(ggo.shape[0], -1).sum(axis=1)
    voxels = int(per_slice.sum())
    return GgoMeasurement(
        voxel_volume_ml=voxel_ml,
        ggo_voxels=voxels,
        ggo_volume_ml=voxels * voxel_ml,
        ggo_slice_count=int(np.count_nonzero(per_slice)),
    )


def lung_measurements(lungs: LungMasks, ggo: npt.NDArray[np.bool_], voxel_volume_ml: float) -> (
    LungMeasurement
):
    """Measure lung volumes and the GGO inside each lung.

    Args:
        lungs: the lung masks.
        ggo: the GGO mask; voxels outside both lungs are not counted. Shape: as the lungs.
        voxel_volume_ml: volume of one voxel in mL.

    Returns:
        Volumes in mL and percentages (``nan`` for a lung of volume 0).

    Raises:
        ValueError: the shapes differ or ``voxel_volume_ml`` is not positive.
    """
    if ggo.shape != lungs.right.shape or lungs.left.shape != lungs.right.shape:
        raise ValueError(f"GGO shape {ggo.shape} differs from lung shapes {lungs.right.shape} "
                         f"and {lungs.left.shape}")
    if not voxel_volume_ml > 0:
        raise ValueError(f"voxel_volume_ml {voxel_volume_ml} must be positive")
    right_ml = int(np.count_nonzero(lungs.right)) * voxel_volume_ml
    left_ml = int(np.count_nonzero(lungs.left)) * voxel_volume_ml
    right_ggo_ml = int(np.count_nonzero(ggo & lungs.right)) * voxel_volume_ml
    left_ggo_ml = int(np.count_nonzero(ggo & lungs.left)) * voxel_volume_ml
    return LungMeasurement(
        lung_volume_ml=left_ml + right_ml,
        left_lung_volume_ml=left_ml,
        right_lung_volume_ml=right_ml,
        ggo_percent_of_lung=_percent(left_ggo_ml + right_ggo_ml, left_ml + right_ml),
        left_ggo_volume_ml=left_ggo_ml,
        right_ggo_volume_ml=right_ggo_ml,
        left_ggo_percent=_percent(left_ggo_ml, left_ml),
        right_ggo_percent=_percent(right_ggo_ml, right_ml),
    )


def _percent(part_ml: float, whole_ml: float) -> float:
    """``100 * part / whole``, or ``nan`` when the whole is empty."""
    return 100.0 * part_ml / whole_ml if whole_ml > 0 else math.nan


def measure_consolidation(
    ggo: npt.NDArray[np.bool_],
    consolidation: npt.NDArray[np.bool_],
    voxel_volume_ml: float,
    *,
    lungs: LungMasks | None = None,
) -> ConsolidationMeasurement:
    """Measure consolidation and the lesion (GGO or consolidation), per lung when given.

    Args:
        ggo: the GGO mask, exclusive of consolidation (:func:`resolve_overlap`).
            Shape: ``(slices, rows, cols)``.
        consolidation: the consolidation mask. Shape: as ``ggo``.
        voxel_volume_ml: volume of one voxel in mL.
        lungs: the lung masks, when the lung mask is on; voxels outside both lungs are not
            counted in the lung fields.

    Returns:
        Volumes in mL, and with ``lungs`` the per-lung volumes and percentages.

    Raises:
        ValueError: the shapes differ, the masks overlap, or ``voxel_volume_ml`` is not
            positive.
    """
    if consolidation.shape != ggo.shape:
        raise ValueError(f"consolidation shape {consolidation.shape} differs from GGO {ggo.shape}")
    if not voxel_volume_ml > 0:
        raise ValueError(f"voxel_volume_ml {voxel_volume_ml} must be positive")
    per_slice = np.zeros(ggo.shape[0], np.int64)
    ggo_voxels = 0
    for k, (ggo_plane, plane) in enumerate(zip(ggo, consolidation, strict=True)):
        if np.any(ggo_plane & plane):
            raise ValueError(f"GGO and consolidation overlap on slice {k}; resolve_overlap first")
        per_slice[k] = np.count_nonzero(plane)
        ggo_voxels += int(np.count_nonzero(ggo_plane))
    voxels = int(per_slice.sum())
    measurement = ConsolidationMeasurement(
        consolidation_voxels=voxels,
        consolidation_volume_ml=voxels * voxel_volume_ml,
        consolidation_slice_count=int(np.count_nonzero(per_slice)),
        lesion_voxels=ggo_voxels + voxels,
        lesion_volume_ml=(ggo_voxels + voxels) * voxel_volume_ml,
    )
    if lungs is None:
        return measurement
    if lungs.right.shape != ggo.shape or lungs.left.shape != ggo.shape:
        raise ValueError(f"lung shapes {lungs.right.shape} and {lungs.left.shape} differ "
                         f"from the masks' {ggo.shape}")
    lung_ml, consolidation_ml, lesion_ml = [], [], []
    for lung in (lungs.left, lungs.right):
        lung_ml.append(int(np.count_nonzero(lung)) * voxel_volume_ml)
        inside = int(np.count_nonzero(consolidation & lung))
        consolidation_ml.append(inside * voxel_volume_ml)
        lesion_ml.append((inside + int(np.count_nonzero(ggo & lung))) * voxel_volume_ml)
    both_ml = lung_ml[0] + lung_ml[1]
    return dataclasses.replace(
        measurement,
        left_consolidation_volume_ml=consolidation_ml[0],
        right_consolidation_volume_ml=consolidation_ml[1],
        consolidation_percent_of_lung=_percent(consolidation_ml[0] + consolidation_ml[1], both_ml),
        lesion_percent_of_lung=_percent(lesion_ml[0] + lesion_ml[1], both_ml),
        left_lesion_percent=_percent(lesion_ml[0], lung_ml[0]),
        right_lesion_percent=_percent(lesion_ml[1], lung_ml[1]),
    )
