"""``segment --ray`` on a real two-node Ray cluster on this machine, loopback only.

The whole scenario runs in one helper process (this file run as a script) inside namespaces
of its own: a network namespace with loopback only (on these machines Ray would otherwise
register the host's network address as its node address), and a PID namespace, so that
``ray stop --force`` sees only this cluster's processes and the kernel ends every one of them
when the helper exits, whatever happened. In there the helper starts a head and a second node
(``ray start``, one CPU each, custom resources ``ggo_head`` / ``ggo_second`` to tell them
apart, usage statistics off), runs ``ggo-cli segment --ray`` twice, and records every
listening TCP socket of the namespace while the runs go on:

1. a plain run over both nodes;
2. a run during which the second node's raylet and every process below it are killed with
   SIGKILL while its actor runs a series;
3. a ``--ray-ship`` run that starts on the head alone while a new second node joins: the driver
   runs in a mount namespace of its own where its inputs, model and output folder lie on a
   tmpfs that no node can see, so every file must travel through Ray's object store.

The tests compare each run with a single-process run of the same series (CSV rows, SEG pixels
and UIDs, exit code: one series is broken on purpose), and check the manifest's per-node
accounting and the sockets. Creating the namespaces needs root: without it the tests fail and
say so; without the ``ray`` extra they are skipped with the reason.
"""

from __future__ import annotations

import csv
import importlib.util
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
NAMESPACES = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
"""Loopback-only network, own PIDs; if ``unshare`` is killed (a timeout), so is the namespace."""
HEAD_PORT = 6379
N_SERIES = 6
N_EXTRA = 36
"""Series only the shipped run gets besides the others: about 30 s of work for the head alone
(0.75 s a series here), time enough for a node to start, join and take some."""
BROKEN = 2
"""Index of the series whose pixel data is cut short (it fails alone, exit 7)."""
SCENARIO_TIMEOUT_S = 600
CSV_KEYS = ("series_instance_uid", "status", "ggo_voxels", "ggo_volume_ml", "n_slices", "message")


