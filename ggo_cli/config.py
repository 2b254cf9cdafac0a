"""Run configuration: one frozen :class:`RunConfig` of typed, checked values, built once by
:func:`ggo_cli.cli.build.build_run_config`.

Precedence: command-line option > environment variable (``GGO_MODEL``, ``GGO_DEVICE``) > the
defaults below. Nothing here reads or writes ``os.environ``; Typer resolves the variables.
The ``--device`` value (:class:`DeviceRequest`) is defined in :mod:`ggo_cli.device_request`
and re-exported here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from .device_request import ALL_GPUS as ALL_GPUS
from .device_request import DeviceKind as DeviceKind
from .device_request import DeviceRequest as DeviceRequest
from .errors import DeviceError, InputError
from .fsutil import OutputTree
from .host import GpuDevice, visible_gpus
from .onnx.precision import Precision

if TYPE_CHECKING:  # for the annotation only: config is imported before everything else
    from .delivery.deliver import Target

ENV_MODEL = "GGO_MODEL"
ENV_DEVICE = "GGO_DEVICE"

DEFAULT_MODEL_NAME = "ggo-resnet50-unet"
DEFAULT_MODEL_RELPATH = Path("exported_models") / DEFAULT_MODEL_NAME / "model.onnx"

MIN_SLICES = 10
"""Fewest slices a series needs to be analysed (thin slabs and scouts are not chest CTs)."""
AXIAL_TOLERANCE_DEG = 10.0
"""Largest angle between the slice normal and the patient's feet-head axis accepted as axial."""
SPACING_TOLERANCE = 0.05
"""Largest relative deviation of any slice gap from the median gap (5 %)."""
SPACING_ABS_TOLERANCE_MM = 0.01
"""Gaps may always differ by this much (positions are stored as decimal strings)."""

SEG_SERIES_NUMBER = 9901
SEG_SERIES_DESCRIPTION = "GGO AI segmentation - research use only"
SERIES_NUMBER_MAX = 2**31 - 1
"""Largest SeriesNumber of a series ggo-cli writes (SEG, SR, SC): DICOM IS, 1 to 2**31 - 1."""
SERIES_DESCRIPTION_MAX_CHARS = 64
"""Longest SeriesDescription of a series ggo-cli writes: DICOM LO (no backslash, no control
characters)."""
SETTLE_MINUTES = 0.0
"""Default of ``--settle``: none, so a folder copied by hand is processed at once. Scheduled
runs on a folder that a PACS export is still filling pass ``--settle 5`` (README)."""
ENV_PSEUDONYM_SALT = "GGO_PSEUDONYM_SALT"
CSV_NAME = "ggo_volumes.csv"
MANIFEST_NAME = "run_manifest.json"
SEG_NAME = "ggo.seg.dcm"
SR_NAME = "ggo.sr.dcm"
SC_FOLDER = "sc"
"""The series folder's subfolder of the overlay as DICOM Secondary Capture (``montage.dcm``,
``slice_NNNN.dcm``)."""
SC_GRADCAM_FOLDER = "sc_gradcam"
"""The series folder's subfolder of the GradCAM++ figures as a second Secondary Capture series
(``gradcam_NNNN.dcm``; ``segment --explain`` with an SC mode other than ``none``)."""
OVERLAY_NAME = "overlay.png"
TREND_NAME = "trend.png"
"""The patient's trend picture, beside the outputs of the patient's latest study's series."""
GRADCAM_NPZ_NAME = "gradcam.npz"
GRADCAM_FOLDER = "gradcam"


def gradcam_names(target: str = "ggo") -> tuple[str, str]:
    """The maps' file and the figures' folder of an explained class in a series folder:
    ``gradcam.npz`` and ``gradcam/`` for GGO, ``gradcam_<target>.npz`` and
    ``gradcam_<target>/`` for another (``ggo-cli explain --target consolidation``), so that
    explaining one class never overwrites or mixes with the other's figures."""
    if target == "ggo":
        return GRADCAM_NPZ_NAME, GRADCAM_FOLDER
    return f"gradcam_{target}.npz", f"gradcam_{target}"

