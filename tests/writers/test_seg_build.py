"""The SEG that write_seg builds only to write: the same bytes as highdicom's full object."""

from __future__ import annotations

import copy
import dataclasses
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.testing import assert_array_equal
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

from ggo_cli.analysis.lungs import LungMasks
from ggo_cli.analysis.masks import keep_inside_lungs, model_masks, seg_masks, segment_planes
from ggo_cli.domain import CtVolume, Prediction
from ggo_cli.errors import UnsupportedSeriesError
from ggo_cli.onnx.model_info import ModelInfo
from ggo_cli.writers import dicom_seg, seg_file, seg_highdicom
from ggo_cli.writers.dicom_seg import build_seg, write_seg
from ggo_cli.writers.seg_source import check_source_headers
from tests.writers.ct_data import blob_masks

_CLOCK = ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime")


def _same_clock_and_dimension_uid(seg: pydicom.Dataset, like: pydicom.Dataset) -> None:
    """Give ``seg`` the values of ``like`` that differ from build to build: the creation
    clock (the contributions' too) and the Dimension Organization UID (highdicom draws a new
    one each time)."""
    for keyword in _CLOCK:
        setattr(seg, keyword, like[keyword].value)
    for ours, theirs in zip(
        seg.ContributingEquipmentSequence, like.ContributingEquipmentSequence, strict=True
    ):
        if "ContributionDateTime" in theirs:
            ours.ContributionDateTime = theirs.ContributionDateTime
    uid = like.DimensionOrganizationSequence[0].DimensionOrganizationUID
    seg.DimensionOrganizationSequence[0].DimensionOrganizationUID = uid
    for item in seg.DimensionIndexSequence:
        item.DimensionOrganizationUID = uid


def _built_both(
    volume: CtVolume, prediction: Prediction, model: ModelInfo, lungs: LungMasks
) -> tuple[hd.seg.Segmentation, hd.seg.Segmentation]:
    """The same SEG built by highdicom's own ``Segmentation`` and by ggo-cli's
    ``WrittenSegmentation``: (theirs, ours)."""
    built = [
        dicom_seg._build(
            volume, prediction, model, series_number=77, series_description="AI",
            software_version="1", lungs=lungs, nonempty_frames=False, segmentation=cls,
        )
        for cls in (hd.seg.Segmentation, seg_highdicom.WrittenSegmentation)
    ]
    return built[0], built[1]


@pytest.mark.parametrize("nonempty_frames", [False, True])
def test_written_seg_is_the_full_segmentations_bytes(
    tmp_path: Path, lung_volume: CtVolume, model: ModelInfo, nonempty_frames: bool
) -> None:
    """write_seg (highdicom's Segmentation without its read-side lookup tables) writes byte
    for byte what dcmwrite writes of build_seg's full object, given the same clock."""
    planes, lungs = segment_planes(lung_volume.hu.shape, 1)
    masks = model_masks(planes, 1)
    masks[...] = blob_masks(lung_volume)
    lungs.right[:, 10:-10, 10:250] = True
    lungs.left[3:-3, 10:-10, 260:-10] = True
    prediction = keep_inside_lungs(Prediction(masks=masks, threshold=0.5), lungs)
    path = write_seg(
        lung_volume, prediction, model, tmp_path / "seg.dcm", lungs=lungs,
        nonempty_frames=nonempty_frames,
    )
    written = pydicom.dcmread(path)
    full = build_seg(lung_volume, prediction, model, lungs=lungs, nonempty_frames=nonempty_frames)
    _same_clock_and_dimension_uid(full, written)
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, full, enforce_file_format=True)
    assert path.read_bytes() == buffer.getvalue()
    pixels = full.get_pixels_by_source_instance(  # the full object keeps highdicom's reading
        source_sop_instance_uids=list(lung_volume.sop_instance_uids), segment_numbers=[1, 2, 3]
    )
    assert_array_equal(pixels.astype(bool), seg_masks(prediction, lungs))


