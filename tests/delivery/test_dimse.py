"""The C-STORE sender against an in-process pynetdicom Storage SCP on 127.0.0.1."""

from __future__ import annotations

import queue
import socket
import ssl
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context

from ggo_cli.delivery import (
    DimseDestination,
    DimseTimeouts,
    SendOutcome,
    parse_destination,
    send_dimse,
)
from ggo_cli.delivery.credentials import ENV_DICOM_TLS_CA
from ggo_cli.delivery.dimse import _unblocked_when_gone, echo_dimse
from tests.delivery.storage_scp import LOOPBACK, storage_scp
from tests.delivery.tls_files import make_pki
from tests.dicom_factory import FactorySeries, make_ct_series

FAST = DimseTimeouts(connect_s=2.0, acse_s=2.0, dimse_s=1.0, network_s=2.0)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> FactorySeries:
    """Three CT slices and a Basic Text SR of the same study."""
    return make_ct_series(tmp_path_factory.mktemp("scu"), (3, 32, 32), sr_document=True)


def _dest(text: str) -> DimseDestination:
    dest = parse_destination(text, environ={})
    assert isinstance(dest, DimseDestination)
    return dest


def test_every_file_is_stored_over_one_association(series: FactorySeries) -> None:
    assert series.sr_path is not None
    paths = [*series.paths, series.sr_path]
    with storage_scp() as scp:
        results = send_dimse(_dest(scp.destination()), paths, timeouts=FAST)
    assert [r.path for r in results] == paths
    assert [r.outcome for r in results] == [SendOutcome.STORED] * 4
    assert [r.status for r in results] == [0] * 4
    assert scp.received.associations == 1
    sr_uid = results[-1].sop_instance_uid
    assert scp.received.uids() == [*series.sop_instance_uids, sr_uid]
    assert {calling for calling, _, _ in scp.received.stores} == {"GGO_CLI"}
    assert scp.received.stores[0][1] == CTImageStorage


def test_peer_statuses_map_to_warning_failure_and_transient(series: FactorySeries) -> None:
    codes = {0: 0xB000, 1: 0xC000, 2: 0xA702}
    with storage_scp(status_of=lambda index, _: codes[index]) as scp:
        results = send_dimse(_dest(scp.destination()), series.paths, timeouts=FAST)
    assert [(r.outcome, r.status) for r in results] == [
        (SendOutcome.WARNING, 0xB000),
        (SendOutcome.FAILED, 0xC000),
        (SendOutcome.TRANSIENT, 0xA702),
    ]
    assert results[1].reason == "C-STORE status 0xC000"
    assert [r.outcome.delivered for r in results] == [True, False, False]


