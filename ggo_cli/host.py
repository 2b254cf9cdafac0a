"""What this host offers a run, probed in one place: usable cores, available memory, the
GPU (through ``nvidia-smi``) and the CPU's features; and giving freed heap memory back.

GPU numbers: ``cuda:N`` (and ``cuda:all``, lists ``cuda:0,2``) are CUDA ordinals, the ``device_id``
ONNX Runtime passes to CUDA: the GPUs ``nvidia-smi`` lists, narrowed and renumbered by
``CUDA_VISIBLE_DEVICES`` when it is set (``CUDA_VISIBLE_DEVICES=2,3`` makes physical GPUs 2 and 3
``cuda:0`` and ``cuda:1``), as CUDA itself does (:func:`visible_gpus`). ``nvidia-smi`` numbers GPUs
in PCI bus order; CUDA orders them fastest first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so on a
host with GPUs of different models that variable should be set for the two numberings to agree.

The probes read the operating system each time they are called (except ``/proc/cpuinfo``
and glibc, which cannot change within a process); their results are passed on as values.

Freed memory: a series' stages allocate and free many slice-sized arrays from several threads;
glibc keeps freed chunks in its per-thread arenas, so the resident size stays high after the
arrays are gone (on a 1000-slice series about 0.3 GB after the lung mask). ``malloc_trim(0)``
returns them, as Dask does for its workers ("memory not released back to the OS"). It exists
only in glibc: elsewhere (musl, macOS, Windows) :func:`release_freed_memory` is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


MAX_DECODE_WORKERS = 8
"""Most decode processes by default (:attr:`HostLimits.decode_workers`)."""
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
"""Vector extensions that decide int8 and bf16 inference speed."""


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS has one), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


@dataclass(frozen=True, slots=True)
class HostLimits:
    """The CPU cores one process of a run may use: computed once by the runner (or, in a
    ``--jobs`` worker, its share) and passed to the decode pool, the lung mask and ONNX
    Runtime's sessions.

    Attributes:
        cores: cores for this process's work, at least 1 (threads of the lung mask and of
            slice-by-slice work; decode processes).
        shared: ``cores`` is this process's share of the host (a ``--jobs`` worker): ONNX
            Runtime's CPU sessions then run on as many threads; otherwise they keep ONNX
            Runtime's own default.
    """

    cores: int
    shared: bool = False

    @classmethod
    def of_this_process(cls) -> HostLimits:
        """Every usable core of this process (:func:`usable_cores`), not shared."""
        return cls(usable_cores())

    def share(self, jobs: int) -> HostLimits:
        """One of ``jobs`` worker processes' equal share of these cores (at least 1)."""
        return HostLimits(max(1, self.cores // jobs), shared=True)

    @property
    def decode_workers(self) -> int:
        """Worker processes for decoding: one per core (at most :data:`MAX_DECODE_WORKERS`);
        0 on a single core."""
        return 0 if self.cores < 2 else min(self.cores, MAX_DECODE_WORKERS)

    @property
    def intra_op_threads(self) -> int | None:
        """ONNX Runtime's intra-op threads for a CPU session: ``cores`` when shared, else
        ``None`` (ONNX Runtime's default)."""
        return self.cores if self.shared else None


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` (Linux), else ``None``."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def nvidia_gpu_visible() -> bool:
    """Cheap check for an NVIDIA driver, so ``auto`` never makes ORT try (and log) CUDA in vain."""
    if sys.platform.startswith("linux"):
        gpus = Path("/proc/driver/nvidia/gpus")
        return gpus.is_dir() and any(gpus.iterdir())
    return True  # elsewhere let ONNX Runtime decide; its choice is read back anyway


CUDA_VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
"""The variable CUDA reads to narrow and renumber the GPUs a process sees."""
_SMI_TIMEOUT_S = 10


def _nvidia_smi(arguments: list[str]) -> list[str] | None:
    """The output lines of ``nvidia-smi`` (shipped with the driver) run with ``arguments``, or
    ``None`` when it cannot be run or fails."""
    try:
        done = subprocess.run(
            ["nvidia-smi", *arguments],
            capture_output=True,
            text=True,
            timeout=_SMI_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in done.stdout.strip().splitlines() if line.strip()]


def cuda_visible_entries(mask: str | None) -> tuple[str, ...] | None:
    """The entries of a ``CUDA_VISIBLE_DEVICES`` value as CUDA reads them: comma-separated GPU
    indices or ``GPU-``/``MIG-`` UUIDs, read up to the first entry that is neither (CUDA
    ignores the rest: ``-1`` hides every GPU).

    Args:
        mask: the variable's value, or ``None`` when it is not set.

    Returns:
        The entries in order (entry ``k`` is CUDA ordinal ``k``), or ``None`` when the variable
        is not set (every GPU, in ``nvidia-smi``'s numbering).
    """
    if mask is None:
        return None
    entries: list[str] = []
    for raw in mask.split(","):
        entry = raw.strip()
        if not (entry.isdigit() or entry.upper().startswith(("GPU-", "MIG-"))):
            break
        entries.append(entry)
    return tuple(entries)


def smi_id(ordinal: int) -> str | None:
    """What ``nvidia-smi -i`` takes for CUDA ordinal ``ordinal`` of this process (an index
    or a UUID from ``CUDA_VISIBLE_DEVICES``), or ``None`` when no such ordinal can exist."""
    entries = cuda_visible_entries(os.environ.get(CUDA_VISIBLE_ENV))
    if entries is None:
        return str(ordinal)
    return entries[ordinal] if 0 <= ordinal < len(entries) else None


def nvidia_smi_query(fields: str, index: int) -> str | None:
    """``nvidia-smi --query-gpu=<fields>`` (shipped with the driver) of the GPU that is CUDA
    ordinal ``index`` in this process (:func:`smi_id`): its first CSV line without header or
    units, or ``None`` when it cannot be read."""
    gpu = smi_id(index)
    if gpu is None:
        return None
    lines = _nvidia_smi(
        [f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-i", gpu]
    )
    return lines[0] if lines else None


def _mib_to_bytes(text: str) -> int | None:
    """``nvidia-smi``'s ``memory.total`` (MiB, no unit) in bytes, ``None`` when not a number."""
    try:
        return int(float(text)) << 20
    except ValueError:
        return None


def gpu_memory_bytes(index: int) -> int | None:
    """Total memory of the GPU that is CUDA ordinal ``index`` in this process, from
    ``nvidia-smi``, or ``None`` when it cannot be read."""
    total_mib = nvidia_smi_query("memory.total", index)
    return None if total_mib is None else _mib_to_bytes(total_mib)


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """One NVIDIA GPU as a process sees it.

    Attributes:
        ordinal: its CUDA ordinal in this process (``cuda:N``; ONNX Runtime's ``device_id``);
            in ``nvidia-smi``'s own list, its index there.
        smi_id: how ``nvidia-smi -i`` names it (its index, or its UUID).
        uuid: its UUID (``GPU-...``; a MIG instance's ``MIG-...``).
        name: its product name (``""`` for a MIG instance).
        memory_bytes: its total memory, ``None`` when unknown.
    """

    ordinal: int
    smi_id: str
    uuid: str
    name: str
    memory_bytes: int | None

    @property
    def label(self) -> str:
        """``cuda:N``."""
        return f"cuda:{self.ordinal}"


def select_visible(physical: Sequence[GpuDevice], mask: str | None) -> tuple[GpuDevice, ...]:
    """The GPUs a process sees, numbered as CUDA numbers them.

    Args:
        physical: every GPU ``nvidia-smi`` lists, in its order.
        mask: ``CUDA_VISIBLE_DEVICES``, or ``None`` when it is not set.

    Returns:
        The visible GPUs, ordinals from 0. As in CUDA, the list stops at an entry that
        matches no GPU (an index that does not exist, a UUID prefix of none or of several)
        and at a GPU named twice; a MIG instance is kept with unknown name and memory.
    """
    entries = cuda_visible_entries(mask)
    if entries is None:
        return tuple(
            GpuDevice(k, gpu.smi_id, gpu.uuid, gpu.name, gpu.memory_bytes)
            for k, gpu in enumerate(physical)
        )
    found: list[GpuDevice] = []
    for entry in entries:
        if entry.upper().startswith("MIG-"):
            found.append(GpuDevice(len(found), entry, entry, "", None))
            continue
        if entry.isdigit():
            matches = [g for g in physical if g.ordinal == int(entry)]
        else:
            matches = [g for g in physical if g.uuid.upper().startswith(entry.upper())]
        if len(matches) != 1 or any(g.uuid == matches[0].uuid for g in found):
            break
        gpu = matches[0]
        found.append(GpuDevice(len(found), entry, gpu.uuid, gpu.name, gpu.memory_bytes))
    return tuple(found)


def visible_gpus() -> tuple[GpuDevice, ...] | None:
    """The NVIDIA GPUs this process sees: ``nvidia-smi``'s list narrowed and renumbered by
    ``CUDA_VISIBLE_DEVICES`` (:func:`select_visible`).

    Returns:
        The GPUs in CUDA's numbering; ``()`` when there is none (on Linux: no NVIDIA
        driver); ``None`` when they cannot be listed (``nvidia-smi`` missing or failing).
    """
    if sys.platform.startswith("linux") and not nvidia_gpu_visible():
        return ()  # no NVIDIA driver: nothing to ask nvidia-smi about
    lines = _nvidia_smi(
        ["--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"]
    )
    if lines is None:
        return None
    physical = []
    for line in lines:
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            index, uuid, name, memory = parts
            physical.append(GpuDevice(int(index), index, uuid, name, _mib_to_bytes(memory)))
    return select_visible(physical, os.environ.get(CUDA_VISIBLE_ENV))


# Cached: a pure read of /proc/cpuinfo, whose answer cannot change within a process; read once.
@lru_cache(maxsize=1)
def read_cpuinfo() -> tuple[str, frozenset[str] | None]:
    """This CPU's model name and all its feature flags, from Linux ``/proc/cpuinfo`` (read
    once a process; ``("", None)`` elsewhere, flags ``None`` when no flags line was found).
    The first processor's entry speaks for all."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")):  # Features: ARM
                return model, frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, None


def cpu_features() -> dict[str, Any]:
    """The CPU's model name and which of :data:`CPU_FLAGS` it has (Linux; ``{}`` elsewhere)."""
    model, flags = read_cpuinfo()
    found: dict[str, Any] = {"model": model} if model else {}
    if flags is not None:
        found["flags"] = [f for f in CPU_FLAGS if f in flags]
    return found


# Cached: loading the C library is a pure probe of this process; done once.
@lru_cache(maxsize=1)
def _libc() -> Any:
    """glibc, or ``None`` where it (or its ``malloc_trim``) is not available."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_memory() -> bool:
    """Return freed heap memory to the operating system (glibc's ``malloc_trim(0)``).

    Returns:
        Whether anything was released (``False`` also where the call does not exist).
    """
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(0))
