"""End-to-end ``ggo-cli segment`` on a GPU: a synthetic uncompressed chest CT, several settings.

Issue 7 part 3 (">= 300 slices/s end to end on uncompressed series"). Writes ``--studies``
synthetic chest CTs of ``--slices`` slices (Explicit VR Little Endian, 512 x 512) and runs
``python -m ggo_cli segment --device cuda`` on them with the default settings (fp16 + NHWC,
lung mask, decoder processes) and with one setting changed at a time, each in a fresh process
and a fresh output folder. Reports wall time, slices/s and the manifest's timings.

``--jobs 1 4 8`` adds one run per value of ``ggo-cli segment --jobs`` (whole series in worker
processes). ``--device cpu --stand-in-model`` runs the same on the CPU with a trivial model
standing in for a GPU's fast inference, to time the CPU stages alone. Each run also reports
how busy the machine's cores were (``/proc/stat``) and, on a GPU, the GPU's utilization
(``nvidia-smi`` every 0.5 s): whether the cores or the card set the pace.

Usage (the GPU machine recipe is in docs/benchmarks.md)::

    python benchmarks/gpu_e2e.py --work /tmp/e2e --out e2e.json
    python benchmarks/gpu_e2e.py --work /tmp/e2e --variants --jobs 1 4 8
    python benchmarks/gpu_e2e.py --work /tmp/e2e --device cpu --stand-in-model --studies 4 \
        --variants default --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("default settings (CUDA: fp16 + NHWC; lung mask; decoders)", []),
    "fp32": ("--precision fp32", ["--precision", "fp32"]),
    "no-decoders": ("--decode-workers 0", ["--decode-workers", "0"]),
    "no-lung-mask": ("--no-lung-mask", ["--no-lung-mask"]),
}
"""Short name: (what the report calls it, extra ``ggo-cli segment`` arguments)."""


def _tree_rss(root: int) -> int:
    """Resident bytes of process ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            statm = (entry / "statm").read_text().split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        rss[int(entry.name)] = int(statm[1]) * page
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def _cpu_times() -> tuple[int, int] | None:
    """The machine's CPU time so far, all cores: (total, idle + iowait) in clock ticks."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields[:8]), fields[3] + fields[4]  # user .. steal; guest is inside user


def _gpu_monitor(device: str) -> subprocess.Popen[str] | None:
    """``nvidia-smi`` printing the GPU's utilization every 0.5 s (None on the CPU or without
    it)."""
    if device == "cpu" or shutil.which("nvidia-smi") is None:
        return None
    return subprocess.Popen(
        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
         "--loop-ms=500"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _utilization(
    cpu_before: tuple[int, int] | None, monitor: subprocess.Popen[str] | None
) -> dict[str, Any]:
    """How busy the machine's cores and the GPU were during a run: are the CPU stages the
    limit (cores near 100 %) or is there room for more ``--jobs``?"""
    found: dict[str, Any] = {}
    cpu_after = _cpu_times()
    if cpu_before and cpu_after and cpu_after[0] > cpu_before[0]:
        busy = 1.0 - (cpu_after[1] - cpu_before[1]) / (cpu_after[0] - cpu_before[0])
        found["cpu_busy_percent"] = round(100.0 * busy, 1)
        found["cpu_busy_cores"] = round(busy * (os.cpu_count() or 1), 1)
    if monitor is not None:
        monitor.terminate()
        out, _ = monitor.communicate()
        samples = [int(v) for v in out.split() if v.isdigit()]
        if samples:
            found["gpu_util_percent_mean"] = round(sum(samples) / len(samples), 1)
            found["gpu_util_percent_max"] = max(samples)
    return found


def _run_sampled(command: list[str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``command``; also the peak summed RSS of its process tree (sampled every 0.25 s)."""
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.25):
            peak = max(peak, _tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    if Path("/proc/self/statm").exists():
        sampler.start()
    out, err = proc.communicate()
    stop.set()
    if sampler.is_alive():
        sampler.join()
    return subprocess.CompletedProcess(command, proc.returncode, out, err), peak


def _host() -> dict[str, Any]:
    """This machine: platform and ``ggo-cli info``'s host entry (cores, memory, the automatic
    ``--jobs``); the stages that scale with ``--jobs`` run on the CPU."""
    import platform

    from ggo_cli.cli.info import host_status

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        **host_status(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
        help="settings to run (default: all; none: only the --jobs runs)",
    )
    parser.add_argument(
        "--jobs", type=int, nargs="*", default=[], help="also run with each --jobs value"
    )
    parser.add_argument("--model", type=Path, help="model to run (default: the shipped one)")
    parser.add_argument(
        "--stand-in-model",
        action="store_true",
        help="run a trivial 512 x 512 HU-band model (benchmarks/_models.py) instead of the "
        "network: times the CPU stages alone, as if inference were free",
    )
    parser.add_argument(
        "--reuse-studies",
        action="store_true",
        help="keep the studies an earlier run wrote with the same --studies and --slices",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = [VARIANTS[key] for key in args.variants]
    runs += [(f"--jobs {n}", ["--jobs", str(n)]) for n in args.jobs]
    if args.stand_in_model:
        from _models import write_stand_in_model

        args.work.mkdir(parents=True, exist_ok=True)
        args.model = write_stand_in_model(args.work / "band512.onnx", 512)
    if args.model is not None:
        runs = [(name, [*extra, "--model", str(args.model.resolve())]) for name, extra in runs]

    from ggo_cli.synthetic.ct_writer import write_ct_series
    from ggo_cli.synthetic.phantom import make_chest_phantom

    studies = args.work / "studies"
    stamp = studies / f".written-{args.studies}x{args.slices}"
    t0 = time.perf_counter()
    if not (args.reuse_studies and stamp.exists()):
        if studies.exists():
            shutil.rmtree(studies)
        for k in range(args.studies):
            phantom = make_chest_phantom((args.slices, 512, 512), (1.25, 0.7, 0.7), seed=10 + k)
            write_ct_series(phantom, studies / f"study{k}" / "ct", seed=10 + k)
        stamp.touch()
    report: dict[str, Any] = {
        "slices_per_study": args.slices,
        "studies": args.studies,
        "write_seconds": round(time.perf_counter() - t0, 1),
        "runs": [],
    }
    total = args.slices * args.studies
    report["model"] = str(args.model) if args.model else "shipped"
    report["device_requested"] = args.device
    report["host"] = _host()
    for name, extra in runs:
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
        cpu_before, monitor = _cpu_times(), _gpu_monitor(args.device)
        start = time.perf_counter()
        done, peak = _run_sampled(command)
        seconds = time.perf_counter() - start
        busy = _utilization(cpu_before, monitor)
        row: dict[str, Any] = {
            "variant": name,
            "rc": done.returncode,
            "seconds": round(seconds, 2),
            "slices_per_s": round(total / seconds, 1),
            "peak_tree_rss_gib": round(peak / 2**30, 2),
            **busy,
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
