"""Where results are sent: the destinations of a run, from the command line, a TOML file and the
environment, resolved once into :class:`~ggo_cli.delivery.deliver.Target` values.

Rules:

- **Destinations** are the command-line ``--send`` texts, each receiving the
  ``--send-objects`` kinds (default all), plus the entries of the configuration file
  (``--send-config``, else the path in ``GGO_SEND_CONFIG``). When neither gives any, the
  destinations in ``GGO_SEND`` (separated by whitespace or commas) are used, with the
  ``--send-objects`` kinds.
- **Kinds** are ``seg``, ``sr`` and ``sc``, written as a list (``seg,sr`` or ``sr sc``) or
  ``all``.
- **Calling AE title** (this side's, for ``dicom://`` destinations): the ``--calling-ae-title``
  option, else ``GGO_CALLING_AE_TITLE``, else the file's top-level ``calling_ae_title``, else
  ``GGO_CLI``. A file entry may set its own ``calling_ae_title``, which applies to that entry only.
- **Duplicates**: the same destination given twice (the same text once parsed) is sent to once,
  with the union of the kinds; given twice with different calling AE titles, it is refused.
- **Secrets** never come from here: credentials and TLS files come from the environment
  (``GGO_DICOMWEB_BASIC(_FILE)``, ``GGO_DICOMWEB_TOKEN(_FILE)``, ``GGO_DICOMWEB_CA``,
  ``GGO_DICOM_TLS_*``). A configuration key that looks like one is refused.

The configuration file (TOML)::

    calling_ae_title = "GGO_CLI"          # optional
    [[destinations]]
    url = "dicom://PACS@pacs.example.org:104"
    objects = ["seg", "sr", "sc"]         # optional, default all
    [[destinations]]
    url = "https://pacs.example.org/dicom-web"
    objects = ["sr", "sc"]

Any problem (an unreadable or malformed file, an unknown key, a bad destination or kind) is one
:class:`~ggo_cli.errors.InputError` line (exit 2), raised before any work starts.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .deliver import Target
from .destinations import (
    DEFAULT_CALLING_AE_TITLE,
    Destination,
    DimseDestination,
    check_ae_title,
    parse_destination,
)
from .queue import ALL_KINDS, ObjectKind

ENV_SEND = "GGO_SEND"
"""Destinations, separated by whitespace or commas (used when no other source gives any)."""
ENV_SEND_CONFIG = "GGO_SEND_CONFIG"
"""The path of a TOML file of destinations."""
ENV_CALLING_AE_TITLE = "GGO_CALLING_AE_TITLE"
"""This side's AE title for ``dicom://`` destinations."""
ALL_WORD = "all"
_SEPARATORS = re.compile(r"[\s,]+")
_TOP_KEYS = ("calling_ae_title", "destinations")
_ENTRY_KEYS = ("url", "objects", "calling_ae_title")
_SECRET_WORDS = ("password", "passwd", "secret", "token", "user", "credential", "auth", "key",
                 "cert")
_SECRETS_HINT = (
    "credentials come from the environment (GGO_DICOMWEB_BASIC(_FILE), "
    "GGO_DICOMWEB_TOKEN(_FILE)) and DICOM TLS files from GGO_DICOM_TLS_CA/CERT/KEY, never "
    "from a settings file"
)


@dataclass(frozen=True, slots=True)
class _Wanted:
    """One destination as given, before parsing."""

    text: str
    kinds: frozenset[ObjectKind]
    calling_ae_title: str
    where: str
    """Where it was given, for messages (``--send``, the file and entry, ``GGO_SEND``)."""


def parse_kinds(text: str) -> frozenset[ObjectKind]:
    """Parse the kinds of object a destination receives.

    Args:
        text: ``seg``, ``sr``, ``sc`` separated by commas or whitespace, or ``all``
            (case-insensitive).

    Returns:
        The kinds.

    Raises:
        InputError: empty, or a word that is not a kind.
    """
    words = [word.lower() for word in _SEPARATORS.split(text.strip()) if word]
    if not words:
        raise InputError("no object kinds given; write seg, sr, sc (comma-separated) or all")
    kinds: set[ObjectKind] = set()
    for word in words:
        if word == ALL_WORD:
            kinds.update(ALL_KINDS)
            continue
        try:
            kinds.add(ObjectKind(word))
        except ValueError:
            choices = ", ".join(kind.value for kind in ObjectKind)
            raise InputError(
                f"unknown object kind {word!r}; write {choices} (comma-separated) or {ALL_WORD}"
            ) from None
    return frozenset(kinds)


def _refuse_key(key: str, *, where: str, allowed: Sequence[str]) -> InputError:
    """The error for an unknown key (a secret-looking one points to the environment)."""
    if any(word in key.lower() for word in _SECRET_WORDS):
        return InputError(f"{where}: key {key!r} is refused: {_SECRETS_HINT}")
    return InputError(f"{where}: unknown key {key!r}; the keys allowed are {', '.join(allowed)}")


def _string(value: object, *, where: str) -> str:
    """A TOML value that must be a string."""
    if not isinstance(value, str):
        raise InputError(f"{where} must be a string")
    return value


