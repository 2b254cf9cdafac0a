"""Destination parsing: DIMSE and DICOMweb forms, refusals, and secrets kept out of sight."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ggo_cli.delivery import DimseDestination, StowDestination, parse_destination
from ggo_cli.delivery.credentials import (
    ENV_DICOM_TLS_CA,
    ENV_DICOM_TLS_CERT,
    ENV_DICOMWEB_BASIC,
    ENV_DICOMWEB_BASIC_FILE,
    ENV_DICOMWEB_CA,
    ENV_DICOMWEB_TOKEN,
    ENV_DICOMWEB_TOKEN_FILE,
    BasicCredentials,
    BearerToken,
)
from ggo_cli.delivery.destinations import shown
from ggo_cli.errors import InputError

PASSWORD = "s3cret-Pa55"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.tok3n-value"


def test_dimse_destination_fields_and_default_calling_ae_title() -> None:
    dest = parse_destination("dicom://ORTHANC@pacs.example.org:4242", environ={})
    assert dest == DimseDestination(ae_title="ORTHANC", host="pacs.example.org", port=4242,
                                    calling_ae_title="GGO_CLI", tls=None)
    assert str(dest) == "dicom://ORTHANC@pacs.example.org:4242"


def test_dimse_destination_with_ipv6_host_and_configured_calling_ae_title() -> None:
    dest = parse_destination("dicom://PACS@[::1]:104", calling_ae_title="CT_AI", environ={})
    assert isinstance(dest, DimseDestination)
    assert (dest.host, dest.port, dest.calling_ae_title) == ("::1", 104, "CT_AI")
    assert str(dest) == "dicom://PACS@[::1]:104"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("dicom://pacs.example.org:4242", "no called AE title"),
        ("dicom://ORTHANC@pacs.example.org", "give the peer's port"),
        ("dicom://ORTHANC@pacs.example.org:0", "1-65535"),
        ("dicom://ORTHANC@pacs.example.org:70000", "1-65535"),
        ("dicom://ORTHANC@pacs.example.org:port", "1-65535"),
        ("dicom://ORTHANC@:4242", "no host"),
        ("dicom://ORTHANC@pacs:4242/studies", "no path, query or fragment"),
        ("dicom://THIS_TITLE_IS_TOO_LONG@pacs:4242", "at most 16"),
        ("dicom://BAD%5CTITLE@pacs:4242", "backslash"),
        ("ftp://pacs.example.org/", "scheme 'ftp' is not supported"),
        ("pacs.example.org:4242", "has no scheme"),
    ],
)
def test_bad_destinations_raise_input_error(text: str, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        parse_destination(text, environ={})
    assert info.value.exit_code == 2


def test_bad_calling_ae_title_is_refused() -> None:
    with pytest.raises(InputError, match="calling AE title"):
        parse_destination("dicom://PACS@pacs:104", calling_ae_title="  ", environ={})


def test_stow_destination_normalises_the_base_url_and_verifies_tls_by_default() -> None:
    dest = parse_destination("https://pacs.example.org:8443/dicom-web/", environ={})
    assert dest == StowDestination(url="https://pacs.example.org:8443/dicom-web",
                                   credentials=None, ca_file=None)
    assert str(dest) == "https://pacs.example.org:8443/dicom-web"


@pytest.mark.parametrize(
    "text",
    [
        f"https://admin:{PASSWORD}@pacs.example.org/dicom-web",
        f"http://admin:{PASSWORD}@127.0.0.1:8042/dicom-web",
        f"https://{PASSWORD}@pacs.example.org/dicom-web",
    ],
)
def test_credentials_in_a_url_are_refused_without_quoting_them(text: str) -> None:
    with pytest.raises(InputError, match="credentials in the URL are refused") as info:
        parse_destination(text, environ={})
    assert PASSWORD not in str(info.value)
    assert "admin" not in str(info.value)
    assert "\n" not in str(info.value)


def test_a_password_in_a_dicom_destination_is_refused_without_quoting_it() -> None:
    with pytest.raises(InputError, match="password in a DICOM destination") as info:
        parse_destination(f"dicom://PACS:{PASSWORD}@pacs:104", environ={})
    assert PASSWORD not in str(info.value)


def test_a_query_string_is_refused_without_quoting_it() -> None:
    with pytest.raises(InputError, match="query or fragment") as info:
        parse_destination(f"https://pacs/dicom-web?access_token={TOKEN}", environ={})
    assert TOKEN not in str(info.value)


def test_no_scheme_message_hides_user_information() -> None:
    with pytest.raises(InputError, match="has no scheme") as info:
        parse_destination(f"admin:{PASSWORD}@pacs:8042", environ={})
    assert PASSWORD not in str(info.value)
    assert shown(f"https://u:{PASSWORD}@host/x") == "https://…@host/x"


def test_basic_credentials_from_the_environment_never_show(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    dest = parse_destination("https://pacs/dicom-web",
                             environ={ENV_DICOMWEB_BASIC: f"radiology:{PASSWORD}"})
    assert isinstance(dest, StowDestination)
    assert dest.credentials == BasicCredentials(user="radiology", password=PASSWORD,
                                                source=ENV_DICOMWEB_BASIC)
    logging.getLogger("tests.delivery").info("sending to %s (%r)", dest, dest)
    for text in (repr(dest), str(dest), repr(dest.credentials), str(dest.credentials),
                 caplog.text):
        assert PASSWORD not in text
        assert "radiology" not in text
    assert ENV_DICOMWEB_BASIC in repr(dest)


def test_bearer_token_from_a_file_never_shows(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    dest = parse_destination("https://pacs/dicom-web",
                             environ={ENV_DICOMWEB_TOKEN_FILE: str(token_file)})
    assert isinstance(dest, StowDestination)
    assert dest.credentials == BearerToken(token=TOKEN, source=ENV_DICOMWEB_TOKEN_FILE)
    assert TOKEN not in repr(dest) + str(dest) + repr(dest.credentials)


def test_basic_credentials_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "basic"
    secret.write_text(f"radiology:{PASSWORD}\n")
    dest = parse_destination("https://pacs/dicom-web",
                             environ={ENV_DICOMWEB_BASIC_FILE: str(secret)})
    assert isinstance(dest, StowDestination)
    assert isinstance(dest.credentials, BasicCredentials)
    assert (dest.credentials.user, dest.credentials.password) == ("radiology", PASSWORD)


@pytest.mark.parametrize(
    ("environ", "match"),
    [
        ({ENV_DICOMWEB_BASIC: PASSWORD}, "must hold USER:PASSWORD"),
        ({ENV_DICOMWEB_BASIC: f"user:{PASSWORD}", ENV_DICOMWEB_TOKEN: TOKEN}, "only one"),
        ({ENV_DICOMWEB_TOKEN: TOKEN, ENV_DICOMWEB_TOKEN_FILE: "/nonexistent"}, "only one"),
        ({ENV_DICOMWEB_TOKEN: f"{TOKEN} extra"}, "empty or holds spaces"),
        ({ENV_DICOMWEB_TOKEN_FILE: "/nonexistent/token"}, "cannot read the file"),
        ({ENV_DICOMWEB_CA: "/nonexistent/ca.pem"}, "not a file"),
    ],
)
def test_bad_credentials_are_refused_without_quoting_them(
    environ: dict[str, str], match: str
) -> None:
    with pytest.raises(InputError, match=match) as info:
        parse_destination("https://pacs/dicom-web", environ=environ)
    assert PASSWORD not in str(info.value)
    assert TOKEN not in str(info.value)


def test_credentials_over_plain_http_only_to_loopback() -> None:
    environ = {ENV_DICOMWEB_TOKEN: TOKEN}
    local = parse_destination("http://127.0.0.1:8042/dicom-web", environ=environ)
    assert isinstance(local, StowDestination) and local.credentials is not None
    with pytest.raises(InputError, match="unencrypted over http") as info:
        parse_destination("http://pacs.example.org/dicom-web", environ=environ)
    assert TOKEN not in str(info.value)


def test_dicom_tls_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a file"):
        parse_destination("dicom://PACS@pacs:2762",
                          environ={ENV_DICOM_TLS_CA: str(tmp_path / "missing.pem")})
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(InputError, match="unusable"):
        parse_destination("dicom://PACS@pacs:2762", environ={ENV_DICOM_TLS_CA: str(not_pem)})
    with pytest.raises(InputError, match="without GGO_DICOM_TLS_CA"):
        parse_destination("dicom://PACS@pacs:2762", environ={ENV_DICOM_TLS_CERT: str(not_pem)})
