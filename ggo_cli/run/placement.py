"""Which GPU each ``--jobs`` worker uses, and how many workers a GPU holds.

With several GPUs (``--device cuda:0,2``, ``cuda:all``) each worker process runs its sessions on
one of them. :func:`worker_devices` maps worker numbers to devices, a pure function that the
worker start-up (:mod:`ggo_cli.run.series_pool`) takes its device from, so the mapping is tested
without a GPU. GPU numbers are CUDA ordinals (:mod:`ggo_cli.host`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import DeviceKind, DeviceRequest
from ..host import gpu_memory_bytes

GPU_BYTES_PER_JOB = 4 << 30
"""GPU memory allowed per worker: a CUDA context, cuDNN workspace and the arena of a batch of
16 slices in fp16 (an allowance, not yet measured)."""
GPU_JOBS_UNKNOWN_MEMORY = 2
"""Workers a GPU holds when its memory cannot be read (no ``nvidia-smi``)."""


def gpu_job_capacity(index: int) -> int:
    """Workers GPU ``index`` (a CUDA ordinal) holds: 80 % of its memory,
    :data:`GPU_BYTES_PER_JOB` each; :data:`GPU_JOBS_UNKNOWN_MEMORY` when it cannot be read."""
    gpu = gpu_memory_bytes(index)
    return GPU_JOBS_UNKNOWN_MEMORY if gpu is None else int(0.8 * gpu) // GPU_BYTES_PER_JOB


def worker_devices(
    device: DeviceRequest, jobs: int, *, capacity: Sequence[int] | None = None
) -> tuple[DeviceRequest, ...]:
    """The one device of each of ``jobs`` workers, by worker number (a pure function).

    Each worker goes to the listed GPU with the fewest workers so far among those with room
    left (``capacity``: workers each GPU holds, in the order listed; ``None``: no limit), the
    first listed on a tie: with equal room, worker ``k`` gets GPU ``k mod n``. Once every GPU
    is full (an explicit ``--jobs`` beyond the automatic one) the turns go on over all GPUs.
    A one-device request is every worker's device.

    Args:
        device: the run's device request.
        jobs: the number of workers.
        capacity: workers per listed GPU (:func:`gpu_job_capacity`), or ``None``.

    Returns:
        ``jobs`` one-device requests; entry ``k`` is worker ``k``'s.
    """
    devices = device.devices
    room = list(capacity) if capacity is not None else [jobs] * len(devices)
    counts = [0] * len(devices)
    chosen = []
    for _ in range(jobs):
        fits = [i for i in range(len(devices)) if counts[i] < room[i]] or range(len(devices))
        pick = min(fits, key=lambda i: (counts[i], i))
        counts[pick] += 1
        chosen.append(devices[pick])
    return tuple(chosen)


def device_label(device: DeviceRequest) -> str:
    """The label of a one-device request as the manifest writes it (``cuda:N``, ``cpu``);
    ``""`` for ``auto``, which a session decides only when it starts."""
    if device.kind is DeviceKind.AUTO:
        return ""
    return "cpu" if device.kind is DeviceKind.CPU else f"cuda:{device.index}"
