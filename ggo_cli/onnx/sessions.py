"""A run's ONNX Runtime sessions, created on first use, one set per process (main or worker)."""

from __future__ import annotations

from ..analysis.explainer import OnnxExplainer
from ..analysis.segmenter import OnnxSegmenter
from ..config import DeviceRequest, RunConfig
from ..host import HostLimits
from .explain_graph import ExplainInfo
from .model_info import ModelInfo


class Sessions:
    """A run's ONNX Runtime sessions, each created on first use (one per process).

    Args:
        cfg: the run configuration (device, batch size, threshold, precision, explain layer).
        model: the validated model.
        explain_info: the validated explain graph, or ``None`` when no maps are asked for.
        limits: the cores of this process (a ``--jobs`` worker's share holds the CPU sessions
            to it).
        device: the one device of this process's sessions: a ``--jobs`` worker's own
            (:func:`ggo_cli.run.placement.worker_devices`); ``None``: the run's device, or
            the first of several GPUs (a run of one process uses that GPU only).
    """

    def __init__(
        self,
        cfg: RunConfig,
        model: ModelInfo,
        explain_info: ExplainInfo | None,
        *,
        limits: HostLimits,
        device: DeviceRequest | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = cfg.device.devices[0] if device is None else device
        self.model = model
        self.explain_info = explain_info
        self.limits = limits
        self._segmenter: OnnxSegmenter | None = None
        self._explainer: OnnxExplainer | None = None

    @property
    def started(self) -> OnnxSegmenter | None:
        """The segmenter if it was created, else ``None``."""
        return self._segmenter

    def segmenter(self) -> OnnxSegmenter:
        """The segmentation session (created now if needed; raises ModelError, DeviceError)."""
        if self._segmenter is None:
            self._segmenter = OnnxSegmenter(
                self.model,
                device=self.device,
                batch_size=self.cfg.batch_size,
                threshold=self.cfg.threshold,
                precision=self.cfg.precision,
                force_check=self.cfg.force,
                intra_op_threads=self.limits.intra_op_threads,
            )
        return self._segmenter

    def explainer(self) -> OnnxExplainer | None:
        """The GradCAM++ session when maps are asked for, else ``None``."""
        if self.explain_info is not None and self._explainer is None:
            self._explainer = OnnxExplainer(
                self.model,
                self.explain_info,
                device=self.device,
                batch_size=self.cfg.batch_size,
                layer=self.cfg.explain_layer,
                target=self.cfg.explain_target,
                intra_op_threads=self.limits.intra_op_threads,
            )
        return self._explainer