CPU_BATCH_SIZE = 1
"""Slices per batch on the CPU in float32. A batch of 4 took the same CPU seconds per slice on
the 2-core CPU but held 0.9 GB more of ONNX Runtime's activations (0.2 GB at 1): the difference
between a 1000-slice series fitting in 2 GB or not (docs/benchmarks.md, issue 18)."""
CPU_INT8_BATCH_SIZE = 4
"""Slices per batch on the CPU with the int8 variant (its activations are a quarter of float32's:
a batch of 4 holds about 0.26 GB)."""
CUDA_BATCH_SIZE = 16


_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda)(?::(all|\d+(?:,\d+)*))?$")


def parse_device(
    value: str | DeviceRequest,
    *,
    list_gpus: Callable[[], tuple[GpuDevice, ...] | None] | None = None,
) -> DeviceRequest:
    """Parse ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``cuda:N,M,...`` or ``cuda:all`` (a
    parsed value is returned as is).

    ``cuda:all`` is resolved here, once, to the GPUs this process sees; a list is checked
    against them. ``cuda:N`` alone is checked when its session starts, as before
    (:func:`ggo_cli.onnx.runtime.create_session`).

    Args:
        value: the ``--device`` value.
        list_gpus: lists the GPUs this process sees (returning ``None`` when they cannot be
            listed); called only for ``cuda:all`` and lists. Default:
            :func:`ggo_cli.host.visible_gpus`.

    Returns:
        The request.

    Raises:
        InputError: bad syntax, a GPU listed twice, or a listed GPU that does not exist.
        DeviceError: ``cuda:all`` or a list on a host without a visible GPU, or ``cuda:all``
            where the GPUs cannot be listed (no ``nvidia-smi``).
    """
    if isinstance(value, DeviceRequest):
        return value
    text = "".join(value.split()).lower()
    match = _DEVICE_PATTERN.match(text)
    if match is None or (match.group(1) != "cuda" and match.group(2) is not None):
        raise InputError(
            f"invalid --device {value!r}; use auto, cpu, cuda or cuda:N (several GPUs: "
            "cuda:N,M,... or cuda:all)"
        )
    kind, selector = DeviceKind(match.group(1)), match.group(2)
    if selector is None:
        return DeviceRequest(kind)
    if selector.isdigit():
        return DeviceRequest(kind, int(selector))
    visible = (list_gpus or visible_gpus)()
    if selector == ALL_GPUS:
        return DeviceRequest(kind, gpus=_all_gpus(text, visible), all_gpus=True)
    gpus = tuple(int(n) for n in selector.split(","))
    twice = sorted({n for n in gpus if gpus.count(n) > 1})
    if twice:
        raise InputError(
            f"--device {text}: GPU {twice[0]} is listed twice; name each GPU once "
            "(more workers per GPU: raise --jobs)"
        )
    _check_listed(text, gpus, visible)
    return DeviceRequest(kind, gpus=gpus)


def _all_gpus(text: str, visible: tuple[GpuDevice, ...] | None) -> tuple[int, ...]:
    """The ordinals ``cuda:all`` stands for (raises DeviceError when there are none)."""
    if visible is None:
        raise DeviceError(
            f"--device {text}: the GPUs cannot be listed (nvidia-smi is missing or fails); "
            "name them instead, e.g. --device cuda:0,1"
        )
    _check_listed(text, (), visible)
    return tuple(gpu.ordinal for gpu in visible)


