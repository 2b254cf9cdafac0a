"""The series-level links of a SEG, SR and SC: a set written together passes; each broken
link fails with its named reason."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from ggo_cli.analysis.explainer import Explanation
from ggo_cli.analysis.measurements import measure_ggo
from ggo_cli.domain import CtVolume, Prediction
from ggo_cli.errors import OutputError
from ggo_cli.onnx.model_info import ModelInfo
from ggo_cli.writers.dicom_sc import write_sc
from ggo_cli.writers.dicom_seg import write_seg
from ggo_cli.writers.dicom_sr import write_sr
from ggo_cli.writers.gradcam_png import GradcamFigures
from ggo_cli.writers.gradcam_sc import write_gradcam_sc
from ggo_cli.writers.result_links import check_result_links
from tests.dicom_factory import make_ct_series
from tests.writers.ct_data import load_ct_volume

GGO_SLICES = (2, 3)


@dataclass(frozen=True, slots=True)
class ResultSet:
    """The headers of one series' SEG, SR and SC instances, as read back."""

    ct_uid: str
    seg: Dataset
    sr: Dataset
    sc: tuple[Dataset, ...]


def _header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _write_set(
    volume: CtVolume, prediction: Prediction, model: ModelInfo, folder: Path
) -> ResultSet:
    """Write SEG, SR and SC (montage and one image per GGO slice) as the run would."""
    seg = _header(write_seg(volume, prediction, model, folder / "ggo.seg.dcm"))
    measurement = measure_ggo(prediction.ggo, volume.voxel_volume_ml)
    sr = write_sr(volume, seg, measurement=measurement, model=model, path=folder / "ggo.sr.dcm")
    sc = write_sc(volume, prediction, model, folder / "sc", measurement=measurement, seg=seg,
                  per_slice=True)
    return ResultSet(
        volume.series.series_instance_uid, seg, _header(sr), tuple(_header(p) for p in sc)
    )


def _check(results: ResultSet) -> None:
    check_result_links(
        results.seg, results.sr, results.sc, source_series_uid=results.ct_uid
    )


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> CtVolume:
    """A 6-slice synthetic chest CT."""
    series = make_ct_series(tmp_path_factory.mktemp("ct"), (6, 48, 40))
    return load_ct_volume(series.paths[0].parent)


@pytest.fixture(scope="module")
def prediction(volume: CtVolume) -> Prediction:
    """A GGO box on two slices."""
    masks = np.zeros((*volume.hu.shape, 1), dtype=bool)
    for index in GGO_SLICES:
        masks[index, 14:26, 8:22, 0] = True
    return Prediction(masks=masks, threshold=0.5)


@pytest.fixture(scope="module")
def results(
    tmp_path_factory: pytest.TempPathFactory,
    volume: CtVolume,
    prediction: Prediction,
    model: ModelInfo,
) -> ResultSet:
    """SEG, SR and SC of the synthetic series, written together."""
    return _write_set(volume, prediction, model, tmp_path_factory.mktemp("out"))


def test_a_set_written_together_links_up(results: ResultSet) -> None:
    """The headers read back pass, with or without the CT series named, and without SR or SC."""
    assert len(results.sc) == 1 + len(GGO_SLICES)
    _check(results)
    check_result_links(results.seg, results.sr, results.sc)
    check_result_links(results.seg, None, [], source_series_uid=results.ct_uid)


def _algorithm_item(ds: Dataset, model_name: str) -> Dataset:
    (item,) = (
        item
        for item in ds.ContributingEquipmentSequence
        if item.get("ManufacturerModelName") == model_name and "DeviceUID" in item
    )
    return item


def _series(ds: Dataset, keyword: str, uid: str) -> Dataset:
    (item,) = (item for item in ds.get(keyword) if item.SeriesInstanceUID == uid)
    return item


def _evidence(sr: Dataset) -> pydicom.Sequence:
    sequence: pydicom.Sequence = (
        sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    )
    return sequence


def _drop_series(sequence: pydicom.Sequence, uid: str) -> None:
    sequence.remove(next(item for item in sequence if item.SeriesInstanceUID == uid))


Edit = Callable[[ResultSet, str], None]
"""Break one link of a copied result set (the model's name is the second argument)."""


def _set(ds_of: Callable[[ResultSet], Dataset], keyword: str, value: str) -> Edit:
    def edit(results: ResultSet, _: str) -> None:
        setattr(ds_of(results), keyword, value)

    return edit


