"""``ggo-cli demo``: compare a run on the synthetic study with the phantom's known GGO."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from ..synthetic.phantom import Phantom


@dataclass(frozen=True, slots=True)
class DemoCheck:
    """How the segmentation of the synthetic study compares with its truth.

    Attributes:
        true_ggo_ml: the phantom's GGO volume in mL.
        measured_ggo_ml: the volume read back from the SEG in mL.
        dice: Dice overlap of the SEG's GGO segment with the true GGO mask.
        true_lung_ml: the phantom's lung volume in mL (right, left).
        measured_lung_ml: the SEG's right and left lung segments in mL (``None`` without them).
    """

    true_ggo_ml: float
    measured_ggo_ml: float
    dice: float
    true_lung_ml: tuple[float, float] = (0.0, 0.0)
    measured_lung_ml: tuple[float, float] | None = None


def compare_with_truth(phantom: Phantom, paths: Sequence[Path], seg_path: Path) -> DemoCheck:
    """Read the SEG back and compare its GGO segment with the phantom's mask.

    Args:
        phantom: the phantom written.
        paths: the files written, ``paths[k]`` holding phantom slice ``k``.
        seg_path: the SEG ``segment`` wrote for that series.

    Returns:
        True and measured volume and the Dice overlap.
    """
    import highdicom as hd

    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    predicted = pixels[..., 0].astype(bool)
    truth = np.asarray(phantom.ggo_mask, dtype=bool)
    total = int(predicted.sum()) + int(truth.sum())
    dice = 2.0 * int(np.logical_and(predicted, truth).sum()) / total if total else 1.0
    labels = {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}
    measured_lungs = None
    if "Right lung" in labels and "Left lung" in labels:
        lungs = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids,
            segment_numbers=[labels["Right lung"], labels["Left lung"]],
        )
        right, left = (int(lungs[..., k].astype(bool).sum()) for k in (0, 1))
        measured_lungs = (right * phantom.voxel_volume_ml, left * phantom.voxel_volume_ml)
    return DemoCheck(
        true_ggo_ml=phantom.ggo_volume_ml,
        measured_ggo_ml=int(predicted.sum()) * phantom.voxel_volume_ml,
        dice=dice,
        true_lung_ml=(phantom.lung_right_volume_ml, phantom.lung_left_volume_ml),
        measured_lung_ml=measured_lungs,
    )
