"""Secondary Capture writer: RGB pixels equal the rendered overlay, burned-in text without
patient data, copied patient/study modules, references to the CT and the SEG, deterministic
UIDs, dciodvfy."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_array_equal
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from ggo_cli.domain import (
    CtVolume,
    GgoMeasurement,
    LungMeasurement,
    Prediction,
    SeriesInfo,
    SeriesOutcome,
    SeriesStatus,
)
from ggo_cli.errors import InputError, OutputError
from ggo_cli.onnx.model_info import ModelInfo
from ggo_cli.writers import dicom_sc
from ggo_cli.writers.dicom_sc import (
    SC_SERIES_DESCRIPTION,
    SC_SERIES_NUMBER,
    verify_sc,
    write_sc,
)
from ggo_cli.writers.dicom_seg import build_seg
from ggo_cli.writers.overlay_png import LABEL_PX, render_overlay, render_slice
from ggo_cli.writers.report_csv import outcome_row
from ggo_cli.writers.sc_header import patient_orientation
from ggo_cli.writers.sc_render import (
    MONTAGE_NAME,
    NOT_AVAILABLE,
    RESEARCH_USE_TEXT,
    burn_in_text,
    sc_text_lines,
    text_band_px,
)
from ggo_cli.writers.seg_segments import algorithm_device_uid
from tests.dciodvfy import dciodvfy_errors
from tests.dicom_factory import make_ct_series
from tests.writers.ct_data import load_ct_volume
from tests.writers.test_dicom_seg import assert_known_dciodvfy_warnings

SOFTWARE_VERSION = "9.9.9-test"
GGO_SLICES = (2, 3)
PATIENT = {"PatientName": "Doe^Jane^Q", "PatientID": "MRN-7734521", "PatientBirthDate": "19450317"}
PATIENT_STRINGS = ("Doe", "Jane", "MRN-7734521", "7734521", "19450317", "1945")
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
)
LUNGS = LungMeasurement(
    lung_volume_ml=1000.5,
    left_lung_volume_ml=480.25,
    right_lung_volume_ml=520.25,
    ggo_percent_of_lung=0.123456,
    left_ggo_volume_ml=0.0,
    right_ggo_volume_ml=1.234567891,
    left_ggo_percent=float("nan"),
    right_ggo_percent=0.2373,
)
RED_MARGIN = 60


def _red(rgb: np.ndarray) -> np.ndarray:
    """Pixels clearly red (GGO fill or outline), never grey, white or black."""
    wide = rgb.astype(np.int16)
    red: np.ndarray = (wide[..., 0] - wide[..., 1] > RED_MARGIN) & (
        wide[..., 0] - wide[..., 2] > RED_MARGIN
    )
    return red


def _measurement(volume: CtVolume, ggo: np.ndarray) -> GgoMeasurement:
    voxels = int(ggo.sum())
    return GgoMeasurement(
        voxel_volume_ml=volume.voxel_volume_ml,
        ggo_voxels=voxels,
        ggo_volume_ml=voxels * volume.voxel_volume_ml,
        ggo_slice_count=int(ggo.reshape(len(ggo), -1).any(axis=1).sum()),
    )


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> CtVolume:
    """A 6-slice synthetic chest CT whose headers carry a (fake) patient's name, ID and birth
    date."""
    series = make_ct_series(tmp_path_factory.mktemp("ct"), (6, 48, 40))
    loaded = load_ct_volume(series.paths[0].parent)
    headers = []
    for ds in loaded.datasets:
        named = copy.deepcopy(ds)
        for keyword, value in PATIENT.items():
            setattr(named, keyword, value)
        headers.append(named)
    return dataclasses.replace(loaded, datasets=tuple(headers))


@pytest.fixture(scope="module")
def prediction(volume: CtVolume) -> Prediction:
    """A GGO box on two slices."""
    masks = np.zeros((*volume.hu.shape, 1), dtype=bool)
    for index in GGO_SLICES:
        masks[index, 14:26, 8:22, 0] = True
    masks[GGO_SLICES[0], 14, 8, 0] = False  # an irregular corner, so flips would show
    return Prediction(masks=masks, threshold=0.5)


@pytest.fixture(scope="module")
def seg(volume: CtVolume, prediction: Prediction, model: ModelInfo) -> Dataset:
    """The SEG of the same prediction (built in memory, as the run builds it)."""
    return build_seg(volume, prediction, model, software_version=SOFTWARE_VERSION)


def _write(
    volume: CtVolume,
    prediction: Prediction,
    model: ModelInfo,
    folder: Path,
    **options: object,
) -> list[Path]:
    settings: dict[str, object] = {
        "measurement": _measurement(volume, prediction.ggo),
        "lungs": LUNGS,
        "software_version": SOFTWARE_VERSION,
    }
    settings.update(options)
    return write_sc(volume, prediction, model, folder, **settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sc_paths(
    tmp_path_factory: pytest.TempPathFactory,
    volume: CtVolume,
    prediction: Prediction,
    model: ModelInfo,
    seg: Dataset,
) -> list[Path]:
    """The synthetic series' SC: the montage and one instance per GGO slice."""
    return _write(volume, prediction, model, tmp_path_factory.mktemp("sc"), seg=seg,
                  per_slice=True)


