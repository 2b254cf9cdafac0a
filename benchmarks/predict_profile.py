"""Where ``OnnxSegmenter.predict`` spends its time (issue 7 part 5: windowing must not show).

Loads one series, warms the session up on its first slices, then profiles ``predict`` over the
whole series with cProfile and reports the cumulative seconds of the pre- and post-processing
steps against the ONNX Runtime call, as JSON.

Usage::

    python benchmarks/predict_profile.py --input /data/one-series --device cpu --out p.json
    python benchmarks/predict_profile.py --input /tmp/e2e/studies/study0/ct --device cuda
    python benchmarks/predict_profile.py --input ... --device cuda --window-in-graph off

``_predict_windowed`` is the windowed graph (HU in, masks out: window and threshold inside it;
the CUDA default), the other steps the host path.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import platform
import pstats
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = (
    "window_hu",
    "to_model_grid",
    "predict_logits",
    "sigmoid",
    "to_source_grid",
    "threshold_probabilities",
    "_predict_windowed",
)
"""Functions reported, by name, wherever in ``ggo_cli`` they are defined."""
PACKAGE_DIR = (ROOT / "ggo_cli").as_posix()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="a folder with one CT series")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--slices", type=int, help="profile only the first N slices")
    parser.add_argument(
        "--window-in-graph",
        choices=["auto", "on", "off"],
        default="auto",
        help="window and threshold inside the graph (auto: on CUDA only)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from ggo_cli.analysis.segmenter import OnnxSegmenter
    from ggo_cli.config import default_model_path
    from ggo_cli.dicom.discovery import discover_series
    from ggo_cli.dicom.volume import load_volume
    from ggo_cli.onnx.model_info import load_model_info

    volume = load_volume(discover_series([args.input]).eligible[0])
    if args.slices:
        volume = dataclasses.replace(
            volume, hu=volume.hu[: args.slices], datasets=volume.datasets[: args.slices]
        )
    segmenter = OnnxSegmenter(
        load_model_info(default_model_path()),
        device=args.device,
        batch_size=args.batch_size,
        window_in_graph={"auto": None, "on": True, "off": False}[args.window_in_graph],
    )
    warm = dataclasses.replace(
        volume, hu=volume.hu[: segmenter.batch_size], datasets=volume.datasets[: 1]
    )
    segmenter.predict(warm)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    segmenter.predict(volume)
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    steps: dict[str, float] = {}
    for (filename, _, name), row in stats.stats.items():  # type: ignore[attr-defined]
        if name in STEPS and Path(filename).resolve().as_posix().startswith(PACKAGE_DIR):
            steps[name] = steps.get(name, 0.0) + float(row[3])  # cumulative seconds
    report: dict[str, Any] = {
        "host": {"platform": platform.platform(), "python": platform.python_version()},
        "device": segmenter.device_label,
        "providers": segmenter.providers,
        "precision": segmenter.precision.value,
        "batch_size": segmenter.batch_size,
        "window_in_graph": segmenter.window_in_graph,
        "slices": int(volume.hu.shape[0]),
        "hu_dtype": str(volume.hu.dtype),
        "wall_s": round(wall, 3),
        "slices_per_s": round(volume.hu.shape[0] / wall, 1),
        "cumulative_s": {k: round(v, 4) for k, v in sorted(steps.items())},
        "share_of_wall": {k: round(v / wall, 4) for k, v in sorted(steps.items())},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
