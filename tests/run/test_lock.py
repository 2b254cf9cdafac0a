"""The run lock: one ggo-cli run per output folder (across processes: tests/e2e/)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from ggo_cli.errors import OutputError
from ggo_cli.run.lock import RunLock


def test_lock_is_exclusive_within_one_process_too(tmp_path: Path) -> None:
    from ggo_cli.errors import RunLockedError

    with RunLock(tmp_path), pytest.raises(RunLockedError, match="in use by another ggo-cli run"):
        RunLock(tmp_path).__enter__()


def test_the_lock_file_names_the_holder_and_is_emptied_on_release(tmp_path: Path) -> None:
    """While held, the file says who holds it; a clean exit empties it so it can be taken again."""
    lock = RunLock(tmp_path)
    with lock:
        holder = json.loads(lock.path.read_text(encoding="utf-8"))
        assert holder["pid"] == os.getpid()
        assert holder["host"] == socket.gethostname()
        assert holder["started_at"]
    assert lock.path.read_text(encoding="utf-8") == ""
    with RunLock(tmp_path):  # released: the same folder can be locked again
        pass


def test_the_lock_message_names_the_holder(tmp_path: Path) -> None:
    """The refusal says which process, on which host, holds the folder."""
    from ggo_cli.errors import RunLockedError

    with RunLock(tmp_path), pytest.raises(RunLockedError, match=rf"pid {os.getpid()} on "):
        RunLock(tmp_path).__enter__()


def test_a_linked_lock_file_is_refused_as_fatal(tmp_path: Path) -> None:
    """A link in place of the lock file is never followed: a fatal OutputError."""
    lock = RunLock(tmp_path)
    lock.path.parent.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep", encoding="utf-8")
    lock.path.symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link") as caught:
        lock.__enter__()
    assert caught.value.fatal
    assert victim.read_text(encoding="utf-8") == "keep"
