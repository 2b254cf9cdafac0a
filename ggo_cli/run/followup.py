"""Follow-up against priors: each study compared with the same patient's previous analysed study.

Pure functions over value types; the state store's rows come in, comparisons come out (the CSV
writer formats them, :mod:`ggo_cli.writers.trend_png` draws them). Nothing here reads or writes.

**Which patient.** Series are linked by a *link key*: HMAC-SHA256 of the PatientID under a
random 32-byte secret of the output folder (:func:`link_key`), made on the folder's first run and
kept in its state store (:meth:`ggo_cli.run.state.StateStore.link_secret`). Every stored row
keeps its key in the hidden ``_link_key`` cell whatever the patient options, so a default run
(neither ``--include-patient-id`` nor ``--pseudonymize``) links a patient's studies without
keeping the PatientID in clear; the key never reaches the CSV, a log line or the manifest.
Matching is thus by PatientID (through its keyed digest; the ``--pseudonymize`` pseudonym is
another digest of the same ID, so the two always agree), never by name. A series without a
PatientID gets no key and is never compared: an empty ID must not merge patients. A series
stored before the key existed gets it when a run sees the series again. Another folder's keys
differ (another secret), so nothing links patients across output folders. Whoever can read the
state store can test guessed PatientIDs against the keys (a keyed digest beside its key); the
store is owner-only unless ``--group-readable``.

**Which series represents a study** (only it gets the comparison; the study's other analysed
series have ``study_representative`` ``no`` and empty follow-up cells). Among the study's
``ok`` series, in order: one with a GGO percentage of lung (the trend needs it); the thinnest
slices (the lung is read and measured on thin sections, and thin and thick sections are not
interchangeable: a chest-phantom study of 1.25, 2.5 and 5 mm sections, PMC4000020); the most
slices (the widest coverage); the lowest SeriesNumber (the primary reconstruction usually comes
first); the lowest SeriesInstanceUID, so the choice never depends on the order of completion.

**Which prior.** The representative of the same patient's study with the latest StudyDate
strictly before this study's (the later StudyInstanceUID on a tie); a study without a valid
date is neither compared nor a prior. Two studies of one day are not compared with each other
(StudyDate is the only time kept).

**The trend word.** ``increased`` or ``decreased`` only when the change of GGO percent of lung
exceeds *both* :data:`TREND_RULE`'s thresholds, else ``stable``:

- more than 1.0 percentage point: a deep-learning opacity quantifier reports up to about 1 %
  of lung on normal lungs (98 of 100 healthy controls under 1 %, Chaganti et al., Radiol Artif
  Intell 2020, PMC7392373), so smaller changes are within what the method reports of nothing;
- more than 15 % of the larger of the two percentages: reconstructing one acquisition with
  another algorithm, slice thickness or kernel changed a CT lung-volume measure by 1 %, 2 % and
  up to 14 % (Berta et al., Phys Med 82:28-39, 2021, PMC7843021). Relative to the larger value,
  so the verdict of a pair does not depend on which reconstruction came first.

Both are compared exactly on the CSV's decimals, and without a percentage on either side
(``--no-lung-mask``) the trend is empty. The trend stays GGO's; with a model that has a
consolidation channel the comparison also carries the change of consolidation mL and of lesion
(GGO + consolidation) percent of lung, each only where both studies have it (a one-channel
model, or a row stored before those columns, leaves it empty).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from ..domain import Comparison, Followup, Trend, TrendPoint

LINK_KEY = "_link_key"
"""Hidden cell of a stored row: the series' link key (never a CSV column)."""
SERIES_NUMBER_KEY = "_series_number"
"""Hidden cell of a stored row: the series' SeriesNumber, a tie-break of the representative."""
_LINK_DOMAIN = b"ggo-cli patient link\0"
OK_STATUS = "ok"


@dataclass(frozen=True, slots=True)
class TrendRule:
    """When a change of GGO percent of lung counts: it must exceed both thresholds.

    Attributes:
        min_points: percentage points of lung the change must exceed.
        min_relative: fraction of the larger of the two percentages the change must exceed.
    """

    min_points: Decimal = Decimal("1.0")
    min_relative: Decimal = Decimal("0.15")


TREND_RULE = TrendRule()
"""The rule of the ``trend`` column (see the module docstring for the sources)."""


