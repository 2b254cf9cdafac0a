"""Delivery of results to a PACS: C-STORE (pynetdicom) and STOW-RS (dicomweb-client) senders.

A destination is parsed once (:func:`parse_destination`); each sender returns one
:class:`SendResult` per file and never raises for a peer that is down: its files come back
``TRANSIENT``, for the delivery queue to try again.
"""

from __future__ import annotations

from .destinations import (
    DEFAULT_CALLING_AE_TITLE,
    Destination,
    DimseDestination,
    StowDestination,
    parse_destination,
)
from .dicomweb import StowTimeouts, send_stow
from .dimse import DimseTimeouts, send_dimse
from .results import SendOutcome, SendResult

__all__ = [
    "DEFAULT_CALLING_AE_TITLE",
    "Destination",
    "DimseDestination",
    "DimseTimeouts",
    "SendOutcome",
    "SendResult",
    "StowDestination",
    "StowTimeouts",
    "parse_destination",
    "send_dimse",
    "send_stow",
]
