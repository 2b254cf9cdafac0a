"""Logging of a real ``ggo-cli segment`` child process: an undecodable series gives one ERROR
line and no traceback on stderr (moved from tests/test_logs.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from tests.dicom_factory import FactorySeries, make_ct_series
from tests.phantoms import make_cube_phantom

REPO = Path(__file__).resolve().parents[2]


def _undecodable_series(root: Path) -> FactorySeries:
    """A 12-slice CT series declared JPEG 2000 whose fragments are garbage.

    Every plugin fails in Python (python-gdcm, pylibjpeg-openjpeg "No matching JPEG 2000 format
    found", pillow ``UnidentifiedImageError``); pydicom logs each failure at ERROR with its
    traceback before it raises.
    """
    phantom = make_cube_phantom((12, 48, 48), (2.5, 0.7, 0.7), cube_voxels=(4, 6, 6))
    series = make_ct_series(root, phantom=phantom, transfer_syntax=JPEG2000Lossless)
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.PixelData = encapsulate([b"not a JPEG 2000 codestream " * 4])
        ds.save_as(path)
    return series


def _segment(inputs: Path, out: Path, model: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """``ggo-cli [flags] segment`` in a fresh process, so that its real stderr is captured."""
    command = [sys.executable, "-m", "ggo_cli", *flags, "segment", str(inputs), "-o", str(out)]
    command += ["-m", str(model), "--no-progress", "--no-lung-mask", "--decode-workers", "0"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_an_undecodable_series_logs_one_line_and_no_traceback(
    tmp_path: Path, band_model_path: Path
) -> None:
    series = _undecodable_series(tmp_path / "in")
    result = _segment(tmp_path / "in", tmp_path / "out", band_model_path)
    assert result.returncode == 4, result.stderr  # every eligible series failed
    failures = [
        line for line in result.stderr.splitlines() if " ERROR ggo_cli.run.outcomes: " in line
    ]
    assert len(failures) == 1
    assert series.series_instance_uid in failures[0]
    # Since the header budgets (issue 15) ggo-cli reads the JPEG 2000 header itself and fails
    # the series before any decoder runs, so no decoder record is left to demote.
    assert "the JPEG 2000 codestream cannot be read" in failures[0]
    assert "Traceback" not in result.stderr
    assert "pydicom" not in result.stderr and "PIL" not in result.stderr
    debug = _segment(tmp_path / "in", tmp_path / "out-debug", band_model_path, "--debug")
    assert debug.returncode == 4, debug.stderr
    assert "ERROR pydicom" not in debug.stderr
