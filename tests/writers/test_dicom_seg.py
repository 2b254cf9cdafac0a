"""DICOM-SEG writer: round trip through highdicom, references, codes, UIDs, dciodvfy, dcmqi."""

from __future__ import annotations

import copy
import dataclasses
import logging
import tracemalloc
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.testing import assert_array_equal
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage

from ggo_cli.analysis.lungs import LungMasks
from ggo_cli.analysis.masks import (
    keep_inside_lungs,
    model_masks,
    seg_masks,
    segment_planes,
)
from ggo_cli.config import SEG_SERIES_DESCRIPTION, SEG_SERIES_NUMBER
from ggo_cli.domain import CtVolume, Prediction
from ggo_cli.errors import InputError, OutputError, UnsupportedSeriesError
from ggo_cli.onnx.model_info import ModelInfo
from ggo_cli.writers import dicom_seg, seg_highdicom, seg_verify
from ggo_cli.writers.dicom_seg import build_seg, verify_seg, write_seg
from ggo_cli.writers.seg_file import write_seg_file
from ggo_cli.writers.seg_frames import PixelFrames
from ggo_cli.writers.seg_segments import algorithm_device_uid
from ggo_cli.writers.seg_source import (
    derive_seg_uids,
    redact_source_values,
    seg_content_digest,
    source_character_set,
)
from tests.dciodvfy import dciodvfy_errors, dciodvfy_warnings
from tests.shared_data import DCMQI_SEG, require_shared
from tests.writers.ct_data import blob_masks, make_model, stack_segments

SOFTWARE_VERSION = "9.9.9-test"
COPIED_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "FrameOfReferenceUID",
)

DEVICE_UID_WARNINGS = (
    "Warning - Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID",
    "Warning - Dicom dataset contains attributes not present in standard DICOM IOD - this is a "
    "Standard Extended SOP Class",
)
"""What dciodvfy (dicom3tools 1.00~20220618) says of the algorithm's Contributing Equipment item.

Its Device UID (0018,1002) is correct: Type 3 in the Contributing Equipment Sequence item of
the SOP Common Module (PS3.3 C.12.1, Table C.12-1, "Unique identifier of the contributing
equipment"), and IHE AI Results asks for it. This dciodvfy release does not list it in that
item, so it calls the attribute non-standard and the object a Standard Extended SOP Class.
The SEG, SR and SC tests accept exactly these two lines (see ``writers/seg_segments.py``)."""
SOURCE_QUIRKS = ("Patient's Name", "Study ID")
"""Warnings a written object inherits from the shared real series' headers (copied as is)."""


def assert_known_dciodvfy_warnings(path: Path) -> None:
    """Fail unless dciodvfy warns about the algorithm's Device UID once (both lines) and
    otherwise only about values copied from the source."""
    warnings = [line.strip() for line in dciodvfy_warnings(path)]
    for expected in DEVICE_UID_WARNINGS:
        assert warnings.count(expected) == 1, warnings
    for line in warnings:
        assert line in DEVICE_UID_WARNINGS or any(q in line for q in SOURCE_QUIRKS), line


def _write(volume: CtVolume, prediction: Prediction, model: ModelInfo, path: Path) -> Path:
    return write_seg(volume, prediction, model, path=path, software_version=SOFTWARE_VERSION)


@pytest.fixture(scope="module")
def lung_seg_path(
    tmp_path_factory: pytest.TempPathFactory,
    lung_volume: CtVolume,
    lung_prediction: Prediction,
    model: ModelInfo,
) -> Path:
    """The 30-slice series' SEG, written once for the module."""
    return _write(
        lung_volume, lung_prediction, model, tmp_path_factory.mktemp("seg") / "ggo.seg.dcm"
    )


def test_source_headers_have_no_pixel_data(lung_volume: CtVolume) -> None:
    """The SEG is built from header-only datasets (stop_before_pixels)."""
    assert all("PixelData" not in ds for ds in lung_volume.datasets)


def test_round_trip_pixels_equal_mask_per_source_instance(
    lung_seg_path: Path, lung_volume: CtVolume, lung_prediction: Prediction
) -> None:
    """highdicom reads back, per source instance, exactly the masks written."""
    seg = hd.seg.segread(lung_seg_path)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(lung_volume.sop_instance_uids), segment_numbers=[1]
    )
    assert_array_equal(pixels.astype(bool), lung_prediction.masks)
    assert seg.SegmentationType == "BINARY"
    assert seg.SOPClassUID == SegmentationStorage
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert int(seg.BitsAllocated) == 1


