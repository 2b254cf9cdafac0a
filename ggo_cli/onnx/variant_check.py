"""The numeric self-check of a model variant (int8, fp16) against float32 on this machine.

A variant's graph digest proves that the graph is the one that was validated, not that this
machine computes it the same way: the int8 recipe validated on an AVX-512 VNNI CPU kept 19.3 of
42.0 mL of the demo's GGO there but 1.55 mL on an AVX2-only CPU, with the same digest (issue 14).
So before a variant is first used on a machine, it and the plain float32 model (on the CPU) run
on the *reference slices* shipped beside the model (``reference_slices.npz``: model-grid inputs
with GGO, their choice and licences in the model card), and their GGO masks are compared:

- pooled GGO pixel count within :data:`MAX_GGO_CHANGE` (2 %) of float32's;
- pooled Dice of the two masks at least :data:`MIN_POOLED_DICE`;
- on every slice where either mask has :data:`MIN_SLICE_PIXELS` GGO pixels, Dice at least
  :data:`MIN_SLICE_DICE` (a pooled figure alone missed the AVX2 failure: the COVID slices'
  counts moved 0.6 % while the phantom's and the real CT's GGO vanished).

The verdict is cached per machine in the user cache folder (``GGO_CACHE_DIR``, else the
platform's, e.g. ``~/.cache/ggo-cli``), keyed by the CPU model and flags, the GPU name and
driver (on CUDA), the ONNX Runtime version, the model file, the variant graph, the reference
slices and these tolerances: later runs cost nothing, ``--force`` or a changed key runs it
again. Concurrent processes (``--jobs`` workers) take a file lock, so one runs the check and
the others read its verdict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..atomic_output import atomic_write_text
from ..config import DeviceKind
from ..errors import OutputError
from ..host import nvidia_smi_query
from ..scratch import lock_exclusive
from .int8_recipes import cpu_flag_set
from .model_info import INPUT_NAME, OUTPUT_NAME, ModelInfo
from .reference_slices import REFERENCE_SET_NAME, ReferenceSet, load_reference_set
from .runtime import CUDA_PROVIDER, DeviceRequest, create_session, run_in_batches

log = logging.getLogger(__name__)

CHECK_FORMAT = 1
"""Bumped when the check's method changes (part of the cache key)."""
MAX_GGO_CHANGE = 0.02
"""Largest relative change of the pooled GGO pixel count (the 2 % that issue 14 allows a
volume to move against float32)."""
MIN_POOLED_DICE = 0.95
"""Smallest pooled Dice of variant and float32 masks. The AVX2-safe S8S8 recipe gave 0.987, a
saturating one 0.892 (docs/benchmarks.md)."""
MIN_SLICE_DICE = 0.90
"""Smallest Dice on any slice with :data:`MIN_SLICE_PIXELS` GGO pixels (S8S8 worst 0.940)."""
MIN_SLICE_PIXELS = 500
"""Slices with fewer GGO pixels in both masks do not enter the per-slice test (a few pixels'
change would dominate their Dice)."""
CACHE_ENV = "GGO_CACHE_DIR"
CHECK_BATCH = 4
_PROCESS_STARTED = time.time()


