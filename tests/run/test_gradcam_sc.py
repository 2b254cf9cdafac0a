"""``segment --explain``: the GradCAM++ figures as a second Secondary Capture series.

The conv model pair of tests/onnx_models.py fires on a dense block on 4 of 12 slices, so
``--explain`` explains those 4 slices; each becomes ``sc_gradcam/gradcam_NNNN.dcm``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.testing import assert_array_equal
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage
from typer.testing import CliRunner, Result

from ggo_cli.cli.app import app
from ggo_cli.writers.sc_render import RESEARCH_USE_TEXT
from tests.dciodvfy import dciodvfy_errors
from tests.delivery.storage_scp import storage_scp
from tests.dicom_factory import FactorySeries, make_ct_series
from tests.nightly_runs import csv_rows, manifest
from tests.onnx_models import write_conv_explain_pair
from tests.writers.test_dicom_seg import assert_known_dciodvfy_warnings

EXPLAINED = (4, 5, 6, 7)
"""The slices with the dense block (0-based): the GGO the conv model finds, hence explains."""
GRADCAM_NAMES = ["gradcam_0005.dcm", "gradcam_0006.dcm", "gradcam_0007.dcm", "gradcam_0008.dcm"]
SOURCE_FOR_PROCESSING = "121322"
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "MRN-7734521"}
SECRETS = ("Doe", "Jane", "MRN-7734521", "7734521")
runner = CliRunner()


def _study(tmp_path: Path, *, named: bool = False, block: bool = True) -> FactorySeries:
    """12 slices of air with a dense block on slices 4..7 (unless not ``block``); ``named``: a
    (fake) patient's name and ID in every header."""
    hu = np.full((12, 64, 64), -1000.0, dtype=np.float32)
    if block:
        hu[4:8, 20:36, 24:40] = 40.0
    study = make_ct_series(tmp_path, phantom=hu)
    for path in study.paths if named else ():
        ds = pydicom.dcmread(path)
        for keyword, value in PATIENT.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    return study


def _segment(study: FactorySeries, out: Path, model: Path, *extra: str) -> Result:
    return runner.invoke(
        app,
        [
            "segment", str(study.root), "-o", str(out), "-m", str(model), "--settle", "0",
            "--no-lung-mask", "--no-progress", *extra,
        ],
    )


def _folder(out: Path, study: FactorySeries) -> Path:
    return out / study.study_instance_uid / study.series_instance_uid


def _gradcam_files(folder: Path) -> list[Path]:
    return sorted((folder / "sc_gradcam").glob("*.dcm"))


