"""One delivery pass: chunks, order, a destination that is down, retries, and a real C-STORE SCP."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from ggo_cli.delivery import (
    ALL_KINDS,
    DeliveryQueue,
    DeliveryStatus,
    Destination,
    DimseDestination,
    DimseTimeouts,
    ObjectKind,
    SendOutcome,
    SendResult,
    StoredObject,
    Target,
    deliver,
    parse_destination,
    send_dimse,
)
from ggo_cli.errors import InputError
from tests.delivery.storage_scp import storage_scp
from tests.dicom_factory import make_ct_series

FAST = DimseTimeouts(connect_s=2.0, acse_s=2.0, dimse_s=2.0, network_s=2.0)
PACS = parse_destination("dicom://PACS@127.0.0.1:104", environ={})
WEB = parse_destination("http://127.0.0.1:8042/dicom-web", environ={})
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
Outcome = Callable[[str], tuple[SendOutcome, str]]


@dataclass
class FakeSender:
    """Records each call's file names and answers each file with ``outcome(uid)``."""

    uids: dict[Path, str]
    outcome: Outcome = lambda uid: (SendOutcome.STORED, "")
    calls: list[list[str]] = field(default_factory=list)
    on_call: Callable[[int], None] | None = None

    def __call__(self, dest: Destination, paths: Sequence[Path]) -> list[SendResult]:
        if self.on_call is not None:
            self.on_call(len(self.calls))
        self.calls.append([self.uids[path] for path in paths])
        results = []
        for path in paths:
            outcome, reason = self.outcome(self.uids[path])
            results.append(SendResult(path, self.uids[path], outcome, None, reason))
        return results


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[DeliveryQueue]:
    db = sqlite3.connect(tmp_path / "state.sqlite", isolation_level=None)
    yield DeliveryQueue(db)
    db.close()


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def _register(queue: DeliveryQueue, out_dir: Path, series: str, uids: Sequence[str],
              kind: ObjectKind = ObjectKind.SEG) -> dict[Path, str]:
    """Register placeholder files (the fake sender never reads them); returns path -> UID."""
    (out_dir / series).mkdir(exist_ok=True)
    objects = [StoredObject(uid, CT_CLASS, kind, series, f"{series}/{uid}.dcm") for uid in uids]
    for obj in objects:
        (out_dir / obj.path).write_bytes(b"placeholder")
    queue.register_series(series, objects)
    return {out_dir / obj.path: obj.sop_instance_uid for obj in objects}


def _uids(queue: DeliveryQueue, dest: Destination, status: DeliveryStatus) -> list[str]:
    return [row.obj.sop_instance_uid for row in queue.rows(str(dest), statuses={status})]


def test_due_rows_go_out_oldest_first_in_chunks_recorded_after_each(
    queue: DeliveryQueue, out_dir: Path
) -> None:
    uids = _register(queue, out_dir, "S1", ["1.1", "1.2", "1.3"])
    uids |= _register(queue, out_dir, "S2", ["2.1", "2.2"])
    seen_sent: list[int] = []
    sender = FakeSender(uids, on_call=lambda _: seen_sent.append(
        queue.counts(str(PACS))[DeliveryStatus.SENT]))
    (report,) = deliver(queue, [Target(PACS, ALL_KINDS)], out_dir, at="t1", sender=sender,
                        chunk=2)
    assert sender.calls == [["1.1", "1.2"], ["1.3", "2.1"], ["2.2"]]
    assert seen_sent == [0, 2, 4]
    assert (report.attempted, report.stored, report.sent, report.pending) == (5, 5, 5, 0)
    assert report.complete and report.last_error == ""
    again = FakeSender(uids)
    (second,) = deliver(queue, [Target(PACS, ALL_KINDS)], out_dir, at="t2", sender=again)
    assert again.calls == [] and second.attempted == 0 and second.complete


