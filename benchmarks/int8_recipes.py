"""int8 recipes on this CPU: agreement with float32, test Dice and model-only speed (issue 14).

For each candidate recipe (quantizer settings applied to the shipped activation ranges), it

- rebuilds the int8 model as ggo-cli does (:func:`ggo_cli.onnx.precision.quantize_int8`);
- runs ggo-cli's self-check figures against float32 on the model's reference slices
  (:func:`ggo_cli.onnx.variant_verdict.compare_masks`: GGO pixel change, pooled and worst-slice
  Dice);
- scores float32 and int8 on the model card's 10 test slices (pooled GGO Dice), as
  ``python -m training quantize`` does;
- times float32 and int8 with ONNX Runtime's CPU defaults in one process, alternating, two
  warm-ups each, ``--runs`` batches of ``--batch`` slices (median seconds per slice and ratio).

Usage::

    python benchmarks/int8_recipes.py --data ../shared/data/covid-semiseg-train \
        --out benchmarks/results/int8_recipes_cpu_2core_<date>.json

Run it under QEMU user mode (``qemu-x86_64 -cpu Haswell .venv/bin/python ...``) for the
numbers of an emulated CPU class (agreement only: emulated speed means nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CANDIDATES: dict[str, dict[str, Any]] = {
    "u8s8": {},
    "u8s8-reduce-range": {"reduce_range": True},
    "u8u8": {"weight_type": "QUInt8"},
    "s8s8": {"activation_type": "QInt8"},
}
"""Settings changed from the shipped U8S8 recipe's."""


def _session(source: str | bytes) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _masks(session: Any, x: Any, logit_threshold: float) -> Any:
    import numpy as np

    out = [session.run(["logits"], {"image": x[i : i + 4]})[0][:, 0] for i in range(0, len(x), 4)]
    return np.concatenate(out) > logit_threshold


def _speed(sessions: dict[str, Any], x: Any, runs: int) -> dict[str, float]:
    for session in sessions.values():
        for _ in range(2):
            session.run(["logits"], {"image": x})
    times: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for r in range(runs):
        for name in names if r % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            sessions[name].run(["logits"], {"image": x})
            times[name].append((time.perf_counter() - started) / len(x))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="COVID-SemiSeg labelled slices")
    parser.add_argument("--model", type=Path, help="default: the shipped model")
    parser.add_argument("--recipes", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--no-speed", action="store_true", help="agreement and Dice only")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import math

    import numpy as np
    import onnxruntime as ort

    from ggo_cli.config import default_model_path
    from ggo_cli.host import cpu_features
    from ggo_cli.onnx.int8_recipes import load_int8_spec
    from ggo_cli.onnx.model_info import load_model_info
    from ggo_cli.onnx.precision import graph_digest, quantize_int8
    from ggo_cli.onnx.reference_slices import load_reference_set
    from ggo_cli.onnx.variant_verdict import compare_masks
    from training import data as training_data
    from training.quantize import _accuracy
    from training.splits import Split

    model_path = args.model or default_model_path()
    info = load_model_info(model_path)
    spec = load_int8_spec(info)
    reference = load_reference_set(info)
    if spec is None or reference is None:
        raise SystemExit("the model needs int8_calibration.json and reference_slices.npz")
    base = next(r for r in spec.recipes if r.settings.get("activation_type") == "QUInt8")
    card = json.loads((model_path.parent / "model.json").read_text())
    split = Split.from_dict(card["training_data"]["split"])
    slices = {s.id: s for s in training_data.load_slices(args.data, label=1)}
    test = [slices[i] for i in split.ids("test")]
    test_images = training_data.to_grid(test, info.input_size).images
    x_speed = np.ascontiguousarray(test_images[: args.batch, None], np.float32)
    logit_threshold = math.log(info.threshold / (1.0 - info.threshold))
    x_ref = reference.batch()
    fp32 = _session(str(model_path))
    want = _masks(fp32, x_ref, logit_threshold)
    results: dict[str, Any] = {}
    for name in args.recipes:
        settings = {**base.settings, **CANDIDATES[name]}
        with tempfile.TemporaryDirectory(prefix="ggo-recipe-") as scratch:
            work = Path(scratch)
            cache = work / "calibration.json"
            cache.write_text(json.dumps(spec.tensors), encoding="utf-8")
            int8 = quantize_int8(model_path, settings, cache, work).read_bytes()
        session = _session(int8)
        figures = compare_masks(want, _masks(session, x_ref, logit_threshold), reference.names)
        accuracy = _accuracy(model_path, int8, test)
        entry: dict[str, Any] = {
            "settings_changed": CANDIDATES[name],
            "int8_graph_sha256": graph_digest(int8),
            "self_check": dataclasses.asdict(figures),
            "self_check_passes": not figures.failures(),
            "self_check_failures": figures.failures(),
            "test_pooled_dice_fp32": accuracy["test_fp32"]["dice"],
            "test_pooled_dice_int8": accuracy["test_int8"]["dice"],
            "test_pooled_dice_change": accuracy["pooled_dice_change"],
            "test_pixel_agreement": accuracy["pixel_agreement"],
        }
        if not args.no_speed:
            medians = _speed({"fp32": fp32, "int8": session}, x_speed, args.runs)
            entry["median_s_per_slice"] = medians
            entry["speedup"] = medians["fp32"] / medians["int8"]
        results[name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k != "self_check"}), flush=True)
    report = {
        "benchmark": "int8_recipes",
        "date": time.strftime("%Y-%m-%d"),
        "host": {
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            **cpu_features(),
        },
        "model": info.name,
        "reference_slices": list(reference.names),
        "batch": args.batch,
        "runs": args.runs,
        "recipes": results,
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
