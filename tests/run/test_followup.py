"""Follow-up against priors as pure functions: the trend rule at its thresholds, the
representative series of a study, the prior of each study, the patient key, the CSV cells."""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal
from pathlib import Path

import pytest

from ggo_cli.domain import Comparison, Followup, Trend
from ggo_cli.errors import OutputError
from ggo_cli.run.followup import (
    LINK_KEY,
    SERIES_NUMBER_KEY,
    TREND_RULE,
    SeriesResult,
    classify,
    follow_up,
    link_key,
    representatives,
    result_from_row,
    trend_points,
)
from ggo_cli.run.state import LINK_SECRET_BYTES, StateStore
from ggo_cli.writers.report_csv import FOLLOWUP_COLUMNS, followup_cells

SECRET = bytes(range(32))
ALICE = link_key(SECRET, "PAT-001")
BOB = link_key(SECRET, "PAT-002")


def _series(
    uid: str,
    study: str,
    date: str,
    percent: str | None = "5.0000",
    *,
    key: str = ALICE,
    ml: str = "50.000000",
    spacing: str = "1.25",
    n_slices: int = 200,
    number: int | None = 2,
    analysed: bool = True,
) -> SeriesResult:
    return SeriesResult(
        series_instance_uid=uid,
        study_instance_uid=study,
        link_key=key,
        study_date=dt.date.fromisoformat(date),
        analysed=analysed,
        slice_spacing_mm=Decimal(spacing),
        n_slices=n_slices,
        series_number=number,
        ggo_volume_ml=Decimal(ml),
        ggo_percent_of_lung=None if percent is None else Decimal(percent),
    )


@pytest.mark.parametrize(
    ("prior", "now", "expected"),
    [
        ("10.0000", "11.0000", Trend.STABLE),  # exactly 1 point: not more than 1
        ("0.0000", "1.0000", Trend.STABLE),  # 100 % relative, but only 1 point
        ("0.0000", "1.0001", Trend.INCREASED),
        ("8.5000", "10.0000", Trend.STABLE),  # 1.5 points, exactly 15 % of 10
        ("8.4000", "10.0000", Trend.INCREASED),  # 1.6 points, 16 %
        ("10.0000", "8.4000", Trend.DECREASED),  # the same pair the other way round
        ("30.0000", "34.0000", Trend.STABLE),  # 4 points, but 11.8 % of 34
        ("30.0000", "36.0000", Trend.INCREASED),  # 6 points, 16.7 %
        ("12.3456", "12.3456", Trend.STABLE),
    ],
)
def test_the_trend_needs_both_thresholds_exceeded(prior: str, now: str, expected: Trend) -> None:
    assert classify(Decimal(prior), Decimal(now)) is expected


def test_the_rule_is_one_point_and_fifteen_percent() -> None:
    assert TREND_RULE.min_points == Decimal("1.0")
    assert TREND_RULE.min_relative == Decimal("0.15")


def test_the_thinnest_then_longest_then_lowest_numbered_series_represents_a_study() -> None:
    study = [
        _series("1.1", "1", "2024-01-01", spacing="5", n_slices=60, number=1),
        _series("1.2", "1", "2024-01-01", spacing="1", n_slices=300, number=4),
        _series("1.3", "1", "2024-01-01", spacing="1", n_slices=300, number=3),
        _series("1.4", "1", "2024-01-01", spacing="1", n_slices=280, number=2),
        _series("1.5", "1", "2024-01-01", None, spacing="0.5", n_slices=600, number=1),
        _series("1.6", "1", "2024-01-01", spacing="0.5", number=1, analysed=False),
    ]
    assert representatives(study)["1"].series_instance_uid == "1.3"
    tied = [_series("2.9", "2", "2024-01-01", number=None), _series("2.1", "2", "2024-01-01",
                                                                     number=None)]
    assert representatives(tied)["2"].series_instance_uid == "2.1"


def _three_studies() -> list[SeriesResult]:
    return [
        _series("1.1", "1", "2024-01-01", "2.0000", ml="20.000000"),
        _series("2.1", "2", "2024-02-01", "5.0000", ml="50.500000"),
        _series("2.2", "2", "2024-02-01", "9.0000", spacing="5"),  # a thick recon of study 2
        _series("3.1", "3", "2024-03-15", "9.0000", ml="90.250000"),
        _series("9.1", "9", "2024-02-20", "40.0000", key=BOB),  # another patient, in between
        _series("8.1", "8", "2024-01-10", "45.0000", key=BOB),
        _series("7.1", "7", "2024-01-05", "30.0000", key=""),  # no PatientID: never linked
        _series("6.1", "6", "2024-03-01", "1.0000", analysed=False),  # failed: no prior
    ]


def test_each_study_is_compared_with_the_same_patients_latest_earlier_study() -> None:
    results = _three_studies()
    expected = {
        "1.1": Followup(True, None),
        "2.1": Followup(
            True, Comparison(dt.date(2024, 1, 1), 31, Decimal("30.5"), Decimal("3"),
                             Trend.INCREASED)
        ),
        "2.2": Followup(False, None),
        "3.1": Followup(
            True, Comparison(dt.date(2024, 2, 1), 43, Decimal("39.75"), Decimal("4"),
                             Trend.INCREASED)
        ),
        "8.1": Followup(True, None),
        "9.1": Followup(
            True, Comparison(dt.date(2024, 1, 10), 41, Decimal("0"), Decimal("-5"),
                             Trend.STABLE)
        ),
        "7.1": Followup(),
        "6.1": Followup(),
    }
    for _ in range(5):  # any order of completion gives the same follow-up
        random.shuffle(results)
        assert follow_up(results) == expected


