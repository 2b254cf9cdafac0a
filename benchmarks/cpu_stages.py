"""CPU core-seconds and peak RSS of each CPU stage of one series, for several commits in one run.

The stages around the model (issue 18): decode (uncompressed, in this process), the lung mask,
the SEG build + write + read-back check, and the overlay PNG; inference runs in between with the
cheap stand-in model of ``_models.py`` (reported, but not one of the CPU stages). A synthetic
chest CT of ``--slices`` 512 x 512 slices is written once (Explicit VR Little Endian).

Each measurement runs the whole series in a fresh process (this script with ``--worker``), so
that no peak RSS mixes with another's; ``--passes N`` (default 2) runs it N times in that
process, one series after the other as a nightly run does: the first pays the one-off costs of
a process (highdicom loads its tables of the standard, pydicom its dictionaries), the later ones
show what each further series costs. The ONNX Runtime session is created before the clock
starts. A stage's CPU seconds are the process's
``time.process_time()`` delta (every thread; plus its children's, although no stage starts a
process), its core-seconds when ``--one-core`` pins the worker to one core with
``os.sched_setaffinity``. After each stage the worker reads the stage's own peak RSS (Linux:
``VmHWM``, reset before each stage through ``/proc/self/clear_refs``); the process's peak so
far (after the last stage: the whole series' peak, imports included) is their running maximum.
``ru_maxrss`` cannot serve: Linux carries the parent's high-water mark over ``fork`` + ``exec``
into the child's ``ru_maxrss`` (the worker records it at its start: the parent's peak, which
held the phantom), and the reset lowers it as well. Each worker also times a fixed pure-Python
loop (``calibration_s``): the core's speed at the time, which drifts with the host's load.

``--ref REV`` (repeatable) runs the worker on a ``git worktree`` of ``REV`` (checked out under
a temporary folder and removed afterwards; the worker imports that tree's ``ggo_cli`` through
``PYTHONPATH``), alternating between the refs (ABAB...) ``--repeats`` times. Without ``--ref``
the working tree itself is measured. The report gives medians per ref and stage and the ratio
of the first ref's median to each other's (so ``--ref BASE --ref HEAD`` gives base / HEAD).
The worker calls only functions and keywords that exist at 5f99e6c (issue 18's base).
``--cli MODEL`` also runs the whole ``ggo-cli segment --device cpu`` of each ref after each
worker under GNU ``time`` (its maximum resident set; ``stand-in`` or the ``shipped`` model).

Usage::

    python benchmarks/cpu_stages.py --slices 300 --repeats 3 --one-core \\
        --ref 5f99e6c --ref HEAD --out benchmarks/results/cpu_stages_2core_<date>.json
    python benchmarks/cpu_stages.py --slices 1000 --repeats 1 --ref 5f99e6c --ref HEAD \\
        --cli stand-in --work /tmp/cpu1000 --out /tmp/cpu1000.json   # series kept there
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CPU_STAGES = ("decode", "lung mask", "SEG build + write + read-back", "overlay")
"""The stages whose core-seconds the issue adds up (``total``)."""
OTHER_STAGES = ("inference (stand-in) + restrict",)
STAGE_MODULES = (
    "ggo_cli.analysis.lungs", "ggo_cli.analysis.masks", "ggo_cli.analysis.segmenter",
    "ggo_cli.dicom.discovery", "ggo_cli.dicom.volume", "ggo_cli.host",
    "ggo_cli.onnx.model_info", "ggo_cli.writers.dicom_seg", "ggo_cli.writers.overlay_png",
)
"""What the worker imports before its clock starts."""
PHANTOM_SPACING_MM = (0.8, 0.7, 0.7)
PHANTOM_SEED = 5
CALIBRATION_LOOP = 5_000_000
CALIBRATION = "calibration loop (5 M additions)"
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")


def _cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its waited-for children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _stage_peak_mib() -> float:
    """``VmHWM``: the peak RSS since the last :func:`_reset_stage_peak`, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_stage_peak() -> None:
    """Start ``VmHWM`` afresh from the current RSS (Linux 4.0+, ``proc(5)`` clear_refs)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _calibration_seconds() -> float:
    """CPU seconds of a fixed pure-Python loop: how fast this core is now (it varies with the
    host's load, unseen from inside a virtual machine), to compare runs of different days."""
    start = time.process_time()
    total = 0
    for value in range(CALIBRATION_LOOP):
        total += value
    return round(time.process_time() - start, 3)


def _worker(args: argparse.Namespace) -> int:
    """Run every stage of one series in this process and print one JSON line of figures."""
    inherited_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.one_core:  # before numpy, SimpleITK and ONNX Runtime size their thread pools
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import ggo_cli

    for module in STAGE_MODULES:  # imported before the clock starts, as before passes existed
        importlib.import_module(module)
    from ggo_cli.analysis.segmenter import OnnxSegmenter
    from ggo_cli.onnx.model_info import load_model_info

    package = Path(ggo_cli.__file__).resolve().parent
    if package != (args.tree / "ggo_cli").resolve():
        raise SystemExit(f"imported {package}, not the tree under test {args.tree}")
    rows: list[dict[str, Any]] = []
    calibration_s = _calibration_seconds()
    cpu_start, wall_start = _cpu_seconds(), time.perf_counter()

    def stage(name: str, series_pass: int = 0) -> None:
        nonlocal cpu_start, wall_start
        cpu_now, wall_now = _cpu_seconds(), time.perf_counter()
        stage_peak = round(_stage_peak_mib())
        rows.append({
            "stage": name,
            "pass": series_pass,
            "cpu_s": round(cpu_now - cpu_start, 3),
            "wall_s": round(wall_now - wall_start, 3),
            "peak_rss_mib": max(rows[-1]["peak_rss_mib"] if rows else 0, stage_peak),
            "stage_peak_rss_mib": stage_peak,
        })
        _reset_stage_peak()
        cpu_start, wall_start = _cpu_seconds(), time.perf_counter()

    segmenter = OnnxSegmenter(load_model_info(args.model), device="cpu")
    stage("start")
    result: tuple[Any, ...] = ()
    for series_pass in range(1, args.passes + 1):
        result = ()  # the last series' arrays go before the next one is decoded
        result = _one_series(args, segmenter, stage, series_pass)
    volume, lungs, prediction, seg_path = result
    print(json.dumps({
        "ggo_cli": str(package),
        "calibration_s": calibration_s,
        "ru_maxrss_at_start_mib": round(inherited_mib),
        "slices": int(volume.hu.shape[0]),
        "hu_dtype": str(volume.hu.dtype),
        "affinity": sorted(os.sched_getaffinity(0)),
        "right_lung_voxels": int(lungs.right.sum()),
        "left_lung_voxels": int(lungs.left.sum()),
        "ggo_voxels": int(prediction.ggo.sum()),
        "seg_bytes": seg_path.stat().st_size,
        "stages": rows[1:],
    }))
    return 0


def _one_series(
    args: argparse.Namespace, segmenter: Any, stage: Any, series_pass: int
) -> tuple[Any, ...]:
    """Every stage of the series once, ``stage(name, series_pass)`` after each (the modules
    of :data:`STAGE_MODULES` are imported already)."""
    from ggo_cli.analysis.lungs import segment_lungs
    from ggo_cli.analysis.masks import keep_inside_lungs, model_masks, segment_planes
    from ggo_cli.dicom.discovery import discover_series
    from ggo_cli.dicom.volume import load_volume
    from ggo_cli.host import release_freed_memory
    from ggo_cli.writers.dicom_seg import write_seg
    from ggo_cli.writers.overlay_png import write_overlay

    volume = load_volume(discover_series([args.series]).eligible[0])
    stage("decode", series_pass)
    n_channels = segmenter.model.n_channels
    planes, lungs = segment_planes(volume.hu.shape, n_channels)  # as run/pipeline.py does
    segment_lungs(volume, out=lungs)
    release_freed_memory()
    stage("lung mask", series_pass)
    prediction = segmenter.predict(volume, out=model_masks(planes, n_channels))
    prediction = keep_inside_lungs(prediction, lungs)
    release_freed_memory()
    stage(OTHER_STAGES[0], series_pass)
    seg_path = write_seg(volume, prediction, segmenter.model, args.scratch / "seg.dcm",
                         lungs=lungs, verify=True)
    release_freed_memory()
    stage(CPU_STAGES[2], series_pass)
    write_overlay(volume, prediction.ggo, args.scratch / "overlay.png",
                  window_center_hu=segmenter.model.window_center_hu,
                  window_width_hu=segmenter.model.window_width_hu)
    stage("overlay", series_pass)
    return volume, lungs, prediction, seg_path


def _git(*args: str) -> str:
    """Run git in this checkout; its stdout, stripped."""
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def _machine() -> dict[str, Any]:
    """CPU model and features, cores, library versions and load of this machine."""
    import numpy
    import onnxruntime

    flags: set[str] = set()
    model = platform.processor()
    with open("/proc/cpuinfo") as info:
        for line in info:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {
        "cpu_model": model,
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
        "cores_online": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "kernel": platform.release(),
    }


def _load() -> dict[str, Any]:
    """``uptime``'s load averages (1, 5, 15 min) and the time."""
    return {"at": datetime.now(UTC).isoformat(timespec="seconds"),
            "loadavg": [round(value, 2) for value in os.getloadavg()]}


def _write_series(folder: Path, slices: int) -> Path:
    """The synthetic chest CT of ``slices`` slices in ``folder/series_<slices>`` (reused)."""
    sys.path.insert(0, str(ROOT))
    from ggo_cli.synthetic.ct_writer import write_ct_series
    from ggo_cli.synthetic.phantom import make_chest_phantom

    series = folder / f"series_{slices}"
    if series.is_dir() and len(list(series.glob("*.dcm"))) == slices:
        return series
    shutil.rmtree(series, ignore_errors=True)
    phantom = make_chest_phantom((slices, 512, 512), PHANTOM_SPACING_MM, seed=PHANTOM_SEED)
    write_ct_series(phantom, series, seed=PHANTOM_SEED)
    return series


def _cli_run(series: Path, model: Path | None, tree: Path, scratch: Path) -> dict[str, Any]:
    """``ggo-cli segment <series> --device cpu`` of ``tree`` under GNU ``time``: its maximum
    resident set, CPU and wall seconds and volumes (``model`` ``None``: the shipped model)."""
    scratch.mkdir(parents=True, exist_ok=True)  # the cwd: no ggo_cli to shadow the tree's
    timer, times = shutil.which("time") or "/usr/bin/time", scratch / "time.txt"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    package = subprocess.run([sys.executable, "-c", "import ggo_cli; print(ggo_cli.__file__)"],
                             cwd=scratch, env=env, capture_output=True, text=True, check=True)
    if not package.stdout.startswith(str(tree)):
        raise SystemExit(f"ggo-cli would run {package.stdout.strip()}, not {tree}")
    command = [timer, "-f", "%M %e %U %S", "-o", str(times), sys.executable, "-m", "ggo_cli",
               "segment", str(series), "--out", str(scratch / "out"), "--device", "cpu",
               *(["--model", str(model)] if model else [])]
    done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"ggo-cli failed ({done.returncode}):\n{done.stderr[-3000:]}")
    max_kib, wall, user, system = times.read_text().split()[-4:]
    with open(next((scratch / "out").rglob("ggo_volumes.csv"))) as table:
        row = next(csv.DictReader(table))
    return {"max_rss_mib": round(int(max_kib) / 1024), "max_rss_kib": int(max_kib),
            "wall_s": float(wall), "cpu_s": round(float(user) + float(system), 2),
            "ggo_volume_ml": float(row["ggo_volume_ml"]),
            "lung_volume_ml": float(row["lung_volume_ml"])}


