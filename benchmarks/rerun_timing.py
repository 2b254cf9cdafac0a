"""Time a first, second and third ``ggo-cli segment`` run over the same folder (issue: nightly).

The second and third runs find every series unchanged in the state store and must only skip.
Usage: ``python benchmarks/rerun_timing.py --work /tmp/rerun [--slices 48]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ggo_cli.synthetic.ct_writer import write_ct_series  # noqa: E402
from ggo_cli.synthetic.phantom import make_chest_phantom  # noqa: E402


def main() -> int:
    """Write a synthetic study, run segment three times, report wall times and the CSV check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=48)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    study = args.work / "studies" / "s1"
    write_ct_series(make_chest_phantom(shape=(args.slices, 512, 512), seed=1), study, seed=1)
    out = args.work / "results"
    command = [
        "ggo-cli",
        "-q",
        "segment",
        str(args.work / "studies"),
        "-o",
        str(out),
        "--settle",
        "0",
        "--no-progress",
        "--device",
        "cpu",
    ]
    times, csvs = [], []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
        csvs.append((out / "ggo_volumes.csv").read_bytes())
    manifest = json.loads((out / "run_manifest.json").read_text())
    report = {
        "host": platform.platform(),
        "slices": args.slices,
        "seconds": [round(t, 2) for t in times],
        "third_over_first": round(times[2] / times[0], 3),
        "csv_unchanged": csvs[0] == csvs[1] == csvs[2],
        "third_run_counts": manifest["counts"],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
