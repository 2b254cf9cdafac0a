"""Which variant of the model runs: int8 recipes by CPU class, fp16 on CUDA, each checked.

``--precision auto`` wants the fastest variant whose numbers do not depend on the machine. On
the CPU the int8 recipes that fit the CPU's flags (:mod:`ggo_cli.onnx.int8_recipes`) are taken in
order of preference; one is considered only if this ONNX Runtime rebuilds its validated graph,
its test Dice moved at most 0.01 and it was measured at least 1.2 times as fast as float32;
it is used only if its self-check against float32 passes on this machine
(:mod:`ggo_cli.onnx.variant_check`), else the next one is tried, then float32. On CUDA the fp16
graph is checked the same way. An explicit ``--precision int8|fp16`` skips the speed and Dice
gates but not the self-check: a disagreement is a :class:`~ggo_cli.errors.ModelError` (exit 5).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..errors import InputError, ModelError
from .int8_recipes import (
    INT8_SPEC_NAME,
    MAX_INT8_DICE_CHANGE,
    MIN_INT8_SPEEDUP,
    Int8Recipe,
    Int8Spec,
    cpu_flag_set,
    load_int8_spec,
)
from .model_info import ModelInfo
from .precision import CUDA_NHWC_OPTIONS, int8_model_bytes
from .runtime import DeviceRequest
from .variant_check import check_variant
from .variant_verdict import VariantCheck
from .verdict_cache import VerdictCache

log = logging.getLogger(__name__)


@dataclass
class VariantChoice:
    """The outcome of choosing a variant.

    Attributes:
        data: the serialized variant to run, or ``None`` for the float32 model file.
        recipe: the int8 recipe's name (``""`` otherwise).
        check: the last self-check verdict (of the variant used, or of the last one tried).
        checked: ``False`` only when an explicitly requested variant runs unchecked (the model
            ships no reference slices).
        failures: the self-check failures of the recipes tried, one phrase each.
    """

    data: bytes | None = None
    recipe: str = ""
    check: VariantCheck | None = None
    checked: bool = True
    failures: list[str] = field(default_factory=list)


def _verdict_allows(
    choice: VariantChoice, verdict: VariantCheck, label: str, *, explicit: bool
) -> bool:
    """Whether a verdict lets the variant run (records it, logs the outcome)."""
    choice.check = verdict
    if not verdict.ran:
        if explicit:
            log.warning("--precision %s runs unchecked: %s", verdict.variant, verdict.reason)
            choice.checked = False
            return True
        log.info("%s variant not used: %s; running float32", label, verdict.reason)
        return False
    if verdict.passed:
        log.info(
            "%s variant passed its self-check on this machine%s: %s",
            label,
            " (cached)" if verdict.cached else "",
            verdict.reason,
        )
        return True
    choice.failures.append(f"{label} variant failed its self-check on this machine: "
                           f"{verdict.reason}")
    return False


def choose_fp16(
    model: ModelInfo,
    data: bytes,
    request: DeviceRequest,
    *,
    explicit: bool,
    force: bool,
    verdicts: VerdictCache | None = None,
    intra_op_threads: int | None = None,
) -> VariantChoice:
    """Check the fp16 graph on the GPU; ``data`` is ``None`` in the result when float32 runs.
    The float32 reference runs on the CPU on ``intra_op_threads`` (``None``: ONNX Runtime's
    default).

    Raises:
        ModelError: ``--precision fp16`` and the self-check failed.
    """
    choice = VariantChoice()
    verdict = check_variant(
        model, data, variant="fp16", request=request, on_cuda=True,
        cuda_options=CUDA_NHWC_OPTIONS, force=force, verdicts=verdicts,
        intra_op_threads=intra_op_threads,
    )
    if _verdict_allows(choice, verdict, "fp16", explicit=explicit):
        choice.data = data
    elif choice.failures:
        if explicit:
            raise ModelError(
                f"--precision fp16: {choice.failures[0]}; use --precision fp32 or auto"
            )
        log.warning("%s; running float32", choice.failures[0])
    return choice


def _considered(recipe: Int8Recipe, *, explicit: bool) -> str:
    """Why ``auto`` passes over a recipe (``""``: it does not)."""
    if explicit:
        return ""
    if not recipe.acceptable:
        return (f"{recipe.name}: test Dice changed by {recipe.dice_change:.4f} "
                f"(limit {MAX_INT8_DICE_CHANGE})")
    if not recipe.fast_enough:
        return (f"{recipe.name}: {recipe.speedup:.2f} times float32's speed where it was "
                f"measured ({recipe.measured_on}), below {MIN_INT8_SPEEDUP}")
    return ""


def _recipe_bytes(
    model: ModelInfo, spec: Int8Spec, recipe: Int8Recipe, *, explicit: bool
) -> bytes | None:
    """The int8 model of a recipe, or ``None`` when this ONNX Runtime quantizes it otherwise
    (``auto``; explicit: a warning)."""
    data, validated = int8_model_bytes(model, spec, recipe)
    if validated:
        return data
    import onnxruntime as ort

    message = (
        f"this ONNX Runtime ({ort.__version__}) quantizes differently from the one that "
        f"validated int8 recipe {recipe.name} ({recipe.onnxruntime})"
    )
    if not explicit:
        log.info("int8 recipe %s not used: %s", recipe.name, message)
        return None
    log.warning("--precision int8: %s; its test accuracy is not validated", message)
    return data


def choose_int8(
    model: ModelInfo,
    request: DeviceRequest,
    *,
    explicit: bool,
    force: bool,
    verdicts: VerdictCache | None = None,
    intra_op_threads: int | None = None,
) -> VariantChoice:
    """The int8 variant for this CPU (``data`` is ``None`` when float32 runs; logged why),
    self-checked on ``intra_op_threads`` (``None``: ONNX Runtime's default).

    Raises:
        InputError: ``--precision int8`` without an int8 recipe beside the model.
        ModelError: ``--precision int8`` and the recipes are broken, none fits this CPU,
            quantization fails, or none passes the self-check (with the measured disagreement).
    """
    choice = VariantChoice()
    try:
        spec = load_int8_spec(model)
        if spec is None:
            if explicit:
                raise InputError(
                    f"--precision int8 needs {INT8_SPEC_NAME} beside {model.path.name} "
                    "(made by `python -m training quantize`)"
                )
            log.debug("no %s beside the model: float32 on the CPU", INT8_SPEC_NAME)
            return choice
        flags = cpu_flag_set()
        passed_over = [
            f"{r.name} needs {'/'.join(r.cpu_any)}" for r in spec.recipes if not r.fits(flags)
        ]
        candidates = spec.candidates(flags)
        if not candidates and explicit:
            raise ModelError(
                f"--precision int8: no int8 recipe for this CPU ({'; '.join(passed_over)}); "
                "use --precision fp32"
            )
        for recipe in candidates:
            reason = _considered(recipe, explicit=explicit)
            if reason:
                passed_over.append(reason)
                continue
            data = _recipe_bytes(model, spec, recipe, explicit=explicit)
            if data is None:
                continue
            verdict = check_variant(
                model, data, variant="int8", recipe=recipe.name, request=request,
                on_cuda=False, force=force, verdicts=verdicts,
                intra_op_threads=intra_op_threads,
            )
            if _verdict_allows(choice, verdict, f"int8 ({recipe.name})", explicit=explicit):
                choice.data, choice.recipe = data, recipe.name
                return choice
            if not verdict.ran:
                return choice  # no reference slices: no recipe can be checked
    except ModelError as exc:
        if explicit:
            raise
        log.warning("int8 variant not used (%s); running float32", exc)
        return choice
    if choice.failures:
        failures = "; ".join(choice.failures)
        if explicit:
            raise ModelError(
                f"--precision int8: {failures}; use --precision fp32 (or auto, which falls back "
                "to float32)"
            )
        log.warning("%s; running float32", failures)
    elif passed_over:
        log.info("int8 not used on this CPU (%s); running float32", "; ".join(passed_over))
    return choice