def test_a_repeat_of_the_same_study_on_a_later_date_is_stable() -> None:
    first = _series("1.1", "1", "2024-01-01", "7.2500", ml="72.500000")
    repeat = _series("2.1", "2", "2024-01-08", "7.2500", ml="72.500000")
    comparison = follow_up([first, repeat])["2.1"].comparison
    assert comparison == Comparison(dt.date(2024, 1, 1), 7, Decimal(0), Decimal(0), Trend.STABLE)


def test_studies_of_one_day_are_not_compared_with_each_other() -> None:
    results = [
        _series("1.1", "1", "2024-01-01", "2.0000"),
        _series("2.1", "2", "2024-01-05", "5.0000"),
        _series("3.1", "3", "2024-01-05", "9.0000"),
    ]
    followups = follow_up(results)
    assert followups["2.1"].comparison is not None
    assert followups["3.1"].comparison is not None
    assert followups["2.1"].comparison.prior_study_date == dt.date(2024, 1, 1)
    assert followups["3.1"].comparison.prior_study_date == dt.date(2024, 1, 1)


def test_without_lung_percentages_the_change_in_ml_stays_and_the_trend_is_empty() -> None:
    results = [
        _series("1.1", "1", "2024-01-01", None, ml="1.000000"),
        _series("2.1", "2", "2024-01-02", None, ml="3.500000"),
    ]
    comparison = follow_up(results)["2.1"].comparison
    assert comparison is not None
    assert comparison.ggo_change_ml == Decimal("2.5")
    assert comparison.ggo_percent_of_lung_change is None and comparison.trend is None
    assert trend_points(results) == []


def test_link_keys_separate_patients_and_folders_and_never_link_an_empty_id() -> None:
    assert ALICE != BOB and len(ALICE) == 64
    assert link_key(SECRET, " PAT-001 ") == ALICE  # DICOM pads values with spaces
    assert link_key(bytes(32), "PAT-001") != ALICE  # another folder's secret
    assert link_key(SECRET, "") == link_key(SECRET, "  ") == ""
    assert "PAT-001" not in ALICE


def test_trend_points_are_one_per_study_for_patients_with_two_or_more() -> None:
    pictures = trend_points(_three_studies())
    dates = [[p.study_date.isoformat() for p in points] for points in pictures]
    assert sorted(dates) == [["2024-01-01", "2024-02-01", "2024-03-15"],
                             ["2024-01-10", "2024-02-20"]]
    alice = next(points for points in pictures if len(points) == 3)
    assert [p.series_instance_uid for p in alice] == ["1.1", "2.1", "3.1"]
    assert [p.ggo_percent_of_lung for p in alice] == [Decimal(2), Decimal(5), Decimal(9)]


def test_rows_are_read_with_their_hidden_cells() -> None:
    row = {
        "series_instance_uid": "1.2",
        "study_instance_uid": "1",
        "study_date": "2024-01-31",
        "status": "ok",
        "slice_spacing_mm": "1.25",
        "n_slices": "300",
        "ggo_volume_ml": "12.500000",
        "ggo_percent_of_lung": "",
        LINK_KEY: ALICE,
        SERIES_NUMBER_KEY: "3",
    }
    assert result_from_row(row) == SeriesResult(
        "1.2", "1", ALICE, dt.date(2024, 1, 31), True, Decimal("1.25"), 300, 3,
        Decimal("12.5"), None,
    )
    odd = result_from_row({**row, "study_date": "20240131", "status": "failed", "n_slices": ""})
    assert odd.study_date is None and not odd.analysed and odd.n_slices == 0


def test_csv_cells_of_a_comparison() -> None:
    comparison = Comparison(dt.date(2024, 1, 1), 31, Decimal("-2.5"), Decimal("-0.00004"),
                            Trend.DECREASED)
    assert followup_cells(Followup(True, comparison)) == {
        "study_representative": "yes",
        "prior_study_date": "2024-01-01",
        "days_since_prior": "31",
        "ggo_change_ml": "-2.500000",
        "ggo_percent_of_lung_change": "0.0000",  # rounded to the CSV's decimals, never -0
        "trend": "decreased",
    }
    assert followup_cells(Followup(False, None)) == {
        **dict.fromkeys(FOLLOWUP_COLUMNS, ""), "study_representative": "no"
    }
    assert followup_cells(None) == followup_cells(Followup()) == dict.fromkeys(FOLLOWUP_COLUMNS,
                                                                                "")


def test_each_output_folder_keeps_one_random_link_secret(tmp_path: Path) -> None:
    with StateStore(tmp_path / "a") as store:
        secret = store.link_secret()
        assert len(secret) == LINK_SECRET_BYTES and store.link_secret() == secret
    with StateStore(tmp_path / "a") as store:
        assert store.link_secret() == secret  # kept for good: later runs link to earlier ones
    with StateStore(tmp_path / "b") as store:
        assert store.link_secret() != secret
    key = tmp_path / "a" / ".ggo-cli" / "link.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert secret not in (tmp_path / "a" / ".ggo-cli" / "state.sqlite").read_bytes()
    key.write_bytes(b"short")
    with StateStore(tmp_path / "a") as store, pytest.raises(OutputError, match="not a link secret"):
        store.link_secret()
