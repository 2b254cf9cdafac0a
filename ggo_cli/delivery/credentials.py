"""Secrets for delivery, read from the environment only: DICOMweb credentials and TLS files.

Credentials never come from a URL or the command line (a process list and shell history would
show them). They are read from an environment variable, or from a file whose path an
environment variable names, and they never appear in ``repr``, ``str``, a log line or an
exception message: the values keep only the name of the variable they came from.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

ENV_DICOMWEB_BASIC = "GGO_DICOMWEB_BASIC"
"""HTTP basic credentials for DICOMweb destinations, as ``USER:PASSWORD``."""
ENV_DICOMWEB_BASIC_FILE = "GGO_DICOMWEB_BASIC_FILE"
"""A file holding ``USER:PASSWORD`` (one line)."""
ENV_DICOMWEB_TOKEN = "GGO_DICOMWEB_TOKEN"
"""A bearer token for DICOMweb destinations (RFC 6750)."""
ENV_DICOMWEB_TOKEN_FILE = "GGO_DICOMWEB_TOKEN_FILE"
"""A file holding the bearer token (one line)."""
ENV_DICOMWEB_CA = "GGO_DICOMWEB_CA"
"""A CA bundle (PEM) that signs the DICOMweb server's certificate, instead of the system's."""
ENV_DICOM_TLS_CA = "GGO_DICOM_TLS_CA"
"""A CA bundle (PEM) for DICOM TLS: when set, ``dicom://`` destinations are reached over TLS."""
ENV_DICOM_TLS_CERT = "GGO_DICOM_TLS_CERT"
"""This side's certificate (PEM) for DICOM TLS client authentication (with the key)."""
ENV_DICOM_TLS_KEY = "GGO_DICOM_TLS_KEY"
"""The private key (PEM) of :data:`ENV_DICOM_TLS_CERT`."""


@dataclass(frozen=True, slots=True)
class BasicCredentials:
    """HTTP basic credentials (RFC 7617); ``repr`` names only where they came from.

    Attributes:
        user: the user name.
        password: the password.
        source: the environment variable they were read from (or that named their file).
    """

    user: str = field(repr=False)
    password: str = field(repr=False)
    source: str


@dataclass(frozen=True, slots=True)
class BearerToken:
    """A bearer token (RFC 6750); ``repr`` names only where it came from.

    Attributes:
        token: the token.
        source: the environment variable it was read from (or that named its file).
    """

    token: str = field(repr=False)
    source: str


