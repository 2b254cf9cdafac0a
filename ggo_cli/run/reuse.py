"""Whether an earlier run's result of a series still stands, and that result rebuilt.

A stored series is reused when its files, the model and the output-changing options are the
same and its outputs are all in place (:func:`reusable`); a deterministic failure stands until
the files change, a transient one is retried (:func:`retryable`). :func:`still_arriving`
holds back a series whose files are still being copied (``--settle``).
"""

from __future__ import annotations

import time
from typing import Any

from .. import __version__
from ..analysis.quality import parse_flags
from ..config import (
    SC_FOLDER,
    SC_GRADCAM_FOLDER,
    SR_NAME,
    ExplainMode,
    RunConfig,
    ScMode,
    SegFrames,
)
from ..domain import GgoMeasurement, LungMeasurement, SeriesInfo, SeriesOutcome, SeriesStatus
from ..onnx.model_info import ModelInfo
from ..writers.sc_render import MONTAGE_NAME
from .outcomes import RETRY_NOTE
from .state import StoredSeries

WORKER_DIED = "the worker process died"
"""How :mod:`ggo_cli.run.series_pool` starts the message of a series whose worker died."""


def output_options(cfg: RunConfig, model: ModelInfo) -> dict[str, Any]:
    """The options that change a series' outputs (a change reprocesses the series)."""
    options: dict[str, Any] = {
        "ggo_cli": __version__,
        "threshold": model.threshold if cfg.threshold is None else cfg.threshold,
        "png": cfg.png_mode.value,
        "seg_series_number": cfg.seg_series_number,
        "seg_series_description": cfg.seg_series_description,
        "spacing_tolerance": cfg.selection.spacing_tolerance,
        "explain": (
            None
            if cfg.explain is ExplainMode.OFF
            else [cfg.explain_layer, cfg.explain_slices]
            + ([] if cfg.explain_target == "ggo" else [cfg.explain_target])
        ),
        "lung_mask": cfg.lung_mask,
        "precision": cfg.precision.value,
    }
    # Keys absent when default, so that series stored before the option existed stay reusable
    # (a series stored before the SR and SC existed lacks their files: see outputs_present).
    if cfg.seg_frames is not SegFrames.ALL:
        options["seg_frames"] = cfg.seg_frames.value
    if not cfg.sr:
        options["sr"] = False
    if cfg.sc_mode is not ScMode.MONTAGE:
        options["sc"] = cfg.sc_mode.value
    return options


def outputs_present(cfg: RunConfig, row: dict[str, str]) -> bool:
    """Whether a stored series' SEG, and its SR, SC montage and GradCAM++ SC when asked for,
    are in place (a series stored before an object existed, or whose file was deleted, is
    written again)."""
    seg_path = row.get("seg_path", "")
    seg = cfg.out_dir / seg_path
    if not seg_path or not seg.is_file():
        return False
    folder = seg.parent
    if cfg.sr and not (folder / SR_NAME).is_file():
        return False
    if cfg.sc_mode is ScMode.NONE:
        return True
    if not (folder / SC_FOLDER / MONTAGE_NAME).is_file():
        return False
    explained = cfg.explain is ExplainMode.WITH_SEGMENT and (
        cfg.explain_slices == "all" or row.get("ggo_slice_count", "0") not in ("", "0")
    )
    return not explained or any((folder / SC_GRADCAM_FOLDER).glob("*.dcm"))


def still_arriving(
    series: SeriesInfo, settle_minutes: float, *, seen_before: str, seen_now: str
) -> bool:
    """Whether a file of the series was modified within the last ``settle_minutes``.

    A modification time in the future (a modality's clock ahead, ``cp -p`` from such a
    machine) says nothing about when the file arrived: such a series is settled once a
    previous run saw it exactly as now (same files, sizes and modification times,
    :func:`~ggo_cli.run.state.settle_digest`), i.e. one run later, not on that future date.
    """
    if settle_minutes <= 0:
        return False
    newest = 0.0
    for path in series.files:
        try:
            newest = max(newest, path.stat().st_mtime)
        except OSError:
            continue
    now = time.time()
    if newest > now:
        return seen_before != seen_now
    return now - newest < settle_minutes * 60


def retryable(stored: StoredSeries) -> bool:
    """Whether a stored failure may pass on another try (write error, crash, dead worker)."""
    message = stored.row.get("message", "")
    return message.endswith(RETRY_NOTE) or message.startswith(WORKER_DIED)


def outcome_from_row(series: SeriesInfo, stored: StoredSeries) -> SeriesOutcome:
    """A SeriesOutcome for a series reused from the state store (nothing recomputed)."""
    row = stored.row
    measurement = None
    if row.get("ggo_voxels"):
        measurement = GgoMeasurement(
            voxel_volume_ml=float(row["voxel_volume_ml"]),
            ggo_voxels=int(row["ggo_voxels"]),
            ggo_volume_ml=float(row["ggo_volume_ml"]),
            ggo_slice_count=int(row["ggo_slice_count"] or 0),
        )
    lungs = None
    if row.get("lung_volume_ml"):
        lungs = LungMeasurement(
            **{name: float(row.get(name) or "nan") for name in LungMeasurement.__dataclass_fields__}
        )
    return SeriesOutcome(
        series=series,
        status=SeriesStatus(stored.status),
        message=row.get("message", ""),
        n_slices=int(row.get("n_slices") or 0),
        measurement=measurement,
        lungs=lungs,
        processed_at=row.get("processed_at", ""),
        reused=True,
        qc_flags=parse_flags(row.get("qc_flags", "")),  # a store older than the column: none
    )


def reusable(
    stored: StoredSeries, cfg: RunConfig, fingerprint: str, model: ModelInfo, options: str
) -> bool:
    """Whether an earlier run's result still stands (same files, model, options; SEG, SR and
    SC present)."""
    if cfg.force:
        return False
    if (stored.fingerprint, stored.model_sha256, stored.options_digest) != (
        fingerprint,
        model.file_sha256,
        options,
    ):
        return False
    if stored.status == SeriesStatus.OK.value:
        return outputs_present(cfg, stored.row)
    # A deterministic failure stands until the files change; a transient one is retried.
    return stored.status == SeriesStatus.FAILED.value and not retryable(stored)