BROKEN_LINKS: dict[str, tuple[Edit, str]] = {
    "sr_other_study": (
        _set(lambda r: r.sr, "StudyInstanceUID", "1.2.3.4"),
        "the SR's StudyInstanceUID differs from the SEG's",
    ),
    "sc_other_patient": (
        _set(lambda r: r.sc[1], "PatientID", "OTHER-PATIENT-7"),
        "the SC 2's PatientID differs from the SEG's",
    ),
    "sc_other_frame_of_reference": (
        _set(lambda r: r.sc[0], "FrameOfReferenceUID", "1.2.3.4"),
        "the SC 1's FrameOfReferenceUID differs",
    ),
    "seg_of_another_series": (
        lambda r, _: setattr(r.seg.ReferencedSeriesSequence[0], "SeriesInstanceUID", "1.2.3"),
        r"the SEG references series \['1.2.3'\], not the CT series",
    ),
    "sr_in_the_segs_series": (
        lambda r, _: setattr(r.sr, "SeriesInstanceUID", r.seg.SeriesInstanceUID),
        "do not have distinct SeriesInstanceUIDs",
    ),
    "sc_in_the_ct_series": (
        lambda r, _: [setattr(ds, "SeriesInstanceUID", r.ct_uid) for ds in r.sc],
        "do not have distinct SeriesInstanceUIDs",
    ),
    "sc_in_two_series": (
        _set(lambda r: r.sc[2], "SeriesInstanceUID", "1.2.3.4"),
        "the SC instances lie in 2 series, not one",
    ),
    "sr_evidence_without_seg": (
        lambda r, _: _drop_series(_evidence(r.sr), r.seg.SeriesInstanceUID),
        "the SR's evidence lacks the SEG",
    ),
    "sr_evidence_without_ct": (
        lambda r, _: _drop_series(_evidence(r.sr), r.ct_uid),
        "the SR's evidence lacks the CT series",
    ),
    "sr_evidence_of_another_seg": (
        lambda r, _: setattr(
            _series(r.sr.CurrentRequestedProcedureEvidenceSequence[0],
                    "ReferencedSeriesSequence", r.seg.SeriesInstanceUID)
            .ReferencedSOPSequence[0], "ReferencedSOPInstanceUID", "1.2.3.4"),
        "the SR's evidence lacks the SEG",
    ),
    "sc_without_seg": (
        lambda r, _: _drop_series(r.sc[0].ReferencedSeriesSequence, r.seg.SeriesInstanceUID),
        "the SC 1's Referenced Series Sequence lacks the SEG",
    ),
    "sc_of_another_ct_instance": (
        lambda r, _: setattr(
            _series(r.sc[1], "ReferencedSeriesSequence", r.ct_uid).ReferencedInstanceSequence[0],
            "ReferencedSOPInstanceUID", "1.2.3.4"),
        "the SC 2's Referenced Series Sequence names 1 CT instances the SEG does not reference",
    ),
    "sr_other_device_uid": (
        lambda r, name: setattr(_algorithm_item(r.sr, name), "DeviceUID", "1.2.3.4"),
        "the SR's algorithm Contributing Equipment item .* differs from the SEG's",
    ),
    "sc_other_version": (
        lambda r, name: setattr(_algorithm_item(r.sc[0], name), "SoftwareVersions", "9.9"),
        "the SC 1's algorithm Contributing Equipment item .* differs from the SEG's",
    ),
    "seg_without_device_uid": (
        lambda r, name: delattr(_algorithm_item(r.seg, name), "DeviceUID"),
        "the SEG has no single algorithm Contributing Equipment item with a Device UID",
    ),
    "sr_not_an_sr": (
        _set(lambda r: r.sr, "SOPClassUID", pydicom.uid.BasicTextSRStorage),
        "the SR has SOP class .*, not Comprehensive 3D SR",
    ),
}


@pytest.mark.parametrize("broken", sorted(BROKEN_LINKS))
def test_each_broken_link_is_named(results: ResultSet, model: ModelInfo, broken: str) -> None:
    """One attribute edited in a copy of the set fails the check, naming what differs."""
    edit, reason = BROKEN_LINKS[broken]
    copied = copy.deepcopy(results)
    edit(copied, model.name)
    with pytest.raises(OutputError, match=reason) as caught:
        _check(copied)
    message = str(caught.value)
    assert message.startswith(f"Series {results.ct_uid}: its SEG, SR and SC do not link up")
    assert "\n" not in message
    assert not caught.value.fatal
    for ds in (results.seg, copied.sc[1]):
        assert str(ds.PatientID) not in message  # patient values are compared, never shown


