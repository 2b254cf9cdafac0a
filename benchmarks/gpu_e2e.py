"""End-to-end ``ggo-cli segment`` on a GPU: a synthetic uncompressed chest CT, several settings.

Issue 7 part 3 (">= 300 slices/s end to end on uncompressed series"). Writes ``--studies``
synthetic chest CTs of ``--slices`` slices (Explicit VR Little Endian, 512 x 512) and runs
``python -m ggo_cli segment --device cuda`` on them with the default settings (fp16 + NHWC,
lung mask, decoder processes) and with one setting changed at a time, each in a fresh process
and a fresh output folder. Reports wall time, slices/s and the manifest's timings.

Usage (the GPU machine recipe is in docs/benchmarks.md)::

    python benchmarks/gpu_e2e.py --work /tmp/e2e --out e2e.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("default (fp16 + NHWC, lung mask, decoders)", []),
    "fp32": ("--precision fp32", ["--precision", "fp32"]),
    "no-decoders": ("--decode-workers 0", ["--decode-workers", "0"]),
    "no-lung-mask": ("--no-lung-mask", ["--no-lung-mask"]),
}
"""Short name: (what the report calls it, extra ``ggo-cli segment`` arguments)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
        help="settings to run (default: all)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from ggo_cli.ct_writer import write_ct_series
    from ggo_cli.phantom import make_chest_phantom

    studies = args.work / "studies"
    if studies.exists():
        shutil.rmtree(studies)
    t0 = time.perf_counter()
    for k in range(args.studies):
        phantom = make_chest_phantom((args.slices, 512, 512), (1.25, 0.7, 0.7), seed=10 + k)
        write_ct_series(phantom, studies / f"study{k}" / "ct", seed=10 + k)
    report: dict[str, Any] = {
        "slices_per_study": args.slices,
        "studies": args.studies,
        "write_seconds": round(time.perf_counter() - t0, 1),
        "runs": [],
    }
    total = args.slices * args.studies
    for key in args.variants:
        name, extra = VARIANTS[key]
        out = args.work / ("out_" + "".join(c for c in name if c.isalnum())[:24])
        if out.exists():
            shutil.rmtree(out)
        command = [
            sys.executable,
            "-m",
            "ggo_cli",
            "segment",
            str(studies),
            "-o",
            str(out),
            "--device",
            args.device,
            "--settle",
            "0",
            "--no-progress",
            "--json",
            *extra,
        ]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
        seconds = time.perf_counter() - start
        row: dict[str, Any] = {
            "variant": name,
            "rc": done.returncode,
            "seconds": round(seconds, 2),
            "slices_per_s": round(total / seconds, 1),
        }
        manifest_path = out / "run_manifest.json"
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            row["device"] = manifest.get("device")
            row["timings_s"] = manifest.get("timings_s")
            row["series"] = [
                {k: s.get(k) for k in ("status", "ggo_volume_ml", "lung_volume_ml", "seconds")}
                for s in manifest.get("series", [])
            ]
            series_s = (manifest.get("timings_s") or {}).get("series")
            if series_s:
                row["slices_per_s_after_discovery"] = round(total / series_s, 1)
        if done.returncode != 0:
            row["stderr_tail"] = done.stderr[-1500:]
        print(json.dumps(row), flush=True)
        report["runs"].append(row)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
