"""CDRs: the record value, its classification, and the SQLite / JSON-lines sinks."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest

from sbc.b2bua.call import Call, CallLeg, CallState
from sbc.b2bua.call import EndReason as CallEndReason
from sbc.cdr import (
    COLUMNS,
    SCHEMA_VERSION,
    CdrError,
    CdrRecord,
    CdrStore,
    Disposition,
    EndReason,
    HangupSide,
    JsonLinesCdrStore,
    disposition_for,
)
from sbc.cdr.from_call import cdr_record
from sbc.transport.base import Destination, ListenAddress, Transport

DOC = Path(__file__).resolve().parents[2] / "docs" / "cdr.md"
LOGGER = "sbc.cdr.store"

ANSWERED = CdrRecord(
    call_ref="c0ffee",
    route="to-carrier",
    a_realm="outside",
    b_realm="carrier",
    caller="sip:alice@198.51.100.9",
    callee="sip:+15551234@sbc.example.net",
    source="198.51.100.9:40000",
    destination="203.0.113.5:5060",
    start_time=1_700_000_000.25,
    answer_time=1_700_000_004.5,
    end_time=1_700_000_064.75,
    setup_time=4.25,
    disposition=Disposition.ANSWERED,
    final_status=200,
    hangup_side=HangupSide.CALLEE,
    end_reason=EndReason.BYE,
    a_codecs="PCMU/8000,telephone-event/8000",
    b_codecs="PCMA/8000",
    a_to_b_packets=3000,
    a_to_b_bytes=516_000,
    b_to_a_packets=2990,
    b_to_a_bytes=514_280,
    a_loss=0.0025,
    b_loss=0.0,
    a_jitter_ms=3.5,
    b_jitter_ms=1.25,
    rtt_ms=42.0,
)

BUSY = CdrRecord(
    call_ref="busy-1",
    route="to-carrier",
    a_realm="outside",
    b_realm="carrier",
    caller="sip:bob@198.51.100.10",
    callee="sip:1000@sbc.example.net",
    source="[2001:db8::10]:5060",
    destination="203.0.113.5:5060",
    start_time=1_700_000_100.0,
    end_time=1_700_000_102.0,
    setup_time=2.0,
    disposition=Disposition.BUSY,
    final_status=486,
    end_reason=EndReason.REJECTED,
)


def numbered(n: int) -> CdrRecord:
    return replace(BUSY, call_ref=f"call-{n}", start_time=BUSY.start_time + n)


@contextlib.contextmanager
def stalled_writer(path: Path) -> Iterator[None]:
    """Hold the database's write lock, so a store's writer thread waits in its open.

    Everything written meanwhile stays queued; the writer goes on once this exits.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def failures(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.getMessage().startswith("x cdr") and text in r.getMessage()
    ]


# --- the record -------------------------------------------------------------------


@pytest.mark.parametrize("record", [ANSWERED, BUSY], ids=["answered", "busy"])
def test_record_round_trips_through_json(record: CdrRecord) -> None:
    data = json.loads(json.dumps(record.to_dict()))
    assert data["version"] == 1
    assert CdrRecord.from_dict(data) == record


def test_duration_is_derived_from_answer_and_end() -> None:
    assert ANSWERED.duration == 60.25
    assert ANSWERED.to_dict()["duration"] == 60.25
    assert BUSY.duration == 0.0
    # A duration in the dict is output only: it cannot disagree with the times.
    assert CdrRecord.from_dict({**ANSWERED.to_dict(), "duration": 999.0}).duration == 60.25
    # A wall clock stepped back during the call does not give a negative duration.
    assert ANSWERED.answer_time is not None
    assert replace(ANSWERED, end_time=ANSWERED.answer_time - 1).duration == 0.0


def test_from_dict_names_what_is_wrong() -> None:
    with pytest.raises(CdrError, match=r"^unsupported cdr dict version: 2$"):
        CdrRecord.from_dict({**ANSWERED.to_dict(), "version": 2})
    data = ANSWERED.to_dict()
    del data["callee"]
    with pytest.raises(CdrError, match=r"^bad cdr: KeyError\('callee'\)$"):
        CdrRecord.from_dict(data)
    with pytest.raises(CdrError, match=r"^bad cdr: ValueError\("):
        CdrRecord.from_dict({**ANSWERED.to_dict(), "end_reason": "hung up"})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"answer_time": None}, "disposition answered disagrees with answer_time None"),
        ({"disposition": Disposition.FAILED}, "disposition failed disagrees with answer_time"),
        ({"final_status": 99}, "final_status 99 is not 0 or 100..699"),
        ({"a_loss": 1.5}, "a_loss 1.5 is not a fraction 0..1"),
        ({"b_to_a_bytes": -1}, "b_to_a_bytes is negative: -1"),
        ({"rtt_ms": float("nan")}, "rtt_ms is not finite: nan"),
    ],
)
def test_inconsistent_record_is_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(CdrError, match=re.escape(message)):
        replace(ANSWERED, **changes)  # type: ignore[arg-type]


