"""CI smoke of the throughput benchmark (``--quick``): it runs and reports sane figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "throughput.py"),
            "--work",
            str(tmp_path / "work"),
            "--quick",
            "--skip-e2e",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    rates = {row["key"]: row.get("slices_per_s", 0.0) for row in report["model"]}
    assert rates["ort_plain_fp32"] > 0 and rates["ggo_fp32"] > 0
    assert rates["ggo_int8"] > 0  # the shipped int8 recipe is rebuilt and runs
    assert {row["transfer_syntax"] for row in report["decode"]} >= {
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.90",
    }
    assert all(row["slices_per_s"] > 0 for row in report["decode"])
    markdown = out.with_suffix(".md").read_text()
    assert "x ORT plain fp32" in markdown and report["machine"]["cores_usable"] >= 1