@dataclass(frozen=True, slots=True)
class CheckFigures:
    """How a variant's GGO masks compare with float32's on the reference slices.

    Attributes:
        n_slices: reference slices.
        ggo_pixels_fp32: GGO pixels of the float32 model, all slices.
        ggo_pixels_variant: GGO pixels of the variant.
        ggo_change: ``variant / fp32 - 1`` (0 when both are 0).
        dice: pooled Dice of the two masks.
        worst_slice_dice: the lowest Dice among slices with enough GGO (1 if none).
        worst_slice: that slice's name.
        fp32_s_per_slice: float32's seconds per slice here (CPU; first batch included, so a
            rough figure: speeds are quoted from benchmarks).
        variant_s_per_slice: the variant's seconds per slice here.
    """

    n_slices: int
    ggo_pixels_fp32: int
    ggo_pixels_variant: int
    ggo_change: float
    dice: float
    worst_slice_dice: float
    worst_slice: str
    fp32_s_per_slice: float = math.nan
    variant_s_per_slice: float = math.nan

    def failures(self) -> list[str]:
        """Which tolerances are broken, in words (empty when the variant passes)."""
        broken = []
        if abs(self.ggo_change) > MAX_GGO_CHANGE:
            broken.append(f"GGO pixels {self.ggo_change:+.1%} (limit ±{MAX_GGO_CHANGE:.0%})")
        if self.dice < MIN_POOLED_DICE:
            broken.append(f"mask Dice {self.dice:.3f} (limit {MIN_POOLED_DICE})")
        if self.worst_slice_dice < MIN_SLICE_DICE:
            broken.append(
                f"Dice {self.worst_slice_dice:.3f} on slice {self.worst_slice} "
                f"(limit {MIN_SLICE_DICE})"
            )
        return broken

    def summary(self) -> str:
        """The figures in one phrase."""
        return (
            f"GGO pixels {self.ggo_change:+.2%} against float32, mask Dice {self.dice:.3f} "
            f"(worst slice {self.worst_slice_dice:.3f}) on {self.n_slices} reference slices"
        )


@dataclass(frozen=True, slots=True)
class VariantCheck:
    """The verdict of a variant's self-check on this machine.

    Attributes:
        variant: ``int8`` or ``fp16``.
        recipe: the int8 recipe's name (``""`` for fp16).
        ran: whether a check was possible (``False``: no reference slices beside the model).
        passed: whether the variant agreed with float32 within the tolerances.
        reason: one line: the figures, or why it failed or did not run.
        figures: the measured agreement, when it ran.
        machine: the machine part of the cache key (CPU, GPU, ONNX Runtime).
        cached: read from the cache instead of measured by this process.
        checked_at: UTC time of the measurement.
        seconds: how long the measurement took.
    """

    variant: str
    recipe: str
    ran: bool
    passed: bool
    reason: str
    figures: CheckFigures | None = None
    machine: dict[str, str] | None = None
    cached: bool = False
    checked_at: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record (manifest, ``info``, the cache)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantCheck:
        """The inverse of :meth:`to_dict`."""
        figures = data.get("figures")
        return cls(**{**data, "figures": CheckFigures(**figures) if figures else None})


def compare_masks(
    reference: npt.NDArray[np.bool_], variant: npt.NDArray[np.bool_], names: tuple[str, ...]
) -> CheckFigures:
    """Compare a variant's GGO masks with float32's.

    Args:
        reference: float32 masks. Shape: ``(n, S, S)``.
        variant: the variant's masks. Shape: ``(n, S, S)``.
        names: slice names.
    """
    a = reference.reshape(len(names), -1)
    b = variant.reshape(len(names), -1)
    count_a, count_b = a.sum(axis=1), b.sum(axis=1)
    inter = np.logical_and(a, b).sum(axis=1)
    total_a, total_b, total_inter = int(count_a.sum()), int(count_b.sum()), int(inter.sum())
    pooled = 2.0 * total_inter / (total_a + total_b) if total_a + total_b else 1.0
    change = total_b / total_a - 1.0 if total_a else (0.0 if total_b == 0 else math.inf)
    worst, worst_name = 1.0, ""
    for i, name in enumerate(names):
        if max(count_a[i], count_b[i]) >= MIN_SLICE_PIXELS:
            dice = 2.0 * float(inter[i]) / float(count_a[i] + count_b[i])
            if dice < worst:
                worst, worst_name = dice, name
    return CheckFigures(
        n_slices=len(names),
        ggo_pixels_fp32=total_a,
        ggo_pixels_variant=total_b,
        ggo_change=float(change),
        dice=float(pooled),
        worst_slice_dice=float(worst),
        worst_slice=worst_name,
    )


