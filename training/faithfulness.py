"""GradCAM++ in numpy (the reference numbers) and its faithfulness measurement per layer.

GradCAM++ (Chattopadhyay et al. 2018, eq. 19), per sample and channel k with A = activations,
g = dScore/dA: ``alpha = g^2 / (2 g^2 + sum_xy(A) g^3)`` (0 where g == 0),
``w_k = sum_xy relu(g) alpha``, ``cam = relu(sum_k w_k A_k)``, upsampled bilinearly
(half-pixel centres, edge-clamped: ``F.interpolate(align_corners=False)``, cv2 INTER_LINEAR) to
S x S and normalised per slice ``(x - min) / (max - min + 1e-7)``.

Faithfulness (deletion by blurring): on each slice with predicted GGO, the GGO score
``sum of sigmoid(logits) inside the predicted mask`` is measured on the image, on the image
whose top 10 % CAM pixels of the region are replaced by a Gaussian-blurred copy, and on the
image with a seeded random 10 % of the region replaced. The region is the lung (a threshold
mask of the dark but not black regions, holes filled, closed) joined with the
predicted GGO; where no plausible lung is found, the whole image. A faithful CAM points at the
pixels the score depends on, so its drop exceeds the random drop; the layer with the largest
ratio mean drop(top) / mean drop(random) is the default.

The measurement explains GGO (channel 0) for every model: the explain graph has one default
layer, not one per class, and GGO is every model's first class (a two-class model's target has
the predicted GGO mask in plane 0 and zeros in plane 1). The record says so (``target``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .data import GridData, load_slices, to_grid

log = logging.getLogger(__name__)

NORM_EPS = 1e-7
FAITHFULNESS_TARGET = "ggo"
"""The class whose CAMs the faithfulness measurement scores (channel 0)."""
FRACTION = 0.10
SEED = 0
LUNG_THRESHOLD = 0.45
"""Display-image intensity below which a pixel may be lung (air -1000 HU is about 0.1 and
soft tissue about 0.9 in the shared W1300/L-480 JPEGs; GGO stays below about 0.6 and is
recovered by hole filling and the union with the predicted mask)."""
AIR_THRESHOLD = 0.06
"""Outside air is black (0) in the shared images; lung parenchyma lies around 0.1-0.3. The
slices are cropped, so lungs touch the border and border-connected removal would drop them."""
MIN_LUNG_COMPONENT = 0.005
MIN_LUNG_AREA = 0.02
BATCH = 2
"""Slices per explain run (an ORT explain session at 512 px holds several GB at batch 4)."""
BLUR_SIGMA_FRACTION = 1.0 / 16.0
"""Blur sigma as a fraction of S (32 px at 512). GGO is itself low-frequency haze tens of
pixels wide: a blur of sigma S/64 (8 px) leaves it in place (on the shipped model the top-CAM
drop was then below the random drop for every layer), so the blur must be wider than a lesion
to delete it."""

Array = npt.NDArray[Any]


def _interp_matrix(n_in: int, n_out: int) -> Array:
    """Half-pixel bilinear interpolation along one axis as an ``(n_out, n_in)`` matrix."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = src - i0
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - w)
    np.add.at(m, (rows, i1), w)
    return m


def upsample_bilinear(maps: Array, size: int) -> Array:
    """``[N, h, w]`` -> ``[N, size, size]`` (half-pixel centres, edges clamped), float64."""
    mr = _interp_matrix(maps.shape[1], size)
    mc = _interp_matrix(maps.shape[2], size)
    out: Array = mr @ maps.astype(np.float64) @ mc.T
    return out


def gradcam_plusplus(activations: Array, gradients: Array, size: int, *, eps: float = 0.0) -> Array:
    """Normalised GradCAM++ maps ``[N, size, size]`` in [0, 1] from ``[N, K, h, w]`` pairs.

    ``eps`` is added to alpha's denominator; 0 is the paper's equation. pytorch-grad-cam adds
    1e-6, which matters where g^2 is not far above 1e-6 (|g| ~ 1e-3 and below).
    """
    cams = np.empty((activations.shape[0],) + activations.shape[2:], dtype=np.float64)
    for n in range(activations.shape[0]):
        a = activations[n].astype(np.float64)
        g = gradients[n].astype(np.float64)
        g2 = g * g
        den = 2.0 * g2 + a.sum(axis=(1, 2), keepdims=True) * g2 * g + eps
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.where((g != 0) & (den != 0), g2 / den, 0.0)
        weights = (np.maximum(g, 0.0) * alpha).sum(axis=(1, 2))
        cams[n] = np.maximum(np.tensordot(weights, a, axes=1), 0.0)
    up = upsample_bilinear(cams, size)
    lo = up.min(axis=(1, 2), keepdims=True)
    hi = up.max(axis=(1, 2), keepdims=True)
    out: Array = (up - lo) / (hi - lo + NORM_EPS)
    return out


