"""The models ``evaluate`` runs: the :class:`Predictor` protocol and its ONNX and torch predictors.

A predictor maps model-grid batches to logits and carries the model's preprocessing facts (input
size, threshold, lung window, classes); :mod:`training.evaluate` runs it on slices exactly as
inference does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ggo_cli.errors import InputError

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
DEFAULT_THRESHOLD = 0.5
"""The threshold of a checkpoint that records none (and the one a threshold search must beat)."""


class Predictor(Protocol):
    """Anything that maps model-grid batches to logits, with the model's preprocessing facts."""

    input_size: int
    threshold: float
    window_center: float
    window_width: float

    def logits(self, batch: FloatArray) -> FloatArray:
        """Shape: ``(n, 1, S, S) -> (n, C, S, S)``, float32."""
        ...


class OnnxPredictor:
    """ONNX Runtime predictor.

    Args:
        session: an ``onnxruntime.InferenceSession`` with input ``image``, output ``logits``.
        input_size: S.
        threshold: probability threshold.
        window_center: lung window centre in HU.
        window_width: lung window width in HU.
        metadata: the model's ``ggo_cli`` metadata, when read from a file.
    """

    def __init__(
        self,
        session: Any,
        *,
        input_size: int,
        threshold: float,
        window_center: float,
        window_width: float,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.session = session
        self.metadata: Mapping[str, Any] = metadata or {}
        self.input_size = input_size
        self.threshold = threshold
        self.window_center = window_center
        self.window_width = window_width
        self.classes: tuple[str, ...] = tuple(self.metadata.get("classes", ("ggo",)))

    @classmethod
    def from_file(
        cls, path: Path, providers: Sequence[str] = ("CPUExecutionProvider",)
    ) -> OnnxPredictor:
        """Open an exported model, its metadata checked by ``load_model_info``.

        Raises:
            ModelError: the file breaks the model contract.
        """
        import onnxruntime as ort

        from ggo_cli.onnx.model_info import load_model_info  # deferred: imports pydicom

        info = load_model_info(path)
        session = ort.InferenceSession(str(path), providers=list(providers))
        log.info("ONNX Runtime providers: %s", session.get_providers())
        return cls(
            session,
            input_size=info.input_size,
            threshold=info.threshold,
            window_center=info.window_center_hu,
            window_width=info.window_width_hu,
            metadata=info.metadata,
        )

    def logits(self, batch: FloatArray) -> FloatArray:
        """Run the session. Shape: ``(n, 1, S, S) -> (n, C, S, S)``."""
        out = self.session.run(["logits"], {"image": np.ascontiguousarray(batch, np.float32)})[0]
        return np.asarray(out, dtype=np.float32)


class TorchPredictor:
    """Predictor for a training checkpoint (float32, no autocast).

    Args:
        checkpoint: a ``.pt`` file or a run folder.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
    """

    def __init__(self, checkpoint: Path, device: str = "cpu") -> None:
        from .checkpoints import load_checkpoint, model_from_checkpoint
        from .loop import select_device

        ckpt = load_checkpoint(checkpoint)
        self.device = select_device(device)
        self.model, self.config = model_from_checkpoint(ckpt, self.device)
        self.checkpoint = ckpt
        self.input_size = self.config.size
        threshold = ckpt.get("threshold")
        self.threshold = float(threshold) if threshold is not None else DEFAULT_THRESHOLD
        self.window_center = self.config.window_center
        self.window_width = self.config.window_width
        self.classes: tuple[str, ...] = self.config.classes

    def logits(self, batch: FloatArray) -> FloatArray:
        """Run the network. Shape: ``(n, 1, S, S) -> (n, C, S, S)``."""
        import torch

        with torch.no_grad():
            out = self.model(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device))
        result: FloatArray = out.float().cpu().numpy()
        return result


def make_predictor(model: Path, device: str = "cpu") -> Predictor:
    """An :class:`OnnxPredictor` for ``.onnx``, else a :class:`TorchPredictor`.

    Raises:
        InputError: the model path does not exist.
        ModelError: the ONNX file breaks the model contract.
    """
    if not model.exists():
        raise InputError(f"model not found: {model}")
    if model.suffix == ".onnx":
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            providers.insert(0, "CUDAExecutionProvider")
        return OnnxPredictor.from_file(model, providers)
    return TorchPredictor(model, device)


def predictor_classes(predictor: Predictor) -> tuple[str, ...]:
    """The classes a predictor segments (channel order); GGO alone when it does not say."""
    return tuple(getattr(predictor, "classes", ("ggo",)))