def cache_dir() -> Path:
    """The user cache folder of ggo-cli (``GGO_CACHE_DIR``, else the platform's)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    import platformdirs

    return Path(platformdirs.user_cache_dir("ggo-cli", appauthor=False))


def machine_identity(on_cuda: bool, device_index: int = 0) -> dict[str, str]:
    """What identifies this machine's arithmetic: CPU model and flags, GPU, ONNX Runtime."""
    import onnxruntime as ort

    from ..host import read_cpuinfo

    cpu_model = read_cpuinfo()[0] or platform.processor() or platform.machine()
    flags = " ".join(sorted(cpu_flag_set()))
    identity = {
        "cpu": cpu_model,
        "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest(),
        "machine": platform.machine(),
        "onnxruntime": ort.__version__,
    }
    if on_cuda:
        gpu = nvidia_smi_query("name,driver_version", device_index)
        identity["gpu"] = gpu or f"cuda:{device_index}"
    return identity


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (``False`` when it cannot be taken: no cache)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+b")  # noqa: SIM115 - closed below
    except OSError as exc:
        log.debug("no self-check cache (%s): the check runs in this process", exc)
        yield False
        return
    try:
        yield lock_exclusive(handle, wait=True)
    finally:
        handle.close()


def _read_cached(
    path: Path, key: dict[str, Any], *, newer_than: float | None
) -> VariantCheck | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("key") != key:
            return None
        if newer_than is not None and float(data.get("written", 0.0)) < newer_than:
            return None
        verdict = VariantCheck.from_dict(data["verdict"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return VariantCheck(**{**asdict(verdict), "figures": verdict.figures, "cached": True})


def _masks(
    session: Any, batch: npt.NDArray[np.float32], logit_threshold: float, *, on_cuda: bool
) -> npt.NDArray[np.bool_]:
    def run(start: int, stop: int) -> npt.NDArray[np.bool_]:
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: batch[start:stop]})[0]
        return np.asarray(logits[:, 0] > logit_threshold)

    return np.concatenate(
        run_in_batches(run, batch.shape[0], batch_size=CHECK_BATCH, on_cuda=on_cuda,
                       what="the self-check")
    )


def _measure(
    model: ModelInfo,
    reference: ReferenceSet,
    variant_bytes: bytes,
    request: DeviceRequest,
    cuda_options: dict[str, Any] | None,
    intra_op_threads: int | None,
) -> CheckFigures:
    """Run float32 (CPU) and the variant (on ``request``) over the reference slices, CPU
    sessions on ``intra_op_threads`` (``None``: ONNX Runtime's default)."""
    batch = reference.batch()
    logit_threshold = math.log(model.threshold / (1.0 - model.threshold))
    fp32 = create_session(
        model.path, DeviceRequest(DeviceKind.CPU), intra_op_threads=intra_op_threads
    )
    started = time.perf_counter()
    want = _masks(fp32, batch, logit_threshold, on_cuda=False)
    fp32_s = (time.perf_counter() - started) / len(batch)
    del fp32
    session = create_session(
        model.path,
        request,
        cuda_options=cuda_options,
        model_bytes=variant_bytes,
        intra_op_threads=intra_op_threads,
    )
    on_cuda = session.get_providers()[0] == CUDA_PROVIDER
    started = time.perf_counter()
    got = _masks(session, batch, logit_threshold, on_cuda=on_cuda)
    variant_s = (time.perf_counter() - started) / len(batch)
    figures = compare_masks(want, got, reference.names)
    return dataclasses.replace(
        figures, fp32_s_per_slice=round(fp32_s, 4), variant_s_per_slice=round(variant_s, 4)
    )