def _check_listed(
    text: str, gpus: tuple[int, ...], visible: tuple[GpuDevice, ...] | None
) -> None:
    """Raise when no GPU is visible or a listed one does not exist (nothing is checked when
    the GPUs cannot be listed: each session start checks its own then)."""
    if visible is None:
        return
    if not visible:
        raise DeviceError(
            f"--device {text}: no NVIDIA GPU is visible (nvidia-smi, CUDA_VISIBLE_DEVICES); "
            "use --device cpu or auto"
        )
    missing = [n for n in gpus if n not in {gpu.ordinal for gpu in visible}]
    if missing:
        seen = ", ".join(gpu.label for gpu in visible)
        raise InputError(
            f"--device {text}: there is no GPU {missing[0]}; this process sees {seen} "
            "(as CUDA numbers them, after CUDA_VISIBLE_DEVICES; `ggo-cli info` lists them)"
        )


class ExplainMode(Enum):
    """Whether a run writes GradCAM++ maps: not at all, besides the SEG (``segment
    --explain``), or only them (``ggo-cli explain``: no SEG, CSV or state)."""

    OFF = "off"
    WITH_SEGMENT = "with_segment"
    ONLY = "only"


class SegFrames(StrEnum):
    """``--seg-frames``: which frames a SEG holds.

    ``all`` (default): one frame per slice and segment, so an empty SEG still says "analysed,
    nothing found" and every viewer can page through it with the CT. ``nonempty``: only frames
    with a segmented pixel (a SEG without any keeps all its frames), far fewer frames for
    viewers that refuse large SEGs (e.g. Weasis 4.6 and later skip SEGs over 400 frames).
    """

    ALL = "all"
    NONEMPTY = "nonempty"


class ScMode(StrEnum):
    """``--sc``: the overlay as an RGB Secondary Capture series, for viewers without SEG support.

    ``montage`` (default): one image, the montage of ``overlay.png`` with the volumes burned
    in; ``slices``: the montage and one image per slice with GGO; ``none``: no SC.
    """

    MONTAGE = "montage"
    SLICES = "slices"
    NONE = "none"


class PngMode(StrEnum):
    """Which PNGs ``segment`` writes per series."""

    OVERLAY = "overlay"
    ALL = "all"
    NONE = "none"


def default_model_path() -> Path:
    """Return where the shipped default model lives in a checkout (or editable install).

    Returns:
        ``<checkout>/exported_models/ggo-resnet50-unet/model.onnx``; the file may not exist.
    """
    return Path(__file__).resolve().parent.parent / DEFAULT_MODEL_RELPATH