# --- the helper, run as a script inside the namespaces --------------------------------------


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent id, or ``None`` once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _listening() -> set[str]:
    """Local addresses (``ip:port``) of the namespace's listening TCP sockets (an IPv4-mapped
    IPv6 address written as its IPv4 address)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            if width == 8:  # one little-endian 32-bit word
                ip = str(ipaddress.IPv4Address(raw[::-1]))
            else:  # four little-endian 32-bit words; gRPC listens on IPv4-mapped addresses
                v6 = ipaddress.IPv6Address(b"".join(raw[k : k + 4][::-1] for k in range(0, 16, 4)))
                ip = str(v6.ipv4_mapped or v6)
            found.add(f"{ip}:{int(port, 16)}")
    return found


def _descendants(root: int) -> list[int]:
    parents = {pid: stat[1] for pid in _pids() if (stat := _stat(pid)) is not None}
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        found.append(pid)
        frontier.extend(child for child, parent in parents.items() if parent == pid)
    return found


def _second_raylet() -> int | None:
    for pid in _pids():
        line = _cmdline(pid)
        if "raylet/raylet" in line and "ggo_second" in line:
            return pid
    return None


def _busy_actor_below(raylet: int) -> int | None:
    """The actor process below ``raylet`` while it runs a series (Ray's process title)."""
    for pid in _descendants(raylet):
        if "SeriesActor.process" in _cmdline(pid):
            return pid
    return None


def _command(work: Path, out: str, model: str) -> list[str]:
    """``ggo-cli segment --ray`` of the series into ``work / out``, from the checkout."""
    return [sys.executable, "-m", "ggo_cli", "segment", str(work / "in"), "-o", str(work / out),
            "-m", model, "--no-progress", "--no-lung-mask", "--settle", "0",
            "--ray", f"127.0.0.1:{HEAD_PORT}"]


def _shipped_command(work: Path, model: str) -> list[str]:
    """``segment --ray --ray-ship`` from a private tmpfs (inputs, model, output) that the nodes
    cannot see; the output is copied to ``work / out_shipped`` afterwards."""
    private = work / "private"  # empty for everyone but the driver
    private.mkdir(exist_ok=True)
    script = (
        'set -u; P="$1"; W="$2"; M="$3"; shift 3; mount -t tmpfs ggo-private "$P" && '
        'cp -r "$W/in" "$W/in_extra" "$P/" && cp "$M" "$P/model.onnx" && '
        '"$@" "$P/in" "$P/in_extra" -o "$P/out" -m "$P/model.onnx"; rc=$?; '
        'cp -r "$P/out" "$W/out_shipped"; exit $rc'
    )
    return ["unshare", "--mount", "sh", "-c", script, "sh", str(private), str(work), model,
            sys.executable, "-m", "ggo_cli", "segment", "--no-progress", "--no-lung-mask",
            "--settle", "0", "--ray", f"127.0.0.1:{HEAD_PORT}", "--ray-ship"]


def _run_segment(
    cmd: list[str], env: dict[str, str], listen: set[str], kill_second: bool,
    join: list[str] | None = None,
) -> dict[str, Any]:
    """One ``ggo-cli segment --ray`` run, sampling the sockets; with ``kill_second``, the
    second node is killed while its actor runs a series; ``join`` starts a node once an actor
    runs a series (the run has placed its actors by then)."""
    started = time.monotonic()
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    joined: subprocess.Popen[bytes] | None = None
    killed: list[int] = []
    raylet = _second_raylet() if kill_second else None
    busy_since: float | None = None
    while process.poll() is None:
        listen |= _listening()
        if join is not None and joined is None and any(
            "SeriesActor.process" in _cmdline(pid) for pid in _pids()
        ):
            joined = subprocess.Popen(join, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        if raylet is not None and not killed:
            if _busy_actor_below(raylet) is None:
                busy_since = None
            elif busy_since is None:
                busy_since = time.monotonic()
            elif time.monotonic() - busy_since > 0.3:  # well inside a series of about 2 s
                for pid in _descendants(raylet):
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                    except ProcessLookupError:
                        pass
        time.sleep(0.05)
    _, stderr = process.communicate()
    return {"rc": process.returncode, "stderr": stderr[-4000:], "killed": killed,
            "second_raylet": raylet, "seconds": time.monotonic() - started,
            "joined_rc": None if joined is None else joined.wait(timeout=120)}


def _scenario(work: Path, model: str) -> dict[str, Any]:
    """Start the cluster, run ``segment`` twice on it, stop it; the report is also written
    to ``work / report.json``."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # Usage statistics off; token authentication off in this private namespace, stated so
    # that a token a local ray.init() left in ~/.ray/auth_token cannot lock the nodes out.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    ray = str(Path(sys.executable).with_name("ray"))
    temp = tempfile.mkdtemp(prefix="ggo-ray-", dir="/tmp")  # Unix socket paths must be short
    listen: set[str] = set()
    report: dict[str, Any] = {"listen": [], "runs": {}}
    try:
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
        subprocess.run(
            [ray, "start", "--head", "--port", str(HEAD_PORT), "--temp-dir", temp,
             "--include-dashboard", "false", "--resources", '{"ggo_head": 1}', *common],
            env=env, check=True, capture_output=True,
        )
        second = [ray, "start", "--address", f"127.0.0.1:{HEAD_PORT}", "--resources",
                  '{"ggo_second": 1}', *common]
        subprocess.run(second, env=env, check=True, capture_output=True)
        listen |= _listening()
        for name, kill in (("plain", False), ("killed", True)):
            report["runs"][name] = _run_segment(_command(work, f"out_{name}", model), env,
                                                listen, kill)
        # The second node is dead now: the shipped run starts on the head, and a new second
        # node joins while it runs.
        report["runs"]["shipped"] = _run_segment(_shipped_command(work, model), env, listen,
                                                 False, join=second)
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
        report["listen"] = sorted(listen)
        (work / "report.json").write_text(json.dumps(report, indent=1))
    return report


# --- the tests ------------------------------------------------------------------------------


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "ggo_volumes.csv").open(newline="", encoding="utf-8") as fh:
        return [{k: row[k] for k in CSV_KEYS} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def cluster_runs(
    tmp_path_factory: pytest.TempPathFactory, band_model_path: Path
) -> tuple[Path, dict[str, Any]]:
    """The series, the single-process run (``out_one``) and the helper's two cluster runs."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("the ray extra is not installed (pip install -e '.[dev,ray]')")
    probe = subprocess.run([*NAMESPACES, "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.fail(
            "the Ray cluster test needs its own network and PID namespaces (loopback only) "
            f"and could not create them: {probe.stderr.strip()}; run the e2e suite as root"
        )
    from ggo_cli.cli.app import app
    from tests.dicom_factory import make_ct_series
    from tests.phantoms import make_cube_phantom

    work = tmp_path_factory.mktemp("ray_cluster")
    for k in range(N_SERIES):
        series = make_ct_series(
            work / "in",
            phantom=make_cube_phantom((100, 128, 128), (2.5, 0.7, 0.7), cube_voxels=(6 + k, 9, 9)),
            folder=f"study{k}",
            seed=k + 1,
        )
        if k == BROKEN:
            raw = series.paths[50].read_bytes()
            series.paths[50].write_bytes(raw[: len(raw) - 500])  # pixel data cut short
    for k in range(N_EXTRA):
        make_ct_series(
            work / "in_extra",
            phantom=make_cube_phantom((100, 128, 128), (2.5, 0.7, 0.7), cube_voxels=(5, 9, 9)),
            folder=f"extra{k}",
            seed=100 + k,
        )
    one = CliRunner().invoke(
        app,
        ["segment", str(work / "in"), "-o", str(work / "out_one"), "-m", str(band_model_path),
         "--no-progress", "--no-lung-mask", "--settle", "0", "--jobs", "1"],
    )
    done = subprocess.run(
        [*NAMESPACES, sys.executable, __file__, str(work), str(band_model_path)],
        cwd=REPO, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S, check=False,
    )
    report_path = work / "report.json"
    assert done.returncode == 0 and report_path.is_file(), done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    report["rc_one"] = one.exit_code
    return work, report


def _same_outputs(
    work: Path, name: str, report: dict[str, Any], extra: int = 0
) -> dict[str, Any]:
    """Assert the run ``name`` matches the single-process run on the series both ran (the
    run had ``extra`` more); returns its manifest."""
    run = report["runs"][name]
    assert run["rc"] == report["rc_one"] == 7, run["stderr"]  # one broken series, as in one process
    out, one = work / f"out_{name}", work / "out_one"
    theirs = _rows(one)
    uids = {row["series_instance_uid"] for row in theirs}
    every = _rows(out)
    assert len(every) == N_SERIES + extra
    assert all(row["status"] == "ok" for row in every if row["series_instance_uid"] not in uids)
    rows = [row for row in every if row["series_instance_uid"] in uids]
    assert rows == theirs
    assert [r["status"] for r in rows].count("ok") == N_SERIES - 1
    for row in csv.DictReader((one / "ggo_volumes.csv").open(newline="", encoding="utf-8")):
        if row["status"] != "ok":
            continue
        mine, theirs = hd.seg.segread(out / row["seg_path"]), hd.seg.segread(one / row["seg_path"])
        assert mine.SOPInstanceUID == theirs.SOPInstanceUID
        assert mine.SeriesInstanceUID == theirs.SeriesInstanceUID
        np.testing.assert_array_equal(mine.pixel_array, theirs.pixel_array)
    assert not list(out.rglob("*.tmp")), "a temporary file was left"
    manifest: dict[str, Any] = json.loads((out / "run_manifest.json").read_text())
    return manifest


def test_a_two_node_cluster_gives_the_outputs_of_one_process_on_loopback_only(
    cluster_runs: tuple[Path, dict[str, Any]],
) -> None:
    """Both nodes run series; CSV rows, SEG pixels and UIDs and the exit code are those of one
    process; every socket the cluster listened on was on 127.0.0.1."""
    work, report = cluster_runs
    manifest = _same_outputs(work, "plain", report)
    cluster = manifest["cluster"]
    assert cluster["actors"] == 2
    assert cluster["lost_actors"] == 0
    nodes = cluster["nodes"]
    assert len({n["node_id"] for n in nodes}) == 2, nodes
    assert sum(n["series"] for n in nodes) == N_SERIES
    assert all(n["device"] == "cpu" and n["slices_per_s"] > 0 for n in nodes), nodes
    assert report["listen"], "no listening socket was seen"
    assert all(a.startswith("127.0.0.1:") for a in report["listen"]), report["listen"]


def test_a_node_killed_mid_series_leaves_the_outputs_of_one_process(
    cluster_runs: tuple[Path, dict[str, Any]],
) -> None:
    """The second node's processes die (SIGKILL) while its actor runs a series: that series is
    run again on the head's actor and the outputs still match one process, with nothing
    partial left behind."""
    work, report = cluster_runs
    run = report["runs"]["killed"]
    assert run["killed"], f"the second node's actor never ran a series: {run}"
    manifest = _same_outputs(work, "killed", report)
    cluster = manifest["cluster"]
    assert cluster["lost_actors"] == 1
    assert cluster["resubmitted_series"] >= 1
    assert sum(n["series"] for n in cluster["nodes"]) == N_SERIES


def test_shipped_files_reach_nodes_that_cannot_see_them_and_a_joining_node_helps(
    cluster_runs: tuple[Path, dict[str, Any]],
) -> None:
    """With ``--ray-ship`` the nodes see none of the driver's files, yet the outputs equal one
    process's; a node that joins during the run gets an actor and runs series."""
    work, report = cluster_runs
    run = report["runs"]["shipped"]
    assert run["joined_rc"] == 0, run
    assert not any((work / "private").iterdir()), "the driver's tmpfs leaked to the nodes"
    manifest = _same_outputs(work, "shipped", report, extra=N_EXTRA)
    cluster = manifest["cluster"]
    assert cluster["files_shipped"] is True
    assert cluster["lost_actors"] == 0
    nodes = cluster["nodes"]
    assert len({n["node_id"] for n in nodes}) == 2, f"the joining node ran no series: {nodes}"
    assert all(n["series"] >= 1 for n in nodes), nodes
    assert sum(n["series"] for n in nodes) == N_SERIES + N_EXTRA
    processed = [s for s in manifest["series"] if s["status"] == "ok"]
    assert processed and all(s["node"] and s["device"] == "cpu" for s in processed)


def _main(work: Path, model: str) -> int:
    """As PID 1 of the namespace: run the scenario in a child and reap every orphan Ray
    leaves (so no zombie looks alive to ``ray stop``) until that child ends."""
    child = os.fork()
    if child == 0:
        try:
            _scenario(work, model)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    while True:
        pid, status = os.wait()
        if pid == child:
            return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(_main(Path(sys.argv[1]), sys.argv[2]))
