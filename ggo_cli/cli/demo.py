"""``ggo-cli demo``: segment a synthetic study and compare with the phantom's known GGO."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pydicom
import typer

from ..onnx.precision import Precision
from ..synthetic.phantom import Phantom
from .build import build_run_config
from .display import exit_code, progress_display, stderr_console, summary_table
from .options import DeviceOpt, ForceOpt, JsonOpt, ModelOpt, NoProgressOpt, OutOpt, PrecisionOpt
from .report import report_after_run

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DemoCheck:
    """How the segmentation of the synthetic study compares with its truth.

    Attributes:
        true_ggo_ml: the phantom's GGO volume in mL.
        measured_ggo_ml: the volume read back from the SEG in mL.
        dice: Dice overlap of the SEG's GGO segment with the true GGO mask.
        true_lung_ml: the phantom's lung volume in mL (right, left).
        measured_lung_ml: the SEG's right and left lung segments in mL (``None`` without them).
    """

    true_ggo_ml: float
    measured_ggo_ml: float
    dice: float
    true_lung_ml: tuple[float, float] = (0.0, 0.0)
    measured_lung_ml: tuple[float, float] | None = None


def compare_with_truth(phantom: Phantom, paths: Sequence[Path], seg_path: Path) -> DemoCheck:
    """Read the SEG back and compare its GGO segment with the phantom's mask.

    Args:
        phantom: the phantom written.
        paths: the files written, ``paths[k]`` holding phantom slice ``k``.
        seg_path: the SEG ``segment`` wrote for that series.

    Returns:
        True and measured volume and the Dice overlap.
    """
    import highdicom as hd

    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    predicted = pixels[..., 0].astype(bool)
    truth = np.asarray(phantom.ggo_mask, dtype=bool)
    total = int(predicted.sum()) + int(truth.sum())
    dice = 2.0 * int(np.logical_and(predicted, truth).sum()) / total if total else 1.0
    labels = {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}
    measured_lungs = None
    if "Right lung" in labels and "Left lung" in labels:
        lungs = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids,
            segment_numbers=[labels["Right lung"], labels["Left lung"]],
        )
        right, left = (int(lungs[..., k].astype(bool).sum()) for k in (0, 1))
        measured_lungs = (right * phantom.voxel_volume_ml, left * phantom.voxel_volume_ml)
    return DemoCheck(
        true_ggo_ml=phantom.ggo_volume_ml,
        measured_ggo_ml=int(predicted.sum()) * phantom.voxel_volume_ml,
        dice=dice,
        true_lung_ml=(phantom.lung_right_volume_ml, phantom.lung_left_volume_ml),
        measured_lung_ml=measured_lungs,
    )


def demo_command(
    out: OutOpt = Path("ggo-demo-results"),
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    slices: Annotated[
        int, typer.Option("--slices", min=10, max=400, help="Slices of the synthetic study.")
    ] = 48,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic study.")] = 0,
    precision: PrecisionOpt = Precision.AUTO,
    force: ForceOpt = False,
    study_dir: Annotated[
        Path | None,
        typer.Option(
            "--study-dir",
            help="Keep the synthetic DICOM study here (default: a scratch folder in the cache "
            "folder, removed after the run).",
        ),
    ] = None,
    no_progress: NoProgressOpt = False,
    as_json: JsonOpt = False,
) -> int:
    """Write a synthetic chest CT study (with GGO of known volume) as DICOM and segment it.

    Needs no data and no network: a quick check that an installation works end to end.
    """

    from ..run.manifest import summary_json
    from ..run.runner import run_segment
    from ..scratch import scratch_folder
    from ..synthetic.ct_writer import write_ct_series
    from ..synthetic.phantom import make_chest_phantom

    # The synthetic study goes to the documented cache folder's scratch (swept if killed).
    with scratch_folder("demo-", redirect_tempfile=False) as tmp:
        folder = study_dir or tmp / "study"
        # Every option is checked before the synthetic study is written.
        cfg = build_run_config(
            [folder], out, model=model, device=device, precision=precision, force=force
        )
        phantom = make_chest_phantom(shape=(slices, 512, 512), seed=seed)
        paths = write_ct_series(phantom, folder, seed=seed)
        log.info(
            "synthetic study: %d slices, true GGO volume %.2f mL", slices, phantom.ggo_volume_ml
        )
        with report_after_run(cfg), progress_display(not no_progress, 1) as sink:
            result = run_segment(cfg, progress=sink)
        code = exit_code(result.outcomes)
        (outcome,) = result.outcomes
        check = None
        if outcome.seg_path is not None:
            check = compare_with_truth(phantom, paths, outcome.seg_path)
            log.info(
                "demo: true GGO %.2f mL, measured %.2f mL, Dice %.3f (a synthetic phantom; "
                "the model was trained on real COVID-19 CT)",
                check.true_ggo_ml,
                check.measured_ggo_ml,
                check.dice,
            )
            if check.measured_lung_ml is not None:
                log.info(
                    "demo: lungs true %.0f + %.0f mL (right + left), measured %.0f + %.0f mL",
                    *check.true_lung_ml,
                    *check.measured_lung_ml,
                )
    if sys.stderr.isatty():
        stderr_console.print(summary_table(result.outcomes))
    if as_json:
        summary = summary_json(result)
        if check is not None:
            summary["demo"] = {
                "true_ggo_ml": round(check.true_ggo_ml, 3),
                "measured_ggo_ml": round(check.measured_ggo_ml, 3),
                "dice": round(check.dice, 4),
                "true_lung_ml": [round(v, 1) for v in check.true_lung_ml],
                "measured_lung_ml": (
                    [round(v, 1) for v in check.measured_lung_ml]
                    if check.measured_lung_ml is not None
                    else None
                ),
            }
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo(str(result.csv_path))
    if code:
        log.error("demo failed: %s", outcome.message or outcome.status.value)
    return code