def _measure(args: argparse.Namespace, series: Path, model: Path, trees: dict[str, Path],
             scratch: Path) -> dict[str, list[dict[str, Any]]]:
    """Run the worker for each ref, alternating, ``--repeats`` times; the runs per ref."""
    runs: dict[str, list[dict[str, Any]]] = {ref: [] for ref in trees}
    for repeat in range(args.repeats):
        for ref, tree in trees.items():
            command = [sys.executable, str(Path(__file__).resolve()), "--worker",
                       "--series", str(series), "--model", str(model), "--tree", str(tree),
                       "--scratch", str(scratch), "--passes", str(args.passes)]
            if args.one_core:
                command.append("--one-core")
            env = {**os.environ, "PYTHONPATH": str(tree)}
            load_before = _load()
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"worker for {ref} failed:\n{done.stderr[-3000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            if args.cli:
                shipped = args.cli == "shipped"
                run["cli"] = _cli_run(series, None if shipped else model, tree, scratch)
            run.update(repeat=repeat, load_before=load_before, load_after=_load())
            runs[ref].append(run)
            totals = [sum(row["cpu_s"] for row in run["stages"]
                          if row["stage"] in CPU_STAGES and row["pass"] == series_pass)
                      for series_pass in range(1, args.passes + 1)]
            print(f"# {ref} run {repeat + 1}: CPU stages "
                  f"{' / '.join(f'{total:.2f}' for total in totals)} core-s (each series), "
                  f"peak RSS {run['stages'][-1]['peak_rss_mib']} MiB", file=sys.stderr,
                  flush=True)
            shutil.rmtree(scratch, ignore_errors=True)
    return runs


