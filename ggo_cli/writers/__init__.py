"""Output writers: DICOM-SEG (highdicom), the CSV of GGO volumes and overlay PNGs (Pillow).

Every writer is atomic (:mod:`ggo_cli.atomic_output`) and raises :class:`ggo_cli.errors.OutputError`
when its output cannot be written or fails its read-back check.
"""

from __future__ import annotations

from .dicom_sc import write_sc
from .dicom_seg import build_seg, verify_seg, write_seg
from .dicom_sr import build_sr, verify_sr, write_sr
from .overlay_png import write_overlay
from .report_csv import CSV_COLUMNS
from .slice_png import write_slice_pngs

__all__ = [
    "CSV_COLUMNS",
    "build_seg",
    "build_sr",
    "verify_seg",
    "verify_sr",
    "write_overlay",
    "write_sc",
    "write_seg",
    "write_sr",
    "write_slice_pngs",
]
