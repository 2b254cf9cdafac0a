"""Delivery of results to a PACS: C-STORE (pynetdicom) and STOW-RS (dicomweb-client) senders
and the delivery queue.

A destination is parsed once (:func:`parse_destination`; a run's destinations come from
:func:`resolve_targets`); each sender returns one :class:`SendResult` per file and never raises
for a peer that is down: its files come back ``TRANSIENT``, for the delivery queue
(:class:`DeliveryQueue`, in the state database) to try again on the next :func:`deliver` pass.
"""

from __future__ import annotations

from .deliver import DestinationReport, Sender, Target, deliver, send_files
from .destinations import (
    DEFAULT_CALLING_AE_TITLE,
    Destination,
    DimseDestination,
    StowDestination,
    parse_destination,
)
from .dicomweb import StowTimeouts, send_stow
from .dimse import DimseTimeouts, send_dimse
from .queue import (
    ALL_KINDS,
    DeliveryQueue,
    DeliveryRow,
    DeliveryStatus,
    ObjectKind,
    StoredObject,
)
from .results import SendOutcome, SendResult
from .settings import (
    ENV_CALLING_AE_TITLE,
    ENV_SEND,
    ENV_SEND_CONFIG,
    parse_kinds,
    resolve_targets,
)

__all__ = [
    "ALL_KINDS",
    "DEFAULT_CALLING_AE_TITLE",
    "ENV_CALLING_AE_TITLE",
    "ENV_SEND",
    "ENV_SEND_CONFIG",
    "DeliveryQueue",
    "DeliveryRow",
    "DeliveryStatus",
    "Destination",
    "DestinationReport",
    "DimseDestination",
    "DimseTimeouts",
    "ObjectKind",
    "SendOutcome",
    "SendResult",
    "Sender",
    "StoredObject",
    "StowDestination",
    "StowTimeouts",
    "Target",
    "deliver",
    "parse_destination",
    "parse_kinds",
    "resolve_targets",
    "send_dimse",
    "send_files",
    "send_stow",
]