def test_hangup_side_needs_an_answer() -> None:
    with pytest.raises(CdrError, match="hangup_side is set but the call was never answered"):
        replace(BUSY, hangup_side=HangupSide.CALLER)


@pytest.mark.parametrize(
    ("status", "answered", "reason", "expected"),
    [
        (200, True, EndReason.BYE, Disposition.ANSWERED),
        (200, True, EndReason.MEDIA_TIMEOUT, Disposition.ANSWERED),
        (200, True, EndReason.ACK_TIMEOUT, Disposition.ANSWERED),
        (486, False, EndReason.REJECTED, Disposition.BUSY),
        (600, False, EndReason.REJECTED, Disposition.BUSY),
        (408, False, EndReason.REJECTED, Disposition.NO_ANSWER),
        (480, False, EndReason.REJECTED, Disposition.NO_ANSWER),
        (487, False, EndReason.NO_ANSWER_TIMEOUT, Disposition.NO_ANSWER),
        (408, False, EndReason.NO_ANSWER_TIMEOUT, Disposition.NO_ANSWER),
        (487, False, EndReason.CANCEL, Disposition.CANCELLED),
        (403, False, EndReason.REJECTED, Disposition.REJECTED),
        (404, False, EndReason.NO_ROUTE, Disposition.REJECTED),
        (603, False, EndReason.REJECTED, Disposition.REJECTED),
        (302, False, EndReason.REJECTED, Disposition.REJECTED),
        (487, False, EndReason.REJECTED, Disposition.REJECTED),
        (500, False, EndReason.REJECTED, Disposition.FAILED),
        (503, False, EndReason.ADMISSION, Disposition.FAILED),
        # The SBC's own transaction timeout answers 408: a failure, not "no answer".
        (408, False, EndReason.TRANSPORT_ERROR, Disposition.FAILED),
        (503, False, EndReason.TRANSPORT_ERROR, Disposition.FAILED),
        (503, False, EndReason.SHUTDOWN, Disposition.FAILED),
        (486, False, EndReason.SHUTDOWN, Disposition.FAILED),
        (0, False, EndReason.REJECTED, Disposition.FAILED),
    ],
)
def test_disposition_table(
    status: int, answered: bool, reason: EndReason, expected: Disposition
) -> None:
    assert disposition_for(status, answered, reason) is expected


# --- the SQLite store ----------------------------------------------------------------


def test_store_writes_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "cdr.sqlite"
    store = CdrStore(path)
    assert store.recent() == []
    store.write(ANSWERED)
    store.write(BUSY)
    assert store.flush(timeout=5)
    # Read while the writer still has the database open (WAL: on its own connection).
    assert store.recent() == [BUSY, ANSWERED]
    assert store.recent(limit=1) == [BUSY]
    assert store.by_call_ref("c0ffee") == ANSWERED
    assert store.by_call_ref("nobody") is None
    store.close()
    stats = store.stats()
    assert (stats.written, stats.dropped, stats.queued, stats.errors) == (2, 0, 0, 0)

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        indexes = {row[1]: row for row in conn.execute("PRAGMA index_list(cdr)")}
        assert {"cdr_start_time", "cdr_call_ref"} <= indexes.keys()
        row = conn.execute(
            "SELECT duration, disposition, hangup_side, end_reason, a_loss FROM cdr "
            "WHERE call_ref = 'c0ffee'"
        ).fetchone()
        assert row == (60.25, "answered", "callee", "bye", 0.0025)
    finally:
        conn.close()


def test_reopening_keeps_records_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "cdr.sqlite"
    first = CdrStore(path)
    first.write(ANSWERED)
    first.close()
    second = CdrStore(path)
    second.write(BUSY)
    second.close()
    assert second.recent() == [BUSY, ANSWERED]
    assert second.stats().errors == 0


