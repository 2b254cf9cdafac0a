"""Run the same three inputs through ggo-cli and compare two such captures (issue 16).

A renovation (moves and splits) must not change what ggo-cli does. This script runs

1. ``ggo-cli demo`` (the synthetic phantom, seed 0, 48 slices),
2. ``ggo-cli segment`` on the shared real series (``lung-pet-ct-dx-a0002``),
3. ``ggo-cli segment`` on a folder of bad inputs built in code (a good series beside a
   truncated file, RescaleSlope 0, a localizer, a non-DICOM file, NaN positions, a forged UID),
4. ``ggo-cli segment ... --device bogus`` (a bad option),
5. ``ggo-cli explain`` on the bad-input folder (GradCAM++ maps of its two good series),

and keeps, per case, the exit code, the CSV, every SEG (all elements but the creation dates and
times, and its pixel data), every PNG (its bytes), every ``.npz`` (each array's digest) and the
``--json`` summary (timings dropped). ``capture DIR CASE ...`` runs only the named cases.
``compare`` prints each difference and exits 1 when there is one.

Usage::

    python scripts/renovation_check.py capture BEFORE_DIR [CASE ...]
    python scripts/renovation_check.py capture AFTER_DIR
    python scripts/renovation_check.py compare BEFORE_DIR AFTER_DIR
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Cells and elements that differ between two runs of the same code (time of the run).
VOLATILE_CSV = {"processed_at"}
# DimensionOrganizationUID: highdicom makes a new random one for every SEG (the SEG's Series and
# SOP Instance UIDs are ggo-cli's, derived from the source and the model, and are compared).
VOLATILE_SEG = {
    "InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
    "SeriesDate", "SeriesTime", "ContributionDateTime", "DimensionOrganizationUID",
    "DimensionOrganizationSequence", "DimensionIndexSequence",
}
VOLATILE_JSON = {"seconds", "elapsed_s", "started_at", "finished_at", "processed_at", "wall_s",
                 "manifest", "log_file", "timings", "timings_s"}
# A log line is compared by its level and message: its time and logger (module) name may differ.
LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<logger>[\w.]+): (?P<message>.*)$")


def _shared_series() -> Path:
    from tests.shared_data import REAL_CT_DIR, require_shared

    return require_shared(REAL_CT_DIR)


def _bad_inputs(folder: Path) -> Path:
    """A folder of one good series beside bad inputs (deterministic: fixed seeds)."""
    import pydicom

    from tests.dicom_factory import make_ct_series

    good = make_ct_series(folder, shape=(16, 64, 64), folder="good", seed=1)
    trunc = make_ct_series(folder, shape=(12, 64, 64), folder="truncated", seed=2)
    trunc.paths[5].write_bytes(trunc.paths[5].read_bytes()[:600])
    slope = make_ct_series(folder, shape=(12, 64, 64), folder="slope0", seed=3)
    for path in slope.paths:
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = "0"
        ds.save_as(path)
    make_ct_series(folder, shape=(12, 64, 64), folder="scout", seed=4, localizer=True,
                   non_dicom_file=True)
    nan = make_ct_series(folder, shape=(12, 64, 64), folder="nanpos", seed=5)
    ds = pydicom.dcmread(nan.paths[3])
    ds.ImagePositionPatient = ["nan", "0", "0"]
    ds.save_as(nan.paths[3])
    forged = make_ct_series(folder, shape=(12, 64, 64), folder="forged", seed=6)
    for path in forged.paths:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = "../../x"
        ds.save_as(path)
    del good
    return folder


def _run(args: list[str], out: Path) -> dict[str, object]:
    env = {**os.environ, "GGO_CACHE_DIR": str(out.parent / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "ggo_cli", *args, "--no-progress", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    try:
        summary = json.loads(done.stdout) if done.stdout.strip() else None
    except json.JSONDecodeError:
        summary = done.stdout
    last = done.stderr.strip().splitlines()[-1:] if done.returncode else []
    return {"exit_code": done.returncode, "summary": _drop(summary),
            "stderr_last": [_log_message(line) for line in last]}


def _log_message(line: str) -> str:
    match = LOG_LINE.match(line)
    return f"{match['level']}: {match['message']}" if match else line


def _drop(value: object, keys: set[str] = VOLATILE_JSON) -> object:
    if isinstance(value, dict):
        return {k: _drop(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_drop(v, keys) for v in value]
    return value


def _outputs(out: Path) -> dict[str, object]:
    import numpy as np
    import pydicom

    found: dict[str, object] = {}
    if not out.exists():
        return found
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if rel.startswith(".ggo-cli/") or not path.is_file():
            continue
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as fh:
                rows = [{k: v for k, v in r.items() if k not in VOLATILE_CSV}
                        for r in csv.DictReader(fh)]
            found[rel] = rows
        elif path.name.endswith(".dcm"):
            ds = pydicom.dcmread(path)
            pixels = np.ascontiguousarray(ds.pixel_array)
            elements = {
                elem.keyword or str(elem.tag): str(elem.value)[:200]
                for elem in ds.iterall()
                if elem.keyword not in VOLATILE_SEG and elem.keyword != "PixelData"
            }
            found[rel] = {"pixels_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
                          "shape": list(pixels.shape), "elements": elements}
        elif path.suffix == ".png":
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.suffix == ".npz":
            with np.load(path) as arrays:
                found[rel] = {name: hashlib.sha256(np.ascontiguousarray(arrays[name]).tobytes())
                              .hexdigest() for name in sorted(arrays.files)}
        elif path.suffix == ".json":
            found[rel] = _drop(json.loads(path.read_text()))
    return found


def capture(dest: Path, only: Sequence[str] = ()) -> None:
    dest.mkdir(parents=True, exist_ok=False)
    bad = _bad_inputs(dest / "inputs" / "bad")
    cases = {
        "demo": ["demo", "-o", str(dest / "demo"), "--device", "cpu"],
        "real": ["segment", str(_shared_series()), "-o", str(dest / "real"), "--device", "cpu"],
        "bad": ["segment", str(bad), "-o", str(dest / "bad"), "--device", "cpu"],
        "bogus_device": ["segment", str(bad), "-o", str(dest / "bogus"), "--device", "bogus"],
        "explain": ["explain", str(bad), "-o", str(dest / "explain"), "--device", "cpu"],
    }
    if only:
        cases = {name: args for name, args in cases.items() if name in only}
    result = {}
    for name, args in cases.items():
        result[name] = {"run": _run(args, dest / name), "outputs": _outputs(dest / name)}
        print(name, result[name]["run"]["exit_code"], flush=True)
    (dest / "capture.json").write_text(json.dumps(result, indent=1, sort_keys=True))


def _diff(a: object, b: object, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"{where}/{key}: only in {'after' if key in b else 'before'}")
            else:
                _diff(a[key], b[key], f"{where}/{key}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append(f"{where}: {str(a)[:160]!r} != {str(b)[:160]!r}")


def compare(before: Path, after: Path) -> int:
    a = _drop(json.loads((before / "capture.json").read_text()), VOLATILE_SEG | VOLATILE_JSON)
    b = _drop(json.loads((after / "capture.json").read_text()), VOLATILE_SEG | VOLATILE_JSON)
    # Absolute paths of the two capture folders differ; compare them as the same.
    text_b = json.dumps(b).replace(str(after.resolve()), str(before.resolve()))
    b = json.loads(text_b)
    for case in (*a.values(), *b.values()):  # captures older than the log-line rule
        case["run"]["stderr_last"] = [_log_message(line) for line in case["run"]["stderr_last"]]
    differences: list[str] = []
    _diff(a, b, "", differences)
    for line in differences:
        print(line)
    n_files = sum(len(case["outputs"]) for case in a.values())
    print(f"{len(a)} cases, {n_files} output files compared: {len(differences)} differences")
    return 1 if differences else 0


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "capture":
        capture(Path(sys.argv[2]), sys.argv[3:])
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "compare":
        return compare(Path(sys.argv[2]), Path(sys.argv[3]))
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
