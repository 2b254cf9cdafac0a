"""CPU throughput of ggo-cli: model only, decoding, end to end; JSON plus a Markdown table.

Issue 7 part 1. In one run on one machine:

- **model only** (slices/s, 512 x 512, preprocessed input): ONNX Runtime defaults on the plain
  shipped ``model.onnx`` (the fp32 baseline), then ``OnnxSegmenter`` with each CPU precision it
  offers (``fp32``, ``int8``); where torch is installed, PyTorch eager on the same architecture
  (``training.models``, weights irrelevant to speed) in fp32 and in bf16 autocast with
  channels_last, the ratio baseline;
- **decode** (slices/s, one process): pydicom ``dcmread`` + ``pixel_array`` of the same
  synthetic CT slices written in each lossless transfer syntax ggo-cli reads;
- **end to end**: ``ggo-cli segment --device cpu`` as a subprocess (discovery, decode, lung mask,
  inference, SEG write + read-back, PNG, CSV) on a synthetic chest CT of ``--slices`` slices,
  on the shared real 30-slice chest CT, and on that CT linearly resampled along z to
  ``--real-slices`` thin slices (255 by default: the shared data has no long real series), all
  JPEG Lossless SV1, for ``--precision fp32`` and ``--precision auto``: slices/s, studies/hour
  and the peak RSS of the run.

Usage::

    python benchmarks/throughput.py --work /tmp/tp --out benchmarks/results/throughput_cpu.json
    python benchmarks/throughput.py --work /tmp/tp --quick      # CI smoke: small sizes

Medians of ``--repeats`` timed runs after one warm-up for the model and decode figures; end to
end runs once per case (each run takes minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom

ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = ROOT.parent / "shared" / "data" / "ct-dicom" / "lung-pet-ct-dx-a0002" / "dicom"
sys.path.insert(0, str(ROOT))

from ggo_cli.analysis.preprocessing import preprocess_hu  # noqa: E402
from ggo_cli.analysis.segmenter import OnnxSegmenter  # noqa: E402
from ggo_cli.config import default_model_path  # noqa: E402
from ggo_cli.host import cpu_features  # noqa: E402
from ggo_cli.onnx.model_info import load_model_info  # noqa: E402
from ggo_cli.synthetic.ct_writer import (  # noqa: E402
    SUPPORTED_TRANSFER_SYNTAXES,
    SeriesAttributes,
    transcode_file,
    write_ct_series,
)
from ggo_cli.synthetic.phantom import make_chest_phantom  # noqa: E402

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    """CPU model, cores usable, vector extensions, memory, library versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cores_usable": len(os.sched_getaffinity(0)),
    }
    cpu = cpu_features()
    if "model" in cpu:
        info["cpu"] = cpu["model"]
    if "flags" in cpu:
        info["flags"] = sorted(cpu["flags"])
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()[0]
        info["memory_kib"] = int(meminfo.split()[1])
    except OSError:
        pass
    import onnxruntime as ort

    info["onnxruntime"] = ort.__version__
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