@dataclass(frozen=True, slots=True)
class SeriesResult:
    """What follow-up needs of one stored series.

    Attributes:
        series_instance_uid: SeriesInstanceUID.
        study_instance_uid: StudyInstanceUID.
        link_key: the patient's link key; ``""``: not linkable (no PatientID).
        study_date: StudyDate, ``None`` when missing or invalid.
        analysed: the series' status is ``ok``.
        slice_spacing_mm: slice spacing, ``None`` when unknown.
        n_slices: slices analysed.
        series_number: SeriesNumber, ``None`` when unknown.
        ggo_volume_ml: GGO volume (the CSV's decimals), ``None`` when not measured.
        ggo_percent_of_lung: GGO percent of lung (the CSV's decimals), ``None`` when undefined.
        consolidation_volume_ml: consolidation volume (the CSV's decimals), ``None`` when the
            model had no consolidation channel.
        lesion_percent_of_lung: lesion percent of lung (the CSV's decimals), ``None`` when
            undefined or not measured.
    """

    series_instance_uid: str
    study_instance_uid: str
    link_key: str
    study_date: dt.date | None
    analysed: bool
    slice_spacing_mm: Decimal | None = None
    n_slices: int = 0
    series_number: int | None = None
    ggo_volume_ml: Decimal | None = None
    ggo_percent_of_lung: Decimal | None = None
    consolidation_volume_ml: Decimal | None = None
    lesion_percent_of_lung: Decimal | None = None


def link_key(secret: bytes, patient_id: str) -> str:
    """The link key of a PatientID: HMAC-SHA256 under the folder's secret, 64 hex characters.

    Args:
        secret: the output folder's link secret.
        patient_id: PatientID (surrounding spaces ignored, as DICOM pads values).

    Returns:
        The key, or ``""`` for an empty PatientID (never linked).
    """
    value = patient_id.strip()
    if not value:
        return ""
    return hmac.new(secret, _LINK_DOMAIN + value.encode(), hashlib.sha256).hexdigest()


def classify(prior_percent: Decimal, percent: Decimal, rule: TrendRule = TREND_RULE) -> Trend:
    """The trend word of a change of GGO percent of lung (module docstring: the rule).

    Args:
        prior_percent: GGO percent of lung of the prior study.
        percent: GGO percent of lung now.
        rule: the thresholds, both of which the change must exceed.

    Returns:
        ``increased``, ``decreased`` or ``stable``.
    """
    change = percent - prior_percent
    larger = max(abs(percent), abs(prior_percent))
    if abs(change) <= rule.min_points or abs(change) <= rule.min_relative * larger:
        return Trend.STABLE
    return Trend.INCREASED if change > 0 else Trend.DECREASED


def _decimal(text: str | None) -> Decimal | None:
    """A CSV number as a Decimal (exact on the CSV's digits); ``None`` when empty or invalid."""
    try:
        value = Decimal((text or "").strip())
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def _date(text: str) -> dt.date | None:
    """An ISO ``YYYY-MM-DD`` date (the CSV's form), ``None`` when missing or invalid."""
    try:
        return dt.date.fromisoformat(text.strip()) if len(text.strip()) == 10 else None
    except ValueError:
        return None


def _integer(text: str | None) -> int | None:
    """An integer cell, ``None`` when empty or invalid."""
    try:
        return int((text or "").strip())
    except ValueError:
        return None


def result_from_row(row: Mapping[str, str]) -> SeriesResult:
    """A stored CSV row (with its hidden cells) as a :class:`SeriesResult`."""
    return SeriesResult(
        series_instance_uid=row.get("series_instance_uid", ""),
        study_instance_uid=row.get("study_instance_uid", ""),
        link_key=row.get(LINK_KEY, ""),
        study_date=_date(row.get("study_date", "")),
        analysed=row.get("status") == OK_STATUS,
        slice_spacing_mm=_decimal(row.get("slice_spacing_mm")),
        n_slices=_integer(row.get("n_slices")) or 0,
        series_number=_integer(row.get(SERIES_NUMBER_KEY)),
        ggo_volume_ml=_decimal(row.get("ggo_volume_ml")),
        ggo_percent_of_lung=_decimal(row.get("ggo_percent_of_lung")),
        consolidation_volume_ml=_decimal(row.get("consolidation_volume_ml")),
        lesion_percent_of_lung=_decimal(row.get("lesion_percent_of_lung")),
    )


def representative_order(
    result: SeriesResult,
) -> tuple[bool, bool, Decimal, int, bool, int, str]:
    """Sort key of a study's analysed series: the first represents the study (see above)."""
    spacing = result.slice_spacing_mm
    number = result.series_number
    return (
        result.ggo_percent_of_lung is None,
        spacing is None,
        spacing if spacing is not None else Decimal(0),
        -result.n_slices,
        number is None,
        number if number is not None else 0,
        result.series_instance_uid,
    )


