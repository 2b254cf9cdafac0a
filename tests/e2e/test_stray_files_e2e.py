"""Whole runs write nothing outside ``--out`` and ggo-cli's cache folder, even when killed.

HOME, TMPDIR, XDG_CACHE_HOME and GGO_CACHE_DIR point at fresh folders that are listed after
each run: ONNX Runtime's telemetry files (``~/.cache/Microsoft/DeveloperTools/.onnxruntime``,
``$TMPDIR/.ses``) and the int8 rebuild's scratch files must not be there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.dicom_factory import make_ct_series
from tests.onnx.test_precision import _conv_model_with_recipe

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MODEL = REPO / "exported_models" / "ggo-resnet50-unet" / "model.onnx"


def _watched(tmp_path: Path) -> tuple[dict[str, str], dict[str, Path]]:
    folders = {name: tmp_path / "watched" / name for name in ("home", "tmp", "xdg", "cache")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(folders["home"]), TMPDIR=str(folders["tmp"]),
               XDG_CACHE_HOME=str(folders["xdg"]), GGO_CACHE_DIR=str(folders["cache"]))
    return env, folders


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _segment(inputs: Path, out: Path, model: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "ggo_cli", "segment", str(inputs), "-o", str(out), "-m",
            str(model), "--device", "cpu", "--no-progress", "--no-lung-mask", *flags]


def _assert_only_the_cache(folders: dict[str, Path]) -> None:
    for name in ("home", "tmp", "xdg"):
        assert _files(folders[name]) == [], name
    cached = _files(folders["cache"])
    assert all(f.startswith("variant-checks/") for f in cached), cached
    assert not any((folders["cache"] / "tmp").glob("*"))


def test_an_int8_run_with_jobs_writes_only_to_out_and_the_cache(tmp_path: Path) -> None:
    env, folders = _watched(tmp_path)
    model = _conv_model_with_recipe(tmp_path / "model")
    for i in range(2):
        make_ct_series(tmp_path / "in", shape=(10, 64, 64), folder=f"s{i}", seed=i)
    done = subprocess.run(
        _segment(tmp_path / "in", tmp_path / "out", model, "--jobs", "2"),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "int8" in done.stderr
    _assert_only_the_cache(folders)


def test_kill_9_during_the_int8_rebuild_leaves_nothing_after_the_next_run(
    tmp_path: Path, band_model_path: Path
) -> None:
    env, folders = _watched(tmp_path)
    make_ct_series(tmp_path / "in", shape=(10, 64, 64))
    scratch = folders["cache"] / "tmp"
    run = subprocess.Popen(
        _segment(tmp_path / "in", tmp_path / "out", SHIPPED_MODEL, "--precision", "int8"),
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    try:
        while not any(scratch.glob("int8-*/*.onnx")):
            assert run.poll() is None and time.monotonic() < deadline, "no int8 rebuild seen"
            time.sleep(0.02)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    assert any(scratch.glob("int8-*/*.onnx"))  # killed mid-rebuild: it could not clean up
    assert _files(folders["tmp"]) == [] and _files(folders["home"]) == []
    again = subprocess.run(
        _segment(tmp_path / "in", tmp_path / "out2", band_model_path),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0, again.stderr
    _assert_only_the_cache(folders)


def _demo(out: Path, slices: int) -> list[str]:
    return [sys.executable, "-m", "ggo_cli", "demo", "-o", str(out), "--slices", str(slices),
            "--no-progress", "--device", "cpu", "--precision", "fp32"]


def test_a_killed_demo_leaves_its_synthetic_study_only_in_the_cache_until_the_next(
    tmp_path: Path,
) -> None:
    """The demo's study goes to a scratch folder in the cache: a kill -9 leaves nothing in
    the temp folder, and the next demo sweeps what it left."""
    env, folders = _watched(tmp_path)
    proc = subprocess.Popen(_demo(tmp_path / "out1", 120), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if len(list((folders["cache"] / "tmp").glob("demo-*/study/*.dcm"))) >= 100:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the demo wrote no study into the cache's scratch folder")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    for name in ("home", "tmp", "xdg"):
        assert _files(folders[name]) == [], name
    done = subprocess.run(_demo(tmp_path / "out2", 10), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert list((tmp_path / "out2").rglob("*.seg.dcm"))
    for name in ("home", "tmp", "xdg"):
        assert _files(folders[name]) == [], name
    assert not any((folders["cache"] / "tmp").glob("*"))  # both studies' scratch folders gone
