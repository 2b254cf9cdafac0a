"""Shared fixtures: strict pydicom writing, a tiny contract model, the shared data folder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.onnx_models import write_band_model
from tests.shared_data import COVID_SLICES_DIR, REAL_CT_DIR, require_shared

# The COVID-SemiSeg JPEGs are display images; their intensities match a chest CT rendered at
# about W1300 / L-480 HU (the shared data's README.md), which this inverts.
COVID_WINDOW = (-480.0, 1300.0)


@pytest.fixture(autouse=True)
def strict_dicom_writing() -> Iterator[None]:
    """Every dataset a test writes must be valid (pydicom raises instead of warning)."""
    settings = pydicom.config.settings
    saved = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom.config.RAISE
    yield
    settings.writing_validation_mode = saved


@pytest.fixture(autouse=True)
def variant_check_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Each test gets its own self-check cache folder (never the user's)."""
    from ggo_cli.onnx import verdict_cache

    folder = tmp_path_factory.mktemp("ggo-cache")
    monkeypatch.setenv(verdict_cache.CACHE_ENV, str(folder))
    yield folder


@pytest.fixture(scope="session")
def band_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 x 64 contract model marking -750..-300 HU as GGO."""
    return write_band_model(tmp_path_factory.mktemp("models") / "band64.onnx", 64)


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    """The shared 30-slice chest CT series (fails in CI, skips elsewhere when absent)."""
    return require_shared(REAL_CT_DIR)


def covid_slices_as_ct(out: Path, ids: list[str], size: int = 512) -> Path:
    """Real COVID-19 CT slices as a CT Image Storage series, in approximate HU.

    Each display JPEG is padded to a square, resized to ``size`` and mapped back through the
    estimated W1300/L-480 window. The slices come from different patients, so the series is
    a stack of real slices with a made-up geometry (0.7 mm pixels, 5 mm apart): right for
    per-slice tests (segmentation, explanations), not for volumes.
    """
    from PIL import Image

    from ggo_cli.synthetic.ct_writer import write_ct_series

    centre, width = COVID_WINDOW
    hu = []
    for slice_id in ids:
        image = Image.open(COVID_SLICES_DIR / "images" / f"{slice_id}.jpg").convert("L")
        side = max(image.size)
        square = Image.new("L", (side, side), 0)
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        pixels = np.asarray(square.resize((size, size), Image.Resampling.BILINEAR), np.float32)
        hu.append(pixels / 255.0 * width + centre - width / 2)
    write_ct_series(np.round(np.stack(hu)).astype(np.int16), out, spacing_mm=(5.0, 0.7, 0.7))
    return out


@pytest.fixture(scope="session")
def covid_ct_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model's 10 held-out COVID-SemiSeg test slices as a DICOM CT series."""
    require_shared(COVID_SLICES_DIR)
    from ggo_cli.config import default_model_path

    card = json.loads((default_model_path().parent / "model.json").read_text())
    ids = list(card["training_data"]["split"]["test"])
    return covid_slices_as_ct(tmp_path_factory.mktemp("covid") / "ct", ids)
