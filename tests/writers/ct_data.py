"""Test data for the writer tests: real CT series as CtVolumes, a tiny ModelInfo, masks
(also stacked with lungs as the SEG's planes).

The volumes are loaded with pydicom alone (headers without pixel data, slices sorted by
position along the slice normal, HU = stored value x slope + intercept), so the writer tests
do not depend on ``ggo_cli.dicom.volume``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from ggo_cli.analysis.lungs import LungMasks
from ggo_cli.analysis.masks import keep_inside_lungs, model_masks, segment_planes
from ggo_cli.domain import CtVolume, Prediction, SeriesInfo
from ggo_cli.onnx.model_info import ModelInfo, SegmentSpec
from tests.shared_data import require_shared

MODEL_SHA256 = "0123456789abcdef" * 4


def _position_along_normal(ds: pydicom.Dataset) -> float:
    """Slice position along the normal of its orientation (row x column cosines)."""
    cosines = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(cosines[:3], cosines[3:])
    return float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=np.float64)))


def load_ct_volume(folder: Path) -> CtVolume:
    """Load a single-series CT folder as a CtVolume (tests only; no checks beyond sorting)."""
    files = sorted(require_shared(folder).glob("*.dcm"))
    if not files:
        pytest.fail(f"no *.dcm files in {folder}", pytrace=False)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    order = sorted(range(len(files)), key=lambda i: _position_along_normal(headers[i]))
    headers = [headers[i] for i in order]
    files = [files[i] for i in order]
    hu = np.stack(
        [
            pydicom.dcmread(f).pixel_array.astype(np.float32) * float(h.RescaleSlope)
            + float(h.RescaleIntercept)
            for f, h in zip(files, headers, strict=True)
        ]
    ).astype(np.float32)
    positions = [_position_along_normal(h) for h in headers]
    spacing = float(np.median(np.diff(positions))) if len(positions) > 1 else 1.0
    first = headers[0]
    series = SeriesInfo(
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        files=tuple(files),
        location=folder.name,
        study_date=str(first.get("StudyDate", "")),
        series_description=str(first.get("SeriesDescription", "")),
        patient_id=str(first.get("PatientID", "")),
    )
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)
    return CtVolume(
        series=series,
        hu=hu,
        datasets=tuple(headers),
        slice_spacing_mm=spacing,
        pixel_spacing_mm=(row_mm, col_mm),
    )


def make_model(n_channels: int = 1, *, sha256: str = MODEL_SHA256) -> ModelInfo:
    """A ModelInfo built directly (no ONNX file): channel 0 GGO, further channels lung."""
    specs = [
        SegmentSpec(
            label="GGO",
            property_category=codes.SCT.MorphologicallyAbnormalStructure,
            property_type=codes.DCM.GroundGlassOpacity,
        )
    ]
    specs += [
        SegmentSpec(
            label=f"Lung {i}",
            property_category=codes.SCT.Organ,
            property_type=codes.SCT.Lung,
        )
        for i in range(1, n_channels)
    ]
    return ModelInfo(
        path=Path("tiny.onnx"),
        name="tiny-ggo",
        version="0.0.1",
        architecture="threshold",
        input_size=64,
        window_center_hu=-600.0,
        window_width_hu=1500.0,
        threshold=0.5,
        segments=tuple(specs),
        recorded_sha256=sha256,
        file_sha256="f" * 64,
        metadata={},
    )


def blob_masks(volume: CtVolume, n_channels: int = 1) -> np.ndarray:
    """Boolean masks with a box of GGO on a few slices (and shifted boxes for more channels).

    Shape: ``(slices, rows, cols, channels)``.
    """
    n, rows, cols = volume.hu.shape
    masks = np.zeros((n, rows, cols, n_channels), dtype=bool)
    first = max(0, n // 2 - 2)
    for channel in range(n_channels):
        top, left = rows // 3, cols // 4 + 30 * channel
        masks[first : first + 4, top : top + 40, left : left + 50, channel] = True
    # an irregular edge so orientation errors would show
    masks[first, rows // 3, cols // 4, 0] = False
    return masks


def stack_segments(
    prediction: Prediction, lungs: LungMasks
) -> tuple[Prediction, LungMasks]:
    """Copy separate masks and lungs into :func:`segment_planes`, the masks kept inside the
    lungs (what the pipeline gets without copies when it fills the planes directly).

    Returns:
        The restricted prediction and the lungs, both views of one set of planes.

    Raises:
        ValueError: the shapes differ.
    """
    masks = prediction.masks
    if masks.shape[:3] != lungs.right.shape:
        raise ValueError(f"masks {masks.shape} do not match lung shape {lungs.right.shape}")
    n_channels = masks.shape[-1]
    planes, stacked = segment_planes(lungs.right.shape, n_channels)
    np.copyto(stacked.right, lungs.right)
    np.copyto(stacked.left, lungs.left)
    restricted = model_masks(planes, n_channels)
    np.copyto(restricted, masks)
    # replace(): the prediction's GGO counts (before the restriction) travel with it
    return keep_inside_lungs(replace(prediction, masks=restricted), stacked), stacked
