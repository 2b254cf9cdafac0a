"""Nothing is written outside ``--out`` and ggo-cli's cache folder (issue 15).

ONNX Runtime 1.31 writes a telemetry device ID and event store under the user cache folder and
a session file in the temp folder as soon as it is imported; the int8 rebuild wrote ~160 MB to
the temp folder, left there by a ``kill -9``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ggo_cli import scratch

REPO = Path(__file__).resolve().parents[2]


def _fresh_env(tmp_path: Path) -> tuple[dict[str, str], list[Path]]:
    """An environment whose HOME, temp and cache folders are new, empty folders."""
    folders = [tmp_path / name for name in ("home", "tmp", "xdg-cache", "ggo-cache")]
    for folder in folders:
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(folders[0]), TMPDIR=str(folders[1]), XDG_CACHE_HOME=str(folders[2]),
               GGO_CACHE_DIR=str(folders[3]))
    return env, folders


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_onnx_runtime_writes_no_telemetry_files(tmp_path: Path, band_model_path: Path) -> None:
    """Importing ggo-cli's runtime turns ORT's telemetry off before ORT is imported."""
    env, folders = _fresh_env(tmp_path)
    code = (
        "import sys; from pathlib import Path; import ggo_cli.cli.app; import onnxruntime;"
        "from ggo_cli.onnx.runtime import DeviceRequest, create_session;"
        "create_session(Path(sys.argv[1]), DeviceRequest('cpu'))"
    )
    subprocess.run([sys.executable, "-c", code, str(band_model_path)], cwd=REPO, env=env,
                   check=True, timeout=120)
    for folder in folders:
        assert _files(folder) == [], folder


def _hold_scratch(root: Path) -> subprocess.Popen[str]:
    """A process that opens a scratch folder under ``root``, writes a file, and waits."""
    code = (
        "import sys, tempfile, time; from pathlib import Path; from ggo_cli import scratch;"
        "scratch.scratch_root = lambda: Path(sys.argv[1])\n"
        "with scratch.scratch_folder('int8-') as f:\n"
        "    (f / 'int8.onnx').write_bytes(b'x' * 1000); print(f, flush=True); time.sleep(60)"
    )
    return subprocess.Popen([sys.executable, "-c", code, str(root)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE)


def test_a_scratch_folder_left_by_kill_9_is_removed_by_the_next_one(tmp_path: Path) -> None:
    root = tmp_path / "cache" / "tmp"
    holder = _hold_scratch(root)
    assert holder.stdout is not None
    left = Path(holder.stdout.readline().strip())
    assert (left / "int8.onnx").is_file()
    assert scratch.sweep_scratch(root) == 0  # in use: kept
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert left.is_dir()  # a killed process cannot clean up
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scratch, "scratch_root", lambda: root)
        with scratch.scratch_folder("int8-") as folder:
            assert not left.exists()  # swept on the next start
            assert Path(tempfile.mkdtemp()).parent == folder  # libraries' temp files go here
        assert tempfile.gettempdir() != str(folder)
    assert list(root.iterdir()) == []


def test_a_folder_without_its_lock_file_is_left_alone_for_a_while(tmp_path: Path) -> None:
    young = tmp_path / "int8-young"
    young.mkdir()
    old = tmp_path / "int8-old"
    old.mkdir()
    stale = time.time() - 2 * scratch.LOCKLESS_GRACE_S
    os.utime(old, (stale, stale))
    assert scratch.sweep_scratch(tmp_path) == 1
    assert young.exists() and not old.exists()


def test_the_int8_rebuild_uses_a_scratch_folder_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``int8_model_bytes`` works in ``<cache>/tmp`` (never the system temp folder)."""
    from ggo_cli.onnx import precision

    seen: list[Path] = []

    def fake_quantize(model: Path, settings: object, cache: Path, work: Path) -> Path:
        seen.append(work)
        (work / "int8.onnx").write_bytes(b"int8")
        return work / "int8.onnx"

    class Spec:
        file_sha256, tensors = "s", {"t": 1}

    class Recipe:
        name, settings, int8_graph_sha256 = "r", {}, "d"

    class Model:
        path, file_sha256 = tmp_path / "m.onnx", "f"

    monkeypatch.setattr(precision, "quantize_int8", fake_quantize)
    monkeypatch.setattr(precision, "graph_digest", lambda data: "d")
    monkeypatch.setattr(precision, "_INT8_CACHE", {})
    data, validated = precision.int8_model_bytes(Model(), Spec(), Recipe())  # type: ignore[arg-type]
    assert (data, validated) == (b"int8", True)
    assert seen[0].parent == scratch.scratch_root()
    assert not seen[0].exists()
