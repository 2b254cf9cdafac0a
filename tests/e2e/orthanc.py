"""A real Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``) for the delivery tests.

:class:`OrthancServer` writes a temporary configuration and storage folder, starts the
``Orthanc`` binary with free ports for DICOM and HTTP and the DICOMweb plugin, waits until
``/system`` answers, and can stop and start again on the same ports and storage (the stored
instances survive). Orthanc 1.10 cannot bind to one address, so access is what is limited to
loopback: ``RemoteAccessAllowed`` false (HTTP from 127.0.0.1 only, no authentication) and
C-STORE accepted only from the known test AE at 127.0.0.1 (``DicomCheckModalityHost``).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.shared_data import in_ci

ORTHANC_BINARY = "Orthanc"
SBIN_PATH = "/usr/sbin:/usr/local/sbin"
"""Debian installs ``Orthanc`` in /usr/sbin, which a user's PATH may lack."""
ORTHANC_AE_TITLE = "ORTHANC_TEST"
CALLING_AE_TITLE = "GGO_CLI"
"""The AE title the tests send from (the only one Orthanc accepts C-STORE from)."""
LOOPBACK = "127.0.0.1"
PLUGIN_NAME = "libOrthancDicomWeb.so"
PLUGIN_FOLDERS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
"""Where Debian's ``orthanc-dicomweb`` installs the plugin (``dpkg -L orthanc-dicomweb``)."""
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin's shared library, or ``None`` when the package is not installed."""
    for folder in PLUGIN_FOLDERS:
        found = sorted(folder.glob(f"{PLUGIN_NAME}*")) if folder.is_dir() else []
        if found:
            return found[0]
    return None


def _missing(what: str) -> NoReturn:
    """Fail in CI, skip elsewhere (as for the shared data), naming the fix."""
    message = f"{what}: apt-get install orthanc orthanc-dicomweb (README, Run the tests)"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


class OrthancServer:
    """One Orthanc process on loopback with its own configuration and storage.

    Args:
        folder: an empty folder for the configuration, storage and log (removed by
            :meth:`remove`).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.dicom_port = free_port()
        self.http_port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._config = folder / "orthanc.json"
        self._log = folder / "orthanc.log"
        storage = folder / "storage"
        storage.mkdir(parents=True)
        plugin = dicomweb_plugin()
        if plugin is None:
            _missing("the Orthanc DICOMweb plugin is not installed")
        config: dict[str, Any] = {
            "Name": "ggo-cli-tests",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": ORTHANC_AE_TITLE,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {"ggo": [CALLING_AE_TITLE, LOOPBACK, free_port()]},
            "OverwriteInstances": False,
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "SaveJobs": False,
            "HttpsVerifyPeers": True,
            "ConcurrentJobs": 1,
        }
        self._config.write_text(json.dumps(config, indent=2))

    @property
    def http_url(self) -> str:
        """The REST API's base URL."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb service root."""
        return f"{self.http_url}/dicom-web"

    @property
    def dicom_destination(self) -> str:
        """The C-STORE destination text."""
        return f"dicom://{ORTHANC_AE_TITLE}@{LOOPBACK}:{self.dicom_port}"

    def start(self) -> None:
        """Start Orthanc and wait until ``/system`` answers (fails the test otherwise)."""
        if self._process is not None:
            raise RuntimeError("Orthanc is already running")
        binary = shutil.which(ORTHANC_BINARY) or shutil.which(ORTHANC_BINARY, path=SBIN_PATH)
        if binary is None:
            _missing("Orthanc is not installed")
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                [binary, str(self._config)], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=self.folder,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code, self._process = self._process.returncode, None
                pytest.fail(f"Orthanc exited with {code} on start:\n{self.log_tail()}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        self.stop()
        pytest.fail(f"Orthanc did not answer /system in {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_S`); no-op if stopped."""
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """Kill Orthanc at once (SIGKILL, as a crash or a power cut would); no-op if stopped.

        Unlike :meth:`stop`, which lets Orthanc finish the associations it serves, this ends
        an association in the middle; :meth:`start` brings it back with the same storage.
        """
        process, self._process = self._process, None
        if process is None:
            return
        process.kill()
        process.wait()

    def remove(self) -> None:
        """Stop Orthanc and delete its folder."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of Orthanc's log."""
        if not self._log.exists():
            return ""
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str) -> Any:
        """GET a REST resource and decode its JSON."""
        with urllib.request.urlopen(self.http_url + path, timeout=HTTP_TIMEOUT_S) as response:
            return json.loads(response.read())

    def clear(self) -> None:
        """Delete every stored instance (``DELETE /instances/{id}``)."""
        for orthanc_id in self.get("/instances"):
            request = urllib.request.Request(f"{self.http_url}/instances/{orthanc_id}",
                                             method="DELETE")
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S):
                pass

    def stored(self) -> dict[str, str]:
        """Every stored instance: SOPInstanceUID -> SOPClassUID (from ``/instances`` and each
        instance's ``/simplified-tags``)."""
        instances: dict[str, str] = {}
        for orthanc_id in self.get("/instances"):
            tags = self.get(f"/instances/{orthanc_id}/simplified-tags")
            instances[str(tags["SOPInstanceUID"])] = str(tags["SOPClassUID"])
        return instances

    def instance_count(self) -> int:
        """``CountInstances`` from ``/statistics`` (duplicates would count twice)."""
        return int(self.get("/statistics")["CountInstances"])


def running_orthanc(folder: Path) -> Iterator[OrthancServer]:
    """Start an Orthanc in ``folder``, yield it, then stop it and remove the folder (for a
    fixture)."""
    server = OrthancServer(folder)
    try:
        server.start()
        yield server
    finally:
        server.remove()
