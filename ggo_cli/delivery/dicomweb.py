"""STOW-RS to a DICOMweb server with dicomweb-client: one result per file.

Files go in batches of at most :data:`MAX_BATCH_BYTES` (one multipart request each, PS3.18
section 10.5). Each file's result comes from the response (PS3.18 10.5.3: the
ReferencedSOPSequence lists what was stored, with a WarningReason when stored with a warning,
the FailedSOPSequence what was not, with a FailureReason). HTTP errors and connection errors
are transient failures of the batch, never an exception. TLS certificates are always verified.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .credentials import BasicCredentials, BearerToken
from .destinations import StowDestination
from .results import (
    FileToSend,
    SendOutcome,
    SendResult,
    failed,
    result_of_status,
    send_in_order,
    transient,
)

log = logging.getLogger(__name__)

MAX_BATCH_BYTES = 64 * 1024 * 1024
"""Files per request, by their size on disk: a request holds them all in memory."""
DICOM_JSON = "application/dicom+json"
_HTTP_CONFLICT = 409
"""PS3.18 10.5.3.1: some or all instances failed; the body still lists each one."""


@dataclass(frozen=True, slots=True)
class StowTimeouts:
    """Time limits of a STOW-RS request, in seconds.

    Attributes:
        connect_s: the TCP (and TLS) connection.
        read_s: the server's answer once the request is sent.
    """

    connect_s: float = 10.0
    read_s: float = 300.0


class _BearerAuth(requests.auth.AuthBase):
    """Adds ``Authorization: Bearer`` (RFC 6750) to each request; ``repr`` shows no token."""

    def __init__(self, token: BearerToken) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token.token}"
        return request

    def __repr__(self) -> str:
        return f"_BearerAuth(source={self._token.source!r})"


def _session(dest: StowDestination) -> requests.Session:
    """A session with the destination's credentials and certificate verification."""
    session = requests.Session()
    session.verify = str(dest.ca_file) if dest.ca_file is not None else True
    # PS3.18 10.5.2: the response's media type; JSON is the one read here in every case.
    session.headers["Accept"] = DICOM_JSON
    credentials = dest.credentials
    if isinstance(credentials, BasicCredentials):
        session.auth = requests.auth.HTTPBasicAuth(credentials.user, credentials.password)
    elif isinstance(credentials, BearerToken):
        session.auth = _BearerAuth(credentials)
    return session


def _batches(items: Sequence[FileToSend]) -> Iterator[list[FileToSend]]:
    """Consecutive groups of files of at most :data:`MAX_BATCH_BYTES` (one file at least)."""
    batch: list[FileToSend] = []
    size = 0
    for item in items:
        try:
            item_size = item.path.stat().st_size
        except OSError:
            item_size = 0  # read_file_to_send just read it; _read_datasets reports it
        if batch and size + item_size > MAX_BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item_size
    if batch:
        yield batch


def _response_body(response: requests.Response | None) -> Dataset | None:
    """The STOW-RS response dataset in a DICOM JSON body, or ``None`` when there is none.

    dicomweb-client reads a body only when its Content-Type is exactly
    ``application/dicom+json``; a server that adds a parameter (``; charset=utf-8``) is read here.
    """
    if response is None or not response.content:
        return None
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media_type not in (DICOM_JSON, "application/json"):
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def _lists_instances(response: Dataset) -> bool:
    """Whether a STOW-RS response lists any instance (stored or failed)."""
    return "ReferencedSOPSequence" in response or "FailedSOPSequence" in response


def results_of_response(items: Sequence[FileToSend], response: Dataset, *,
                        dest: StowDestination) -> list[SendResult]:
    """Each file's result from a STOW-RS response dataset (PS3.18 10.5.3, Table 10.5.3-1).

    Args:
        items: the files of the request.
        response: the response dataset.
        dest: the destination (for the reasons).

    Returns:
        One result per item: ``STORED`` or ``WARNING`` (WarningReason) when listed in the
        ReferencedSOPSequence, the FailureReason's outcome when listed in the
        FailedSOPSequence, and ``TRANSIENT`` when the response does not list it.
    """
    stored: dict[str, int | None] = {}
    for entry in response.get("ReferencedSOPSequence", []):
        warning = entry.get("WarningReason")
        stored[str(entry.get("ReferencedSOPInstanceUID", ""))] = (
            int(warning) if warning is not None else None
        )
    refused: dict[str, int | None] = {}
    for entry in response.get("FailedSOPSequence", []):
        reason = entry.get("FailureReason")
        refused[str(entry.get("ReferencedSOPInstanceUID", ""))] = (
            int(reason) if reason is not None else None
        )
    results: list[SendResult] = []
    for item in items:
        uid = item.sop_instance_uid
        if uid in refused:
            code = refused[uid]
            results.append(
                result_of_status(item, code, what="STOW-RS FailureReason") if code is not None
                else failed(item, f"{dest} refused it without a FailureReason")
            )
        elif uid in stored:
            warning = stored[uid]
            results.append(
                result_of_status(item, warning, what="STOW-RS WarningReason") if warning
                else SendResult(item.path, uid, SendOutcome.STORED, None)
            )
        else:
            results.append(transient(item, f"{dest} did not list it in its STOW-RS response"))
    return results