def _lines(volume: CtVolume, prediction: Prediction, model: ModelInfo) -> tuple[str, ...]:
    return sc_text_lines(
        _measurement(volume, prediction.ggo),
        LUNGS,
        model_name=model.name,
        model_version=model.version,
        software_version=SOFTWARE_VERSION,
    )


def test_montage_then_one_instance_per_ggo_slice(sc_paths: list[Path]) -> None:
    """Instance 1 is the montage; each slice with GGO follows, one series, numbered 1..n."""
    assert [p.name for p in sc_paths] == [MONTAGE_NAME, "slice_0003.dcm", "slice_0004.dcm"]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sc_paths]
    assert [int(ds.InstanceNumber) for ds in headers] == [1, 2, 3]
    assert len({ds.SeriesInstanceUID for ds in headers}) == 1
    assert len({ds.SOPInstanceUID for ds in headers}) == 3


def test_reads_back_as_rgb_secondary_capture(sc_paths: list[Path]) -> None:
    """pydicom reads an 8-bit RGB SC with burned-in annotation, made by a workstation."""
    for path in sc_paths:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.PhotometricInterpretation == "RGB"
        assert (ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored) == (3, 8, 8)
        assert ds.PlanarConfiguration == 0
        assert ds.BurnedInAnnotation == "YES"
        assert ds.ConversionType == "WSD"
        assert ds.SeriesNumber == SC_SERIES_NUMBER
        assert ds.SeriesDescription == SC_SERIES_DESCRIPTION
        assert ds.PatientOrientation == ["L", "P"]
        assert "PixelSpacing" not in ds
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns, 3)


def test_montage_pixels_are_the_overlay_under_the_text_band(
    sc_paths: list[Path], volume: CtVolume, prediction: Prediction, model: ModelInfo
) -> None:
    """The montage instance holds overlay.png's montage below the text band, pixel for pixel."""
    pixels = pydicom.dcmread(sc_paths[0]).pixel_array
    lines = _lines(volume, prediction, model)
    montage = np.asarray(
        render_overlay(
            volume,
            prediction.ggo,
            window_center_hu=model.window_center_hu,
            window_width_hu=model.window_width_hu,
        )
    )
    band = text_band_px(lines)
    height, width = montage.shape[:2]
    assert pixels.shape[0] == band + height
    assert_array_equal(pixels[band:, :width], montage)
    assert not pixels[band:, width:].any()  # any widening for the text is black
    assert _red(pixels[band:]).any()
    assert not _red(pixels[:band]).any()


def test_slice_instance_is_red_exactly_on_the_mask(
    sc_paths: list[Path], volume: CtVolume, prediction: Prediction, model: ModelInfo
) -> None:
    """A per-slice instance shows the slice at native size, red only where the mask is and on
    its whole outline."""
    index = GGO_SLICES[0]
    pixels = pydicom.dcmread(sc_paths[1]).pixel_array
    top = text_band_px(_lines(volume, prediction, model)) + LABEL_PX
    rows, cols = volume.hu.shape[1:]
    image = pixels[top : top + rows, :cols]
    expected = render_slice(
        volume.hu[index],
        prediction.ggo[index],
        window_center_hu=model.window_center_hu,
        window_width_hu=model.window_width_hu,
    )
    assert_array_equal(image, expected)
    mask = prediction.ggo[index]
    red = _red(image)
    assert not (red & ~mask).any()
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    outline = mask & ~interior
    assert outline.any() and red[outline].all()


