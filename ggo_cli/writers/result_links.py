"""The series-level links between a series' SEG, SR and SC, checked as one result set.

A PACS files each object by study and series and a viewer links them by references, so the
three objects ggo-cli writes for one CT series must agree (issue 17 item 6):

- one study (StudyInstanceUID), one patient (PatientID; compared, never shown) and, where an
  object has one, one FrameOfReferenceUID;
- distinct series: the CT, the SEG, the SR and the SC series are four SeriesInstanceUIDs, and
  every SC instance lies in the one SC series; with ``segment --explain``, the GradCAM++ SC
  instances (:mod:`ggo_cli.writers.gradcam_sc`) lie in a fifth series of their own;
- the SEG references the CT series (Referenced Series Sequence, one series);
- the SR's evidence (Current Requested Procedure Evidence Sequence) holds the SEG's series
  with the SEG instance and the CT series with CT instances the SEG references;
- each SC instance (GradCAM++ ones too) references the SEG's series with the SEG instance
  and the CT series with CT instances the SEG references (Referenced Series Sequence, as
  :func:`ggo_cli.writers.sc_header.add_references` writes it);
- the same algorithm item (:func:`ggo_cli.writers.seg_segments.algorithm_equipment`: Device
  UID, model name, version, serial number) in the Contributing Equipment of all of them.

The objects are the headers read back from the files written (``stop_before_pixels=True``).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from ..errors import OutputError
from .seg_segments import ALGORITHM_PURPOSE, SEG_MANUFACTURER

__all__ = ["check_result_links"]

_ALGORITHM_KEYWORDS = (
    "DeviceUID",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DeviceSerialNumber",
)
"""What makes two algorithm items the same algorithm (the contribution time may differ)."""


def _referenced_series(ds: Dataset, keyword: str) -> dict[str, set[str]]:
    """SOP Instance UIDs by series UID of a Referenced Series Sequence (``keyword``)."""
    series: dict[str, set[str]] = {}
    for item in ds.get(keyword, []):
        instances = series.setdefault(str(item.get("SeriesInstanceUID", "")), set())
        for ref in item.get("ReferencedInstanceSequence", item.get("ReferencedSOPSequence", [])):
            instances.add(str(ref.get("ReferencedSOPInstanceUID", "")))
    return series


def _evidence_series(sr: Dataset, study_uid: str) -> dict[str, set[str]] | None:
    """The SR's evidence in ``study_uid`` by series, ``None`` when the study is not listed."""
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        if study.get("StudyInstanceUID") == study_uid:
            return _referenced_series(study, "ReferencedSeriesSequence")
    return None


def _algorithm(ds: Dataset) -> tuple[str, ...] | None:
    """The algorithm item's identity, ``None`` unless exactly one item has a Device UID."""
    items = [
        item
        for item in ds.get("ContributingEquipmentSequence", [])
        if item.get("Manufacturer") == SEG_MANUFACTURER
        and item.get("PurposeOfReferenceCodeSequence")
        and item.PurposeOfReferenceCodeSequence[0].get("CodeValue") == ALGORITHM_PURPOSE.value
        and item.PurposeOfReferenceCodeSequence[0].get("CodingSchemeDesignator")
        == ALGORITHM_PURPOSE.scheme_designator
    ]
    if len(items) != 1 or not items[0].get("DeviceUID"):
        return None
    return tuple(str(items[0].get(keyword, "")) for keyword in _ALGORITHM_KEYWORDS)


def _links_to_seg_and_ct(
    name: str,
    series: dict[str, set[str]] | None,
    seg: Dataset,
    ct_uid: str,
    ct_instances: set[str],
    what: str,
) -> list[str]:
    """Whether ``series`` (a reference list of ``name``) holds the SEG and CT instances."""
    if series is None:
        return [f"the {name}'s {what} does not list the study"]
    problems = []
    if str(seg.SOPInstanceUID) not in series.get(str(seg.SeriesInstanceUID), set()):
        problems.append(f"the {name}'s {what} lacks the SEG {seg.SOPInstanceUID} in its series")
    ct_refs = series.get(ct_uid, set())
    if not ct_refs:
        problems.append(f"the {name}'s {what} lacks the CT series {ct_uid}")
    elif not ct_refs <= ct_instances:
        problems.append(
            f"the {name}'s {what} names {len(ct_refs - ct_instances)} CT instances the SEG "
            "does not reference"
        )
    return problems


def _seg_problems(
    seg: Dataset, source_series_uid: str | None
) -> tuple[list[str], str, set[str]]:
    """The SEG's own problems, its CT series UID and the CT instances it references."""
    problems = []
    if seg.get("SOPClassUID") != SegmentationStorage:
        problems.append(f"the SEG has SOP class {seg.get('SOPClassUID')}, not Segmentation")
    referenced = _referenced_series(seg, "ReferencedSeriesSequence")
    ct_uid = source_series_uid or (next(iter(referenced)) if len(referenced) == 1 else "")
    if set(referenced) != {ct_uid} or not referenced[ct_uid]:
        problems.append(
            f"the SEG references series {sorted(referenced)}, not the CT series "
            f"{source_series_uid or '(one series)'}"
        )
    if not seg.get("FrameOfReferenceUID"):
        problems.append("the SEG has no FrameOfReferenceUID")
    return problems, ct_uid, referenced.get(ct_uid, set())


