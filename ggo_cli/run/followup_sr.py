"""The change since the prior study in the SR: at the end of a run, each analysed series' SR is
made to report what the CSV's follow-up cells say (issue 21).

The pipeline writes a series' SR before the comparison is known (a prior analysed in the same
run may finish after the later study), so :func:`update_followup_srs` runs once at the end of
a run, from the state store, like the trend pictures:

- **What an SR should report**: for a study's representative series that has a prior study,
  the comparison of :func:`ggo_cli.run.followup.follow_up` (the CSV's cells) with the prior
  study's UID and date and its representative SEG (:class:`~ggo_cli.writers.sr_change.
  SrComparison`); for any other series, no comparison.
- **What it reports**: said by its SOPInstanceUID alone. An SR's UIDs are derived from its
  SEG, its values and its comparison (:func:`~ggo_cli.writers.dicom_sr.report_uids`), so an SR
  whose SOPInstanceUID is the one the wanted content derives is up to date: a second identical
  run reads two small headers per series and writes nothing. One that differs (no comparison
  yet, another prior, other values) is written again, which gives it new UIDs.
- **From what the folder holds**: the SEG's header (no pixel data) gives the patient and study
  modules, the referenced CT instances and the CT's acquisition equipment item
  (:func:`source_from_seg`); the stored row gives the values and QC flags, exactly as the
  pipeline's SR printed them, the consolidation and lesion values included where the row has
  them (:func:`consolidation_from_row`). The CT itself is not read (it may be gone since).
- **Only this model's results**: a series stored with another model file keeps its SR (the
  algorithm items would name the wrong model); it is reprocessed when seen with this one.
- **Delivered like every object**: each SR written is read back and checked
  (:func:`~ggo_cli.writers.dicom_sr.write_sr`), then its series' objects are registered in the
  delivery queue again (:func:`~ggo_cli.run.deliveries.register_series`): the new SR is queued,
  the replaced one leaves the queue. A series whose SR cannot be written again costs the run a
  WARNING and keeps its SR as it was.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from ..analysis.quality import parse_flags
from ..config import SR_NAME
from ..domain import ConsolidationMeasurement, GgoMeasurement, LungMeasurement
from ..errors import GgoError, OutputError
from ..fsutil import OutputTree
from ..onnx.model_info import ModelInfo
from ..writers.dicom_sr import report_uids, write_sr
from ..writers.sr_change import SrComparison
from ..writers.sr_content import SrSource, reported_values
from .deliveries import register_series
from .followup import (
    OK_STATUS,
    SeriesResult,
    compare,
    follow_up,
    representatives,
    result_from_row,
)
from .state import StateStore

log = logging.getLogger(__name__)

ACQUISITION_EQUIPMENT = "109101"
"""(109101, DCM, "Acquisition Equipment"): purpose of the CT's item in Contributing Equipment."""
_NOT_COPIED = frozenset({
    # the SEG's own identity, series and equipment, never the CT's
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
    "SeriesDate", "SeriesTime", "Modality", "InstanceNumber", "ContentDate", "ContentTime",
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber",
    "InstitutionName", "InstitutionalDepartmentName", "InstitutionAddress", "StationName",
    # the SEG's structure
    "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "SegmentSequence",
    "ReferencedSeriesSequence", "ContributingEquipmentSequence", "DimensionIndexSequence",
    "DimensionOrganizationSequence", "SourceImageSequence",
})
_READ_ERRORS = (OSError, EOFError, InvalidDicomError, ValueError)
_SOP_INSTANCE_UID = 0x00080018
_SERIES_INSTANCE_UID = 0x0020000E