def bench_model(model_path: Path, n: int, repeats: int) -> list[dict[str, Any]]:
    """Model-only slices/s: plain ORT defaults, OnnxSegmenter per precision, PyTorch eager."""
    import onnxruntime as ort

    info = load_model_info(model_path)
    hu = make_chest_phantom((n, 512, 512), (5.0, 0.7, 0.7), seed=1).hu.astype(np.float32)
    batch = preprocess_hu(hu, size=info.input_size)
    rows: list[dict[str, Any]] = []
    plain = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    seconds = median_seconds(lambda s=plain: s.run(["logits"], {"image": batch}), repeats)
    rows.append(
        {
            "path": "ORT defaults, plain model.onnx (fp32 baseline)",
            "key": "ort_plain_fp32",
            "slices_per_s": n / seconds,
        }
    )
    del plain
    for precision in ("fp32", "int8"):
        try:
            seg = OnnxSegmenter(info, device="cpu", batch_size=n, precision=precision)
        except Exception as exc:  # noqa: BLE001 - report, do not fail
            rows.append(
                {"path": f"OnnxSegmenter {precision}", "key": f"ggo_{precision}", "error": str(exc)}
            )
            continue
        seconds = median_seconds(lambda s=seg: s.predict_logits(batch), repeats)
        rows.append(
            {
                "path": f"OnnxSegmenter --precision {precision}",
                "key": f"ggo_{precision}",
                "slices_per_s": n / seconds,
            }
        )
        del seg
    try:
        import torch

        from training.models import build_model
    except ImportError:
        return rows
    model = build_model("resnet50-unet").eval()
    x = torch.from_numpy(batch)
    with torch.inference_mode():
        seconds = median_seconds(lambda: model(x), repeats)
        rows.append(
            {"path": "PyTorch eager fp32", "key": "torch_fp32", "slices_per_s": n / seconds}
        )
        model_cl = model.to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)

        def bf16() -> object:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model_cl(x_cl)

        seconds = median_seconds(bf16, repeats)
        rows.append(
            {
                "path": "PyTorch eager bf16 autocast, channels_last",
                "key": "torch_bf16",
                "slices_per_s": n / seconds,
            }
        )
    return rows


def bench_decode(work: Path, n: int, repeats: int) -> list[dict[str, Any]]:
    """pydicom decode slices/s per transfer syntax (one process)."""
    import pydicom

    hu = make_chest_phantom((n, 512, 512), (5.0, 0.7, 0.7), seed=2)
    base = work / "decode" / "native"
    if base.exists():
        shutil.rmtree(base.parent)
    files = write_ct_series(hu, base)
    rows = []
    for syntax in SUPPORTED_TRANSFER_SYNTAXES:
        folder = work / "decode" / syntax
        folder.mkdir(parents=True, exist_ok=True)
        coded = [transcode_file(f, folder / f.name, syntax, verify=False) for f in files]

        def decode(paths: list[Path] = coded) -> None:
            for p in paths:
                pydicom.dcmread(p).pixel_array  # noqa: B018 - the decode is the point

        seconds = median_seconds(decode, repeats)
        name = pydicom.uid.UID(syntax).name
        rows.append(
            {
                "transfer_syntax": syntax,
                "name": name,
                "slices_per_s": n / seconds,
                "mean_file_kib": sum(p.stat().st_size for p in coded) / len(coded) / 1024,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def real_ct_resampled(slices: int) -> tuple[npt.NDArray[np.int16], tuple[float, float, float],
                                          tuple[float, float, float]]:
    """The shared real chest CT in HU, linearly interpolated along z to ``slices`` slices.

    The shared data has no long real series; this one keeps the real anatomy, pixel size and
    extent (bases to apices, 232 mm) of Lung-PET-CT-Dx A0002 at a thin-slice spacing
    (255 slices: 0.91 mm). Its first and last slices are the real ones; slices between two real
    ones are their weighted mean, so they are a little less noisy than a true thin-slice scan.

    Returns:
        HU volume ``(slice, row, col)`` feet first, ``(slice, row, col)`` spacing in mm, and
        the patient position of voxel ``(0, 0, 0)``.
    """
    datasets = sorted(
        (pydicom.dcmread(path) for path in SHARED_CT.glob("*.dcm")),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])
    hu = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets]
    ).astype(np.float32)
    target = np.linspace(z[0], z[-1], slices)
    below = np.clip(np.searchsorted(z, target, side="right") - 1, 0, len(z) - 2)
    weight = ((target - z[below]) / (z[below + 1] - z[below])).astype(np.float32)[:, None, None]
    volume = np.rint(hu[below] * (1.0 - weight) + hu[below + 1] * weight).astype(np.int16)
    _check_resampling(volume, hu, z, target)
    row_mm, col_mm = (float(v) for v in datasets[0].PixelSpacing)
    x0, y0 = (float(v) for v in datasets[0].ImagePositionPatient[:2])
    return volume, (float(target[1] - target[0]), row_mm, col_mm), (x0, y0, float(z[0]))