def test_every_frame_present_and_references_its_source(
    lung_seg_path: Path, lung_volume: CtVolume
) -> None:
    """One frame per slice, each deriving from one distinct source CT instance."""
    seg = pydicom.dcmread(lung_seg_path)
    assert int(seg.NumberOfFrames) == len(lung_volume.datasets)
    frame_sources = [
        item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for item in seg.PerFrameFunctionalGroupsSequence
    ]
    assert sorted(frame_sources) == sorted(lung_volume.sop_instance_uids)
    (series_item,) = seg.ReferencedSeriesSequence
    assert series_item.SeriesInstanceUID == lung_volume.series.series_instance_uid
    referenced = {ref.ReferencedSOPInstanceUID for ref in series_item.ReferencedInstanceSequence}
    assert referenced == set(lung_volume.sop_instance_uids)
    assert seg.FrameOfReferenceUID == lung_volume.datasets[0].FrameOfReferenceUID


def test_frame_positions_match_source_positions(lung_seg_path: Path, lung_volume: CtVolume) -> None:
    """Each frame's ImagePositionPatient equals its source slice's (no flips, no shifts)."""
    seg = pydicom.dcmread(lung_seg_path)
    by_uid = {ds.SOPInstanceUID: ds for ds in lung_volume.datasets}
    for item in seg.PerFrameFunctionalGroupsSequence:
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        expected = [float(v) for v in by_uid[uid].ImagePositionPatient]
        assert position == pytest.approx(expected, abs=1e-4)


def test_patient_and_study_attributes_are_copied_not_invented(
    lung_seg_path: Path, lung_volume: CtVolume
) -> None:
    """Patient/study attributes equal the source's, including empty Type 2 values."""
    seg = pydicom.dcmread(lung_seg_path, stop_before_pixels=True)
    source = lung_volume.datasets[0]
    for keyword in COPIED_ATTRIBUTES:
        if keyword in source:
            assert keyword in seg, keyword
            assert seg[keyword].value == source[keyword].value, keyword
    assert seg.Modality == "SEG"


def test_codes_algorithm_and_equipment(lung_seg_path: Path, model: ModelInfo) -> None:
    """GGO segment codes, AUTOMATIC with AI algorithm identification, equipment and labels."""
    seg = hd.seg.segread(lung_seg_path)
    (segment,) = seg.SegmentSequence
    assert segment.SegmentNumber == 1
    assert segment.SegmentLabel == "GGO"
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    prop_type = segment.SegmentedPropertyTypeCodeSequence[0]
    region = segment.AnatomicRegionSequence[0]
    assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
    assert (prop_type.CodeValue, prop_type.CodingSchemeDesignator) == ("112120", "DCM")
    assert prop_type.CodeMeaning == "Ground glass opacity"
    assert (region.CodeValue, region.CodingSchemeDesignator) == ("39607008", "SCT")
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == model.name
    assert algorithm.AlgorithmVersion == model.version
    family = algorithm.AlgorithmFamilyCodeSequence[0]
    assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
    assert seg.Manufacturer == "ggo-cli"
    assert seg.ManufacturerModelName == model.name
    assert seg.SoftwareVersions == SOFTWARE_VERSION
    assert seg.DeviceSerialNumber == model.recorded_sha256[:16]
    assert seg.SeriesNumber == SEG_SERIES_NUMBER
    assert seg.SeriesDescription == SEG_SERIES_DESCRIPTION
    assert seg.ContentLabel == "GGO"
    assert "research use only" in seg.ContentDescription
    processing = [
        item
        for item in seg.ContributingEquipmentSequence
        if item.Manufacturer == "ggo-cli"
        and item.PurposeOfReferenceCodeSequence[0].CodeValue == codes.DCM.ProcessingEquipment.value
    ]
    assert len(processing) == 1
    assert processing[0].ManufacturerModelName == model.name
    assert processing[0].SoftwareVersions == model.version
    assert processing[0].DeviceSerialNumber == model.recorded_sha256[:16]
    assert processing[0].DeviceUID == algorithm_device_uid(model)


def test_empty_mask_still_writes_every_frame_empty(
    tmp_path: Path, lung_volume: CtVolume, model: ModelInfo
) -> None:
    """A GGO-free series gives a SEG with all frames present and empty."""
    empty = Prediction(masks=np.zeros((*lung_volume.hu.shape, 1), dtype=bool), threshold=0.5)
    path = _write(lung_volume, empty, model, tmp_path / "empty.seg.dcm")
    seg = hd.seg.segread(path)
    assert int(seg.NumberOfFrames) == len(lung_volume.datasets)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(lung_volume.sop_instance_uids), segment_numbers=[1]
    )
    assert pixels.shape == (*lung_volume.hu.shape, 1)
    assert not pixels.any()
    assert dciodvfy_errors(path) == []