def cams_from_outputs(
    outputs: Sequence[Array], layers: Sequence[str], size: int
) -> dict[str, Array]:
    """GradCAM++ maps per layer from an explain graph's outputs (contract order)."""
    return {
        layer: gradcam_plusplus(outputs[1 + 2 * i], outputs[2 + 2 * i], size)
        for i, layer in enumerate(layers)
    }


def lung_region(image: Array) -> Array | None:
    """A crude lung mask of one display-windowed slice, or None where none is plausible.

    Pixels between AIR_THRESHOLD and LUNG_THRESHOLD in components that cover >= 0.5 % of the
    slice, holes filled (vessels, GGO), closed with a radius of S/64, holes filled again.
    """
    import SimpleITK

    sitk: Any = SimpleITK  # untyped bindings

    size = image.shape[0]
    dark = (image > AIR_THRESHOLD) & (image < LUNG_THRESHOLD)
    labels = sitk.GetArrayFromImage(
        sitk.ConnectedComponent(sitk.GetImageFromArray(dark.astype(np.uint8)), True)
    )
    ids, counts = np.unique(labels, return_counts=True)
    keep = [
        i
        for i, c in zip(ids, counts, strict=True)
        if i != 0 and c >= MIN_LUNG_COMPONENT * image.size
    ]
    mask = np.isin(labels, keep).astype(np.uint8)
    filled = sitk.BinaryFillhole(sitk.GetImageFromArray(mask))
    radius = max(1, size // 64)
    closed = sitk.BinaryMorphologicalClosing(filled, [radius, radius])
    lung: Array = sitk.GetArrayFromImage(sitk.BinaryFillhole(closed)).astype(bool)
    if lung.sum() < MIN_LUNG_AREA * image.size:
        return None
    return lung


def gaussian_blur(image: Array, sigma: float) -> Array:
    """Gaussian-blurred copy of a 2-D float image (SimpleITK, unit spacing)."""
    import SimpleITK

    sitk: Any = SimpleITK  # untyped bindings

    img = sitk.GetImageFromArray(image.astype(np.float32))
    out: Array = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, float(sigma)))
    return out.astype(np.float32)


def model_grid_slices(
    path: Path, size: int, *, max_slices: int | None = None, labels: Sequence[int] | None = None
) -> GridData:
    """Labelled slices on the model grid (``training.data``: display images as pixel / 255).

    ``labels``: one mask value per class for several classes (masks become class maps, see
    :func:`training.data.load_slices`); None: GGO masks.
    """
    slices = load_slices(path, labels=labels)
    if max_slices is not None:
        slices = slices[:max_slices]
    return to_grid(slices, size)


def _logits(session: Any, images: Array, batch: int = BATCH) -> Array:
    """Channel-0 logits ``[N, S, S]`` of model.onnx for images ``[N, S, S]``."""
    out = []
    for start in range(0, len(images), batch):
        x = np.ascontiguousarray(images[start : start + batch, None], dtype=np.float32)
        out.append(session.run(["logits"], {"image": x})[0][:, 0])
    return np.concatenate(out) if out else np.empty((0,) + images.shape[1:], np.float32)


def _sigmoid(x: Array) -> Array:
    out: Array = 0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))
    return out


