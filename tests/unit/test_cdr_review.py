"""Review of the CDRs: fields, time bases, classification and the SQLite sink."""

from __future__ import annotations

import json
import sqlite3
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sbc.b2bua.call import Call, CallLeg, CallState, LegSide
from sbc.b2bua.call import EndReason as CallEndReason
from sbc.cdr import CdrRecord, CdrStats, CdrStore, Disposition, EndReason, HangupSide
from sbc.cdr.from_call import cdr_record
from sbc.media.rtcp import RtcpQuality
from sbc.media.session import LegState, MediaSession, MediaStream
from sbc.media.values import Endpoint
from sbc.transport.base import Destination, ListenAddress, Transport

WALL = 1_700_000_000.0


def ended(**changes: Any) -> Call:
    """A call the B2BUA ended: INVITE at monotonic 100, ended at 130."""
    local = ListenAddress(Transport.UDP, "198.51.100.1", 5060)
    a = CallLeg(
        "outside", "cid-a", "tag-a", local, Destination(Transport.UDP, "198.51.100.9", 5099)
    )
    b = CallLeg(
        "inside",
        "cid-b",
        "tag-b",
        ListenAddress(Transport.UDP, "203.0.113.1", 5060),
        Destination(Transport.UDP, "203.0.113.5", 5060),
    )
    call = Call(
        call_ref="ref",
        state=CallState.TERMINATED,
        a=a,
        b=b,
        route="r",
        created=100.0,
        end_status=487,
        caller="sip:alice@198.51.100.9",
        callee="sip:1000@sbc.example.net",
        ended_at=130.0,
        end_reason=CallEndReason.CANCEL,
    )
    return replace(call, **changes)


def answered(reason: CallEndReason, hangup: LegSide | None) -> Call:
    return ended(end_status=200, answered_at=104.5, end_reason=reason, hangup=hangup)


# --- what was checked and found right -------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "hangup", "side"),
    [
        (CallEndReason.BYE, LegSide.A, HangupSide.CALLER),
        (CallEndReason.BYE, LegSide.B, HangupSide.CALLEE),
        (CallEndReason.MAX_DURATION, None, HangupSide.SBC),
        (CallEndReason.MEDIA_TIMEOUT, None, HangupSide.SBC),
        (CallEndReason.SESSION_TIMER, None, HangupSide.SBC),
        (CallEndReason.SHUTDOWN, None, HangupSide.SBC),
        (CallEndReason.ACK_TIMEOUT, None, HangupSide.SBC),
    ],
)
def test_an_answered_call_is_answered_with_exact_times_and_its_hangup_side(
    reason: CallEndReason, hangup: LegSide | None, side: HangupSide
) -> None:
    record = cdr_record(answered(reason, hangup), None, WALL)
    assert record.disposition is Disposition.ANSWERED
    assert record.final_status == 200
    assert record.end_reason is EndReason[reason.name]
    assert record.hangup_side is side
    assert (record.start_time, record.answer_time, record.end_time) == (
        WALL + 100.0,
        WALL + 104.5,
        WALL + 130.0,
    )
    assert record.duration == 25.5
    assert record.setup_time == 4.5


@pytest.mark.parametrize(
    ("reason", "status", "disposition", "setup"),
    [
        (CallEndReason.REJECTED, 486, Disposition.BUSY, 30.0),
        (CallEndReason.REJECTED, 600, Disposition.BUSY, 30.0),
        (CallEndReason.REJECTED, 480, Disposition.NO_ANSWER, 30.0),
        (CallEndReason.REJECTED, 404, Disposition.REJECTED, 30.0),
        (CallEndReason.REJECTED, 302, Disposition.REJECTED, 30.0),
        (CallEndReason.REJECTED, 500, Disposition.FAILED, 30.0),
        (CallEndReason.ADMISSION, 503, Disposition.FAILED, 30.0),
        (CallEndReason.NO_ROUTE, 404, Disposition.REJECTED, 30.0),
        (CallEndReason.CANCEL, 487, Disposition.CANCELLED, None),
        (CallEndReason.SHUTDOWN, 503, Disposition.FAILED, None),
    ],
)
def test_an_unanswered_attempt_has_no_duration_and_its_disposition(
    reason: CallEndReason, status: int, disposition: Disposition, setup: float | None
) -> None:
    record = cdr_record(ended(end_status=status, end_reason=reason), None, WALL)
    assert record.disposition is disposition
    assert record.final_status == status
    assert record.answer_time is None and record.hangup_side is None
    assert record.duration == 0.0
    assert record.setup_time == setup
    assert record.to_dict()["duration"] == 0.0


