"""Smoke tests of the benchmark scripts (``e2e``: each runs a script in a child process, for
seconds to minutes): they run and report sane figures. The default suite runs no benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_benchmark(script: str, out: Path, *args: str) -> dict:  # type: ignore[type-arg]
    """Run ``benchmarks/<script>`` with ``--out out``; its JSON report (the run must pass)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def test_throughput_benchmark_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    report = _run_benchmark(
        "throughput.py", out, "--work", str(tmp_path / "work"), "--quick", "--skip-e2e"
    )
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


def test_predict_profile_reports_the_steps_on_a_real_series(
    tmp_path: Path, real_ct_dir: Path
) -> None:
    def profile(name: str, *extra: str) -> dict:  # type: ignore[type-arg]
        """The profile of the real series' first 4 slices, batch 2."""
        return _run_benchmark(
            "predict_profile.py",
            tmp_path / name,
            "--input",
            str(real_ct_dir),
            "--slices",
            "4",
            "--batch-size",
            "2",
            *extra,
        )

    report = profile("profile.json")
    assert report["slices"] == 4 and report["hu_dtype"] == "int16"
    share = report["share_of_wall"]
    assert {"window_hu", "predict_logits"} <= set(share)
    # 512 x 512 slices are the model's grid: decided on the logits, no sigmoid or resize back
    assert not {"sigmoid", "to_source_grid", "threshold_probabilities"} & set(share)
    # on the CPU the network is nearly all of it; windowing is a rounding error
    assert share["predict_logits"] > 0.9 and share["window_hu"] < 0.01
    assert report["window_in_graph"] is False
    graph = profile("graph.json", "--window-in-graph", "on")
    # the CUDA path, here on the CPU: no host windowing at all
    assert graph["window_in_graph"] is True
    assert set(graph["share_of_wall"]) == {"_predict_windowed"}


def test_end_to_end_benchmark_with_jobs_on_the_cpu(tmp_path: Path) -> None:
    """``gpu_e2e.py`` on the CPU with the stand-in model: one process and two workers measure
    the same series to the same GGO and lung volumes, and report the process tree's memory."""
    report = _run_benchmark(
        "gpu_e2e.py",
        tmp_path / "report.json",
        "--work",
        str(tmp_path / "work"),
        "--studies",
        "2",
        "--slices",
        "48",
        "--device",
        "cpu",
        "--stand-in-model",
        "--variants",
        "--jobs",
        "1",
        "2",
    )
    assert report["host"]["usable_cores"] >= 1
    runs = {row["variant"]: row for row in report["runs"]}
    assert set(runs) == {"--jobs 1", "--jobs 2"}
    for row in runs.values():
        assert row["rc"] == 0
        assert row["device"]["jobs"] == int(row["variant"][-1])
        assert row["slices_per_s"] > 0 and row["peak_tree_rss_gib"] > 0
        assert 0 < row["cpu_busy_percent"] <= 100 and row["cpu_busy_cores"] > 0
        assert "gpu_util_percent_mean" not in row  # no GPU monitor on the CPU
        assert [s["status"] for s in row["series"]] == ["ok", "ok"]
    volumes = [
        [(s["ggo_volume_ml"], s["lung_volume_ml"]) for s in row["series"]] for row in runs.values()
    ]
    assert volumes[0] == volumes[1]
    assert all(lungs > 100 for _, lungs in volumes[0])


def test_lung_mask_timing_reports_the_real_series_lungs(real_ct_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "lung_mask_time.py"), str(real_ct_dir),
         "--repeats", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["slices"] == 30 and report["median_s"] > 0
    # 1.16 and 1.64 L at 0.6465 x 0.6465 x 8 mm today (test_lungs checks them in detail)
    assert 200_000 < report["right_voxels"] < 600_000
    assert 300_000 < report["left_voxels"] < 800_000
