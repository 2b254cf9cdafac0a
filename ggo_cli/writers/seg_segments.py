"""The segments a ggo-cli SEG describes (the model's channels, then the lungs) and the AI
algorithm as contributing equipment: the descriptive half of the SEG, built with highdicom.

The algorithm item (:func:`algorithm_equipment`) is the one Contributing Equipment item the
SEG, the SR and the SC all carry, so a PACS or a reader can tell which algorithm made each of
them (issue 17 item 6; IHE Radiology Supplement AI Results (AIR) Rev 1.1, whose content
modules ask the Creator to describe each algorithm in the Contributing Equipment Sequence
(0018,A001) with Manufacturer, Manufacturer's Model Name, Software Versions and Device UID):

- Manufacturer ``ggo-cli``; Manufacturer's Model Name and Software Versions = the model's name
  and version; Device Serial Number = the graph digest's first 16 hex digits; Device UID
  (0018,1002) = :func:`algorithm_device_uid`, derived from the graph digest, so the same model
  has the same UID on every machine; the SR's device observer (TID 1004 Device Observer UID)
  is the same UID (PS3.3 C.7.5.1 expects an SR's Device UID to equal that observer UID).
- Device UID is a Type 3 attribute of the Contributing Equipment Sequence item (SOP Common
  Module, PS3.3 C.12.1, Table C.12-1: "Unique identifier of the contributing equipment").
  dciodvfy of dicom3tools 1.00~20220618 (Debian) does not list it there and warns "Attribute is not
  present in standard DICOM IOD - (0x0018,0x1002) UI Device UID" (then "Standard Extended SOP
  Class"); the writer tests accept exactly those two warnings.
- Purpose of Reference: (109102, DCM, "Processing Equipment") (:data:`ALGORITHM_PURPOSE`).
  IHE AIR asks for "Processing Algorithm", but only as a placeholder code of the IHE trial
  implementation, (Newcode1, 99IHE, "Processing Algorithm") (as MONAI Deploy App SDK's DICOM
  writers copy it); DICOM has not assigned it. CID 7005 "Contributing Equipment Purposes of
  Reference" (PS3.16; the 2024 editions, as pydicom 3.0's ``codes.cid7005`` and the HL7 DICOM
  terminology export of CID 7005 list it) holds Acquisition, Processing, Modifying,
  De-identifying, Frame Extracting, Enhanced Multi-frame Conversion, Synthesizing Equipment and
  the digitizers, and no algorithm concept. A standard code a PACS can look up beats a
  placeholder a later IHE or DICOM revision will replace, and "Processing Equipment" (equipment
  that processed the source into this object) is what the algorithm is here. Switch when CID
  7005 gains the concept.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from .. import __version__
from ..onnx.model_info import ModelInfo

SEG_MANUFACTURER = "ggo-cli"
GGO_ANATOMIC_REGION = codes.SCT.Lung
ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence
ALGORITHM_SOURCE = "ggo-cli"
LUNG_ALGORITHM_NAME = "ggo-cli lung mask"
LUNG_ALGORITHM_FAMILY = codes.cid7162.MorphologicalOperations
ALGORITHM_PURPOSE = codes.DCM.ProcessingEquipment
"""Purpose of Reference of the algorithm item (CID 7005; why not IHE AIR's placeholder: above)."""
_DEVICE_UID_NAMESPACE = "ggo-cli/device/v1"

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


def algorithm_device_uid(model: ModelInfo) -> str:
    """The algorithm's Device UID: derived from its graph digest, the same on every machine.

    Args:
        model: the model.

    Returns:
        A UID from ``generate_uid`` over the model's recorded SHA-256.
    """
    return str(generate_uid(entropy_srcs=[_DEVICE_UID_NAMESPACE, model.recorded_sha256]))


def algorithm_equipment(model: ModelInfo) -> hd.ContributingEquipment:
    """The AI algorithm as Contributing Equipment, the same item in the SEG, SR and SC.

    Args:
        model: the model (name, version, architecture, graph digest).

    Returns:
        The item: purpose :data:`ALGORITHM_PURPOSE`, Manufacturer ``ggo-cli``, model name,
        software version, device serial number and Device UID of the model (IHE AIR).
    """
    equipment = hd.ContributingEquipment(
        manufacturer=SEG_MANUFACTURER,
        purpose_of_reference=ALGORITHM_PURPOSE,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number=model.recorded_sha256[:16],
        contribution_datetime=datetime.now(),
        contribution_description=(
            f"AI segmentation by model {model.name} {model.version} "
            f"(architecture {model.architecture}, graph sha256 {model.recorded_sha256[:16]})"
        ),
    )
    # highdicom 0.28 has no argument for it; Type 3 in the item (PS3.3 Table C.12-1).
    equipment.DeviceUID = algorithm_device_uid(model)
    return equipment
