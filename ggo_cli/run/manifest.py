"""The run manifest (JSON) and the ``--json`` summary: versions, model, device, counts, timings.

Neither ever holds patient data or input paths: series are named by UID and the digest of
their folder (:attr:`ggo_cli.domain.SeriesInfo.folder_id`), and messages have the series' paths,
folder and file names replaced (:meth:`ggo_cli.domain.SeriesInfo.redact`). JSON escapes control
characters itself.

Where each series ran: with ``--jobs`` above 1 every series' outcome comes back from its worker
as a :class:`PlacedOutcome` that names the worker's device (``cuda:2``), and the manifest lists
it per series (``device``) and counts the series per device; in one process every series ran
on the run's one device. The CSV does not change.
"""

from __future__ import annotations

import math
import platform
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from importlib import metadata
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..analysis.quality import QcFlag
from ..config import RunConfig
from ..domain import SeriesOutcome, SeriesStatus

if TYPE_CHECKING:
    from .result import RunResult

_VERSIONED_PACKAGES = ("numpy", "pydicom", "highdicom", "onnxruntime-gpu", "onnxruntime", "pillow")


@dataclass(frozen=True, slots=True)
class PlacedOutcome(SeriesOutcome):
    """A series' outcome with the device it ran on, as a ``--jobs`` worker or a Ray actor
    returns it.

    Attributes:
        device: the label of the device of the worker's session (``cuda:2``, ``cpu``; on Ray
            as its node numbers it); ``""`` when unknown.
        node: on Ray, the host name of the node that ran it; ``""`` otherwise.
    """

    device: str = ""
    node: str = ""


def place(outcome: SeriesOutcome, device: str, *, node: str = "") -> PlacedOutcome:
    """``outcome`` with the ``device`` (and Ray ``node``) it ran on (every other field
    unchanged)."""
    values = {f.name: getattr(outcome, f.name) for f in fields(SeriesOutcome)}
    return PlacedOutcome(**values, device=device, node=node)


def series_device(outcome: SeriesOutcome, result: RunResult) -> str | None:
    """Where a series was processed in this run: its worker's device (``--jobs`` above 1),
    else the run's one device; ``None`` for a series not processed (skipped, pending,
    unchanged from an earlier run) or whose worker died with it."""
    if outcome.reused or outcome.status in (SeriesStatus.SKIPPED, SeriesStatus.PENDING):
        return None
    if isinstance(outcome, PlacedOutcome):
        return outcome.device or None
    if result.jobs > 1:
        return None  # lost with its worker: not a PlacedOutcome
    return result.session.device or None


