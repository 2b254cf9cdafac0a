"""GradCAM++ heat maps for the predicted GGO, computed by ONNX Runtime and numpy alone.

The explain graph and its contract (inputs, outputs, metadata) are in
:mod:`ggo_cli.onnx.explain_graph`; PyTorch is needed only to export it, never here.

The CAM of a slice is GradCAM++ (Chattopadhyay et al., WACV 2018, equation 19) at the chosen
layer, mapped to the source pixel grid and min-max normalised per slice (:func:`cam_to_source`).
The target is the predicted class itself (GGO by default, consolidation with
``--target consolidation`` for a model with a consolidation channel), so the map answers "which
pixels drove this GGO (consolidation) call".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from ..config import DeviceRequest, parse_device
from ..domain import CtVolume, Prediction
from ..errors import InputError, ModelError
from ..onnx.explain_graph import (
    TARGET_NAME,
    ExplainInfo,
    activations_name,
    gradients_name,
    layer_subgraph,
)
from ..onnx.model_info import INPUT_NAME, ModelInfo
from ..onnx.runtime import create_session
from .measurements import consolidation_channel
from .onnx_session import OnnxSessionBase, check_batch_size
from .preprocessing import GridMapping, bilinear_matrix, preprocess_hu, to_model_grid

log = logging.getLogger(__name__)

TARGET_THRESHOLD = 0.5
"""A model-grid pixel is target when more than half of its bilinear weight lies on GGO."""
CUDA_OPTIONS = {"use_tf32": 0}
"""TF32 convolutions moved raw gradients by up to 9 % relative (STYLE.md section 12)."""
_FLOAT32_SAFE_SCALE = 1e30

FloatArray = npt.NDArray[np.float32]


class ExplainSlices(StrEnum):
    """Which slices :meth:`OnnxExplainer.explain` explains: those with predicted GGO, those
    with the explained class (``target``: GGO or consolidation), or all."""

    GGO = "ggo"
    TARGET = "target"
    ALL = "all"


class ExplainTarget(StrEnum):
    """The class whose predicted voxels the GradCAM++ score sums."""

    GGO = "ggo"
    CONSOLIDATION = "consolidation"


LABEL_GGO = 1
LABEL_CONSOLIDATION = 2
"""Values of :attr:`Explanation.labels` (those of the COVID-SemiSeg masks: 1 GGO, 2
consolidation)."""


def target_channel(model: ModelInfo, explain: ExplainInfo, target: str) -> int:
    """The model channel that ``target`` explains, checked against the model and the graph.

    Args:
        model: the validated segmentation model.
        explain: its validated explain graph.
        target: ``ggo`` or ``consolidation``.

    Returns:
        The channel index (0 for GGO).

    Raises:
        InputError: an unknown target, or consolidation asked of a model without that channel.
        ModelError: the explain graph's score cannot target that channel (a graph exported
            before two-class models, whose ``target`` has one plane).
    """
    try:
        choice = ExplainTarget(target.lower())
    except ValueError:
        raise InputError(f"invalid --target {target!r}; use ggo or consolidation") from None
    if choice is ExplainTarget.GGO:
        return 0
    channel = consolidation_channel(model.segments)
    if channel is None:
        raise InputError(
            f"--target consolidation: model {model.name} has no consolidation channel "
            f"(its segments: {', '.join(spec.label for spec in model.segments)})"
        )
    if not explain.explains_channel(channel):
        raise ModelError(
            f"explain graph {explain.path.name} explains GGO only (its target has "
            f"{explain.target_channels} plane); export it again with `python -m training "
            "export-explain` to explain consolidation"
        )
    return channel


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


def model_grid_target(
    mask: npt.NDArray[np.bool_], size: int, *, planes: int = 1, channel: int = 0
) -> FloatArray:
    """A predicted class (source grid) as the graph's binary ``target`` on the model grid.

    The mask is letterboxed and resized exactly like the image (:func:`to_model_grid`) and
    thresholded at :data:`TARGET_THRESHOLD`; when the slice already has the model's size this
    is the predicted class pixel for pixel. It fills plane ``channel``; the other planes
    (other classes) are zero.

    Args:
        mask: the predicted class on the source grid. Shape: ``(n, rows, cols)``.
        size: the model's input size S.
        planes: planes of the graph's ``target`` (:attr:`ExplainInfo.target_channels`).
        channel: the explained class's model channel.

    Returns:
        float32 0/1 target. Shape: ``(n, planes, size, size)``.
    """
    on_grid = to_model_grid(mask.astype(np.float32), size)
    target = np.zeros((mask.shape[0], planes, size, size), dtype=np.float32)
    target[:, channel] = on_grid > TARGET_THRESHOLD
    return target


def label_map(
    prediction: Prediction, indices: Sequence[int], channel: int
) -> npt.NDArray[np.uint8]:
    """GGO (1) and consolidation (2) of some slices as one label map (0: neither).

    Args:
        prediction: the masks (GGO and consolidation exclusive, as the pipeline leaves them;
            a voxel in both would be labelled consolidation).
        indices: the slices.
        channel: the consolidation channel.

    Returns:
        uint8 labels. Shape: ``(len(indices), rows, cols)``.
    """
    chosen = list(indices)
    labels = prediction.ggo[chosen].astype(np.uint8) * np.uint8(LABEL_GGO)
    labels[prediction.masks[chosen, ..., channel]] = LABEL_CONSOLIDATION
    return labels


@dataclass(frozen=True, slots=True)
class Explanation:
    """GradCAM++ maps of some slices of a volume, on the source grid.

    Attributes:
        slice_indices: 0-based slice indices along the sorted volume, increasing.
        sop_instance_uids: SOPInstanceUID of each explained slice.
        cam: float32 maps in ``[0, 1]``. Shape: ``(k, rows, cols)``.
        mask: the predicted class used as the target, uint8 0/1. Shape: ``(k, rows, cols)``.
        layer: the target layer.
        target: the explained class (:class:`ExplainTarget` value).
        labels: for a model with a consolidation channel, both predicted classes of the
            explained slices (:data:`LABEL_GGO`, :data:`LABEL_CONSOLIDATION`, 0 neither), uint8;
            ``None`` for a one-channel model (``mask`` is then the GGO).
    """

    slice_indices: tuple[int, ...]
    sop_instance_uids: tuple[str, ...]
    cam: FloatArray
    mask: npt.NDArray[np.uint8]
    layer: str
    target: str = ExplainTarget.GGO.value
    labels: npt.NDArray[np.uint8] | None = None


def select_slices(
    ggo: npt.NDArray[np.bool_],
    slices: str | Sequence[int],
    *,
    target: npt.NDArray[np.bool_] | None = None,
) -> tuple[int, ...]:
    """Resolve a slice selection to sorted 0-based indices.

    Args:
        ggo: the predicted GGO. Shape: ``(slices, rows, cols)``.
        slices: ``"ggo"`` (slices with predicted GGO), ``"target"`` (slices with the explained
            class), ``"all"``, or 0-based indices.
        target: the explained class's mask for ``"target"`` (``None``: the GGO).

    Returns:
        Sorted unique indices.

    Raises:
        InputError: an unknown keyword or an index out of range.
    """
    n = ggo.shape[0]
    if isinstance(slices, str):
        try:
            choice = ExplainSlices(slices.lower())
        except ValueError:
            raise InputError(
                f"invalid slice selection {slices!r}; use ggo, target, all or slice indices"
            ) from None
        if choice is ExplainSlices.ALL:
            return tuple(range(n))
        chosen = target if choice is ExplainSlices.TARGET and target is not None else ggo
        return tuple(np.flatnonzero(chosen.reshape(n, -1).any(axis=1)).tolist())
    indices = sorted({int(i) for i in slices})
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise InputError(f"slice indices {bad} are outside the volume's 0..{n - 1}")
    return tuple(indices)


class OnnxExplainer(OnnxSessionBase):
    """Runs an explain graph over CT volumes and returns GradCAM++ maps of a predicted class.

    Args:
        model: the validated segmentation model (window, input size).
        explain: the validated explain graph paired with ``model``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: slices per batch; ``None`` picks 16 on CUDA and 1 on the CPU.
        layer: target layer; ``None`` takes the graph's default.
        target: the explained class, ``ggo`` or ``consolidation`` (:func:`target_channel`).
        intra_op_threads: threads of its CPU session (a ``--jobs`` worker's share,
            :attr:`ggo_cli.host.HostLimits.intra_op_threads`); ``None``: ONNX Runtime's default.

    Raises:
        InputError: unknown layer or target, bad device or batch size.
        DeviceError: CUDA requested but not usable.
        ModelError: the session cannot be created, or the graph cannot explain the target.
    """

    def __init__(
        self,
        model: ModelInfo,
        explain: ExplainInfo,
        *,
        device: str | DeviceRequest = "auto",
        batch_size: int | None = None,
        layer: str | None = None,
        target: str = ExplainTarget.GGO,
        intra_op_threads: int | None = None,
    ) -> None:
        if explain.model_sha256 != model.recorded_sha256:
            raise ModelError(f"explain graph {explain.path.name} pairs with another model")
        self.channel = target_channel(model, explain, target)
        self.target = ExplainTarget(target.lower())
        self._consolidation = consolidation_channel(model.segments)
        self.layer = explain.default_layer if layer is None else layer
        if self.layer not in explain.layers:
            raise InputError(
                f"unknown --layer {self.layer!r}; choose one of {', '.join(explain.layers)}"
            )
        check_batch_size(batch_size)
        request = parse_device(device)
        self.model = model
        self.explain_info = explain
        session = create_session(
            explain.path,
            request,
            cuda_options=CUDA_OPTIONS,
            model_bytes=layer_subgraph(explain.path, self.layer),
            intra_op_threads=intra_op_threads,
        )
        self._use_session(session, request, batch_size)
        self._outputs = [activations_name(self.layer), gradients_name(self.layer)]
        log.info(
            "explain %s, layer %s on %s (providers %s), batch %d",
            self.target.value,
            self.layer,
            self.device_label,
            ",".join(self.providers),
            self.batch_size,
        )

    def compute_cam(self, image: FloatArray, target: FloatArray) -> FloatArray:
        """Raw GradCAM++ maps at the layer's resolution for a preprocessed batch.

        Halves the batch on GPU out-of-memory (as segmentation does).

        Args:
            image: model input. Shape: ``(n, 1, S, S)``.
            target: 0/1 target on the model grid. Shape: ``(n, T, S, S)``, ``T`` the graph's
                target planes.

        Returns:
            float32 maps, not normalised. Shape: ``(n, h, w)``.

        Raises:
            ModelError: the graph failed, or produced non-finite values.
        """

        def run(start: int, stop: int) -> FloatArray:
            feeds = {INPUT_NAME: image[start:stop], TARGET_NAME: target[start:stop]}
            a, g = self.session.run(self._outputs, feeds)
            return gradcam_plus_plus(np.asarray(a, np.float32), np.asarray(g, np.float32))

        parts = self._in_batches(run, image.shape[0], what="explain")
        cam = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if not np.isfinite(cam).all():
            raise ModelError(
                f"explain graph produced non-finite values at layer {self.layer!r}; "
                "try another --layer or --device cpu"
            )
        return cam

    def explain(
        self,
        volume: CtVolume,
        prediction: Prediction,
        *,
        slices: str | Sequence[int] = ExplainSlices.GGO,
        on_slices: Callable[[int], None] | None = None,
    ) -> Explanation:
        """GradCAM++ maps of the predicted class (GGO or consolidation) on the chosen slices.

        The target of each slice is its predicted class (``prediction.masks`` of the target's
        channel, i.e. after the threshold actually used, the GGO/consolidation exclusion and
        the lung restriction), brought to the model grid by :func:`model_grid_target`. A
        slice whose target is empty has a zero score gradient, hence alpha = 0 and a CAM of
        zeros; such slices (e.g. with ``slices="all"``, or specks that vanish when a larger
        slice is shrunk to the model grid) get zeros without running the graph.

        Args:
            volume: the CT volume.
            prediction: its segmentation. Shape of ``masks``: ``(slices, rows, cols, C)``.
            slices: ``"ggo"`` (default: slices with predicted GGO), ``"target"`` (slices with
                the explained class), ``"all"``, or indices.
            on_slices: optional callback with the number of slices just finished.

        Returns:
            The :class:`Explanation` (empty when no slice is selected).

        Raises:
            InputError: bad slice selection.
            ModelError: the graph failed.
            ValueError: the prediction does not match the volume.
        """
        n, rows, cols = volume.hu.shape
        if prediction.ggo.shape != volume.hu.shape:
            raise ValueError(
                f"prediction shape {prediction.ggo.shape} does not match the volume "
                f"{volume.hu.shape}"
            )
        explained = prediction.masks[..., self.channel]
        indices = select_slices(prediction.ggo, slices, target=explained)
        size = self.model.input_size
        planes = self.explain_info.target_channels
        mask = explained[list(indices)].astype(np.uint8)
        labels = (
            None
            if self._consolidation is None or prediction.masks.shape[-1] <= self._consolidation
            else label_map(prediction, indices, self._consolidation)
        )
        cam = np.zeros((len(indices), rows, cols), dtype=np.float32)
        step = self.batch_size
        for start in range(0, len(indices), step):
            chosen = np.asarray(indices[start : start + step], dtype=np.int64)
            target = model_grid_target(
                explained[chosen], size, planes=planes, channel=self.channel
            )
            active = np.flatnonzero(target.reshape(len(chosen), -1).any(axis=1))
            if active.size:
                image = preprocess_hu(
                    volume.hu[chosen[active]],
                    size=size,
                    center_hu=self.model.window_center_hu,
                    width_hu=self.model.window_width_hu,
                )
                raw = self.compute_cam(image, np.ascontiguousarray(target[active]))
                cam[start + active] = cam_to_source(raw, size=size, rows=rows, cols=cols)
            if on_slices is not None:
                on_slices(len(chosen))
        uids = volume.sop_instance_uids
        return Explanation(
            slice_indices=indices,
            sop_instance_uids=tuple(uids[i] for i in indices),
            cam=cam,
            mask=mask,
            layer=self.layer,
            target=self.target.value,
            labels=labels,
        )
