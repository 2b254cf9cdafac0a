"""Command-line values -> one checked :class:`~ggo_cli.config.RunConfig`.

Every option is parsed and checked here, once, before any lock is taken or any input is
walked: a bad value raises :class:`~ggo_cli.errors.InputError` (exit 2) with a one-line reason.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..analysis.explain_target import ExplainSlices, ExplainTarget
from ..config import (
    ENV_MODEL,
    ENV_PSEUDONYM_SALT,
    SEG_SERIES_DESCRIPTION,
    SEG_SERIES_NUMBER,
    SERIES_DESCRIPTION_MAX_CHARS,
    SERIES_NUMBER_MAX,
    SETTLE_MINUTES,
    ExplainMode,
    PngMode,
    RunConfig,
    ScMode,
    SegFrames,
    SelectionRules,
    default_model_path,
    parse_device,
)
from ..errors import InputError, ModelError
from ..onnx.precision import Precision

if TYPE_CHECKING:
    from ..delivery.deliver import Target

MIN_SALT_CHARS = 16
RAY_KEYWORDS = ("auto", "local")
"""``--ray auto`` (the cluster this host joined) and ``--ray local`` (one started for the run)."""
_RAY_HEAD = re.compile(r"^[A-Za-z0-9.-]+:\d{1,5}$")
DEFAULT_SELECTION = SelectionRules()


def build_run_config(
    inputs: Sequence[Path],
    out: Path,
    *,
    model: Path | None,
    device: str,
    selection: SelectionRules = DEFAULT_SELECTION,
    batch_size: int | None = None,
    threshold: float | None = None,
    png: PngMode = PngMode.OVERLAY,
    seg_frames: SegFrames = SegFrames.ALL,
    include_patient_id: bool = False,
    series_number: int = SEG_SERIES_NUMBER,
    series_description: str = SEG_SERIES_DESCRIPTION,
    settle: float = SETTLE_MINUTES,
    force: bool = False,
    pseudonymize: bool = False,
    explain: ExplainMode = ExplainMode.OFF,
    layer: str | None = None,
    slices: ExplainSlices = ExplainSlices.GGO,
    target: ExplainTarget = ExplainTarget.GGO,
    lung_mask: bool = True,
    precision: Precision = Precision.AUTO,
    decode_workers: int | None = None,
    jobs: int | None = None,
    group_readable: bool = False,
    sr: bool = True,
    sc: ScMode = ScMode.MONTAGE,
    targets: tuple[Target, ...] = (),
    ray: str | None = None,
    ray_ship: bool = False,
) -> RunConfig:
    """Build the run's configuration from the command line's values, checking each.

    Args:
        inputs: the INPUTS arguments.
        out: ``--out``.
        model: ``--model`` (``None``: the shipped default model, which must be present).
        device: ``--device`` as given.
        selection: the series selection rules.
        batch_size: ``--batch-size``.
        threshold: ``--threshold``.
        png: ``--png``.
        seg_frames: ``--seg-frames``.
        include_patient_id: ``--include-patient-id``.
        series_number: ``--seg-series-number``.
        series_description: ``--seg-series-description``.
        settle: ``--settle`` in minutes.
        force: ``--force``.
        pseudonymize: ``--pseudonymize`` (the salt is read from the environment).
        explain: whether GradCAM++ maps are written, besides the SEG or alone.
        layer: ``--layer``.
        slices: ``--slices``.
        target: ``--target`` (``ggo-cli explain``).
        lung_mask: ``--lung-mask/--no-lung-mask``.
        precision: ``--precision``.
        decode_workers: ``--decode-workers``.
        jobs: ``--jobs``.
        group_readable: ``--group-readable``.
        sr: ``--sr/--no-sr``.
        sc: ``--sc``.
        targets: the destinations (:func:`ggo_cli.delivery.settings.resolve_targets`).
        ray: ``--ray`` (the inputs, ``--out`` and the model are then made absolute, since the
            cluster's processes do not share the driver's working folder).
        ray_ship: ``--ray-ship`` (needs ``--ray``).

    Returns:
        The frozen, checked configuration.

    Raises:
        ModelError: no ``--model`` and the default model is missing.
        InputError: a bad ``--device``, SEG series option, pseudonym salt or ``--ray`` (a
            ``HOST:PORT`` where nothing answers included), or ``--ray-ship`` without ``--ray``.
    """
    model_path = resolve_model(model)
    ray_address = check_ray_address(ray)
    if ray_address is not None and ray_address not in RAY_KEYWORDS:
        from ..run.ray_executor import check_reachable

        check_reachable(ray_address)  # before discovery, which may take minutes
    if ray_ship and ray_address is None:
        raise InputError("--ray-ship needs --ray ADDRESS (the cluster the files are shipped to)")
    if ray_address is not None:
        inputs = [path.absolute() for path in inputs]
        out, model_path = out.absolute(), model_path.absolute()
    return RunConfig(
        inputs=tuple(inputs),
        out_dir=out,
        model_path=model_path,
        device=parse_device(device),
        batch_size=batch_size,
        threshold=threshold,
        selection=selection,
        png_mode=png,
        seg_frames=seg_frames,
        include_patient_id=include_patient_id,
        seg_series_number=check_series_number(series_number),
        seg_series_description=check_description(series_description),
        settle_minutes=settle,
        force=force,
        pseudonym_salt=pseudonym_salt(pseudonymize, include_patient_id),
        explain=explain,
        explain_layer=layer,
        explain_slices=slices.value,
        explain_target=target.value,
        lung_mask=lung_mask,
        precision=precision,
        decode_workers=decode_workers,
        jobs=jobs,
        group_readable=group_readable,
        sr=sr,
        sc_mode=sc,
        targets=targets,
        ray_address=ray_address,
        ray_ship=ray_ship,
    )


def check_ray_address(value: str | None) -> str | None:
    """``--ray``: ``auto``, ``local`` or ``HOST:PORT`` of a head node (``None``: no Ray).

    Raises:
        InputError: anything else (a ``ray://`` client address included: the driver must run
            where the shared paths are).
    """
    if value is None:
        return None
    text = value.strip()
    if text.lower() in RAY_KEYWORDS:
        return text.lower()
    if _RAY_HEAD.match(text):
        return text
    raise InputError(
        f"invalid --ray {value!r}; use auto, local or HOST:PORT of the cluster's head node"
    )


def resolve_model(model: Path | None) -> Path:
    """``--model``, or the shipped default model when it is present.

    Raises:
        ModelError: no ``--model`` and the default model is missing.
    """
    if model is not None:
        return model
    path = default_model_path()
    if not path.is_file():
        raise ModelError(
            f"no --model given and the default model {path} is not present; pass --model PATH "
            f"or set {ENV_MODEL}"
        )
    return path


def pseudonym_salt(pseudonymize: bool, include_patient_id: bool) -> str | None:
    """The salt of ``--pseudonymize`` from the environment, or ``None`` without it.

    Raises:
        InputError: combined with ``--include-patient-id``, or the salt is too short.
    """
    if not pseudonymize:
        return None
    if include_patient_id:
        raise InputError("--pseudonymize and --include-patient-id exclude each other; pick one")
    salt = os.environ.get(ENV_PSEUDONYM_SALT, "")
    if len(salt) < MIN_SALT_CHARS:
        raise InputError(
            f"--pseudonymize needs a secret salt of at least {MIN_SALT_CHARS} characters in "
            f"{ENV_PSEUDONYM_SALT} (keep it the same across runs to keep pseudonyms stable)"
        )
    return salt


def check_series_number(number: int) -> int:
    """``--seg-series-number`` as the SEG builder requires it (DICOM IS: 1 to 2**31 - 1).

    Raises:
        InputError: out of that range.
    """
    if not 1 <= number <= SERIES_NUMBER_MAX:
        raise InputError(
            f"invalid --seg-series-number {number}; DICOM allows 1 to {SERIES_NUMBER_MAX}"
        )
    return number


def check_description(text: str) -> str:
    """``--seg-series-description`` as the SEG builder requires it (DICOM LO).

    Raises:
        InputError: too long, or with a backslash or a control character.
    """
    if len(text) > SERIES_DESCRIPTION_MAX_CHARS or "\\" in text:
        raise InputError(
            f"--seg-series-description is {len(text)} characters; "
            f"DICOM allows at most {SERIES_DESCRIPTION_MAX_CHARS} and no backslash"
        )
    if any(ord(ch) < 32 for ch in text):
        raise InputError(
            "--seg-series-description holds a control character (a tab or a line break); "
            "DICOM allows none"
        )
    return text
