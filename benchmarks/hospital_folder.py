"""End-to-end acceptance run on a hospital-like folder, with the shipped model on the CPU.

Builds a folder that holds
- a 255-slice synthetic chest CT (GGO of known volume) encoded as JPEG Lossless SV1 (.70),
- the shared real 30-slice chest CT (Lung-PET-CT-Dx A0002), transcoded to JPEG Lossless SV1,
- the shared dcmqi 3-slice CT (too short: skipped) and its SEG (not an image: ignored),
- junk: a text file, a zero-byte file, random bytes named .dcm,
then runs ``ggo-cli segment`` on it and checks every SEG written: highdicom reads it, every
source slice is referenced, the GGO segment's property type is (112120, DCM), ``dciodvfy``
reports no error, and the CSV volume equals the SEG's voxel count times the voxel volume.

Usage::

    python benchmarks/hospital_folder.py --work /tmp/hospital [--device cpu] [--slices 255]

Prints a JSON report (timings, slices/s, per-series checks).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import JPEGLosslessSV1

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "ct-dicom"
sys.path.insert(0, str(ROOT))

from ggo_cli.synthetic.ct_writer import transcode_file, write_ct_series  # noqa: E402
from ggo_cli.synthetic.phantom import make_chest_phantom  # noqa: E402


def build(work: Path, slices: int) -> dict[str, Any]:
    """Write the hospital folder; return the phantom's truth."""
    inputs = work / "studies"
    if inputs.exists():
        shutil.rmtree(inputs)
    phantom = make_chest_phantom(shape=(slices, 512, 512), spacing_mm=(1.25, 0.7, 0.7), seed=3)
    write_ct_series(
        phantom,
        inputs / "synthetic" / "series",
        seed=3,
        transfer_syntax=JPEGLosslessSV1,
        shuffle_names=True,
    )
    real = inputs / "LUNG_DX" / "A0002"
    real.mkdir(parents=True)
    for k, src in enumerate(sorted((SHARED / "lung-pet-ct-dx-a0002" / "dicom").glob("*.dcm"))):
        transcode_file(src, real / f"{(k * 37) % 100:03d}.img", JPEGLosslessSV1)
    other = inputs / "other"
    other.mkdir()
    for src in (SHARED / "dcmqi-ct-3slice").rglob("*.dcm"):
        shutil.copy(src, other / src.name)
    (inputs / "README.txt").write_text("PACS export\n")
    (inputs / "empty.dcm").write_bytes(b"")
    (inputs / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    return {"synthetic_true_ggo_ml": phantom.ggo_volume_ml, "synthetic_slices": slices}


def check_seg(seg_path: Path, row: dict[str, str], sources: list[Path]) -> dict[str, Any]:
    """Read a SEG back and check it against its source files and its CSV row."""
    seg = hd.seg.segread(seg_path)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sources]
    referenced = {
        i.ReferencedSOPInstanceUID
        for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    voxels = int(np.count_nonzero(pixels))
    prop = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    verify = subprocess.run(["dciodvfy", str(seg_path)], capture_output=True, text=True)
    errors = [ln for ln in (verify.stdout + verify.stderr).splitlines() if ln.startswith("Error")]
    return {
        "series_instance_uid": row["series_instance_uid"],
        "all_sources_referenced": referenced == set(uids),
        "frames": int(seg.NumberOfFrames),
        "property_type": f"{prop.CodeValue} {prop.CodingSchemeDesignator}",
        "dciodvfy_errors": errors,
        "csv_ggo_ml": float(row["ggo_volume_ml"]),
        "seg_voxels_x_voxel_ml": voxels * float(row["voxel_volume_ml"]),
        "volumes_equal": abs(float(row["ggo_volume_ml"]) - voxels * float(row["voxel_volume_ml"]))
        < 1e-6,
    }


def main() -> int:
    """Build the folder, run segment, check the outputs, print a JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=255)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    truth = build(args.work, args.slices)
    out = args.work / "results"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    run = subprocess.run(
        [
            "ggo-cli",
            "segment",
            str(args.work / "studies"),
            "--out",
            str(out),
            "--device",
            args.device,
            "--no-progress",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    summary = json.loads(run.stdout) if run.stdout.strip().startswith("{") else {}
    with (out / "ggo_volumes.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    checks = []
    for row in rows:
        if row["status"] != "ok":
            continue
        folder = next(
            p
            for p in (args.work / "studies").iterdir()
            if p.is_dir()
            and any(
                pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID
                == row["series_instance_uid"]
                for f in list(p.rglob("*"))[:5]
                if f.is_file()
            )
        )
        sources = [f for f in folder.rglob("*") if f.is_file()]
        checks.append(check_seg(out / row["seg_path"], row, sources))
    n_slices = sum(int(r["n_slices"]) for r in rows if r["status"] == "ok")
    report = {
        "exit_code": run.returncode,
        "host": {"platform": platform.platform(), "processor": platform.processor()},
        "seconds": round(seconds, 1),
        "slices_segmented": n_slices,
        "end_to_end_slices_per_s": round(n_slices / seconds, 2),
        "truth": truth,
        "csv": [
            {
                k: r[k]
                for k in ("series_instance_uid", "status", "n_slices", "ggo_volume_ml", "message")
            }
            for r in rows
        ],
        "seg_checks": checks,
        "device": summary.get("device"),
    }
    print(json.dumps(report, indent=2))
    return (
        0
        if run.returncode == 0
        and all(
            c["all_sources_referenced"]
            and c["volumes_equal"]
            and not c["dciodvfy_errors"]
            and c["property_type"] == "112120 DCM"
            for c in checks
        )
        else 1
    )


if __name__ == "__main__":
    raise SystemExit(main())
