"""The GradCAM++ figures of ``segment --explain`` as a second RGB Secondary Capture series.

Issue 17 item 2 ("optional GradCAM++ panels in the same way"): with ``--explain`` and an SC
mode other than ``none``, each explained slice's figure (CT | segmentation | GradCAM++, as
``gradcam/slice_NNNN.png`` draws it) becomes one SC instance ``sc_gradcam/gradcam_NNNN.dcm``,
under the overlay SC's text band (research use only, volumes, model; no patient identifier).
It is its own series (SeriesNumber :data:`GRADCAM_SC_SERIES_NUMBER`, its own derived UID),
so a viewer lists it apart from the overlay. Everything else is the overlay SC's
(:mod:`ggo_cli.writers.dicom_sc`): the SC Image IOD, copied patient and study modules, the
equipment and the algorithm item, the references to the CT instance shown (purpose 121322
"Source image for image processing operation") and to the SEG, atomic writes, each file read
back and checked.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from .. import __version__
from ..domain import CtVolume, GgoMeasurement, LungMeasurement
from ..fsutil import OutputTree
from ..onnx.model_info import ModelInfo
from .dicom_sc import write_sc_series
from .gradcam_png import GradcamFigures
from .sc_render import gradcam_panels, sc_text_lines
from .seg_source import check_series_options

__all__ = [
    "GRADCAM_SC_SERIES_DESCRIPTION",
    "GRADCAM_SC_SERIES_NUMBER",
    "derive_gradcam_sc_series_uid",
    "write_gradcam_sc",
]

GRADCAM_SC_SERIES_NUMBER = 9904
"""SeriesNumber of the GradCAM++ SC series (the overlay SC is 9903)."""
GRADCAM_SC_SERIES_DESCRIPTION = "GGO AI GradCAM++ - research use only"
_UID_NAMESPACE = "ggo-cli/sc-gradcam/v1"


def derive_gradcam_sc_series_uid(
    source_series_uid: str,
    model_sha256: str,
    *,
    threshold: float,
    series_number: int,
    series_description: str,
    layer: str,
    slice_indices: tuple[int, ...],
    lungs: bool,
    seg_uid: str = "",
) -> str:
    """Derive the GradCAM++ SC's SeriesInstanceUID deterministically (own namespace).

    A rerun with the same options writes the same series; another layer or slice selection is
    another series, so a PACS never mixes the instances of two explanations in one series.

    Args:
        source_series_uid: SeriesInstanceUID of the CT.
        model_sha256: the model's recorded graph digest.
        threshold: probability threshold applied (the target of the maps).
        series_number: the SC's SeriesNumber.
        series_description: the SC's SeriesDescription.
        layer: the explained layer.
        slice_indices: the explained slices (0-based).
        lungs: whether the lung mask was on (it changes the GGO and the text).
        seg_uid: SOPInstanceUID of the SEG referenced (it changes with the SEG's content), ``""``
            for none.

    Returns:
        ``pydicom.uid.generate_uid`` over a SHA-512 of these values.
    """
    return str(
        generate_uid(
            entropy_srcs=[
                _UID_NAMESPACE,
                source_series_uid,
                model_sha256,
                repr(float(threshold)),
                str(series_number),
                series_description,
                layer,
                ",".join(map(str, slice_indices)),
                f"lungs={lungs}",
                *([f"seg={seg_uid}"] if seg_uid else []),
                "SeriesInstanceUID",
            ]
        )
    )


def write_gradcam_sc(
    volume: CtVolume,
    figures: GradcamFigures,
    model: ModelInfo,
    folder: Path,
    *,
    threshold: float,
    measurement: GgoMeasurement,
    lungs: LungMeasurement | None = None,
    seg: Dataset | None = None,
    series_number: int = GRADCAM_SC_SERIES_NUMBER,
    series_description: str = GRADCAM_SC_SERIES_DESCRIPTION,
    software_version: str = __version__,
    verify: bool = True,
    tree: OutputTree | None = None,
) -> list[Path]:
    """Write the GradCAM++ figures of a series as an RGB Secondary Capture series.

    Instance ``i + 1`` is explained slice ``i`` (``gradcam_NNNN.dcm``, NNNN the slice's
    1-based number), drawn one at a time. Nothing is written (and no folder made) when no
    slice was explained.

    Args:
        volume: the source CT volume.
        figures: the kept maps (:class:`~ggo_cli.writers.gradcam_png.GradcamFigures`).
        model: the segmentation model (its lung window renders the CT).
        folder: the series' ``sc_gradcam`` folder (created if needed).
        threshold: the probability threshold of the prediction the maps explain.
        measurement: the series' GGO volumetry (the CSV's numbers, burned in).
        lungs: lung volumes and GGO per lung, when the lung mask was on.
        seg: the header of the series' SEG, to reference.
        series_number: SeriesNumber of the series.
        series_description: SeriesDescription of the series.
        software_version: ggo-cli's version.
        verify: read each file back and check it before renaming it into place.
        tree: the output folder: no link is followed below it, files get its mode.

    Returns:
        The files written, in slice order.

    Raises:
        InputError: series number or description out of range.
        UnsupportedSeriesError: the source headers lack attributes the SC copies.
        OutputError: an instance cannot be built, written, or fails its read-back check.
        ValueError: the maps do not match the volume, or the SEG is in another study.
    """
    check_series_options("SC", series_number, series_description)
    if not figures.slice_indices:
        return []
    lines = sc_text_lines(
        measurement,
        lungs,
        model_name=model.name,
        model_version=model.version,
        software_version=software_version,
    )
    panels = gradcam_panels(
        volume,
        figures,
        lines,
        window_center_hu=model.window_center_hu,
        window_width_hu=model.window_width_hu,
    )
    series_uid = derive_gradcam_sc_series_uid(
        volume.series.series_instance_uid,
        model.recorded_sha256,
        threshold=threshold,
        series_number=series_number,
        series_description=series_description,
        layer=figures.layer,
        slice_indices=figures.slice_indices,
        lungs=lungs is not None,
        seg_uid=str(seg.SOPInstanceUID) if seg is not None else "",
    )
    return write_sc_series(
        volume,
        panels,
        model,
        folder,
        series_uid=series_uid,
        series_number=series_number,
        series_description=series_description,
        software_version=software_version,
        seg=seg,
        verify=verify,
        tree=tree,
    )
