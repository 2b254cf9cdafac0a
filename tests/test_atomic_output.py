"""Atomic writes: the target appears whole or not at all, and no temp file is left behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ggo_cli.atomic_output import atomic_write_bytes, atomic_write_path, atomic_write_text
from ggo_cli.errors import OutputError
from ggo_cli.fsutil import OutputTree
from tests.test_fsutil import _names


def test_write_bytes_creates_file_and_leaves_no_temp(tmp_path: Path) -> None:
    """A successful write leaves exactly the target, with the content."""
    target = tmp_path / "out.bin"
    assert atomic_write_bytes(target, b"\x00\x01data") == target
    assert target.read_bytes() == b"\x00\x01data"
    assert _names(tmp_path) == ["out.bin"]


def test_write_replaces_an_existing_file(tmp_path: Path) -> None:
    """An existing file is replaced as a whole."""
    target = tmp_path / "out.txt"
    target.write_text("old old old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert _names(tmp_path) == ["out.txt"]


def test_text_is_written_without_newline_translation(tmp_path: Path) -> None:
    """Line endings are kept exactly (CSV needs CRLF on every platform)."""
    target = tmp_path / "a.csv"
    atomic_write_text(target, "a,b\r\n1,\u00e9\r\n")
    assert target.read_bytes() == "a,b\r\n1,\u00e9\r\n".encode()


def test_temp_file_is_hidden_unique_and_beside_the_target(tmp_path: Path) -> None:
    """The temp path is a new empty '.<name>.*.tmp' file in the target's folder."""
    target = tmp_path / "ggo.seg.dcm"
    with atomic_write_path(target) as first, atomic_write_path(target) as second:
        for temp in (first, second):
            assert temp.parent == tmp_path
            assert temp.name.startswith(".ggo.seg.dcm.")
            assert temp.name.endswith(".tmp")
            assert temp.exists()
            assert temp.stat().st_size == 0
            temp.write_bytes(temp.name.encode())
        assert first != second
        assert not target.exists()  # nothing visible until the block ends
    assert target.exists()
    assert _names(tmp_path) == ["ggo.seg.dcm"]


def test_exception_in_block_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    """A failing writer leaves the previous file untouched and no temp file."""
    target = tmp_path / "out.txt"
    target.write_text("previous")
    with pytest.raises(RuntimeError, match="writer broke"), atomic_write_path(target) as temp:
        temp.write_text("partial")
        raise RuntimeError("writer broke")
    assert target.read_text() == "previous"
    assert _names(tmp_path) == ["out.txt"]


def test_disk_full_becomes_output_error_naming_the_path(tmp_path: Path) -> None:
    """ENOSPC while writing maps to OutputError with the path and a fix."""
    target = tmp_path / "out.txt"
    with pytest.raises(
        OutputError, match=r"cannot write .*out\.txt: no space left on device"
    ) as caught:
        with atomic_write_path(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.fatal  # a full disk stops the run
    assert _names(tmp_path) == []


@pytest.mark.parametrize(
    ("code", "match", "fatal"),
    [
        (errno.EROFS, "read-only", True),
        (errno.EACCES, "permission denied", True),
        (errno.EIO, "Input/output error", False),
    ],
)
def test_failed_rename_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, match: str, fatal: bool
) -> None:
    """When the final rename fails, the old file stays and the temp file is removed."""
    target = tmp_path / "out.txt"
    target.write_text("previous")

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("ggo_cli.atomic_output.os.replace", failing_replace)
    with pytest.raises(OutputError, match=match) as caught:
        atomic_write_text(target, "new")
    assert caught.value.fatal is fatal
    assert target.read_text() == "previous"
    assert _names(tmp_path) == ["out.txt"]


def test_missing_parent_folders_are_created(tmp_path: Path) -> None:
    """Parent folders (study/series) are created as needed."""
    target = tmp_path / "1.2.3" / "4.5.6" / "overlay.png"
    atomic_write_bytes(target, b"png")
    assert target.read_bytes() == b"png"


def test_parent_that_is_a_file_gives_output_error(tmp_path: Path) -> None:
    """A file where the output folder should be is reported, not a traceback."""
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(OutputError, match="cannot create folder .*blocker"):
        atomic_write_bytes(tmp_path / "blocker" / "out.txt", b"data")


def test_a_linked_file_is_replaced_not_followed(tmp_path: Path) -> None:
    """Without a tree, a link at the target is replaced by the file (its target untouched);
    with one, it is refused."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / "out.csv").symlink_to(victim)
    atomic_write_text(tmp_path / "out.csv", "new")
    assert victim.read_text() == "keep"
    assert not (tmp_path / "out.csv").is_symlink()
    (tmp_path / "again.csv").symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        atomic_write_text(tmp_path / "again.csv", "new", tree=OutputTree(tmp_path))
    assert victim.read_text() == "keep"