def test_one_segment_per_model_channel(tmp_path: Path, dcmqi_volume: CtVolume) -> None:
    """A two-channel model gives two segments and slices x 2 frames, each channel intact."""
    model2 = make_model(2)
    masks = blob_masks(dcmqi_volume, n_channels=2)
    prediction = Prediction(masks=masks, threshold=0.4)
    path = _write(dcmqi_volume, prediction, model2, tmp_path / "two.seg.dcm")
    seg = hd.seg.segread(path)
    assert int(seg.NumberOfFrames) == 3 * 2
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["GGO", "Lung 1"]
    second = seg.SegmentSequence[1]
    assert second.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Lung.value
    assert "AnatomicRegionSequence" not in second
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(dcmqi_volume.sop_instance_uids), segment_numbers=[1, 2]
    )
    assert_array_equal(pixels.astype(bool), masks)
    verify_seg(path, dcmqi_volume, prediction, model=model2)
    assert dciodvfy_errors(path) == []


def test_uids_are_deterministic_across_reruns(
    lung_volume: CtVolume, lung_prediction: Prediction, model: ModelInfo
) -> None:
    """Two builds of the same inputs share Series and SOP Instance UIDs."""
    first = build_seg(lung_volume, lung_prediction, model, software_version=SOFTWARE_VERSION)
    second = build_seg(lung_volume, lung_prediction, model, software_version=SOFTWARE_VERSION)
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID != first.SOPInstanceUID
    assert pydicom.uid.UID(first.SOPInstanceUID).is_valid


def test_other_content_gets_other_uids(
    lung_volume: CtVolume, lung_prediction: Prediction, model: ModelInfo
) -> None:
    """One voxel more, or a slice fewer, is another object: a PACS that holds the first one
    must never get the second under the same UIDs (the delivery queue sends a UID once)."""
    first = build_seg(lung_volume, lung_prediction, model, software_version=SOFTWARE_VERSION)
    masks = lung_prediction.masks.copy()
    masks[0, 0, 0, 0] = not masks[0, 0, 0, 0]
    changed = build_seg(
        lung_volume,
        dataclasses.replace(lung_prediction, masks=masks),
        model,
        software_version=SOFTWARE_VERSION,
    )
    assert changed.SeriesInstanceUID != first.SeriesInstanceUID
    assert changed.SOPInstanceUID != first.SOPInstanceUID
    uids = lung_volume.sop_instance_uids
    ggo = lung_prediction.ggo
    assert seg_content_digest(uids, [ggo]) == seg_content_digest(uids, [ggo.copy()])
    assert seg_content_digest(uids[:-1], [ggo[:-1]]) != seg_content_digest(uids, [ggo])
    assert seg_content_digest(uids[::-1], [ggo]) != seg_content_digest(uids, [ggo])


def test_uids_change_with_model_threshold_and_series_identity(lung_volume: CtVolume) -> None:
    """Another model, threshold, series number or description gives other UIDs."""
    series_uid = lung_volume.series.series_instance_uid
    base = derive_seg_uids(
        series_uid, "a" * 64, threshold=0.5, series_number=1, series_description="d"
    )
    variants = [
        derive_seg_uids(
            series_uid, "b" * 64, threshold=0.5, series_number=1, series_description="d"
        ),
        derive_seg_uids(
            series_uid, "a" * 64, threshold=0.6, series_number=1, series_description="d"
        ),
        derive_seg_uids(
            series_uid, "a" * 64, threshold=0.5, series_number=2, series_description="d"
        ),
        derive_seg_uids(
            series_uid, "a" * 64, threshold=0.5, series_number=1, series_description="e"
        ),
        derive_seg_uids("1.2.3", "a" * 64, threshold=0.5, series_number=1, series_description="d"),
    ]
    for uids in variants:
        assert uids[0] != base[0]
        assert uids[1] != base[1]


def test_series_number_and_description_are_configurable(
    tmp_path: Path, dcmqi_volume: CtVolume, model: ModelInfo
) -> None:
    """SeriesNumber and SeriesDescription follow the options."""
    prediction = Prediction(masks=blob_masks(dcmqi_volume), threshold=0.5)
    path = write_seg(
        dcmqi_volume,
        prediction,
        model,
        path=tmp_path / "custom.seg.dcm",
        series_number=42,
        series_description="My AI GGO (research)",
    )
    seg = pydicom.dcmread(path, stop_before_pixels=True)
    assert seg.SeriesNumber == 42
    assert seg.SeriesDescription == "My AI GGO (research)"


