"""What this host offers a run, probed in one place: usable cores, available memory, the
GPU (through ``nvidia-smi``) and the CPU's features; and giving freed heap memory back.

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


def nvidia_smi_query(fields: str, index: int) -> str | None:
    """``nvidia-smi --query-gpu=<fields>`` (shipped with the driver) of GPU ``index``: its
    first CSV line without header or units, or ``None`` when it cannot be read."""
    try:
        done = subprocess.run(
            [
                "nvidia-smi",
                f"--query-gpu={fields}",
                "--format=csv,noheader,nounits",
                "-i",
                str(index),
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def gpu_memory_bytes(index: int) -> int | None:
    """Total memory of NVIDIA GPU ``index`` from ``nvidia-smi`` (shipped with the driver), or
    ``None`` when it cannot be read."""
    total_mib = nvidia_smi_query("memory.total", index)
    try:
        return int(float(total_mib)) << 20 if total_mib is not None else None
    except ValueError:
        return None


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