def test_results_of_another_model_do_not_link(
    tmp_path: Path, volume: CtVolume, prediction: Prediction, model: ModelInfo,
    results: ResultSet,
) -> None:
    """A SEG rewritten by another model leaves the earlier SR and SC stale: the check names
    the missing SEG references and the other algorithm."""
    other_model = dataclasses.replace(model, version="2.0", recorded_sha256="f" * 64)
    newer = _write_set(volume, prediction, other_model, tmp_path)
    with pytest.raises(OutputError, match="the SR's evidence lacks the SEG") as caught:
        check_result_links(newer.seg, results.sr, results.sc, source_series_uid=results.ct_uid)
    assert "the SC 1's algorithm Contributing Equipment item" in str(caught.value)
    _check(newer)


def test_the_shared_real_series_links_up(
    tmp_path: Path, lung_volume: CtVolume, lung_prediction: Prediction, model: ModelInfo
) -> None:
    """SEG, SR and SC of the 30-slice chest CT, read back, pass; their SR without the SEG's
    series in its evidence fails."""
    real = _write_set(lung_volume, lung_prediction, model, tmp_path)
    _check(real)
    broken = copy.deepcopy(real)
    _drop_series(_evidence(broken.sr), real.seg.SeriesInstanceUID)
    with pytest.raises(OutputError, match="the SR's evidence lacks the SEG"):
        _check(broken)


@pytest.fixture(scope="module")
def gradcam_sc(
    tmp_path_factory: pytest.TempPathFactory,
    volume: CtVolume,
    prediction: Prediction,
    model: ModelInfo,
    results: ResultSet,
) -> tuple[Dataset, ...]:
    """The GradCAM++ SC of the GGO slices (``segment --explain``), referencing the set's SEG."""
    rows, cols = volume.hu.shape[1:]
    explanation = Explanation(
        slice_indices=GGO_SLICES,
        sop_instance_uids=tuple(volume.sop_instance_uids[i] for i in GGO_SLICES),
        cam=np.full((len(GGO_SLICES), rows, cols), 0.5, dtype=np.float32),
        mask=prediction.ggo[list(GGO_SLICES)].astype(np.uint8),
        layer="conv",
    )
    paths = write_gradcam_sc(
        volume, GradcamFigures.from_explanation(explanation), model,
        tmp_path_factory.mktemp("sc_gradcam"), threshold=prediction.threshold,
        measurement=measure_ggo(prediction.ggo, volume.voxel_volume_ml), seg=results.seg,
    )
    return tuple(_header(p) for p in paths)


GradcamEdit = Callable[[ResultSet, list[Dataset]], None]
BROKEN_GRADCAM_LINKS: dict[str, tuple[GradcamEdit, str]] = {
    "in_the_overlay_series": (
        lambda r, g: [setattr(ds, "SeriesInstanceUID", r.sc[0].SeriesInstanceUID) for ds in g],
        "the CT, SEG, SR, SC and GradCAM\\+\\+ SC series do not have distinct",
    ),
    "in_two_series": (
        lambda r, g: setattr(g[1], "SeriesInstanceUID", "1.2.3.4"),
        "the GradCAM\\+\\+ SC instances lie in 2 series, not one",
    ),
    "without_seg": (
        lambda r, g: _drop_series(g[0].ReferencedSeriesSequence, r.seg.SeriesInstanceUID),
        "the GradCAM\\+\\+ SC 1's Referenced Series Sequence lacks the SEG",
    ),
    "other_study": (
        lambda r, g: setattr(g[1], "StudyInstanceUID", "1.2.3.4"),
        "the GradCAM\\+\\+ SC 2's StudyInstanceUID differs from the SEG's",
    ),
}


def test_a_gradcam_series_written_with_the_set_links_up(
    results: ResultSet, gradcam_sc: tuple[Dataset, ...]
) -> None:
    """The GradCAM++ SC instances pass as a series of their own, next to the overlay SC."""
    assert len(gradcam_sc) == len(GGO_SLICES)
    check_result_links(results.seg, results.sr, results.sc, source_series_uid=results.ct_uid,
                       gradcam_sc=gradcam_sc)


@pytest.mark.parametrize("broken", sorted(BROKEN_GRADCAM_LINKS))
def test_each_broken_gradcam_link_is_named(
    results: ResultSet, gradcam_sc: tuple[Dataset, ...], broken: str
) -> None:
    """One attribute edited in a copy of the GradCAM++ SC headers fails the check."""
    edit, reason = BROKEN_GRADCAM_LINKS[broken]
    copied = copy.deepcopy(list(gradcam_sc))
    edit(results, copied)
    with pytest.raises(OutputError, match=reason):
        check_result_links(results.seg, results.sr, results.sc,
                           source_series_uid=results.ct_uid, gradcam_sc=copied)
