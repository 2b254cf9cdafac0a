"""Pure numpy preprocessing shared by inference and training (one implementation).

The model sees a CT slice through a lung window scaled to ``[0, 1]``, letterboxed to a square
(padding with 0, the window's floor, i.e. air) and resized bilinearly to ``size x size``.
Predictions come back through the exact inverse: bilinear resize to the square, then crop, so
a mask lands pixel for pixel on the source grid.

Bilinear weights follow the half-pixel convention (``align_corners=False``, no antialiasing),
the convention of ``torch.nn.functional.interpolate(mode="bilinear")`` and ONNX ``Resize``
(``coordinate_transformation_mode="half_pixel"``), so training code may use either.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

DEFAULT_WINDOW_CENTER_HU = -600.0
DEFAULT_WINDOW_WIDTH_HU = 1500.0

FloatArray = npt.NDArray[np.float32]


def window_hu(
    hu: npt.NDArray[np.floating] | npt.NDArray[np.integer],
    *,
    center_hu: float = DEFAULT_WINDOW_CENTER_HU,
    width_hu: float = DEFAULT_WINDOW_WIDTH_HU,
    out: FloatArray | None = None,
) -> FloatArray:
    """Map Hounsfield units through a linear window to ``[0, 1]``.

    Args:
        hu: Hounsfield units, any shape.
        center_hu: window centre (level) in HU.
        width_hu: window width in HU; must be positive.
        out: optional float32 array of ``hu``'s shape to write into (may be ``hu`` itself).

    Returns:
        float32 values ``clip((hu - (center - width / 2)) / width, 0, 1)``. Shape: as ``hu``.

    Raises:
        ValueError: if ``width_hu`` is not positive.
    """
    if width_hu <= 0:
        raise ValueError(f"window width must be positive, got {width_hu} HU")
    low = np.float32(center_hu - width_hu / 2.0)
    scale = np.float32(1.0 / width_hu)
    if out is None:
        out = np.empty(np.shape(hu), dtype=np.float32)
    np.subtract(hu, low, out=out, dtype=np.float32, casting="unsafe")
    np.multiply(out, scale, out=out)
    np.clip(out, 0.0, 1.0, out=out)
    return out


@lru_cache(maxsize=64)
def bilinear_matrix(n_in: int, n_out: int) -> FloatArray:
    """Return the 1-D bilinear interpolation matrix from ``n_in`` samples to ``n_out``.

    Half-pixel centres, source coordinates clamped at the borders, as PyTorch's bilinear
    ``interpolate`` with ``align_corners=False`` and ``antialias=False``.

    Args:
        n_in: number of input samples.
        n_out: number of output samples.

    Returns:
        Read-only float32 matrix ``M`` with ``out = M @ in``. Shape: ``(n_out, n_in)``.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be positive, got {n_in} -> {n_out}")
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    rows = np.arange(n_out)
    np.add.at(matrix, (rows, lo), 1.0 - frac)
    np.add.at(matrix, (rows, hi), frac)
    result = matrix.astype(np.float32)
    result.setflags(write=False)
    return result


