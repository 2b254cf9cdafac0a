"""Shared fixtures: strict pydicom writing, a tiny contract model, the shared data folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.onnx_models import write_band_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_CT_DIR = SHARED_DATA / "ct-dicom" / "lung-pet-ct-dx-a0002" / "dicom"
DCMQI_DIR = SHARED_DATA / "ct-dicom" / "dcmqi-ct-3slice"


@pytest.fixture(autouse=True)
def strict_dicom_writing() -> Iterator[None]:
    """Every dataset a test writes must be valid (pydicom raises instead of warning)."""
    settings = pydicom.config.settings
    saved = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom.config.RAISE
    yield
    settings.writing_validation_mode = saved


@pytest.fixture(scope="session")
def band_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 x 64 contract model marking -750..-300 HU as GGO."""
    return write_band_model(tmp_path_factory.mktemp("models") / "band64.onnx", 64)


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    """The shared 30-slice chest CT series (skips when the shared data is absent)."""
    if not REAL_CT_DIR.is_dir():
        pytest.skip(f"shared data not found at {REAL_CT_DIR}")
    return REAL_CT_DIR
