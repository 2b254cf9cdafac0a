"""Fixtures for the writer tests: real CT volumes, a one-channel model, strict pydicom."""

from __future__ import annotations

from collections.abc import Iterator

import pydicom
import pytest

from ggo_cli.domain import CtVolume, Prediction
from ggo_cli.onnx.model_info import ModelInfo
from tests.shared_data import DCMQI_CT, REAL_CT_DIR
from tests.writers.ct_data import blob_masks, load_ct_volume, make_model


@pytest.fixture(autouse=True)
def raise_on_invalid_writes() -> Iterator[None]:
    """Make pydicom raise on any invalid value written (restored afterwards)."""
    settings = pydicom.config.settings
    saved = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom.config.RAISE
    try:
        yield
    finally:
        settings.writing_validation_mode = saved


@pytest.fixture(scope="session")
def lung_volume() -> CtVolume:
    """The shared 30-slice chest CT (Lung-PET-CT-Dx A0002) as a CtVolume."""
    return load_ct_volume(REAL_CT_DIR)


@pytest.fixture(scope="session")
def dcmqi_volume() -> CtVolume:
    """dcmqi's 3-slice CT (the source of its liver SEG) as a CtVolume."""
    return load_ct_volume(DCMQI_CT)


@pytest.fixture(scope="session")
def model() -> ModelInfo:
    """A one-channel (GGO) model description."""
    return make_model()


@pytest.fixture(scope="session")
def lung_prediction(lung_volume: CtVolume) -> Prediction:
    """A GGO box on four slices of the 30-slice series."""
    masks = blob_masks(lung_volume)
    masks.setflags(write=False)  # shared by the session: no test may change it
    return Prediction(masks=masks, threshold=0.5)
