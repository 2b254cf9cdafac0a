"""ONNX Runtime sessions for ggo-cli: the ``--device`` value, session creation on the device
asked for (checked, since onnxruntime-gpu silently falls back to the CPU), and batched runs
that halve the batch on GPU out-of-memory. Shared by :mod:`ggo_cli.analysis.segmenter` and
:mod:`ggo_cli.analysis.explainer`.

ONNX Runtime's telemetry is turned off on import of this module (:func:`disable_ort_telemetry`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ..config import DeviceKind
from ..config import DeviceRequest as DeviceRequest  # re-exported: onnx.variants, variant_check
from ..errors import DeviceError, ModelError
from ..host import nvidia_gpu_visible
from ..scratch import sweep_scratch

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
_T = TypeVar("_T")
_OOM_MARKERS = ("out of memory", "failed to allocate", "cudaerrormemoryallocation", "bfc_arena")
ORT_TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"


def disable_ort_telemetry() -> None:
    """Turn ONNX Runtime's telemetry off, for this process and the processes it starts.

    On Linux, ONNX Runtime 1.31 writes, when it is imported, a device ID and an event store
    (``$XDG_CACHE_HOME/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db}``,
    ``~/.cache`` without it) and a session file (``$TMPDIR/.ses``). Its only switch read that
    early is the environment variable ``ORT_DISABLE_TELEMETRY=1``, so it is set here, before any
    ``import onnxruntime`` of ggo-cli (every one is deferred behind this module), and is
    inherited by ``--jobs`` workers and decode processes. This is ggo-cli's one write to
    ``os.environ`` (STYLE.md section 7): there is no other way to keep those files from
    being written. :func:`create_session` also calls ``disable_telemetry_events``.
    """
    os.environ[ORT_TELEMETRY_ENV] = "1"


disable_ort_telemetry()


def _is_oom(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)


def cuda_wanted(request: DeviceRequest) -> bool:
    """Whether a session for ``request`` tries CUDA (explicitly, or ``auto`` with a GPU)."""
    import onnxruntime as ort  # deferred: keeps `ggo-cli --help` fast

    return request.kind == DeviceKind.CUDA or (
        request.kind == DeviceKind.AUTO
        and CUDA_PROVIDER in ort.get_available_providers()
        and nvidia_gpu_visible()
    )


def create_session(
    path: Path,
    request: DeviceRequest,
    *,
    cuda_options: Mapping[str, Any] | None = None,
    model_bytes: bytes | None = None,
    intra_op_threads: int | None = None,
) -> Any:
    """Create an ONNX Runtime session on the requested device and check where it landed.

    Shared by :class:`OnnxSegmenter` and :class:`ggo_cli.analysis.explainer.OnnxExplainer`. Every
    session start also removes the scratch folders of killed runs
    (:func:`ggo_cli.scratch.sweep_scratch`). A session runs on one device: a request naming
    several GPUs (``cuda:0,2``, ``cuda:all``) gets the first (``request.index``); the
    ``--jobs`` workers each pass their own (:func:`ggo_cli.run.placement.worker_devices`).

    Args:
        path: the ONNX file (named in errors; read unless ``model_bytes`` is given).
        request: the parsed ``--device``.
        cuda_options: extra CUDA provider options (e.g. ``{"use_tf32": 0}``).
        model_bytes: a serialized model to load instead of ``path`` (e.g. a pruned subgraph).
        intra_op_threads: threads of a CPU session (a ``--jobs`` worker's share of the cores,
            :attr:`ggo_cli.host.HostLimits.intra_op_threads`); ``None``: ONNX Runtime's default.

    Returns:
        The ``onnxruntime.InferenceSession``; ``get_providers()[0]`` tells the device in use.

    Raises:
        DeviceError: CUDA requested explicitly but unavailable or fallen back to the CPU.
        ModelError: the session cannot be created.
    """
    import onnxruntime as ort  # deferred: keeps `ggo-cli --help` fast

    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()  # ETW events on Windows; the files: see above
    sweep_scratch()  # what a run killed with kill -9 left in ggo-cli's cache (scratch.py)
    available = ort.get_available_providers()
    want_cuda = cuda_wanted(request)
    if request.kind == DeviceKind.CUDA and CUDA_PROVIDER not in available:
        raise DeviceError(
            f"--device {request.kind} requested but this ONNX Runtime build has no CUDA "
            f"provider (available: {', '.join(available)}); install onnxruntime-gpu or use "
            "--device cpu"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not want_cuda:
        # ORT's memory pattern plans one block for a whole batch's activations and keeps it:
        # without it the CPU session (int8, batch 4) holds far less resident memory at the
        # same speed (docs/benchmarks.md, the memory of long series).
        options.enable_mem_pattern = False
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads  # a --jobs worker's share
    providers: list[Any] = [CPU_PROVIDER]
    if want_cuda:
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # finds CUDA/cuDNN shipped with pip packages (ORT >= 1.21)
        provider_options = {"device_id": request.index, "cudnn_conv_algo_search": "EXHAUSTIVE"}
        provider_options.update(cuda_options or {})
        providers = [(CUDA_PROVIDER, provider_options), CPU_PROVIDER]
    try:
        source: str | bytes = str(path) if model_bytes is None else model_bytes
        session = ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped exceptions
        raise ModelError(f"ONNX Runtime cannot load {path.name}: {exc}") from exc
    in_use = session.get_providers()
    if want_cuda and in_use[0] != CUDA_PROVIDER:
        if request.kind == DeviceKind.CUDA:
            raise DeviceError(
                f"--device cuda:{request.index} requested but ONNX Runtime fell "
                "back to the CPU (no usable GPU, driver, CUDA or cuDNN); use --device cpu "
                "or fix the GPU setup (`ggo-cli info` lists providers)"
            )
        log.warning("CUDA is not usable here; running on the CPU")
    return session


def run_in_batches(
    run: Callable[[int, int], _T],
    n: int,
    *,
    batch_size: int,
    on_cuda: bool,
    on_halve: Callable[[int], None] | None = None,
    what: str = "inference",
) -> list[_T]:
    """Call ``run(start, stop)`` over ``0..n`` in chunks, halving the chunk on GPU out-of-memory.

    Args:
        run: computes one chunk of items ``start:stop``.
        n: number of items.
        batch_size: items per chunk to start with.
        on_cuda: whether the session runs on CUDA (only then is an OOM retried).
        on_halve: told the new batch size after each halving.
        what: the operation, for the error message.

    Returns:
        The chunk results in order.

    Raises:
        ModelError: a failure other than memory, or out of memory at batch size 1.
    """
    results: list[_T] = []
    start = 0
    while start < n:
        stop = min(start + batch_size, n)
        try:
            results.append(run(start, stop))
        except Exception as exc:  # noqa: BLE001 - ORT raises untyped RuntimeExceptions
            if on_cuda and _is_oom(exc) and batch_size > 1:
                batch_size = max(1, batch_size // 2)
                if on_halve is not None:
                    on_halve(batch_size)
                log.warning("GPU out of memory; retrying with batch size %d", batch_size)
                continue
            raise ModelError(f"{what} failed: {str(exc).splitlines()[0]}") from exc
        start = stop
    return results
