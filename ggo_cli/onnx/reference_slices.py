"""The reference slices shipped beside a model (``reference_slices.npz``).

Model-grid inputs on which :mod:`ggo_cli.onnx.variant_check` compares a model variant with float32
on each machine. Written by ``python -m training reference-set`` (their choice and licences go
into the model card); stored as 8-bit values (``input x 255``), compressed, about 1.6 MB for
ten 512 x 512 slices.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import ModelError
from .model_info import ModelInfo

REFERENCE_SET_NAME = "reference_slices.npz"


@dataclass(frozen=True, slots=True)
class ReferenceSet:
    """The reference slices of a model.

    Attributes:
        images: model inputs as 8-bit values (``value / 255``). Shape: ``(n, S, S)``.
        names: one name per slice (its source).
        sha256: SHA-256 of the file.
    """

    images: npt.NDArray[np.uint8]
    names: tuple[str, ...]
    sha256: str

    def batch(self) -> npt.NDArray[np.float32]:
        """The model input. Shape: ``(n, 1, S, S)``, float32 in ``[0, 1]``."""
        return (self.images.astype(np.float32) / np.float32(255.0))[:, None]


def reference_set_path(model_path: Path) -> Path:
    """Where a model's reference slices live: beside it."""
    return model_path.parent / REFERENCE_SET_NAME


def write_reference_set(
    path: Path, images: npt.NDArray[np.floating[Any]], names: list[str]
) -> Path:
    """Write reference slices (model inputs in ``[0, 1]``) as 8-bit values, compressed.

    Args:
        path: the ``.npz`` file to write.
        images: model-grid inputs. Shape: ``(n, S, S)``.
        names: one name per slice.

    Returns:
        ``path``.
    """
    if images.ndim != 3 or len(names) != images.shape[0]:
        raise ValueError(f"need (n, S, S) images and n names, got {images.shape}, {len(names)}")
    as_u8 = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, images=as_u8, names=np.asarray(names, dtype=str))
    return path


def load_reference_set(model: ModelInfo) -> ReferenceSet | None:
    """Read the reference slices beside a model.

    Returns:
        The slices, or ``None`` when the model has none.

    Raises:
        ModelError: the file is unreadable or its slices do not fit the model's input.
    """
    path = reference_set_path(model.path)
    if not path.is_file():
        return None
    try:
        raw = path.read_bytes()
        with np.load(path, allow_pickle=False) as data:
            images = np.asarray(data["images"])
            names = tuple(str(n) for n in data["names"])
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{path.name} beside {model.path.name} is not usable: {exc}") from exc
    size = model.input_size
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (size, size):
        raise ModelError(
            f"{path.name} holds {images.dtype} {images.shape}; the model needs uint8 "
            f"(n, {size}, {size})"
        )
    if len(names) != images.shape[0] or not names:
        raise ModelError(f"{path.name} has {images.shape[0]} slices and {len(names)} names")
    return ReferenceSet(images, names, hashlib.sha256(raw).hexdigest())


