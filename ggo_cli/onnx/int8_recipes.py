"""The int8 recipes of a model (``int8_calibration.json``) and which one a CPU should try.

One file beside the model holds the activation ranges measured once on training slices and one
or more *recipes*: quantizer settings for a class of CPUs, the SHA-256 of the int8 graph they
make, and what was measured with them (test Dice, speed, the CPU it was measured on).

Why more than one: ONNX Runtime runs unsigned-activation x signed-weight (U8S8) int8
convolutions with ``VPDPBUSD`` on CPUs with VNNI (AVX-512 VNNI, AVX-VNNI, AMX), but with
``VPMADDUBSW`` on AVX2-only CPUs, whose 16-bit intermediate sums saturate (ONNX Runtime's
quantization guide, "When and why do I need to try U8U8?"). The U8S8 recipe validated on an
AVX-512 VNNI CPU lost 37 % of the GGO of a real series on an AVX2-only CPU with the same graph
digest. Signed activations and weights (S8S8) avoid that path: on the AVX2-only CPU their masks
agree with float32 on the reference slices (docs/benchmarks.md). Each machine still checks the
variant it is about to use against float32 (:mod:`ggo_cli.onnx.variant_check`) before using it.

Format 1 files (one recipe at the top level) still load, as a single recipe for any CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .model_info import ModelInfo

INT8_SPEC_NAME = "int8_calibration.json"
INT8_SPEC_FORMAT = "ggo-cli int8 calibration 2"
INT8_SPEC_FORMAT_1 = "ggo-cli int8 calibration 1"
MAX_INT8_DICE_CHANGE = 0.01
"""The largest change of pooled test Dice for which ``auto`` considers an int8 recipe."""
MIN_INT8_SPEEDUP = 1.2
"""The smallest speed-up over float32 (measured where the recipe was validated) for which
``auto`` considers an int8 recipe: a variant that is not faster only adds risk. On the AVX2-only
2-core CPU no int8 recipe reached 1.0 (docs/benchmarks.md), so ``auto`` runs float32 there."""
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
"""CPU flags (Linux ``/proc/cpuinfo`` names) with which ONNX Runtime's U8S8 kernels do not
saturate."""


@dataclass(frozen=True)
class Int8Recipe:
    """One way to quantize the model, for one class of CPUs.

    Attributes:
        name: e.g. ``u8s8-vnni`` or ``s8s8``.
        cpu_any: CPU flags of which at least one must be present (empty: any CPU).
        settings: quantizer settings (``quantize_static`` arguments and ``upsampling``).
        int8_graph_sha256: SHA-256 of the int8 graph these settings made when validated.
        onnxruntime: ONNX Runtime version that made and measured it.
        validation: accuracy (``pooled_dice_change`` on the test split; for a model with
            several classes each further class's under ``classes``), speed, and the CPU.
    """

    name: str
    cpu_any: tuple[str, ...]
    settings: dict[str, Any]
    int8_graph_sha256: str
    onnxruntime: str
    validation: dict[str, Any]

    @property
    def dice_change(self) -> float:
        """Pooled test Dice of int8 minus float32, the class that moved most (GGO, and every
        further class measured, e.g. consolidation); nan when GGO's was not measured."""
        value = self.validation.get("pooled_dice_change")
        if not isinstance(value, int | float):
            return math.nan
        changes = [float(value)]
        classes = self.validation.get("classes")
        for figures in classes.values() if isinstance(classes, dict) else ():
            change = figures.get("pooled_dice_change") if isinstance(figures, dict) else None
            changes.append(float(change) if isinstance(change, int | float) else math.nan)
        if any(math.isnan(c) for c in changes):
            return math.nan
        return max(changes, key=abs)

    @property
    def acceptable(self) -> bool:
        """Whether the measured accuracy change is within :data:`MAX_INT8_DICE_CHANGE`."""
        return abs(self.dice_change) <= MAX_INT8_DICE_CHANGE

    @property
    def speedup(self) -> float:
        """Speed over float32 where it was validated (nan when not measured)."""
        value = self.validation.get("speed_cpu", {}).get("speedup")
        return float(value) if isinstance(value, int | float) else math.nan

    @property
    def measured_on(self) -> str:
        """The CPU model and flags it was validated on, in words."""
        cpu = self.validation.get("cpu", {})
        return f"{cpu.get('model', 'unknown CPU')}, {'/'.join(cpu.get('flags', [])) or 'no flags'}"

    @property
    def fast_enough(self) -> bool:
        """Whether it was measured at least :data:`MIN_INT8_SPEEDUP` times float32's speed (or
        not measured)."""
        return math.isnan(self.speedup) or self.speedup >= MIN_INT8_SPEEDUP

    def fits(self, cpu_flags: set[str]) -> bool:
        """Whether a CPU with ``cpu_flags`` is of this recipe's class."""
        return not self.cpu_any or any(flag in cpu_flags for flag in self.cpu_any)


@dataclass(frozen=True)
class Int8Spec:
    """The int8 recipes of a model.

    Attributes:
        path: the file.
        model_sha256: the recorded graph digest of the model it belongs to.
        tensors: activation ranges in ONNX Runtime's calibration-cache format (all recipes).
        recipes: in order of preference.
        file_sha256: SHA-256 of the file (part of the self-check's cache key).
    """

    path: Path
    model_sha256: str
    tensors: dict[str, Any]
    recipes: tuple[Int8Recipe, ...]
    file_sha256: str

    def candidates(self, cpu_flags: set[str]) -> list[Int8Recipe]:
        """The recipes for a CPU with ``cpu_flags``, most preferred first."""
        return [r for r in self.recipes if r.fits(cpu_flags)]


def int8_spec_path(model_path: Path) -> Path:
    """Where the int8 recipes of a model live: beside it."""
    return model_path.parent / INT8_SPEC_NAME


def _recipe(data: dict[str, Any], *, default_name: str) -> Int8Recipe:
    return Int8Recipe(
        name=str(data.get("name", default_name)),
        cpu_any=tuple(str(f) for f in data.get("cpu_any", ())),
        settings=dict(data["settings"]),
        int8_graph_sha256=str(data["int8_graph_sha256"]),
        onnxruntime=str(data["onnxruntime"]),
        validation=dict(data["validation"]),
    )


def parse_int8_spec(path: Path, data: dict[str, Any], file_sha256: str) -> Int8Spec:
    """Build an :class:`Int8Spec` from a recipe file's JSON (format 1 or 2).

    Raises:
        ValueError, KeyError, TypeError: the JSON is not a recipe file.
    """
    recipes: tuple[Int8Recipe, ...]
    if data.get("format") == INT8_SPEC_FORMAT_1:
        recipes = (_recipe(data, default_name="recipe"),)
    elif data.get("format") == INT8_SPEC_FORMAT:
        onnxruntime = data.get("onnxruntime", "")
        recipes = tuple(
            _recipe({"onnxruntime": onnxruntime, **r}, default_name=f"recipe{i + 1}")
            for i, r in enumerate(data["recipes"])
        )
        if not recipes:
            raise ValueError("no recipes")
    else:
        raise ValueError(f"format {data.get('format')!r}, expected {INT8_SPEC_FORMAT!r}")
    return Int8Spec(
        path=path,
        model_sha256=str(data["model_sha256"]),
        tensors=dict(data["tensors_data"]),
        recipes=recipes,
        file_sha256=file_sha256,
    )


def load_int8_spec(model: ModelInfo) -> Int8Spec | None:
    """Read the int8 recipes beside a model.

    Returns:
        The recipes, or ``None`` when there is no file.

    Raises:
        ModelError: the file is unreadable, malformed or belongs to another model.
    """
    import hashlib

    path = int8_spec_path(model.path)
    if not path.is_file():
        return None
    try:
        raw = path.read_bytes()
        spec = parse_int8_spec(path, json.loads(raw), hashlib.sha256(raw).hexdigest())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path.name} beside {model.path.name} is not usable: {exc}") from exc
    if spec.model_sha256 != model.recorded_sha256:
        raise ModelError(
            f"{path.name} belongs to another model (model sha256 "
            f"{spec.model_sha256[:12]}..., this model {model.recorded_sha256[:12]}...)"
        )
    return spec


def cpu_flag_set() -> set[str]:
    """All of this CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    from ..host import read_cpuinfo

    return set(read_cpuinfo()[1] or ())
