"""``ggo-cli report OUT`` and the report page rebuilt after every run: exit codes, the page after
failed series, an interrupted run and a page that cannot be built."""

from __future__ import annotations

import csv
import logging
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ggo_cli.cli import report as report_cli
from ggo_cli.cli.app import app
from ggo_cli.config import CSV_NAME
from ggo_cli.errors import OutputError, RunLockedError
from ggo_cli.writers.report_html import REPORT_NAME
from tests.dicom_factory import make_ct_series

runner = CliRunner()


def _csv(out: Path, *statuses: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / CSV_NAME).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["series_instance_uid", "status"])
        writer.writerows([f"1.2.{k}", status] for k, status in enumerate(statuses))


def _segment(out: Path, model: Path, *inputs: Path) -> object:
    return runner.invoke(
        app,
        [
            "segment",
            *map(str, inputs),
            "--out",
            str(out),
            "--model",
            str(model),
            "--no-progress",
            "--settle",
            "0",
            "--no-lung-mask",
            "--sc",
            "none",
            "--no-sr",
        ],
    )


def test_report_rebuilds_the_page_and_prints_its_path(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _csv(out, "ok", "failed")
    os.chmod(out / CSV_NAME, 0o640)  # a --group-readable run's CSV: the page follows it
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out / REPORT_NAME)
    page = (out / REPORT_NAME).read_text(encoding="utf-8")
    assert page.count('data-col="status"') == 3  # the header and two rows
    assert stat.S_IMODE(os.stat(out / REPORT_NAME).st_mode) == 0o640
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("has_folder", [False, True])
def test_missing_folder_or_csv_exits_2(tmp_path: Path, has_folder: bool) -> None:
    out = tmp_path / "out"
    if has_folder:
        out.mkdir()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 2, result.output
    reason = "has no ggo_volumes.csv" if has_folder else "not found"
    lines = [line for line in result.output.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and reason in lines[0]
    assert not (out / REPORT_NAME).exists()


def test_unwritable_page_exits_6(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _csv(out, "ok")
    (out / REPORT_NAME).mkdir()  # a folder where the page goes: os.replace fails
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 6, result.output


def test_segment_rebuilds_the_page_with_failed_series(
    tmp_path: Path, band_model_path: Path
) -> None:
    good = make_ct_series(tmp_path, folder="good", seed=1)
    bad = make_ct_series(tmp_path, folder="bad", uneven_spacing=True, seed=2)
    out = tmp_path / "out"
    result = _segment(out, band_model_path, good.root, bad.root)
    assert result.exit_code == 7, result.output
    page = (out / REPORT_NAME).read_text(encoding="utf-8")
    for series, status in ((good, "ok"), (bad, "failed")):
        assert f'data-v="{series.series_instance_uid}"' in page
        assert f'data-status="{status}"' in page
    assert "overlay.png" in page


@pytest.mark.parametrize(
    "error", [OutputError("cannot write report.html: no space left on device"), TypeError("bug")]
)
def test_a_page_that_cannot_be_built_warns_once_and_keeps_the_exit_code(
    tmp_path: Path,
    band_model_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
) -> None:
    def refuse(out_dir: Path, **_: object) -> Path:
        raise error

    monkeypatch.setattr(report_cli, "write_report", refuse)
    good = make_ct_series(tmp_path, folder="good", seed=1)
    with caplog.at_level(logging.WARNING):
        result = _segment(tmp_path / "out", band_model_path, good.root)
    assert result.exit_code == 0, result.output
    warnings = [r for r in caplog.records if "report.html not rebuilt" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


@pytest.mark.parametrize(
    ("stop", "exit_code", "page"), [(KeyboardInterrupt, 130, True), (RunLockedError, 8, False)]
)
def test_page_after_a_stopped_run_not_after_a_locked_folder(
    tmp_path: Path,
    band_model_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stop: type[BaseException],
    exit_code: int,
    page: bool,
) -> None:
    out = tmp_path / "out"

    def stopped_run(cfg: object, **_: object) -> None:
        _csv(out, "ok", "pending")  # the CSV is rewritten after every series
        raise stop("stopped")

    monkeypatch.setattr("ggo_cli.run.runner.run_segment", stopped_run)
    inputs = tmp_path / "in"
    inputs.mkdir()
    result = _segment(out, band_model_path, inputs)
    assert result.exit_code == exit_code, result.output
    assert (out / REPORT_NAME).exists() is page


def test_the_demo_run_gets_its_report_page(tmp_path: Path, band_model_path: Path) -> None:
    """``ggo-cli demo`` is a run too: its output folder gets ``report.html``."""
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--model",
                                      str(band_model_path), "--slices", "12", "--no-progress"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "demo" / "report.html").read_text(encoding="utf-8")
    assert page.count("<tr") >= 2  # the header and the demo's series