Credentials = BasicCredentials | BearerToken


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The files of a DICOM TLS connection (PS3.15 Annex B.1, TLS Secure Transport Profile).

    Attributes:
        ca_file: the CA bundle that signs the peer's certificate (the peer is always verified).
        cert_file: this side's certificate for client authentication, or ``None``.
        key_file: the private key of ``cert_file``, or ``None``.
    """

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None


def _secret(environ: Mapping[str, str], name: str, *, file_name: str) -> tuple[str, str] | None:
    """The secret in ``name`` or in the file ``file_name`` names, with the variable it came from."""
    value = environ.get(name, "")
    path = environ.get(file_name, "")
    if value and path:
        raise InputError(f"both {name} and {file_name} are set; set only one of them")
    if value:
        return value.strip(), name
    if not path:
        return None
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"cannot read the file named by {file_name} ({type(exc).__name__}); "
            "point it to a readable UTF-8 file holding one line"
        ) from None
    lines = text.strip().splitlines()
    if len(lines) != 1:
        raise InputError(f"the file named by {file_name} must hold exactly one non-empty line")
    return lines[0].strip(), file_name


def read_credentials(environ: Mapping[str, str]) -> Credentials | None:
    """Read the DICOMweb credentials from the environment.

    Args:
        environ: the environment (``os.environ``, or a mapping in tests).

    Returns:
        Basic credentials, a bearer token, or ``None`` when none is set.

    Raises:
        InputError: both kinds are set, a value and its file are both set, the file cannot be
            read, or a value is malformed. The message never quotes the secret.
    """
    basic = _secret(environ, ENV_DICOMWEB_BASIC, file_name=ENV_DICOMWEB_BASIC_FILE)
    token = _secret(environ, ENV_DICOMWEB_TOKEN, file_name=ENV_DICOMWEB_TOKEN_FILE)
    if basic and token:
        raise InputError(
            f"both basic credentials ({basic[1]}) and a bearer token ({token[1]}) are set; "
            "set only one of them"
        )
    if token:
        value, source = token
        if not value or any(ch.isspace() or not ch.isprintable() for ch in value):
            raise InputError(f"the bearer token in {source} is empty or holds spaces")
        return BearerToken(token=value, source=source)
    if basic:
        value, source = basic
        user, colon, password = value.partition(":")
        if not colon or not user or not password:
            raise InputError(f"{source} must hold USER:PASSWORD (a non-empty user and password)")
        if not (user + password).isprintable():
            raise InputError(f"the credentials in {source} hold control characters")
        return BasicCredentials(user=user, password=password, source=source)
    return None


def _existing_file(environ: Mapping[str, str], name: str) -> Path | None:
    """The file the variable ``name`` names (must exist), or ``None`` when it is unset."""
    value = environ.get(name, "")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise InputError(f"{name} names {path}, which is not a file; point it to a PEM file")
    return path


def read_dicomweb_ca(environ: Mapping[str, str]) -> Path | None:
    """The CA bundle of DICOMweb servers (:data:`ENV_DICOMWEB_CA`), or ``None`` (system CAs).

    Raises:
        InputError: the variable names no file.
    """
    return _existing_file(environ, ENV_DICOMWEB_CA)


def read_tls_files(environ: Mapping[str, str]) -> TlsFiles | None:
    """The DICOM TLS files from the environment, checked by building a context once.

    Args:
        environ: the environment (``os.environ``, or a mapping in tests).

    Returns:
        The files, or ``None`` when :data:`ENV_DICOM_TLS_CA` is unset (plain TCP).

    Raises:
        InputError: a file is missing or unusable, or only one of certificate and key is set.
    """
    ca_file = _existing_file(environ, ENV_DICOM_TLS_CA)
    cert_file = _existing_file(environ, ENV_DICOM_TLS_CERT)
    key_file = _existing_file(environ, ENV_DICOM_TLS_KEY)
    if ca_file is None:
        if cert_file or key_file:
            raise InputError(
                f"{ENV_DICOM_TLS_CERT}/{ENV_DICOM_TLS_KEY} are set without {ENV_DICOM_TLS_CA}; "
                "DICOM TLS needs the CA that signs the peer's certificate"
            )
        return None
    if (cert_file is None) != (key_file is None):
        raise InputError(f"set both {ENV_DICOM_TLS_CERT} and {ENV_DICOM_TLS_KEY}, or neither")
    files = TlsFiles(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    try:
        tls_context(files)
    except (OSError, ssl.SSLError) as exc:
        raise InputError(
            f"the DICOM TLS files ({ENV_DICOM_TLS_CA}, {ENV_DICOM_TLS_CERT}, "
            f"{ENV_DICOM_TLS_KEY}) are unusable: {type(exc).__name__}; check they are PEM "
            "files and that the key matches the certificate"
        ) from None
    return files


def tls_context(files: TlsFiles) -> ssl.SSLContext:
    """A client TLS context that verifies the peer against ``files.ca_file``.

    Args:
        files: the CA bundle and the optional client certificate and key.

    Returns:
        The context (TLS 1.2 or later, host name checked, as PS3.15 B.1 and BCP 195 ask).

    Raises:
        OSError: a file cannot be read.
        ssl.SSLError: a file is not usable PEM, or the key does not match the certificate.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if files.cert_file is not None:
        key = str(files.key_file) if files.key_file is not None else None
        context.load_cert_chain(str(files.cert_file), key)
    return context