def test_thousand_records_are_written_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "cdr.sqlite"
    with stalled_writer(path):
        store = CdrStore(path, batch_size=500)
        for n in range(1000):
            store.write(numbered(n))
        assert store.stats().queued == 1000
    assert store.flush(timeout=10)
    stats = store.stats()
    assert (stats.written, stats.batches, stats.dropped, stats.queued) == (1000, 2, 0, 0)
    assert {r.call_ref for r in store.recent(limit=1000)} == {f"call-{n}" for n in range(1000)}
    assert store.recent(limit=1)[0].call_ref == "call-999"
    store.close()


def test_close_writes_what_is_queued(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cdr.sqlite"
    with stalled_writer(path):
        store = CdrStore(path)
        for n in range(200):
            store.write(numbered(n))
    # The writer is still waking up from the lock: close must write all 200.
    store.close(timeout=10)
    stats = store.stats()
    assert (stats.written, stats.queued, stats.dropped) == (200, 0, 0)
    assert len(store.recent(limit=500)) == 200

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        store.write(ANSWERED)
        store.write(BUSY)
        store.close()
    assert store.stats().dropped == 2
    assert len(failures(caplog, "closed: CDRs written after close are dropped")) == 1
    assert store.by_call_ref("c0ffee") is None


def unwritable_location(tmp_path: Path, kind: str) -> Path:
    if kind == "directory":
        return tmp_path
    if os.geteuid() == 0:
        # Root writes into any mode 0555 directory; nobody creates files in procfs.
        return Path("/proc/sbc-cdr-test/cdr.sqlite")
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    return locked / "cdr.sqlite"


@pytest.mark.parametrize("kind", ["directory", "read-only directory"])
@pytest.mark.parametrize("sink", [CdrStore, JsonLinesCdrStore])
def test_unwritable_path_drops_counts_and_logs_once(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    sink: type[CdrStore] | type[JsonLinesCdrStore],
) -> None:
    path = unwritable_location(tmp_path, kind)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        store = sink(path)
        store.write(ANSWERED)
        assert store.flush(timeout=5)
        store.write(BUSY)
        assert store.flush(timeout=5)
        store.write(numbered(1))
        store.close()
    stats = store.stats()
    assert (stats.written, stats.dropped, stats.queued) == (0, 3, 0)
    # The open at start-up, then a retry for each of the three batches: all failed.
    assert stats.errors == 4
    logged = failures(caplog, "open failed")
    assert len(logged) == 1
    assert logged[0].startswith(f"x cdr {path}: open failed (")
    assert "dropping CDRs until it works again" in logged[0]
    assert not (tmp_path / "ro" / "cdr.sqlite").exists()


def test_locked_database_drops_then_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cdr.sqlite"
    store = CdrStore(path, busy_timeout=0.01)
    store.write(ANSWERED)
    assert store.flush(timeout=5)
    other = sqlite3.connect(path, isolation_level=None)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        other.execute("BEGIN EXCLUSIVE")
        store.write(BUSY)
        assert store.flush(timeout=5)
        store.write(numbered(1))
        assert store.flush(timeout=5)
        other.execute("ROLLBACK")
        other.close()
        store.write(numbered(2))
        store.close()
    stats = store.stats()
    assert (stats.written, stats.dropped, stats.errors) == (2, 2, 2)
    assert [r.call_ref for r in store.recent()] == ["call-2", "c0ffee"]
    busy = failures(caplog, "SQLITE_BUSY")
    assert len(busy) == 1
    assert busy[0] == (
        f"x cdr {path}: write failed (SQLITE_BUSY): database is locked; "
        "dropping CDRs until it works again"
    )
    assert f"- cdr {path}: writing again (2 CDRs dropped so far)" in caplog.messages


def test_full_queue_drops_the_newest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cdr.sqlite"
    with caplog.at_level(logging.ERROR, logger=LOGGER), stalled_writer(path):
        store = CdrStore(path, max_queue=3)
        for n in range(10):
            store.write(numbered(n))
        assert store.stats().queued == 3
        assert store.stats().dropped == 7
    store.close(timeout=10)
    assert [r.call_ref for r in store.recent()] == ["call-2", "call-1", "call-0"]
    stats = store.stats()
    assert (stats.written, stats.dropped, stats.errors) == (3, 7, 0)
    assert failures(caplog, "queue full") == [
        f"x cdr {path}: queue full (3 records): dropping new CDRs until it drains"
    ]


def test_a_bad_record_is_dropped_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cdr.sqlite"
    with caplog.at_level(logging.ERROR, logger=LOGGER), stalled_writer(path):
        store = CdrStore(path)
        store.write(ANSWERED)
        store.write("not a record")  # type: ignore[arg-type]
        store.write(BUSY)
    store.close(timeout=10)
    stats = store.stats()
    assert (stats.written, stats.dropped, stats.errors) == (2, 1, 1)
    assert len(failures(caplog, "encode failed (AttributeError)")) == 1


def test_other_schema_version_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cdr.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (99)")
    conn.commit()
    conn.close()
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        store = CdrStore(path)
        store.write(ANSWERED)
        store.close()
    assert store.stats().dropped == 1
    assert failures(caplog, "schema version 99") == [
        f"x cdr {path}: open failed (_SchemaMismatch): database has schema version 99, "
        f"this SBC writes {SCHEMA_VERSION}; dropping CDRs until it works again"
    ]
    conn = sqlite3.connect(path)
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()
    assert tables == {"schema_version"}


def test_every_record_field_has_a_column() -> None:
    names = [c.name for c in COLUMNS]
    assert names == [key for key in ANSWERED.to_dict() if key != "version"]
    assert set(names) == {f.name for f in fields(CdrRecord)} | {"duration"}


# --- docs/cdr.md cannot drift from the schema -----------------------------------


def doc_table(heading: str) -> list[list[str]]:
    """The body rows of the first table under ``## heading`` in docs/cdr.md."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_schema_matches_docs(tmp_path: Path) -> None:
    documented = [
        (name.strip("`"), sql_type, null == "no")
        for name, sql_type, null, *_ in doc_table("Table `cdr`")
    ]
    path = tmp_path / "cdr.sqlite"
    store = CdrStore(path)
    store.close()
    conn = sqlite3.connect(path)
    try:
        actual = [(row[1], row[2], bool(row[3])) for row in conn.execute("PRAGMA table_info(cdr)")]
    finally:
        conn.close()
    assert documented == actual


def test_enum_values_match_docs() -> None:
    documented = {row[0].strip("`") for row in doc_table("Dispositions")}
    assert documented == {d.value for d in Disposition}
    documented = {row[0].strip("`") for row in doc_table("End reasons")}
    assert documented == {r.value for r in EndReason}


# --- JSON lines ------------------------------------------------------------------------


def test_json_lines_store_appends_one_object_per_line(tmp_path: Path) -> None:
    path = tmp_path / "cdr" / "cdr.jsonl"
    store = JsonLinesCdrStore(path)
    store.write(ANSWERED)
    store.write(BUSY)
    store.close()
    again = JsonLinesCdrStore(path)
    again.write(numbered(7))
    again.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [CdrRecord.from_dict(json.loads(line)) for line in lines] == [
        ANSWERED,
        BUSY,
        numbered(7),
    ]
    assert json.loads(lines[0])["duration"] == 60.25
    stats = store.stats()
    assert (stats.written, stats.dropped, stats.queued, stats.errors) == (2, 0, 0, 0)


# --- review findings ---------------------------------------------------------------------


def test_text_that_is_not_utf8_costs_only_its_own_characters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Codec names come from the caller's SDP, decoded with surrogateescape: an octet
    # that is not UTF-8 must neither fail the batch (and the CDRs of other calls in
    # it) nor lose this call's record.
    path = tmp_path / "cdr.sqlite"
    odd = replace(BUSY, a_codecs="\udcff\udcfe/8000,PCMU/8000")
    with caplog.at_level(logging.ERROR, logger=LOGGER), stalled_writer(path):
        store = CdrStore(path)
        store.write(ANSWERED)
        store.write(odd)
    store.close(timeout=10)
    stats = store.stats()
    assert (stats.written, stats.dropped, stats.errors) == (2, 0, 0)
    assert failures(caplog, "") == []
    (row,) = [r for r in store.recent() if r.call_ref == odd.call_ref]
    assert row.a_codecs.endswith("/8000,PCMU/8000")


def ended_call(b_realm: str, **changes: Any) -> Call:
    """A call the B2BUA ended (an unanswered attempt), as a CDR is made from."""
    local = ListenAddress(Transport.UDP, "198.51.100.1", 5060)
    leg = CallLeg("outside", "cid", "tag", local, Destination(Transport.UDP, "198.51.100.9", 5099))
    call = Call(
        call_ref="ended",
        state=CallState.TERMINATED,
        a=leg,
        b=replace(leg, realm=b_realm),
        route="r",
        created=10.0,
        end_status=487,
        ended_at=11.0,
        end_reason=CallEndReason.CANCEL,
    )
    return replace(call, **changes)


def test_cdrs_carry_no_uri_passwords() -> None:
    # RFC 3261 19.1.1 lets a SIP URI carry user:password; a CDR is no place for it.
    call = ended_call(
        "",
        end_status=404,
        caller="sip:alice:hunter2@198.51.100.9;transport=tcp",
        callee="sips:bob:s3cret@sbc.example.net:5061",
        end_reason=CallEndReason.NO_ROUTE,
    )
    record = cdr_record(call, None, 1_700_000_000.0)
    assert record.caller == "sip:alice@198.51.100.9;transport=tcp"
    assert record.callee == "sips:bob@sbc.example.net:5061"
    assert "hunter2" not in json.dumps(record.to_dict())


def test_each_leg_s_media_encryption_is_recorded() -> None:
    from sbc.media.session import LegState, MediaSession, MediaStream
    from sbc.media.srtp import SdesCrypto, SrtpSuite
    from sbc.media.values import Endpoint

    call = ended_call("inside")
    key = SdesCrypto.generate(SrtpSuite.AES_CM_128_HMAC_SHA1_80)

    def session(a: LegState, b: LegState) -> MediaSession:
        return MediaSession("s", "cid", (MediaStream(0, a, b),), 0.0)

    srtp = LegState("outside", Endpoint.of("198.51.100.1", 20000), local_crypto=key)
    plain = LegState("inside", Endpoint.of("203.0.113.1", 21000))
    passed = LegState("inside", Endpoint.of("203.0.113.1", 21000), encrypted=True)
    record = cdr_record(call, session(srtp, plain), 0.0)
    assert (record.a_encryption, record.b_encryption) == ("srtp", "rtp")
    record = cdr_record(call, session(plain, passed), 0.0)
    assert (record.a_encryption, record.b_encryption) == ("rtp", "srtp-passthrough")
    record = cdr_record(call, None, 0.0)
    assert (record.a_encryption, record.b_encryption) == ("", "")
    assert (
        CdrRecord.from_dict(replace(record, a_encryption="srtp").to_dict()).a_encryption == "srtp"
    )


#: The columns each older schema version lacks (docs/cdr.md, Table schema_version).
_ADDED_SINCE = {
    1: ("a_encryption", "b_encryption", "trunk", "gateway"),
    2: ("trunk", "gateway"),
}


@pytest.mark.parametrize("version", sorted(_ADDED_SINCE))
def test_an_older_database_is_upgraded_in_place(tmp_path: Path, version: int) -> None:
    from sbc.cdr.store import COLUMNS, record_to_row

    path = tmp_path / "cdr.sqlite"
    old = [c for c in COLUMNS if c.name not in _ADDED_SINCE[version]]
    assert [c.name for c in COLUMNS[: len(old)]] == [c.name for c in old]
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
    conn.execute(
        "CREATE TABLE cdr (id INTEGER PRIMARY KEY, "
        + ", ".join(f"{c.name} {c.sql_type}{' NOT NULL' if c.not_null else ''}" for c in old)
        + ")"
    )
    row = record_to_row(ANSWERED)[: len(old)]
    placeholders = ", ".join("?" for _ in old)
    names = ", ".join(c.name for c in old)
    conn.execute(f"INSERT INTO cdr ({names}) VALUES ({placeholders})", row)
    conn.commit()
    conn.close()

    store = CdrStore(path)
    new = replace(
        ANSWERED,
        call_ref="new",
        a_encryption="srtp",
        trunk="carrier",
        gateway="udp:carrier.example.net",
    )
    store.write(new)
    store.close(timeout=10)
    assert store.stats().written == 1 and store.stats().errors == 0
    by_ref = {r.call_ref: r for r in store.recent()}
    assert by_ref["new"] == new
    # Rows written before the upgrade hold empty text in the new columns.
    before = by_ref[ANSWERED.call_ref]
    assert [getattr(before, name) for name in _ADDED_SINCE[version]] == [""] * len(
        _ADDED_SINCE[version]
    )
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    finally:
        conn.close()


def test_a_trunk_call_names_its_trunk_and_last_gateway() -> None:
    record = cdr_record(
        ended_call("inside", trunk="carrier", gateway="udp:carrier.example.net"), None, 0.0
    )
    assert (record.trunk, record.gateway) == ("carrier", "udp:carrier.example.net")
    assert CdrRecord.from_dict(record.to_dict()) == record
    # A call that went to a registered user or a fixed address has neither.
    record = cdr_record(ended_call("inside"), None, 0.0)
    assert (record.trunk, record.gateway) == ("", "")
