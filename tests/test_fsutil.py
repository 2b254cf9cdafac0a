"""Output folders: owner-only modes, no links in the tree, errno recovery, the writable probe."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ggo_cli.atomic_output import atomic_write_bytes, atomic_write_path, atomic_write_text
from ggo_cli.errors import OutputError
from ggo_cli.fsutil import OutputTree, ensure_writable_dir


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_files_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    """Outputs hold patient data: 0600 (0640 when group-readable), set with fchmod."""
    old = os.umask(0o000)
    try:
        atomic_write_text(tmp_path / "plain.txt", "x")
        tree = OutputTree(tmp_path, group_readable=True)
        atomic_write_text(tmp_path / "sub" / "group.txt", "x", tree=tree)
    finally:
        os.umask(old)
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "sub" / "group.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "sub").stat().st_mode & 0o777 == 0o750


def test_folders_below_the_tree_are_created_owner_only(tmp_path: Path) -> None:
    """Every folder created below the output folder gets 0700."""
    tree = OutputTree(tmp_path)
    with atomic_write_path(tmp_path / "a" / "b" / "f.bin", tree=tree) as temp:
        temp.write_bytes(b"x")
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o700


def test_a_linked_folder_below_the_tree_is_refused(tmp_path: Path) -> None:
    """A folder inside --out that is a link is never written through (fatal)."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "study").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OutputError, match=r"study: it is a symbolic link") as caught:
        atomic_write_bytes(out / "study" / "series" / "ggo.seg.dcm", b"x", tree=OutputTree(out))
    assert caught.value.fatal
    assert list(elsewhere.iterdir()) == []


def test_errno_is_recovered_from_a_wrapped_write_error(tmp_path: Path) -> None:
    """pydicom re-raises a failed element write as a bare OSError: ENOSPC still counts."""

    def wrapped() -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise OSError(f"{exc}\nfor data_element:\n(7FE0,0010)") from None

    with pytest.raises(OutputError, match="no space left on device") as caught:
        with atomic_write_path(tmp_path / "ggo.seg.dcm"):
            wrapped()
    assert caught.value.fatal
    assert _names(tmp_path) == []


def test_ensure_writable_dir_creates_and_probes_without_leftovers(tmp_path: Path) -> None:
    """The output folder is created and proven writable; the probe file is removed."""
    out = tmp_path / "results"
    assert ensure_writable_dir(out) == out
    assert out.is_dir()
    assert _names(out) == []


def test_ensure_writable_dir_reports_unwritable_folder_as_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that refuses new files is a fatal OutputError naming it."""

    def refuse(final: Path) -> Path:
        raise PermissionError(errno.EACCES, "Permission denied", str(final))

    monkeypatch.setattr("ggo_cli.fsutil.create_temp_file", refuse)
    with pytest.raises(
        OutputError, match=r"cannot write into folder .*results: permission"
    ) as caught:
        ensure_writable_dir(tmp_path / "results")
    assert caught.value.fatal
