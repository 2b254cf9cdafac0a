"""Time the lung mask of one series in a fresh process: median of repeated calls.

For A/B comparisons of lung-mask changes: run it alternately on two checkouts (``--checkout``,
e.g. a ``git worktree`` of the base commit, and the working tree) on the same series, in fresh
processes, and compare medians; the voxel counts show whether the masks changed size. It
prints wall seconds, CPU seconds of the process (all its threads: core-seconds) and the
process's peak RSS (``ru_maxrss``, decoded HU included; with ``--repeats 0`` the one call's).
With ``--planes N`` the masks are written into the SEG's planes as the CLI does
(:func:`ggo_cli.analysis.masks.segment_planes` of N model channels), and the lung calls' own
peak RSS is printed too (``VmHWM`` reset through ``/proc/self/clear_refs`` after decoding,
Linux only), with the RSS they started from.

Usage::

    python benchmarks/lung_mask_time.py /data/one-series --repeats 3
    taskset -c 0 python benchmarks/lung_mask_time.py /data/one-series   # one core
    python benchmarks/lung_mask_time.py /data/one-series --checkout /tmp/base --repeats 0
    python benchmarks/lung_mask_time.py /data/one-series --repeats 0 --planes 1   # as the CLI
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("series", type=Path, help="a folder with one CT series")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls after a warm-up call (0: the one call is timed)")
    parser.add_argument("--checkout", type=Path, default=ROOT,
                        help="the ggo-cli checkout whose lung mask runs (default: this one)")
    parser.add_argument("--planes", type=int, default=0, metavar="N",
                        help="write into the SEG's planes of N model channels (0: fresh masks)")
    args = parser.parse_args()
    sys.path.insert(0, str(args.checkout.resolve()))
    from ggo_cli.analysis.lungs import segment_lungs
    from ggo_cli.dicom.discovery import discover_series
    from ggo_cli.dicom.volume import load_volume
    from ggo_cli.host import usable_cores

    volume = load_volume(discover_series([args.series]).eligible[0])
    from ggo_cli.analysis.masks import segment_planes

    before = _memory()
    _reset_peak()
    seconds, cpu_seconds = [], []
    for _ in range(args.repeats + 1):  # the first call warms thread pools and SimpleITK up
        # fresh planes each call (as the CLI's): pages the lung mask leaves False stay unmapped
        out = segment_planes(volume.hu.shape, args.planes)[1] if args.planes else None
        start, cpu_start = time.perf_counter(), time.process_time()
        lungs = segment_lungs(volume, out=out)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    if args.repeats:
        seconds, cpu_seconds = seconds[1:], cpu_seconds[1:]
    print(
        json.dumps(
            {
                "checkout": str(args.checkout),
                "slices": volume.hu.shape[0],
                "cores": usable_cores(),
                "median_s": round(statistics.median(seconds), 3),
                "median_cpu_s": round(statistics.median(cpu_seconds), 3),
                "seconds": [round(s, 3) for s in seconds],
                "cpu_seconds": [round(s, 3) for s in cpu_seconds],
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "lung_start_rss_mib": before.get("VmRSS"),
                "lung_peak_rss_mib": _memory().get("VmHWM"),
                "right_voxels": int(lungs.right.sum()),
                "left_voxels": int(lungs.left.sum()),
            }
        )
    )
    return 0


def _memory() -> dict[str, Any]:
    """``VmRSS`` and ``VmHWM`` of this process in MiB (empty off Linux)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    return {key: round(int(value.split()[0]) / 1024) for key, value in
            (line.split(":", 1) for line in lines if ":" in line) if key in ("VmRSS", "VmHWM")}


def _reset_peak() -> None:
    """Start ``VmHWM`` afresh from the current RSS (Linux 4.0+; elsewhere nothing)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
