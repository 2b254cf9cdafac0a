"""``ggo-cli info``: what this installation can do (providers, decoders, model integrity)."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import default_model_path
from ..errors import EXIT_UNDELIVERED, GgoError, ModelError, OutputError
from .options import CallingAeOpt, JsonOpt, ModelOpt, SendConfigOpt, SendOpt

TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
}
_PACKAGES = (
    "ggo-cli",
    "numpy",
    "pydicom",
    "highdicom",
    "SimpleITK",
    "onnx",
    "onnxruntime-gpu",
    "onnxruntime",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pyjpegls",
    "python-gdcm",
    "pillow",
    "typer",
    "rich",
)


def decoder_status() -> dict[str, list[str]]:
    """Map each transfer syntax name to the pydicom decoding plugins available for it."""
    from pydicom.pixels import get_decoder  # type: ignore[attr-defined]
    from pydicom.uid import UID

    status: dict[str, list[str]] = {}
    for uid, name in TRANSFER_SYNTAXES.items():
        decoder = get_decoder(UID(uid))
        status[f"{name} ({uid})"] = (
            sorted(decoder.available_plugins) if decoder.is_encapsulated else ["native"]
        )
    return status


def model_status(path: Path) -> dict[str, Any]:
    """Validate a model file; report its identity or the contract violation."""
    from ..onnx.model_info import load_model_info

    try:
        info = load_model_info(path)
    except GgoError as exc:
        return {"path": str(path), "ok": False, "error": str(exc)}
    return {
        "path": str(path),
        "ok": True,
        "name": info.name,
        "version": info.version,
        "architecture": info.architecture,
        "graph_sha256_verified": info.recorded_sha256,
        "file_sha256": info.file_sha256,
        "input_size": info.input_size,
        "threshold": info.threshold,
        "training_data": info.metadata.get("training_data"),
        "int8": int8_status(info),
    }


def int8_status(info: Any) -> dict[str, Any] | None:
    """Whether ``--precision auto`` runs an int8 variant on this CPU, which one, and why.

    Builds the CPU segmenter as ``segment`` would: the recipes for this CPU are rebuilt (a few
    seconds each) and checked against float32 on the reference slices unless this machine's
    verdict is cached (see :mod:`ggo_cli.onnx.variant_check`). When ``auto`` runs float32, also what
    ``--precision int8`` would run here and its verdict (``if_forced``). ``None`` when no int8
    recipe is beside the model.
    """
    import onnxruntime as ort

    from ..analysis.segmenter import OnnxSegmenter
    from ..config import DeviceKind, DeviceRequest
    from ..onnx.int8_recipes import cpu_flag_set, load_int8_spec
    from ..onnx.precision import Precision
    from ..onnx.verdict_cache import VerdictCache

    # One set of verdicts for both segmenters, so that the forced int8 one reuses a verdict
    # the automatic one has just settled (``self_check.cached`` as a run reports it).
    verdicts = VerdictCache()
    try:
        spec = load_int8_spec(info)
        if spec is None:
            return None
        flags = cpu_flag_set()
        status: dict[str, Any] = {
            "recipe_file": str(spec.path),
            "this_onnxruntime": ort.__version__,
            "recipes": [
                {
                    "name": r.name,
                    "cpu_any": list(r.cpu_any),
                    "fits_this_cpu": r.fits(flags),
                    "test_dice_change": r.dice_change,
                    "speedup_where_validated": r.speedup,
                    "validated_with_onnxruntime": r.onnxruntime,
                    "validated_on_cpu": r.measured_on,
                }
                for r in spec.recipes
            ],
        }
        segmenter = OnnxSegmenter(info, device=DeviceRequest(DeviceKind.CPU), verdicts=verdicts)
    except GgoError as exc:
        return {"used_on_cpu": False, "error": str(exc)}
    status["used_on_cpu"] = segmenter.precision is Precision.INT8
    status["recipe_used"] = segmenter.int8_recipe
    check = segmenter.variant_check
    status["self_check"] = check.to_dict() if check is not None else None
    if not status["used_on_cpu"]:
        # What --precision int8 would do here: the recipe for this CPU and its self-check.
        try:
            forced = OnnxSegmenter(
                info,
                device=DeviceRequest(DeviceKind.CPU),
                precision=Precision.INT8,
                verdicts=verdicts,
            )
        except GgoError as exc:
            status["if_forced"] = {"error": str(exc)}
        else:
            verdict = forced.variant_check
            status["if_forced"] = {
                "recipe": forced.int8_recipe,
                "self_check": verdict.to_dict() if verdict is not None else None,
            }
    return status


def collect_info(model_path: Path) -> dict[str, Any]:
    """Everything ``ggo-cli info`` reports.

    Args:
        model_path: the model to check.

    Returns:
        A JSON-serialisable report.
    """
    import onnxruntime as ort

    from ..host import nvidia_gpu_visible

    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "versions": versions,
        "platform": platform.platform(),
        "onnxruntime_providers": ort.get_available_providers(),
        "nvidia_gpu_visible": nvidia_gpu_visible(),
        "gpus": gpu_status(),
        "decoders": decoder_status(),
        "host": host_status(),
        "model": model_status(model_path),
    }


def gpu_status() -> dict[str, Any]:
    """The NVIDIA GPUs this process sees, numbered as ``--device cuda:N`` numbers them
    (``nvidia-smi``'s list narrowed and renumbered by ``CUDA_VISIBLE_DEVICES``:
    :func:`ggo_cli.host.visible_gpus`), and the devices ``--device cuda:all`` would use
    (``None`` when the GPUs cannot be listed)."""
    import os

    from ..host import CUDA_VISIBLE_ENV, visible_gpus

    gpus = visible_gpus()
    return {
        "cuda_visible_devices": os.environ.get(CUDA_VISIBLE_ENV),
        "cuda_all": None if gpus is None else [gpu.label for gpu in gpus],
        "devices": [
            {
                "device": gpu.label,
                "name": gpu.name,
                "uuid": gpu.uuid,
                "memory_gib": (
                    None if gpu.memory_bytes is None else round(gpu.memory_bytes / 2**30, 1)
                ),
            }
            for gpu in gpus or ()
        ],
    }


def host_status() -> dict[str, Any]:
    """Cores and memory, and the ``--jobs`` that ``segment`` would choose for 300-slice series
    with ``--device auto`` and, where several GPUs are seen, with ``--device cuda:all`` (see
    :func:`ggo_cli.run.series_pool.jobs_for`)."""
    from ..config import DeviceKind, DeviceRequest
    from ..host import (
        available_memory_bytes,
        gpu_memory_bytes,
        nvidia_gpu_visible,
        usable_cores,
        visible_gpus,
    )
    from ..run.series_pool import jobs_for

    memory = available_memory_bytes()
    status: dict[str, Any] = {
        "usable_cores": usable_cores(),
        "memory_available_gib": None if memory is None else round(memory / 2**30, 1),
    }
    if nvidia_gpu_visible():
        gpu = gpu_memory_bytes(0)
        status["gpu0_memory_gib"] = None if gpu is None else round(gpu / 2**30, 1)
    status["auto_jobs_300_slices"] = jobs_for(DeviceRequest(), largest_slices=300)
    gpus = visible_gpus() or ()
    if len(gpus) > 1:
        every = DeviceRequest(DeviceKind.CUDA, gpus=tuple(g.ordinal for g in gpus), all_gpus=True)
        status["auto_jobs_300_slices_cuda_all"] = jobs_for(every, largest_slices=300)
    return status


def output_status(folder: Path) -> dict[str, Any]:
    """Whether ``folder`` can hold ggo-cli outputs (created if missing, probed with a file)."""
    from ..fsutil import ensure_writable_dir

    try:
        ensure_writable_dir(folder)
    except GgoError as exc:
        return {"path": str(folder), "writable": False, "error": str(exc)}
    return {"path": str(folder), "writable": True}


def destination_status(
    send: list[str] | None, send_config: Path | None, calling_ae_title: str | None
) -> list[dict[str, Any]]:
    """Check each configured destination as a send would reach it: C-ECHO for a DICOM peer, a
    QIDO-RS search for a DICOMweb server (no object is sent).

    Raises:
        InputError: a bad destination or configuration (exit 2).
    """
    from ..delivery.destinations import DimseDestination
    from ..delivery.dicomweb import check_stow
    from ..delivery.dimse import echo_dimse
    from ..delivery.settings import resolve_targets

    targets = resolve_targets(send or (), config_file=send_config,
                              calling_ae_title=calling_ae_title)
    found = []
    for target in targets:
        dest = target.destination
        ok, detail = echo_dimse(dest) if isinstance(dest, DimseDestination) else check_stow(dest)
        found.append({
            "destination": target.key,
            "objects": sorted(kind.value for kind in target.kinds),
            "reachable": ok,
            "detail": detail,
        })
    return found


def info_command(
    model: ModelOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Also check that this output folder is writable."),
    ] = None,
    send: SendOpt = None,
    send_config: SendConfigOpt = None,
    calling_ae_title: CallingAeOpt = None,
    as_json: JsonOpt = False,
) -> int:
    """Check this installation: versions, ONNX Runtime providers, DICOM decoders, the model's
    integrity against its recorded sha256, (with --out) write access, and (with --send,
    --send-config, GGO_SEND or GGO_SEND_CONFIG) each destination: C-ECHO or a DICOMweb search.

    Exit code 0 when all is well, 5 when the model is broken, 6 when --out is not writable, 9
    when a destination does not answer.
    """

    report: dict[str, Any] = collect_info(model or default_model_path())
    if out is not None:
        report["output_folder"] = output_status(out)
    destinations = destination_status(send, send_config, calling_ae_title)
    if destinations:
        report["destinations"] = destinations
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            typer.echo(f"{key}: {json.dumps(value)}")
    if not report["model"].get("ok"):
        return ModelError.exit_code
    if out is not None and not report["output_folder"]["writable"]:
        return OutputError.exit_code
    if not all(entry["reachable"] for entry in destinations):
        return EXIT_UNDELIVERED
    return 0
