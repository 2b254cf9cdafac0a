"""The Ray actor of a run: one ONNX Runtime session, whole series one at a time.

:class:`SeriesActor` is a plain class; :mod:`ggo_cli.run.ray_executor` wraps it with
``ray.remote`` when a run uses Ray, so this module imports no Ray. Its set-up is that of a
``--jobs`` worker (:mod:`ggo_cli.run.series_pool`): pydicom quiet, its share of the cores for
SimpleITK and the CPU session, and :class:`~ggo_cli.onnx.sessions.Sessions` that create the
session on the first series and keep it, so the model is loaded once per actor. Each series
goes through :func:`~ggo_cli.run.pipeline.process_series`, which writes the outputs
atomically into the shared output folder.

With ``--ray-ship`` the model arrives through the object store and each series as its files'
bytes (:mod:`ggo_cli.run.ray_ship`): the actor works in scratch folders of its node and returns
the files it wrote, which the driver writes into ``--out``.

The actor's log records are kept while a series runs and returned with its outcome; the
driver hands them to its own loggers (its handlers, filters and ``--log-file``), as the
``--jobs`` pool relays its workers' records. Ray's own forwarding of worker output is off.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

import SimpleITK

from ..config import RunConfig
from ..domain import SeriesInfo, SeriesOutcome
from ..errors import ModelError
from ..host import HostLimits
from ..logs import quiet_pydicom
from ..onnx.explain_graph import ExplainInfo
from ..onnx.model_info import ModelInfo, file_sha256
from ..onnx.sessions import Sessions
from ..scratch import scratch_folder
from .ray_plan import ActorSlot
from .ray_ship import (
    ShippedFile,
    ShippedModel,
    ShippedSeries,
    collect_outputs,
    unpack_model,
    unpack_series,
)
from .result import SessionSummary
from .series_pool import run_series, summarize

VISIBLE_GPUS_ENV = "CUDA_VISIBLE_DEVICES"
"""Where Ray names the GPUs it gave an actor (physical ids on the node)."""


@dataclass(frozen=True, slots=True)
class ActorResult:
    """One series done by an actor.

    Attributes:
        outcome: the series' outcome (as in one process).
        summary: where the actor's inference ran (``None`` if its session was never made).
        node_id: the Ray node the actor ran on.
        hostname: that node's host name.
        device: where the series' inference ran, with the node's own GPU number (``cuda:3``,
            ``cpu``; ``""`` if no session was made).
        started_s: wall clock (``time.time()``, the node's clock) when the series started.
        ended_s: wall clock when it ended.
        records: the log records the series produced in the actor.
        files: with ``--ray-ship``, the files the series wrote (paths relative to ``--out``).
    """

    outcome: SeriesOutcome
    summary: SessionSummary | None
    node_id: str
    hostname: str
    device: str
    started_s: float
    ended_s: float
    records: tuple[logging.LogRecord, ...] = ()
    files: tuple[ShippedFile, ...] = ()


def node_device(summary: SessionSummary | None) -> str:
    """The session's device as the node numbers it: Ray narrows ``CUDA_VISIBLE_DEVICES`` to
    the actor's GPU, which the session calls ``cuda:0``."""
    if summary is None:
        return ""
    visible = os.environ.get(VISIBLE_GPUS_ENV, "").split(",")
    if summary.device.startswith("cuda") and len(visible) == 1 and visible[0].strip().isdigit():
        return f"cuda:{visible[0].strip()}"
    return summary.device


class _RecordBuffer(logging.Handler):
    """Keeps the records of the series in progress, made safe to pickle."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep ``record`` with its message formatted and its traceback as text."""
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg = record.getMessage()
        record.args = None
        record.exc_info = None
        self.records.append(record)

    def take(self) -> tuple[logging.LogRecord, ...]:
        """The records kept so far; the buffer starts empty again."""
        taken, self.records = tuple(self.records), []
        return taken


class SeriesActor:
    """Runs whole series with one session (created on the first series, then kept).

    Args:
        cfg: the run configuration as the actor uses it (its device; no destinations).
        model: the validated model; its file must be at the same path on the actor's node.
        explain_info: the validated explain graph, or ``None``.
        slot: where the actor was placed and the cores it has.
        level: the driver's level of the ``ggo_cli`` logger.
        shipped_model: with ``--ray-ship``, the model's files (written into a scratch folder
            kept while the actor lives); ``None``: the model is at the driver's path.
    """

    def __init__(
        self,
        cfg: RunConfig,
        model: ModelInfo,
        explain_info: ExplainInfo | None,
        slot: ActorSlot,
        level: int,
        shipped_model: ShippedModel | None = None,
    ) -> None:
        quiet_pydicom()
        sitk: Any = SimpleITK  # no type hints in SimpleITK
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(slot.cores)
        self._buffer = _RecordBuffer()
        root = logging.getLogger()
        for handler in list(root.handlers):  # Ray's worker handlers: records go to the driver
            root.removeHandler(handler)
        root.addHandler(self._buffer)
        root.setLevel(logging.WARNING)
        logging.getLogger("ggo_cli").setLevel(level)
        logging.captureWarnings(True)
        self._slot = slot
        self._model_checked = False
        self._scratch = ExitStack()
        if shipped_model is not None:
            folder = self._scratch.enter_context(
                scratch_folder("ggo-ray-model-", redirect_tempfile=False)
            )
            model, explain_info = unpack_model(folder, shipped_model, model, explain_info)
            cfg = replace(cfg, model_path=model.path)
        self._sessions = Sessions(cfg, model, explain_info, limits=HostLimits(slot.cores, True))

    def _check_model(self) -> None:
        """The model file on this node must be the driver's (a shared path, same bytes)."""
        model = self._sessions.model
        try:
            digest = file_sha256(model.path)
        except OSError as exc:
            raise ModelError(
                f"model {model.path.name}: not readable on Ray node {self._slot.hostname} "
                f"({exc.strerror}); every node needs the model at the driver's path"
            ) from None
        if digest != model.file_sha256:
            raise ModelError(
                f"model {model.path.name} on Ray node {self._slot.hostname} differs from the "
                f"driver's (sha256 {digest[:12]}... against {model.file_sha256[:12]}...); "
                "install the same model on every node"
            )
        self._model_checked = True

    def close(self) -> None:
        """Remove the actor's scratch folder (the shipped model); the driver asks at the end
        of the run. An actor killed before is swept by the next scratch folder on its node."""
        self._scratch.close()

    def ready(self) -> bool:
        """Answers once the actor has started (its constructor ran); the driver sends no
        series to an actor before."""
        return True

    def process(self, series: SeriesInfo) -> ActorResult:
        """Run one whole series (decode, lungs, inference, outputs written atomically).

        Raises:
            OutputError: the output folder cannot be written (the run stops).
            ModelError: the model differs on this node, or the session cannot be made.
        """
        self._buffer.take()
        started = time.time()
        if not self._model_checked:
            self._check_model()
        return self._result(run_series(self._sessions, series), started)

    def process_shipped(self, shipped: ShippedSeries) -> ActorResult:
        """Run one series shipped through the object store (``--ray-ship``): its files are
        written into a scratch folder, its outputs go into another and are returned.

        Raises:
            OutputError, ModelError: as :meth:`process`.
        """
        self._buffer.take()
        started = time.time()
        if not self._model_checked:
            self._check_model()
        with scratch_folder("ggo-ray-series-", redirect_tempfile=False) as work:
            local = unpack_series(work / "in", shipped)
            cfg = replace(self._sessions.cfg, out_dir=work / "out")
            outcome = run_series(self._sessions, local, cfg=cfg)
            outcome, files = collect_outputs(cfg.out_dir, outcome, shipped.series)
        return self._result(outcome, started, files)

    def _result(
        self, outcome: SeriesOutcome, started: float, files: tuple[ShippedFile, ...] = ()
    ) -> ActorResult:
        summary = summarize(self._sessions)
        return ActorResult(
            outcome=outcome,
            summary=summary,
            node_id=self._slot.node_id,
            hostname=self._slot.hostname,
            device=node_device(summary),
            started_s=started,
            ended_s=time.time(),
            records=self._buffer.take(),
            files=files,
        )