def measure_faithfulness(
    explain_session: Any,
    model_session: Any,
    grid: GridData,
    layers: Sequence[str],
    *,
    threshold: float,
    fraction: float = FRACTION,
    seed: int = SEED,
) -> dict[str, Any]:
    """Deletion-by-blurring faithfulness of each layer's GradCAM++ (module docstring).

    Args:
        explain_session: ONNX Runtime session of the explain graph.
        model_session: session of the paired model.onnx (scores are measured with it).
        grid: slices on the model grid.
        layers: the explain graph's layers, in order.
        threshold: the model's probability threshold (predicted GGO mask = target plane 0).
        fraction: share of region pixels replaced.
        seed: seed of the random replacement (per slice: seed + slice index).

    Returns:
        A JSON-ready record with per-layer mean drops, the ratio, wins and ``best_layer``.
    """
    started = time.perf_counter()
    size = grid.size
    sigma = size * BLUR_SIGMA_FRACTION
    probs0 = _sigmoid(_logits(model_session, grid.images))
    preds = probs0 > threshold
    used = [i for i in range(len(grid.images)) if preds[i].any()]
    planes = int(explain_session.get_inputs()[1].shape[1])
    drops_top: dict[str, list[float]] = {layer: [] for layer in layers}
    drops_random: list[float] = []
    in_out: dict[str, list[float]] = {layer: [] for layer in layers}
    lung_found = 0
    for start in range(0, len(used), BATCH):
        idx = used[start : start + BATCH]
        images = grid.images[idx]
        targets = np.zeros((len(idx), planes, size, size), dtype=np.float32)
        targets[:, 0] = preds[idx]
        outputs = explain_session.run(None, {"image": images[:, None].copy(), "target": targets})
        cams = cams_from_outputs(outputs, layers, size)
        perturbed, base = [], []
        for j, i in enumerate(idx):
            image, pred = images[j], preds[i]
            lung = lung_region(image)
            lung_found += lung is not None
            region = np.ones_like(pred) if lung is None else (lung | pred)
            flat = np.flatnonzero(region)
            k = max(1, round(fraction * flat.size))
            blurred = gaussian_blur(image, sigma).ravel()
            rng = np.random.default_rng(seed + i)
            choices = [rng.choice(flat, size=k, replace=False)]
            for layer in layers:
                cam = cams[layer][j].ravel()
                order = np.argsort(-cam[flat], kind="stable")
                choices.append(flat[order[:k]])
                inside = cam[pred.ravel()].mean()
                outside = cam[~pred.ravel()].mean() if (~pred).any() else np.nan
                in_out[layer].append(float(inside / max(outside, 1e-12)))
            for chosen in choices:
                x = image.ravel().copy()
                x[chosen] = blurred[chosen]
                perturbed.append(x.reshape(size, size))
            base.append(float(probs0[i][pred].sum()))
        probs = _sigmoid(_logits(model_session, np.stack(perturbed)))
        per = 1 + len(layers)
        for j, i in enumerate(idx):
            s0 = base[j]
            scores = [float(probs[j * per + c][preds[i]].sum()) for c in range(per)]
            drops_random.append((s0 - scores[0]) / s0)
            for c, layer in enumerate(layers, start=1):
                drops_top[layer].append((s0 - scores[c]) / s0)
        log.info(
            "faithfulness: %d/%d slices (%.0f s)",
            start + len(idx),
            len(used),
            time.perf_counter() - started,
        )
    mean_random = float(np.mean(drops_random)) if drops_random else 0.0
    per_layer = {}
    for layer in layers:
        top = np.asarray(drops_top[layer])
        per_layer[layer] = {
            "mean_drop_top": float(top.mean()) if top.size else 0.0,
            "mean_drop_random": mean_random,
            "ratio": float(top.mean() / mean_random) if top.size and mean_random > 0 else 0.0,
            "wins": float(np.mean(top > np.asarray(drops_random))) if top.size else 0.0,
            "median_cam_in_out_ratio": float(np.nanmedian(in_out[layer])) if top.size else 0.0,
        }
    best = max(layers, key=lambda layer: per_layer[layer]["ratio"])
    return {
        "measured": True,
        "target": FAITHFULNESS_TARGET,
        "method": (
            "deletion by blurring: replace the top 10 % GradCAM++ pixels of the region (lung "
            "mask joined with the predicted GGO; the whole image where no lung is found) by a "
            f"Gaussian-blurred copy (sigma {sigma:g} px on the {size} px grid) versus a seeded "
            "random 10 % of the region; drop = relative loss of the GGO score (sum of sigmoid "
            "inside the predicted mask, model.onnx); ratio = mean drop(top) / mean drop(random)"
        ),
        "n_slices": len(used),
        "n_slices_without_predicted_ggo": len(grid.images) - len(used),
        "n_slices_lung_found": lung_found,
        "fraction": fraction,
        "seed": seed,
        "threshold": threshold,
        "per_layer": per_layer,
        "best_layer": best,
        "seconds": round(time.perf_counter() - started, 1),
    }
