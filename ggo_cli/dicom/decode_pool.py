"""The decode pool: worker processes that decode a series' files to HU slices.

Decoding can run in a :class:`DecodePool` (worker processes, one per usable core by default):
compressed pixel data (slow to decode, docs/benchmarks.md) is then decoded on every core, and
a series can be decoded while another one is segmented.
The workers die with the run, even when it is killed (``PR_SET_PDEATHSIG`` and a poll, as in
:mod:`ggo_cli.run.series_pool`).

Each file is read within the limit :func:`ggo_cli.dicom.volume.load_volume` gives it (the
header budget plus twice its announced pixel bytes: a deflated file is inflated no further)
and each slice is checked by :mod:`ggo_cli.dicom.slice_decoding`. A worker reads an uncompressed
file by :mod:`ggo_cli.dicom.native_pixels` (its header once, its pixels at the offset found).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from ..domain import HuArray
from ..errors import UnsupportedSeriesError
from ..logs import quiet_pydicom
from .budgets import read_bounded
from .native_pixels import native_hu, read_native_file
from .slice_decoding import hu_slice

log = logging.getLogger(__name__)


PARENT_POLL_S = 0.5
"""How often a decode worker checks that its run is still alive (besides the kernel's signal)."""


DECODE_CHUNK_SLICES = 8
class DecodeTask(NamedTuple):
    """One slice to decode.

    Attributes:
        path: the file.
        where: the series and instance, for messages.
        limit: the most bytes read of the file.
        native: :func:`~ggo_cli.dicom.volume.load_volume`'s native read of the slice, tried
            first in the calling thread (``None``: none; never sent to a worker process).
    """

    path: str
    where: str
    limit: int
    native: Callable[[], HuArray | None] | None = None


def _decode_file(task: DecodeTask) -> HuArray:
    """Read one file (at most ``task.limit`` bytes) and return its slice in HU. Runs in a
    :class:`DecodePool` process or in the calling thread. Uncompressed slices are read by
    :mod:`ggo_cli.dicom.native_pixels`, others by pydicom."""
    if task.native is not None:
        hu = task.native()
        if hu is not None:
            return hu
    path, where, limit, _ = task
    try:
        found = read_native_file(Path(path), limit)
        if found is None:
            ds = read_bounded(Path(path), limit_bytes=limit, stop_before_pixels=False)
    except UnsupportedSeriesError as exc:
        raise UnsupportedSeriesError(f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - unreadable file: the series fails
        log.debug("%s is %s", where, path)
        raise UnsupportedSeriesError(
            f"{where} cannot be read ({type(exc).__name__}); fix or remove the file"
        ) from None
    if found is not None:
        plan, header, stored = found
        return native_hu(plan, stored, header, where)
    return hu_slice(ds, where)


def _init_decoder(main_pid: int) -> None:
    """Decode-pool worker set-up: quiet pydicom, and die with the run (even by ``kill -9``)."""
    quiet_pydicom()
    _die_with_parent(main_pid)


def _die_with_parent(main_pid: int) -> None:
    """End this worker when the process that started the run ends (as
    :mod:`ggo_cli.run.series_pool` does for its workers).

    Linux: the kernel kills it when its parent (the forkserver, which exits with the run)
    dies (``PR_SET_PDEATHSIG``). As a second guard, and elsewhere, a thread polls the parent
    process id and the run's process.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the thread guards
            pass

    def alive() -> bool:
        try:
            os.kill(main_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # pragma: no cover - exists, owned by someone else
            return True
        return os.getppid() == parent

    if not alive():  # pragma: no cover - the run died before the guard was set
        os._exit(1)

    def watch() -> None:
        while alive():
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="ggo-parent-watch", daemon=True).start()


class DecodePool:
    """Worker processes that decode slices (a context manager).

    The processes start on first use (``forkserver`` on Linux, so they never inherit ONNX
    Runtime's threads; ``spawn`` elsewhere). A worker that dies (a decoder crash) fails only
    the series being decoded: the pool is rebuilt for the next one.

    Compressed pixel data (JPEG, JPEG-LS, JPEG 2000, RLE: native decoders) is always decoded
    in worker processes, whatever the series' length, so that a decoder crash never ends the
    run; with ``workers=0`` one process does it. Uncompressed and deflated data (pure Python
    and zlib) decode in the calling thread: read straight into the volume
    (:mod:`ggo_cli.dicom.native_pixels`), a 300-slice series took 0.2-0.3 s there against
    2.1-2.3 s of wall time through two workers, whose slices come back pickled (2-core CPU,
    issue 18; docs/benchmarks.md).

    Args:
        workers: number of processes; 0: only compressed data, in one process.
    """

    def __init__(self, workers: int) -> None:
        self.workers = max(0, workers)
        self._executor: ProcessPoolExecutor | None = None

    @staticmethod
    def runs(*, compressed: bool) -> bool:
        """Whether a series is decoded in the worker processes: only compressed pixel data."""
        return compressed

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else (
                "spawn"
            )
            self._executor = ProcessPoolExecutor(
                max_workers=max(1, self.workers),
                mp_context=multiprocessing.get_context(method),
                initializer=_init_decoder,
                initargs=(os.getpid(),),
            )
        return self._executor

    def iter_decode(
        self, tasks: Sequence[DecodeTask], series_uid: str
    ) -> Iterator[HuArray]:
        """Decode files to HU slices, yielded in order as they arrive.

        Args:
            tasks: one per slice (see :func:`_decode_file`).
            series_uid: for messages.

        Raises:
            UnsupportedSeriesError: a file cannot be read or decoded, or a worker died.
        """
        try:
            yield from self._pool().map(_decode_file, tasks, chunksize=DECODE_CHUNK_SLICES)
        except BrokenProcessPool as exc:
            self.close()
            raise UnsupportedSeriesError(
                f"series {series_uid}: a decoder process died while decoding its pixel data"
            ) from exc

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`decode` starts new ones)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def decode_slices(
    tasks: Sequence[DecodeTask],
    series_uid: str,
    *,
    pool: DecodePool | None,
    compressed: bool,
) -> Iterator[HuArray]:
    """Decode a series' files to HU slices, in order: in the pool's worker processes when it
    runs the series (:meth:`DecodePool.runs`), else in the calling thread.

    Args:
        tasks: one per slice, in slice order (see :func:`_decode_file`).
        series_uid: for messages.
        pool: the decode pool, or ``None`` to decode in the calling thread.
        compressed: whether the series' pixel data is encapsulated (decoded by a native
            library).

    Returns:
        The slices, each ``(rows, cols)`` in HU, yielded as they are decoded.

    Raises:
        UnsupportedSeriesError: a file cannot be read or decoded, or a worker died (raised
            while iterating).
    """
    if pool is not None and pool.runs(compressed=compressed):
        return pool.iter_decode([task._replace(native=None) for task in tasks], series_uid)
    return (_decode_file(task) for task in tasks)
