"""C-STORE to a DICOM peer with pynetdicom: one association, one result per file.

The association proposes one presentation context per (SOP class, transfer syntax) of the files
(PS3.8 section 7.1.1.13; a file in an uncompressed syntax may also go as Explicit or Implicit VR
Little Endian, which pynetdicom converts to). An unreachable peer, a rejected or aborted
association, and a peer that does not answer in time are transient failures of each file not yet
stored, never an exception: the delivery queue tries them again later.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from .credentials import tls_context
from .destinations import DimseDestination
from .results import (
    STATUS_SUCCESS,
    FileToSend,
    SendResult,
    failed,
    result_of_status,
    send_in_order,
    transient,
)

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128
"""PS3.8 section 9.3.2.2: presentation context IDs are the odd numbers 1-255."""
_MESSAGE_ID_LIMIT = 0x10000
"""PS3.7 section 9.3.1.1: the Message ID is an unsigned 16-bit value."""
_WATCH_INTERVAL_S = 0.05
"""How often the C-STORE watcher looks whether the association has ended."""
_NO_CONNECTION = "Sta1"
"""PS3.8 section 9.2: the upper layer's Idle state, no transport connection."""
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True, slots=True)
class DimseTimeouts:
    """Time limits of a C-STORE association, in seconds.

    Attributes:
        connect_s: the TCP connection.
        acse_s: the association request and release answers (ACSE).
        dimse_s: each C-STORE response (DIMSE).
        network_s: silence on an established association before it is aborted.
    """

    connect_s: float = 10.0
    acse_s: float = 30.0
    dimse_s: float = 120.0
    network_s: float = 120.0


def _syntaxes(transfer_syntax: str) -> list[str]:
    """The transfer syntaxes proposed for a file: its own, plus the uncompressed little endian
    ones when it is uncompressed (pynetdicom converts between those)."""
    if UID(transfer_syntax) in _UNCOMPRESSED:
        return list(dict.fromkeys([transfer_syntax, *_UNCOMPRESSED]))
    return [transfer_syntax]


def _accepted(item: FileToSend, contexts: Sequence[PresentationContext]) -> bool:
    """Whether an accepted context can carry ``item``."""
    convertible = _syntaxes(item.transfer_syntax_uid)
    return any(
        context.abstract_syntax == item.sop_class_uid
        and context.transfer_syntax
        and context.transfer_syntax[0] in convertible
        for context in contexts
    )


def _no_association(dest: DimseDestination, assoc: Association, *,
                    timeouts: DimseTimeouts) -> str:
    """The one-line reason an association was not established."""
    if assoc.is_rejected:
        return (
            f"association rejected by {dest} (check the called AE title and that the peer "
            f"accepts the calling AE title {dest.calling_ae_title})"
        )
    return (
        f"no association with {dest}: the peer is unreachable, aborted, or did not answer "
        f"within {timeouts.acse_s:g} s"
    )


def _store_all(assoc: Association, dest: DimseDestination, *,
               items: Sequence[FileToSend]) -> list[SendResult]:
    """C-STORE each item on an established association."""
    results: list[SendResult] = []
    for message_id, item in enumerate(items, start=1):
        if not assoc.is_established:
            results.append(transient(item, f"the association with {dest} ended before this file"))
            continue
        if not _accepted(item, assoc.accepted_contexts):
            results.append(failed(
                item,
                f"{dest} accepted no presentation context for SOP class {item.sop_class_uid} "
                f"in transfer syntax {item.transfer_syntax_uid}",
            ))
            continue
        try:
            status = assoc.send_c_store(item.path, msg_id=message_id % _MESSAGE_ID_LIMIT)
        except RuntimeError:
            # pynetdicom: the association was released or aborted since the check above
            results.append(transient(item, f"the association with {dest} ended before this file"))
            continue
        except (OSError, EOFError, ValueError, AttributeError) as exc:
            results.append(failed(item, f"cannot send {item.path.name}: {type(exc).__name__}"))
            continue
        if "Status" not in status:
            # pynetdicom returns an empty dataset on a DIMSE timeout, an abort or a bad response
            results.append(transient(
                item, f"no C-STORE response from {dest} (timeout, abort or invalid response)"
            ))
            continue
        results.append(result_of_status(item, int(status.Status), what="C-STORE status"))
    return results