def _check_resampling(
    volume: npt.NDArray[np.int16],
    hu: npt.NDArray[np.float32],
    z: npt.NDArray[np.float64],
    target: npt.NDArray[np.float64],
) -> None:
    """Stop the benchmark if its series is not the real CT: every target position that is a
    real slice's must hold that slice exactly, the ends are the real ends, and every slice lies
    between its two real neighbours (a weighted mean)."""
    if target[0] != z[0] or target[-1] != z[-1]:
        raise AssertionError("the resampled series does not span the real extent")
    for index, position in enumerate(target):
        match = np.flatnonzero(np.isclose(z, position, rtol=0.0, atol=1e-6))
        if match.size and not np.array_equal(volume[index], np.rint(hu[match[0]])):
            raise AssertionError(f"resampled slice {index} is not the real slice it sits on")
    upper = np.searchsorted(z, target, side="left").clip(1, len(z) - 1)
    low = np.minimum(hu[upper - 1], hu[upper]) - 0.5
    high = np.maximum(hu[upper - 1], hu[upper]) + 0.5
    if np.any(volume < low) or np.any(volume > high):
        raise AssertionError("a resampled slice lies outside its two real neighbours")


def build_studies(work: Path, slices: int, real_slices: int) -> dict[str, tuple[Path, int]]:
    """A synthetic chest CT and (if present) the shared real CT as it is and resampled to
    ``real_slices`` thin slices (0: not), all JPEG Lossless SV1."""
    studies: dict[str, tuple[Path, int]] = {}
    synthetic = work / "studies" / "synthetic"
    if synthetic.exists():
        shutil.rmtree(synthetic)
    phantom = make_chest_phantom((slices, 512, 512), (1.25, 0.7, 0.7), seed=3)
    write_ct_series(phantom, synthetic / "ct", seed=3, transfer_syntax=JPEG_LOSSLESS_SV1)
    studies[f"synthetic {slices}-slice chest CT, JPEG Lossless SV1"] = (synthetic, slices)
    if SHARED_CT.is_dir():
        real = work / "studies" / "real"
        if real.exists():
            shutil.rmtree(real)
        real.mkdir(parents=True)
        sources = sorted(SHARED_CT.glob("*.dcm"))
        for k, src in enumerate(sources):
            transcode_file(src, real / f"IM{k:04d}", JPEG_LOSSLESS_SV1)
        studies["real 30-slice chest CT (Lung-PET-CT-Dx A0002), JPEG Lossless SV1"] = (
            real,
            len(sources),
        )
        if real_slices:
            resampled = work / "studies" / "real_resampled"
            if resampled.exists():
                shutil.rmtree(resampled)
            volume, spacing, origin = real_ct_resampled(real_slices)
            write_ct_series(
                volume,
                resampled / "ct",
                spacing_mm=spacing,
                first_position_mm=origin,
                attributes=SeriesAttributes(
                    series_description=f"A0002 resampled to {spacing[0]:.2f} mm (benchmark)"
                ),
                transfer_syntax=JPEG_LOSSLESS_SV1,
            )
            studies[
                f"real chest CT (Lung-PET-CT-Dx A0002) resampled to {real_slices} slices of "
                f"{spacing[0]:.2f} mm, JPEG Lossless SV1"
            ] = (resampled, real_slices)
    return studies


