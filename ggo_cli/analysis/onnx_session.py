"""What the segmenter and the explainer share: an ONNX Runtime session on the device asked for.

onnxruntime-gpu silently falls back to the CPU when CUDA cannot be used, so the providers in
use are read back with ``session.get_providers()``; the device label and the default batch
size follow from them. Batches run through :func:`ggo_cli.onnx.runtime.run_in_batches`, which
halves the batch on GPU out-of-memory; on CUDA, inputs and outputs can be bound to device
buffers of a fixed batch shape (IO binding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from ..config import CPU_BATCH_SIZE, CPU_INT8_BATCH_SIZE, CUDA_BATCH_SIZE, DeviceRequest
from ..errors import InputError
from ..onnx.runtime import CUDA_PROVIDER, run_in_batches

_T = TypeVar("_T")


def check_batch_size(batch_size: int | None) -> None:
    """Raise ``InputError`` for a ``--batch-size`` below 1 (``None``: the device's default)."""
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")


class OnnxSessionBase:
    """A session, the device it landed on and its batch size (base of
    :class:`~ggo_cli.analysis.segmenter.OnnxSegmenter` and
    :class:`~ggo_cli.analysis.explainer.OnnxExplainer`).

    A subclass creates its session (:func:`ggo_cli.onnx.runtime.create_session`) and hands it
    to :meth:`_use_session`.
    """

    session: Any
    providers: list[str]
    on_cuda: bool
    device_label: str
    device_index: int
    batch_size: int
    # Device buffers of a fixed batch shape per graph: see _run_bound.
    _bound: dict[str, tuple[int, Any, Any, Any]]

    def _use_session(
        self, session: Any, request: DeviceRequest, batch_size: int | None, *, int8: bool = False
    ) -> None:
        """Adopt a session: providers in use, device label and index, batch size (``None``:
        16 on CUDA; on the CPU 1, or 4 for the int8 variant (``int8``): see
        :data:`ggo_cli.config.CPU_BATCH_SIZE`)."""
        self.session = session
        self.providers = list(session.get_providers())
        self.on_cuda = self.providers[0] == CUDA_PROVIDER
        self.device_label = f"cuda:{request.index}" if self.on_cuda else "cpu"
        self.device_index = request.index
        cpu_batch = CPU_INT8_BATCH_SIZE if int8 else CPU_BATCH_SIZE
        self.batch_size = batch_size or (CUDA_BATCH_SIZE if self.on_cuda else cpu_batch)
        self._bound = {}

    def _on_halve(self, size: int) -> None:
        """Take the halved batch size; bound buffers of the old size are dropped."""
        self.batch_size = size
        self._bound.clear()

    def _in_batches(
        self, run: Callable[[int, int], _T], n: int, *, what: str = "inference"
    ) -> list[_T]:
        """``run(start, stop)`` over ``0..n`` in batches, halved on GPU out-of-memory."""
        return run_in_batches(
            run,
            n,
            batch_size=self.batch_size,
            on_cuda=self.on_cuda,
            on_halve=self._on_halve,
            what=what,
        )

    def _run_bound(
        self,
        key: str,
        session: Any,
        batch: npt.NDArray[Any],
        input_name: str,
        outputs: tuple[tuple[str, int, Any], ...],
    ) -> list[npt.NDArray[Any]]:
        """Run one batch through buffers of a fixed shape on the session's device (IO
        binding; a short batch is padded with zeros).

        Args:
            key: which graph the buffers belong to.
            session: its session.
            batch: the input. Shape: ``(n, 1, S, S)``.
            input_name: the graph's input.
            outputs: name, channels and dtype of each output fetched.

        Returns:
            One array per output. Shape: ``(n, channels, S, S)``.
        """
        import onnxruntime as ort  # deferred: keeps `ggo-cli --help` fast

        n = batch.shape[0]
        size = batch.shape[-1]
        device = "cuda" if self.on_cuda else "cpu"
        bound = self._bound.get(key)
        if bound is None or bound[0] != self.batch_size:
            x = ort.OrtValue.ortvalue_from_shape_and_type(
                (self.batch_size, 1, size, size), batch.dtype, device, self.device_index
            )
            binding = session.io_binding()
            binding.bind_ortvalue_input(input_name, x)
            ys = []
            for name, channels, dtype in outputs:
                y = ort.OrtValue.ortvalue_from_shape_and_type(
                    (self.batch_size, channels, size, size), dtype, device, self.device_index
                )
                binding.bind_ortvalue_output(name, y)
                ys.append(y)
            bound = self._bound[key] = (self.batch_size, x, ys, binding)
        _, x, ys, binding = bound
        if n < self.batch_size:
            padded = np.zeros((self.batch_size, *batch.shape[1:]), dtype=batch.dtype)
            padded[:n] = batch
            batch = padded
        x.update_inplace(np.ascontiguousarray(batch))
        session.run_with_iobinding(binding)
        return [np.asarray(y.numpy()[:n]) for y in ys]
