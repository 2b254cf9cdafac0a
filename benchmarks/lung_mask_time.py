"""Time the lung mask of one series in a fresh process: median of repeated calls.

For A/B comparisons of lung-mask changes: run it alternately from two checkouts (e.g. a
``git worktree`` of the base commit and the working tree) on the same series, in fresh
processes, and compare medians; the voxel counts show whether the masks changed size.

Usage::

    python benchmarks/lung_mask_time.py /data/one-series --repeats 3
    taskset -c 0 python benchmarks/lung_mask_time.py /data/one-series   # one core
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ggo_cli.analysis.lungs import segment_lungs  # noqa: E402
from ggo_cli.dicom.discovery import discover_series  # noqa: E402
from ggo_cli.dicom.volume import load_volume  # noqa: E402
from ggo_cli.host import usable_cores  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("series", type=Path, help="a folder with one CT series")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    volume = load_volume(discover_series([args.series]).eligible[0])
    lungs = segment_lungs(volume)  # warm-up: thread pools, SimpleITK's first calls
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        lungs = segment_lungs(volume)
        seconds.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "checkout": str(ROOT),
                "slices": volume.hu.shape[0],
                "cores": usable_cores(),
                "median_s": round(statistics.median(seconds), 3),
                "seconds": [round(s, 3) for s in seconds],
                "right_voxels": int(lungs.right.sum()),
                "left_voxels": int(lungs.left.sum()),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