@dataclass(frozen=True, slots=True)
class GridMapping:
    """How a ``rows x cols`` slice maps onto the model's ``size x size`` input and back.

    The slice is centred in a ``side x side`` square (``side = max(rows, cols)``), padded with
    0, then resized to ``size``.

    Attributes:
        rows: source rows.
        cols: source columns.
        size: model input size.
    """

    rows: int
    cols: int
    size: int

    @property
    def side(self) -> int:
        """Side of the letterbox square."""
        return max(self.rows, self.cols)

    @property
    def row_offset(self) -> int:
        """First square row holding image data."""
        return (self.side - self.rows) // 2

    @property
    def col_offset(self) -> int:
        """First square column holding image data."""
        return (self.side - self.cols) // 2

    @property
    def is_identity(self) -> bool:
        """Whether the slice already has the model's size (no resampling at all)."""
        return self.rows == self.size and self.cols == self.size

    def forward_matrices(self) -> tuple[FloatArray, FloatArray]:
        """Matrices ``(R, C)`` with ``model = R @ slice @ C.T``.

        Shapes: ``(size, rows)``, ``(size, cols)``.
        """
        full = bilinear_matrix(self.side, self.size)
        r = full[:, self.row_offset : self.row_offset + self.rows]
        c = full[:, self.col_offset : self.col_offset + self.cols]
        return np.ascontiguousarray(r), np.ascontiguousarray(c)

    def inverse_matrices(self) -> tuple[FloatArray, FloatArray]:
        """Matrices ``(R, C)`` with ``slice = R @ model @ C.T``.

        Shapes: ``(rows, size)``, ``(cols, size)``.
        """
        full = bilinear_matrix(self.size, self.side)
        r = full[self.row_offset : self.row_offset + self.rows, :]
        c = full[self.col_offset : self.col_offset + self.cols, :]
        return np.ascontiguousarray(r), np.ascontiguousarray(c)


def _apply(images: FloatArray, r: FloatArray, c: FloatArray) -> FloatArray:
    """Apply ``r @ image @ c.T`` to every image of a stack (last two axes)."""
    tmp = np.matmul(images, c.T)
    return np.ascontiguousarray(np.matmul(r, tmp), dtype=np.float32)


def to_model_grid(images: FloatArray, size: int) -> FloatArray:
    """Letterbox and resize a stack of windowed slices to the model's input size.

    Args:
        images: float32 values (already windowed). Shape: ``(..., rows, cols)``.
        size: model input size.

    Returns:
        float32 array. Shape: ``(..., size, size)``. The input itself when no resize is needed.
    """
    mapping = GridMapping(images.shape[-2], images.shape[-1], size)
    if mapping.is_identity:
        return images
    r, c = mapping.forward_matrices()
    return _apply(images, r, c)


def to_source_grid(maps: FloatArray, rows: int, cols: int) -> FloatArray:
    """Map model-grid maps (probabilities) back onto the source pixel grid.

    Args:
        maps: float32 maps on the model grid. Shape: ``(..., size, size)``.
        rows: source rows.
        cols: source columns.

    Returns:
        float32 maps aligned with the source pixels. Shape: ``(..., rows, cols)``.
    """
    size = maps.shape[-1]
    if maps.shape[-2] != size:
        raise ValueError(f"model-grid maps must be square, got {maps.shape[-2:]}")
    mapping = GridMapping(rows, cols, size)
    if mapping.is_identity:
        return maps
    r, c = mapping.inverse_matrices()
    return _apply(maps, r, c)


def preprocess_hu(
    hu: npt.NDArray[np.floating] | npt.NDArray[np.integer],
    *,
    size: int,
    center_hu: float = DEFAULT_WINDOW_CENTER_HU,
    width_hu: float = DEFAULT_WINDOW_WIDTH_HU,
) -> FloatArray:
    """Window HU slices and bring them to the model grid, ready for the ``image`` input.

    Args:
        hu: Hounsfield units. Shape: ``(n, rows, cols)``.
        size: model input size.
        center_hu: window centre in HU.
        width_hu: window width in HU.

    Returns:
        float32 batch in ``[0, 1]``. Shape: ``(n, 1, size, size)``.
    """
    windowed = window_hu(hu, center_hu=center_hu, width_hu=width_hu)
    return to_model_grid(windowed, size)[:, None, :, :]


def sigmoid(logits: FloatArray, *, out: FloatArray | None = None) -> FloatArray:
    """Numerically stable float32 logistic function. Shape: as ``logits``."""
    if out is None:
        out = np.empty_like(logits, dtype=np.float32)
    # 0.5 * (1 + tanh(x / 2)) never overflows, unlike 1 / (1 + exp(-x)).
    np.multiply(logits, 0.5, out=out)
    np.tanh(out, out=out)
    np.add(out, 1.0, out=out)
    np.multiply(out, 0.5, out=out)
    return out