def _read_datasets(batch: Sequence[FileToSend]) -> tuple[list[Dataset], list[SendResult]]:
    """The batch's datasets, and a ``FAILED`` result for each file that cannot be read."""
    datasets: list[Dataset] = []
    unreadable: list[SendResult] = []
    for item in batch:
        try:
            datasets.append(pydicom.dcmread(item.path))
        except (OSError, EOFError, InvalidDicomError) as exc:
            unreadable.append(failed(item, f"cannot read {item.path.name}: {type(exc).__name__}"))
    return datasets, unreadable


def _send_batch(client: DICOMwebClient, session: requests.Session, *, dest: StowDestination,
                batch: Sequence[FileToSend]) -> list[SendResult]:
    """One STOW-RS request for ``batch``."""
    datasets, unreadable = _read_datasets(batch)
    bad = {result.path for result in unreadable}
    readable = [item for item in batch if item.path not in bad]
    if not readable:
        return unreadable
    answers: list[requests.Response] = []
    hooks = session.hooks["response"]  # see what came back, for _response_body
    hooks.append(lambda answer, *_, **__: answers.append(answer))
    try:
        response = client.store_instances(datasets)
    except requests.HTTPError as exc:
        answer = exc.response
        code = answer.status_code if answer is not None else None
        body = _response_body(answer) if code == _HTTP_CONFLICT else None
        if body is None:
            reason = f"STOW-RS to {dest}: HTTP {code}"
            return unreadable + [transient(item, reason) for item in readable]
        response = body
    except (requests.RequestException, ValueError) as exc:
        # Connection refused, TLS failure, timeout, or a body dicomweb-client cannot parse.
        reason = f"STOW-RS to {dest} failed: {type(exc).__name__}"
        return unreadable + [transient(item, reason) for item in readable]
    finally:
        hooks.pop()
    if not _lists_instances(response) and answers:
        response = _response_body(answers[-1]) or response
    return unreadable + results_of_response(readable, response, dest=dest)


def send_stow(
    dest: StowDestination,
    paths: Sequence[Path],
    *,
    timeouts: StowTimeouts | None = None,
) -> list[SendResult]:
    """Send files to a DICOMweb server by STOW-RS (PS3.18 section 10.5).

    Args:
        dest: the server (its base URL; instances go to ``{url}/studies``).
        paths: DICOM Part 10 files.
        timeouts: the time limits (default :class:`StowTimeouts`).

    Returns:
        One result per path, in the order given: ``STORED``/``WARNING`` (listed as stored),
        ``FAILED`` (refused with a FailureReason that retrying will not change, or unreadable),
        or ``TRANSIENT`` (HTTP error, connection error, timeout, out of resources, or not listed).
    """
    limits = timeouts or StowTimeouts()

    def send(items: list[FileToSend]) -> list[SendResult]:
        sent: list[SendResult] = []
        with _session(dest) as session:
            client = DICOMwebClient(dest.url, session=session,
                                    timeout=(limits.connect_s, limits.read_s))
            # dicomweb-client retries 429/408/503/504 and every exception up to 5 times with
            # exponential waits (about 30 s): retrying is the delivery queue's job, across runs.
            client.set_http_retry_params(retry=False)
            for batch in _batches(items):
                by_path = {r.path: r for r in _send_batch(client, session, dest=dest, batch=batch)}
                sent.extend(by_path[item.path] for item in batch)
        return sent

    results = send_in_order(paths, send)
    stored = sum(result.outcome.delivered for result in results)
    log.debug("STOW-RS to %s: %d of %d files stored", dest, stored, len(results))
    return results


def check_stow(dest: StowDestination, *, timeouts: StowTimeouts | None = None) -> tuple[bool, str]:
    """Check a DICOMweb server: one QIDO-RS search (``GET {url}/studies?limit=1``, PS3.18 10.6)
    with the destination's credentials and certificate checks, as a send would use them.

    A server that answers 2xx is reachable and took the credentials; the answer's content is not
    read (it may hold patient data).

    Args:
        dest: the server.
        timeouts: the time limits (default :class:`StowTimeouts`).

    Returns:
        Whether the server answered 2xx, and a one-line detail (no secret, no response body).
    """
    limits = timeouts or StowTimeouts()
    with _session(dest) as session:
        try:
            response = session.get(f"{dest.url}/studies", params={"limit": "1"},
                                   timeout=(limits.connect_s, limits.read_s))
        except requests.RequestException as exc:
            return False, f"no answer from {dest}: {type(exc).__name__}"
    code = response.status_code
    if 200 <= code < 300:
        return True, f"{dest} answered a QIDO-RS search (HTTP {code})"
    hint = " (credentials refused: check GGO_DICOMWEB_*)" if code in (401, 403) else ""
    return False, f"{dest} answered HTTP {code}{hint}"

