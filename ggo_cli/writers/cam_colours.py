"""The GradCAM++ map's colours: a jet-like colour map as a 256-entry table (numpy only) and the
map blended on the lung-window CT, as pytorch-grad-cam's ``show_cam_on_image`` draws it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..analysis.preprocessing import window_hu

CAM_ALPHA = 0.5
"""Weight of the colour map over the grey CT (pytorch-grad-cam's ``show_cam_on_image``)."""

# Jet-like colour map: (position, red, green, blue) anchors, linearly interpolated.
_JET_ANCHORS = np.array(
    [
        [0.000, 0.0, 0.0, 0.5],
        [0.125, 0.0, 0.0, 1.0],
        [0.375, 0.0, 1.0, 1.0],
        [0.625, 1.0, 1.0, 0.0],
        [0.875, 1.0, 0.0, 0.0],
        [1.000, 0.5, 0.0, 0.0],
    ],
    dtype=np.float64,
)
_LUT_SIZE = 256
JET_LUT: npt.NDArray[np.uint8] = np.rint(
    255.0
    * np.stack(
        [
            np.interp(np.linspace(0.0, 1.0, _LUT_SIZE), _JET_ANCHORS[:, 0], _JET_ANCHORS[:, ch])
            for ch in (1, 2, 3)
        ],
        axis=1,
    )
).astype(np.uint8)
"""256 x 3 uint8 RGB table: index ``round(255 * v)`` for a value ``v`` in ``[0, 1]``."""
JET_LUT.setflags(write=False)

Rgb = npt.NDArray[np.uint8]


def colourise(values: npt.NDArray[np.float32]) -> Rgb:
    """Map values in ``[0, 1]`` through :data:`JET_LUT`.

    Args:
        values: float values (clipped to ``[0, 1]``). Shape: any ``(...)``.

    Returns:
        uint8 RGB. Shape: ``(..., 3)``.
    """
    result: Rgb = JET_LUT[lut_index(values)]
    return result


def lut_index(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """The :data:`JET_LUT` index of values in ``[0, 1]`` (clipped): ``round(255 * v)``.

    Args:
        values: float values. Shape: any ``(...)``.

    Returns:
        uint8 indices, ``JET_LUT[lut_index(v)] == colourise(v)``. Shape: as ``values``.
    """
    index: npt.NDArray[np.uint8] = np.rint(np.clip(values, 0.0, 1.0) * (_LUT_SIZE - 1)).astype(
        np.uint8
    )
    return index


def blend(
    hu: npt.NDArray[np.float32], jet: Rgb, window_center_hu: float, window_width_hu: float
) -> Rgb:
    """``(1 - a) * grey + a * jet`` on the lung-window CT."""
    grey = window_hu(hu, center_hu=window_center_hu, width_hu=window_width_hu) * 255.0
    blended = (1.0 - CAM_ALPHA) * grey[..., None] + CAM_ALPHA * jet
    result: Rgb = np.rint(blended).astype(np.uint8)
    return result


def render_cam(
    hu: npt.NDArray[np.float32],
    cam: npt.NDArray[np.float32],
    *,
    window_center_hu: float,
    window_width_hu: float,
) -> Rgb:
    """Blend a CAM's colour map on the lung-window CT: ``(1 - a) * grey + a * jet(cam)``.

    Args:
        hu: Hounsfield units. Shape: ``(rows, cols)``.
        cam: map in ``[0, 1]``. Shape: ``(rows, cols)``.
        window_center_hu: window centre in HU.
        window_width_hu: window width in HU.

    Returns:
        uint8 RGB image. Shape: ``(rows, cols, 3)``.
    """
    return blend(hu, colourise(cam), window_center_hu, window_width_hu)