def series_per_device(result: RunResult) -> dict[str, int]:
    """How many series each device processed in this run, by device label."""
    devices = Counter(series_device(o, result) for o in result.outcomes)
    return {label: devices[label] for label in sorted(d for d in devices if d is not None)}


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    versions = {"ggo-cli": __version__, "python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def build_manifest(cfg: RunConfig, result: RunResult, started_at: str) -> dict[str, Any]:
    """The run manifest: versions, model, device, counts, timings; no patient data."""
    model = result.model
    return {
        "tool": "ggo-cli",
        "started_at": started_at,
        "finished_at": _now(),
        "versions": _versions(),
        "host": {"platform": platform.platform(), "machine": platform.machine()},
        "options": {
            "device": str(cfg.device),
            "batch_size": cfg.batch_size,
            "precision": cfg.precision.value,
            "decode_workers": cfg.decode_workers,
            "jobs": cfg.jobs,
            "threshold": cfg.threshold,
            "png": cfg.png_mode.value,
            "lung_mask": cfg.lung_mask,
            "min_slices": cfg.selection.min_slices,
            "axial_tolerance_deg": cfg.selection.axial_tolerance_deg,
            "spacing_tolerance": cfg.selection.spacing_tolerance,
            "include_patient_id": cfg.include_patient_id,
            "seg_series_number": cfg.seg_series_number,
            "seg_frames": cfg.seg_frames.value,
            "sr": cfg.sr,
            "sc": cfg.sc_mode.value,
            "send": [
                {"destination": t.key, "objects": sorted(kind.value for kind in t.kinds)}
                for t in cfg.targets
            ],
        },
        "model": {
            "name": model.name,
            "version": model.version,
            "architecture": model.architecture,
            "path": str(model.path),
            "file_sha256": model.file_sha256,
            "graph_sha256": model.recorded_sha256,
            "threshold": model.threshold,
            "window_center_hu": model.window_center_hu,
            "window_width_hu": model.window_width_hu,
        },
        "device": {
            "requested": str(cfg.device),
            "used": result.session.device,
            "providers": list(result.session.providers),
            "batch_size": result.session.batch_size,
            "precision": result.session.precision,
            "int8_recipe": result.session.int8_recipe,
            "variant_check": result.session.variant_check,
            "jobs": result.jobs,
            "gpus": [str(one) for one in cfg.device.devices] if cfg.device.spread else None,
            "series_per_device": series_per_device(result),
        },
        "counts": {
            "files": result.discovery.n_files,
            "ct_instances": result.discovery.n_dicom_images,
            "ignored_files": result.discovery.n_ignored,
            "duplicate_instances": result.discovery.n_duplicates,
            "series": len(result.outcomes),
            "ok": result.count(SeriesStatus.OK),
            "skipped": result.count(SeriesStatus.SKIPPED),
            "failed": result.count(SeriesStatus.FAILED),
            "pending": result.count(SeriesStatus.PENDING),
            "unchanged": result.n_unchanged,
            "slices_segmented": sum(
                o.n_slices for o in result.outcomes if o.status is SeriesStatus.OK and not o.reused
            ),
        },
        "qc_flag_counts": qc_flag_counts(result.outcomes),
        "delivery": [report.to_dict() for report in result.deliveries],
        "timings_s": {k: round(v, 3) for k, v in result.timings_s.items()},
        "series": [
            {
                "study_instance_uid": o.series.study_instance_uid,
                "series_instance_uid": o.series.series_instance_uid,
                "folder_id": o.series.folder_id,
                "status": o.status.value,
                "reused": o.reused,
                "message": o.series.redact(o.message),
                "n_slices": o.n_slices,
                "ggo_volume_ml": o.measurement.ggo_volume_ml if o.measurement else None,
                "lung_volume_ml": o.lungs.lung_volume_ml if o.lungs else None,
                "ggo_percent_of_lung": _finite(o.lungs.ggo_percent_of_lung) if o.lungs else None,
                "qc_flags": list(o.qc_flags),
                "seconds": round(o.seconds, 3),
                "device": series_device(o, result),
                "node": (o.node or None) if isinstance(o, PlacedOutcome) else None,
            }
            for o in result.outcomes
        ],
    }


def qc_flag_counts(outcomes: Sequence[SeriesOutcome]) -> dict[str, int]:
    """Series per quality flag (every flag listed, 0 included; series reused from earlier runs
    counted, as in the CSV)."""
    return {flag.value: sum(flag.value in o.qc_flags for o in outcomes) for flag in QcFlag}


def _finite(value: float) -> float | None:
    """A float for JSON: ``None`` for nan (JSON has no nan)."""
    return value if math.isfinite(value) else None


def summary_json(result: RunResult) -> dict[str, Any]:
    """The ``--json`` stdout summary (no patient data)."""
    return {
        "csv": str(result.csv_path) if result.csv_path else None,
        "manifest": str(result.manifest_path) if result.manifest_path else None,
        "device": result.device,
        "counts": {
            "series": len(result.outcomes),
            "ok": result.count(SeriesStatus.OK),
            "skipped": result.count(SeriesStatus.SKIPPED),
            "failed": result.count(SeriesStatus.FAILED),
            "pending": result.count(SeriesStatus.PENDING),
            "unchanged": result.n_unchanged,
        },
        "delivery": [report.to_dict() for report in result.deliveries],
        "series": [
            {
                "study_instance_uid": o.series.study_instance_uid,
                "series_instance_uid": o.series.series_instance_uid,
                "folder_id": o.series.folder_id,
                "status": o.status.value,
                "message": o.series.redact(o.message),
                "ggo_volume_ml": o.measurement.ggo_volume_ml if o.measurement else None,
                "lung_volume_ml": o.lungs.lung_volume_ml if o.lungs else None,
                "ggo_percent_of_lung": _finite(o.lungs.ggo_percent_of_lung) if o.lungs else None,
                "qc_flags": list(o.qc_flags),
                "seg_path": str(o.seg_path) if o.seg_path else None,
            }
            for o in result.outcomes
        ],
    }