@pytest.mark.parametrize(
    ("number", "description", "match"),
    [
        (0, "ok", "series number must be an integer from 1"),
        (1, "x" * 65, "at most 64 characters"),
        (1, "back\\slash", "without backslash"),
    ],
)
def test_bad_series_options_raise_input_error(
    dcmqi_volume: CtVolume, model: ModelInfo, number: int, description: str, match: str
) -> None:
    """Out-of-range SeriesNumber or SeriesDescription is a usage error."""
    prediction = Prediction(masks=blob_masks(dcmqi_volume), threshold=0.5)
    with pytest.raises(InputError, match=match):
        build_seg(
            dcmqi_volume,
            prediction,
            model,
            series_number=number,
            series_description=description,
        )


def test_missing_type2_attribute_is_refused_not_invented(
    dcmqi_volume: CtVolume, model: ModelInfo
) -> None:
    """A source without PatientBirthDate fails with UnsupportedSeriesError, naming it."""
    headers = [copy.deepcopy(ds) for ds in dcmqi_volume.datasets]
    del headers[1].PatientBirthDate
    volume = dataclasses.replace(dcmqi_volume, datasets=tuple(headers))
    prediction = Prediction(masks=blob_masks(volume), threshold=0.5)
    with pytest.raises(UnsupportedSeriesError, match="lack PatientBirthDate"):
        build_seg(volume, prediction, model)


def test_misaligned_masks_are_a_bug(dcmqi_volume: CtVolume, model: ModelInfo) -> None:
    """Masks that do not match the volume's shape raise ValueError."""
    prediction = Prediction(masks=np.zeros((2, 512, 512, 1), dtype=bool), threshold=0.5)
    with pytest.raises(ValueError, match="prediction masks must be bool"):
        build_seg(dcmqi_volume, prediction, model)


def test_verify_detects_pixel_mismatch(
    lung_seg_path: Path, lung_volume: CtVolume, lung_prediction: Prediction
) -> None:
    """A SEG whose pixels differ from the masks fails the read-back check."""
    other = lung_prediction.masks.copy()
    other[0, 0, 0, 0] = True
    with pytest.raises(OutputError, match="1 pixels differ"):
        verify_seg(lung_seg_path, lung_volume, Prediction(masks=other, threshold=0.5))


def test_verify_detects_unreferenced_source_instance(
    lung_seg_path: Path, lung_volume: CtVolume, lung_prediction: Prediction
) -> None:
    """A source instance missing from the references fails the read-back check."""
    headers = [copy.deepcopy(ds) for ds in lung_volume.datasets]
    headers[3].SOPInstanceUID = pydicom.uid.generate_uid()
    volume = dataclasses.replace(lung_volume, datasets=tuple(headers))
    with pytest.raises(OutputError, match="1 source instances not referenced"):
        verify_seg(lung_seg_path, volume, lung_prediction)


def test_verify_detects_other_codes(
    lung_seg_path: Path, lung_volume: CtVolume, lung_prediction: Prediction
) -> None:
    """A model whose codes differ from the SEG's fails the read-back check."""
    other = dataclasses.replace(make_model(), version="2.0")
    with pytest.raises(OutputError, match="label, codes or algorithm differ"):
        verify_seg(lung_seg_path, lung_volume, lung_prediction, model=other)


def test_verify_detects_an_algorithm_item_without_device_uid(
    tmp_path: Path, lung_seg_path: Path, lung_volume: CtVolume, lung_prediction: Prediction,
    model: ModelInfo,
) -> None:
    """A SEG whose algorithm item lacks the Device UID fails the read-back check with a model;
    another model's Device UID fails it too."""
    seg = pydicom.dcmread(lung_seg_path)
    verify_seg(lung_seg_path, lung_volume, lung_prediction, model=model)
    for item in seg.ContributingEquipmentSequence:
        if "DeviceUID" in item:
            del item.DeviceUID
    stripped = tmp_path / "stripped.seg.dcm"
    seg.save_as(stripped)
    with pytest.raises(OutputError, match="names the algorithm and its Device UID"):
        verify_seg(stripped, lung_volume, lung_prediction, model=model)
    other = dataclasses.replace(model, recorded_sha256="f" * 64)
    with pytest.raises(OutputError, match="names the algorithm and its Device UID"):
        verify_seg(lung_seg_path, lung_volume, lung_prediction, model=other)