def test_the_callee_s_media_counters_and_rtcp_quality_reach_the_record() -> None:
    from sbc.media.session import LegCounters

    a = LegState(
        "outside",
        Endpoint.of("198.51.100.1", 20000),
        counters=LegCounters(packets=10, bytes=1720, kernel_packets=90, kernel_bytes=15480),
        quality=RtcpQuality(reports=2, fraction_lost=0.25, jitter=80, rtt=0.04),
    )
    b = LegState(
        "inside",
        Endpoint.of("203.0.113.1", 21000),
        counters=LegCounters(packets=50, bytes=8600, rtcp_packets=5, rtcp_bytes=400),
    )
    session = MediaSession("s", "cid", (MediaStream(0, a, b),), 0.0)
    call = replace(answered(CallEndReason.BYE, LegSide.A), a_codecs="PCMU/8000")
    record = cdr_record(call, session, WALL)
    # RTCP is not counted as RTP; the kernel's packets are.
    assert (record.a_to_b_packets, record.a_to_b_bytes) == (100, 17200)
    assert (record.b_to_a_packets, record.b_to_a_bytes) == (50, 8600)
    assert record.a_loss == 0.25 and record.a_jitter_ms == 10.0 and record.rtt_ms == 40.0
    # The callee sent no report: unknown, not 0.
    assert record.b_loss is None and record.b_jitter_ms is None


def test_a_reader_holding_the_database_open_does_not_stop_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "cdr.sqlite"
    store = CdrStore(path)
    record = cdr_record(answered(CallEndReason.BYE, LegSide.B), None, WALL)
    store.write(replace(record, call_ref="first"))
    assert store.flush(10)
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        reader.execute("BEGIN")  # a long read transaction (a report running)
        assert reader.execute("SELECT count(*) FROM cdr").fetchone() == (1,)
        store.write(replace(record, call_ref="second"))
        assert store.flush(10)
    finally:
        reader.close()
    store.close(10)
    assert store.stats() == CdrStats(written=2, dropped=0, queued=0, errors=0, batches=2)
    assert [r.call_ref for r in store.recent()] == ["second", "first"]


def test_a_state_directory_that_is_a_file_costs_records_not_the_sbc(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a directory")
    store = CdrStore(tmp_path / "state" / "cdr.sqlite")
    store.write(cdr_record(ended(), None, WALL))
    store.close(10)
    stats = store.stats()
    assert (stats.written, stats.dropped, stats.queued) == (0, 1, 0)
    assert stats.errors >= 1
    assert store.recent() == []


# --- bugs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "status"),
    [(CallEndReason.NO_ANSWER_TIMEOUT, 408), (CallEndReason.TRANSPORT_ERROR, 408)],
)
def test_setup_time_is_null_when_no_final_response_arrived(
    reason: CallEndReason, status: int
) -> None:
    # docs/cdr.md: "NULL when none arrived". The ring timer's 408 and the 408/503
    # synthesized for Timer B or a transport failure are the SBC's own: nothing
    # arrived. They were recorded as a set-up of the whole ring time.
    record = cdr_record(ended(end_status=status, end_reason=reason), None, WALL)
    assert record.setup_time is None
    assert record.disposition in (Disposition.NO_ANSWER, Disposition.FAILED)


def test_jitter_uses_each_leg_s_codec_clock_rate() -> None:
    # rtpmap is name/rate/channels: opus/48000/2 was read as 8000 Hz, the jitter
    # six times too large; and the callee's jitter used the caller's codec.
    quality = RtcpQuality(reports=1, jitter=480)
    a = LegState("outside", Endpoint.of("198.51.100.1", 20000), quality=quality)
    b = LegState("inside", Endpoint.of("203.0.113.1", 21000), quality=quality)
    session = MediaSession("s", "cid", (MediaStream(0, a, b),), 0.0)
    call = replace(
        answered(CallEndReason.BYE, LegSide.A),
        a_codecs="opus/48000/2,telephone-event/48000",
        b_codecs="AMR-WB/16000",
    )
    record = cdr_record(call, session, WALL)
    assert record.a_jitter_ms == pytest.approx(10.0)
    assert record.b_jitter_ms == pytest.approx(30.0)


def test_a_password_with_a_raw_at_sign_leaves_nothing_of_it() -> None:
    call = ended(caller="sip:alice:hunter@2x@198.51.100.9", end_reason=CallEndReason.NO_ROUTE)
    record = cdr_record(replace(call, end_status=404), None, WALL)
    assert record.caller == "sip:alice@198.51.100.9"
    assert "2x" not in json.dumps(record.to_dict())


def test_cdr_times_follow_the_wall_clock_after_it_steps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sbc.app import SbcNode
    from sbc.config.loader import load_config_text

    config = load_config_text(textwrap.dedent("{}"), "sbc.yaml", tmp_path)
    node = SbcNode(config)
    written: list[CdrRecord] = []

    class Sink:
        def write(self, record: CdrRecord) -> None:
            written.append(record)

        def close(self, timeout: float = 5.0) -> None:
            pass

        def stats(self) -> CdrStats:
            return CdrStats(0, 0, 0, 0, 0)

    node.cdr = Sink()
    # The wall clock is stepped an hour forward after the SBC started.
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600.0)
    now = time.monotonic()
    node._write_cdr(ended(created=now - 1.0, ended_at=now), None)
    assert written[0].end_time == pytest.approx(time.time(), abs=1.0)