def _series_problems(
    ct_uid: str, objects: Sequence[Dataset], sc_groups: Sequence[tuple[str, Sequence[Dataset]]]
) -> list[str]:
    """Each SC group in one series, and the CT, the ``objects`` (SEG, SR) and the SC groups
    in distinct series."""
    problems = []
    kinds = [ct_uid, *(str(ds.get("SeriesInstanceUID", "")) for ds in objects)]
    for label, images in sc_groups:
        series = {str(ds.get("SeriesInstanceUID", "")) for ds in images}
        if len(series) > 1:
            problems.append(f"the {label} instances lie in {len(series)} series, not one")
        kinds += sorted(series)
    if len(set(kinds)) != len(kinds):
        labels = ", ".join(["CT", "SEG", "SR", *(label for label, _ in sc_groups[:-1])])
        problems.append(
            f"the {labels} and {sc_groups[-1][0]} series do not have distinct SeriesInstanceUIDs"
        )
    return problems


def _shared_problems(named: Sequence[tuple[str, Dataset]]) -> list[str]:
    """Study, patient and frame of reference shared with the SEG; one algorithm item
    (``named[0]`` is the SEG)."""
    seg = named[0][1]
    problems = []
    for keyword in ("StudyInstanceUID", "PatientID", "FrameOfReferenceUID"):
        for name, ds in named[1:]:
            if keyword in ds and ds.get(keyword) != seg.get(keyword):
                problems.append(f"the {name}'s {keyword} differs from the SEG's")  # never shown
    reference = _algorithm(seg)
    if reference is None:
        problems.append("the SEG has no single algorithm Contributing Equipment item with a "
                        "Device UID")
    for name, ds in named[1:]:
        if _algorithm(ds) != reference:
            problems.append(f"the {name}'s algorithm Contributing Equipment item (Device UID, "
                            "model name, version, serial number) differs from the SEG's")
    return problems


def check_result_links(
    seg: Dataset,
    sr: Dataset | None,
    sc: Sequence[Dataset],
    *,
    source_series_uid: str | None = None,
    gradcam_sc: Sequence[Dataset] = (),
) -> None:
    """Check that a series' SEG, SR and SC form one linked result set.

    Args:
        seg: the SEG's header as written (read back, ``stop_before_pixels=True``).
        sr: the SR's header, or ``None`` when no SR was written.
        sc: the SC instances' headers (none when no SC was written).
        source_series_uid: the CT series' SeriesInstanceUID; when ``None``, the one series the
            SEG references is taken as the CT series.
        gradcam_sc: the GradCAM++ SC instances' headers (none without ``--explain``),
            checked as the SC instances are, as a series of their own.

    Raises:
        OutputError: (not fatal) a link does not hold; one line names every mismatch: what
            differs and in which object, with UIDs, never patient values.
    """
    problems, ct_uid, ct_instances = _seg_problems(seg, source_series_uid)
    named: list[tuple[str, Dataset]] = [("SEG", seg)]
    if sr is not None:
        named.append(("SR", sr))
        if sr.get("SOPClassUID") != Comprehensive3DSRStorage:
            problems.append(f"the SR has SOP class {sr.get('SOPClassUID')}, not Comprehensive "
                            "3D SR")
        evidence = _evidence_series(sr, str(seg.get("StudyInstanceUID", "")))
        problems += _links_to_seg_and_ct("SR", evidence, seg, ct_uid, ct_instances, "evidence")
    objects = [ds for _, ds in named]
    sc_groups: list[tuple[str, Sequence[Dataset]]] = [("SC", sc)]
    if gradcam_sc:
        sc_groups.append(("GradCAM++ SC", gradcam_sc))
    for label, images in sc_groups:
        for index, image in enumerate(images, start=1):
            name = f"{label} {image.get('InstanceNumber', index)}"
            named.append((name, image))
            if image.get("SOPClassUID") != SecondaryCaptureImageStorage:
                problems.append(f"the {name} has SOP class {image.get('SOPClassUID')}, not "
                                "Secondary Capture")
            problems += _links_to_seg_and_ct(
                name, _referenced_series(image, "ReferencedSeriesSequence"), seg, ct_uid,
                ct_instances, "Referenced Series Sequence",
            )
    problems += _series_problems(ct_uid, objects, sc_groups)
    problems += _shared_problems(named)
    if problems:
        raise OutputError(
            f"Series {ct_uid}: its SEG, SR and SC do not link up: {'; '.join(problems)} (they "
            "must come from one run: remove the series' DICOM outputs and run again)"
        )