@dataclass(frozen=True, slots=True)
class SelectionRules:
    """The explicit rules that decide which series are chest CT volumes to analyse.

    Attributes:
        min_slices: fewest distinct instances a series needs.
        axial_tolerance_deg: largest tilt of the slice normal from the patient z axis.
        spacing_tolerance: largest relative deviation of a slice gap from the median gap.
        series_uids: when not empty, only these SeriesInstanceUIDs are considered.
    """

    min_slices: int = MIN_SLICES
    axial_tolerance_deg: float = AXIAL_TOLERANCE_DEG
    spacing_tolerance: float = SPACING_TOLERANCE
    series_uids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything one ``segment`` run needs; immutable once built.

    Attributes:
        inputs: files or folders to search for DICOM.
        out_dir: the output folder (created if missing; never inside an input).
        model_path: the ONNX model file.
        device: the parsed ``--device``.
        batch_size: slices per inference batch; ``None`` picks a per-device default.
        threshold: probability threshold; ``None`` takes the model's.
        selection: the series selection rules.
        png_mode: which PNGs to write.
        include_patient_id: write PatientID into the CSV (off by default).
        seg_series_number: SeriesNumber of every SEG written.
        seg_frames: which frames every SEG holds (``--seg-frames``).
        seg_series_description: SeriesDescription of every SEG written.
        settle_minutes: series with a file modified this recently are left for a later run
            (0: none).
        force: reprocess every series even when the state store shows it done.
        pseudonym_salt: when set, the CSV gets a salted SHA-256 pseudonym of PatientID.
        explain: whether GradCAM++ maps (``gradcam.npz``, ``gradcam/slice_NNNN.png``) are
            written, besides the SEG or alone (``ggo-cli explain``: no SEG, CSV, state).
        explain_layer: the explained layer; ``None`` takes the explain graph's default.
        explain_slices: ``ggo`` (slices with predicted GGO), ``target`` (slices with the
            explained class) or ``all``.
        explain_target: the explained class, ``ggo`` or ``consolidation`` (``ggo-cli explain
            --target``; ``segment --explain`` explains GGO).
        precision: ``auto``, ``fp32``, ``fp16`` (CUDA) or ``int8`` (CPU)
            (:class:`ggo_cli.onnx.precision.Precision`).
        decode_workers: processes that decode pixel data (``None``: one per usable core, at
            most 8, none on a single core; 0: decode in the main process).
        jobs: series processed at once, each whole in its own worker process (``None``: 1 on
            the CPU; on a GPU one per two usable cores, at most 8, within the host's and the
            GPU's memory; see :func:`ggo_cli.run.series_pool.auto_jobs`).
        lung_mask: segment the lungs, keep GGO inside them, report lung volumes and GGO per
            lung, and add the lungs to the SEG (``--no-lung-mask`` turns all of it off).
        group_readable: output files ``0640`` and folders ``0750`` (``--group-readable``)
            instead of owner-only ``0600`` / ``0700`` (:mod:`ggo_cli.fsutil`).
        sr: write the TID 1500 measurement report ``ggo.sr.dcm`` beside each SEG (``--no-sr``
            turns it off).
        sc_mode: which Secondary Capture images of the overlay are written (``--sc``).
        targets: where the DICOM objects are sent and which kinds each receives (``--send``,
            ``GGO_SEND``, ``GGO_SEND_CONFIG``: :func:`ggo_cli.delivery.settings.resolve_targets`);
            empty: nothing is sent.
        ray_address: run the to-do series on a Ray cluster (``--ray``): ``auto`` (the running
            cluster this host belongs to), ``local`` (a cluster started for the run, stopped
            after it) or ``HOST:PORT`` of a head node; ``None``: on this host
            (:mod:`ggo_cli.run.ray_executor`).
        ray_ship: with ``ray_address``, ship each series' files, the model and the explain
            graph to the actors through Ray's object store and bring the outputs back to the
            driver, which writes them (``--ray-ship``: no filesystem shared with the nodes);
            otherwise every node reads and writes the driver's paths.
    """

    inputs: tuple[Path, ...]
    out_dir: Path
    model_path: Path
    device: DeviceRequest = DeviceRequest()
    batch_size: int | None = None
    threshold: float | None = None
    selection: SelectionRules = SelectionRules()
    png_mode: PngMode = PngMode.OVERLAY
    include_patient_id: bool = False
    seg_series_number: int = SEG_SERIES_NUMBER
    seg_frames: SegFrames = SegFrames.ALL
    seg_series_description: str = SEG_SERIES_DESCRIPTION
    settle_minutes: float = SETTLE_MINUTES
    force: bool = False
    pseudonym_salt: str | None = None
    explain: ExplainMode = ExplainMode.OFF
    explain_layer: str | None = None
    explain_slices: str = "ggo"
    explain_target: str = "ggo"
    lung_mask: bool = True
    precision: Precision = Precision.AUTO
    decode_workers: int | None = None
    jobs: int | None = None
    group_readable: bool = False
    sr: bool = True
    sc_mode: ScMode = ScMode.MONTAGE
    targets: tuple[Target, ...] = ()
    ray_address: str | None = None
    ray_ship: bool = False

    @property
    def explain_only(self) -> bool:
        """Whether the run writes GradCAM++ maps only (no SEG, CSV or state)."""
        return self.explain is ExplainMode.ONLY

    @property
    def tree(self) -> OutputTree:
        """The output folder with its permissions; every output is written through it."""
        return OutputTree(self.out_dir, self.group_readable)

    @property
    def patient_column(self) -> str | None:
        """Which patient column the CSV gets: ``patient_id``, ``patient_pseudonym`` or none."""
        if self.pseudonym_salt is not None:
            return "patient_pseudonym"
        return "patient_id" if self.include_patient_id else None
