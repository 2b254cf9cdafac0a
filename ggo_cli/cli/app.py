"""The ``ggo-cli`` command line: the commands, their progress display and the error boundary.

Options become a :class:`~ggo_cli.config.RunConfig` in :mod:`ggo_cli.cli.build`. The ``guarded``
boundary here is the only place that catches :class:`~ggo_cli.errors.GgoError`; only ``cli/``
prints to stdout or exits. Exit codes: 0 all series ok (and delivered); 2 bad input or
option; 3 no eligible series; 4 every eligible series failed; 5 model or device error; 6 output
error; 7 some series failed while others succeeded; 8 another run holds the output folder; 9
every series ok but results not yet delivered to a destination (queued); 1 an unexpected error
(a bug).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec

import typer

from .. import __version__
from ..analysis.explain_target import ExplainSlices, ExplainTarget
from ..config import (
    AXIAL_TOLERANCE_DEG,
    MIN_SLICES,
    SEG_SERIES_DESCRIPTION,
    SEG_SERIES_NUMBER,
    SETTLE_MINUTES,
    SPACING_TOLERANCE,
    ExplainMode,
    PngMode,
    RunConfig,
    ScMode,
    SegFrames,
    SelectionRules,
)
from ..delivery.settings import resolve_targets
from ..domain import SeriesStatus
from ..errors import (
    EXIT_BUG,
    EXIT_UNDELIVERED,
    GgoError,
    NoEligibleSeriesError,
    OutputError,
)
from ..logs import configure_logging, level_from_flags, quiet_pydicom
from ..onnx.precision import Precision
from ..run.deliveries import report_lines
from .build import build_run_config
from .demo import demo_command
from .display import (
    all_pending_note,
    exit_code,
    progress_display,
    review_lines,
    stderr_console,
    summary_table,
)
from .info import info_command
from .options import (
    AxialToleranceOpt,
    BatchOpt,
    CallingAeOpt,
    DecodeWorkersOpt,
    DeviceOpt,
    ExplainOpt,
    ForceOpt,
    GroupReadableOpt,
    IncludePatientIdOpt,
    InputsArg,
    JobsOpt,
    JsonOpt,
    LayerOpt,
    LungMaskOpt,
    MinSlicesOpt,
    ModelOpt,
    NoProgressOpt,
    OutOpt,
    PngOpt,
    PrecisionOpt,
    PseudonymizeOpt,
    RayOpt,
    RayShipOpt,
    ScOpt,
    SegFramesOpt,
    SegSeriesDescriptionOpt,
    SegSeriesNumberOpt,
    SendConfigOpt,
    SendObjectsOpt,
    SendOpt,
    SeriesOpt,
    SettleOpt,
    SlicesOpt,
    SpacingToleranceOpt,
    SrOpt,
    TargetOpt,
    ThresholdOpt,
)
from .report import report_after_run, report_command
from .send import send_command

log = logging.getLogger(__name__)
P = ParamSpec("P")

app = typer.Typer(
    name="ggo-cli",
    help=(
        "Ground-glass opacity (GGO) segmentation and volumetry for chest CT.\n\n"
        "Research use only: outputs are not a diagnosis."
    ),
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class _State:
    debug: bool = False


_state = _State()


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ggo-cli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More log detail (-vv).")
    ] = 0,
    quiet: Annotated[
        int, typer.Option("--quiet", "-q", count=True, help="Only warnings (-qq: errors).")
    ] = 0,
    log_file: Annotated[
        Path | None, typer.Option("--log-file", help="Also log to this file (rotated at 10 MiB).")
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks of unexpected errors.")
    ] = False,
) -> None:
    """Ground-glass opacity segmentation for chest CT (research use only)."""
    try:
        configure_logging(level_from_flags(verbose + (1 if debug else 0), quiet), log_file=log_file)
    except OSError as exc:  # logging is not set up yet: say it plainly and stop
        typer.echo(
            f"cannot open the log file {log_file}: {exc.strerror or exc} (a link there is "
            "refused; choose a writable --log-file)",
            err=True,
        )
        raise typer.Exit(OutputError.exit_code) from None
    # Malformed values are reported by pydicom with their content (dates, names): keep them out.
    quiet_pydicom()
    _state.debug = debug


def guarded(command: Callable[P, int]) -> Callable[P, None]:
    """Wrap a command body in the error boundary, the one place errors become exit codes.

    The body returns its exit code (0: success); a :class:`~ggo_cli.errors.GgoError` exits
    with its code after a one-line message, Ctrl-C with 130, anything else (a bug) with 1
    (the traceback only with ``--debug``).
    """

    @functools.wraps(command)
    def boundary(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            code = command(*args, **kwargs)
        except GgoError as exc:
            log.error("%s", exc)
            raise typer.Exit(exc.exit_code) from None
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            log.error("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            log.error(
                "unexpected %s: %s (a bug; rerun with --debug for the traceback)",
                type(exc).__name__,
                exc,
            )
            if _state.debug:
                log.exception("traceback")
            raise typer.Exit(EXIT_BUG) from None
        if code:
            raise typer.Exit(code)

    return boundary


def _run_and_report(cfg: RunConfig, *, show_progress: bool, as_json: bool) -> int:
    from ..run.manifest import summary_json
    from ..run.runner import run_segment

    with report_after_run(cfg), progress_display(show_progress, 0) as sink:
        result = run_segment(cfg, progress=sink)
    if sys.stderr.isatty():
        stderr_console.print(summary_table(result.outcomes))
    if as_json:
        typer.echo(json.dumps(summary_json(result), indent=2))
    else:
        typer.echo(str(result.csv_path))
    for line in review_lines(result.outcomes):  # flagged series, also in cron logs
        log.warning("%s", line)
    for level, line in report_lines(result.deliveries):
        log.log(level, "%s", line)
    code = exit_code(result.outcomes, delivered=result.delivered)
    pending_note = all_pending_note(result.outcomes, cfg.settle_minutes)
    if pending_note is not None:
        log.warning("%s", pending_note)
    if code == NoEligibleSeriesError.exit_code:
        log.error(
            "no eligible CT series among %d found (%d files); see %s for the reasons",
            len(result.outcomes),
            result.discovery.n_files,
            result.csv_path or "the messages above",
        )
    elif code == EXIT_UNDELIVERED:
        log.error(
            "every series is done, but results are not yet delivered (exit %d); they stay "
            "queued for the next run",
            code,
        )
    elif code != 0:
        log.error(
            "%d of %d series failed; see %s",
            sum(o.status is SeriesStatus.FAILED for o in result.outcomes),
            len(result.outcomes),
            result.csv_path or "the messages above",
        )
    return code


@app.command(
    epilog=(
        "Examples:\n\n"
        "  ggo-cli segment /data/studies --out results\n\n"
        "  ggo-cli segment study1 study2 --out results --device cuda --batch-size 32 --json\n\n"
        "  ggo-cli -v --log-file ggo.log segment /data/studies -o results --png all"
    )
)
@guarded
def segment(
    inputs: InputsArg,
    out: OutOpt,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    threshold: ThresholdOpt = None,
    png: PngOpt = PngMode.OVERLAY,
    seg_frames: SegFramesOpt = SegFrames.ALL,
    sr: SrOpt = True,
    sc: ScOpt = ScMode.MONTAGE,
    series: SeriesOpt = None,
    min_slices: MinSlicesOpt = MIN_SLICES,
    axial_tolerance: AxialToleranceOpt = AXIAL_TOLERANCE_DEG,
    spacing_tolerance: SpacingToleranceOpt = SPACING_TOLERANCE,
    include_patient_id: IncludePatientIdOpt = False,
    series_number: SegSeriesNumberOpt = SEG_SERIES_NUMBER,
    series_description: SegSeriesDescriptionOpt = SEG_SERIES_DESCRIPTION,
    settle: SettleOpt = SETTLE_MINUTES,
    force: ForceOpt = False,
    pseudonymize: PseudonymizeOpt = False,
    explain: ExplainOpt = False,
    layer: LayerOpt = None,
    slices: SlicesOpt = ExplainSlices.GGO,
    lung_mask: LungMaskOpt = True,
    precision: PrecisionOpt = Precision.AUTO,
    decode_workers: DecodeWorkersOpt = None,
    jobs: JobsOpt = None,
    ray: RayOpt = None,
    ray_ship: RayShipOpt = False,
    group_readable: GroupReadableOpt = False,
    send: SendOpt = None,
    send_objects: SendObjectsOpt = None,
    send_config: SendConfigOpt = None,
    calling_ae_title: CallingAeOpt = None,
    no_progress: NoProgressOpt = False,
    as_json: JsonOpt = False,
) -> int:
    """Segment GGO in every chest CT series found below INPUTS.

    Writes per series <out>/<StudyInstanceUID>/<SeriesInstanceUID>/ggo.seg.dcm (DICOM-SEG),
    ggo.sr.dcm (SR measurement report), sc/montage.dcm (overlay as Secondary Capture) and
    overlay.png, plus <out>/ggo_volumes.csv (one row per CT series) and <out>/run_manifest.json.
    With --send (or GGO_SEND, GGO_SEND_CONFIG) the DICOM objects go to the PACS; what cannot be
    delivered stays queued for the next run (exit 9).
    """

    targets = resolve_targets(
        send or (),
        objects=send_objects,
        config_file=send_config,
        calling_ae_title=calling_ae_title,
    )
    cfg = build_run_config(
        inputs,
        out,
        model=model,
        device=device,
        batch_size=batch_size,
        threshold=threshold,
        selection=SelectionRules(
            min_slices=min_slices,
            axial_tolerance_deg=axial_tolerance,
            spacing_tolerance=spacing_tolerance,
            series_uids=tuple(series or ()),
        ),
        png=png,
        seg_frames=seg_frames,
        sr=sr,
        sc=sc,
        include_patient_id=include_patient_id,
        series_number=series_number,
        series_description=series_description,
        settle=settle,
        force=force,
        pseudonymize=pseudonymize,
        explain=ExplainMode.WITH_SEGMENT if explain else ExplainMode.OFF,
        layer=layer,
        slices=slices,
        lung_mask=lung_mask,
        precision=precision,
        decode_workers=decode_workers,
        jobs=jobs,
        group_readable=group_readable,
        targets=targets,
        ray=ray,
        ray_ship=ray_ship,
    )
    return _run_and_report(cfg, show_progress=not no_progress, as_json=as_json)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  ggo-cli explain /data/studies --out results\n\n"
        "  ggo-cli explain /data/studies --out results --slices all --layer decoder.2\n\n"
        "  ggo-cli explain /data/studies --out results --target consolidation"
    )
)
@guarded
def explain(
    inputs: InputsArg,
    out: OutOpt,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    threshold: ThresholdOpt = None,
    layer: LayerOpt = None,
    target: TargetOpt = ExplainTarget.GGO,
    slices: SlicesOpt = ExplainSlices.TARGET,
    series: SeriesOpt = None,
    min_slices: MinSlicesOpt = MIN_SLICES,
    settle: SettleOpt = SETTLE_MINUTES,
    lung_mask: LungMaskOpt = True,
    jobs: JobsOpt = None,
    group_readable: GroupReadableOpt = False,
    no_progress: NoProgressOpt = False,
    as_json: JsonOpt = False,
) -> int:
    """Draw GradCAM++ heat maps of what drove each GGO call (or consolidation call, with
    --target consolidation), with ONNX Runtime alone.

    Writes per series <out>/<StudyInstanceUID>/<SeriesInstanceUID>/gradcam.npz (cam, mask,
    sop_instance_uids) and gradcam/slice_NNNN.png (CT | segmentation | GradCAM++). Needs
    explain.onnx next to the model. Does not write SEG, CSV or state (use segment --explain).
    """

    cfg = build_run_config(
        inputs,
        out,
        model=model,
        device=device,
        batch_size=batch_size,
        threshold=threshold,
        selection=SelectionRules(min_slices=min_slices, series_uids=tuple(series or ())),
        png=PngMode.NONE,
        settle=settle,
        explain=ExplainMode.ONLY,
        layer=layer,
        slices=slices,
        target=target,
        lung_mask=lung_mask,
        jobs=jobs,
        group_readable=group_readable,
    )
    return _run_and_report(cfg, show_progress=not no_progress, as_json=as_json)


app.command(epilog="Example:\n\n  ggo-cli demo --out demo-results", name="demo")(
    guarded(demo_command)
)
app.command(name="info")(guarded(info_command))
app.command(
    epilog=(
        "Examples:\n\n"
        "  ggo-cli send results --send dicom://PACS@pacs.example.org:104\n\n"
        "  GGO_DICOMWEB_TOKEN_FILE=/etc/ggo/token ggo-cli send results "
        "--send https://pacs.example.org/dicom-web --force"
    ),
    name="send",
)(guarded(send_command))
app.command(epilog="Example:\n\n  ggo-cli report results", name="report")(guarded(report_command))
