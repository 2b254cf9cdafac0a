"""Where the tests find the shared (licensed, not committed) data, and what a missing file does.

The folder is ``$GGO_SHARED_DATA`` when that is set, else ``shared/data`` beside the checkout
(``<checkout>/../shared/data``). Every test that reads shared data takes its paths from here
and calls :func:`require_shared` before it reads them: in CI (``CI`` set, as ``.ci/run`` does)
a missing path fails the test, elsewhere it skips it with the path and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV_SHARED_DATA = "GGO_SHARED_DATA"
ENV_CI = "CI"
_NOT_CI = ("", "0", "false", "no")


def shared_data_root() -> Path:
    """The shared data folder: ``$GGO_SHARED_DATA``, else ``<checkout>/../shared/data``."""
    override = os.environ.get(ENV_SHARED_DATA, "")
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "data"


SHARED_DATA = shared_data_root()
CT_DICOM = SHARED_DATA / "ct-dicom"
REAL_CT_DIR = CT_DICOM / "lung-pet-ct-dx-a0002" / "dicom"
"""The 30-slice chest CT series (Lung-PET-CT-Dx A0002)."""
DCMQI_DIR = CT_DICOM / "dcmqi-ct-3slice"
"""dcmqi's 3-slice CT (``ct/``) and its liver SEG (``seg/liver_seg.dcm``)."""
DCMQI_CT = DCMQI_DIR / "ct"
DCMQI_SEG = DCMQI_DIR / "seg" / "liver_seg.dcm"
COVID_SLICES_DIR = SHARED_DATA / "covid-semiseg-train"
"""The 50 labelled COVID-SemiSeg training slices (``images/``, ``labels/``)."""


def in_ci() -> bool:
    """Whether the tests run in CI (the ``CI`` environment variable is set and not false)."""
    return os.environ.get(ENV_CI, "").strip().lower() not in _NOT_CI


def require_shared(path: Path) -> Path:
    """Return ``path`` when it exists; else fail the test in CI and skip it elsewhere.

    Args:
        path: a file or folder of the shared data.

    Returns:
        ``path``, unchanged.

    Raises:
        pytest.fail.Exception: in CI, when ``path`` does not exist.
        pytest.skip.Exception: elsewhere, when ``path`` does not exist.
    """
    if path.exists():
        return path
    message = (
        f"shared test data not found: {path} (set {ENV_SHARED_DATA} to the shared data "
        "folder, or put it at ../shared/data beside the checkout)"
    )
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
