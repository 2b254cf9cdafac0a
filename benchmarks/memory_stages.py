"""Peak memory (RSS) and CPU time of each stage of one series, to find what makes long series
heavy.

Runs decode, the lung mask, inference (a cheap 512 x 512 HU-band model, so that the network's
own arena does not hide the rest), GGO restriction, the SEG build + write (with and without the
read-back check) and the overlay in one process, printing after each stage: the peak RSS so
far, the stage's own peak RSS and how far it rose above the RSS the stage started
with (Linux: the peak is reset before each stage by writing 5 to ``/proc/self/clear_refs``),
the stage's CPU seconds (all threads; under ``taskset -c 0`` its core-seconds) and the wall
time so far.

Usage::

    python benchmarks/memory_stages.py --slices 1000 --work /tmp/mem     # synthetic chest CT
    python benchmarks/memory_stages.py --input /data/one-series --work /tmp/mem
    python benchmarks/memory_stages.py --input /tmp/mem/series --work /tmp/mem-base \\
        --root /tmp/base      # the same stages on another commit's code (a git worktree)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def _checkout() -> Path:
    """The checkout whose ``ggo_cli`` runs: ``--root PATH`` (a worktree of another commit, to
    measure before and after with the same script), else this one."""
    if "--root" in sys.argv[:-1]:
        return Path(sys.argv[sys.argv.index("--root") + 1]).resolve()
    return Path(__file__).resolve().parents[1]


ROOT = _checkout()
sys.path.insert(0, str(ROOT))

from _models import write_stand_in_model  # noqa: E402

from ggo_cli.analysis.lungs import segment_lungs  # noqa: E402
from ggo_cli.analysis.masks import (  # noqa: E402
    keep_inside_lungs,
    model_masks,
    segment_planes,
)
from ggo_cli.analysis.segmenter import OnnxSegmenter  # noqa: E402
from ggo_cli.dicom.discovery import discover_series  # noqa: E402
from ggo_cli.dicom.volume import load_volume  # noqa: E402
from ggo_cli.onnx.model_info import load_model_info  # noqa: E402
from ggo_cli.synthetic.ct_writer import write_ct_series  # noqa: E402
from ggo_cli.synthetic.phantom import make_chest_phantom  # noqa: E402
from ggo_cli.writers.dicom_seg import write_seg  # noqa: E402
from ggo_cli.writers.overlay_png import write_overlay  # noqa: E402


def _rss_mib() -> dict[str, float]:
    """The process's resident set now (``VmRSS``) and its peak since the last reset (``VmHWM``)."""
    with open("/proc/self/status") as status:
        return {
            key: int(value.split()[0]) / 1024
            for key, _, value in (line.partition(":") for line in status)
            if key in ("VmRSS", "VmHWM")
        }


def _reset_stage_peak() -> None:
    """Start ``VmHWM`` afresh from the current RSS (Linux 4.0+, ``proc(5)`` clear_refs)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--input", type=Path, help="a folder with one CT series")
    parser.add_argument("--slices", type=int, default=1000, help="synthetic series length")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose code runs")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.input
    if source is None:
        source = args.work / "series"
        if source.exists():
            shutil.rmtree(source)
        phantom = make_chest_phantom((args.slices, 512, 512), (0.8, 0.7, 0.7), seed=5)
        write_ct_series(phantom, source, seed=5)
        del phantom
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    began = {"cpu_s": time.process_time(), "rss_mib": _rss_mib()["VmRSS"]}
    _reset_stage_peak()

    def stage(name: str) -> None:
        now = _rss_mib()
        # ru_maxrss follows the reset too: the run's peak is the largest stage peak so far
        peak = max([now["VmHWM"], *(row["stage_peak_rss_mib"] for row in rows)])
        rows.append(
            {
                "stage": name,
                "peak_rss_mib": round(peak),
                "stage_peak_rss_mib": round(now["VmHWM"]),
                "stage_rise_mib": round(now["VmHWM"] - began["rss_mib"]),
                "cpu_s": round(time.process_time() - began["cpu_s"], 2),
                "t_s": round(time.perf_counter() - start, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        began.update(cpu_s=time.process_time(), rss_mib=now["VmRSS"])
        _reset_stage_peak()

    model = write_stand_in_model(args.work / "band512.onnx", 512)
    stage("start")
    volume = load_volume(discover_series([source]).eligible[0])
    stage("decode")
    segmenter = OnnxSegmenter(load_model_info(model), device="cpu")
    n_channels = segmenter.model.n_channels
    # as the pipeline does: the lungs and then the masks go straight into the SEG's planes
    planes, lungs = segment_planes(volume.hu.shape, n_channels)
    segment_lungs(volume, out=lungs)
    stage("lung mask")
    prediction = segmenter.predict(volume, out=model_masks(planes, n_channels))
    stage("inference")
    prediction = keep_inside_lungs(prediction, lungs)
    stage("restrict")
    out = args.work / "out"
    write_seg(volume, prediction, segmenter.model, out / "a.seg.dcm", lungs=lungs, verify=False)
    stage("SEG build + write")
    write_seg(volume, prediction, segmenter.model, out / "b.seg.dcm", lungs=lungs, verify=True)
    stage("SEG + read-back check")
    write_overlay(
        volume, prediction.ggo, out / "overlay.png", window_center_hu=-600.0, window_width_hu=1500.0
    )
    stage("overlay")
    print(json.dumps({"root": str(ROOT), "slices": volume.hu.shape[0], "stages": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
