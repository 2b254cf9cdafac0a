"""Follow-up in real runs (issue 21): one phantom patient's studies on several dates with growing
GGO, a repeat of a study, a second patient in between, a later run that adds a study; the CSV's
follow-up columns, the trend picture, and no patient key outside the state store."""

from __future__ import annotations

import csv
import json
import sqlite3
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from ggo_cli.cli.app import app
from ggo_cli.config import ENV_PSEUDONYM_SALT
from ggo_cli.synthetic.ct_writer import SeriesAttributes, write_ct_series
from ggo_cli.synthetic.phantom import GgoLesion, Phantom, make_chest_phantom

SHAPE = (12, 64, 64)
SPACING_MM = (5.0, 5.0, 5.0)
ANATOMY_SEED = 3
PATIENT = "PAT-FOLLOWUP-1"
OTHER = "PAT-FOLLOWUP-2"
SALT = "a-secret-salt-of-some-length"


def _phantom(radius_mm: float) -> Phantom:
    """The same chest (anatomy and noise) with one GGO patch of the given radius."""
    lesion = GgoLesion((6.0, 32.0, 18.0), (radius_mm,) * 3)
    return make_chest_phantom(SHAPE, SPACING_MM, seed=ANATOMY_SEED, ggo_lesions=[lesion])


def _study(root: Path, name: str, phantom: Phantom, patient: str, date: str, seed: int) -> None:
    """One study of one series (UIDs from ``seed``) of ``patient`` on ``date``."""
    attributes = SeriesAttributes(patient_id=patient, patient_name="DOE^JANE", study_date=date)
    write_ct_series(phantom, root / name, attributes=attributes, seed=seed)


def _segment(inputs: Path, out: Path, model: Path, *extra: str) -> None:
    result = CliRunner().invoke(
        app,
        ["segment", str(inputs), "-o", str(out), "-m", str(model), "--no-progress", "--settle",
         "0", "--decode-workers", "0", "--png", "none", "--sc", "none", "--no-sr", *extra],
        env={ENV_PSEUDONYM_SALT: SALT},
    )
    assert result.exit_code == 0, result.output


def _rows(out: Path) -> dict[str, dict[str, str]]:
    """CSV rows by study date (one series per study here)."""
    with (out / "ggo_volumes.csv").open(newline="", encoding="utf-8") as fh:
        return {row["study_date"]: row for row in csv.DictReader(fh)}


def _forget_link_keys(out: Path) -> None:
    """Drop every stored row's link key, as in a store of a ggo-cli without follow-up."""
    with sqlite3.connect(out / ".ggo-cli" / "state.sqlite") as db:
        rows = db.execute("SELECT series_instance_uid, row_json FROM series").fetchall()
        for uid, row_json in rows:
            row = json.loads(row_json)
            assert row.pop("_link_key")
            db.execute("UPDATE series SET row_json = ? WHERE series_instance_uid = ?",
                       (json.dumps(row, sort_keys=True), uid))
    db.close()


@dataclass(frozen=True)
class Runs:
    first: dict[str, dict[str, str]]
    second: dict[str, dict[str, str]]
    trends_first: list[Path]
    trends_second: list[Path]
    out: Path
    truth_ml: dict[str, float]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, band_model_path: Path) -> Runs:
    """Run 1 (default options): the patient on 2024-01-01, -02-01 and -03-15 with growing GGO,
    the third study again (identical pixels, other UIDs) on 2024-04-01, the other patient on
    2024-01-10 (much GGO) and 2024-02-20. Run 2 (``--pseudonymize``), over a store whose rows
    lost their link keys: a later study of the patient on 2024-05-02."""
    root = tmp_path_factory.mktemp("followup")
    inputs, out = root / "in", root / "out"
    radii = {"2024-01-01": 8.0, "2024-02-01": 14.0, "2024-03-15": 20.0, "2024-04-01": 20.0}
    for seed, (date, radius) in enumerate(radii.items(), start=1):
        _study(inputs, f"p1-{seed}", _phantom(radius), PATIENT, date.replace("-", ""), seed)
    _study(inputs, "p2-1", _phantom(24.0), OTHER, "20240110", 11)
    _study(inputs, "p2-2", _phantom(10.0), OTHER, "20240220", 12)
    _segment(inputs, out, band_model_path)
    first, trends_first = _rows(out), sorted(out.rglob("trend.png"))
    _forget_link_keys(out)  # as a store written before follow-up existed
    _study(inputs, "p1-5", _phantom(8.0), PATIENT, "20240502", 5)
    _segment(inputs, out, band_model_path, "--pseudonymize")
    truth = {date: _phantom(radius).ggo_volume_ml for date, radius in radii.items()}
    return Runs(first, _rows(out), trends_first, sorted(out.rglob("trend.png")), out, truth)


