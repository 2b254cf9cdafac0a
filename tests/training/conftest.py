"""Fixtures of the training tests: a few downscaled shared slices, a tiny trained run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.shared_data import COVID_SLICES_DIR, in_ci, require_shared
from training.config import AugmentConfig, TrainConfig
from training.data import SourceSlice, load_slices, pack
from training.loop import TrainResult, train

TINY_SIZE = 64
N_TINY = 10


def synthetic_slices(
    n: int, *, seed: int = 0, shape: tuple[int, int] = (48, 56)
) -> list[SourceSlice]:
    """Dark 'lungs' with brighter blobs as GGO (used when the shared data is absent)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    slices = []
    for i in range(n):
        cy, cx = rng.uniform(10, shape[0] - 10), rng.uniform(10, shape[1] - 10)
        r = rng.uniform(4, 9)
        mask = (rows - cy) ** 2 + (cols - cx) ** 2 < r**2
        image = (40 + 20 * rng.random(shape) + 90 * mask).astype(np.uint8)
        slices.append(SourceSlice(id=str(i), image=image, mask=mask))
    return slices


@pytest.fixture(scope="session")
def tiny_slices() -> list[SourceSlice]:
    """N_TINY real shared slices (those with the most GGO), or synthetic ones outside CI when
    the shared data is absent (in CI its absence fails the tests that use them)."""
    if not COVID_SLICES_DIR.is_dir() and not in_ci():
        return synthetic_slices(N_TINY)
    slices = load_slices(require_shared(COVID_SLICES_DIR))
    slices.sort(key=lambda s: -int(s.mask.sum()))
    return slices[:N_TINY]


@pytest.fixture(scope="session")
def tiny_npz(tiny_slices: list[SourceSlice], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny slices packed at 64 x 64."""
    out = tmp_path_factory.mktemp("packed") / "tiny64.npz"
    pack(tiny_slices, out, size=TINY_SIZE, label=1)
    return out


def tiny_config(data: Path, out: Path, **overrides: object) -> TrainConfig:
    """A fast CPU configuration on the tiny data."""
    values: dict[str, object] = {
        "arch": "resnet50-unet",
        "data": str(data),
        "out": str(out),
        "size": TINY_SIZE,
        "epochs": 2,
        "batch_size": 4,
        "lr": 1e-3,
        "device": "cpu",
        "augment": AugmentConfig(enabled=False),
    }
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_run(tiny_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """A 2-epoch ResNet-50U-Net run at 64 px on the tiny data."""
    out = tmp_path_factory.mktemp("runs") / "r50"
    return train(tiny_config(tiny_npz, out), progress=False)


@pytest.fixture(scope="session")
def exported_model(tiny_run: TrainResult, tiny_npz: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """The tiny run exported (float32 weights) with metrics on the tiny data."""
    from training.export import export_checkpoint

    out = tmp_path_factory.mktemp("exported") / "ggo-test"
    return export_checkpoint(
        tiny_run.best_path, out, data=tiny_npz, name="ggo-test", version="0.0.1"
    )