def test_verify_rejects_a_non_seg_file(lung_volume: CtVolume, lung_prediction: Prediction) -> None:
    """A CT image is not accepted as the SEG."""
    ct_file = lung_volume.series.files[0]
    with pytest.raises(OutputError, match="failed its read-back check"):
        verify_seg(ct_file, lung_volume, lung_prediction)


def test_failed_verification_leaves_no_file(
    tmp_path: Path,
    dcmqi_volume: CtVolume,
    model: ModelInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the read-back check fails, neither the SEG nor a temp file is left behind."""
    target = tmp_path / "ggo.seg.dcm"
    target.write_bytes(b"old")

    def failing_check(*args: object, **kwargs: object) -> None:
        raise OutputError("DICOM-SEG failed its read-back check: forced")

    monkeypatch.setattr(dicom_seg, "verify_seg", failing_check)
    prediction = Prediction(masks=blob_masks(dcmqi_volume), threshold=0.5)
    with pytest.raises(OutputError, match="forced"):
        write_seg(dcmqi_volume, prediction, model, path=target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ggo.seg.dcm"]


def test_no_patient_data_in_logs(
    caplog: pytest.LogCaptureFixture,
    dcmqi_volume: CtVolume,
    model: ModelInfo,
) -> None:
    """Debug logs (including highdicom's warnings, which quote names) carry no patient data."""
    prediction = Prediction(masks=blob_masks(dcmqi_volume), threshold=0.5)
    with caplog.at_level(logging.DEBUG):
        build_seg(dcmqi_volume, prediction, model)
    source = dcmqi_volume.datasets[0]
    for keyword in ("PatientName", "PatientID"):
        value = str(source[keyword].value)
        assert value
        assert value not in caplog.text


@pytest.mark.parametrize("which", ["lung", "dcmqi"])
def test_dciodvfy_reports_no_errors(
    which: str,
    lung_seg_path: Path,
    tmp_path: Path,
    dcmqi_volume: CtVolume,
    model: ModelInfo,
) -> None:
    """dicom3tools' validator finds no Error in our SEGs (warnings are source quirks)."""
    if which == "lung":
        path = lung_seg_path
    else:
        prediction = Prediction(masks=blob_masks(dcmqi_volume), threshold=0.5)
        path = _write(dcmqi_volume, prediction, model, tmp_path / "dcmqi-ct.seg.dcm")
    assert dciodvfy_errors(path) == []
    assert_known_dciodvfy_warnings(path)


def _frame_keywords(seg: pydicom.Dataset) -> set[str]:
    """Functional group macros present per frame or shared."""
    shared = set(seg.SharedFunctionalGroupsSequence[0].dir())
    per_frame = set(seg.PerFrameFunctionalGroupsSequence[0].dir())
    return shared | per_frame


def test_structure_matches_dcmqi_seg(tmp_path: Path, dcmqi_volume: CtVolume) -> None:
    """Over dcmqi's CT with dcmqi's mask, our SEG has dcmqi's structure and pixels."""
    reference = hd.seg.segread(require_shared(DCMQI_SEG))
    uids = list(dcmqi_volume.sop_instance_uids)
    # dcmqi does not state SpatialLocationsPreserved, so highdicom wants this override.
    reference_pixels = reference.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], ignore_spatial_locations=True
    ).astype(bool)
    assert reference_pixels.any()
    prediction = Prediction(masks=reference_pixels, threshold=0.5)
    model = make_model()
    path = _write(dcmqi_volume, prediction, model, tmp_path / "liver-like.seg.dcm")
    ours = hd.seg.segread(path)

    assert ours.SOPClassUID == reference.SOPClassUID
    assert ours.file_meta.TransferSyntaxUID == reference.file_meta.TransferSyntaxUID
    for keyword in (
        "SegmentationType",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PhotometricInterpretation",
        "SamplesPerPixel",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "StudyInstanceUID",
        "FrameOfReferenceUID",
    ):
        assert ours[keyword].value == reference[keyword].value, keyword
    assert list(ours.ImageType) == list(reference.ImageType)
    # Referenced series: the same source series and instances.
    assert [s.SeriesInstanceUID for s in ours.ReferencedSeriesSequence] == [
        s.SeriesInstanceUID for s in reference.ReferencedSeriesSequence
    ]
    assert {
        r.ReferencedSOPInstanceUID
        for r in ours.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    } == {
        r.ReferencedSOPInstanceUID
        for r in reference.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    # Dimension index: segment number, then image position (as dcmqi).
    assert [item.DimensionIndexPointer for item in ours.DimensionIndexSequence] == [
        item.DimensionIndexPointer for item in reference.DimensionIndexSequence
    ]
    # Functional groups: dcmqi's macros are all present in ours (shared or per frame).
    assert _frame_keywords(reference) <= _frame_keywords(ours)
    for ours_item, ref_item in zip(
        ours.PerFrameFunctionalGroupsSequence,
        reference.PerFrameFunctionalGroupsSequence,
        strict=True,
    ):
        ours_source = ours_item.DerivationImageSequence[0].SourceImageSequence[0]
        ref_source = ref_item.DerivationImageSequence[0].SourceImageSequence[0]
        assert (
            ours_source.PurposeOfReferenceCodeSequence[0].CodeValue
            == ref_source.PurposeOfReferenceCodeSequence[0].CodeValue
            == "121322"
        )
        assert (
            ours_item.DerivationImageSequence[0].DerivationCodeSequence[0].CodeValue
            == ref_item.DerivationImageSequence[0].DerivationCodeSequence[0].CodeValue
            == "113076"
        )
    # Segment description: every attribute dcmqi writes, we write too.
    assert set(reference.SegmentSequence[0].dir()) <= set(ours.SegmentSequence[0].dir())
    # Pixels per source instance are dcmqi's.
    ours_pixels = ours.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1]
    ).astype(bool)
    assert_array_equal(ours_pixels, reference_pixels)


