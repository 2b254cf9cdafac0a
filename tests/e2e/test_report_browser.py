"""``report.html`` of a real ``segment`` run (ok, skipped and failed series) in headless Chromium.

The page is opened from its file (as from a file share) and driven over the DevTools protocol
(:mod:`tests.e2e.cdp`): one row per series with the CSV's numbers, sorting by a numeric column,
filtering by status and text, every link resolving to an image that loads, no console error,
no request but to local files, and a screenshot.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image
from typer.testing import CliRunner

from ggo_cli.cli.app import app
from ggo_cli.config import CSV_NAME, OVERLAY_NAME, TREND_NAME
from ggo_cli.writers.report_html import REPORT_NAME
from tests.dicom_factory import make_ct_series
from tests.e2e.cdp import LOCAL_SCHEMES, HeadlessChromium, chromium_binary
from tests.onnx_models import write_conv_explain_pair

ROWS_JS = """
Array.from(document.querySelectorAll('#series-table tbody tr')).filter(tr => !tr.hidden)
  .map(tr => Object.fromEntries(Array.from(tr.querySelectorAll('td[data-col]'))
  .map(td => [td.dataset.col, [td.dataset.v, td.textContent]])))
"""
LINKS_JS = """
Promise.all(Array.from(document.querySelectorAll('a[href], img[src]'))
  .map(e => e.getAttribute(e.tagName === 'A' ? 'href' : 'src'))
  .map(address => new Promise(done => {
    const image = new Image();
    image.onload = () => done([address, image.naturalWidth]);
    image.onerror = () => done([address, 0]);
    image.src = address;
  })))
"""


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / CSV_NAME).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def run_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of one real run: two ok series, a localizer (skipped) and a series
    with a gap (failed), with GradCAM++ panels; then rebuilt by ``ggo-cli report``."""
    tmp = tmp_path_factory.mktemp("report-run")
    model, _ = write_conv_explain_pair(tmp / "model")
    first = make_ct_series(tmp, folder="first", seed=1, localizer=True)
    second = make_ct_series(tmp, shape=(14, 64, 64), folder="second", seed=3)
    bad = make_ct_series(tmp, folder="bad", uneven_spacing=True, seed=2)
    out = tmp / "out"
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "segment",
            *(str(s.root) for s in (first, second, bad)),
            *("--out", str(out), "--model", str(model), "--explain", "--sc", "none"),
            *("--no-progress", "--settle", "0"),
        ],
    )
    assert result.exit_code == 7, result.output  # some series failed
    assert (out / REPORT_NAME).is_file(), "the run did not build report.html"
    ok = next(r for r in _rows(out) if r["status"] == "ok")
    folder = out / ok["study_instance_uid"] / ok["series_instance_uid"]
    if not (folder / TREND_NAME).exists():  # where the follow-up step draws one
        shutil.copyfile(folder / OVERLAY_NAME, folder / TREND_NAME)
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def page(run_out: Path, tmp_path: Path) -> Iterator[HeadlessChromium]:
    """Chromium showing the run's ``report.html``; killed afterwards, even on failure."""
    with HeadlessChromium(chromium_binary(), tmp_path / "profile") as browser:
        browser.navigate((run_out / REPORT_NAME).as_uri())
        yield browser
        assert browser.errors() == []
        foreign = [u for u in browser.requested_urls() if not u.startswith(LOCAL_SCHEMES)]
        assert foreign == []


