"""The int8 recipe of an exported model: calibrate, measure accuracy and speed, write it.

``python -m training quantize --model exported_models/ggo-resnet50-unet/model.onnx --data
../shared/data/covid-semiseg-train`` runs ggo-cli's own int8 steps
(:func:`ggo_cli.onnx.precision.quantize_int8`: fold the float16 weight casts, ONNX Runtime's
``quant_pre_process`` without symbolic shapes, ``quantize_static`` QDQ with per-channel int8
weights) calibrated on slices of the model card's *train* split, then

- measures the int8 model against the float model on the card's *test* split as
  ``training.evaluate`` does (probabilities mapped back to each slice's own grid, pooled Dice);
- times both with ONNX Runtime's CPU defaults in one process (alternating, two warm-ups, the
  median of ``runs``), and records the CPU's vector extensions;
- writes ``int8_calibration.json`` beside the model (activation ranges in ONNX Runtime's
  calibration-cache format, the settings, the SHA-256 of the int8 graph, the ORT version, the
  measurements), adds an ``int8`` entry to ``model.json`` and lists the file in ``SHA256SUMS``.

``ggo-cli`` rebuilds the int8 model from that file at run time and uses it on the CPU only when
its graph digest matches and the pooled Dice changed by at most 0.01.

A model with several classes (GGO, consolidation: the card's ``training_data.class_labels``) is
measured per class on the test split's class maps: GGO keeps the keys above (``test_fp32``,
``test_int8``, ``pooled_dice_change``, ``pixels_changed``, ``pixel_agreement``) and every
further class has the same keys under ``validation["classes"][name]``; ggo-cli's 0.01 limit
applies to every class (:attr:`ggo_cli.onnx.int8_recipes.Int8Recipe.dice_change`).

Defaults (chosen on the shipped model, docs/training.md): Percentile calibration at 99.999 %
(MinMax lost 0.0016 Dice, Percentile none), unsigned 8-bit activations, the 1 x 1 output
convolution (``/head/Conv``) left in float (it would otherwise quantize the logits).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ggo_cli.errors import InputError
from ggo_cli.host import cpu_features
from ggo_cli.onnx.int8_recipes import (
    INT8_SPEC_FORMAT,
    INT8_SPEC_FORMAT_1,
    INT8_SPEC_NAME,
    MAX_INT8_DICE_CHANGE,
    VNNI_FLAGS,
)
from ggo_cli.onnx.model_info import file_sha256, load_model_info
from ggo_cli.onnx.precision import graph_digest, quantize_int8

from . import data as training_data
from .evaluate import OnnxPredictor, predict_probabilities
from .metrics import confusion, summarize
from .multiclass import class_mask, class_values
from .splits import Split

log = logging.getLogger(__name__)

DEFAULT_SETTINGS: dict[str, Any] = {
    "quant_format": "QDQ",
    "per_channel": True,
    "activation_type": "QUInt8",
    "weight_type": "QInt8",
    "calibrate_method": "Percentile",
    "nodes_to_exclude": ["/head/Conv"],
    # two slices per collection step; the ranges of all steps are merged
    "extra_options": {"CalibStridedMinMax": 2, "CalibPercentile": 99.999},
    # the 2 x 2 transposed convolutions as int8 1 x 1 convolutions + DepthToSpace
    "upsampling": "depth_to_space",
}
RECIPES: dict[str, dict[str, Any]] = {
    # U8S8: fastest where ONNX Runtime's int8 kernels use VNNI (no 16-bit saturation)
    "u8s8-vnni": {"cpu_any": list(VNNI_FLAGS), "settings": DEFAULT_SETTINGS},
    # U8U8: unsigned weights take ONNX Runtime's 16-bit multiply path, which cannot saturate;
    # right on any CPU (on the AVX2-only CPU not faster than float32: docs/benchmarks.md)
    "u8u8": {"cpu_any": [], "settings": {**DEFAULT_SETTINGS, "weight_type": "QUInt8"}},
}
"""The int8 recipes by name, in order of preference (ggo-cli tries the first that fits the
CPU, then the next if its self-check fails)."""


class SliceReader:
    """ONNX Runtime calibration reader over model-grid images, one slice per call."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images
        self.start, self.end, self.pos = 0, len(images), 0

    def __len__(self) -> int:
        return len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.pos = start_index, end_index, start_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= self.end:
            return None
        image = np.ascontiguousarray(self.images[self.pos : self.pos + 1, None], np.float32)
        self.pos += 1
        return {"image": image}

    def rewind(self) -> None:
        self.pos = self.start


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`make_int8_recipe` wrote and measured: the file, and the recipe made."""

    spec_path: Path
    spec: dict[str, Any]
    recipe: dict[str, Any]


def _session(source: str | bytes) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _class_accuracy(
    masks: dict[str, list[np.ndarray]], slices: Sequence[training_data.SourceSlice], k: int
) -> dict[str, Any]:
    """Pooled Dice of the float and int8 masks of class ``k``, and how they differ."""
    result: dict[str, Any] = {}
    for name, predicted in masks.items():
        matrices = [
            confusion(m, class_mask(s.mask, k)) for m, s in zip(predicted, slices, strict=True)
        ]
        result[f"test_{name}"] = summarize(matrices).to_dict()
    changed = sum(int((a != b).sum()) for a, b in zip(masks["fp32"], masks["int8"], strict=True))
    total = sum(m.size for m in masks["fp32"])
    result["pooled_dice_change"] = result["test_int8"]["dice"] - result["test_fp32"]["dice"]
    result["pixels_changed"] = changed
    result["pixel_agreement"] = 1.0 - changed / total
    return result


def _accuracy(
    model_path: Path,
    int8: bytes,
    slices: Sequence[training_data.SourceSlice],
    classes: Sequence[str] = ("ggo",),
) -> dict[str, Any]:
    """Pooled Dice of the float and int8 models on ``slices``, and how their masks differ,
    per class (GGO's at the top level, the others' under ``classes``)."""
    info = load_model_info(model_path)
    n = len(classes)
    masks: list[dict[str, list[np.ndarray]]] = [{} for _ in classes]
    for name, source in (("fp32", str(model_path)), ("int8", int8)):
        predictor = OnnxPredictor(
            _session(source),
            input_size=info.input_size,
            threshold=info.threshold,
            window_center=info.window_center_hu,
            window_width=info.window_width_hu,
        )
        probabilities = list(predict_probabilities(predictor, slices, channels=n))
        for k in range(n):
            masks[k][name] = [(p if n == 1 else p[k]) > info.threshold for p in probabilities]
    result = _class_accuracy(masks[0], slices, 0)
    if n > 1:
        result["classes"] = {
            name: _class_accuracy(masks[k], slices, k)
            for k, name in enumerate(classes)
            if k > 0
        }
    result["test_ids"] = [s.id for s in slices]
    return result


def _speed(
    model_path: Path, int8: bytes, images: np.ndarray, batch: int, runs: int
) -> dict[str, Any]:
    """Seconds per slice of both models with ORT CPU defaults, alternating in one process."""
    sessions = {"fp32": _session(str(model_path)), "int8": _session(int8)}
    x = np.ascontiguousarray(images[:batch, None], np.float32)
    for session in sessions.values():
        for _ in range(2):
            session.run(["logits"], {"image": x})
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for r in range(runs):
        for name in ["fp32", "int8"] if r % 2 == 0 else ["int8", "fp32"]:
            start = time.perf_counter()
            sessions[name].run(["logits"], {"image": x})
            times[name].append((time.perf_counter() - start) / len(x))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "batch_size": len(x),
        "runs": runs,
        "median_s_per_slice": medians,
        "speedup": medians["fp32"] / medians["int8"],
    }


def _cpu() -> dict[str, Any]:
    return {"platform": platform.platform(), "cores": os.cpu_count(), **cpu_features()}


CALIBRATION_KEYS = ("calibrate_method", "extra_options")
"""Settings that shape the activation ranges: a recipe reusing ranges must share them (the
calibrator measures float ranges; the activation type only maps them to integers)."""
_RECIPE_KEYS = ("int8_graph_sha256", "int8_size_bytes", "validation")


def _as_format_2(previous: dict[str, Any]) -> dict[str, Any]:
    """A recipe file of format 1 (one U8S8 recipe, validated on a VNNI CPU) as format 2."""
    if previous.get("format") != INT8_SPEC_FORMAT_1:
        return previous
    recipe = {"name": "u8s8-vnni", "cpu_any": list(VNNI_FLAGS), "settings": previous["settings"]}
    recipe.update({k: previous[k] for k in _RECIPE_KEYS if k in previous})
    return {
        "format": INT8_SPEC_FORMAT,
        "model_sha256": previous["model_sha256"],
        "calibration": previous["calibration"],
        "onnxruntime": previous["onnxruntime"],
        "recipes": [recipe],
        "tensors_data": previous["tensors_data"],
    }


def _previous_recipe(folder: Path, model_sha256: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The int8 recipe file already beside a model (as format 2), whose ranges fit
    ``settings``."""
    path = folder / INT8_SPEC_NAME
    try:
        previous = _as_format_2(json.loads(path.read_text(encoding="utf-8")))
        if previous["model_sha256"] != model_sha256:
            raise ValueError("it belongs to another model")
        if not isinstance(previous["tensors_data"].get("data"), dict):
            raise ValueError("it has no activation ranges")
        first = previous["recipes"][0]["settings"]
        differ = [k for k in CALIBRATION_KEYS if first.get(k) != settings.get(k)]
        if differ:
            raise ValueError(f"its ranges were calibrated with other {differ}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise InputError(f"no reusable int8 ranges in {path}: {exc}") from exc
    return previous


def make_int8_recipe(
    model_path: Path,
    data: Path,
    *,
    n_calibration: int = 32,
    settings: dict[str, Any] | None = None,
    runs: int = 5,
    batch: int = 4,
    update_card: bool = True,
    reuse_ranges: bool = False,
    recipe: str = "u8s8-vnni",
) -> QuantizeResult:
    """Calibrate, measure and write one recipe of ``int8_calibration.json`` beside ``model_path``.

    ``recipe`` names an entry of :data:`RECIPES` (its CPU class and default settings;
    ``settings`` overrides them). Measured on this machine's CPU: record which CPU class it is.
    With fresh ranges the file holds only this recipe; with ``reuse_ranges`` the file's other
    recipes are kept as they were measured.

    With ``reuse_ranges`` the activation ranges (and the record of how they were calibrated)
    come from the recipe already beside the model instead of a new calibration: for a change
    of the other settings, e.g. ``upsampling``, whose new tensors' ranges follow from the old.

    Raises:
        InputError: the model has no card with a train/test split, the data lacks its slices,
            or ``reuse_ranges`` finds no recipe of this model.
    """
    import onnxruntime as ort

    from .export import CARD_NAME

    if recipe not in RECIPES:
        raise InputError(f"unknown int8 recipe {recipe!r}; use one of {', '.join(RECIPES)}")
    settings = dict(RECIPES[recipe]["settings"] if settings is None else settings)
    folder = model_path.parent
    card_path = folder / CARD_NAME
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        split = Split.from_dict(card["training_data"]["split"])
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{card_path} with a training_data.split is needed: {exc}") from exc
    info = load_model_info(model_path)
    # The card's classes in channel order (export writes training_data.class_labels).
    classes = tuple(card["training_data"].get("class_labels") or ("ggo",))
    if len(classes) != info.n_channels:
        raise InputError(
            f"{card_path} names classes {list(classes)} for a model of {info.n_channels} "
            "channels"
        )
    labels = class_values(classes) if len(classes) > 1 else None
    slices = {s.id: s for s in training_data.load_slices(data, label=1, labels=labels)}
    missing = [i for i in (*split.ids("train"), *split.ids("test")) if i not in slices]
    if missing:
        raise InputError(f"{data} lacks slices of the model's split: {missing[:5]}")
    calibration = [slices[i] for i in split.ids("train")][:n_calibration]
    test = [slices[i] for i in split.ids("test")]
    previous = _previous_recipe(folder, info.recorded_sha256, settings) if reuse_ranges else None
    with tempfile.TemporaryDirectory(prefix="ggo-quantize-") as scratch:
        work = Path(scratch)
        cache = work / "calibration.json"
        if previous is None:  # calibrate: the train slices on the model grid
            reader = SliceReader(training_data.to_grid(calibration, info.input_size).images)
        else:
            cache.write_text(json.dumps(previous["tensors_data"]), encoding="utf-8")
            reader = None
        started = time.perf_counter()
        int8_path = quantize_int8(model_path, settings, cache, work, reader=reader)
        seconds = time.perf_counter() - started
        int8 = int8_path.read_bytes()
        tensors = json.loads(cache.read_text(encoding="utf-8"))
    if previous is None:
        log.info("int8 model made in %.0f s from %d slices", seconds, len(calibration))
    else:
        log.info("int8 model made in %.0f s from the previous recipe's ranges", seconds)
    calibration_record = (
        {
            "split": "train",
            "ids": [s.id for s in calibration],
            "data": str(data.name),
            "seconds": round(seconds, 1),
        }
        if previous is None
        else {**previous["calibration"], "ranges_reused": True}
    )
    validation = _accuracy(model_path, int8, test, classes)
    test_images = training_data.to_grid(test, info.input_size).images
    validation["speed_cpu"] = _speed(model_path, int8, test_images, batch, runs)
    validation["cpu"] = _cpu()
    validation["max_allowed_dice_change"] = MAX_INT8_DICE_CHANGE
    entry = {
        "name": recipe,
        "cpu_any": RECIPES[recipe]["cpu_any"],
        "settings": settings,
        "int8_graph_sha256": graph_digest(int8),
        "int8_size_bytes": len(int8),
        "onnxruntime": ort.__version__,
        "validation": validation,
    }
    kept = [r for r in (previous or {}).get("recipes", []) if r.get("name") != recipe]
    order = list(RECIPES)
    recipes = sorted([*kept, entry], key=lambda r: order.index(r["name"]) if r["name"] in order
                     else len(order))
    spec = {
        "format": INT8_SPEC_FORMAT,
        "model_sha256": info.recorded_sha256,
        "calibration": calibration_record,
        "onnxruntime": ort.__version__,
        "recipes": recipes,
        "tensors_data": tensors,
    }
    spec_path = folder / INT8_SPEC_NAME
    from .export import _write_text, write_sums

    _write_text(spec_path, json.dumps(spec, indent=1) + "\n")
    if update_card:
        card["int8"] = {
            "file": INT8_SPEC_NAME,
            "sha256_file": file_sha256(spec_path),
            "use": "ggo-cli rebuilds the int8 model on the CPU (--precision auto) from the first "
            "recipe that fits the CPU's features, when its graph digest matches "
            "int8_graph_sha256 and it agrees with float32 on the reference slices on that "
            "machine (ggo_cli.onnx.variant_check)",
            "recipes": [
                {
                    "name": r["name"],
                    "cpu_any": r["cpu_any"],
                    "settings": r["settings"],
                    "int8_graph_sha256": r["int8_graph_sha256"],
                    "onnxruntime": r.get("onnxruntime", spec["onnxruntime"]),
                    "test_pooled_dice_fp32": r["validation"]["test_fp32"]["dice"],
                    "test_pooled_dice_int8": r["validation"]["test_int8"]["dice"],
                    "pooled_dice_change": r["validation"]["pooled_dice_change"],
                    "cpu_speedup": r["validation"]["speed_cpu"]["speedup"],
                    "cpu": r["validation"]["cpu"].get("model"),
                    "cpu_flags": r["validation"]["cpu"].get("flags"),
                }
                for r in recipes
            ],
        }
        _write_text(card_path, json.dumps(card, indent=2) + "\n")
        write_sums(folder)
    return QuantizeResult(spec_path=spec_path, spec=spec, recipe=entry)