def test_overrides_change_no_element_of_highdicoms_segmentation(
    lung_volume: CtVolume, model: ModelInfo
) -> None:
    """Every override names a method highdicom's constructor calls (if highdicom renamed one,
    this test fails and the override is dead code, the SEG unchanged), and the SEG built with
    them (bool masks of three segments) equals highdicom's own in every element, pixel data
    included; only the read-side lookup tables are missing from the written-only object."""
    for name in ("_build_luts", "_encode_pixels_native", "_check_and_cast_pixel_array"):
        assert callable(getattr(hd.seg.Segmentation, name, None))
    planes, lungs = segment_planes(lung_volume.hu.shape, 1)
    model_masks(planes, 1)[...] = blob_masks(lung_volume)
    lungs.right[:, 10:-10, 10:250] = True
    lungs.left[3:-3, 10:-10, 260:-10] = True
    prediction = Prediction(masks=model_masks(planes, 1), threshold=0.5)
    theirs, ours = _built_both(lung_volume, prediction, model, lungs)
    assert hasattr(theirs, "_dim_ind_pointers") and not hasattr(ours, "_dim_ind_pointers")
    _same_clock_and_dimension_uid(ours, theirs)
    assert ours.PixelData == b"" and ours.frames is not None  # the frames are kept apart
    assert ours.frames.tobytes() == theirs.PixelData
    ours.PixelData = ours.frames.tobytes()
    assert ours == theirs  # every DICOM element equal


@pytest.mark.parametrize("size", [0, 8, 64, 512 * 512])
def test_frames_are_packed_as_pydicom_packs_them(size: int) -> None:
    """1-bit frames packed directly equal pydicom's pack_bits; a frame with another value is
    left to highdicom, which refuses it."""
    seg = seg_highdicom.SlabCheckedSegmentation.__new__(seg_highdicom.SlabCheckedSegmentation)
    pydicom.Dataset.__init__(seg)  # only the attribute the encoder reads
    seg.BitsAllocated = 1
    frame = (np.random.default_rng(size).random(size) > 0.5).astype(np.uint8)
    assert seg._encode_pixels_native(frame) == pydicom.pixels.pack_bits(frame, pad=False)
    if size:
        frame[size // 2] = 2
        with pytest.raises(ValueError, match="binary"):
            seg._encode_pixels_native(frame)


def test_missing_source_attributes_are_named(lung_volume: CtVolume) -> None:
    """The header check names each missing keyword once, whichever headers lack it."""
    headers = [copy.deepcopy(ds) for ds in lung_volume.datasets[:3]]
    del headers[0].PatientSex
    del headers[2].PatientSex
    del headers[2].StudyID
    with pytest.raises(UnsupportedSeriesError, match=r"lack PatientSex, StudyID, required"):
        check_source_headers(headers, "1.2.3")
    check_source_headers(list(lung_volume.datasets), "1.2.3")


@pytest.mark.parametrize(
    ("vr", "value"),
    [("UL", [1, 300]), ("UL", 7), ("US", 3), ("US", [1, 2, 65535]), ("SL", [-5, 2**31 - 1]),
     ("SS", -2), ("UL", []), ("UL", None)],
)
def test_integers_are_packed_as_pydicom_packs_them(vr: str, value: object) -> None:
    """The writer's own packing of integer elements equals pydicom's element writer, and
    anything else (empty, not integers) is left to pydicom."""
    elem = pydicom.DataElement(0x00209157, vr, value)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_data_element(buffer, elem)
    ours = seg_file._integers(elem)
    assert ours is None or ours == buffer.getvalue()
    assert (ours is None) == (value is None or value == [])


def test_frames_that_end_inside_a_byte_are_padded_as_highdicom_pads_them(
    dcmqi_volume: CtVolume, model: ModelInfo
) -> None:
    """3 slices of 5 x 3 pixels and 3 segments: 135 bits, 17 bytes, an odd length that
    highdicom pads with one byte; the kept frames are its Pixel Data, pad included."""
    headers = tuple(copy.deepcopy(ds) for ds in dcmqi_volume.datasets)
    for ds in headers:
        ds.Rows, ds.Columns = 5, 3
    volume = dataclasses.replace(
        dcmqi_volume, datasets=headers, hu=np.zeros((3, 5, 3), dtype=np.float32)
    )
    planes, lungs = segment_planes(volume.hu.shape, 1)
    planes[...] = np.random.default_rng(5).random(planes.shape) > 0.5
    prediction = Prediction(masks=model_masks(planes, 1), threshold=0.5)
    theirs, ours = _built_both(volume, prediction, model, lungs)
    assert len(theirs.PixelData) == 18 and theirs.PixelData.endswith(b"0")
    assert ours.frames is not None and ours.frames.tobytes() == theirs.PixelData
