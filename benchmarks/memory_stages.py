"""Peak memory (RSS) of each stage of one series, to find what makes long series heavy.

Runs decode, the lung mask, inference (a cheap 512 x 512 HU-band model, so that the network's
own arena does not hide the rest), GGO restriction, the SEG build + write (with and without the
read-back check) and the overlay in one process, printing ``ru_maxrss`` (the peak so far) and
the wall time after each stage.

Usage::

    python benchmarks/memory_stages.py --slices 1000 --work /tmp/mem     # synthetic chest CT
    python benchmarks/memory_stages.py --input /data/one-series --work /tmp/mem
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--input", type=Path, help="a folder with one CT series")
    parser.add_argument("--slices", type=int, default=1000, help="synthetic series length")
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
    rows = []
    start = time.perf_counter()

    def stage(name: str) -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(
            {
                "stage": name,
                "peak_rss_mib": round(peak),
                "t_s": round(time.perf_counter() - start, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

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
    print(json.dumps({"slices": volume.hu.shape[0], "stages": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