def test_sop_class_the_peer_does_not_accept_fails_alone(series: FactorySeries) -> None:
    assert series.sr_path is not None
    ct_only = [build_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
    with storage_scp(contexts=ct_only) as scp:
        results = send_dimse(_dest(scp.destination()), [series.sr_path, *series.paths],
                             timeouts=FAST)
    assert results[0].outcome is SendOutcome.FAILED
    assert "accepted no presentation context for SOP class 1.2.840.10008.5.1.4.1.1.88.11" in (
        results[0].reason
    )
    assert [r.outcome for r in results[1:]] == [SendOutcome.STORED] * 3
    assert scp.received.uids() == list(series.sop_instance_uids)


def test_implicit_only_peer_gets_the_explicit_files_converted(series: FactorySeries) -> None:
    implicit_only = [build_context(CTImageStorage, [ImplicitVRLittleEndian])]
    with storage_scp(contexts=implicit_only) as scp:
        results = send_dimse(_dest(scp.destination()), series.paths, timeouts=FAST)
    assert [r.outcome for r in results] == [SendOutcome.STORED] * 3
    assert scp.received.uids() == list(series.sop_instance_uids)


def test_rejected_association_is_transient_for_every_file(series: FactorySeries) -> None:
    with storage_scp() as scp:
        results = send_dimse(_dest(scp.destination("WRONG_AE")), series.paths, timeouts=FAST)
    assert [r.outcome for r in results] == [SendOutcome.TRANSIENT] * 3
    assert all("association rejected by dicom://WRONG_AE@" in r.reason for r in results)
    assert scp.received.uids() == []


def test_unreachable_peer_is_transient_not_an_exception(series: FactorySeries) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    results = send_dimse(_dest(f"dicom://NOBODY@{LOOPBACK}:{port}"), series.paths, timeouts=FAST)
    assert [r.outcome for r in results] == [SendOutcome.TRANSIENT] * 3
    assert "unreachable" in results[0].reason
    assert [r.sop_instance_uid for r in results] == list(series.sop_instance_uids)


def test_aborted_association_leaves_the_rest_transient(series: FactorySeries) -> None:
    with storage_scp(abort_at=1) as scp:
        results = send_dimse(_dest(scp.destination()), series.paths, timeouts=FAST)
    assert results[0].outcome is SendOutcome.STORED
    assert [r.outcome for r in results[1:]] == [SendOutcome.TRANSIENT] * 2
    assert scp.received.uids() == [series.sop_instance_uids[0]]


def test_a_peer_that_drops_the_connection_ends_the_wait_before_the_dimse_timeout(
    series: FactorySeries,
) -> None:
    """A peer killed during a C-STORE (its TCP connection closed, no A-ABORT) must not hold the
    send for the whole DIMSE timeout: the files not answered stay transient at once."""
    patient = DimseTimeouts(connect_s=2.0, acse_s=2.0, dimse_s=30.0, network_s=30.0)
    with storage_scp(drop_at=1) as scp:
        started = time.monotonic()
        results = send_dimse(_dest(scp.destination()), series.paths, timeouts=patient)
        seconds = time.monotonic() - started
    assert seconds < 10.0, f"the send waited {seconds:.0f} s for a peer that had gone"
    assert results[0].outcome is SendOutcome.STORED
    assert [r.outcome for r in results[1:]] == [SendOutcome.TRANSIENT] * 2
    assert "no C-STORE response" in results[1].reason


def test_a_c_store_waiting_on_a_closed_connection_is_released_at_once() -> None:
    """The race seen with a killed Orthanc: the connection closed (the upper layer is idle,
    Sta1, its thread still alive, the association not yet marked aborted) and pynetdicom's own
    "no response" item already taken; the wait must still end within the watch interval."""
    msg_queue: queue.Queue[tuple[None, None]] = queue.Queue()
    dul = SimpleNamespace(is_alive=lambda: True,
                          state_machine=SimpleNamespace(current_state="Sta6"))
    assoc = SimpleNamespace(is_aborted=False, is_released=False, dul=dul,
                            acse=SimpleNamespace(is_aborted=lambda: False),
                            dimse=SimpleNamespace(msg_queue=msg_queue))
    with _unblocked_when_gone(assoc):  # type: ignore[arg-type]
        with pytest.raises(queue.Empty):  # an open association: no item
            msg_queue.get(timeout=0.3)
        dul.state_machine.current_state = "Sta1"
        assert msg_queue.get(timeout=2.0) == (None, None)


def test_dimse_timeout_is_transient(series: FactorySeries) -> None:
    quick = DimseTimeouts(connect_s=2.0, acse_s=2.0, dimse_s=0.3, network_s=2.0)
    with storage_scp(delay_s=1.0) as scp:
        results = send_dimse(_dest(scp.destination()), series.paths[:2], timeouts=quick)
    assert [r.outcome for r in results] == [SendOutcome.TRANSIENT] * 2
    assert "no C-STORE response" in results[0].reason


def test_unreadable_file_fails_and_the_others_are_sent(
    series: FactorySeries, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not DICOM at all")
    missing = tmp_path / "missing.dcm"
    with storage_scp() as scp:
        results = send_dimse(_dest(scp.destination()), [junk, series.paths[0], missing],
                             timeouts=FAST)
    assert [r.outcome for r in results] == [
        SendOutcome.FAILED, SendOutcome.STORED, SendOutcome.FAILED
    ]
    assert results[0].reason == "cannot read junk.dcm: InvalidDicomError"
    assert scp.received.uids() == [series.sop_instance_uids[0]]


def test_dicom_tls_verifies_the_peer_and_stores(series: FactorySeries, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pki.server_cert, pki.server_key)
    with storage_scp(ssl_context=server) as scp:
        text = scp.destination()
        secure = parse_destination(text, environ={ENV_DICOM_TLS_CA: str(pki.ca_cert)})
        assert isinstance(secure, DimseDestination) and secure.tls is not None
        stored = send_dimse(secure, series.paths[:1], timeouts=FAST)
        plain = send_dimse(_dest(text), series.paths[1:2], timeouts=FAST)
    other_ca = make_pki(tmp_path / "other")
    with storage_scp(ssl_context=server) as scp:
        untrusted = parse_destination(scp.destination(),
                                      environ={ENV_DICOM_TLS_CA: str(other_ca.ca_cert)})
        assert isinstance(untrusted, DimseDestination)
        refused = send_dimse(untrusted, series.paths[:1], timeouts=FAST)
        assert scp.received.uids() == []
    assert stored[0].outcome is SendOutcome.STORED
    assert plain[0].outcome is SendOutcome.TRANSIENT
    assert refused[0].outcome is SendOutcome.TRANSIENT


def test_c_echo_answers_from_a_peer_and_says_why_not_from_others() -> None:
    """What ``ggo-cli info --send`` reports: C-ECHO Success, a rejected AE title, a closed port."""
    with storage_scp() as scp:
        ok, detail = echo_dimse(_dest(scp.destination()), timeouts=FAST)
        assert ok and "C-ECHO accepted" in detail
        ok, detail = echo_dimse(_dest(scp.destination("WRONG_AE")), timeouts=FAST)
        assert not ok and "association rejected by dicom://WRONG_AE@" in detail
        assert scp.received.stores == []  # nothing stored by a check
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    ok, detail = echo_dimse(_dest(f"dicom://NOBODY@{LOOPBACK}:{port}"), timeouts=FAST)
    assert not ok and "unreachable" in detail