def _headers(paths: Sequence[Path]) -> list[Dataset]:
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conv model with its explain graph."""
    model, _ = write_conv_explain_pair(tmp_path_factory.mktemp("model"))
    return model


@dataclass(frozen=True)
class ExplainedRun:
    """A ``segment --explain`` run: the study, its series folder, every string drawn."""

    study: FactorySeries
    out: Path
    folder: Path
    drawn: tuple[str, ...]


@pytest.fixture(scope="module")
def explained(tmp_path_factory: pytest.TempPathFactory, conv_model: Path) -> ExplainedRun:
    """One ``segment --explain`` run, recording each string Pillow draws."""
    tmp = tmp_path_factory.mktemp("explained")
    study = _study(tmp, named=True)
    drawn: list[str] = []
    original = ImageDraw.ImageDraw.text

    def recording_text(self: ImageDraw.ImageDraw, xy: object, text: object, *a: object,
                       **k: object) -> None:
        drawn.append(str(text))
        original(self, xy, text, *a, **k)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImageDraw.ImageDraw, "text", recording_text)
        result = _segment(study, tmp / "out", conv_model, "--explain")
    assert result.exit_code == 0, result.output
    return ExplainedRun(study, tmp / "out", _folder(tmp / "out", study), tuple(drawn))


def test_one_instance_per_explained_slice_in_a_series_of_its_own(
    explained: ExplainedRun,
) -> None:
    """sc_gradcam/ holds one SC instance per explained slice, numbered 1..k, in series 9904,
    apart from the CT, the SEG, the SR and the overlay SC series."""
    folder, study = explained.folder, explained.study
    assert list(np.load(folder / "gradcam.npz")["slice_indices"]) == list(EXPLAINED)
    paths = _gradcam_files(folder)
    assert [path.name for path in paths] == GRADCAM_NAMES
    headers = _headers(paths)
    assert [int(ds.InstanceNumber) for ds in headers] == [1, 2, 3, 4]
    assert {ds.SOPClassUID for ds in headers} == {SecondaryCaptureImageStorage}
    assert {int(ds.SeriesNumber) for ds in headers} == {9904}
    assert {ds.SeriesDescription for ds in headers} == {"GGO AI GradCAM++ - research use only"}
    (series_uid,) = {ds.SeriesInstanceUID for ds in headers}
    assert len({ds.SOPInstanceUID for ds in headers}) == 4
    seg = pydicom.dcmread(folder / "ggo.seg.dcm", stop_before_pixels=True)
    sr = pydicom.dcmread(folder / "ggo.sr.dcm", stop_before_pixels=True)
    montage = pydicom.dcmread(folder / "sc" / "montage.dcm", stop_before_pixels=True)
    others = {study.series_instance_uid, seg.SeriesInstanceUID, sr.SeriesInstanceUID,
              montage.SeriesInstanceUID}
    assert len(others) == 4 and series_uid not in others
    for index, ds in zip(EXPLAINED, headers, strict=True):
        (source,) = ds.SourceImageSequence
        assert source.ReferencedSOPInstanceUID == study.sop_instance_uids[index]
        assert source.PurposeOfReferenceCodeSequence[0].CodeValue == SOURCE_FOR_PROCESSING
        (seg_ref,) = ds.ReferencedImageSequence
        assert seg_ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert {item.SeriesInstanceUID for item in ds.ReferencedSeriesSequence} == {
            study.series_instance_uid, seg.SeriesInstanceUID
        }
        assert ds.StudyInstanceUID == seg.StudyInstanceUID
        assert ds.PatientID == seg.PatientID
        assert ds.BurnedInAnnotation == "YES"


def test_pixels_are_the_png_figure_under_the_overlay_text_band(explained: ExplainedRun) -> None:
    """Each image is gradcam/slice_NNNN.png pixel for pixel below the text band the overlay
    SC carries (research use only, volumes, model)."""
    folder = explained.folder
    montage = pydicom.dcmread(folder / "sc" / "montage.dcm").pixel_array
    band = montage.shape[0] - _rgb(folder / "overlay.png").shape[0]
    assert band > 0
    for path in _gradcam_files(folder):
        pixels = pydicom.dcmread(path).pixel_array
        figure = _rgb(folder / "gradcam" / f"slice_{path.stem.removeprefix('gradcam_')}.png")
        height, width = figure.shape[:2]
        assert pixels.shape[0] == band + height
        assert_array_equal(pixels[band:, :width], figure)
        assert not pixels[band:, width:].any()
        common = min(pixels.shape[1], montage.shape[1])
        assert pixels[:band].any()
        assert_array_equal(pixels[:band, :common], montage[:band, :common])


def test_the_text_drawn_names_the_results_and_no_patient(explained: ExplainedRun) -> None:
    """The strings drawn carry the warning and the CSV's volume, never the patient's name or
    ID, which the headers do carry."""
    assert RESEARCH_USE_TEXT in explained.drawn
    ggo_ml = csv_rows(explained.out)[0]["ggo_volume_ml"]
    assert f"GGO {ggo_ml} mL" in explained.drawn
    for text in explained.drawn:
        for secret in SECRETS:
            assert secret not in text, text
    for ds in _headers(_gradcam_files(explained.folder)):
        assert (str(ds.PatientName), ds.PatientID) == tuple(PATIENT.values())


def test_dciodvfy_reports_no_error(explained: ExplainedRun) -> None:
    """dicom3tools' dciodvfy finds no error, and only the known warnings."""
    for path in _gradcam_files(explained.folder):
        assert dciodvfy_errors(path) == [], path.name
        assert_known_dciodvfy_warnings(path)