def _summary(runs: dict[str, list[dict[str, Any]]], series_pass: int = 1) -> dict[str, Any]:
    """Medians per ref and stage of the ``series_pass``-th series of each process, the CPU
    stages' total, and first ref / each other ref."""
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for ref, ref_runs in runs.items():
        per_stage: dict[str, dict[str, float]] = {}
        for name in (*CPU_STAGES, *OTHER_STAGES):
            rows = [row for run in ref_runs for row in run["stages"]
                    if row["stage"] == name and row["pass"] == series_pass]
            per_stage[name] = {key: statistics.median(row[key] for row in rows)
                               for key in ("cpu_s", "wall_s", "peak_rss_mib",
                                           "stage_peak_rss_mib")}
        total = {key: statistics.median(sum(row[key] for row in run["stages"]
                                            if row["stage"] in CPU_STAGES
                                            and row["pass"] == series_pass)
                                        for run in ref_runs)
                 for key in ("cpu_s", "wall_s")}
        series_peak = statistics.median(run["stages"][-1]["peak_rss_mib"] for run in ref_runs)
        per_stage["total"] = {**total, "peak_rss_mib": series_peak,
                              "stage_peak_rss_mib": series_peak}
        per_stage[CALIBRATION] = {"cpu_s": statistics.median(run["calibration_s"]
                                                             for run in ref_runs)}
        medians[ref] = per_stage
    first, *others = list(runs)
    ratios = {
        f"{first} / {other}": {
            name: {key: round(value / medians[other][name][key], 3)
                   for key, value in figures.items() if medians[other][name].get(key)}
            for name, figures in medians[first].items()
        }
        for other in others
    }
    cli = {ref: {key: statistics.median(run["cli"][key] for run in ref_runs)
                 for key in ("max_rss_mib", "cpu_s", "wall_s")}
           for ref, ref_runs in runs.items() if "cli" in ref_runs[0]}
    return {"median": medians, "ratio": ratios, "cli": cli}


