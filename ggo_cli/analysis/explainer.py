"""GradCAM++ heat maps for the predicted GGO, computed by ONNX Runtime and numpy alone.

The explain graph and its contract (inputs, outputs, metadata) are in
:mod:`ggo_cli.onnx.explain_graph`; PyTorch is needed only to export it, never here. The
GradCAM++ arithmetic is in :mod:`ggo_cli.analysis.gradcam_maths`, the target (class, channel,
slices) in :mod:`ggo_cli.analysis.explain_target`; their names are re-exported here.

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
from .explain_target import (
    LABEL_CONSOLIDATION,
    LABEL_GGO,
    TARGET_THRESHOLD,
    ExplainSlices,
    ExplainTarget,
    label_map,
    model_grid_target,
    select_slices,
    target_channel,
)
from .gradcam_maths import cam_matrices, cam_to_source, gradcam_plus_plus, normalise_per_slice
from .measurements import consolidation_channel
from .onnx_session import OnnxSessionBase, check_batch_size
from .preprocessing import preprocess_hu

__all__ = [
    "CUDA_OPTIONS",
    "LABEL_CONSOLIDATION",
    "LABEL_GGO",
    "TARGET_THRESHOLD",
    "ExplainSlices",
    "ExplainTarget",
    "Explanation",
    "OnnxExplainer",
    "cam_matrices",
    "cam_to_source",
    "gradcam_plus_plus",
    "label_map",
    "model_grid_target",
    "normalise_per_slice",
    "select_slices",
    "target_channel",
]

log = logging.getLogger(__name__)

CUDA_OPTIONS = {"use_tf32": 0}
"""TF32 convolutions moved raw gradients by up to 9 % relative (STYLE.md section 12)."""

FloatArray = npt.NDArray[np.float32]


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