def test_the_series_exists_only_with_explain_and_an_sc(tmp_path: Path, conv_model: Path) -> None:
    """A run without --explain writes none and removes an earlier run's; so does --sc none."""
    study = _study(tmp_path)
    out = tmp_path / "out"
    folder = _folder(out, study)
    plain = _segment(study, out, conv_model)
    assert plain.exit_code == 0, plain.output
    assert _gradcam_files(folder) == [] and (folder / "sc" / "montage.dcm").is_file()
    first = _segment(study, out, conv_model, "--explain")
    assert first.exit_code == 0, first.output
    assert [path.name for path in _gradcam_files(folder)] == GRADCAM_NAMES
    again = _segment(study, out, conv_model)
    assert again.exit_code == 0, again.output
    assert manifest(out)["counts"]["unchanged"] == 0
    assert _gradcam_files(folder) == []
    assert (folder / "sc" / "montage.dcm").is_file()
    assert _segment(study, out, conv_model, "--explain").exit_code == 0
    assert len(_gradcam_files(folder)) == 4
    for path in _gradcam_files(folder):  # deleted by hand: the series is written again, once
        path.unlink()
    assert _segment(study, out, conv_model, "--explain").exit_code == 0
    assert manifest(out)["counts"]["unchanged"] == 0 and len(_gradcam_files(folder)) == 4
    assert _segment(study, out, conv_model, "--explain").exit_code == 0
    assert manifest(out)["counts"]["unchanged"] == 1
    no_sc = _segment(study, out, conv_model, "--explain", "--sc", "none")
    assert no_sc.exit_code == 0, no_sc.output
    assert _gradcam_files(folder) == [] and (folder / "gradcam.npz").is_file()


def test_a_series_without_ggo_gets_no_gradcam_series(tmp_path: Path, conv_model: Path) -> None:
    """Nothing explained (no GGO on any slice): the run succeeds without GradCAM++ SC."""
    study = _study(tmp_path, block=False)
    out = tmp_path / "out"
    result = _segment(study, out, conv_model, "--explain")
    assert result.exit_code == 0, result.output
    folder = _folder(out, study)
    assert (folder / "ggo.seg.dcm").is_file() and (folder / "sc" / "montage.dcm").is_file()
    assert _gradcam_files(folder) == []
    # No GradCAM++ series is due, so the next run reuses the series rather than redoing it.
    assert _segment(study, out, conv_model, "--explain").exit_code == 0
    assert manifest(out)["counts"]["unchanged"] == 1


def test_explain_only_writes_no_dicom(tmp_path: Path, conv_model: Path) -> None:
    """``ggo-cli explain`` (no SEG) writes its maps and figures, and no DICOM at all."""
    study = _study(tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["explain", str(study.root), "-o", str(out), "-m", str(conv_model), "--settle", "0",
         "--no-lung-mask", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    assert (_folder(out, study) / "gradcam.npz").is_file()
    assert list(out.rglob("*.dcm")) == []


def test_send_delivers_the_gradcam_instances_once(tmp_path: Path, conv_model: Path) -> None:
    """With --send the PACS gets the SEG, the SR, the montage and each GradCAM++ instance,
    once."""
    study = _study(tmp_path)
    out = tmp_path / "out"
    with storage_scp() as scp:
        dest = scp.destination()
        result = _segment(study, out, conv_model, "--explain", "--send", dest)
        assert result.exit_code == 0, result.output
        gradcam = {ds.SOPInstanceUID for ds in _headers(_gradcam_files(_folder(out, study)))}
        received = scp.received.uids()
        assert len(gradcam) == 4 and gradcam <= set(received)
        assert len(received) == len(set(received)) == 3 + 4
        classes = [sop_class for _, sop_class, _ in scp.received.stores]
        assert classes.count(SecondaryCaptureImageStorage) == 1 + 4
        (report,) = manifest(out)["delivery"]
        assert (report["sent"], report["pending"], report["complete"]) == (7, 0, True)
        again = _segment(study, out, conv_model, "--explain", "--send", dest)
        assert again.exit_code == 0, again.output
        assert len(scp.received.stores) == 7