def _read_toml(path: Path) -> dict[str, object]:
    """The TOML document in ``path``."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise InputError(
            f"cannot read the send configuration {path}: {exc.strerror or type(exc).__name__}"
            f" (set --send-config or {ENV_SEND_CONFIG} to a readable TOML file)"
        ) from None
    except UnicodeDecodeError:
        raise InputError(f"the send configuration {path} is not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"the send configuration {path} is not valid TOML: {exc}") from None


def _entry_kinds(value: object, *, where: str) -> frozenset[ObjectKind]:
    """An entry's ``objects``: a list of kinds, or one string of them."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        text = ",".join(value)
    else:
        raise InputError(f"{where}: objects must be a list of \"seg\", \"sr\", \"sc\" or \"all\"")
    try:
        return parse_kinds(text)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def _read_config(path: Path) -> tuple[str | None, list[tuple[str, frozenset[ObjectKind],
                                                             str | None, str]]]:
    """The file's top-level calling AE title and its entries (url, kinds, AE title, where)."""
    document = _read_toml(path)
    where = f"send configuration {path}"
    for key in document:
        if key not in _TOP_KEYS:
            raise _refuse_key(key, where=where, allowed=_TOP_KEYS)
    top_title = document.get("calling_ae_title")
    if top_title is not None:
        top_title = _string(top_title, where=f"{where}: calling_ae_title")
    tables = document.get("destinations", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise InputError(f"{where}: destinations must be tables ([[destinations]] entries)")
    entries = []
    for index, table in enumerate(tables):
        spot = f"{where}: destinations[{index}]"
        for key in table:
            if key not in _ENTRY_KEYS:
                raise _refuse_key(key, where=spot, allowed=_ENTRY_KEYS)
        if "url" not in table:
            raise InputError(f"{spot}: no url; write url = \"dicom://AE@host:port\" or an "
                             "https URL")
        url = _string(table["url"], where=f"{spot}: url")
        kinds = _entry_kinds(table["objects"], where=spot) if "objects" in table else ALL_KINDS
        title = table.get("calling_ae_title")
        if title is not None:
            title = _string(title, where=f"{spot}: calling_ae_title")
        entries.append((url, kinds, title, spot))
    return top_title, entries


def _title(value: str, where: str) -> str:
    """A calling AE title, checked, its error prefixed with where it was given."""
    try:
        return check_ae_title(value, what="calling AE title")
    except InputError as exc:
        raise InputError(f"{where}{exc}") from None


def _parse(wanted: _Wanted, environ: Mapping[str, str]) -> Destination:
    """Parse one destination, its error prefixed with where it was given."""
    try:
        return parse_destination(wanted.text, calling_ae_title=wanted.calling_ae_title,
                                 environ=environ)
    except InputError as exc:
        raise InputError(f"{wanted.where}: {exc}") from None


def _merge(wanted: Sequence[_Wanted], environ: Mapping[str, str]) -> tuple[Target, ...]:
    """Parse each destination and merge those given twice (union of their kinds)."""
    merged: dict[str, Target] = {}
    for entry in wanted:
        dest = _parse(entry, environ)
        key = str(dest)
        known = merged.get(key)
        if known is None:
            merged[key] = Target(dest, entry.kinds)
            continue
        if (isinstance(dest, DimseDestination) and isinstance(known.destination, DimseDestination)
                and dest.calling_ae_title != known.destination.calling_ae_title):
            raise InputError(
                f"destination {key} is given twice with different calling AE titles "
                f"({known.destination.calling_ae_title}, {dest.calling_ae_title}); give it once"
            )
        merged[key] = Target(known.destination, known.kinds | entry.kinds)
    return tuple(merged.values())


def resolve_targets(
    send: Sequence[str],
    *,
    objects: str | None = None,
    config_file: Path | None = None,
    calling_ae_title: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Target, ...]:
    """Resolve a run's destinations (the rules are in this module's docstring).

    Args:
        send: the ``--send`` texts.
        objects: the ``--send-objects`` kinds of the ``--send`` (and ``GGO_SEND``) destinations
            (default all).
        config_file: the TOML file of destinations (default: the path in ``GGO_SEND_CONFIG``).
        calling_ae_title: this side's AE title (default: ``GGO_CALLING_AE_TITLE``, the file's,
            ``GGO_CLI``).
        environ: the environment (default ``os.environ``): ``GGO_*`` settings and secrets.

    Returns:
        The targets in the order given (command line, file, then ``GGO_SEND``), each
        destination once; empty when none is given.

    Raises:
        InputError: an unreadable or malformed file, an unknown or secret-looking key, a bad
            kind, AE title or destination. The message never quotes a secret.
    """
    env = os.environ if environ is None else environ
    kinds = parse_kinds(objects) if objects is not None else ALL_KINDS
    config_path = config_file
    if config_path is None and env.get(ENV_SEND_CONFIG, "").strip():
        config_path = Path(env[ENV_SEND_CONFIG].strip())
    top_title, entries = _read_config(config_path) if config_path is not None else (None, [])
    title = next(
        (_title(value, where) for value, where in (
            (calling_ae_title, ""),
            (env.get(ENV_CALLING_AE_TITLE, "").strip() or None, f"{ENV_CALLING_AE_TITLE}: "),
            (top_title, f"send configuration {config_path}: "),
        ) if value is not None),
        DEFAULT_CALLING_AE_TITLE,
    )
    wanted = [_Wanted(text, kinds, title, "--send") for text in send]
    for url, entry_kinds, entry_title, spot in entries:
        own = title if entry_title is None else _title(entry_title, f"{spot}: ")
        wanted.append(_Wanted(url, entry_kinds, own, spot))
    if not wanted:
        texts = [text for text in _SEPARATORS.split(env.get(ENV_SEND, "")) if text]
        wanted = [_Wanted(text, kinds, title, ENV_SEND) for text in texts]
    return _merge(wanted, env)
