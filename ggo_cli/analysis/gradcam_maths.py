"""GradCAM++ arithmetic in numpy: equation 19 of Chattopadhyay et al. (WACV 2018) from a layer's
activations and the score's gradient, and the map's way from the layer's grid to the source
pixel grid (min-max normalised per slice).

The explain graph that supplies activations and gradients is run by
:mod:`ggo_cli.analysis.explainer`; nothing here needs ONNX Runtime or PyTorch.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .preprocessing import GridMapping, bilinear_matrix

_FLOAT32_SAFE_SCALE = 1e30

FloatArray = npt.NDArray[np.float32]


def gradcam_plus_plus(
    activations: FloatArray, gradients: FloatArray, *, eps: float = 0.0
) -> FloatArray:
    """GradCAM++ maps from a layer's activations and the score's gradient.

    Chattopadhyay et al., "Grad-CAM++", WACV 2018, equation 19 (exponential score, so the
    higher derivatives are powers of the gradient g)::

        alpha = g^2 / (2 g^2 + sum_xy(A) g^3)     (0 where g = 0 or the denominator is 0)
        w_k   = sum_xy(relu(g) * alpha)
        cam   = relu(sum_k w_k A_k)

    With ``eps == 0`` alpha is evaluated as ``1 / (2 + sum_xy(A) g)`` where ``g != 0``, the same
    value without the underflow of ``g^3`` in float32 for tiny gradients. ``eps > 0`` adds
    ``eps`` to the denominator as pytorch-grad-cam does (1e-6), for comparisons with it.

    Args:
        activations: A. Shape: ``(n, K, h, w)``.
        gradients: dScore/dA. Shape: ``(n, K, h, w)``.
        eps: added to the denominator (0: equation 19 exactly).

    Returns:
        float32 maps, not normalised, >= 0. Shape: ``(n, h, w)``.

    Raises:
        ValueError: shapes differ or are not 4-D.
    """
    if activations.shape != gradients.shape or activations.ndim != 4:
        raise ValueError(
            f"activations and gradients must share a (n, K, h, w) shape, got "
            f"{activations.shape} and {gradients.shape}"
        )
    cam = np.empty((activations.shape[0], *activations.shape[2:]), dtype=np.float32)
    for i in range(activations.shape[0]):  # one slice at a time: K x h x w temporaries only
        a = np.asarray(activations[i], dtype=np.float32)
        g = np.asarray(gradients[i], dtype=np.float32)
        sum_a = a.sum(axis=(1, 2), dtype=np.float64).astype(np.float32)[:, None, None]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if eps == 0.0:
                denominator = 2.0 + sum_a * g
                alpha = np.where((g != 0) & (denominator != 0), 1.0 / denominator, 0.0)
            else:
                g2 = g * g
                denominator = 2.0 * g2 + sum_a * g2 * g + np.float32(eps)
                alpha = np.where((g != 0) & (denominator != 0), g2 / denominator, 0.0)
        weights = (np.maximum(g, 0.0) * alpha).sum(axis=(1, 2), dtype=np.float32)
        cam[i] = np.maximum(np.tensordot(weights, a, axes=1), 0.0)
    return cam


def cam_matrices(
    h: int, w: int, *, size: int, rows: int, cols: int
) -> tuple[FloatArray, FloatArray]:
    """Matrices ``(R, C)`` with ``source = R @ cam @ C.T`` for an ``h x w`` layer map.

    ``R`` is the bilinear (half-pixel) upsampling from ``h`` to the model grid ``size`` followed
    by :func:`ggo_cli.analysis.preprocessing.to_source_grid`'s map from the model grid to the source
    rows (likewise ``C`` for columns); composing the matrices gives the same result as the two
    resamplings in turn, without the ``size x size`` intermediate.

    Shapes: ``(rows, h)``, ``(cols, w)``.
    """
    up_r, up_c = bilinear_matrix(h, size), bilinear_matrix(w, size)
    mapping = GridMapping(rows, cols, size)
    if mapping.is_identity:
        return np.ascontiguousarray(up_r), np.ascontiguousarray(up_c)
    back_r, back_c = mapping.inverse_matrices()
    return (back_r @ up_r).astype(np.float32), (back_c @ up_c).astype(np.float32)


def normalise_per_slice(maps: FloatArray) -> FloatArray:
    """Min-max normalise each slice to ``[0, 1]``: ``(x - min) / (max - min)``, 0 if constant.

    The per-slice minimum and span are taken in float64; the pixels are mapped in float32
    unless a span is too small for a float32 scale (raw CAMs from vanishing gradients).

    Args:
        maps: float maps. Shape: ``(n, rows, cols)``.

    Returns:
        float32 maps in ``[0, 1]``. Shape: as ``maps``.
    """
    if maps.size == 0:
        return np.zeros(maps.shape, dtype=np.float32)
    flat = maps.reshape(maps.shape[0], -1)
    low = flat.min(axis=1, keepdims=True).astype(np.float64)
    span = flat.max(axis=1, keepdims=True).astype(np.float64) - low
    scale = np.divide(1.0, span, out=np.zeros_like(span), where=span > 0)
    dtype = np.float32 if scale.max() < _FLOAT32_SAFE_SCALE else np.float64
    out = (flat.astype(dtype, copy=False) - low.astype(dtype)) * scale.astype(dtype)
    result: FloatArray = np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)
    return result.reshape(maps.shape)


def cam_to_source(cam: FloatArray, *, size: int, rows: int, cols: int) -> FloatArray:
    """Bring layer-resolution CAMs onto the source grid, normalised to ``[0, 1]`` per slice.

    Order: min-max per slice at the layer's resolution; bilinear (half-pixel) upsampling
    ``h x w -> size x size`` (the model grid) and the model-to-source mapping of
    :func:`ggo_cli.analysis.preprocessing.to_source_grid` (one pair of composed matrices,
    :func:`cam_matrices`); min-max per slice again (:func:`normalise_per_slice`).

    Every resampling weight row is convex (non-negative, sum 1), so resampling commutes with
    any affine map of the values, and min-max is invariant under positive affine maps: the
    result equals, up to float rounding, "resample the raw CAM, then min-max" and also
    pytorch-grad-cam's "min-max, then resize" normalised once more. The first min-max only
    makes the float32 resampling scale-free and keeps a constant slice exactly 0 (instead of
    rounding noise stretched to ``[0, 1]``); the last one makes every non-constant slice span
    exactly ``[0, 1]`` on the grid the user sees.

    Args:
        cam: raw CAMs from :func:`gradcam_plus_plus`. Shape: ``(n, h, w)``.
        size: the model's input size S.
        rows: source rows.
        cols: source columns.

    Returns:
        float32 maps in ``[0, 1]``. Shape: ``(n, rows, cols)``.
    """
    r, c = cam_matrices(cam.shape[1], cam.shape[2], size=size, rows=rows, cols=cols)
    on_source = np.matmul(r, np.matmul(normalise_per_slice(cam), c.T))
    return normalise_per_slice(on_source)