def test_text_band_is_drawn_above_an_unchanged_image() -> None:
    """With text, the band holds the (yellow) warning; without, the image is all there is."""
    image = Image.new("RGB", (300, 40), (90, 90, 90))
    lines = ("RESEARCH USE ONLY - not for diagnosis", "GGO 1.000000 mL")
    with_text = burn_in_text(image, lines)
    without = burn_in_text(image, ())
    band = text_band_px(lines)
    assert without.shape == (40, 300, 3)
    assert with_text.shape == (band + 40, 300, 3)
    assert_array_equal(with_text[band:], without)
    assert with_text[:band].any()
    first_line = with_text[: band // 2].astype(np.int16)
    yellow = (first_line[..., 0] > 128) & (first_line[..., 1] > 128) & (first_line[..., 2] < 64)
    assert yellow.any()  # the warning is drawn in WARNING_RGB (anti-aliased)
    wide = burn_in_text(Image.new("RGB", (20, 10)), lines)
    assert wide.shape[1] > 20  # the canvas widens to the text


def test_text_lines_print_the_csv_digits() -> None:
    """Volumes and percentages appear exactly as ggo_volumes.csv prints them."""
    measurement = GgoMeasurement(
        voxel_volume_ml=0.000123, ggo_voxels=10037, ggo_volume_ml=1.2345, ggo_slice_count=4
    )
    lines = sc_text_lines(
        measurement, LUNGS, model_name="m", model_version="1.2", software_version="3.4"
    )
    series = SeriesInfo(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        files=(),
        location="study/series",
        study_date="",
        series_description="",
        patient_id="",
    )
    outcome = SeriesOutcome(
        series=series,
        status=SeriesStatus.OK,
        measurement=measurement,
        lungs=LUNGS,
    )
    row = outcome_row(outcome, Path("."), model_name="m", model_version="1.2")
    text = "\n".join(lines)
    assert lines[0] == RESEARCH_USE_TEXT
    assert f"GGO {row['ggo_volume_ml']} mL" in lines[1]
    for column in (
        "lung_volume_ml",
        "right_lung_volume_ml",
        "left_lung_volume_ml",
        "right_ggo_volume_ml",
        "left_ggo_volume_ml",
        "ggo_percent_of_lung",
        "right_ggo_percent",
    ):
        assert row[column] and row[column] in text, column
    assert row["left_ggo_percent"] == "" and f"= {NOT_AVAILABLE} %" in lines[4]
    assert lines[-1] == "model m 1.2, ggo-cli 3.4"
    without_lungs = sc_text_lines(
        measurement, None, model_name="m", model_version="1.2", software_version="3.4"
    )
    assert without_lungs == (lines[0], lines[1], lines[-1])


def test_no_patient_identifier_is_ever_drawn(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    volume: CtVolume,
    prediction: Prediction,
    model: ModelInfo,
) -> None:
    """Every string drawn for the SC of a named patient is free of the name, ID and birth date,
    though the header carries them."""
    drawn: list[str] = []
    original = ImageDraw.ImageDraw.text

    def recording_text(self: ImageDraw.ImageDraw, xy: object, text: object, *a: object,
                       **k: object) -> None:
        drawn.append(str(text))
        original(self, xy, text, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", recording_text)
    paths = _write(volume, prediction, model, tmp_path, per_slice=True)
    assert RESEARCH_USE_TEXT in drawn
    for text in (*drawn, *_lines(volume, prediction, model)):
        for secret in PATIENT_STRINGS:
            assert secret not in text, (secret, text)
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert str(header.PatientName) == PATIENT["PatientName"]


def test_patient_and_study_modules_equal_the_source(
    sc_paths: list[Path], volume: CtVolume
) -> None:
    """Patient and study attributes are the source's, empty Type 2 values included."""
    source = volume.datasets[0]
    for path in sc_paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in COPIED_ATTRIBUTES:
            if keyword in source:
                assert keyword in ds, keyword
                assert ds[keyword].value == source[keyword].value, keyword
        assert ds.BodyPartExamined == source.BodyPartExamined
        assert ds.SpecificCharacterSet == source.SpecificCharacterSet


def test_references_link_the_ct_and_the_seg(
    sc_paths: list[Path], volume: CtVolume, seg: Dataset
) -> None:
    """Source images are the CT instances shown; the SEG and both series are referenced."""
    montage = pydicom.dcmread(sc_paths[0], stop_before_pixels=True)
    shown = {item.ReferencedSOPInstanceUID for item in montage.SourceImageSequence}
    assert shown == {volume.datasets[i].SOPInstanceUID for i in GGO_SLICES}
    purposes = {
        item.PurposeOfReferenceCodeSequence[0].CodeValue for item in montage.SourceImageSequence
    }
    assert purposes == {codes.DCM.SourceImageForMontage.value}
    (seg_ref,) = montage.ReferencedImageSequence
    assert seg_ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert seg_ref.ReferencedSOPClassUID == seg.SOPClassUID
    series = {item.SeriesInstanceUID: item for item in montage.ReferencedSeriesSequence}
    assert set(series) == {volume.series.series_instance_uid, seg.SeriesInstanceUID}
    ct_refs = series[volume.series.series_instance_uid].ReferencedInstanceSequence
    assert {ref.ReferencedSOPInstanceUID for ref in ct_refs} == shown
    assert montage.StudyInstanceUID == seg.StudyInstanceUID
    assert montage.DerivationCodeSequence[0].CodeValue == "113076"
    single = pydicom.dcmread(sc_paths[1], stop_before_pixels=True)
    (source,) = single.SourceImageSequence
    assert source.ReferencedSOPInstanceUID == volume.datasets[GGO_SLICES[0]].SOPInstanceUID
    assert source.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"


def test_algorithm_equipment_is_the_segs_item_with_its_device_uid(
    sc_paths: list[Path], seg: Dataset, model: ModelInfo
) -> None:
    """The AI algorithm's Contributing Equipment item is the SEG's, Device UID included:
    manufacturer, model name, version, serial number and Device UID as IHE AI Results asks."""
    ignored = {"ContributionDateTime"}

    def algorithm_items(ds: Dataset) -> list[dict[str, object]]:
        return [
            {elem.keyword: elem.value for elem in item if elem.keyword not in ignored}
            for item in ds.ContributingEquipmentSequence
            if item.get("ManufacturerModelName") == model.name
        ]

    sc = pydicom.dcmread(sc_paths[0], stop_before_pixels=True)
    (item,) = algorithm_items(sc)
    assert [item] == algorithm_items(seg)
    assert item["DeviceUID"] == algorithm_device_uid(model)
    assert (item["Manufacturer"], item["ManufacturerModelName"], item["SoftwareVersions"]) == (
        "ggo-cli",
        model.name,
        model.version,
    )
    assert sc.Manufacturer == "ggo-cli"
    assert sc.ManufacturerModelName == model.name
    assert sc.SoftwareVersions == SOFTWARE_VERSION
    assert sc.DeviceSerialNumber == model.recorded_sha256[:16]
    assert sc.SecondaryCaptureDeviceManufacturerModelName == model.name


def test_uids_are_deterministic_and_follow_the_content(
    tmp_path: Path,
    sc_paths: list[Path],
    volume: CtVolume,
    prediction: Prediction,
    model: ModelInfo,
    seg: Dataset,
) -> None:
    """A second write gives the same UIDs; another number, text or SEG link gives others."""

    def uids(paths: list[Path]) -> list[tuple[str, str]]:
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        return [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in headers]

    first = uids(sc_paths)
    assert uids(_write(volume, prediction, model, tmp_path / "again", seg=seg,
                       per_slice=True)) == first
    (renumbered,) = uids(_write(volume, prediction, model, tmp_path / "n", seg=seg,
                                series_number=7))
    assert renumbered[0] != first[0][0]
    (no_seg,) = uids(_write(volume, prediction, model, tmp_path / "s"))
    (no_lungs,) = uids(_write(volume, prediction, model, tmp_path / "l", lungs=None))
    montage_uids = {first[0][1], renumbered[1], no_seg[1], no_lungs[1]}
    assert len(montage_uids) == 4
    assert all(pydicom.uid.UID(uid).is_valid for uid in montage_uids)


def test_dciodvfy_reports_no_error(sc_paths: list[Path]) -> None:
    """dicom3tools' dciodvfy finds no error in any instance, and warns only about the Device
    UID of the algorithm's Contributing Equipment item."""
    for path in sc_paths:
        assert dciodvfy_errors(path) == [], path.name
        assert_known_dciodvfy_warnings(path)


@pytest.mark.parametrize(
    ("number", "description", "match"),
    [
        (0, "ok", "SC series number must be an integer from 1"),
        (1, "x" * 65, "at most 64 characters"),
        (1, "line\nbreak", "without backslash or control characters"),
    ],
)
def test_bad_series_options_raise_input_error(
    tmp_path: Path,
    volume: CtVolume,
    prediction: Prediction,
    model: ModelInfo,
    number: int,
    description: str,
    match: str,
) -> None:
    """Out-of-range SeriesNumber or SeriesDescription is a usage error, before any file."""
    with pytest.raises(InputError, match=match):
        _write(volume, prediction, model, tmp_path / "sc", series_number=number,
               series_description=description)
    assert not (tmp_path / "sc").exists()


def test_a_seg_of_another_study_is_a_bug(
    tmp_path: Path, volume: CtVolume, prediction: Prediction, model: ModelInfo, seg: Dataset
) -> None:
    """Referencing a SEG from another study raises ValueError."""
    other = copy.deepcopy(seg)
    other.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="SEG to reference is in another study"):
        _write(volume, prediction, model, tmp_path, seg=other)


def test_verify_detects_changed_pixels(sc_paths: list[Path]) -> None:
    """The read-back check names pixels that differ from the image written."""
    ds = pydicom.dcmread(sc_paths[1])
    pixels = ds.pixel_array.copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    with pytest.raises(OutputError, match="read back differs: 1 pixels"):
        verify_sc(sc_paths[1], ds, pixels)


def test_failed_check_leaves_no_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    volume: CtVolume,
    prediction: Prediction,
    model: ModelInfo,
) -> None:
    """An instance that fails its read-back check never appears, nor does its temporary file."""

    def failing(*_: object, **__: object) -> None:
        raise OutputError("read back differs: test")

    monkeypatch.setattr(dicom_sc, "verify_sc", failing)
    with pytest.raises(OutputError, match="test"):
        _write(volume, prediction, model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_patient_orientation_follows_the_source_directions() -> None:
    """Row and column directions map to the closest patient directions."""
    ds = Dataset()
    ds.ImageOrientationPatient = [-1, 0, 0, 0, 0.2, -0.98]
    assert patient_orientation(ds) == ("R", "F")
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    assert patient_orientation(ds) == ("P", "F")


def test_real_series_montage(
    tmp_path: Path,
    lung_volume: CtVolume,
    lung_prediction: Prediction,
    model: ModelInfo,
) -> None:
    """The shared 30-slice CT: montage pixels as rendered, source modules, dciodvfy clean."""
    (path,) = _write(lung_volume, lung_prediction, model, tmp_path)
    ds = pydicom.dcmread(path)
    lines = _lines(lung_volume, lung_prediction, model)
    montage = render_overlay(
        lung_volume,
        lung_prediction.ggo,
        window_center_hu=model.window_center_hu,
        window_width_hu=model.window_width_hu,
    )
    assert_array_equal(ds.pixel_array, burn_in_text(montage, lines))
    source = lung_volume.datasets[0]
    for keyword in COPIED_ATTRIBUTES:
        if keyword in source:
            assert ds[keyword].value == source[keyword].value, keyword
    assert dciodvfy_errors(path) == []
    assert_known_dciodvfy_warnings(path)


def test_the_series_uid_follows_the_seg_it_shows() -> None:
    """Same options, another SEG (another result): another SC series, as the SEG is one."""
    from ggo_cli.writers.dicom_sc import derive_sc_series_uid
    from ggo_cli.writers.gradcam_sc import derive_gradcam_sc_series_uid

    common = {"threshold": 0.5, "series_number": 9903, "series_description": "d", "lungs": True}
    sc = [
        derive_sc_series_uid("1.2.3", "a" * 64, per_slice=False, seg_uid=seg, **common)
        for seg in ("", "1.2.4", "1.2.4", "1.2.5")
    ]
    assert sc[1] == sc[2] and len({sc[0], sc[1], sc[3]}) == 3
    cam = [
        derive_gradcam_sc_series_uid(
            "1.2.3", "a" * 64, layer="l", slice_indices=(1, 2), seg_uid=seg, **common
        )
        for seg in ("1.2.4", "1.2.5")
    ]
    assert cam[0] != cam[1] and not set(cam) & set(sc)