def _cells(row: dict[str, str]) -> tuple[str, str, str]:
    return row["prior_study_date"], row["days_since_prior"], row["trend"]


def test_growing_ggo_gives_increased_twice_with_the_right_changes(runs: Runs) -> None:
    rows = runs.first
    assert _cells(rows["2024-01-01"]) == ("", "", "")
    assert _cells(rows["2024-02-01"]) == ("2024-01-01", "31", "increased")
    assert _cells(rows["2024-03-15"]) == ("2024-02-01", "43", "increased")
    for now, then in (("2024-02-01", "2024-01-01"), ("2024-03-15", "2024-02-01")):
        change = Decimal(rows[now]["ggo_change_ml"])
        assert change == Decimal(rows[now]["ggo_volume_ml"]) - Decimal(rows[then]["ggo_volume_ml"])
        percent = Decimal(rows[now]["ggo_percent_of_lung_change"])
        expected = Decimal(rows[now]["ggo_percent_of_lung"]) - Decimal(
            rows[then]["ggo_percent_of_lung"]
        )
        assert percent == expected
        true_change = runs.truth_ml[now] - runs.truth_ml[then]
        assert float(change) == pytest.approx(true_change, rel=0.15)  # the band model's view
    assert all(row["study_representative"] == "yes" for row in rows.values())


def test_a_repeat_of_the_same_study_is_stable(runs: Runs) -> None:
    row = runs.first["2024-04-01"]
    assert _cells(row) == ("2024-03-15", "17", "stable")
    assert row["ggo_change_ml"] == "0.000000"
    assert row["ggo_percent_of_lung_change"] == "0.0000"


def test_two_patients_never_mix(runs: Runs) -> None:
    rows = runs.first
    assert _cells(rows["2024-01-10"]) == ("", "", "")  # the other patient's first study
    assert _cells(rows["2024-02-20"]) == ("2024-01-10", "41", "decreased")
    assert rows["2024-02-01"]["prior_study_date"] == "2024-01-01"  # not the 10th, not the 20th
    assert rows["2024-03-15"]["prior_study_date"] == "2024-02-01"


def test_the_trend_picture_sits_in_each_patients_latest_study_and_moves_on(runs: Runs) -> None:
    def folders(rows: dict[str, dict[str, str]], *dates: str) -> list[Path]:
        return sorted((runs.out / rows[d]["seg_path"]).parent / "trend.png" for d in dates)

    assert runs.trends_first == folders(runs.first, "2024-04-01", "2024-02-20")
    assert runs.trends_second == folders(runs.second, "2024-05-02", "2024-02-20")
    dates = ("2024-01-01", "2024-02-01", "2024-03-15", "2024-04-01", "2024-05-02")
    described = {}
    for path in runs.trends_second:
        text = Image.open(path).text
        assert set(text) == {"Title", "Description"}
        assert PATIENT not in str(text) and "DOE" not in str(text) and "JANE" not in str(text)
        described[path] = text["Description"]
    latest = (runs.out / runs.second["2024-05-02"]["seg_path"]).parent / "trend.png"
    assert described[latest] == "; ".join(
        f"{d} {runs.second[d]['ggo_percent_of_lung']}%" for d in dates
    )
    assert Image.open(latest).size == (640, 360)
    assert not (runs.out / runs.first["2024-04-01"]["seg_path"]).parent.joinpath(
        "trend.png"
    ).exists()  # the stale one, gone


def test_a_later_run_compares_with_studies_of_earlier_runs(runs: Runs) -> None:
    rows = runs.second
    assert _cells(rows["2024-05-02"]) == ("2024-04-01", "31", "decreased")
    assert all(row["patient_pseudonym"] for row in rows.values())
    for date, row in runs.first.items():  # reused series get their keys and follow-up back
        assert {k: rows[date][k] for k in ("prior_study_date", "ggo_change_ml", "trend")} == {
            k: row[k] for k in ("prior_study_date", "ggo_change_ml", "trend")
        }


def test_link_keys_stay_in_the_state_store(runs: Runs) -> None:
    with sqlite3.connect(runs.out / ".ggo-cli" / "state.sqlite") as db:
        stored = [json.loads(r[0]) for r in db.execute("SELECT row_json FROM series")]
    keys = {row["_link_key"] for row in stored}
    assert len(keys) == 2  # one per patient
    texts = [(runs.out / "ggo_volumes.csv").read_text(), (runs.out / "run_manifest.json")
             .read_text()]
    texts += [p.read_text() for p in (runs.out / ".ggo-cli" / "runs").glob("*.json")]
    for text in texts:
        assert not any(key in text for key in keys)
        assert PATIENT not in text and OTHER not in text
    assert all("patient_id" not in row for row in stored)
    assert not any(isinstance(v, str) and PATIENT in v for row in stored for v in row.values())
    for path in runs.trends_second:
        assert not any(key.encode() in path.read_bytes() for key in keys)