@contextmanager
def _unblocked_when_gone(assoc: Association) -> Iterator[None]:
    """While the block runs, end a C-STORE's wait for a response once the peer has gone.

    pynetdicom 3.0 pauses its association reactor while ``send_c_store`` waits for the
    response, so a peer that dies just before a C-STORE (killed, its host down) leaves that wait
    to run for the whole DIMSE timeout (2 minutes) although the association is already aborted
    and the DUL thread gone (see pydicom/pynetdicom#430). The same happens when the connection
    closes just before the C-STORE: pynetdicom's "no response" item for the closed connection
    can be taken by the association's reactor before the reactor sees the A-P-ABORT, and the
    DUL, now idle (state Sta1), stays alive. A watcher thread puts that item again once the
    association has ended in any of these ways; the C-STORE then comes back at once without a
    status and its file stays pending.
    """
    done = threading.Event()

    def gone() -> bool:
        return bool(assoc.is_aborted or assoc.is_released or not assoc.dul.is_alive()
                    or assoc.dul.state_machine.current_state == _NO_CONNECTION
                    or assoc.acse.is_aborted())

    def watch() -> None:
        while not done.wait(_WATCH_INTERVAL_S):
            if gone():
                assoc.dimse.msg_queue.put((None, None))
                return

    watcher = threading.Thread(target=watch, name="ggo-c-store-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def _associate(
    dest: DimseDestination,
    contexts: Sequence[PresentationContext],
    *,
    timeouts: DimseTimeouts,
    dimse_s: float | None = None,
) -> Association | str:
    """Request an association with ``dest`` (its calling AE title and TLS files).

    Returns:
        The association (established or not), or why none was requested (TLS files unusable).
    """
    tls_args: tuple[ssl.SSLContext, str] | None = None
    if dest.tls is not None:
        try:
            tls_args = (tls_context(dest.tls), dest.host)
        except (OSError, ssl.SSLError) as exc:
            return f"the DICOM TLS files are unusable now ({type(exc).__name__})"
    ae = AE(ae_title=dest.calling_ae_title)
    ae.connection_timeout = timeouts.connect_s
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s if dimse_s is None else dimse_s
    ae.network_timeout = timeouts.network_s
    return ae.associate(dest.host, dest.port, contexts=list(contexts), ae_title=dest.ae_title,
                        tls_args=tls_args)


def _send_group(dest: DimseDestination, items: Sequence[FileToSend], *,
                timeouts: DimseTimeouts) -> list[SendResult]:
    """One association for ``items`` (at most :data:`MAX_CONTEXTS` contexts)."""
    pairs = dict.fromkeys((item.sop_class_uid, item.transfer_syntax_uid) for item in items)
    contexts = [build_context(sop_class, _syntaxes(syntax)) for sop_class, syntax in pairs]
    assoc = _associate(dest, contexts, timeouts=timeouts)
    if isinstance(assoc, str):
        return [transient(item, assoc) for item in items]
    if not assoc.is_established:
        reason = _no_association(dest, assoc, timeouts=timeouts)
        log.debug("C-STORE to %s: %s files not sent: %s", dest, len(items), reason)
        return [transient(item, reason) for item in items]
    try:
        with _unblocked_when_gone(assoc):
            return _store_all(assoc, dest, items=items)
    finally:
        if assoc.is_established:
            assoc.release()


def send_dimse(
    dest: DimseDestination,
    paths: Sequence[Path],
    *,
    timeouts: DimseTimeouts | None = None,
) -> list[SendResult]:
    """Send files to a DICOM peer by C-STORE (PS3.4 Annex B) over one association.

    Args:
        dest: the peer.
        paths: DICOM Part 10 files.
        timeouts: the time limits (default :class:`DimseTimeouts`).

    Returns:
        One result per path, in the order given: ``STORED`` or ``WARNING`` with the C-STORE
        status, ``FAILED`` (the peer refused the object with that status, accepted no context for
        it, or the file is unreadable), or ``TRANSIENT`` (no association, an abort or a timeout,
        or a status such as out of resources).
    """
    limits = timeouts or DimseTimeouts()

    def send(items: list[FileToSend]) -> list[SendResult]:
        # More (SOP class, syntax) pairs than one association can propose: one association
        # per group
        pairs = list(dict.fromkeys((i.sop_class_uid, i.transfer_syntax_uid) for i in items))
        sent: dict[int, SendResult] = {}
        for start in range(0, len(pairs), MAX_CONTEXTS):
            group = set(pairs[start:start + MAX_CONTEXTS])
            members = [i for i in items if (i.sop_class_uid, i.transfer_syntax_uid) in group]
            results = _send_group(dest, members, timeouts=limits)
            for item, result in zip(members, results, strict=True):
                sent[id(item)] = result
        return [sent[id(item)] for item in items]

    results = send_in_order(paths, send)
    stored = sum(result.outcome.delivered for result in results)
    log.debug("C-STORE to %s: %d of %d files stored", dest, stored, len(results))
    return results


def echo_dimse(
    dest: DimseDestination, *, timeouts: DimseTimeouts | None = None
) -> tuple[bool, str]:
    """Check a DICOM peer with C-ECHO (PS3.4 Annex A, Verification), as a PACS administrator would.

    Args:
        dest: the peer (its TLS settings and calling AE title are used as a send would).
        timeouts: the time limits (default :class:`DimseTimeouts`).

    Returns:
        Whether the peer answered Success, and a one-line detail.
    """
    limits = timeouts or DimseTimeouts()
    assoc = _associate(dest, [build_context(Verification)], timeouts=limits, dimse_s=limits.acse_s)
    if isinstance(assoc, str):
        return False, assoc
    if not assoc.is_established:
        return False, _no_association(dest, assoc, timeouts=limits)
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        return False, f"no C-ECHO response from {dest}"
    code = int(status.Status)
    if code != STATUS_SUCCESS:
        return False, f"C-ECHO status 0x{code:04X} from {dest}"
    return True, f"C-ECHO accepted by {dest} (calling AE title {dest.calling_ae_title})"
