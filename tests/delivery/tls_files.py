"""A throw-away CA and a server certificate for 127.0.0.1, made with the ``openssl`` binary."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL_TIMEOUT_S = 30


@dataclass(frozen=True)
class TestPki:
    """The files of a test PKI (PEM).

    Attributes:
        ca_cert: the CA certificate (what a client trusts).
        server_cert: the server certificate, signed by the CA, for IP 127.0.0.1.
        server_key: its private key.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        pytest.skip("the openssl binary is not installed")
    subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True,
                   timeout=OPENSSL_TIMEOUT_S)


def make_pki(folder: Path) -> TestPki:
    """Write a CA and a server certificate for 127.0.0.1 (EC P-256, one day) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=ggo-cli test CA", cwd=folder)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext",
             cwd=folder)
    return TestPki(folder / "ca.pem", folder / "server.pem", folder / "server.key")
