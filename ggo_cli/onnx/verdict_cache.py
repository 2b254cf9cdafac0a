"""Where self-check verdicts are kept: the on-disk cache, keyed by this machine's identity.

A verdict is stored as JSON in ``<cache>/variant-checks/`` (:func:`cache_dir`:
``GGO_CACHE_DIR``, else the platform's user cache folder), beside a lock file that concurrent
processes take, so that one of them measures and the others read its verdict. The key includes
:func:`machine_identity`: the CPU model and flags, the GPU (on CUDA) and the ONNX Runtime
version. :class:`VerdictCache` holds the verdicts a caller has already settled, in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..host import nvidia_smi_query
from ..scratch import lock_exclusive
from .int8_recipes import cpu_flag_set
from .variant_verdict import VariantCheck

log = logging.getLogger(__name__)

CACHE_ENV = "GGO_CACHE_DIR"


def cache_dir() -> Path:
    """The user cache folder of ggo-cli (``GGO_CACHE_DIR``, else the platform's)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    import platformdirs

    return Path(platformdirs.user_cache_dir("ggo-cli", appauthor=False))


def machine_identity(on_cuda: bool, device_index: int = 0) -> dict[str, str]:
    """What identifies this machine's arithmetic: CPU model and flags, GPU, ONNX Runtime."""
    import onnxruntime as ort

    from ..host import read_cpuinfo

    cpu_model = read_cpuinfo()[0] or platform.processor() or platform.machine()
    flags = " ".join(sorted(cpu_flag_set()))
    identity = {
        "cpu": cpu_model,
        "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest(),
        "machine": platform.machine(),
        "onnxruntime": ort.__version__,
    }
    if on_cuda:
        gpu = nvidia_smi_query("name,driver_version", device_index)
        identity["gpu"] = gpu or f"cuda:{device_index}"
    return identity


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (``False`` when it cannot be taken: no cache).

    Args:
        path: the lock file (created with its folder when missing).

    Yields:
        Whether the lock is held; ``False`` when the cache folder cannot be used.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+b")  # noqa: SIM115 - closed below
    except OSError as exc:
        log.debug("no self-check cache (%s): the check runs in this process", exc)
        yield False
        return
    try:
        yield lock_exclusive(handle, wait=True)
    finally:
        handle.close()


def read_cached_verdict(
    path: Path, key: dict[str, Any], *, newer_than: float | None
) -> VariantCheck | None:
    """The verdict cached in ``path`` for ``key``, marked ``cached``.

    Args:
        path: the cache entry (JSON: the key, when it was written, the verdict).
        key: the full cache key; an entry written for another key does not count.
        newer_than: with a time (seconds since the epoch), only an entry written after it
            counts (``--force``: a verdict of this run's workers is reused).

    Returns:
        The verdict, or ``None`` when the entry is missing, unreadable, malformed, stale or
        for another key.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("key") != key:
            return None
        if newer_than is not None and float(data.get("written", 0.0)) < newer_than:
            return None
        verdict = VariantCheck.from_dict(data["verdict"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return VariantCheck(**{**asdict(verdict), "figures": verdict.figures, "cached": True})


class VerdictCache:
    """Verdicts already settled, by cache key digest: owned by the caller (one per segmenter,
    or one shared by the segmenters of a process) so that a key is measured or read from disk
    once per owner."""

    def __init__(self) -> None:
        self._verdicts: dict[str, VariantCheck] = {}

    def get(self, digest: str) -> VariantCheck | None:
        """The verdict settled for a key, or ``None``."""
        return self._verdicts.get(digest)

    def put(self, digest: str, verdict: VariantCheck) -> None:
        """Remember the verdict of a key."""
        self._verdicts[digest] = verdict