def _markdown(report: dict[str, Any], key: str = "summary") -> str:
    """A table of median core-seconds per stage and ref, the ratios, and each stage's own peak
    RSS (on the total's row: the process's peak so far), from ``report[key]``."""
    refs = list(report["refs"])
    ratio_keys = list(report[key]["ratio"])
    unit = "core-s" if report["one_core"] else "CPU s"
    head = ["stage", *(f"{ref} {unit}" for ref in refs), *(f"{key} {unit}" for key in ratio_keys),
            *(f"{ref} peak RSS MiB" for ref in refs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    median, ratio = report[key]["median"], report[key]["ratio"]
    for name in (*CPU_STAGES, "total", *OTHER_STAGES, CALIBRATION):
        cells = [name, *(f"{median[ref][name]['cpu_s']:.2f}" for ref in refs),
                 *(f"{ratio[key][name].get('cpu_s', float('nan')):.2f}" for key in ratio_keys),
                 *(str(round(median[ref][name]["stage_peak_rss_mib"]))
                   if name != CALIBRATION else "" for ref in refs)]
        lines.append("| " + " | ".join(cells) + " |")
    for ref, figures in report[key]["cli"].items():
        lines.append(f"\n`ggo-cli segment --device cpu` ({report['cli']} model) at {ref}: "
                     f"maximum RSS {figures['max_rss_mib']:.0f} MiB, "
                     f"{figures['cpu_s']:.1f} CPU s, {figures['wall_s']:.1f} s")
    return "\n".join(lines)


def _parent(args: argparse.Namespace) -> int:
    """Write the series, check out the refs, run the workers and report."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _models import write_stand_in_model

    started = _load()
    temp = Path(tempfile.mkdtemp(prefix="cpu_stages_"))
    work = args.work or temp
    work.mkdir(parents=True, exist_ok=True)
    trees: dict[str, Path] = {}
    commits: dict[str, str] = {}
    try:
        series = _write_series(work, args.slices)
        model = write_stand_in_model(temp / "band512.onnx", 512)
        for ref in args.ref or []:
            commits[ref] = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
            trees[ref] = temp / f"tree_{len(trees)}"
            _git("worktree", "add", "--detach", str(trees[ref]), commits[ref])
        if not trees:
            trees["working tree"], commits["working tree"] = ROOT, _git("rev-parse", "HEAD")
        runs = _measure(args, series, model, trees, temp / "scratch")
    finally:
        for tree in trees.values():
            if tree != ROOT:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tree)], check=False, capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)
    report: dict[str, Any] = {
        "benchmark": "cpu_stages",
        "date": datetime.now(UTC).date().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": _machine(),
        "load": {"start": started, "end": _load()},
        "slices": args.slices,
        "series": f"synthetic chest phantom {args.slices} x 512 x 512, spacing "
                  f"{PHANTOM_SPACING_MM} mm, seed {PHANTOM_SEED}, Explicit VR Little Endian",
        "one_core": args.one_core,
        "cli": args.cli,
        "repeats": args.repeats,
        "refs": commits,
        "cpu_stages": list(CPU_STAGES),
        "passes": args.passes,
        "summary": _summary(runs),
        "summary_later_series": _summary(runs, args.passes) if args.passes > 1 else None,
        "runs": runs,
    }
    report["markdown"] = "First series of a process:\n\n" + _markdown(report)
    if args.passes > 1:
        report["markdown"] += (f"\n\nSeries {args.passes} of a process (one-off costs such as"
                               " highdicom's tables paid already):\n\n"
                               + _markdown(report, "summary_later_series"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(report["markdown"])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300, help="synthetic series length")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per ref")
    parser.add_argument("--ref", action="append", help="a commit to measure (repeatable)")
    parser.add_argument("--one-core", action="store_true", help="pin each worker to one core")
    parser.add_argument("--passes", type=int, default=2,
                        help="series run one after the other in each worker process")
    parser.add_argument("--cli", choices=("stand-in", "shipped"),
                        help="after each worker, time `ggo-cli segment` with this model too")
    parser.add_argument("--work", type=Path, help="keep the series here (default: temporary)")
    parser.add_argument("--out", type=Path, help="the JSON report")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--series", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.scratch.mkdir(parents=True, exist_ok=True)
        return _worker(args)
    if min(args.repeats, args.slices, args.passes) < 1:
        parser.error("--repeats, --slices and --passes must be at least 1")
    return _parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
