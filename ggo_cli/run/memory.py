"""How much memory a series takes while it is processed, from measured figures (issue 18).

Measured on the CPU path under GNU ``time`` with the benchmarks' stand-in model
(docs/benchmarks.md, "CPU stages around the model"): a run of one 1000 x 512 x 512 series
peaked 1.32 GiB above a run of a 48-slice one, 5.3 bytes a voxel (the int16 HU volume, the
three uint8 segment planes and the SEG's packed frames), and a run of two such series, which
the staged pipeline holds at once (one segmented while the next is decoded), 2.67 GiB above it.
"""

from __future__ import annotations

import logging

from ..host import available_memory_bytes

log = logging.getLogger(__name__)

BYTES_PER_VOXEL = 6
"""Peak resident bytes per voxel of one series in flight (5.3 measured, rounded up)."""
ASSUMED_PIXELS_PER_SLICE = 512 * 512
"""Slice size assumed when sizing memory (discovery does not read Rows and Columns)."""
PREFETCH_SHARE = 0.75
"""Share of the available memory a series decoded ahead may take (the rest is left to the
series in flight, the other software of the workstation and the page cache)."""


def series_bytes(n_slices: int) -> int:
    """Peak resident bytes of a series of ``n_slices`` (assumed 512 x 512) in flight."""
    return n_slices * ASSUMED_PIXELS_PER_SLICE * BYTES_PER_VOXEL


def room_to_prefetch(n_slices: int) -> bool:
    """Whether a series of ``n_slices`` can be decoded ahead, beside the one in flight:
    within :data:`PREFETCH_SHARE` of the memory available now (``True`` when it cannot be
    read)."""
    available = available_memory_bytes()
    if available is None:
        return True
    need = series_bytes(n_slices)
    if need <= PREFETCH_SHARE * available:
        return True
    log.info(
        "the next series (%d slices, about %.1f GiB) is decoded after this one is written: "
        "%.1f GiB of memory available",
        n_slices,
        need / 2**30,
        available / 2**30,
    )
    return False
