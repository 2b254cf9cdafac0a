"""Where results are sent: a DIMSE peer (``dicom://AE_TITLE@host:port``, C-STORE) or a DICOMweb
server (``http(s)://host[:port]/path``, STOW-RS), parsed once into a frozen value.

A destination text holds no secret: credentials in a URL are refused, and the DICOMweb
credentials and the DICOM TLS files come from the environment
(:mod:`ggo_cli.delivery.credentials`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from ..errors import InputError
from .credentials import (
    Credentials,
    TlsFiles,
    read_credentials,
    read_dicomweb_ca,
    read_tls_files,
)

DEFAULT_CALLING_AE_TITLE = "GGO_CLI"
"""This side's AE title in associations, unless configured otherwise."""
AE_TITLE_MAX_CHARS = 16
"""PS3.5 Table 6.2-1, VR AE: at most 16 characters of the default repertoire."""
DIMSE_SCHEME = "dicom"
STOW_SCHEMES = ("http", "https")
_LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True, slots=True)
class DimseDestination:
    """A DICOM peer reached by C-STORE (PS3.4 Annex B, Storage Service Class).

    Attributes:
        ae_title: the called AE title (the peer's).
        host: host name or IP address.
        port: TCP port.
        calling_ae_title: this side's AE title.
        tls: the DICOM TLS files, or ``None`` for plain TCP.
    """

    ae_title: str
    host: str
    port: int
    calling_ae_title: str = DEFAULT_CALLING_AE_TITLE
    tls: TlsFiles | None = None

    def __str__(self) -> str:
        """The destination as written (``dicom://AE@host:port``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{DIMSE_SCHEME}://{self.ae_title}@{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StowDestination:
    """A DICOMweb server reached by STOW-RS (PS3.18 section 10.5).

    Attributes:
        url: the DICOMweb base URL (the service root, e.g. ``https://pacs/dicom-web``),
            without credentials, query or fragment.
        credentials: basic credentials or a bearer token, or ``None``.
        ca_file: a CA bundle that signs the server's certificate; ``None`` uses the system's
            (verification is always on for https).
    """

    url: str
    credentials: Credentials | None = None
    ca_file: Path | None = None

    def __str__(self) -> str:
        """The base URL (it never holds credentials)."""
        return self.url


Destination = DimseDestination | StowDestination


def check_ae_title(value: str, *, what: str) -> str:
    """Check an AE title against PS3.5 Table 6.2-1 (VR AE) and return it without padding.

    Args:
        value: the AE title.
        what: what it is, for the message (e.g. ``"called AE title"``).

    Returns:
        The AE title without leading or trailing spaces (they are not significant).

    Raises:
        InputError: empty, longer than 16 characters, or holding a backslash, a control or a
            non-ASCII character.
    """
    title = value.strip(" ")
    if not title:
        raise InputError(f"the {what} is empty; give 1 to {AE_TITLE_MAX_CHARS} characters")
    if len(title) > AE_TITLE_MAX_CHARS:
        raise InputError(
            f"the {what} {title!r} has {len(title)} characters; at most "
            f"{AE_TITLE_MAX_CHARS} are allowed (PS3.5 VR AE)"
        )
    if "\\" in title or not (title.isascii() and title.isprintable()):
        raise InputError(
            f"the {what} {title!r} holds a backslash, a control or a non-ASCII character, "
            "which an AE title may not (PS3.5 VR AE)"
        )
    return title


_EXAMPLES = "dicom://AE_TITLE@host:port or https://host[:port]/dicom-web"
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)?[^/@]*@")


def shown(text: str) -> str:
    """``text`` with any user information (``user:password@``) replaced by ``…@``.

    Args:
        text: a destination as given.

    Returns:
        The text safe to quote in a message or a log line.
    """
    return _USERINFO.sub(lambda match: f"{match.group(1) or ''}…@", text)


def _host_port(parts: SplitResult, text: str) -> tuple[str, int | None]:
    """The host and the port (``None`` when absent) of a split URL, checked."""
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise InputError(f"destination {shown(text)!r}: the port is not a number in 1-65535")
    host = parts.hostname or ""
    if not host:
        raise InputError(f"destination {shown(text)!r}: no host; write {_EXAMPLES}")
    return host, port


def _is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (plain http credentials are allowed only there)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_dimse(text: str, parts: SplitResult, *, calling_ae_title: str,
                 environ: Mapping[str, str]) -> DimseDestination:
    """A ``dicom://`` destination."""
    if parts.password is not None:
        raise InputError(
            f"destination {DIMSE_SCHEME}://…@{parts.hostname}: a password in a DICOM "
            "destination is refused (write dicom://AE_TITLE@host:port)"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InputError(
            f"destination {DIMSE_SCHEME}://{parts.netloc}: a DICOM destination has no path, "
            "query or fragment "
            "(write dicom://AE_TITLE@host:port)"
        )
    if parts.username is None:
        raise InputError(
            f"destination {shown(text)!r}: no called AE title (write dicom://AE_TITLE@host:port)"
        )
    host, port = _host_port(parts, text)
    if port is None:
        raise InputError(f"destination {shown(text)!r}: give the peer's port (write {_EXAMPLES})")
    return DimseDestination(
        ae_title=check_ae_title(unquote(parts.username), what="called AE title"),
        host=host,
        port=port,
        calling_ae_title=check_ae_title(calling_ae_title, what="calling AE title"),
        tls=read_tls_files(environ),
    )


def _parse_stow(text: str, parts: SplitResult, *, environ: Mapping[str, str]) -> StowDestination:
    """An ``http://`` or ``https://`` destination."""
    if parts.username is not None or parts.password is not None:
        # Quote neither the user nor the password: the message is logged.
        raise InputError(
            f"destination {parts.scheme}://…@{parts.hostname}{parts.path}: credentials in the "
            "URL are refused; set GGO_DICOMWEB_BASIC(_FILE) or GGO_DICOMWEB_TOKEN(_FILE) instead"
        )
    if parts.query or parts.fragment:
        raise InputError(
            f"destination {parts.scheme}://{parts.netloc}{parts.path}: a query or fragment is "
            "not part of a DICOMweb base URL; remove it"
        )
    host, _ = _host_port(parts, text)
    credentials = read_credentials(environ)
    if credentials is not None and parts.scheme == "http" and not _is_loopback(host):
        raise InputError(
            f"destination {shown(text)}: credentials ({credentials.source}) would travel "
            "unencrypted over http to another host; use https"
        )
    return StowDestination(
        url=f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}",
        credentials=credentials,
        ca_file=read_dicomweb_ca(environ),
    )


def parse_destination(
    text: str,
    *,
    calling_ae_title: str = DEFAULT_CALLING_AE_TITLE,
    environ: Mapping[str, str] | None = None,
) -> Destination:
    """Parse a destination.

    Args:
        text: ``dicom://AE_TITLE@host:port`` (C-STORE; IPv6 hosts in brackets) or
            ``http(s)://host[:port]/path`` (STOW-RS to the DICOMweb service at ``path``).
        calling_ae_title: this side's AE title for DIMSE destinations.
        environ: where credentials and TLS files are read (default ``os.environ``).

    Returns:
        A :class:`DimseDestination` or a :class:`StowDestination`.

    Raises:
        InputError: an unknown scheme, a missing AE title, host or port, an invalid AE title,
            credentials in the URL, a query or fragment, or bad credentials or TLS settings.
            The message never quotes a secret.
    """
    env = os.environ if environ is None else environ
    text = text.strip()
    scheme, sep, _ = text.partition("://")
    if not sep:
        raise InputError(f"destination {shown(text)!r} has no scheme; write {_EXAMPLES}")
    try:
        parts = urlsplit(text)
    except ValueError:
        raise InputError(f"destination {scheme}://…: not a valid URL; write {_EXAMPLES}") from None
    scheme = parts.scheme.lower()
    if scheme == DIMSE_SCHEME:
        return _parse_dimse(text, parts, calling_ae_title=calling_ae_title, environ=env)
    if scheme in STOW_SCHEMES:
        return _parse_stow(text, parts, environ=env)
    raise InputError(f"destination scheme {scheme!r} is not supported; write {_EXAMPLES}")
