"""Typed values passed between the pipeline stages (discover, load, infer, measure, write).

Arrays are ``(slice, row, col)``, highdicom's order; slices are sorted along the slice normal.
The measurements (volumetry, and the change since a prior study) are in
:mod:`ggo_cli.measurement_types` and re-exported here.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from .measurement_types import Comparison as Comparison
from .measurement_types import ConsolidationMeasurement as ConsolidationMeasurement
from .measurement_types import Followup as Followup
from .measurement_types import GgoMeasurement as GgoMeasurement
from .measurement_types import LungMeasurement as LungMeasurement
from .measurement_types import Trend as Trend
from .measurement_types import TrendPoint as TrendPoint

ML_PER_MM3 = 1e-3
FOLDER_ID_HEX_CHARS = 8
"""Hex characters of the folder digest that names a series' folder in logs and outputs."""
MIN_REDACTED_NAME_CHARS = 3
"""Shorter folder or file names are not replaced in messages (too likely to hit other words)."""
FILE_PLACEHOLDER = "<file>"


class SeriesStatus(StrEnum):
    """Final state of one series in a run (the CSV ``status`` column)."""

    OK = "ok"
    SKIPPED = "skipped"
    FAILED = "failed"
    PENDING = "pending"
    """Files still arriving (modified within ``--settle`` minutes): left for a later run."""


@dataclass(frozen=True, slots=True)
class SeriesInfo:
    """One series found by discovery, with the files of its distinct instances.

    Attributes:
        study_instance_uid: StudyInstanceUID.
        series_instance_uid: SeriesInstanceUID.
        files: one file per distinct SOPInstanceUID (exact duplicates dropped).
        location: the series' folder relative to the input it was found in. Hospital exports
            often name folders and files after the patient, so it is shown at DEBUG only;
            messages and outputs name the folder by :attr:`folder_id`.
        modality: Modality.
        study_date: StudyDate (``YYYYMMDD``) or ``""``.
        series_description: SeriesDescription or ``""``.
        series_number: SeriesNumber or ``None``.
        skip_reason: why the series is not analysed; ``None`` when it is eligible.
        patient_id: PatientID, only ever written to the CSV on request; never logged.
    """

    study_instance_uid: str
    series_instance_uid: str
    files: tuple[Path, ...]
    location: str
    modality: str = "CT"
    study_date: str = ""
    series_description: str = ""
    series_number: int | None = None
    skip_reason: str | None = None
    patient_id: str = field(default="", repr=False)

    @property
    def eligible(self) -> bool:
        """Whether the series passed every selection rule."""
        return self.skip_reason is None

    @property
    def folder_id(self) -> str:
        """A short digest of :attr:`location`: the first 8 hex characters of its SHA-256.

        Names the series' folder in INFO logs, messages, the CSV and the manifest without the
        folder's name (often the patient's name or ID); the same folder gives the same digest
        on every run, so a person with the input can find it (``ggo-cli -vv`` logs the path).
        """
        digest = hashlib.sha256(self.location.encode("utf-8", "surrogateescape"))
        return digest.hexdigest()[:FOLDER_ID_HEX_CHARS]

    @property
    def label(self) -> str:
        """``series <SeriesInstanceUID> (folder #<folder_id>)``: how messages name the series."""
        return f"series {self.series_instance_uid} (folder #{self.folder_id})"

    def redact(self, text: str) -> str:
        """``text`` without this series' paths, folder names, file names and PatientID.

        Error messages (ggo-cli's own and those of the libraries it quotes) may name a file or
        a folder; in hospital exports those names often hold the patient's name or ID. Full
        paths, folder names and file names (and their stems) of the series, of at least
        :data:`MIN_REDACTED_NAME_CHARS` characters, are replaced by ``<folder #id>`` or
        ``<file>``; only whole names are replaced, never part of a longer word or UID.

        Args:
            text: a message about this series.

        Returns:
            The message with those names replaced.
        """
        if not text:
            return text
        folder = f"<folder #{self.folder_id}>"
        names: dict[str, str] = {}
        for path in self.files:
            names[str(path)] = FILE_PLACEHOLDER
            names[path.name] = FILE_PLACEHOLDER
            names.setdefault(path.stem, FILE_PLACEHOLDER)
            names.setdefault(str(path.parent), folder)
        parts = [part for part in re.split(r"[\\/]", self.location) if part not in ("", ".")]
        if self.files:  # the series' folder and its ancestors inside the input, as full paths
            common = Path(os.path.commonpath([str(path.parent) for path in self.files]))
            for ancestor in (common, *common.parents)[: len(parts)]:
                names.setdefault(str(ancestor), folder)
        names.setdefault(self.location, folder)
        for part in parts:
            names.setdefault(part, folder)
        if self.patient_id:
            names[self.patient_id] = "<PatientID>"
        if self.files:
            for keyword, value in _patient_values(str(self.files[0])):
                names[value] = f"<{keyword}>"
        found = [n for n in names if len(n) >= MIN_REDACTED_NAME_CHARS and n in text]
        if not found:
            return text
        found.sort(key=len, reverse=True)
        pattern = re.compile(
            r"(?<![\w.])(?:" + "|".join(map(re.escape, found)) + r")(?![\w]|\.\w)"
        )
        return pattern.sub(lambda match: names[match.group(0)], text)


PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
)
"""Patient attributes whose values :meth:`SeriesInfo.redact` removes from messages."""


@functools.lru_cache(maxsize=64)
def _patient_values(path: str) -> tuple[tuple[str, str], ...]:
    """``(keyword, value)`` of the patient attributes in a file's header, for redaction.

    A library's exception message may quote any header value (highdicom's checks of the
    attributes it copies into the SEG, pydicom's value conversions). Names are also listed
    by component (``DOE^JANE``: ``DOE``, ``JANE``, ``DOE JANE``). An unreadable file gives
    nothing (its messages are then redacted of paths and PatientID only).
    """
    from pydicom.multival import MultiValue

    from .dicom.budgets import HEADER_READ_BYTES, read_bounded

    try:
        # bounded: a deflated file is never inflated past the header budget (issue 15)
        ds = read_bounded(
            Path(path),
            limit_bytes=HEADER_READ_BYTES,
            stop_before_pixels=True,
            specific_tags=list(PATIENT_KEYWORDS),
        )
    except Exception:  # noqa: BLE001 - an unreadable file only means less to redact
        return ()
    found: list[tuple[str, str]] = []
    for keyword in PATIENT_KEYWORDS:
        value = ds.get(keyword)
        if value is None:
            continue
        for item in value if isinstance(value, MultiValue) else [value]:
            text = str(item).strip()
            parts = [part for part in re.split(r"[\^=]", text) if part.strip()]
            found += [(keyword, v) for v in (text, " ".join(parts), *parts) if v.strip()]
    return tuple(found)


HuArray = npt.NDArray[np.int16] | npt.NDArray[np.float32]
"""Hounsfield units: int16 when every value is an exact integer (the usual CT), else float32."""


@dataclass(frozen=True, slots=True)
class CtVolume:
    """A CT series as a Hounsfield-unit volume in DICOM patient space.

    Attributes:
        series: the series this volume was loaded from.
        hu: Hounsfield units: int16 when exact integers (the usual CT), else float32.
            Shape: ``(slices, rows, cols)``.
        datasets: the sorted source headers (no pixel data), one per slice.
        slice_spacing_mm: distance between slice centres along the normal, from positions.
        pixel_spacing_mm: ``(row spacing, column spacing)`` in mm (PixelSpacing).
    """

    series: SeriesInfo
    hu: HuArray
    datasets: tuple[Dataset, ...]
    slice_spacing_mm: float
    pixel_spacing_mm: tuple[float, float]

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        """SOPInstanceUID of each slice index."""
        return tuple(str(ds.SOPInstanceUID) for ds in self.datasets)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (1 mL = 1000 mm^3)."""
        row_mm, col_mm = self.pixel_spacing_mm
        return row_mm * col_mm * self.slice_spacing_mm * ML_PER_MM3


@dataclass(frozen=True, slots=True)
class Prediction:
    """Binary masks predicted for a volume, on the source pixel grid.

    Attributes:
        masks: one boolean mask per model channel. Shape: ``(slices, rows, cols, channels)``;
            channel 0 is GGO.
        threshold: the probability threshold applied.
        predicted_ggo_voxels: GGO voxels as predicted (before any lung restriction; the
            masks may since have been restricted in place); 0 when not counted.
        near_threshold_voxels: of those, the voxels with a probability below the threshold +
            0.1 (:data:`ggo_cli.analysis.quality.NEAR_THRESHOLD_BAND`), i.e. marginal calls.
    """

    masks: npt.NDArray[np.bool_]
    threshold: float
    predicted_ggo_voxels: int = 0
    near_threshold_voxels: int = 0

    @property
    def ggo(self) -> npt.NDArray[np.bool_]:
        """The GGO mask. Shape: ``(slices, rows, cols)``."""
        return self.masks[..., 0]


@dataclass(frozen=True, slots=True)
class SeriesOutcome:
    """What became of one series (one CSV row).

    Attributes:
        series: the series.
        status: ok, skipped or failed.
        message: the reason for skipped or failed; ``""`` when ok.
        n_slices: slices analysed (or instances found when not loaded).
        slice_spacing_mm: slice spacing from positions, when loaded.
        pixel_spacing_mm: PixelSpacing, when loaded.
        measurement: GGO volumetry, when ok.
        lungs: lung volumes and GGO per lung, when ok and the lung mask was on.
        seg_path: the SEG written, when ok.
        png_paths: PNGs written.
        seconds: wall time spent on the series.
        processed_at: ISO 8601 UTC time the series finished.
        reused: taken unchanged from the state store of an earlier run (nothing recomputed).
        qc_flags: names of the quality flags raised
            (:class:`ggo_cli.analysis.quality.QcFlag`, in its
            order); empty when nothing is flagged or the series was not analysed.
        consolidation: consolidation and lesion volumetry, when ok and the model has a
            consolidation channel; ``None`` otherwise (a one-channel model).
    """

    series: SeriesInfo
    status: SeriesStatus
    message: str = ""
    n_slices: int = 0
    slice_spacing_mm: float | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    measurement: GgoMeasurement | None = None
    lungs: LungMeasurement | None = None
    seg_path: Path | None = None
    png_paths: tuple[Path, ...] = ()
    seconds: float = 0.0
    processed_at: str = ""
    reused: bool = False
    qc_flags: tuple[str, ...] = ()
    consolidation: ConsolidationMeasurement | None = None
