"""The shared test data are found relative to the checkout (or ``GGO_SHARED_DATA``), and a
missing path fails in CI instead of skipping."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import shared_data
from tests.shared_data import (
    DCMQI_CT,
    DCMQI_SEG,
    ENV_SHARED_DATA,
    REAL_CT_DIR,
    require_shared,
    shared_data_root,
)

REPO = Path(__file__).resolve().parents[1]


def test_a_missing_path_fails_in_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    missing = tmp_path / "no-such-folder"
    with pytest.raises(pytest.fail.Exception, match=f"not found: {re.escape(str(missing))}.*"
                       f"{ENV_SHARED_DATA}"):
        require_shared(missing)


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_a_missing_path_skips_outside_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match=ENV_SHARED_DATA):
        require_shared(tmp_path / "no-such-folder")


def test_an_existing_path_is_returned_in_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    assert require_shared(tmp_path) == tmp_path


def test_the_environment_variable_overrides_the_checkout_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_SHARED_DATA, str(tmp_path))
    assert shared_data_root() == tmp_path
    monkeypatch.delenv(ENV_SHARED_DATA)
    assert shared_data_root() == REPO.parent / "shared" / "data"


def test_the_seg_round_trip_data_are_found_here() -> None:
    # The writer tests' real series and dcmqi's SEG, from the one shared-data location.
    for path in (REAL_CT_DIR, DCMQI_CT, DCMQI_SEG):
        assert path.is_relative_to(shared_data.SHARED_DATA)
        require_shared(path)
    assert len(list(REAL_CT_DIR.glob("*.dcm"))) == 30
    assert len(list(DCMQI_CT.glob("*.dcm"))) == 3


def test_no_absolute_machine_path_in_the_tests() -> None:
    pattern = re.compile(r"""["'](/work|/home|/Users|/tmp)/""")
    offenders = [
        path.relative_to(REPO)
        for path in (REPO / "tests").rglob("*.py")
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