class VerdictCache:
    """Verdicts already settled, by cache key digest: owned by the caller (one per segmenter,
    or one shared by the segmenters of a process) so that a key is measured or read from disk
    once per owner."""

    def __init__(self) -> None:
        self._verdicts: dict[str, VariantCheck] = {}

    def get(self, digest: str) -> VariantCheck | None:
        """The verdict settled for a key, or ``None``."""
        return self._verdicts.get(digest)

    def put(self, digest: str, verdict: VariantCheck) -> None:
        """Remember the verdict of a key."""
        self._verdicts[digest] = verdict


def check_variant(
    model: ModelInfo,
    variant_bytes: bytes,
    *,
    variant: str,
    recipe: str = "",
    request: DeviceRequest,
    on_cuda: bool,
    cuda_options: dict[str, Any] | None = None,
    force: bool = False,
    verdicts: VerdictCache | None = None,
    intra_op_threads: int | None = None,
) -> VariantCheck:
    """Check a model variant against float32 on this machine (or read the cached verdict).

    Args:
        model: the validated float32 model.
        variant_bytes: the serialized variant (float32 inputs and outputs).
        variant: ``int8`` or ``fp16``.
        recipe: the int8 recipe's name.
        request: the device the variant runs on.
        on_cuda: whether that is a GPU (its identity joins the cache key).
        cuda_options: the CUDA provider options the variant runs with.
        force: measure again even when a verdict is cached (once per process: workers
            started for the same run reuse a verdict written after they started).
        verdicts: verdicts this caller already settled; a key found there is neither
            measured nor read again (``None``: look in the cache folder only).
        intra_op_threads: threads of the check's CPU sessions (a ``--jobs`` worker's share);
            ``None``: ONNX Runtime's default.

    Returns:
        The verdict; ``ran`` is ``False`` when the model ships no reference slices.

    Raises:
        ModelError: the reference slices are unreadable, or a session fails.
    """
    reference = load_reference_set(model)
    if reference is None:
        return VariantCheck(
            variant, recipe, ran=False, passed=False,
            reason=f"no {REFERENCE_SET_NAME} beside {model.path.name} to check it against float32",
        )
    machine = machine_identity(on_cuda, request.index)
    key: dict[str, Any] = {
        "format": CHECK_FORMAT,
        "tolerances": [MAX_GGO_CHANGE, MIN_POOLED_DICE, MIN_SLICE_DICE, MIN_SLICE_PIXELS],
        "machine": machine,
        "model_sha256": model.file_sha256,
        "variant": variant,
        "variant_sha256": hashlib.sha256(variant_bytes).hexdigest(),
        "reference_sha256": reference.sha256,
        "cuda_options": cuda_options or {},
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    known = verdicts.get(digest) if verdicts is not None else None
    if known is not None:
        return known
    folder = cache_dir() / "variant-checks"
    entry = folder / f"{digest[:32]}.json"
    newer_than = _PROCESS_STARTED if force else None
    with _locked(folder / f"{digest[:32]}.lock") as cacheable:
        cached = _read_cached(entry, key, newer_than=newer_than) if cacheable else None
        if cached is not None:
            log.debug("%s self-check verdict read from %s", variant, entry)
            if verdicts is not None:
                verdicts.put(digest, cached)
            return cached
        log.info("checking the %s variant against float32 on this machine (once; cached)",
                 variant)
        started = time.perf_counter()
        figures = _measure(
            model, reference, variant_bytes, request, cuda_options, intra_op_threads
        )
        broken = figures.failures()
        verdict = VariantCheck(
            variant=variant,
            recipe=recipe,
            ran=True,
            passed=not broken,
            reason="; ".join(broken) if broken else figures.summary(),
            figures=figures,
            machine=machine,
            checked_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            seconds=round(time.perf_counter() - started, 1),
        )
        if cacheable:
            record = {"key": key, "written": time.time(), "verdict": verdict.to_dict()}
            try:
                atomic_write_text(entry, json.dumps(record, indent=1) + "\n")
            except OutputError as exc:
                log.debug("self-check verdict not cached: %s", exc)
    if verdicts is not None:
        verdicts.put(digest, verdict)
    return verdict
