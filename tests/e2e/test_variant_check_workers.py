"""``--jobs`` workers and the variant self-check: one measures, the others read its verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ggo_cli.onnx import verdict_cache
from tests.dicom_factory import make_ct_series
from tests.onnx.test_precision import _conv_model_with_recipe


def test_worker_processes_share_one_self_check(tmp_path: Path, variant_check_cache: Path) -> None:
    """With ``--jobs 2`` both workers need the int8 verdict: one measures it (under a file
    lock), the other reads it."""
    model = _conv_model_with_recipe(tmp_path / "model")
    for i in range(3):
        make_ct_series(tmp_path / "in", shape=(10, 64, 64), folder=f"s{i}", seed=i)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "ggo_cli", "segment", str(tmp_path / "in"), "-o", str(out),
         "-m", str(model), "--device", "cpu", "--no-progress", "--no-lung-mask", "--jobs", "2"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, verdict_cache.CACHE_ENV: str(variant_check_cache)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("checking the int8 variant against float32") == 1, done.stderr
    assert done.stderr.count("passed its self-check on this machine (cached)") >= 1
    assert len(list((variant_check_cache / "variant-checks").glob("*.json"))) == 1
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["device"]["precision"] == "int8" and manifest["device"]["jobs"] == 2
    assert manifest["device"]["variant_check"]["passed"] is True
