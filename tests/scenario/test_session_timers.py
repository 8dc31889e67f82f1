"""Session timers (RFC 4028) through the real SBC, driven by SIPp.

`sbc run` with ``calls.session_expires: 90`` (the smallest interval RFC 4028
allows) carries two calls at once whose phones never refresh a session:

- one where both sides are alive: at half the interval the SBC refreshes each leg
  itself, with UPDATE where the peer allows it and a re-INVITE with the SDP it sent
  before where it does not, and the call goes on until the caller hangs up;
- one whose callee lost the dialog: it answers the refresh 481, and the SBC ends
  the call with a BYE on each leg (RFC 4028 10).

Each run waits for the refresh, about 45 s; the two calls share the wait.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scenario.sbcproc import SbcProcess, start_routed
from tests.scenario.test_b2bua_flows import (
    SIPP,
    assert_hidden,
    explain,
    first,
    read_cdrs,
    stamped,
    start_sipp,
    starts,
    udp_port,
    user_of,
    wait_for_calls,
)
from tests.scenario.test_b2bua_sipp import header

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp (Debian sip-tester) not installed")

SESSION_EXPIRES = 90
ALIVE, DEAD = "5101", "5102"
#: SIPp's bound on one run (the refresh comes at 45 s), and ours on waiting for it.
SIPP_TIMEOUT = ("-timeout", "80s")
WAIT = 90.0


@pytest.fixture
def sbc(tmp_path: Path) -> Iterator[tuple[SbcProcess, int, dict[str, int]]]:
    callees = {ALIVE: udp_port(), DEAD: udp_port()}
    process, outside = start_routed(
        tmp_path,
        callees,
        # No RTP flows here: the media timeout must not end the calls before the refresh.
        media="timeout: 300",
        extra=f"calls: {{session_expires: {SESSION_EXPIRES}, min_se: 90}}\n",
    )
    try:
        yield process, outside, callees
    finally:
        process.stop()


def test_the_sbc_refreshes_both_legs_and_ends_a_dead_dialog(
    sbc: tuple[SbcProcess, int, dict[str, int]], tmp_path: Path
) -> None:
    process, outside, callees = sbc
    callee_alive = start_sipp(
        tmp_path, "uas-alive", "timer_uas.xml", port=callees[ALIVE], extra=SIPP_TIMEOUT
    )
    callee_dead = start_sipp(
        tmp_path, "uas-dead", "timer_uas_dead.xml", port=callees[DEAD], extra=SIPP_TIMEOUT
    )
    time.sleep(0.1)  # SIPp binds its port
    caller_alive = start_sipp(
        tmp_path, "uac-alive", "timer_uac.xml", remote=outside, service=ALIVE, extra=SIPP_TIMEOUT
    )
    caller_dead = start_sipp(
        tmp_path, "uac-dead", "timer_uac_dead.xml", remote=outside, service=DEAD,
        extra=SIPP_TIMEOUT,
    )  # fmt: skip
    runs = [s.finish(timeout=WAIT) for s in (caller_alive, callee_alive, caller_dead, callee_dead)]
    for run in runs:
        assert run.returncode == 0, explain(process, *runs)
    a_alive, b_alive, a_dead, b_dead = runs

    # The live call: the caller's leg refreshed with UPDATE (it allows UPDATE), the
    # callee's with a re-INVITE and the SDP sent before (its Allow has no UPDATE).
    update = first(a_alive, "<UPDATE")
    assert header(update, "Session-Expires") == [f"{SESSION_EXPIRES};refresher=uac"]
    assert "timer" in ",".join(header(update, "Supported"))
    reinvites = [m for m in b_alive.received if m.startswith("<INVITE")]
    assert len(reinvites) == 2, starts(b_alive)
    first_body = reinvites[0].split("\n\n", 1)[1].strip()
    assert reinvites[1].split("\n\n", 1)[1].strip() == first_body  # unchanged o= version
    assert header(reinvites[1], "Session-Expires") == [f"{SESSION_EXPIRES};refresher=uac"]
    # At half the interval after the answer (RFC 4028 10).
    for name, method in (("uac-alive", "UPDATE"), ("uas-alive", "INVITE")):
        trace = stamped(tmp_path / f"{name}.msg")
        answered = next(t for t, line in trace if line.startswith(("<SIP/2.0 200", ">SIP/2.0 200")))
        refreshed = [t for t, line in trace if line.startswith(f"<{method}")][-1]
        assert SESSION_EXPIRES / 2 - 2 <= refreshed - answered <= SESSION_EXPIRES / 2 + 5, (
            name,
            refreshed - answered,
        )
    # No refresh crossed to the other side: each leg is the SBC's own.
    assert not [m for m in b_alive.received if m.startswith("<UPDATE")]
    assert_hidden(a_alive, b_alive, caller_alive, callee_alive)

    # The dead dialog: 481 to the refresh ended the call with a BYE on each leg,
    # the callee's after its 481 (RFC 4028 10).
    assert "<BYE" in "\n".join(starts(a_dead)), starts(a_dead)
    last = [line.split(" sip:")[0][:12] for line in starts(b_dead)][-3:]
    assert last == [">SIP/2.0 481", "<BYE", ">SIP/2.0 481"], starts(b_dead)
    assert_hidden(a_dead, b_dead, caller_dead, callee_dead)

    assert wait_for_calls(process, 0), process.log()[-3000:]
    assert process.stop() == 0
    rows = {user_of(r["callee"]): r for r in read_cdrs(tmp_path / "state" / "cdr.sqlite")}
    assert rows[ALIVE]["disposition"] == "answered" and rows[ALIVE]["end_reason"] == "bye"
    assert rows[ALIVE]["hangup_side"] == "caller"
    assert rows[DEAD]["disposition"] == "answered"
    assert rows[DEAD]["end_reason"] == "session_timer", dict(rows[DEAD])
