"""The command-line options that several ``ggo-cli`` commands share, as typer annotations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..analysis.explain_target import ExplainSlices, ExplainTarget
from ..config import ENV_DEVICE, ENV_MODEL, ENV_PSEUDONYM_SALT, PngMode, ScMode, SegFrames
from ..onnx.precision import Precision

InputsArg = Annotated[
    list[Path],
    typer.Argument(help="DICOM files or folders, searched recursively (any layout, any names)."),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (outside the input).")]
ModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--model", "-m", envvar=ENV_MODEL, help="ONNX model (default: the shipped ResNet-50U-Net)."
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        "-d",
        envvar=ENV_DEVICE,
        help=(
            "auto, cpu, cuda or cuda:N; several GPUs: cuda:N,M,... or cuda:all (the --jobs "
            "workers spread over them; N as CUDA numbers GPUs, after CUDA_VISIBLE_DEVICES). "
            "Parsed and checked before any work."
        ),
    ),
]
BatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size", "-b", min=1, help="Slices per batch (default 16 on CUDA; CPU: 1, int8 4)."
    ),
]
ThresholdOpt = Annotated[
    float | None,
    typer.Option(
        "--threshold", min=0.0, max=1.0, help="Probability threshold (default: the model's)."
    ),
]
LayerOpt = Annotated[
    str | None,
    typer.Option(
        "--layer", help="Layer to explain (default: the explain graph's, see docs/explain.md)."
    ),
]
SlicesOpt = Annotated[
    ExplainSlices,
    typer.Option(
        "--slices",
        help="ggo: slices with predicted GGO; target: slices with the explained class "
        "(--target); all: every slice.",
    ),
]
TargetOpt = Annotated[
    ExplainTarget,
    typer.Option(
        "--target",
        help="Class whose predicted voxels the heat map explains: ggo, or consolidation (a "
        "model with a consolidation channel and an explain graph exported for it).",
    ),
]
PrecisionOpt = Annotated[
    Precision,
    typer.Option(
        "--precision",
        help="auto: fp16 on CUDA, int8 on the CPU, each only where it agrees with fp32 on this "
        "machine (self-check on the model's reference slices, cached), else fp32; or fp32, "
        "fp16 (CUDA), int8 (CPU): an error (exit 5) where the self-check fails.",
    ),
]
DecodeWorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--decode-workers",
        min=0,
        help="Processes decoding compressed pixel data (default: one per core, at most 8; "
        "0: one process). Uncompressed data is read in the main process.",
    ),
]
JobsOpt = Annotated[
    int | None,
    typer.Option(
        "--jobs",
        "-j",
        min=1,
        help="Series processed at once, each in its own worker process with its own model "
        "session (default: 1 on the CPU; on a GPU one per two cores, at most 8, as memory "
        "allows).",
    ),
]
RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="ADDRESS",
        help="Run the series on a Ray cluster (needs the ray extra; docs/scaling.md): auto "
        "(the cluster this host joined with 'ray start'), HOST:PORT of its head, or local (a "
        "cluster on this host for the run). Inputs, model and --out must be at the same paths "
        "on every node; --jobs is then actors per node.",
    ),
]
RayShipOpt = Annotated[
    bool,
    typer.Option(
        "--ray-ship",
        help="With --ray: send each series' files and the model to the nodes through Ray's "
        "object store and write the outputs here, for nodes that do not share the driver's "
        "filesystem (docs/scaling.md).",
    ),
]
LungMaskOpt = Annotated[
    bool,
    typer.Option(
        "--lung-mask/--no-lung-mask",
        help="Keep GGO inside a lung mask, report lung volumes and GGO % per lung, add the "
        "lungs to the SEG (default on).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help="No progress bars.")]
PngOpt = Annotated[
    PngMode,
    typer.Option(
        "--png", help="overlay: one montage per series; all: also one PNG per GGO slice; none."
    ),
]
SegFramesOpt = Annotated[
    SegFrames,
    typer.Option(
        "--seg-frames",
        help="all: one SEG frame per slice and segment (an empty SEG still says 'nothing "
        "found'); nonempty: only frames with a segmented pixel (fewer frames, for viewers that "
        "refuse large SEGs).",
    ),
]
SrOpt = Annotated[
    bool,
    typer.Option(
        "--sr/--no-sr",
        help="Write ggo.sr.dcm, a DICOM SR measurement report (TID 1500) of the volumes beside "
        "each SEG (default on).",
    ),
]
ScOpt = Annotated[
    ScMode,
    typer.Option(
        "--sc",
        help="The overlay as DICOM Secondary Capture in sc/, for viewers without SEG support: "
        "montage (one image, default), slices (also one per slice with GGO) or none.",
    ),
]
SendOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--send",
        help="Send the SEG, SR and SC to a PACS (repeatable): dicom://AE_TITLE@host:port "
        "(C-STORE) or https://host/dicom-web (STOW-RS). Default: GGO_SEND. Credentials and TLS "
        "come from the environment (README 'Sending results to the PACS').",
    ),
]
SendObjectsOpt = Annotated[
    str | None,
    typer.Option(
        "--send-objects",
        help="Which objects the --send destinations receive: a comma list of seg, sr, sc, or "
        "all (default).",
    ),
]
SendConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--send-config",
        help="TOML file of destinations, each with its own objects (default: GGO_SEND_CONFIG).",
    ),
]
CallingAeOpt = Annotated[
    str | None,
    typer.Option(
        "--calling-ae-title",
        help="This side's AE title in DICOM associations (default: GGO_CALLING_AE_TITLE, the "
        "config file's, else GGO_CLI).",
    ),
]
SeriesOpt = Annotated[
    list[str] | None,
    typer.Option("--series", help="Only these SeriesInstanceUIDs (repeatable)."),
]
MinSlicesOpt = Annotated[
    int, typer.Option("--min-slices", min=2, help="Fewest slices for a series to be analysed.")
]
AxialToleranceOpt = Annotated[
    float,
    typer.Option(
        "--axial-tolerance",
        min=0.0,
        max=90.0,
        help="Largest tilt (degrees) of the slice normal from the patient z axis.",
    ),
]
SpacingToleranceOpt = Annotated[
    float,
    typer.Option(
        "--spacing-tolerance",
        min=0.0,
        max=1.0,
        help="Largest relative deviation of a slice gap from the median gap.",
    ),
]
IncludePatientIdOpt = Annotated[
    bool,
    typer.Option("--include-patient-id", help="Add PatientID to the CSV (off by default)."),
]
GroupReadableOpt = Annotated[
    bool,
    typer.Option(
        "--group-readable",
        help="Make the outputs readable by the output folder's group (files 0640, folders "
        "0750) instead of by their owner only (0600, 0700); they hold patient data.",
    ),
]
SegSeriesNumberOpt = Annotated[
    int,
    typer.Option(
        "--seg-series-number", help="SeriesNumber of the SEG objects (1 to 2147483647)."
    ),
]
SegSeriesDescriptionOpt = Annotated[
    str,
    typer.Option(
        "--seg-series-description",
        help="SeriesDescription of the SEG objects (max 64 characters).",
    ),
]
SettleOpt = Annotated[
    float,
    typer.Option(
        "--settle",
        min=0.0,
        help="Leave series with a file modified in the last N minutes for a later run (0: "
        "none; for a folder that a PACS export is still filling, e.g. 5).",
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Reprocess every series, even unchanged ones, and check the model variant "
        "against float32 again even if this machine's verdict is cached.",
    ),
]
PseudonymizeOpt = Annotated[
    bool,
    typer.Option(
        "--pseudonymize",
        help=f"Add a salted SHA-256 pseudonym of PatientID to the CSV (salt from "
        f"{ENV_PSEUDONYM_SALT}).",
    ),
]
ExplainOpt = Annotated[
    bool,
    typer.Option("--explain", help="Also write GradCAM++ heat maps (one decode for both)."),
]