def representatives(results: Iterable[SeriesResult]) -> dict[str, SeriesResult]:
    """The representative series of each study with an analysed, linkable series.

    Returns:
        StudyInstanceUID -> its representative.
    """
    studies: dict[str, list[SeriesResult]] = defaultdict(list)
    for result in results:
        if result.analysed and result.link_key:
            studies[result.study_instance_uid].append(result)
    return {uid: min(found, key=representative_order) for uid, found in studies.items()}


def _difference(now: Decimal | None, then: Decimal | None) -> Decimal | None:
    """``now - then``, ``None`` when either is missing."""
    return None if now is None or then is None else now - then


def compare(result: SeriesResult, prior: SeriesResult, rule: TrendRule = TREND_RULE) -> Comparison:
    """A representative series against the prior study's representative.

    Raises:
        ValueError: either has no StudyDate, or the prior is not earlier.
    """
    if result.study_date is None or prior.study_date is None:
        raise ValueError("both studies need a StudyDate to be compared")
    days = (result.study_date - prior.study_date).days
    if days <= 0:
        raise ValueError(f"the prior study is not earlier ({days} days)")
    percent = _difference(result.ggo_percent_of_lung, prior.ggo_percent_of_lung)
    trend = None
    if result.ggo_percent_of_lung is not None and prior.ggo_percent_of_lung is not None:
        trend = classify(prior.ggo_percent_of_lung, result.ggo_percent_of_lung, rule)
    return Comparison(
        prior_study_date=prior.study_date,
        days_since_prior=days,
        ggo_change_ml=_difference(result.ggo_volume_ml, prior.ggo_volume_ml),
        ggo_percent_of_lung_change=percent,
        trend=trend,
        consolidation_change_ml=_difference(
            result.consolidation_volume_ml, prior.consolidation_volume_ml
        ),
        lesion_percent_of_lung_change=_difference(
            result.lesion_percent_of_lung, prior.lesion_percent_of_lung
        ),
    )


def _patients(chosen: Mapping[str, SeriesResult]) -> dict[str, list[SeriesResult]]:
    """Each patient's dated representatives, oldest first (link key -> list)."""
    patients: dict[str, list[SeriesResult]] = defaultdict(list)
    for result in chosen.values():
        if result.study_date is not None:
            patients[result.link_key].append(result)
    for studies in patients.values():
        studies.sort(key=lambda r: (r.study_date or dt.date.min, r.study_instance_uid))
    return patients


def follow_up(
    results: Sequence[SeriesResult], rule: TrendRule = TREND_RULE
) -> dict[str, Followup]:
    """The follow-up of every series: which represent their study, and their comparisons.

    Args:
        results: every stored series of the output folder (any order).
        rule: the trend thresholds.

    Returns:
        SeriesInstanceUID -> :class:`Followup`, for every series given.
    """
    chosen = representatives(results)
    comparisons: dict[str, Comparison] = {}
    for studies in _patients(chosen).values():
        for k, result in enumerate(studies):
            earlier = [s for s in studies[:k] if s.study_date != result.study_date]
            if earlier:
                comparisons[result.series_instance_uid] = compare(result, earlier[-1], rule)
    represented = {r.series_instance_uid for r in chosen.values()}
    followups: dict[str, Followup] = {}
    for result in results:
        uid = result.series_instance_uid
        if not (result.analysed and result.link_key):
            followups[uid] = Followup()
        else:
            followups[uid] = Followup(uid in represented, comparisons.get(uid))
    return followups


def trend_points(results: Sequence[SeriesResult]) -> list[tuple[TrendPoint, ...]]:
    """Each patient's trend picture: one point per dated study with a GGO percentage.

    Only patients with at least two such studies get a picture. Points are oldest first; the
    patient is not named (the link key stays here).

    Returns:
        One tuple of points per patient (ordered by the latest point's series UID).
    """
    pictures = []
    for studies in _patients(representatives(results)).values():
        points = tuple(
            TrendPoint(s.study_date, s.ggo_percent_of_lung, s.series_instance_uid)
            for s in studies
            if s.study_date is not None and s.ggo_percent_of_lung is not None
        )
        if len(points) >= 2:
            pictures.append(points)
    return sorted(pictures, key=lambda points: points[-1].series_instance_uid)