def run_segment(inputs: Path, out: Path, precision: str) -> dict[str, Any]:
    """``ggo-cli segment`` in a child process: wall time, peak RSS, manifest."""
    if out.exists():
        shutil.rmtree(out)
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.run(sys.argv[1:]).returncode\n"
        "print(rc, time.perf_counter() - t, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    command = [
        sys.executable,
        "-m",
        "ggo_cli",
        "segment",
        str(inputs),
        "-o",
        str(out),
        "--device",
        "cpu",
        "--precision",
        precision,
        "--settle",
        "0",
        "--no-progress",
    ]
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *command],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    rc, seconds, maxrss_kib = done.stdout.split()[-3:]
    manifest = (
        json.loads((out / "run_manifest.json").read_text())
        if (out / "run_manifest.json").exists()
        else {}
    )
    return {
        "rc": int(rc),
        "seconds": float(seconds),
        "peak_rss_mib": int(maxrss_kib) / 1024,
        "precision_used": manifest.get("device", {}).get("precision"),
        "counts": manifest.get("counts"),
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (ratios against ORT plain fp32 and PyTorch eager fp32)."""
    m = report["machine"]
    rates = {r["key"]: r["slices_per_s"] for r in report["model"] if "slices_per_s" in r}
    base, torch_base = rates.get("ort_plain_fp32"), rates.get("torch_fp32")

    def ratios(value: float) -> str:
        ort_ratio = f"{value / base:.2f}" if base else ""
        torch_ratio = f"{value / torch_base:.2f}" if torch_base else "(no torch)"
        return f"{ort_ratio} | {torch_ratio}"

    lines = [
        f"Machine: {m.get('cpu', '?')}, {m['cores_usable']} cores usable, flags "
        f"{', '.join(m.get('flags', []))}; ORT {m['onnxruntime']}, torch {m['torch']}.",
        "",
        f"| model only (512 x 512, batch {report['model_batch']}) | slices/s | x ORT plain fp32 "
        "| x PyTorch eager fp32 |",
        "|---|---|---|---|",
    ]
    for r in report["model"]:
        if "slices_per_s" in r:
            lines.append(f"| {r['path']} | {r['slices_per_s']:.2f} | {ratios(r['slices_per_s'])} |")
        else:
            lines.append(f"| {r['path']} | {r.get('error', '')} | | |")
    lines += ["", "| decode (pydicom, 1 process) | slices/s | mean file KiB |", "|---|---|---|"]
    for r in report["decode"]:
        lines.append(
            f"| {r['name']} ({r['transfer_syntax']}) | {r['slices_per_s']:.0f} | "
            f"{r['mean_file_kib']:.0f} |"
        )
    lines += [
        "",
        "| end to end, `ggo-cli segment --device cpu` | precision | slices | s | slices/s | "
        "studies/h | peak RSS MiB | x ORT plain fp32 model only | x PyTorch eager fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["end_to_end"]:
        lines.append(
            f"| {r['study']} | {r['precision']} ({r.get('precision_used')}) | "
            f"{r['slices']} | {r['seconds']:.1f} | {r['slices_per_s']:.2f} | "
            f"{r['studies_per_hour']:.1f} | {r['peak_rss_mib']:.0f} | {ratios(r['slices_per_s'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder")
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--slices", type=int, default=300, help="synthetic study size")
    parser.add_argument("--model-batch", type=int, default=4)
    parser.add_argument(
        "--real-slices",
        type=int,
        default=255,
        help="the shared real CT resampled along z to this many slices (0: not)",
    )
    parser.add_argument("--decode-slices", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke)")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--out", type=Path, help="JSON report; the Markdown goes beside it")
    args = parser.parse_args()
    if args.quick:
        args.slices, args.model_batch, args.decode_slices, args.repeats = 12, 2, 3, 1
        args.real_slices = 40
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": machine(),
        "model_batch": args.model_batch,
        "quick": args.quick,
    }
    report["model"] = bench_model(args.model, args.model_batch, args.repeats)
    print(json.dumps(report["model"]), flush=True)
    report["decode"] = bench_decode(args.work, args.decode_slices, args.repeats)
    report["end_to_end"] = []
    if not args.skip_e2e:
        studies = build_studies(args.work, args.slices, args.real_slices)
        for study, (folder, slices) in studies.items():
            for precision in ("fp32", "auto"):
                result = run_segment(folder, args.work / "out" / precision, precision)
                row = {
                    "study": study,
                    "slices": slices,
                    "precision": precision,
                    **result,
                    "slices_per_s": slices / result["seconds"],
                    "studies_per_hour": 3600.0 / result["seconds"],
                }
                print(json.dumps(row), flush=True)
                report["end_to_end"].append(row)
    text = json.dumps(report, indent=2)
    table = markdown(report)
    print(table)
    if args.out:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
