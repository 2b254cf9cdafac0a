"""Shared helpers of the nightly-run tests (tests/run/test_nightly.py and its multi-process
half, tests/e2e/test_nightly_e2e.py): a CLI run, its CSV and manifest, and cube-phantom studies."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner, Result

from ggo_cli.cli.app import app
from tests.dicom_factory import FactorySeries, make_ct_series
from tests.phantoms import make_cube_phantom

runner = CliRunner()


def segment(*args: str | Path) -> Result:
    """``ggo-cli segment`` without the lung mask: these cube phantoms have no lungs."""
    return runner.invoke(
        app, ["segment", *map(str, args), "--no-progress", "--settle", "0", "--no-lung-mask"]
    )


def csv_rows(out: Path) -> list[dict[str, str]]:
    """The run's CSV rows."""
    with (out / "ggo_volumes.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def manifest(out: Path) -> dict[str, Any]:
    """The run's manifest."""
    return json.loads((out / "run_manifest.json").read_text())  # type: ignore[no-any-return]


def cube_studies(tmp_path: Path, n: int = 3) -> tuple[Path, list[FactorySeries]]:
    """``n`` studies of one cube-phantom series each, below ``tmp_path / "in"``."""
    root = tmp_path / "in"
    series = [
        make_ct_series(
            root,
            phantom=make_cube_phantom((12, 48, 48), (2.5, 0.7, 0.7), cube_voxels=(4, 6, 6)),
            folder=f"study{k}",
            seed=k + 1,
        )
        for k in range(n)
    ]
    return root, series
