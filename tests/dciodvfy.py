"""Run dicom3tools' ``dciodvfy`` on a file and collect its ``Error`` lines (tests only)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DCIODVFY = "dciodvfy"
TIMEOUT_S = 60


def dciodvfy_path() -> str | None:
    """Return the ``dciodvfy`` executable, or ``None`` when dicom3tools is not installed."""
    return shutil.which(DCIODVFY)


def dciodvfy_lines(path: Path) -> list[str]:
    """Run ``dciodvfy`` on ``path`` and return its stdout and stderr lines (test skipped
    when the binary is missing)."""
    exe = dciodvfy_path()
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    result = subprocess.run(
        [exe, str(path)], capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    return [line for line in (result.stdout + "\n" + result.stderr).splitlines() if line.strip()]


def dciodvfy_errors(path: Path) -> list[str]:
    """Return the ``Error`` (and ``Abort``) lines ``dciodvfy`` reports for ``path``."""
    return [line for line in dciodvfy_lines(path) if line.lstrip().startswith(("Error", "Abort"))]


def dciodvfy_warnings(path: Path) -> list[str]:
    """Return the ``Warning`` lines ``dciodvfy`` reports for ``path``."""
    return [line for line in dciodvfy_lines(path) if line.lstrip().startswith("Warning")]
