"""Where the destinations come from: --send, the TOML file, GGO_SEND, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from ggo_cli.delivery import (
    ALL_KINDS,
    ENV_CALLING_AE_TITLE,
    ENV_SEND,
    ENV_SEND_CONFIG,
    DimseDestination,
    ObjectKind,
    StowDestination,
    Target,
    parse_kinds,
    resolve_targets,
)
from ggo_cli.delivery.credentials import ENV_DICOMWEB_TOKEN
from ggo_cli.errors import InputError

PACS = "dicom://PACS@127.0.0.1:104"
WEB = "http://127.0.0.1:8042/dicom-web"
SR_SC = frozenset({ObjectKind.SR, ObjectKind.SC})


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "send.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _summary(targets: tuple[Target, ...]) -> list[tuple[str, frozenset[ObjectKind], str]]:
    """Each target's key, kinds and calling AE title (``""`` for DICOMweb)."""
    return [(t.key, t.kinds, t.destination.calling_ae_title
             if isinstance(t.destination, DimseDestination) else "") for t in targets]


@pytest.mark.parametrize(("text", "kinds"), [
    ("seg,sr,sc", ALL_KINDS),
    ("sr, sc", SR_SC),
    ("SR sc", SR_SC),
    ("all", ALL_KINDS),
    ("seg", frozenset({ObjectKind.SEG})),
])
def test_kinds_parse(text: str, kinds: frozenset[ObjectKind]) -> None:
    assert parse_kinds(text) == kinds


@pytest.mark.parametrize(("text", "message"), [
    ("", "no object kinds given"),
    (" , ", "no object kinds given"),
    ("seg,png", "unknown object kind 'png'; write seg, sr, sc"),
])
def test_bad_kinds_are_refused(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_kinds(text)


def test_command_line_and_file_destinations_add_up(tmp_path: Path) -> None:
    config = _config(tmp_path, f"""
calling_ae_title = "FROM_FILE"
[[destinations]]
url = "dicom://ARCHIVE@127.0.0.1:11112"
[[destinations]]
url = "{WEB}"
objects = ["sr", "sc"]
[[destinations]]
url = "dicom://OTHER@127.0.0.1:11113"
objects = "seg"
calling_ae_title = "OWN_TITLE"
""")
    env = {ENV_SEND: "dicom://IGNORED@127.0.0.1:1"}
    targets = resolve_targets([PACS], objects="seg", config_file=config, environ=env)
    assert _summary(targets) == [
        (PACS, frozenset({ObjectKind.SEG}), "FROM_FILE"),
        ("dicom://ARCHIVE@127.0.0.1:11112", ALL_KINDS, "FROM_FILE"),
        (WEB, SR_SC, ""),
        ("dicom://OTHER@127.0.0.1:11113", frozenset({ObjectKind.SEG}), "OWN_TITLE"),
    ]
    assert isinstance(targets[2].destination, StowDestination)


def test_the_config_path_comes_from_the_environment_when_not_given(tmp_path: Path) -> None:
    config = _config(tmp_path, f'[[destinations]]\nurl = "{WEB}"\n')
    env = {ENV_SEND_CONFIG: str(config)}
    assert _summary(resolve_targets([], environ=env)) == [(WEB, ALL_KINDS, "")]
    empty = tmp_path / "empty.toml"
    empty.write_text("", encoding="utf-8")
    assert resolve_targets([], config_file=empty, environ=env) == ()


def test_ggo_send_is_used_only_when_nothing_else_gives_a_destination(tmp_path: Path) -> None:
    env = {ENV_SEND: f" {PACS},{WEB}\n "}
    assert _summary(resolve_targets([], objects="sr", environ=env)) == [
        (PACS, frozenset({ObjectKind.SR}), "GGO_CLI"), (WEB, frozenset({ObjectKind.SR}), "")]
    assert _summary(resolve_targets([WEB], environ=env)) == [(WEB, ALL_KINDS, "")]
    assert resolve_targets([], environ={}) == ()


def test_calling_ae_title_precedence(tmp_path: Path) -> None:
    config = _config(tmp_path, 'calling_ae_title = "FROM_FILE"\n')
    env = {ENV_CALLING_AE_TITLE: "FROM_ENV"}

    def title(**kwargs: object) -> str:
        (target,) = resolve_targets([PACS], **kwargs)  # type: ignore[arg-type]
        assert isinstance(target.destination, DimseDestination)
        return target.destination.calling_ae_title

    assert title(calling_ae_title="FROM_CLI", config_file=config, environ=env) == "FROM_CLI"
    assert title(config_file=config, environ=env) == "FROM_ENV"
    assert title(config_file=config, environ={}) == "FROM_FILE"
    assert title(environ={}) == "GGO_CLI"


def test_the_same_destination_twice_is_merged(tmp_path: Path) -> None:
    config = _config(tmp_path, f'[[destinations]]\nurl = "{PACS}/"\nobjects = ["sr", "sc"]\n')
    targets = resolve_targets([PACS, "dicom://PACS@127.0.0.1:104"], objects="seg",
                              config_file=config, environ={})
    assert _summary(targets) == [(PACS, ALL_KINDS, "GGO_CLI")]


def test_the_same_destination_with_two_calling_titles_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, f'[[destinations]]\nurl = "{PACS}"\ncalling_ae_title = "B"\n')
    with pytest.raises(InputError, match=rf"destination {PACS} is given twice with different "
                       r"calling AE titles \(GGO_CLI, B\); give it once"):
        resolve_targets([PACS], config_file=config, environ={})


