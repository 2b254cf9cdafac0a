"""The numeric self-check of a model variant (int8, fp16) against float32 on this machine.

A variant's graph digest proves that the graph is the one that was validated, not that this
machine computes it the same way: the int8 recipe validated on an AVX-512 VNNI CPU kept 19.3 of
42.0 mL of the demo's GGO there but 1.55 mL on an AVX2-only CPU, with the same digest (issue 14).
So before a variant is first used on a machine, it and the plain float32 model (on the CPU) run
on the *reference slices* shipped beside the model (``reference_slices.npz``: model-grid inputs
with GGO, their choice and licences in the model card), and their masks of every output channel
(GGO; consolidation too in a two-class model, issue 20) are compared, channel by channel:

- pooled pixel count within :data:`MAX_GGO_CHANGE` (2 %) of float32's;
- pooled Dice of the two masks at least :data:`MIN_POOLED_DICE`;
- on every slice where either mask has :data:`MIN_SLICE_PIXELS` pixels, Dice at least
  :data:`MIN_SLICE_DICE` (a pooled figure alone missed the AVX2 failure: the COVID slices'
  counts moved 0.6 % while the phantom's and the real CT's GGO vanished).

A channel after GGO with fewer than :data:`MIN_SLICE_PIXELS` pixels over all reference slices
in both masks is reported as too sparse to compare and enters no test (its masks then differ
by fewer pixels than a slice needs to be tested at all); GGO is always tested. A failure names
its channel by the model's segment label in a model with more than one channel
(``Consolidation: mask Dice 0.912 (limit 0.95)``); a one-channel model's verdict reads as
before (:mod:`ggo_cli.onnx.variant_verdict`).

The verdict is cached per machine in the user cache folder (``GGO_CACHE_DIR``, else the
platform's, e.g. ``~/.cache/ggo-cli``), keyed by the CPU model and flags, the GPU name and
driver (on CUDA), the ONNX Runtime version, the model file, the variant graph, the reference
slices and these tolerances (and, for a model with more than one channel, its segment labels):
later runs cost nothing, ``--force`` or a changed key runs it again. Concurrent processes
(``--jobs`` workers) take a file lock, so one runs the check and the others read its verdict.

The tolerances and the verdict are in :mod:`ggo_cli.onnx.variant_verdict`, the cache and the
machine's identity in :mod:`ggo_cli.onnx.verdict_cache`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from ..atomic_output import atomic_write_text
from ..config import DeviceKind
from ..errors import OutputError
from .model_info import INPUT_NAME, OUTPUT_NAME, ModelInfo
from .reference_slices import REFERENCE_SET_NAME, ReferenceSet, load_reference_set
from .runtime import CUDA_PROVIDER, DeviceRequest, create_session, run_in_batches
from .variant_verdict import (
    MAX_GGO_CHANGE,
    MIN_POOLED_DICE,
    MIN_SLICE_DICE,
    MIN_SLICE_PIXELS,
    CheckFigures,
    VariantCheck,
    compare_channels,
)
from .verdict_cache import (
    VerdictCache,
    cache_dir,
    cache_lock,
    machine_identity,
    read_cached_verdict,
)

log = logging.getLogger(__name__)

CHECK_FORMAT = 1
"""Bumped when the check's method changes (part of the cache key)."""
CHECK_BATCH = 4
_PROCESS_STARTED = time.time()


def _masks(
    session: Any, batch: npt.NDArray[np.float32], logit_threshold: float, *, on_cuda: bool
) -> npt.NDArray[np.bool_]:
    """The masks of every output channel. Shape: ``(n, C, S, S)``."""
    def run(start: int, stop: int) -> npt.NDArray[np.bool_]:
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: batch[start:stop]})[0]
        return np.asarray(logits > logit_threshold)

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
    labels = tuple(segment.label for segment in model.segments)
    figures = compare_channels(want, got, reference.names, labels)
    return dataclasses.replace(
        figures, fp32_s_per_slice=round(fp32_s, 4), variant_s_per_slice=round(variant_s, 4)
    )


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
    if model.n_channels > 1:
        # Since issue 20 every channel is compared. A one-channel model is checked exactly as
        # before, so its key stays as before (deployed machines keep their verdicts); a model
        # with more channels gets an entry the old code never wrote, so a verdict cached by it
        # (GGO only) is not reused. The labels name the channels in the verdict's reason.
        key["channels"] = [segment.label for segment in model.segments]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    known = verdicts.get(digest) if verdicts is not None else None
    if known is not None:
        return known
    folder = cache_dir() / "variant-checks"
    entry = folder / f"{digest[:32]}.json"
    newer_than = _PROCESS_STARTED if force else None
    with cache_lock(folder / f"{digest[:32]}.lock") as cacheable:
        cached = read_cached_verdict(entry, key, newer_than=newer_than) if cacheable else None
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
