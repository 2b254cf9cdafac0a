"""What a ggo-cli Secondary Capture takes from its options, its source series and its SEG.

The SeriesNumber and SeriesDescription options are checked; the SC's UIDs are derived
deterministically (the SEG's pattern, in its own namespace); and the header parts that tie an SC
image to its source are set: patient orientation, body part and laterality, the source's
acquisition equipment, and the references to the CT instances shown and to the SEG.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ..domain import CtVolume
from .sc_render import ScPanel

SC_DERIVATION = codes.cid7203.SegmentationImageDerivation
"""Derivation Code (CID 7203 "Image Derivation"): 113076 "Segmentation"."""
MONTAGE_PURPOSE = codes.cid7202.SourceImageForMontage
"""Source image purpose (CID 7202) of each CT slice in a montage: 121329."""
SLICE_PURPOSE = codes.cid7202.SourceImageForImageProcessingOperation
"""Source image purpose (CID 7202) of the one CT slice of a per-slice image: 121322."""
_UID_NAMESPACE = "ggo-cli/sc/v1"
# Patient axes of DICOM patient space (+x left, +y posterior, +z head): (negative, positive).
_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))


def derive_sc_series_uid(
    source_series_uid: str,
    model_sha256: str,
    *,
    threshold: float,
    series_number: int,
    series_description: str,
    per_slice: bool,
    lungs: bool,
    seg_uid: str = "",
) -> str:
    """Derive the SC's SeriesInstanceUID deterministically (the SEG's pattern, own namespace).

    With the SEG's SOPInstanceUID (which changes with the SEG's content), a changed result is
    a new SC series, as it is a new SEG series, rather than a second image in the old one.

    Args:
        source_series_uid: SeriesInstanceUID of the CT.
        model_sha256: the model's recorded graph digest.
        threshold: probability threshold applied.
        series_number: the SC's SeriesNumber.
        series_description: the SC's SeriesDescription.
        per_slice: whether the series has one instance per slice with GGO.
        lungs: whether the lung mask was on (it changes the GGO and the text).
        seg_uid: SOPInstanceUID of the SEG referenced, ``""`` for none.

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
                f"per_slice={per_slice}",
                f"lungs={lungs}",
                *([f"seg={seg_uid}"] if seg_uid else []),
                "SeriesInstanceUID",
            ]
        )
    )


def derive_sc_instance_uid(
    series_uid: str, *, instance_number: int, pixels: npt.NDArray[np.uint8], seg_uid: str
) -> str:
    """Derive one SC instance's SOPInstanceUID from its series, number, pixels and SEG link.

    Args:
        series_uid: the SC's SeriesInstanceUID.
        instance_number: the instance's InstanceNumber.
        pixels: the image. Shape: ``(rows, cols, 3)``.
        seg_uid: SOPInstanceUID of the SEG referenced, ``""`` for none.

    Returns:
        A UID that changes whenever the image or its references change.
    """
    digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes())
    digest.update(repr(pixels.shape).encode())
    return str(
        generate_uid(
            entropy_srcs=[
                _UID_NAMESPACE,
                series_uid,
                str(instance_number),
                digest.hexdigest(),
                seg_uid,
                "SOPInstanceUID",
            ]
        )
    )


def patient_orientation(source: Dataset) -> tuple[str, str]:
    """The patient directions closest to the source's row and column directions.

    Args:
        source: a source header (ImageOrientationPatient).

    Returns:
        PatientOrientation: the direction along a row, then down a column (``("L", "P")`` for
        a usual axial slice).
    """
    cosines = np.asarray(source.ImageOrientationPatient, dtype=np.float64)
    letters = []
    for vector in (cosines[:3], cosines[3:]):
        axis = int(np.argmax(np.abs(vector)))
        letters.append(_AXIS_LETTERS[axis][int(vector[axis] > 0)])
    return letters[0], letters[1]


def _reference(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    """An item with ReferencedSOPClassUID and ReferencedSOPInstanceUID."""
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


def _series_reference(series_uid: str, instances: Sequence[Dataset]) -> Dataset:
    """A Referenced Series Sequence item: the series and its referenced instances."""
    item = Dataset()
    item.SeriesInstanceUID = series_uid
    item.ReferencedInstanceSequence = [
        _reference(ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) for ref in instances
    ]
    return item


def add_references(
    sc: hd.sc.SCImage, volume: CtVolume, panel: ScPanel, seg: Dataset | None
) -> None:
    """Set the references that tie an SC image to its CT slices and to the SEG.

    Source Image Sequence (General Reference, PS3.3 C.12.4): each CT instance shown, purpose
    :data:`MONTAGE_PURPOSE` or :data:`SLICE_PURPOSE`; Derivation Description and Code; the SEG
    in the Referenced Image Sequence; and the Referenced Series Sequence (Common Instance
    Reference, C.12.2) listing every instance referenced, by series.

    Args:
        sc: the SC image, changed in place.
        volume: the source CT volume.
        panel: the image, with the slices it shows.
        seg: the SEG's header, or ``None``.
    """
    purpose = hd.sr.CodedConcept.from_code(MONTAGE_PURPOSE if panel.montage else SLICE_PURPOSE)
    sources = []
    for index in panel.source_indices:
        ds = volume.datasets[index]
        item = _reference(ds.SOPClassUID, ds.SOPInstanceUID)
        item.PurposeOfReferenceCodeSequence = [purpose]
        sources.append(item)
    sc.SourceImageSequence = sources
    sc.DerivationDescription = panel.description
    sc.DerivationCodeSequence = [hd.sr.CodedConcept.from_code(SC_DERIVATION)]
    series = [_series_reference(volume.series.series_instance_uid, sources)]
    if seg is not None:
        seg_ref = _reference(seg.SOPClassUID, seg.SOPInstanceUID)
        sc.ReferencedImageSequence = [seg_ref]
        series.append(_series_reference(seg.SeriesInstanceUID, [seg_ref]))
    sc.ReferencedSeriesSequence = series


def acquisition_equipment(source: Dataset) -> list[hd.ContributingEquipment]:
    """The source's acquisition equipment as a Contributing Equipment item, as highdicom adds
    it to the SEG.

    Args:
        source: a source header.

    Returns:
        One item, or none when the source has no Manufacturer.
    """
    try:
        return [hd.ContributingEquipment.for_image_acquisition(source)]
    except (AttributeError, ValueError):
        return []


def copy_body_part(sc: hd.sc.SCImage, source: Dataset) -> None:
    """Copy the source series' BodyPartExamined and Laterality (General Series, PS3.3 C.7.3.1).

    Laterality is Type 2C, required for a paired body part. A source that names neither gets
    an empty Laterality (unknown): ggo-cli cannot tell whether the part is paired.

    Args:
        sc: the SC image, changed in place.
        source: a source header.
    """
    for keyword in ("BodyPartExamined", "Laterality"):
        if keyword in source:
            sc.add(source[keyword])
    if not sc.get("BodyPartExamined") and "Laterality" not in sc:
        sc.Laterality = ""
