"""The STOW-RS sender: response mapping, HTTP and connection errors, credentials on the wire
and never in a log, against an in-process HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from ggo_cli.delivery import SendOutcome, StowDestination, parse_destination, send_stow
from ggo_cli.delivery.credentials import ENV_DICOMWEB_BASIC, ENV_DICOMWEB_TOKEN
from ggo_cli.delivery.dicomweb import check_stow, results_of_response
from ggo_cli.delivery.results import FileToSend
from tests.dicom_factory import FactorySeries, make_ct_series

LOOPBACK = "127.0.0.1"
PASSWORD = "s3cret-Pa55"
TOKEN = "tok3n-value-xyz"


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> FactorySeries:
    """Three CT slices."""
    return make_ct_series(tmp_path_factory.mktemp("stow"), (3, 32, 32))


@dataclass
class FakeStow:
    """What the fake server answers, and the requests it got."""

    status: int = 200
    body: dict[str, Any] = field(default_factory=dict)
    content_type: str = "application/dicom+json"
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    """``(path, Authorization header, body length)`` per request."""
    accept: list[str] = field(default_factory=list)
    """The Accept header of each request."""
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/dicom-web"


@pytest.fixture
def fake_stow() -> Iterator[FakeStow]:
    """An HTTP server on 127.0.0.1 answering every POST with ``status`` and ``body``."""
    state = FakeStow()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            length = int(self.headers.get("Content-Length", "0"))
            if self.headers.get("Transfer-Encoding") == "chunked":
                length = len(self._chunked())
            else:
                self.rfile.read(length)
            state.requests.append((self.path, self.headers.get("Authorization", ""), length))
            state.accept.append(self.headers.get("Accept", ""))
            payload = json.dumps(state.body).encode()
            self.send_response(state.status)
            self.send_header("Content-Type", state.content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            state.requests.append((self.path, self.headers.get("Authorization", ""), 0))
            payload = b"[]"
            self.send_response(state.status)
            self.send_header("Content-Type", state.content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _chunked(self) -> bytes:
            data = b""
            while (size := int(self.rfile.readline().strip(), 16)) > 0:
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            """Silent."""

    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _response(stored: list[tuple[str, int | None]], failed: list[tuple[str, int]]) -> Dataset:
    ds = Dataset()
    ds.ReferencedSOPSequence = []
    for uid, warning in stored:
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = uid
        if warning is not None:
            item.WarningReason = warning
        ds.ReferencedSOPSequence.append(item)
    ds.FailedSOPSequence = []
    for uid, reason in failed:
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = uid
        item.FailureReason = reason
        ds.FailedSOPSequence.append(item)
    return ds


def _dest(url: str, environ: dict[str, str] | None = None) -> StowDestination:
    dest = parse_destination(url, environ=environ or {})
    assert isinstance(dest, StowDestination)
    return dest


def test_response_lists_map_to_outcomes() -> None:
    items = [FileToSend(Path(f"f{i}.dcm"), "1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{i}",
                        "1.2.840.10008.1.2.1") for i in range(5)]
    response = _response([("1.2.3.0", None), ("1.2.3.1", 0xB000)],
                         [("1.2.3.2", 0xA700), ("1.2.3.3", 0x0122)])
    results = results_of_response(items, response, dest=_dest("https://pacs/dicom-web"))
    assert [(r.outcome, r.status) for r in results] == [
        (SendOutcome.STORED, None),
        (SendOutcome.WARNING, 0xB000),
        (SendOutcome.TRANSIENT, 0xA700),
        (SendOutcome.FAILED, 0x0122),
        (SendOutcome.TRANSIENT, None),
    ]
    assert results[3].reason == "STOW-RS FailureReason 0x0122"
    assert "did not list it" in results[4].reason


def test_stored_files_come_back_stored_in_one_request(
    series: FactorySeries, fake_stow: FakeStow
) -> None:
    fake_stow.body = _response([(uid, None) for uid in series.sop_instance_uids],
                               []).to_json_dict()
    results = send_stow(_dest(fake_stow.url), series.paths)
    assert [r.outcome for r in results] == [SendOutcome.STORED] * 3
    assert [r.sop_instance_uid for r in results] == list(series.sop_instance_uids)
    assert [(path, auth) for path, auth, _ in fake_stow.requests] == [("/dicom-web/studies", "")]
    assert fake_stow.requests[0][2] > sum(p.stat().st_size for p in series.paths)


def test_json_answer_with_a_charset_parameter_is_read(
    series: FactorySeries, fake_stow: FakeStow
) -> None:
    """dicomweb-client ignores a body whose media type has a parameter; the sender reads it."""
    fake_stow.content_type = "application/dicom+json; charset=utf-8"
    fake_stow.body = _response([(uid, None) for uid in series.sop_instance_uids],
                               []).to_json_dict()
    results = send_stow(_dest(fake_stow.url), series.paths)
    assert [r.outcome for r in results] == [SendOutcome.STORED] * 3
    assert fake_stow.accept == ["application/dicom+json"]


def test_conflict_answer_still_gives_each_file_its_result(
    series: FactorySeries, fake_stow: FakeStow
) -> None:
    uids = series.sop_instance_uids
    fake_stow.status = 409
    fake_stow.body = _response([(uids[0], None)],
                               [(uids[1], 0xC000), (uids[2], 0xA700)]).to_json_dict()
    results = send_stow(_dest(fake_stow.url), series.paths)
    assert [(r.outcome, r.status) for r in results] == [
        (SendOutcome.STORED, None),
        (SendOutcome.FAILED, 0xC000),
        (SendOutcome.TRANSIENT, 0xA700),
    ]


@pytest.mark.parametrize("status", [401, 500, 503])
def test_http_errors_are_transient(
    series: FactorySeries, fake_stow: FakeStow, status: int
) -> None:
    fake_stow.status = status
    results = send_stow(_dest(fake_stow.url), series.paths)
    assert [r.outcome for r in results] == [SendOutcome.TRANSIENT] * 3
    assert results[0].reason == f"STOW-RS to {fake_stow.url}: HTTP {status}"


def test_connection_refused_is_transient(series: FactorySeries) -> None:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    results = send_stow(_dest(f"http://{LOOPBACK}:{port}/dicom-web"), series.paths)
    assert [r.outcome for r in results] == [SendOutcome.TRANSIENT] * 3
    assert results[0].reason.endswith("failed: ConnectionError")


def test_unreadable_file_fails_and_the_others_are_posted(
    series: FactorySeries, fake_stow: FakeStow, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_text("not DICOM")
    fake_stow.body = _response([(series.sop_instance_uids[0], None)], []).to_json_dict()
    results = send_stow(_dest(fake_stow.url), [junk, series.paths[0]])
    assert [r.outcome for r in results] == [SendOutcome.FAILED, SendOutcome.STORED]
    assert len(fake_stow.requests) == 1


@pytest.mark.parametrize(
    ("environ", "header"),
    [
        ({ENV_DICOMWEB_TOKEN: TOKEN}, f"Bearer {TOKEN}"),
        # base64("radiology:s3cret-Pa55")
        ({ENV_DICOMWEB_BASIC: f"radiology:{PASSWORD}"}, "Basic cmFkaW9sb2d5OnMzY3JldC1QYTU1"),
    ],
)
def test_credentials_go_on_the_wire_and_never_into_a_log(
    series: FactorySeries, fake_stow: FakeStow, caplog: pytest.LogCaptureFixture,
    environ: dict[str, str], header: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake_stow.status = 503
    results = send_stow(_dest(fake_stow.url, environ), series.paths[:1])
    assert fake_stow.requests[0][1] == header
    logged = caplog.text + "".join(repr(r) for r in results)
    assert "dicomweb_client" in caplog.text  # the libraries did log at DEBUG
    for secret in (TOKEN, PASSWORD, header.split()[1]):
        assert secret not in logged


def test_check_stow_searches_once_with_the_credentials(fake_stow: FakeStow) -> None:
    dest = _dest(fake_stow.url, {ENV_DICOMWEB_TOKEN: "s3cret-token"})
    ok, detail = check_stow(dest)
    assert ok, detail
    assert fake_stow.requests == [("/dicom-web/studies?limit=1", "Bearer s3cret-token", 0)]
    assert "s3cret" not in detail


@pytest.mark.parametrize(("status", "needle"), [(401, "credentials refused"), (503, "HTTP 503")])
def test_check_stow_says_why_a_server_is_not_usable(
    fake_stow: FakeStow, status: int, needle: str
) -> None:
    fake_stow.status = status
    ok, detail = check_stow(_dest(fake_stow.url))
    assert not ok and needle in detail


def test_check_stow_of_a_closed_port_is_one_line() -> None:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    ok, detail = check_stow(_dest(f"http://{LOOPBACK}:{port}/dicom-web"))
    assert not ok and detail.startswith("no answer from") and "\n" not in detail