def _header(path: Path) -> Dataset:
    """A DICOM file's header (no pixel data)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except _READ_ERRORS as exc:
        raise OutputError(f"cannot read {path.name} to update its SR: {exc}") from exc


def _leading(path: Path, last: int) -> Dataset:
    """The elements of a DICOM file up to tag ``last``, reading only the start of the file (a
    SEG's functional groups and frames, near its end, are never parsed)."""

    def past(tag: BaseTag, vr: str | None, length: int) -> bool:
        return int(tag) > last

    try:
        with path.open("rb") as fh:
            return read_partial(fh, stop_when=past)
    except _READ_ERRORS as exc:
        raise OutputError(f"cannot read {path.name} to update its SR: {exc}") from exc


def sop_instance_uid(path: Path) -> str:
    """A DICOM file's SOPInstanceUID (``""`` when it has none), from the start of the file."""
    return str(_leading(path, _SOP_INSTANCE_UID).get("SOPInstanceUID", ""))


def source_from_seg(seg: Dataset) -> SrSource:
    """The CT series' headers as the SR needs them, rebuilt from its SEG's header.

    The first header holds the SEG's root attributes less the SEG's own identity, series,
    equipment and structure (so the patient and study modules, which highdicom copied from the
    CT); every referenced CT instance gets its UIDs and SOP class; the CT's acquisition
    equipment is the SEG's Contributing Equipment item of that purpose.

    Raises:
        OutputError: the SEG references no CT series.
    """
    try:
        referenced = seg.ReferencedSeriesSequence[0]
        instances = list(referenced.ReferencedInstanceSequence)
    except (AttributeError, IndexError) as exc:
        raise OutputError(f"the SEG {seg.get('SOPInstanceUID', '?')} references no CT") from exc
    first = Dataset()
    for element in seg:
        if element.keyword and element.keyword not in _NOT_COPIED:
            first.add(copy.deepcopy(element))
    headers = []
    for k, item in enumerate(instances):
        header = first if k == 0 else Dataset()
        header.StudyInstanceUID = seg.StudyInstanceUID
        header.SeriesInstanceUID = referenced.SeriesInstanceUID
        header.SOPClassUID = item.ReferencedSOPClassUID
        header.SOPInstanceUID = item.ReferencedSOPInstanceUID
        headers.append(header)
    acquisition = next(
        (
            copy.deepcopy(item)
            for item in seg.get("ContributingEquipmentSequence", [])
            if any(code.CodeValue == ACQUISITION_EQUIPMENT
                   for code in item.get("PurposeOfReferenceCodeSequence", []))
        ),
        None,
    )
    return SrSource(str(referenced.SeriesInstanceUID), tuple(headers), acquisition)


def measurements_from_row(
    row: Mapping[str, str],
) -> tuple[GgoMeasurement, LungMeasurement | None] | None:
    """A stored row's GGO and lung volumetry as the pipeline's SR reported it (``None``: none).

    The cells carry the CSV's digits, which is all the SR reports (it rounds as the CSV does).
    """
    if not row.get("ggo_voxels"):
        return None
    measurement = GgoMeasurement(
        voxel_volume_ml=float(row["voxel_volume_ml"]),
        ggo_voxels=int(row["ggo_voxels"]),
        ggo_volume_ml=float(row["ggo_volume_ml"]),
        ggo_slice_count=int(row.get("ggo_slice_count") or 0),
    )
    lungs = None
    if row.get("lung_volume_ml"):
        lungs = LungMeasurement(
            **{name: float(row.get(name) or "nan") for name in LungMeasurement.__dataclass_fields__}
        )
    return measurement, lungs


def consolidation_from_row(row: Mapping[str, str]) -> ConsolidationMeasurement | None:
    """A stored row's consolidation and lesion volumetry as the pipeline's SR reported it.

    ``None`` when the row has no consolidation cell (a one-channel model). The SR reports the
    mL and percent cells only; the row stores no voxel or slice counts, so the voxel counts are
    the volumes over the voxel volume and the slice count is 0 (neither is reported).
    """
    if not row.get("consolidation_volume_ml") or not row.get("lesion_volume_ml"):
        return None

    def cell(name: str) -> float | None:  # empty: no lungs, or undefined (both left out)
        text = row.get(name, "")
        return float(text) if text else None

    voxel_ml = float(row["voxel_volume_ml"])
    consolidation_ml = float(row["consolidation_volume_ml"])
    lesion_ml = float(row["lesion_volume_ml"])
    return ConsolidationMeasurement(
        consolidation_voxels=round(consolidation_ml / voxel_ml) if voxel_ml > 0 else 0,
        consolidation_volume_ml=consolidation_ml,
        consolidation_slice_count=0,
        lesion_voxels=round(lesion_ml / voxel_ml) if voxel_ml > 0 else 0,
        lesion_volume_ml=lesion_ml,
        left_consolidation_volume_ml=cell("left_consolidation_volume_ml"),
        right_consolidation_volume_ml=cell("right_consolidation_volume_ml"),
        consolidation_percent_of_lung=cell("consolidation_percent_of_lung"),
        lesion_percent_of_lung=cell("lesion_percent_of_lung"),
        left_lesion_percent=cell("left_lesion_percent"),
        right_lesion_percent=cell("right_lesion_percent"),
    )


def _folder(out_dir: Path, row: Mapping[str, str]) -> Path | None:
    """A stored series' folder (its SEG's), ``None`` without a SEG inside the output folder."""
    seg_path = row.get("seg_path", "")
    if not seg_path or ".." in Path(seg_path).parts or Path(seg_path).is_absolute():
        return None
    return (out_dir / seg_path).parent


def _prior_seg(out_dir: Path, row: Mapping[str, str] | None) -> tuple[str, str]:
    """``(SeriesInstanceUID, SOPInstanceUID)`` of a prior's SEG, ``("", "")`` when unreadable."""
    folder = None if row is None else _folder(out_dir, row)
    if row is None or folder is None:
        return "", ""
    try:
        seg = _leading(out_dir / row["seg_path"], _SERIES_INSTANCE_UID)
    except OutputError:
        return "", ""
    return str(seg.get("SeriesInstanceUID", "")), str(seg.get("SOPInstanceUID", ""))


def wanted_comparisons(
    rows: Sequence[Mapping[str, str]], out_dir: Path
) -> dict[str, SrComparison]:
    """What each representative series with a prior study should report (by series UID).

    The comparison is :func:`~ggo_cli.run.followup.follow_up`'s, the CSV's; its prior study is
    the representative, of the same patient and the comparison's date, that gives it.
    """
    results = [result_from_row(row) for row in rows]
    by_uid = {row.get("series_instance_uid", ""): row for row in rows}
    followups = follow_up(results)
    chosen = representatives(results)
    wanted: dict[str, SrComparison] = {}
    for result in chosen.values():
        comparison = followups[result.series_instance_uid].comparison
        if comparison is None:
            continue
        candidates: list[SeriesResult] = sorted(
            (r for r in chosen.values()
             if r.link_key == result.link_key and r.study_date == comparison.prior_study_date),
            key=lambda r: r.study_instance_uid,
            reverse=True,  # a tie of dates: the later StudyInstanceUID, as follow_up
        )
        prior = next((r for r in candidates if compare(result, r) == comparison), None)
        if prior is None:  # cannot happen while follow_up picks its prior among these
            log.warning("series %s: no prior study gives its comparison; its SR reports none",
                        result.series_instance_uid)
            continue
        series_uid, sop_uid = _prior_seg(out_dir, by_uid.get(prior.series_instance_uid))
        wanted[result.series_instance_uid] = SrComparison(
            prior_study_instance_uid=prior.study_instance_uid,
            prior_study_date=comparison.prior_study_date,
            days_since_prior=comparison.days_since_prior,
            ggo_change_ml=comparison.ggo_change_ml,
            ggo_percent_of_lung_change=comparison.ggo_percent_of_lung_change,
            trend=comparison.trend,
            prior_seg_series_instance_uid=series_uid,
            prior_seg_sop_instance_uid=sop_uid,
            consolidation_change_ml=comparison.consolidation_change_ml,
            lesion_percent_of_lung_change=comparison.lesion_percent_of_lung_change,
        )
    return wanted


def _update(
    store: StateStore,
    out_dir: Path,
    model: ModelInfo,
    row: Mapping[str, str],
    comparison: SrComparison | None,
    tree: OutputTree,
) -> Path | None:
    """Write one series' SR again when it does not report ``comparison``; its folder if so."""
    uid = row.get("series_instance_uid", "")
    folder = _folder(out_dir, row)
    measured = measurements_from_row(row)
    if folder is None or measured is None or not (folder / SR_NAME).is_file():
        return None
    seg_path = out_dir / row["seg_path"]
    measurement, lungs = measured
    flags = parse_flags(row.get("qc_flags", ""))
    consolidation = consolidation_from_row(row)
    values = reported_values(measurement, lungs, consolidation)
    _, wanted = report_uids(
        sop_instance_uid(seg_path), values, qc_flags=flags, comparison=comparison
    )
    if sop_instance_uid(folder / SR_NAME) == wanted:
        return None
    stored = store.get(uid)
    if stored is None or stored.model_sha256 != model.file_sha256:
        log.debug("series %s: stored with another model; its SR stays as it is", uid)
        return None
    seg = _header(seg_path)
    write_sr(source_from_seg(seg), seg, measurement=measurement, model=model,
             path=folder / SR_NAME, lungs=lungs, qc_flags=flags, comparison=comparison,
             tree=tree, consolidation=consolidation)
    log.debug("series %s: SR written again (%s)", uid,
              "with its change since the prior study" if comparison else "without a comparison")
    return folder


def update_followup_srs(
    store: StateStore, out_dir: Path, model: ModelInfo, *, tree: OutputTree
) -> int:
    """Make every analysed series' SR report its change since the prior study, or none.

    Args:
        store: the output folder's state store.
        out_dir: the output folder.
        model: the run's model (only series stored with it are written again).
        tree: the output folder's tree (file modes, no link followed).

    Returns:
        How many SRs were written again.

    Raises:
        OutputError: the delivery queue cannot be written (the database is gone).
    """
    rows = [row for row in store.rows() if row.get("status") == OK_STATUS]
    wanted = wanted_comparisons(rows, out_dir)
    written = 0
    for row in rows:
        uid = row.get("series_instance_uid", "")
        try:
            folder = _update(store, out_dir, model, row, wanted.get(uid), tree)
        except GgoError as exc:
            log.warning("series %s: its SR keeps its earlier follow-up: %s", uid, exc)
            continue
        if folder is not None:  # the new SR queued, the replaced one out of the queue
            register_series(store.queue, out_dir, folder, uid)
            written += 1
    if written:
        log.info("change since the prior study written into %d SRs", written)
    return written
