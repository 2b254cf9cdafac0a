"""The delivery queue in a temporary SQLite file: registration, statuses, attempts, states."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from ggo_cli.delivery import (
    ALL_KINDS,
    DeliveryQueue,
    DeliveryStatus,
    ObjectKind,
    SendOutcome,
    SendResult,
    StoredObject,
)
from ggo_cli.errors import OutputError

PACS = "dicom://PACS@127.0.0.1:104"
WEB = "http://127.0.0.1:8042/dicom-web"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _obj(series: str, uid: str, kind: ObjectKind = ObjectKind.SEG) -> StoredObject:
    return StoredObject(uid, SEG_CLASS, kind, series, f"{series}/{uid}.dcm")


def _result(obj: StoredObject, outcome: SendOutcome, reason: str = "",
            *, uid: str | None = None) -> SendResult:
    return SendResult(Path("/out") / obj.path, obj.sop_instance_uid if uid is None else uid,
                      outcome, None, reason)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(tmp_path / "state.sqlite", isolation_level=None)
    yield connection
    connection.close()


@pytest.fixture
def queue(db: sqlite3.Connection) -> DeliveryQueue:
    return DeliveryQueue(db)


def _statuses(queue: DeliveryQueue, destination: str) -> dict[str, DeliveryStatus]:
    return {row.obj.sop_instance_uid: row.status for row in queue.rows(destination)}


def test_register_replaces_a_series_objects_and_keeps_rows_of_identical_uids(
    queue: DeliveryQueue,
) -> None:
    a, b, c = _obj("S1", "1.1"), _obj("S1", "1.2", ObjectKind.SR), _obj("S1", "1.3")
    other = _obj("S2", "2.1")
    queue.register_series("S1", [a, b])
    queue.register_series("S2", [other])
    assert queue.enqueue(PACS, ALL_KINDS) == 3
    queue.record(PACS, [_result(a, SendOutcome.STORED)], at="t1")
    moved = StoredObject(a.sop_instance_uid, a.sop_class_uid, a.kind, "S1", "S1/renamed.dcm")
    queue.register_series("S1", [moved, c])  # b's result changed: it is gone, c is new
    assert queue.objects() == [moved, other, c]
    assert _statuses(queue, PACS) == {"1.1": DeliveryStatus.SENT, "2.1": DeliveryStatus.PENDING}
    assert queue.enqueue(PACS, ALL_KINDS) == 1
    queue.register_series("S2", [])
    assert [o.sop_instance_uid for o in queue.objects()] == ["1.1", "1.3"]
    assert set(_statuses(queue, PACS)) == {"1.1", "1.3"}


def test_register_refuses_an_object_of_another_series(queue: DeliveryQueue) -> None:
    with pytest.raises(ValueError, match="belong to S2"):
        queue.register_series("S1", [_obj("S2", "2.1")])


def test_enqueue_is_idempotent_and_follows_the_kinds(queue: DeliveryQueue) -> None:
    queue.register_series("S1", [_obj("S1", "1.1"), _obj("S1", "1.2", ObjectKind.SR),
                                 _obj("S1", "1.3", ObjectKind.SC)])
    assert queue.enqueue(WEB, {ObjectKind.SR, ObjectKind.SC}, at="t0") == 2
    assert queue.enqueue(WEB, {ObjectKind.SR, ObjectKind.SC}) == 0
    assert queue.enqueue(WEB, ALL_KINDS) == 1
    assert queue.enqueue(PACS, ()) == 0
    assert queue.destinations() == [WEB]
    queue.enqueue(PACS, {ObjectKind.SEG})
    assert queue.destinations() == [WEB, PACS]
    assert [r.obj.sop_instance_uid for r in queue.due(WEB)] == ["1.2", "1.3", "1.1"]
    assert [r.obj.sop_instance_uid for r in queue.due(WEB, kinds={ObjectKind.SEG})] == ["1.1"]
    first = queue.due(WEB)[0]
    assert (first.status, first.attempts, first.last_error, first.updated_at) == (
        DeliveryStatus.PENDING, 0, "", "t0")


def test_record_moves_each_row_by_outcome_and_counts_attempts(queue: DeliveryQueue) -> None:
    objs = [_obj("S1", f"1.{n}") for n in range(5)]
    queue.register_series("S1", objs)
    queue.enqueue(PACS, ALL_KINDS)
    unreadable = SendResult(Path("/out") / objs[4].path, "", SendOutcome.FAILED, None,
                            "cannot read 1.4.dcm: InvalidDicomError")
    queue.record(PACS, [
        _result(objs[0], SendOutcome.STORED),
        _result(objs[1], SendOutcome.WARNING, "C-STORE status 0xB000"),
        _result(objs[2], SendOutcome.FAILED, "C-STORE status 0xC000"),
        _result(objs[3], SendOutcome.TRANSIENT, "no association"),
        unreadable,
    ], at="t1", out_dir=Path("/out"))
    rows = {r.obj.sop_instance_uid: r for r in queue.rows(PACS)}
    assert [(rows[o.sop_instance_uid].status, rows[o.sop_instance_uid].last_error)
            for o in objs] == [
        (DeliveryStatus.SENT, ""),
        (DeliveryStatus.SENT, ""),
        (DeliveryStatus.FAILED, "C-STORE status 0xC000"),
        (DeliveryStatus.PENDING, "no association"),
        (DeliveryStatus.FAILED, "cannot read 1.4.dcm: InvalidDicomError"),
    ]
    assert {r.attempts for r in rows.values()} == {1}
    assert {r.updated_at for r in rows.values()} == {"t1"}
    assert [r.obj.sop_instance_uid for r in queue.due(PACS)] == ["1.3"]
    assert [r.obj.sop_instance_uid for r in queue.due(PACS, include_failed=True)] == [
        "1.2", "1.3", "1.4"]
    queue.record(PACS, [_result(objs[3], SendOutcome.STORED)], at="t2")
    again = {r.obj.sop_instance_uid: r for r in queue.rows(PACS)}["1.3"]
    assert (again.status, again.attempts, again.last_error) == (DeliveryStatus.SENT, 2, "")
    assert queue.last_error(PACS) == "cannot read 1.4.dcm: InvalidDicomError"


def test_a_result_without_uid_is_matched_by_the_longest_path_suffix(
    queue: DeliveryQueue,
) -> None:
    inner = StoredObject("1.1", SEG_CLASS, ObjectKind.SEG, "S1", "a/seg.dcm")
    outer = StoredObject("1.2", SEG_CLASS, ObjectKind.SEG, "S1", "seg.dcm")
    queue.register_series("S1", [inner, outer])
    queue.enqueue(PACS, ALL_KINDS)
    queue.record(PACS, [SendResult(Path("/out/a/seg.dcm"), "", SendOutcome.FAILED, None, "bad")],
                 at="t1")
    assert _statuses(queue, PACS) == {"1.1": DeliveryStatus.FAILED, "1.2": DeliveryStatus.PENDING}


def test_a_result_of_another_destination_or_unknown_uid_changes_nothing(
    queue: DeliveryQueue,
) -> None:
    obj = _obj("S1", "1.1")
    queue.register_series("S1", [obj])
    queue.enqueue(PACS, ALL_KINDS)
    queue.record(WEB, [_result(obj, SendOutcome.STORED)], at="t1")
    queue.record(PACS, [_result(obj, SendOutcome.STORED, uid="9.9")], at="t1")
    row = queue.rows(PACS)[0]
    assert (row.status, row.attempts) == (DeliveryStatus.PENDING, 0)


def test_series_states_and_counts_summarise_the_rows(queue: DeliveryQueue) -> None:
    s1 = [_obj("S1", "1.1"), _obj("S1", "1.2", ObjectKind.SR)]
    s2 = [_obj("S2", "2.1"), _obj("S2", "2.2", ObjectKind.SR)]
    s3 = [_obj("S3", "3.1")]
    for series, objs in (("S1", s1), ("S2", s2), ("S3", s3)):
        queue.register_series(series, objs)
    queue.enqueue(PACS, ALL_KINDS)
    queue.enqueue(WEB, {ObjectKind.SR})
    queue.record(PACS, [_result(o, SendOutcome.STORED) for o in (*s1, s2[0], *s3)], at="t1")
    queue.record(PACS, [_result(s2[1], SendOutcome.TRANSIENT, "down")], at="t1")
    queue.record(WEB, [_result(s1[1], SendOutcome.FAILED, "refused")], at="t1")
    assert queue.series_states([PACS]) == {"S1": "sent", "S2": "pending", "S3": "sent"}
    assert queue.series_states([PACS, WEB]) == {"S1": "failed", "S2": "pending", "S3": "sent"}
    assert queue.series_states([WEB]) == {"S1": "failed", "S2": "pending"}
    assert queue.series_states({PACS: {ObjectKind.SEG}}) == {
        "S1": "sent", "S2": "sent", "S3": "sent"}
    assert queue.series_states(["dicom://OTHER@127.0.0.1:11112"]) == {}
    assert queue.counts(PACS) == {DeliveryStatus.PENDING: 1, DeliveryStatus.SENT: 4,
                                  DeliveryStatus.FAILED: 0}
    assert queue.counts(WEB, kinds={ObjectKind.SR}) == {
        DeliveryStatus.PENDING: 1, DeliveryStatus.SENT: 0, DeliveryStatus.FAILED: 1}


def test_reset_puts_every_row_of_the_kinds_back_to_pending(queue: DeliveryQueue) -> None:
    objs = [_obj("S1", "1.1"), _obj("S1", "1.2", ObjectKind.SR), _obj("S1", "1.3")]
    queue.register_series("S1", objs)
    queue.enqueue(PACS, ALL_KINDS)
    queue.enqueue(WEB, ALL_KINDS)
    queue.record(PACS, [_result(objs[0], SendOutcome.STORED),
                        _result(objs[1], SendOutcome.STORED),
                        _result(objs[2], SendOutcome.FAILED, "refused")], at="t1")
    queue.record(WEB, [_result(o, SendOutcome.STORED) for o in objs], at="t1")
    assert queue.reset(PACS, {ObjectKind.SEG}, at="t2") == 2
    assert _statuses(queue, PACS) == {"1.1": DeliveryStatus.PENDING,
                                      "1.2": DeliveryStatus.SENT, "1.3": DeliveryStatus.PENDING}
    assert [r.attempts for r in queue.due(PACS)] == [1, 1]
    assert set(_statuses(queue, WEB).values()) == {DeliveryStatus.SENT}


def test_the_queue_survives_a_new_connection(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    first = sqlite3.connect(path, isolation_level=None)
    DeliveryQueue(first).register_series("S1", [_obj("S1", "1.1")])
    DeliveryQueue(first).enqueue(PACS, ALL_KINDS)
    first.close()
    second = sqlite3.connect(path, isolation_level=None)
    try:
        assert [r.obj.sop_instance_uid for r in DeliveryQueue(second).due(PACS)] == ["1.1"]
    finally:
        second.close()


def test_database_errors_are_fatal_output_errors_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    writer = sqlite3.connect(path, isolation_level=None)
    queue = DeliveryQueue(writer)
    writer.close()
    with pytest.raises(OutputError, match=r"cannot write the delivery queue in the state "
                       r"database .*state\.sqlite.*check free space") as caught:
        queue.enqueue(PACS, ALL_KINDS)
    assert caught.value.fatal


def test_a_failed_transaction_rolls_back(db: sqlite3.Connection, queue: DeliveryQueue) -> None:
    queue.register_series("S1", [_obj("S1", "1.1")])
    db.execute("CREATE TRIGGER no_insert BEFORE INSERT ON delivery_objects "
               "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(OutputError, match="disk full"):
        queue.register_series("S1", [_obj("S1", "1.2")])
    assert [o.sop_instance_uid for o in queue.objects()] == ["1.1"]
    assert not db.in_transaction


def test_a_connection_outside_autocommit_is_refused(tmp_path: Path) -> None:
    connection = sqlite3.connect(tmp_path / "state.sqlite")
    try:
        with pytest.raises(ValueError, match="isolation_level=None"):
            DeliveryQueue(connection)
    finally:
        connection.close()