def test_a_down_destination_is_left_after_one_chunk_with_one_line(
    queue: DeliveryQueue, out_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uids = _register(queue, out_dir, "S1", [f"1.{n}" for n in range(5)])
    down = FakeSender(uids, lambda uid: (SendOutcome.TRANSIENT, "no association with PACS"))
    up = FakeSender(uids)
    targets = [Target(PACS, ALL_KINDS), Target(WEB, ALL_KINDS)]
    with caplog.at_level(logging.INFO, logger="ggo_cli.delivery"):
        reports = deliver(queue, targets, out_dir, at="t1", chunk=2,
                          sender=lambda dest, paths: (down if dest == PACS else up)(dest, paths))
    assert down.calls == [["1.0", "1.1"]]
    assert len(up.calls) == 3
    pacs, web = reports
    assert (pacs.attempted, pacs.transient, pacs.pending, pacs.sent) == (2, 2, 5, 0)
    assert pacs.last_error == "no association with PACS" and not pacs.complete
    assert web.complete
    # INFO lines: the command's summary gives the one WARNING per destination.
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    infos = [r.getMessage() for r in caplog.records
             if r.levelno == logging.INFO and r.name == "ggo_cli.delivery.deliver"]
    assert len(infos) == 3 and infos[0].startswith(f"{PACS}: 2 objects attempted this run")
    assert infos[1] == (f"{PACS}: 5 objects not delivered (no association with PACS); they "
                        "stay queued for the next run")
    assert [row.attempts for row in queue.rows(str(PACS))] == [1, 1, 0, 0, 0]


def test_a_chunk_partly_stored_is_not_a_down_destination(
    queue: DeliveryQueue, out_dir: Path
) -> None:
    uids = _register(queue, out_dir, "S1", ["1.1", "1.2", "1.3", "1.4"])
    sender = FakeSender(uids, lambda uid: (
        (SendOutcome.TRANSIENT, "busy") if uid in ("1.1", "1.3") else (SendOutcome.STORED, "")))
    (report,) = deliver(queue, [Target(PACS, ALL_KINDS)], out_dir, at="t1", sender=sender,
                        chunk=2)
    assert len(sender.calls) == 2
    assert (report.stored, report.transient, report.pending) == (2, 2, 2)
    assert _uids(queue, PACS, DeliveryStatus.PENDING) == ["1.1", "1.3"]


def test_earlier_pending_results_go_before_new_ones(queue: DeliveryQueue, out_dir: Path) -> None:
    uids = _register(queue, out_dir, "S1", ["1.1", "1.2"])
    down = FakeSender(uids, lambda uid: (SendOutcome.TRANSIENT, "down"))
    deliver(queue, [Target(PACS, ALL_KINDS)], out_dir, at="t1", sender=down)
    uids |= _register(queue, out_dir, "S0", ["0.1"])
    sender = FakeSender(uids)
    deliver(queue, [Target(PACS, ALL_KINDS)], out_dir, at="t2", sender=sender)
    assert sender.calls == [["1.1", "1.2", "0.1"]]


def test_failed_rows_are_retried_only_when_asked_and_force_resends_all(
    queue: DeliveryQueue, out_dir: Path
) -> None:
    uids = _register(queue, out_dir, "S1", ["1.1", "1.2"])
    refuse = FakeSender(uids, lambda uid: (
        (SendOutcome.FAILED, "C-STORE status 0xC000") if uid == "1.2" else (SendOutcome.STORED, "")
    ))
    (first,) = deliver(queue, [Target(PACS, ALL_KINDS)], out_dir, at="t1", sender=refuse)
    assert (first.failed, first.failed_total, first.complete) == (1, 1, False)
    sender = FakeSender(uids)
    deliver(queue, [Target(PACS, ALL_KINDS)], out_dir, at="t2", sender=sender)
    assert sender.calls == []
    (retried,) = deliver(queue, [Target(PACS, ALL_KINDS)], out_dir, at="t3", sender=sender,
                         include_failed=True)
    assert sender.calls == [["1.2"]] and retried.complete
    forced = FakeSender(uids)
    deliver(queue, [Target(PACS, ALL_KINDS)], out_dir, at="t4", sender=forced, force=True)
    assert forced.calls == [["1.1", "1.2"]]
    assert [row.attempts for row in queue.rows(str(PACS))] == [2, 3]


def test_only_the_targets_kinds_are_queued_and_counted(queue: DeliveryQueue,
                                                       out_dir: Path) -> None:
    uids = _register(queue, out_dir, "S1", ["1.1"])
    uids |= _register(queue, out_dir, "S1b", ["1.2"], ObjectKind.SR)
    sender = FakeSender(uids)
    (report,) = deliver(queue, [Target(WEB, frozenset({ObjectKind.SR}))], out_dir, at="t1",
                        sender=sender)
    assert sender.calls == [["1.2"]]
    assert (report.sent, report.pending) == (1, 0)
    (nothing,) = deliver(queue, [Target(PACS, ALL_KINDS)], out_dir, at="t1", sender=sender,
                         enqueue=False)
    assert nothing.attempted == 0 and queue.rows(str(PACS)) == []


def test_a_missing_file_fails_without_reaching_the_sender(queue: DeliveryQueue,
                                                          out_dir: Path) -> None:
    uids = _register(queue, out_dir, "S1", ["1.1", "1.2"])
    (out_dir / "S1" / "1.1.dcm").unlink()
    sender = FakeSender(uids)
    (report,) = deliver(queue, [Target(PACS, ALL_KINDS)], out_dir, at="t1", sender=sender)
    assert sender.calls == [["1.2"]]
    assert (report.failed, report.stored) == (1, 1)
    assert report.last_error == "1.1.dcm is missing from the output folder"
    assert _uids(queue, PACS, DeliveryStatus.FAILED) == ["1.1"]


def test_a_file_holding_another_instance_fails(queue: DeliveryQueue, out_dir: Path) -> None:
    uids = _register(queue, out_dir, "S1", ["1.1"])
    sender = FakeSender(dict.fromkeys(uids, "9.9"))
    (report,) = deliver(queue, [Target(PACS, ALL_KINDS)], out_dir, at="t1", sender=sender)
    assert report.failed == 1
    assert "holds another SOP instance than the one queued" in report.last_error


def test_a_ggo_error_of_the_sender_makes_the_destination_down_and_a_bug_propagates(
    queue: DeliveryQueue, out_dir: Path
) -> None:
    _register(queue, out_dir, "S1", ["1.1"])

    def unusable(dest: Destination, paths: Sequence[Path]) -> list[SendResult]:
        raise InputError("the DICOM TLS files are unusable")

    (report,) = deliver(queue, [Target(PACS, ALL_KINDS)], out_dir, at="t1", sender=unusable)
    assert (report.transient, report.pending) == (1, 1)
    assert report.last_error == "the DICOM TLS files are unusable"

    def broken(dest: Destination, paths: Sequence[Path]) -> list[SendResult]:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        deliver(queue, [Target(PACS, ALL_KINDS)], out_dir, at="t2", sender=broken)


def test_the_report_is_json_ready(queue: DeliveryQueue, out_dir: Path) -> None:
    uids = _register(queue, out_dir, "S1", ["1.1"])
    (report,) = deliver(queue, [Target(PACS, ALL_KINDS)], out_dir, at="t1",
                        sender=FakeSender(uids))
    assert report.to_dict() == {
        "destination": "dicom://PACS@127.0.0.1:104", "attempted": 1, "stored": 1, "failed": 0,
        "transient": 0, "sent": 1, "pending": 0, "failed_total": 0, "last_error": "",
        "complete": True,
    }
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        deliver(queue, [], out_dir, at="t1", chunk=0)


def test_a_real_scp_stopped_and_restarted_receives_each_object_once(
    queue: DeliveryQueue, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out_dir = tmp_path / "results"
    series = make_ct_series(out_dir, (5, 16, 16))
    objects = [
        StoredObject(uid, CT_CLASS, ObjectKind.SEG, f"S{index // 3}",
                     path.relative_to(out_dir).as_posix())
        for index, (uid, path) in enumerate(zip(series.sop_instance_uids, series.paths,
                                                strict=True))
    ]
    queue.register_series("S0", objects[:3])
    port: list[int] = []

    def sender(dest: Destination, paths: Sequence[Path]) -> list[SendResult]:
        # storage_scp listens on an ephemeral port: the queue keeps the first SCP's destination
        # and this sends to whichever SCP is up now (or to the stopped one's closed port).
        assert isinstance(dest, DimseDestination)
        return send_dimse(replace(dest, port=port[-1]), paths, timeouts=FAST)

    with storage_scp() as scp:
        port.append(scp.port)
        target = Target(parse_destination(scp.destination(), environ={}), ALL_KINDS)
        (first,) = deliver(queue, [target], out_dir, at="t1", sender=sender)
        (second,) = deliver(queue, [target], out_dir, at="t2", sender=sender)
        assert scp.received.uids() == [o.sop_instance_uid for o in objects[:3]]
    assert (first.stored, first.complete) == (3, True)
    assert second.attempted == 0
    queue.register_series("S1", objects[3:])
    with caplog.at_level(logging.INFO, logger="ggo_cli.delivery"):
        (down,) = deliver(queue, [target], out_dir, at="t3", sender=sender)
    assert (down.attempted, down.transient, down.sent, down.pending) == (2, 2, 3, 2)
    assert down.last_error.startswith(f"no association with {target.destination}")
    assert [r.getMessage() for r in caplog.records if "not delivered (" in r.getMessage()] == [
        f"{target.key}: 2 objects not delivered ({down.last_error}); they stay queued for the "
        "next run"]
    assert {row.last_error for row in queue.due(target.key)} == {down.last_error}
    with storage_scp() as restarted:
        port.append(restarted.port)
        (back,) = deliver(queue, [target], out_dir, at="t4", sender=sender)
        (after,) = deliver(queue, [target], out_dir, at="t5", sender=sender)
        assert restarted.received.uids() == [o.sop_instance_uid for o in objects[3:]]
    assert (back.stored, back.complete, after.attempted) == (2, True, 0)
    assert queue.series_states([target.key]) == {"S0": "sent", "S1": "sent"}