def test_one_row_per_series_with_the_csv_numbers(run_out: Path, page: HeadlessChromium) -> None:
    csv_rows = _rows(run_out)
    shown = page.evaluate(ROWS_JS)
    assert {r["status"] for r in csv_rows} == {"ok", "skipped", "failed"}
    assert len(shown) == len(csv_rows) == 4
    for row, cells in zip(csv_rows, shown, strict=True):
        for column in ("series_instance_uid", "study_date", "status", "message", "n_slices"):
            assert cells[column][0] == row[column]
        assert cells["ggo_volume_ml"][0] == row["ggo_volume_ml"]
        if row["ggo_volume_ml"]:
            assert cells["ggo_volume_ml"][1] == f"{float(row['ggo_volume_ml']):.2f}"
    summary = page.evaluate("document.getElementById('run-summary').textContent")
    assert "ok 2, skipped 1, failed 1" in summary
    failures = page.evaluate("document.getElementById('failures').textContent")
    assert "slice spacing varies" in failures


def _click_header(page: HeadlessChromium, column: str) -> list[str]:
    page.evaluate(f"document.querySelector('th[data-col=\"{column}\"] button').click()")
    return [cells[column][0] for cells in page.evaluate(ROWS_JS)]


def test_sorting_by_a_numeric_column(page: HeadlessChromium) -> None:
    slices = _click_header(page, "n_slices")
    assert slices == sorted(slices, key=float)  # "2" before "12": numbers, not text
    assert slices != sorted(slices)
    assert _click_header(page, "n_slices") == sorted(slices, key=float, reverse=True)
    volumes = _click_header(page, "ggo_volume_ml")
    filled = [v for v in volumes if v]
    assert len(filled) == 2 and volumes[:2] == sorted(filled, key=float)
    assert volumes[2:] == ["", ""]  # empty cells last
    volumes = _click_header(page, "ggo_volume_ml")
    assert volumes[:2] == sorted(filled, key=float, reverse=True) and volumes[2:] == ["", ""]
    state = page.evaluate("document.querySelector('th[data-col=\"ggo_volume_ml\"]').ariaSort")
    assert state == "descending"


def _filter(page: HeadlessChromium, status: str, text: str) -> tuple[list[str], str]:
    page.evaluate(
        "(() => { const s = document.getElementById('filter-status');"
        f" s.value = {json.dumps(status)}; s.dispatchEvent(new Event('change'));"
        " const t = document.getElementById('filter-text');"
        f" t.value = {json.dumps(text)}; t.dispatchEvent(new Event('input')); }})()"
    )
    statuses = [cells["status"][0] for cells in page.evaluate(ROWS_JS)]
    return statuses, page.evaluate("document.getElementById('shown-count').textContent")


def test_filtering_by_status_and_text(page: HeadlessChromium) -> None:
    assert _filter(page, "failed", "") == (["failed"], "1")
    assert _filter(page, "ok", "") == (["ok", "ok"], "2")
    assert _filter(page, "", "LOCALIZER") == (["skipped"], "1")
    assert _filter(page, "ok", "localizer") == ([], "0")
    assert sorted(_filter(page, "", "")[0]) == ["failed", "ok", "ok", "skipped"]


def test_every_link_resolves_and_a_screenshot(
    run_out: Path, page: HeadlessChromium, tmp_path: Path
) -> None:
    loaded = page.evaluate(LINKS_JS)
    addresses = {address for address, _ in loaded}
    assert [a for a, width in loaded if width <= 0] == []  # every image loads
    assert all((run_out / unquote(a)).is_file() for a in addresses)
    ok = [r for r in _rows(run_out) if r["status"] == "ok"]
    for row in ok:  # the overlay and GradCAM++ panels of both ok series, the trend of one
        prefix = f"{row['study_instance_uid']}/{row['series_instance_uid']}/"
        assert f"{prefix}{OVERLAY_NAME}" in addresses
        assert any(a.startswith(f"{prefix}gradcam/slice_") for a in addresses)
    assert sum(a.endswith(TREND_NAME) for a in addresses) >= 1
    others = [r["series_instance_uid"] for r in _rows(run_out) if r["status"] != "ok"]
    assert not [a for a in addresses if any(uid in a for uid in others)]
    shot = page.screenshot(tmp_path / "report.png")
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.width >= 1000 and image.height >= 400
