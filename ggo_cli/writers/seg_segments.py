"""The segments a ggo-cli SEG describes (the model's channels, then the lungs) and the AI
algorithm as contributing equipment: the descriptive half of the SEG, built with highdicom."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from .. import __version__
from ..onnx.model_info import ModelInfo

SEG_MANUFACTURER = "ggo-cli"
GGO_ANATOMIC_REGION = codes.SCT.Lung
ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence
ALGORITHM_SOURCE = "ggo-cli"
LUNG_ALGORITHM_NAME = "ggo-cli lung mask"
LUNG_ALGORITHM_FAMILY = codes.cid7162.MorphologicalOperations

SEGMENT_COLORS_RGB: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),  # GGO: red, as in the overlay PNGs
    (0, 160, 255),
    (255, 200, 0),
    (0, 200, 80),
    (200, 0, 255),
    (255, 128, 0),
)
"""Recommended display colours per segment, cycled; fixed so reruns look the same."""


@dataclass(frozen=True, slots=True)
class LungSegment:
    """How a lung is coded as a SEG segment."""

    label: str
    category: Code
    property_type: Code
    laterality: Code
    rgb: tuple[int, int, int]


LUNG_SEGMENTS: tuple[LungSegment, LungSegment] = (
    LungSegment("Right lung", codes.SCT.AnatomicalStructure, codes.SCT.Lung, codes.SCT.Right,
                (128, 174, 128)),
    LungSegment("Left lung", codes.SCT.AnatomicalStructure, codes.SCT.Lung, codes.SCT.Left,
                (111, 184, 210)),
)
"""Right then left lung, after the model's segments (codes as issue 6 and dcmqi use them)."""


def lung_descriptions(first_number: int) -> list[hd.seg.SegmentDescription]:
    """Right and left lung segments, numbered from ``first_number``."""
    from ..analysis.lungs import LUNG_THRESHOLD_HU  # deferred: lungs imports SimpleITK

    algorithm = hd.AlgorithmIdentificationSequence(
        name=LUNG_ALGORITHM_NAME,
        version=__version__,
        family=LUNG_ALGORITHM_FAMILY,
        source=ALGORITHM_SOURCE,
        parameters={"threshold_hu": f"{LUNG_THRESHOLD_HU:g}"},
    )
    descriptions = []
    for offset, spec in enumerate(LUNG_SEGMENTS):
        description = hd.seg.SegmentDescription(
            segment_number=first_number + offset,
            segment_label=spec.label,
            segmented_property_category=spec.category,
            segmented_property_type=spec.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*spec.rgb),
        )
        # highdicom has no argument for it; DICOM puts laterality here (PS3.3 C.8.20.4).
        description.SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(spec.laterality)
        ]
        descriptions.append(description)
    return descriptions


def segment_descriptions(model: ModelInfo, threshold: float) -> list[hd.seg.SegmentDescription]:
    """One SegmentDescription per model channel (segment number = channel + 1)."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name,
        version=model.version,
        family=ALGORITHM_FAMILY,
        source=ALGORITHM_SOURCE,
        parameters={"threshold": f"{threshold:g}"},
    )
    descriptions = []
    for index, spec in enumerate(model.segments):
        rgb = SEGMENT_COLORS_RGB[index % len(SEGMENT_COLORS_RGB)]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=index + 1,
                segment_label=spec.label,
                segmented_property_category=spec.property_category,
                segmented_property_type=spec.property_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                # Channel 0 is GGO by the model contract; GGO is a finding in the lung.
                anatomic_regions=[GGO_ANATOMIC_REGION] if index == 0 else None,
                display_color=hd.color.CIELabColor.from_rgb(*rgb),
            )
        )
    return descriptions


def algorithm_equipment(model: ModelInfo) -> hd.ContributingEquipment:
    """The AI algorithm as Contributing Equipment (IHE AIR: processing equipment)."""
    return hd.ContributingEquipment(
        manufacturer=SEG_MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number=model.recorded_sha256[:16],
        contribution_datetime=datetime.now(),
        contribution_description=(
            f"AI segmentation by model {model.name} {model.version} "
            f"(architecture {model.architecture}, graph sha256 {model.recorded_sha256[:16]})"
        ),
    )