def test_redaction_hides_patient_values_and_name_components() -> None:
    """Warnings quoting a name, its components or the patient ID are redacted."""
    source = pydicom.Dataset()
    source.PatientName = "Doe^John"
    source.PatientID = "12345"
    text = redact_source_values('name "Doe^John", or Doe, John; id 12345', source)
    assert text == 'name "***", or ***, ***; id ***'


def test_empty_specific_character_set_means_default_repertoire(
    tmp_path: Path, dcmqi_volume: CtVolume, model: ModelInfo
) -> None:
    """An empty source SpecificCharacterSet (dcmqi's CT) is left out, not rejected."""
    assert dcmqi_volume.datasets[0].SpecificCharacterSet == ""
    prediction = Prediction(masks=blob_masks(dcmqi_volume), threshold=0.5)
    seg = build_seg(dcmqi_volume, prediction, model)
    assert "SpecificCharacterSet" not in seg
    source = pydicom.Dataset()
    source.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    assert source_character_set(source) == ["ISO 2022 IR 6", "ISO 2022 IR 87"]


def _lungs_of(volume: CtVolume) -> LungMasks:
    """Two boxes as right and left lung, overlapping the blob of :func:`blob_masks`."""
    n, rows, cols = volume.hu.shape
    right = np.zeros((n, rows, cols), dtype=bool)
    left = np.zeros_like(right)
    right[:, rows // 4 : 3 * rows // 4, 10 : cols // 2] = True
    left[:, rows // 4 : 3 * rows // 4, cols // 2 + 5 : cols - 10] = True
    return LungMasks(right=right, left=left)


def test_stacked_segments_are_restricted_views_handed_to_the_seg_without_copy(
    dcmqi_volume: CtVolume,
) -> None:
    masks = blob_masks(dcmqi_volume, n_channels=2)
    lungs = _lungs_of(dcmqi_volume)
    prediction, stacked = stack_segments(Prediction(masks=masks, threshold=0.5), lungs)
    both = lungs.right | lungs.left
    assert_array_equal(prediction.masks, masks & both[..., None])
    assert prediction.masks.any() and not prediction.masks.all()
    assert_array_equal(stacked.right, lungs.right)
    assert_array_equal(stacked.left, lungs.left)
    stack = seg_masks(prediction, stacked)
    assert stack.shape == (*masks.shape[:3], 4)
    assert np.shares_memory(stack, prediction.masks) and np.shares_memory(stack, stacked.left)
    assert_array_equal(stack[..., 3], lungs.left)
    # separate arrays (not one stack) are stacked in the same order, as a copy
    copied = seg_masks(Prediction(masks=prediction.masks.copy(), threshold=0.5), lungs)
    assert not np.shares_memory(copied, stack)
    assert_array_equal(copied, stack)


def test_planes_filled_in_place_are_the_segs_pixels_without_copy(
    tmp_path: Path, dcmqi_volume: CtVolume, model: ModelInfo
) -> None:
    masks = blob_masks(dcmqi_volume)
    reference = _lungs_of(dcmqi_volume)
    planes, lungs = segment_planes(dcmqi_volume.hu.shape, 1)
    np.copyto(lungs.right, reference.right)
    np.copyto(lungs.left, reference.left)
    filled = model_masks(planes, 1)
    np.copyto(filled, masks)
    prediction = keep_inside_lungs(Prediction(masks=filled, threshold=0.5), lungs)
    assert_array_equal(prediction.masks, masks & (reference.right | reference.left)[..., None])
    pixels = seg_masks(prediction, lungs)
    assert np.shares_memory(pixels, planes) and pixels.shape == (*masks.shape[:3], 3)
    assert_array_equal(pixels[..., 2], reference.left)
    path = write_seg(dcmqi_volume, prediction, model, tmp_path / "ggo.seg.dcm", lungs=lungs)
    verify_seg(path, dcmqi_volume, prediction, lungs=lungs)  # what the writer checked too


def test_overlapping_segments_are_found_slab_by_slab_and_flagged(
    tmp_path: Path, dcmqi_volume: CtVolume, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether segments overlap is highdicom's answer, counted a slab at a time (one slab's
    temporaries, not the whole volume's), found in the last slab too; the SEG says so and its
    pixels read back equal."""
    monkeypatch.setattr(seg_highdicom, "OVERLAP_SLAB_SLICES", 1)  # 3 slices: three slabs
    masks = np.zeros((*dcmqi_volume.hu.shape, 1), dtype=bool)
    masks[2, 100:140, 100:140, 0] = True  # inside the right lung, last slice only
    prediction, lungs = stack_segments(
        Prediction(masks=masks, threshold=0.5), _lungs_of(dcmqi_volume)
    )
    binary, numbers = hd.seg.SegmentationTypeValues.BINARY, np.array([1, 2, 3])
    stack = seg_masks(prediction, lungs)
    disjoint = stack.copy()
    disjoint[..., 0] = False
    for pixels, overlap in ((stack, "YES"), (disjoint, "NO")):
        tracemalloc.start()
        ours = seg_highdicom.SlabCheckedSegmentation._check_and_cast_pixel_array(
            pixels, numbers, binary, np.uint8
        )
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        theirs = hd.seg.Segmentation._check_and_cast_pixel_array(pixels, numbers, binary, np.uint8)
        assert ours[1] == theirs[1] == hd.seg.SegmentsOverlapValues(overlap)
        assert ours[0] is pixels
        assert peak < 2 * pixels[0, ..., 0].nbytes  # a slab's counts, not the volume's
    model = make_model(1)
    path = write_seg(dcmqi_volume, prediction, model, tmp_path / "ggo.seg.dcm", lungs=lungs)
    seg = hd.seg.segread(path)
    assert seg.SegmentsOverlap == "YES"  # GGO lies inside a lung
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(dcmqi_volume.sop_instance_uids),
        segment_numbers=[1, 2, 3],
    )
    assert_array_equal(pixels.astype(bool), seg_masks(prediction, lungs))


def test_verify_reads_back_slab_by_slab_and_finds_a_late_mismatch(
    tmp_path: Path, dcmqi_volume: CtVolume, model: ModelInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(seg_verify, "VERIFY_SLAB_SLICES", 2)  # 3 slices: two slabs
    masks = blob_masks(dcmqi_volume)
    masks[2, :5, :5, 0] = True
    prediction = Prediction(masks=masks, threshold=0.5)
    path = write_seg(dcmqi_volume, prediction, model, tmp_path / "ggo.seg.dcm")
    other = masks.copy()
    other[2, 0, 0, 0] = False  # one pixel of the last slab
    with pytest.raises(OutputError, match="1 pixels differ"):
        verify_seg(path, dcmqi_volume, Prediction(masks=other, threshold=0.5))


# -- --seg-frames nonempty ---------------------------------------------------------------------


def test_nonempty_frames_keep_only_segmented_frames_and_read_back_equal(
    tmp_path: Path, lung_volume: CtVolume, lung_prediction: Prediction, model: ModelInfo
) -> None:
    """``--seg-frames nonempty``: one frame per (slice, segment) with a segmented pixel; the
    pixels read back per source instance equal the masks (missing frames are empty); the SEG
    gets its own UIDs (other content) and is valid."""
    lungs = _lungs_of(lung_volume)
    path = write_seg(
        lung_volume, lung_prediction, model, tmp_path / "nonempty.seg.dcm", lungs=lungs,
        software_version=SOFTWARE_VERSION, nonempty_frames=True,
    )
    full = write_seg(
        lung_volume, lung_prediction, model, tmp_path / "all.seg.dcm", lungs=lungs,
        software_version=SOFTWARE_VERSION,
    )
    expected = np.stack(
        [lung_prediction.masks[..., 0], lungs.right, lungs.left], axis=-1
    )
    want_frames = int(np.count_nonzero(expected.any(axis=(1, 2))))
    assert 0 < want_frames < expected.shape[0] * 3
    seg = hd.seg.segread(path)
    assert int(seg.NumberOfFrames) == want_frames
    assert int(pydicom.dcmread(full).NumberOfFrames) == expected.shape[0] * 3
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(lung_volume.sop_instance_uids), segment_numbers=[1, 2, 3]
    )
    assert_array_equal(pixels.astype(bool), expected)
    assert seg.SOPInstanceUID != pydicom.dcmread(full).SOPInstanceUID
    assert dciodvfy_errors(path) == []


def test_nonempty_frames_of_an_empty_seg_keep_every_frame(
    tmp_path: Path, lung_volume: CtVolume, model: ModelInfo
) -> None:
    """A GGO-free series still says "analysed, nothing found": all frames, all empty."""
    empty = Prediction(masks=np.zeros((*lung_volume.hu.shape, 1), dtype=bool), threshold=0.5)
    path = write_seg(
        lung_volume, empty, model, tmp_path / "empty.seg.dcm",
        software_version=SOFTWARE_VERSION, nonempty_frames=True,
    )
    assert int(pydicom.dcmread(path).NumberOfFrames) == len(lung_volume.datasets)


# -- the SEG's file and its read-back ---------------------------------------------------------


@pytest.mark.parametrize("nonempty_frames", [False, True])
def test_seg_file_is_dcmwrites_bytes(
    tmp_path: Path, lung_volume: CtVolume, lung_prediction: Prediction, model: ModelInfo,
    nonempty_frames: bool,
) -> None:
    """The SEG written with each distinct per-frame value encoded once is byte for byte what
    ``dcmwrite`` writes, with lungs (3 segments) and with the GGO segment alone."""
    for lungs in (_lungs_of(lung_volume), None):
        seg = build_seg(
            lung_volume, lung_prediction, model, lungs=lungs, nonempty_frames=nonempty_frames
        )
        ours, theirs = tmp_path / "ours.dcm", tmp_path / "theirs.dcm"
        write_seg_file(ours, seg)
        pydicom.dcmwrite(theirs, seg, enforce_file_format=True)
        assert ours.read_bytes() == theirs.read_bytes()
        assert int(pydicom.dcmread(ours).NumberOfFrames) > 1


def test_frames_bits_realign_frames_that_start_inside_a_byte() -> None:
    """Frames of 3 x 5 pixels (not a multiple of 8) are read back from PS3.5 packing."""
    rng = np.random.default_rng(3)
    frames = rng.random((4, 3, 5)) > 0.5
    packed = pydicom.pixels.pack_bits(frames.reshape(-1), pad=False)
    got = PixelFrames.of(packed, 15).bits(np.array([2, -1, 0, 3]))
    want = np.packbits(frames[[2, 0, 0, 3]].reshape(4, 15), axis=1, bitorder="little")
    want[1] = 0  # an omitted frame reads as zeros
    assert_array_equal(got, want)


def test_verify_detects_frames_that_reference_the_wrong_source(
    tmp_path: Path, lung_seg_path: Path, lung_volume: CtVolume, lung_prediction: Prediction
) -> None:
    """Two frames whose source references are swapped fail the read-back check, and so do
    two frames that name the same source instance and segment."""
    seg = pydicom.dcmread(lung_seg_path)
    items = seg.PerFrameFunctionalGroupsSequence
    slice_of = {uid: k for k, uid in enumerate(lung_volume.sop_instance_uids)}

    def source(frame: int) -> pydicom.Dataset:
        return items[frame].DerivationImageSequence[0].SourceImageSequence[0]

    ggo = lung_prediction.masks[..., 0]
    counts = [
        int(ggo[slice_of[source(f).ReferencedSOPInstanceUID]].sum()) for f in range(len(items))
    ]
    first = int(np.argmax(counts))  # the GGO frame with the most pixels, and an empty one
    other = counts.index(0)
    assert counts[first] > 0
    a, b = source(first).ReferencedSOPInstanceUID, source(other).ReferencedSOPInstanceUID
    source(first).ReferencedSOPInstanceUID, source(other).ReferencedSOPInstanceUID = b, a
    swapped = tmp_path / "swapped.seg.dcm"
    seg.save_as(swapped)
    with pytest.raises(OutputError, match="pixels differ"):
        verify_seg(swapped, lung_volume, lung_prediction)
    source(other).ReferencedSOPInstanceUID = b  # frames `first` and `other` both name b
    twice = tmp_path / "twice.seg.dcm"
    seg.save_as(twice)
    with pytest.raises(OutputError, match="same source instance and segment"):
        verify_seg(twice, lung_volume, lung_prediction)
