"""An in-process pynetdicom Storage SCP on 127.0.0.1 that records what it receives (tests only)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

SCP_AE_TITLE = "TEST_SCP"
LOOPBACK = "127.0.0.1"


@dataclass
class Received:
    """What the SCP got: per C-STORE, the calling AE title, SOP class and instance UIDs.

    Attributes:
        stores: ``(calling AE title, SOPClassUID, SOPInstanceUID)`` in arrival order.
        associations: how many associations were established.
    """

    stores: list[tuple[str, str, str]] = field(default_factory=list)
    associations: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def uids(self) -> list[str]:
        """The SOPInstanceUIDs received, in order."""
        with self.lock:
            return [uid for _, _, uid in self.stores]


@dataclass(frozen=True)
class RunningScp:
    """A started SCP: where it listens and what it received."""

    port: int
    received: Received

    def destination(self, ae_title: str = SCP_AE_TITLE) -> str:
        """Its ``dicom://`` destination text."""
        return f"dicom://{ae_title}@{LOOPBACK}:{self.port}"


StatusOf = Callable[[int, Dataset], int]
"""The status to answer for the n-th C-STORE (0-based) of a dataset."""


@contextmanager
def storage_scp(
    *,
    status_of: StatusOf | None = None,
    contexts: Sequence[PresentationContext] | None = None,
    abort_at: int | None = None,
    drop_at: int | None = None,
    delay_s: float = 0.0,
    ssl_context: ssl.SSLContext | None = None,
    port: int = 0,
) -> Iterator[RunningScp]:
    """Run a Storage SCP on an ephemeral port of 127.0.0.1 for the ``with`` block.

    Args:
        status_of: the status of each C-STORE (default Success).
        contexts: the supported presentation contexts (default every storage SOP class).
        abort_at: abort the association on this C-STORE (0-based), before answering.
        drop_at: close the TCP connection on this C-STORE (0-based) without an answer or an
            A-ABORT, as a peer that is killed or loses its host does.
        delay_s: wait this long before answering each C-STORE.
        ssl_context: serve DICOM TLS with this server context.
        port: the port to listen on (0: an ephemeral one).

    Yields:
        The running SCP.
    """
    received = Received()
    count = [0]

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        with received.lock:
            index = count[0]
            count[0] += 1
        if abort_at is not None and index == abort_at:
            event.assoc.abort()
            return 0xA700
        if drop_at is not None and index == drop_at:
            raw = event.assoc.dul.socket.socket
            raw.shutdown(socket.SHUT_RDWR)  # the peer sees end of stream and nothing else
            raw.close()
            return 0xA700
        if delay_s:
            time.sleep(delay_s)
        with received.lock:
            received.stores.append((event.assoc.requestor.ae_title,
                                    str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        return status_of(index, ds) if status_of else 0x0000

    def on_established(event: evt.Event) -> None:
        with received.lock:
            received.associations += 1

    ae = AE(ae_title=SCP_AE_TITLE)
    ae.require_called_aet = True
    ae.supported_contexts = list(contexts or StoragePresentationContexts)
    if contexts is None:
        ae.add_supported_context(Verification)  # C-ECHO, as every PACS answers it
    server = ae.start_server((LOOPBACK, port), block=False, ssl_context=ssl_context,
                             evt_handlers=[(evt.EVT_C_STORE, on_store),
                                           (evt.EVT_ESTABLISHED, on_established)])
    assert server is not None  # block=False returns the server
    try:
        yield RunningScp(port=int(server.server_address[1]), received=received)
    finally:
        server.shutdown()