@pytest.mark.parametrize("key", ["password", "token", "user", "basic_auth", "tls_key"])
def test_secret_looking_keys_point_to_the_environment(tmp_path: Path, key: str) -> None:
    config = _config(tmp_path, f'[[destinations]]\nurl = "{WEB}"\n{key} = "s3cret"\n')
    with pytest.raises(InputError, match=rf"destinations\[0\]: key '{key}' is refused: "
                       r"credentials come from the environment \(GGO_DICOMWEB_BASIC\(_FILE\), "
                       r"GGO_DICOMWEB_TOKEN\(_FILE\)\)") as caught:
        resolve_targets([], config_file=config, environ={})
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(("text", "message"), [
    ('retries = 3\n', r"unknown key 'retries'; the keys allowed are calling_ae_title, "
                      r"destinations"),
    ('[[destinations]]\nurl = "x"\nport = 1\n', r"destinations\[0\]: unknown key 'port'"),
    ('[[destinations]]\nobjects = ["sr"]\n', r"destinations\[0\]: no url"),
    ('[[destinations]]\nurl = 104\n', r"destinations\[0\]: url must be a string"),
    ('[[destinations]]\nurl = "dicom://A@h:1"\nobjects = ["png"]\n',
     r"destinations\[0\]: unknown object kind 'png'"),
    ('[[destinations]]\nurl = "dicom://A@h:1"\nobjects = [1]\n',
     r"destinations\[0\]: objects must be a list"),
    ('destinations = "dicom://A@h:1"\n', r"destinations must be tables"),
    ('calling_ae_title = 5\n', r"calling_ae_title must be a string"),
    ('[[destinations]]\nurl = "ftp://h/x"\n',
     r"destinations\[0\]: destination scheme 'ftp' is not supported"),
    ('[[destinations]]\nurl = "https://bob:pw@h/dicom-web"\n',
     r"destinations\[0\]: destination https://…@h/dicom-web: credentials in the URL are refused"),
    ('[[destinations]]\nurl = "dicom://A@h:1"\ncalling_ae_title = "FAR_TOO_LONG_A_TITLE"\n',
     r"destinations\[0\]: the calling AE title 'FAR_TOO_LONG_A_TITLE' has 20 characters"),
    ('calling_ae_title = ""\n', r": the calling AE title is empty"),
])
def test_config_problems_are_one_input_error_naming_the_file(
    tmp_path: Path, text: str, message: str
) -> None:
    config = _config(tmp_path, text)
    with pytest.raises(InputError, match=rf"send configuration {config}.*{message}") as caught:
        resolve_targets([], config_file=config, environ={})
    assert "\n" not in str(caught.value)
    assert "pw" not in str(caught.value).replace(str(config), "")


def test_malformed_and_unreadable_files_name_the_file_and_the_line(tmp_path: Path) -> None:
    broken = _config(tmp_path, '[[destinations]]\nurl = dicom://A@h:1\n')
    with pytest.raises(InputError, match=rf"the send configuration {broken} is not valid TOML: "
                       r"Invalid value \(at line 2, column 7\)"):
        resolve_targets([], config_file=broken, environ={})
    missing = tmp_path / "missing.toml"
    with pytest.raises(InputError, match=rf"cannot read the send configuration {missing}: "
                       r"No such file or directory \(set --send-config or GGO_SEND_CONFIG"):
        resolve_targets([], environ={ENV_SEND_CONFIG: str(missing)})
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        resolve_targets([], config_file=binary, environ={})


def test_bad_command_line_values_are_refused_before_any_work() -> None:
    with pytest.raises(InputError, match="--send: destination 'pacs:104' has no scheme"):
        resolve_targets(["pacs:104"], environ={})
    with pytest.raises(InputError, match="GGO_SEND: destination scheme 'ftp'"):
        resolve_targets([], environ={ENV_SEND: "ftp://h/x"})
    with pytest.raises(InputError, match="unknown object kind 'png'"):
        resolve_targets([PACS], objects="png", environ={})
    with pytest.raises(InputError, match=r"GGO_CALLING_AE_TITLE: the calling AE title 'A\\\\B' "
                       "holds a backslash"):
        resolve_targets([WEB], environ={ENV_CALLING_AE_TITLE: "A\\B"})


def test_credentials_still_come_from_the_environment() -> None:
    (target,) = resolve_targets([WEB], environ={ENV_DICOMWEB_TOKEN: "tok"})
    assert isinstance(target.destination, StowDestination)
    assert target.destination.credentials is not None
    assert "tok" not in repr(target)
