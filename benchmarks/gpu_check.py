"""Inference throughput of ``ggo_cli.analysis.segmenter.OnnxSegmenter`` on CUDA (IO binding)
and CPU.

Measures, on one machine and in one run:

- model-only slices/s: ``predict_logits`` on preprocessed batches (host-to-device copy, run,
  device-to-host copy included), for each batch size;
- segment slices/s: ``predict`` on a synthetic HU volume (window, resize, run, sigmoid, map
  back, threshold), i.e. everything after decoding;
- agreement of CUDA and CPU masks (Dice) on the same slices.

Usage (see docs/benchmarks.md for the GPU machine recipe)::

    python benchmarks/gpu_check.py --model exported_models/ggo-resnet50-unet/model.onnx \
        --devices cuda cpu --batch-sizes 1 16 64 --out gpu_check.json

Medians of ``--repeats`` timed runs after one warm-up run are reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ggo_cli.analysis.preprocessing import preprocess_hu  # noqa: E402
from ggo_cli.analysis.segmenter import OnnxSegmenter  # noqa: E402
from ggo_cli.domain import CtVolume, SeriesInfo  # noqa: E402
from ggo_cli.onnx.model_info import load_model_info  # noqa: E402


def synthetic_hu(n: int, size: int = 512, seed: int = 0) -> np.ndarray:
    """A crude chest-like HU volume: air, body, two lungs, GGO blobs, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    hu = np.full((size, size), -1000.0, np.float32)
    hu[((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1] = 40.0
    for cx in (0.33, 0.67):
        hu[((xx - cx) / 0.13) ** 2 + ((yy - 0.5) / 0.22) ** 2 < 1] = -850.0
    hu[((xx - 0.3) / 0.05) ** 2 + ((yy - 0.45) / 0.06) ** 2 < 1] = -550.0
    vol = np.repeat(hu[None], n, axis=0)
    vol += rng.normal(0, 15, size=vol.shape).astype(np.float32)
    return vol


def _median_rate(fn: Any, n_items: int, repeats: int) -> float:
    fn()  # warm-up (cuDNN algorithm search, allocations)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n_items / statistics.median(times)


def main() -> int:
    """Run the benchmark and print (and optionally write) a JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--cpu-slices", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    model = load_model_info(args.model)
    report: dict[str, Any] = {
        "model": {
            "name": model.name,
            "architecture": model.architecture,
            "sha256": model.file_sha256,
        },
        "onnxruntime": ort.__version__,
        "providers_available": ort.get_available_providers(),
        "host": {"platform": platform.platform(), "processor": platform.processor()},
        "results": [],
    }
    masks: dict[str, np.ndarray] = {}
    for device in args.devices:
        n = args.slices if device.startswith("cuda") else args.cpu_slices
        hu = synthetic_hu(n, model.input_size)
        volume = CtVolume(SeriesInfo("1.2", "1.2.3", (), "bench"), hu, (), 1.0, (0.7, 0.7))
        for batch_size in args.batch_sizes:
            if not device.startswith("cuda") and batch_size > 16:
                continue
            seg = OnnxSegmenter(model, device=device, batch_size=batch_size)
            batch = preprocess_hu(hu[:batch_size], size=model.input_size)
            reps = max(1, 64 // batch_size) if device.startswith("cuda") else 1
            model_rate = _median_rate(
                lambda b=batch, s=seg, r=reps: [s.predict_logits(b) for _ in range(r)],
                batch_size * reps,
                args.repeats,
            )
            predict_rate = _median_rate(lambda s=seg, v=volume: s.predict(v), n, args.repeats)
            row = {
                "device": seg.device_label,
                "providers": seg.providers,
                "batch_size": batch_size,
                "model_slices_per_s": round(model_rate, 2),
                "predict_slices_per_s": round(predict_rate, 2),
            }
            print(json.dumps(row), flush=True)
            report["results"].append(row)
            if batch_size == 16 or device not in masks:
                masks[device] = seg.predict(
                    CtVolume(volume.series, hu[: args.cpu_slices], (), 1.0, (0.7, 0.7))
                ).ggo
    if len(masks) == 2:
        a, b = masks.values()
        inter = np.logical_and(a, b).sum()
        report["cuda_cpu_mask_dice"] = float(2 * inter / max(1, a.sum() + b.sum()))
        report["cuda_cpu_mask_voxels"] = [int(a.sum()), int(b.sum())]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
